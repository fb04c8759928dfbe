/*
 * The HTTP message proxy shared by the forward (proto-http.c) and reverse
 * (proto-reverse.c) instances: request heads are parsed (http-parse.c),
 * routed by the instance's module, rewritten and injected through a relay
 * filter; bodies pass through the relay in place. One session per upstream
 * connection: when the next request on a client connection needs another
 * upstream, the client's socket moves to a new session (docs/notes-http.md).
 */
#ifndef CAPD_HTTP_PROXY_H
#define CAPD_HTTP_PROXY_H

#include <stdbool.h>
#include <stdint.h>

#include "addr.h"
#include "buf.h"
#include "http-parse.h"
#include "instance.h"

struct session;
struct tls_cfg;
struct users;

/* A route of a reverse instance: `route = pattern[/path]=host:port`; the
 * instance's http_cfg owns it and http_cfg_free frees its strings. */
struct http_route {
	char *pattern;              /* the host part: "www.example.com", "*.api.test" or "*" */
	char *path;                 /* the path prefix, as written: "/api/", "/" when none was */
	size_t path_len;
	unsigned host;              /* index of the first route with this host pattern (one "server block") */
	char *text;                 /* pattern and path as written, "=", the upstream: the instance object's */
	struct hostport to;
};

/* Where a request goes, as the module decided. */
struct http_target {
	char host[HOST_MAX + 1];
	uint16_t port;
	bool connect;               /* a CONNECT tunnel */
	const char *path;           /* absolute form: the origin-form target (into the head); NULL: as received */
	size_t path_len;
	const char *authority;      /* absolute form: the URL's host[:port], which replaces Host */
	size_t authority_len;
	const char *user;           /* authenticated proxy user, or NULL */
};

/* The instance config of http and reverse (inst->cfg); http_cfg_free frees it. */
struct http_cfg {
	bool reverse;
	struct http_limits lim;
	double head_timeout;        /* header_timeout: seconds a new client connection has for its request head; 0 = none */
	double resp_timeout;        /* response_timeout: seconds between reads of an awaited response; 0 = none */
	struct tls_cfg *tls;        /* tls* keys (tls.h): CONNECT tunnels (http), clients (reverse) */
	/* http */
	struct users *users;        /* NULL: no proxy auth */
	bool connect_any;           /* connect_ports = * */
	uint16_t connect_ports[64];
	unsigned nconnect_ports;
	/* reverse */
	struct http_route *routes;
	unsigned nroutes;
	bool have_default;
	struct hostport def;
	/* the module: picks the upstream for a parsed request; 0, or an HTTP status with *why */
	int (*route)(struct session *s, const struct http_msg *m, struct http_target *t, const char **why);
};

/* "host", "host:port", "[v6]:port" (a URL's authority, no userinfo) into t->host
 * and t->port (80 when absent or empty, "host:"); 1 when a port was given, 0
 * when not, -1 when malformed. */
int http_authority(const char *a, size_t n, struct http_target *t);
/* Reads max_header_size into cfg->lim, header_timeout and response_timeout; -1 with the error recorded in p. */
int http_cfg_limits(struct http_cfg *cfg, struct params *p);
void http_cfg_free(struct instance *inst);

/* The struct proto callbacks both modules use. */
void http_proxy_accepted(struct session *s);
void http_proxy_input(struct session *s);
void http_proxy_connected(struct session *s, int err);
/* proto->hs_ended: a request head that ends unanswered (header_timeout, the
 * client's close or reset, too large) is captured as a refused one. */
void http_proxy_hs_ended(struct session *s);
void http_proxy_session_free(struct session *s);
bool http_proxy_idle(struct session *s);

/* The first bytes a client sent in an intercepted tunnel (tls.h,
 * tls_intercept_start): when they start with an HTTP/1.x request line, its
 * method and target go at the end of the note's protocol part ("CONNECT
 * host:443 GET /path"); anything else leaves the note as it is. */
void http_note_inner(struct session *s, const uint8_t *p, size_t n);

#define HTTP_PROXY_HS_MAX (64 * 1024)  /* = RELAY_BUF: a head, leftover and all, fits the relay */

#endif

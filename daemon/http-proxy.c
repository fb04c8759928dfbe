/*
 * The HTTP message proxy behind the http and reverse instances.
 *
 * A session is one upstream connection. Its first request head arrives in
 * hs_in (http_proxy_input): the module routes it, capd connects, and the
 * relay starts with a filter (http_filter) that sees every byte both ways:
 *
 *  up    HEAD: parse the next request; same upstream: inject the rewritten
 *        head (captured as sent), EAT the original; else hand the client on
 *        BODY: pass Content-Length or chunked bytes in place, then WAIT
 *        WAIT: the request is complete; the next bytes are held (END)
 *  down  IDLE: no request outstanding; HEAD: parse the response (the original
 *        head is captured as received, the rewritten one is sent); BODY as up
 *
 * When both the request and its response are done, the next request may go
 * on. A request for another upstream, a CONNECT, or any request after an
 * upstream that will not be reused moves the client socket, with the bytes
 * held so far, to a new session (http_handoff); the old one closes. So
 * does a request that a reused upstream connection closed on before any of
 * its answer (the keep-alive race, http_retry): it goes again there. Error
 * replies, and capd's own answer to an OPTIONS or TRACE with Max-Forwards: 0
 * (http_answer), go through session_send before the relay runs, and through
 * relay_inject + relay_finish after; the connection ends with them, but
 * after a 407 it may go on in a new session (http_refuse_keep). A client
 * connection that opens with the HTTP/2 preface is told, in HTTP/2, to use
 * HTTP/1.1 (http_refuse_h2). Each such exchange is captured, toward capd's
 * own address, when it happens (session_refused_heard): no upstream saw it.
 */
#include "http-proxy.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "capd.h"
#include "chain.h"
#include "log.h"
#include "relay.h"
#include "session.h"
#include "tls.h"
#include "users.h"
#include "values.h"
#include "xmalloc.h"

#define HTTP_WAIT_REQUEST 60.0  /* header_timeout's default: nginx's client_header_timeout */
#define HTTP_WAIT_RESPONSE 60.0 /* response_timeout's default: nginx's proxy_read_timeout */
#define HTTP_NOTE_MAX 200

enum { UP_HEAD, UP_BODY, UP_WAIT, UP_TUNNEL };
enum { DOWN_IDLE, DOWN_HEAD, DOWN_BODY, DOWN_TUNNEL };

/* One session's HTTP state; owned by the session (proto_state), freed by http_proxy_session_free. */
struct http_conn {
	char host[HOST_MAX + 1];    /* the upstream this session is connected to */
	uint16_t port;
	bool connect;               /* CONNECT tunnel: no filter */
	size_t connect_head;        /* bytes of the CONNECT head in hs_in */

	uint8_t up, down;           /* UP_*, DOWN_* */
	struct http_body up_body, down_body;
	bool req_done, resp_done;   /* the current exchange */
	bool req_head;              /* the request was HEAD (its response, capd's own too, has no content) */
	bool req_upgrade;           /* the request asked for an Upgrade */
	bool req_expect;            /* its body waits for the upstream's 100 Continue (nothing of it came yet) */
	int req_minor;
	bool client_keep;           /* the client connection outlives this response */
	bool client_pconn;          /* it asked so with Proxy-Connection, which the answer repeats */
	bool upstream_keep;         /* the upstream may carry the next request */
	bool upstream_gone;         /* it will not: the next request moves the client on */
	const char *gone_why;       /* why, when it did not just close (static text), or NULL */
	bool dechunk;               /* a chunked response to a 1.0 client: only its chunks' data goes out */
	unsigned exchanges;         /* exchanges done on this upstream connection: it is a reused one after the first */
	bool can_retry;             /* the request may go again on a new connection should this one close unanswered */
	struct buf retry;           /* that request's head as the client sent it (can_retry, no TLS) */
	char *upload_fail;          /* why sending the request failed (its answer is read on), owned */
	char *fail;                 /* reason when finishing with an error reply, owned */
	struct buf head;            /* rewritten heads are built here */
	char authority[HOST_MAX + 8]; /* reverse: the Host the request went with ("" none), for Location */
	/* response_timeout (http_resp_timer_cb): the filter only stamps resp_at,
	 * the timer checks it when it runs out and re-arms itself for the rest */
	ev_timer resp_timer;
	double resp_at;             /* the last read from the upstream, or the request's end, whichever came last */
	uint64_t up_taken;          /* request bytes the upstream had taken at the last check (http_upload_moved) */
	bool continued;             /* the client connection began in another session (http_handoff) */
};

/* Parse results live here only for the length of one callback. */
static _Thread_local struct http_msg http_msg;  /* per loop thread (shard.h) */
/* The session whose client connection http_handoff moves, while its
 * session_new runs: the new session's accepted takes the client's TLS from
 * it instead of starting a handshake. */
static _Thread_local struct session *http_moving;

static const struct relay_filter http_filter;

/* ---- config ---- */

int
http_cfg_limits(struct http_cfg *cfg, struct params *p)
{
	uint64_t max;

	if (params_size(p, "max_header_size", HTTP_HEAD_DEFAULT, &max) < 0)
		return -1;
	_Static_assert(VALUE_HEADER_SIZE_MAX <= HTTP_PROXY_HS_MAX, "a head must fit the relay");
	if (max < VALUE_HEADER_SIZE_MIN || max > VALUE_HEADER_SIZE_MAX)
		return params_fail(p, "max_header_size", "max_header_size must be between 1K and 64K");
	cfg->lim.max_head = (size_t)max;
	cfg->lim.max_headers = HTTP_MAX_HEADERS;
	if (params_duration(p, "response_timeout", HTTP_WAIT_RESPONSE, &cfg->resp_timeout) < 0)
		return -1;
	return params_duration(p, "header_timeout", HTTP_WAIT_REQUEST, &cfg->head_timeout);
}

void
http_cfg_free(struct instance *inst)
{
	struct http_cfg *cfg = inst->cfg;

	if (cfg == NULL)
		return;
	users_free(cfg->users);
	tls_cfg_free(cfg->tls);
	for (unsigned i = 0; i < cfg->nroutes; i++) {
		free(cfg->routes[i].pattern);
		free(cfg->routes[i].path);
		free(cfg->routes[i].text);
	}
	free(cfg->routes);
	free(cfg);
}

/* "host", "host:port", "[v6]:port" of an http URL into t: 1 with a port,
 * 0 without (port 80; also "host:", whose port is empty), -1 when malformed. */
int
http_authority(const char *a, size_t n, struct http_target *t)
{
	size_t hl, i;
	const char *h = a, *port = NULL;
	char host[HOST_MAX + 1];

	if (n == 0 || memchr(a, '@', n))
		return -1;
	if (a[0] == '[') {
		const char *close = memchr(a, ']', n);
		if (close == NULL)
			return -1;
		h = a + 1;
		hl = (size_t)(close - h);
		if ((size_t)(close - a) + 1 < n) {
			if (close[1] != ':')
				return -1;
			port = close + 2;
		}
	} else {
		const char *colon = memchr(a, ':', n);
		hl = colon ? (size_t)(colon - a) : n;
		if (colon)
			port = colon + 1;
	}
	if (hl == 0 || hl > HOST_MAX)
		return -1;
	if (port == a + n)
		port = NULL;  /* "host:": an empty port is the scheme's default (RFC 9110 4.2.1) */
	memcpy(host, h, hl);
	host[hl] = '\0';
	if (a[0] == '[' ? !(addr_is_ip_literal(host) && strchr(host, ':')) : !(hostname_valid(host) || addr_is_ip_literal(host)))
		return -1;
	t->port = 80;
	if (port) {
		size_t pl = (size_t)(a + n - port);
		unsigned v = 0;
		if (pl == 0 || pl > 5)
			return -1;
		for (i = 0; i < pl; i++) {
			if (port[i] < '0' || port[i] > '9')
				return -1;
			v = v * 10 + (unsigned)(port[i] - '0');
		}
		if (v == 0 || v > 65535)
			return -1;
		t->port = (uint16_t)v;
	}
	memcpy(t->host, host, hl + 1);
	return port != NULL;
}

/* ---- replies ---- */

/* conn: the Connection line(s) the reply ends with, "" for none. */
static void
http_error_text(struct buf *b, int status, const char *why, bool auth, bool head, const char *conn)
{
	const char *text = http_status_text(status);
	char body[512];
	int n = snprintf(body, sizeof body, "%d %s: %s\n", status, text, why);

	if (n < 0 || (size_t)n >= sizeof body)
		n = (int)sizeof body - 1;
	buf_printf(b,
	           "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s%s\r\n",
	           status, text, n, conn, auth ? "Proxy-Authenticate: Basic realm=\"capd\"\r\n" : "");
	/* the answer to a HEAD has a GET's header fields and no content (RFC 9110
	 * 9.3.2): a client reads none, and bytes after the head are garbage to it */
	if (!head)
		buf_append(b, body, (size_t)n);
}

static char *
http_reason(int status, const char *why)
{
	return xasprintf("%d %s: %s", status, http_status_text(status), why);
}

/* session_close for an end the client chose (it closed, or went on in
 * another session): after an idle upstream's reset the capture's flow ends
 * with that reset (the caller's reason says so). */
static void
http_close(struct session *s, const char *reason)
{
	session_close(s, reason);  /* with the upstream's RST when it reset (s->upstream_reset) */
}

/* Before the relay: the reply in b, FIN, close (lingering) with reason. The
 * capture has it, after what the client sent (session_refused_heard). */
static void
http_reply_early(struct session *s, const struct buf *b, const char *reason)
{
	session_refused_heard(s, buf_head(&s->hs_in), buf_used(&s->hs_in));
	session_refused_say(s, buf_head(b), buf_used(b));
	if (s->state != SESSION_CLOSED && s->client.fd >= 0 && buf_used(&s->hs_out) == 0) {
		if (s->client.tls != NULL)
			tls_side_shutdown(s->client.tls);
		shutdown(s->client.fd, SHUT_WR);
		session_linger_client(s);  /* an upload refused; a TLS client's records too */
	}
	session_close(s, reason);
}

/* http_reply_early with an error reply. */
static void
http_fail_early(struct session *s, int status, const char *why)
{
	struct http_conn *hc = s->proto_state;
	struct buf b = { 0 };
	char *reason = http_reason(status, why);

	http_error_text(&b, status, why, status == 407, hc->req_head, "Connection: close\r\n");
	http_reply_early(s, &b, reason);
	buf_free(&b);
	free(reason);
}

/* While relaying: the client gets what is queued for it, then a FIN; http_done
 * closes the session with reason (the first one given). Reads stop. */
static void
http_end_late(struct session *s, const char *reason)
{
	struct http_conn *hc = s->proto_state;

	if (hc->fail == NULL)
		hc->fail = xstrdup(reason);
	relay_finish(s, DIR_DOWN);
	hc->up = UP_WAIT;
	hc->down = DOWN_IDLE;
}

/* A request refused on a connection that relays already: not the upstream's
 * to see, so the capture has it, with capd's reply, in a flow of its own
 * toward capd's address (session_refused_heard), as a first request's is.
 * p, n: what the client sent that capd holds, from the request on; NULL for
 * a reply to a request relayed (http_fail_late): what of the client's the
 * relay holds unjudged then never goes upstream, so that flow has it. */
static void
http_refuse_late(struct session *s, const uint8_t *p, size_t n, const struct buf *reply, const char *reason)
{
	if (p == NULL)
		n = relay_held(s, DIR_UP, &p);
	if (n > 0)
		session_refused_heard(s, p, n);
	session_refused_said(s, buf_head(reply), buf_used(reply));
	relay_inject(s, DIR_DOWN, buf_head(reply), buf_used(reply));
	http_end_late(s, reason);
	/* the FIN follows the reply (relay_finish): before a close the client makes after reading it */
	session_refused_shut(s);
}

/* http_refuse_late with the error reply for status and why; p, n as there. */
static void
http_error_late(struct session *s, const uint8_t *p, size_t n, int status, const char *why)
{
	struct http_conn *hc = s->proto_state;
	struct buf b = { 0 };
	char *reason = http_reason(status, why);

	http_error_text(&b, status, why, status == 407, hc->req_head, "Connection: close\r\n");
	http_refuse_late(s, p, n, &b, reason);
	buf_free(&b);
	free(reason);
}

/* http_end_late with an error reply after what the client already has (a
 * timeout, an upstream that failed): captured as a refusal, the upstream
 * never having sent it (http_refuse_late). */
static void
http_fail_late(struct session *s, int status, const char *why)
{
	http_error_late(s, NULL, 0, status, why);
}

/* ---- routing and rewriting ---- */

/* Parses and routes the request at p. PARSE_OK with t filled; PARSE_ERR with *status and *why. */
static enum parse
http_route_request(struct session *s, const uint8_t *p, size_t n, struct http_target *t, int *status,
                   const char **why)
{
	struct http_cfg *cfg = s->inst->cfg;
	struct http_msg *m = &http_msg;
	enum parse rv = http_parse_request(p, n, &cfg->lim, m);
	int st;

	if (rv == PARSE_MORE)
		return rv;
	if (rv == PARSE_ERR) {
		*status = m->status;
		*why = m->why;
		return rv;
	}
	memset(t, 0, sizeof *t);
	if ((st = cfg->route(s, m, t, why)) != 0) {
		*status = st;
		return PARSE_ERR;
	}
	return PARSE_OK;
}

/* A request line for a note: the method and the target cut at
 * HTTP_NOTE_MAX bytes. A target's bytes past ASCII (raw UTF-8 from curl, or
 * Latin-1) are written %XX, as a browser sends them: the note goes into
 * JSON, which takes valid UTF-8 only. */
static void
http_note_line(struct buf *b, const struct http_msg *m)
{
	size_t n = m->target_len < HTTP_NOTE_MAX ? m->target_len : HTTP_NOTE_MAX;

	buf_append(b, m->method, m->method_len);
	buf_append(b, " ", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)m->target[i];

		if (c >= 0x80)
			buf_printf(b, "%%%02X", c);
		else
			buf_append(b, &m->target[i], 1);
	}
}

/* The session's note: its first request line (http_note_line) and the
 * proxy user, in front of TLS's part (a client's end of TLS read with its
 * request is noted before it). */
static void
http_note(struct session *s, const struct http_msg *m, const struct http_target *t)
{
	struct buf b = { 0 };

	if (session_note_has_proto(s))
		return;
	http_note_line(&b, m);
	if (t->user)
		buf_printf(&b, " user=%s", t->user);
	buf_append(&b, "", 1);
	session_note_proto(s, (const char *)buf_head(&b));
	buf_free(&b);
}

void
http_note_inner(struct session *s, const uint8_t *p, size_t n)
{
	struct http_msg m;
	struct buf b = { 0 };

	if (!http_request_line_at(p, n, &m))
		return;  /* not HTTP/1.x (HTTP/2's preface is not either), or not whole */
	http_note_line(&b, &m);
	buf_append(&b, "", 1);
	session_note_proto_add(s, (const char *)buf_head(&b));
	buf_free(&b);
}

static bool
http_hdr_is(const struct http_hdr *h, const char *name)
{
	return http_token_eq(h->name, h->name_len, name);
}

/* The host and port a request asked for, as far as it parsed: a CONNECT's
 * authority, an absolute URL's (http:// or https://), else its one Host;
 * without a port, the scheme's (tls: the client's connection is TLS). 0, or
 * -1 when it names none that parses. */
static int
http_asked(const struct http_msg *m, bool tls, struct http_target *t)
{
	const char *a = NULL;
	size_t an = 0, skip;
	bool https;
	int rv;

	if (m->target == NULL)
		return -1;
	if (http_method_is(m, "CONNECT"))
		return http_authority(m->target, m->target_len, t) == 1 ? 0 : -1;
	if ((skip = http_target_scheme(m, &https)) != 0) {
		a = m->target + skip;
		while (skip + an < m->target_len && a[an] != '/' && a[an] != '?' && a[an] != '#')
			an++;
	} else {
		https = tls;  /* Host's default port is the connection's */
		for (unsigned i = 0; i < m->nhdr; i++) {
			if (!http_hdr_is(&m->hdr[i], "host"))
				continue;
			if (a)
				return -1;  /* which one? */
			a = m->hdr[i].value;
			an = m->hdr[i].value_len;
		}
	}
	if (a == NULL || (rv = http_authority(a, an, t)) < 0)
		return -1;
	if (rv == 0 && https)
		t->port = 443;
	return 0;
}

/* A request capd refuses (or answers) itself never reaches an upstream: the
 * session's record says what it asked for beside the reason, which says why.
 * Its request line becomes the note and, on a session that has no target
 * yet, what it asked for the target. */
static void
http_note_refused(struct session *s, const struct http_msg *m)
{
	struct http_target t = { 0 };

	if (m->method == NULL || m->target == NULL)
		return;  /* nothing of it parsed: the reason alone says it */
	http_note(s, m, &t);
	if (s->have_target || s->target_name[0] || http_asked(m, s->client.tls != NULL, &t) < 0)
		return;
	hostport_format(t.host, t.port, s->target_name, sizeof s->target_name);
}

/* ---- requests for capd itself ---- */

#define HTTP_ALLOW "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"

/* An OPTIONS or TRACE whose Max-Forwards is 0 is for the recipient to
 * answer (RFC 9110 7.6.2): capd is that recipient. */
static bool
http_for_capd(const struct http_msg *m)
{
	return (http_method_is(m, "OPTIONS") || http_method_is(m, "TRACE")) && http_max_forwards(m, NULL) == 0;
}

/* The line of a parsed head (which ends at end) from p to its end, less
 * its CRLF or bare LF, with a CRLF into b. */
static void
http_echo_line(struct buf *b, const char *p, const char *end)
{
	const char *lf = memchr(p, '\n', (size_t)(end - p));
	size_t n = (size_t)(lf - p);

	if (n > 0 && p[n - 1] == '\r')
		n--;
	buf_append(b, p, n);
	buf_append(b, "\r\n", 2);
}

/* capd's own answer to a request for it (http_for_capd) into b, and its
 * reason into *reason (caller frees). OPTIONS: 200, Allow and no body.
 * TRACE: 200 with the request head as received (message/http, RFC 9110
 * 9.3.8), less the lines that carry credentials, which that section says
 * the recipient should leave out. The connection ends after it. */
static void
http_answer(struct session *s, const struct http_msg *m, const uint8_t *p, struct buf *b, char **reason)
{
	struct http_cfg *cfg = s->inst->cfg;
	const char *end = (const char *)p + m->head_len;
	struct buf echo = { 0 };

	*reason = xasprintf("%d %s: %.*s with Max-Forwards: 0, answered by capd", 200, http_status_text(200),
	                    (int)m->method_len, m->method);
	if (http_method_is(m, "OPTIONS")) {
		buf_printf(b, "HTTP/1.1 200 OK\r\nAllow: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		           cfg->reverse ? HTTP_ALLOW : HTTP_ALLOW ", CONNECT");
		return;
	}
	/* line ends as capd passes them: CRLF, even for a bare LF */
	http_echo_line(&echo, m->method, end);
	for (unsigned i = 0; i < m->nhdr; i++) {
		const struct http_hdr *h = &m->hdr[i];

		if (http_hdr_is(h, "authorization") || http_hdr_is(h, "proxy-authorization") ||
		    http_hdr_is(h, "cookie"))
			continue;
		http_echo_line(&echo, h->name, end);
	}
	buf_append(&echo, "\r\n", 2);
	buf_printf(b,
	           "HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
	           buf_used(&echo));
	buf_append(b, buf_head(&echo), buf_used(&echo));
	buf_free(&echo);
}

/* A message's Content-Length as it goes on: the parser takes a list of
 * equal values, or the line repeated, as one length, and RFC 9110 8.6 lets
 * a recipient do so only if what it forwards is that one value, once (nginx
 * answers "2, 2" or two lines with 400). The first line goes out with its
 * value (*sent then says so); the others are dropped. */
static void
http_put_length(struct buf *b, const struct http_hdr *h, bool *sent)
{
	uint64_t v = 0;
	uint32_t i = 0;

	if (*sent)
		return;
	*sent = true;

	while (i < h->value_len && (h->value[i] < '0' || h->value[i] > '9'))
		i++;
	for (; i < h->value_len && h->value[i] >= '0' && h->value[i] <= '9'; i++)
		v = v * 10 + (uint64_t)(h->value[i] - '0');
	buf_append(b, h->name, h->name_len);
	buf_printf(b, ": %llu\r\n", (unsigned long long)v);
}

/* The request head as it goes upstream. */
static void
http_rewrite_request(struct session *s, const struct http_msg *m, const struct http_target *t, struct buf *b)
{
	struct http_cfg *cfg = s->inst->cfg;
	char ip[ADDR_STRLEN];
	int xff = -1;  /* the last X-Forwarded-For line: the client's address goes after its list */
	const struct http_hdr *mf = NULL;  /* an OPTIONS's or TRACE's Max-Forwards, counted down (RFC 9110 7.6.2) */
	int64_t hops = -1;
	bool length = false;  /* a Content-Length went out (http_put_length) */

	buf_reset(b);
	buf_append(b, m->method, m->method_len);
	buf_append(b, " ", 1);
	if (t->path && t->path_len == 0 && http_method_is(m, "OPTIONS"))
		buf_append(b, "*", 1);  /* "OPTIONS http://h": the server as a whole (RFC 9112 3.2.4) */
	else if (t->path) {
		if (t->path_len == 0 || t->path[0] != '/')
			buf_append(b, "/", 1);  /* "http://h" and "http://h?q" */
		buf_append(b, t->path, t->path_len);
	}
	else
		buf_append(b, m->target, m->target_len);
	buf_printf(b, " HTTP/1.%d\r\n", m->minor);
	/* an absolute-form target names the host: its authority replaces Host (RFC 9112 3.2.2) */
	if (t->authority) {
		buf_append(b, "Host: ", 6);
		buf_append(b, t->authority, t->authority_len);
		buf_append(b, "\r\n", 2);
	}
	addr_format_ip((struct sockaddr *)&s->client_addr, ip, sizeof ip);
	if (http_method_is(m, "OPTIONS") || http_method_is(m, "TRACE"))
		hops = http_max_forwards(m, &mf);  /* 0 never comes here (http_for_capd) */
	if (cfg->reverse)
		for (unsigned i = 0; i < m->nhdr; i++)
			if (http_hdr_is(&m->hdr[i], "x-forwarded-for") &&
			    !http_hop_by_hop(m, m->hdr[i].name, m->hdr[i].name_len))
				xff = (int)i;
	for (unsigned i = 0; i < m->nhdr; i++) {
		const struct http_hdr *h = &m->hdr[i];

		if (http_hop_by_hop(m, h->name, h->name_len) && !(m->conn_upgrade && http_hdr_is(h, "upgrade")))
			continue;
		if (t->authority && http_hdr_is(h, "host"))
			continue;
		if (cfg->reverse && (http_hdr_is(h, "x-forwarded-host") || http_hdr_is(h, "x-forwarded-proto")))
			continue;
		if (http_hdr_is(h, "content-length")) {
			http_put_length(b, h, &length);
			continue;
		}
		buf_append(b, h->name, h->name_len);
		buf_append(b, ": ", 2);
		if (h == mf && hops > 0)
			buf_printf(b, "%lld", (long long)(hops - 1));
		else
			buf_append(b, h->value, h->value_len);
		if ((int)i == xff)
			buf_printf(b, ", %s", ip);
		buf_append(b, "\r\n", 2);
	}
	if (cfg->reverse) {
		if (xff < 0)
			buf_printf(b, "X-Forwarded-For: %s\r\n", ip);
		if (t->authority || m->host >= 0) {
			buf_append(b, "X-Forwarded-Host: ", 18);
			if (t->authority)
				buf_append(b, t->authority, t->authority_len);
			else
				buf_append(b, m->hdr[m->host].value, m->hdr[m->host].value_len);
			buf_append(b, "\r\n", 2);
		}
		buf_append(b, s->client.tls ? "X-Forwarded-Proto: https\r\n" : "X-Forwarded-Proto: http\r\n",
		           s->client.tls ? 26 : 25);
	}
	if (m->conn_upgrade)
		buf_append(b, "Connection: Upgrade\r\n", 21);
	buf_printf(b, "Via: 1.%d capd\r\n\r\n", m->minor);
}

/* A response header's value as it goes on: each obs-fold in it (http_fold
 * in http-parse.c: the line end and the whitespace around it) as one SP, as
 * RFC 9112 5.2 says a proxy must (squid does). */
static void
http_put_value(struct buf *b, const struct http_msg *m, const struct http_hdr *h)
{
	const char *v = h->value, *end = v + h->value_len, *lf;

	if (!m->folded) {
		buf_append(b, v, h->value_len);
		return;
	}
	while ((lf = memchr(v, '\n', (size_t)(end - v))) != NULL) {
		const char *e = lf, *next = lf + 1;

		while (e > v && (e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
			e--;
		while (next < end && (*next == ' ' || *next == '\t'))
			next++;
		buf_append(b, v, (size_t)(e - v));
		buf_append(b, " ", 1);
		v = next;
	}
	buf_append(b, v, (size_t)(end - v));
}

/* The Connection line an answer to the client needs, none for an HTTP/1.1
 * client that keeps its connection: a 1.0 client needs keep-alive said, and
 * one that asked in Proxy-Connection gets that line too (Java reads it first). */
static void
http_conn_lines(struct buf *b, const struct http_conn *hc, int minor)
{
	const char *v = hc->client_keep ? "keep-alive" : "close";

	if (hc->client_keep && minor == 1 && !hc->client_pconn)
		return;
	buf_printf(b, "Connection: %s\r\n", v);
	if (hc->client_pconn)
		buf_printf(b, "Proxy-Connection: %s\r\n", v);
}

/* reverse: the Host (or absolute URL's authority) a request goes upstream
 * with, which a Location naming the upstream itself is rewritten to. */
static void
http_keep_authority(struct session *s, const struct http_msg *m, const struct http_target *t)
{
	struct http_conn *hc = s->proto_state;
	struct http_cfg *cfg = s->inst->cfg;
	const char *a = t->authority;
	size_t n = t->authority_len;
	struct http_target check;

	hc->authority[0] = '\0';
	if (!cfg->reverse)
		return;
	if (a == NULL && m->host >= 0) {
		a = m->hdr[m->host].value;
		n = m->hdr[m->host].value_len;
	}
	if (a && n < sizeof hc->authority && http_authority(a, n, &check) >= 0)
		snprintf(hc->authority, sizeof hc->authority, "%.*s", (int)n, a);
}

/* Whether a Location's host is the upstream's: an IP address in any of its
 * spellings ([0::1] is [::1]), as routes match it. */
static bool
http_same_host(const char *a, const char *b)
{
	struct sockaddr_storage x, y;
	socklen_t xl, yl;

	if (strcasecmp(a, b) == 0)
		return true;
	return addr_from_literal(a, 1, &x, &xl) == 0 && addr_from_literal(b, 1, &y, &yl) == 0 &&
	       addr_same((struct sockaddr *)&x, (struct sockaddr *)&y, false);
}

/* The length of the "scheme://host:port" a Location starts with when it
 * names the upstream as its route writes it (the upstream leg's scheme, the
 * port or the scheme's default; case, brackets and an IP address's spelling
 * do not count), else 0:
 * an origin that builds its redirects from its own address would send the
 * client around the proxy. nginx's "proxy_redirect default" does the same. */
static size_t
http_location_upstream(const struct session *s, const char *v, size_t n)
{
	const struct http_conn *hc = s->proto_state;
	const char *scheme = s->upstream.tls ? "https://" : "http://";
	size_t sl = strlen(scheme), end;
	struct http_target a;
	int port;

	if (n < sl || strncasecmp(v, scheme, sl) != 0)
		return 0;
	for (end = sl; end < n && v[end] != '/' && v[end] != '?' && v[end] != '#'; end++)
		;
	port = http_authority(v + sl, end - sl, &a);
	if (port < 0)
		return 0;
	if (port == 0)
		a.port = s->upstream.tls ? 443 : 80;
	return a.port == hc->port && http_same_host(a.host, hc->host) ? end : 0;
}

/* One header line of a response as it goes to the client. */
static void
http_put_header(const struct session *s, const struct http_msg *m, const struct http_hdr *h, struct buf *b)
{
	const struct http_conn *hc = s->proto_state;
	size_t skip = 0;

	buf_append(b, h->name, h->name_len);
	buf_append(b, ": ", 2);
	if (hc->authority[0] && http_hdr_is(h, "location"))
		skip = http_location_upstream(s, h->value, h->value_len);
	if (skip) {
		buf_printf(b, "%s://%s", s->client.tls ? "https" : "http", hc->authority);
		buf_append(b, h->value + skip, h->value_len - skip);
	} else {
		http_put_value(b, m, h);  /* an obs-fold joined with SP */
	}
	buf_append(b, "\r\n", 2);
}

/* The response head as it goes to the client. */
static void
http_rewrite_response(struct session *s, const struct http_msg *m, struct buf *b)
{
	struct http_conn *hc = s->proto_state;
	bool upgrade = m->status == 101, length = false;
	/* a 1xx or 204 has no content, and its sender must not frame any (RFC
	 * 9110 8.6, RFC 9112 6.1); capd reads none after it, so an origin's
	 * Content-Length or Transfer-Encoding there would have a client that
	 * trusts it read the next response as this one's body: as nginx does,
	 * they are dropped (the capture keeps them) */
	bool contentless = m->status < 200 || m->status == 204;

	buf_reset(b);
	buf_printf(b, "HTTP/1.1 %03d ", m->status);
	buf_append(b, m->reason, m->reason_len);
	buf_append(b, "\r\n", 2);
	for (unsigned i = 0; i < m->nhdr; i++) {
		const struct http_hdr *h = &m->hdr[i];

		if (http_hop_by_hop(m, h->name, h->name_len) && !(upgrade && http_hdr_is(h, "upgrade")))
			continue;
		if ((hc->dechunk || contentless) &&
		    (http_hdr_is(h, "transfer-encoding") || http_hdr_is(h, "content-length")))
			continue;
		/* dechunked, the trailers are dropped: so is the Trailer that
		 * announced them (RFC 9112 7.1.3) */
		if (hc->dechunk && http_hdr_is(h, "trailer"))
			continue;
		/* nor does a 1.0 client get one with a body-less answer (HEAD, 304):
		 * RFC 9112 6.1 allows Transfer-Encoding only toward HTTP/1.1 */
		if (hc->req_minor == 0 && http_hdr_is(h, "transfer-encoding"))
			continue;
		if (http_hdr_is(h, "content-length")) {
			http_put_length(b, h, &length);
			continue;
		}
		http_put_header(s, m, h, b);
	}
	if (upgrade)
		buf_append(b, "Connection: Upgrade\r\n", 21);
	else if (m->status >= 200)
		http_conn_lines(b, hc, hc->req_minor);
	buf_printf(b, "Via: 1.%d capd\r\n\r\n", m->minor);
}

/* ---- sessions ---- */

static void http_resp_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);

void
http_proxy_accepted(struct session *s)
{
	struct http_conn *hc = xcalloc(1, sizeof *hc);
	struct http_cfg *cfg = s->inst->cfg;

	s->proto_state = hc;
	ev_init(&hc->resp_timer, http_resp_timer_cb);
	hc->resp_timer.data = s;
	s->proto = "http";
	if (cfg->head_timeout > 0)
		session_set_deadline(s, cfg->head_timeout);
	if (http_moving != NULL) {
		hc->continued = true;  /* no HTTP/2 preface there */
		tls_client_move(http_moving, s);  /* its TLS, already up (nothing for a plain client) */
	} else if (cfg->reverse)
		tls_accept_start(s, cfg->tls);  /* nothing unless tls = yes|auto */
}

void
http_proxy_session_free(struct session *s)
{
	struct http_conn *hc = s->proto_state;

	if (hc == NULL)
		return;
	ev_timer_stop(capd_loop, &hc->resp_timer);
	buf_free(&hc->head);
	buf_free(&hc->retry);
	free(hc->fail);
	free(hc->upload_fail);
	free(hc);
}

/* How an upstream that takes no more requests ended, for the reason of a
 * session that closes before the client's next request. */
static const char *
http_gone_reason(const struct session *s)
{
	const struct http_conn *hc = s->proto_state;

	return hc->gone_why ? hc->gone_why : s->upstream_reset ? "upstream reset" : "closed";
}

/* The reason of a session the client ends between requests. */
static const char *
http_client_end_reason(struct session *s)
{
	const uint8_t *p;

	return relay_held(s, DIR_UP, &p) > 0 ? "client closed in a request head" : http_gone_reason(s);
}

/* The client socket, with bytes already read from it, goes on in a new
 * session; the old one closes with reason (NULL: it closed or reset),
 * saying where the client went (then: "request sent again", "client
 * continues"). A reply still queued for the client goes out first. A TLS
 * client's TLS goes along (tls_client_move): the new session is made here,
 * on this loop thread, which alone uses the SSL object. */
static void
http_handoff(struct session *s, const uint8_t *p, size_t n, const char *reason, const char *then)
{
	int fd = s->client.fd;
	struct session *ns;
	char why[160];

	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	s->client.fd = -1;
	http_moving = s;
	ns = session_new(s->inst, fd, (struct sockaddr *)&s->client_addr);
	http_moving = NULL;
	if (s->chain != NULL && ns->chain == NULL) {
		/* the same client connection: it came through the same instances (chain.h) */
		ns->chain = xmalloc(sizeof *ns->chain);
		*ns->chain = *s->chain;
	}
	if (buf_used(&s->hs_out) > 0)
		session_send(ns, buf_head(&s->hs_out), buf_used(&s->hs_out));
	if (n > 0)
		buf_append(&ns->hs_in, p, n);
	/* a FIN this session read stays read: the new one must not take the
	 * socket's EOF, which it would find at once, for a client that left
	 * after its request (relay_held_readable) */
	ns->client_eof = s->client_eof || s->dir[DIR_UP].eof;
	snprintf(why, sizeof why, "%s (%s in session %llu)", reason ? reason : http_gone_reason(s), then,
	         (unsigned long long)ns->id);
	http_close(s, why);
	if (n > 0 && ns->state == SESSION_HANDSHAKE)
		ns->inst->proto->input(ns);
	/* plaintext (or a close_notify) already inside the client's TLS wakes no
	 * watcher of the socket: read it now, as after the handshake */
	if (ns->state == SESSION_HANDSHAKE && ns->client.tls != NULL && ev_is_active(&ns->client.rio) &&
	    tls_side_pending(ns->client.tls))
		ev_feed_event(capd_loop, &ns->client.rio, EV_READ);
}

static void http_client_keep(struct session *s, const struct http_msg *m);

/*
 * A 407 that keeps the client connection, as squid does: the client sends
 * the request again with credentials on it (curl --proxy-anyauth, browsers,
 * Java). The connection goes on in a new session, with what came after the
 * request; this one closes with the 407 as its reason. Only when the
 * request's body came whole (or it has none) and the client keeps its
 * connection (HTTP/1.1, or 1.0 with keep-alive); false, with nothing done,
 * otherwise.
 */
static bool
http_refuse_keep(struct session *s, const char *why)
{
	struct http_conn *hc = s->proto_state;
	const struct http_msg *m = &http_msg;
	const uint8_t *rest = buf_head(&s->hs_in) + m->head_len;
	size_t n = buf_used(&s->hs_in) - m->head_len, used = 0;
	struct http_body body;
	struct buf b = { 0 }, lines = { 0 };
	char *reason;

	if (s->client_eof)
		return false;
	http_body_init(&body, m->framing, m->length);
	if (!http_body_done(&body) && http_body_scan(&body, rest, n, &used) != PARSE_OK)
		return false;
	http_client_keep(s, m);
	if (!hc->client_keep)
		return false;
	/* as http_rewrite_response says it: a 1.0 client needs keep-alive said */
	http_conn_lines(&lines, hc, m->minor);
	buf_append(&lines, "", 1);
	http_error_text(&b, 407, why, true, hc->req_head, (const char *)buf_head(&lines));
	buf_free(&lines);
	/* the capture has the request and its 407, and no close: the connection
	 * goes on, in the next session's capture */
	session_refused_heard(s, buf_head(&s->hs_in), m->head_len + used);
	session_refused_say(s, buf_head(&b), buf_used(&b));
	buf_free(&b);
	if (s->state == SESSION_CLOSED)
		return true;
	reason = http_reason(407, why);
	http_handoff(s, rest + used, n - used, reason, "client continues");
	free(reason);
	return true;
}

/*
 * A client that speaks HTTP/2 with prior knowledge (curl
 * --http2-prior-knowledge, a gRPC client given an http:// address) begins
 * with the HTTP/2 preface, which capd, an HTTP/1.1 proxy, does not relay. An
 * HTTP/1.1 505 is garbage to such a client (curl: "Empty reply from
 * server"); it is told in its own protocol instead: the server preface (a
 * SETTINGS frame), then GOAWAY with no stream processed and
 * HTTP_1_1_REQUIRED (RFC 9113 3.4, 6.8, 7), whose debug data says why.
 * Like any refusal before an upstream, it gets a note, and the capture has
 * the preface and the frames (http_reply_early).
 */
static void
http_refuse_h2(struct session *s)
{
	static const char debug[] = "capd proxies HTTP/1.1 only";
	static const uint8_t frames[] = {
		0, 0, 0, 0x4, 0, 0, 0, 0, 0,                    /* SETTINGS: none changed */
		0, 0, 8 + sizeof debug - 1, 0x7, 0, 0, 0, 0, 0, /* GOAWAY on stream 0 */
		0, 0, 0, 0,                                     /* last stream id: none processed */
		0, 0, 0, 0xd,                                   /* HTTP_1_1_REQUIRED */
	};
	struct http_cfg *cfg = s->inst->cfg;
	struct buf b = { 0 };

	/* its request line, PRI *, is the note, as for the 505 it got before */
	(void)http_parse_request(buf_head(&s->hs_in), buf_used(&s->hs_in), &cfg->lim, &http_msg);
	http_note_refused(s, &http_msg);
	buf_append(&b, frames, sizeof frames);
	buf_append(&b, debug, sizeof debug - 1);
	http_reply_early(s, &b, "client spoke HTTP/2 with prior knowledge, which capd does not proxy: "
	                        "answered GOAWAY HTTP_1_1_REQUIRED");
	buf_free(&b);
}

void
http_proxy_input(struct session *s)
{
	struct http_conn *hc = s->proto_state;
	struct http_target t;
	const char *why = NULL;
	int status = 0;
	enum parse rv;

	if (buf_used(&s->hs_in) == 0 && s->client_eof) {
		session_close(s, "closed");
		return;
	}
	if (!hc->continued && (rv = http_h2_preface(buf_head(&s->hs_in), buf_used(&s->hs_in))) != PARSE_ERR) {
		/* the first bytes of the connection are (so far) HTTP/2's */
		if (rv == PARSE_OK)
			http_refuse_h2(s);
		else if (s->client_eof)
			session_close(s, "client closed in a request head");
		return;
	}
	rv = http_route_request(s, buf_head(&s->hs_in), buf_used(&s->hs_in), &t, &status, &why);
	if (rv == PARSE_MORE) {
		if (s->client_eof)
			session_close(s, "client closed in a request head");
		return;
	}
	hc->req_head = http_method_is(&http_msg, "HEAD");  /* also for a refusal, or a failed connect */
	if (rv == PARSE_ERR) {
		http_note_refused(s, &http_msg);
		if (status == 407 && http_refuse_keep(s, why))
			return;
		http_fail_early(s, status, why);
		return;
	}
	if (http_for_capd(&http_msg)) {
		struct buf b = { 0 };
		char *reason;

		http_note_refused(s, &http_msg);
		http_answer(s, &http_msg, buf_head(&s->hs_in), &b, &reason);
		http_reply_early(s, &b, reason);
		buf_free(&b);
		free(reason);
		return;
	}
	/* nothing more is read until the upstream is up: the relay takes over */
	ev_io_stop(capd_loop, &s->client.rio);
	http_note(s, &http_msg, &t);
	snprintf(hc->host, sizeof hc->host, "%s", t.host);
	hc->port = t.port;
	hc->connect = t.connect;
	if (t.connect) {
		s->proto = "connect";
		hc->connect_head = http_msg.head_len;
	}
	/* the request head came in time: the connect runs on its own clock
	 * (connect_timeout, where 0 sets none), not on what is left of the
	 * head's 60 seconds, which would end it with a 504 regardless */
	session_set_deadline(s, 0);
	session_connect(s, t.host, t.port);
}

void
http_proxy_hs_ended(struct session *s)
{
	struct http_conn *hc = s->proto_state;

	/* nothing read (a kept connection closed between requests, a connection
	 * opened and left unused) is nothing to see, and not worth a flow; a
	 * CONNECT answered 200 is a tunnel whose interception failed, whose
	 * early bytes are no request of the client's; nor is what a TLS client
	 * sends before its TLS is up (tls_peek keeps it in hs_in) */
	if (hc == NULL || (hc->connect && s->hs_replied) || (s->tls != NULL && s->client.tls == NULL) ||
	    buf_used(&s->hs_in) == 0)
		return;
	session_refused_heard(s, buf_head(&s->hs_in), buf_used(&s->hs_in));
}

void
http_proxy_connected(struct session *s, int err)
{
	struct http_conn *hc = s->proto_state;
	static const char established[] = "HTTP/1.1 200 Connection Established\r\n\r\n";

	if (err != 0) {
		const char *why = s->why_connect ? s->why_connect : strerror(err);
		http_fail_early(s, err == ETIMEDOUT ? 504 : 502, why);
		return;
	}
	if (hc->connect) {
		buf_consume(&s->hs_in, hc->connect_head);
		session_send(s, established, sizeof established - 1);
		if (s->state == SESSION_CLOSED)
			return;
		/* the first request inside an intercepted tunnel goes in the note */
		tls_intercept_start(s, ((struct http_cfg *)s->inst->cfg)->tls, http_note_inner);  /* relay_start unless tls */
		return;
	}
	hc->up = UP_HEAD;
	hc->down = DOWN_IDLE;
	s->filter = &http_filter;
	tls_relay_start(s);  /* relay_start unless the client speaks TLS */
}

/* Whether the upstream holds back part of the request body: capd or the
 * kernel still has bytes for it (it stopped reading, not the client sending). */
static bool
http_upload_waits(struct session *s)
{
	return session_held(s, DIR_UP) > 0 || session_outq(&s->upstream) > 0;
}

/* idle_timeout while a request waits for its response head: a 504, not a
 * silent close; a 408 when it is the client's body that stopped coming (the
 * upstream waits for it), unless the client waits for a 100 Continue or the
 * upstream is the one that stopped taking the body */
bool
http_proxy_idle(struct session *s)
{
	struct http_conn *hc = s->proto_state;
	char why[96];

	if (hc == NULL || s->filter == NULL || hc->down != DOWN_HEAD || hc->fail)
		return false;
	if (hc->up == UP_BODY && !hc->req_expect && http_upload_waits(s)) {
		snprintf(why, sizeof why, "the upstream took no more of the request body within idle_timeout (%gs)",
		         s->inst->idle_timeout);
		http_fail_late(s, 504, why);
		return true;
	}
	if (hc->up == UP_BODY && !hc->req_expect) {
		snprintf(why, sizeof why, "the client sent no more of the request body within idle_timeout (%gs)",
		         s->inst->idle_timeout);
		http_fail_late(s, 408, why);
		return true;
	}
	snprintf(why, sizeof why, "no response from the upstream within idle_timeout (%gs)", s->inst->idle_timeout);
	http_fail_late(s, 504, why);
	return true;
}

/*
 * response_timeout, as nginx's proxy_read_timeout: while a response is
 * awaited or read, the upstream must send something within this long of
 * its last bytes or of the request's end. The clock runs once the request
 * has come whole (or its client waits for a 100 Continue), or while the
 * upstream takes none of its body, and stops while capd holds bytes the
 * client has not taken: a slow client is the client's business
 * (idle_timeout). CONNECT and Upgrade tunnels, and a connection between
 * requests, are never timed.
 */
static bool
http_awaits_upstream(const struct session *s)
{
	const struct http_conn *hc = s->proto_state;

	if (hc == NULL || s->state != SESSION_OPEN || s->filter == NULL || hc->fail != NULL)
		return false;
	return hc->down == DOWN_HEAD || (hc->down == DOWN_BODY && !hc->resp_done);
}

/* The request went or ended: the clock starts (again) now. One timer
 * start per request at most; the filter's reads only stamp resp_at. */
static void
http_resp_clock(struct session *s)
{
	struct http_conn *hc = s->proto_state;
	double t = ((const struct http_cfg *)s->inst->cfg)->resp_timeout;

	if (t <= 0)
		return;
	hc->resp_at = capd_now();
	if (!ev_is_active(&hc->resp_timer)) {
		ev_timer_set(&hc->resp_timer, t, 0.);
		ev_timer_start(capd_loop, &hc->resp_timer);
	}
}

/* The upstream let response_timeout (t) pass: before any of the response
 * head went out, a 504 naming it; after, no reply fits, and the client's
 * connection ends as after a bad body (nginx does the same). */
static void
http_resp_timeout(struct session *s, double t)
{
	struct http_conn *hc = s->proto_state;
	char up[HOST_MAX + 8], why[HOST_MAX + 96];
	const uint8_t *p;
	size_t n;

	hostport_format(hc->host, hc->port, up, sizeof up);
	if (hc->down == DOWN_HEAD) {
		if ((n = relay_held(s, DIR_DOWN, &p)) > 0)
			session_data(s, DIR_DOWN, p, n);  /* a partial head is still worth having */
		if (http_upload_waits(s))
			snprintf(why, sizeof why, "%s took no more of the request body within response_timeout (%gs)",
			         up, t);
		else
			snprintf(why, sizeof why, "no response from %s within response_timeout (%gs)", up, t);
		http_fail_late(s, 504, why);
		return;
	}
	snprintf(why, sizeof why, "%s sent no more of the response within response_timeout (%gs)", up, t);
	if (hc->dechunk || hc->down_body.framing == HTTP_BODY_CLOSE) {
		/* the body ends at the close: a FIN would pass a cut response
		 * off as whole, a reset is the one sign the client can read */
		session_reset(s, why);
		return;
	}
	http_end_late(s, why);  /* the client reads a short Content-Length or chunked body */
}

/* Whether the upstream took request bytes since the last check: a slow
 * reader of an upload is not a silent one (nginx's proxy_send_timeout
 * counts the same way). The first check of a request finds it moved: one
 * more period before the upstream is blamed, and no syscall per request. */
static bool
http_upload_moved(struct session *s)
{
	struct http_conn *hc = s->proto_state;
	uint64_t taken = s->bytes[DIR_UP] - session_held(s, DIR_UP) - session_outq(&s->upstream);

	if (taken == hc->up_taken)
		return false;
	hc->up_taken = taken;
	return true;
}

/* Whether the time that passed is not the upstream's to answer for: the
 * client's turn (its body still comes, and the upstream takes what there
 * is), an upload the upstream still takes, bytes the client has yet to
 * take, or the upstream's bytes unread while capd was held up (the loop's
 * clock stood still). Asked only when the time is up, never per byte. */
static bool
http_resp_excused(struct session *s, struct ev_loop *loop)
{
	struct http_conn *hc = s->proto_state;
	bool waits = http_upload_waits(s);

	if (waits && http_upload_moved(s))
		return true;
	if (!waits && !hc->req_done && !(hc->req_expect && hc->down == DOWN_HEAD))
		return true;
	return session_held(s, DIR_DOWN) > 0 || session_peer_moved(s, loop);
}

static void
http_resp_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;
	struct http_conn *hc = s->proto_state;
	double t, now = ev_now(loop);

	(void)revents;
	if (!http_awaits_upstream(s) || (t = ((const struct http_cfg *)s->inst->cfg)->resp_timeout) <= 0)
		return;  /* the next request arms it again */
	if (now - hc->resp_at >= t && http_resp_excused(s, loop))
		hc->resp_at = now;
	if (now - hc->resp_at < t) {
		ev_timer_set(w, hc->resp_at + t - now, 0.);
		ev_timer_start(loop, w);
		return;
	}
	http_resp_timeout(s, t);
}

/* ---- the filter ---- */

/* Whether a request may be sent twice (RFC 9110 9.2.2): nginx resends
 * only these on a new connection after the one it reused failed. */
static bool
http_idempotent(const struct http_msg *m)
{
	static const char *const methods[] = { "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE" };

	for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
		if (http_method_is(m, methods[i]))
			return true;
	return false;
}

/* The upstream closed or reset (why) after the request went, before any
 * byte of its answer: on a reused connection, the keep-alive race (its
 * idle timeout fired as the request came). As nginx does, a request that
 * may go twice, none of whose body went up, goes once more in a new
 * session on a new connection, with what the client sent after it; the
 * capture shows both attempts (reset: the upstream's end was a reset); a
 * TLS client connection moves with its TLS (tls_client_move). true when
 * it went (this session is closed); false when it may not (the caller
 * answers 502). */
static bool
http_retry(struct session *s, const char *why, bool reset)
{
	struct http_conn *hc = s->proto_state;
	const uint8_t *p;
	size_t n;

	if (!hc->can_retry || hc->fail != NULL)
		return false;
	n = relay_held(s, DIR_UP, &p);
	if (buf_used(&hc->retry) + n > HTTP_PROXY_HS_MAX)
		return false;
	if (reset)
		s->upstream_reset = true;  /* the capture's flow ends with the RST */
	buf_append(&hc->retry, p, n);
	http_handoff(s, buf_head(&hc->retry), buf_used(&hc->retry), why, "request sent again");
	return true;
}

/* Both halves of an exchange are done: the next request may come. */
static enum relay_verdict
http_next(struct session *s)
{
	struct http_conn *hc = s->proto_state;
	const uint8_t *p;

	/* a client that sent its FIN right after pipelined requests (in the same
	 * read, so the FIN was seen first) still gets every answer: the session
	 * ends once nothing it sent waits */
	if (!hc->client_keep || (s->dir[DIR_UP].eof && relay_held(s, DIR_UP, &p) == 0)) {
		session_close(s, "closed");
		return RELAY_STOP;
	}
	hc->exchanges++;
	hc->up = UP_HEAD;
	hc->down = DOWN_IDLE;
	hc->req_done = hc->resp_done = false;
	if (!hc->upstream_keep)
		hc->upstream_gone = true;
	/* held, or still ENDING: an origin that answered before it read all of
	 * the body (nginx's `return`, a 401) leaves its last bytes waiting to go
	 * up, and the done that comes once they are out finds this exchange
	 * over; a direction left ENDING then never read the client again */
	if (s->dir[DIR_UP].msg != RELAY_MSG_FLOW)
		relay_resume(s, DIR_UP);
	/* a kept upstream is read while idle, so its close is seen; one that is
	 * gone stays held and the session lasts until the client's next move */
	if (s->dir[DIR_DOWN].msg == RELAY_MSG_HELD && !hc->upstream_gone)
		relay_resume(s, DIR_DOWN);
	return RELAY_PASS;
}

/* Whether the client wants its connection kept after this exchange: an
 * HTTP/1.1 one unless it says close, an HTTP/1.0 one only if it says
 * keep-alive (RFC 9112 9.3, RFC 7230 A.1.2). A client of a forward proxy
 * may say so in Proxy-Connection alone (curl --http1.0), which is not standard
 * but which squid and tinyproxy honour: without a Connection line, capd
 * takes its close or keep-alive, and its answer says Proxy-Connection too.
 * Neither line goes upstream (http_hop_by_hop); the response may still end
 * the connection (http_down_head). */
static void
http_client_keep(struct session *s, const struct http_msg *m)
{
	struct http_conn *hc = s->proto_state;
	const struct http_cfg *cfg = s->inst->cfg;
	bool close = m->conn_close, keepalive = m->conn_keepalive;

	hc->client_pconn = !cfg->reverse && !m->conn_line && (m->pconn_close || m->pconn_keepalive);
	if (hc->client_pconn) {
		close = m->pconn_close;
		keepalive = m->pconn_keepalive;
	}
	hc->client_keep = m->minor == 1 ? !close : keepalive && !close;
}

static enum relay_verdict
http_up_head(struct session *s, const uint8_t *p, size_t n, size_t *used)
{
	struct http_conn *hc = s->proto_state;
	struct http_msg *m = &http_msg;
	struct http_target t;
	const char *why = NULL;
	int status = 0, closed;
	enum parse rv = http_route_request(s, p, n, &t, &status, &why);

	if (rv == PARSE_MORE)
		return RELAY_MORE;
	hc->req_head = http_method_is(m, "HEAD");  /* the previous exchange is done: this one's refusal */
	if (rv == PARSE_ERR && status == 407) {
		/* a new session answers it as a first request, keeping the connection (http_refuse_keep) */
		http_handoff(s, p, n, NULL, "client continues");
		return RELAY_STOP;
	}
	if (rv == PARSE_ERR) {
		http_error_late(s, p, n, status, why);
		return RELAY_END;
	}
	if (http_for_capd(m)) {
		struct buf b = { 0 };
		char *reason;

		/* no upstream needed, this one or another: the answer ends the connection here */
		http_answer(s, m, p, &b, &reason);
		http_refuse_late(s, p, n, &b, reason);
		buf_free(&b);
		free(reason);
		return RELAY_END;
	}
	/* an upstream that closed after a whole response without saying so takes
	 * no more requests, though its FIN may be unread yet (it came with the
	 * response, or this request was judged first): as nginx does, the
	 * request goes to a new connection rather than to the closed one (502) */
	if (!hc->upstream_gone && hc->upstream_keep && (closed = relay_src_closed(s, DIR_DOWN)) != 0) {
		hc->upstream_gone = true;
		if (closed < 0)
			s->upstream_reset = true;
	}
	if (t.connect || hc->upstream_gone || t.port != hc->port || strcasecmp(t.host, hc->host) != 0) {
		http_handoff(s, p, n, NULL, "client continues");
		return RELAY_STOP;
	}
	http_note(s, m, &t);
	http_rewrite_request(s, m, &t, &hc->head);
	http_keep_authority(s, m, &t);
	session_data(s, DIR_UP, buf_head(&hc->head), buf_used(&hc->head));
	relay_inject(s, DIR_UP, buf_head(&hc->head), buf_used(&hc->head));
	http_body_init(&hc->up_body, m->framing, m->length);
	hc->req_upgrade = m->conn_upgrade;
	hc->req_expect = m->expect_continue && m->minor == 1;
	hc->req_minor = m->minor;
	http_client_keep(s, m);
	hc->req_done = http_body_done(&hc->up_body);
	hc->resp_done = false;
	hc->up = hc->req_done ? UP_WAIT : UP_BODY;
	hc->down = DOWN_HEAD;
	http_resp_clock(s);
	/* a kept connection the origin closes as this request arrives (its
	 * idle timeout) is the keep-alive race: the request may go again, once
	 * (http_retry), so its head is kept until its answer or body starts */
	hc->can_retry = hc->exchanges > 0 && http_idempotent(m);
	buf_reset(&hc->retry);
	if (hc->can_retry)
		buf_append(&hc->retry, p, m->head_len);
	/* a request without a body ends with its head: hold the client now, as
	 * http_body does at a body's end, instead of reading it for a next request
	 * that has to wait for this response anyway */
	if (hc->req_done)
		relay_hold(s, DIR_UP);
	*used = m->head_len;
	return RELAY_EAT;
}

/* The response ends with the bytes of this verdict. Before the request
 * did, the upstream will not read the rest of it (it may have closed
 * already): the client connection ends with this response (http_filter_done
 * finishes the down direction once it is out). */
static void
http_resp_end(struct session *s)
{
	struct http_conn *hc = s->proto_state;

	hc->resp_done = true;
	if (!hc->req_done)
		hc->client_keep = false;
	relay_hold(s, DIR_DOWN);
}

static enum relay_verdict
http_down_head(struct session *s, const uint8_t *p, size_t n, size_t *used)
{
	struct http_conn *hc = s->proto_state;
	struct http_cfg *cfg = s->inst->cfg;
	struct http_msg *m = &http_msg;
	enum parse rv = http_parse_response(p, n, &cfg->lim, hc->req_head, m);

	if (rv == PARSE_MORE)
		return RELAY_MORE;
	if (rv == PARSE_ERR) {
		const char *why = m->why;

		/* a 431 is the parser's answer for a request: say which limit the response broke */
		if (m->status == 431)
			why = m->nhdr >= cfg->lim.max_headers ? "too many header fields in the response"
			                                      : "response head too large";
		session_data(s, DIR_DOWN, p, n);  /* what the origin sent is still worth having */
		http_fail_late(s, 502, why);
		return RELAY_END;
	}
	session_data(s, DIR_DOWN, p, m->head_len);
	*used = m->head_len;
	if (m->status < 200 && m->status != 101) {
		hc->req_expect = false;
		/* 100 Continue and friends: the final response follows (1.0 clients never see them) */
		if (hc->req_minor > 0) {
			http_rewrite_response(s, m, &hc->head);
			relay_inject(s, DIR_DOWN, buf_head(&hc->head), buf_used(&hc->head));
		}
		return RELAY_EAT;
	}
	if (m->status == 101) {
		if (!hc->req_upgrade) {
			http_fail_late(s, 502, "101 Switching Protocols without an Upgrade request");
			return RELAY_END;
		}
		http_rewrite_response(s, m, &hc->head);
		relay_inject(s, DIR_DOWN, buf_head(&hc->head), buf_used(&hc->head));
		hc->up = UP_TUNNEL;
		hc->down = DOWN_TUNNEL;
		/* still ENDING too: the end of a request body may wait to go up (as
		 * in http_next), and no done would resume the tunnel after it */
		if (s->dir[DIR_UP].msg != RELAY_MSG_FLOW)
			relay_resume(s, DIR_UP);
		return RELAY_EAT;
	}
	/* chunked to a 1.0 request (RFC 9112 6.1 forbids it; origins do it): a
	 * 1.0 client cannot decode it, so as nginx does the body goes out
	 * dechunked and the connection's close ends it */
	hc->dechunk = m->framing == HTTP_BODY_CHUNKED && hc->req_minor == 0;
	if (m->framing == HTTP_BODY_CLOSE || hc->dechunk)
		hc->client_keep = false;
	hc->upstream_keep = m->framing != HTTP_BODY_CLOSE && !m->conn_close &&
	                    (m->minor == 1 || m->conn_keepalive) && hc->req_minor == 1;
	http_body_init(&hc->down_body, m->framing, m->length);
	hc->down_body.lf_ends = true;  /* the framing passes as it came: the client takes what curl does */
	/* a response that starts before the whole request came (413, 401 to an
	 * upload) ends the connection if it ends first (http_resp_end), which
	 * its head cannot wait to know: it says so whenever it may happen */
	if (!hc->req_done)
		hc->client_keep = false;
	http_rewrite_response(s, m, &hc->head);
	relay_inject(s, DIR_DOWN, buf_head(&hc->head), buf_used(&hc->head));
	if (http_body_done(&hc->down_body))
		http_resp_end(s);
	else
		hc->down = DOWN_BODY;
	return RELAY_EAT;
}

/* The response body of a dechunk exchange: each chunk's data passes, its
 * framing (sizes, extensions, CRLFs, the last chunk, trailers) is eaten,
 * captured as received, so the capture still shows what the origin sent. */
static enum relay_verdict
http_body_dechunk(struct session *s, const uint8_t *p, size_t n, size_t *used)
{
	struct http_conn *hc = s->proto_state;
	struct http_body *b = &hc->down_body;
	enum parse rv = PARSE_MORE;
	size_t k = 0, u;

	if (http_body_in_data(b)) {
		size_t take = b->left < n ? (size_t)b->left : n;

		(void)http_body_scan(b, p, take, &u);  /* data only: PARSE_MORE, all taken */
		*used = take;
		return RELAY_PASS;
	}
	while (k < n && rv == PARSE_MORE && !http_body_in_data(b)) {
		rv = http_body_scan(b, p + k, 1, &u);
		k += u;
	}
	if (rv == PARSE_ERR) {
		session_data(s, DIR_DOWN, p, n);
		http_end_late(s, "upstream sent bad chunked framing");
		return RELAY_END;
	}
	session_data(s, DIR_DOWN, p, k);
	*used = k;
	if (rv == PARSE_OK)
		http_resp_end(s);
	return RELAY_EAT;
}

/* A body in direction d: pass it, and end the message with its last byte. */
static enum relay_verdict
http_body(struct session *s, enum dir d, const uint8_t *p, size_t n, size_t *used)
{
	struct http_conn *hc = s->proto_state;
	struct http_body *b = d == DIR_UP ? &hc->up_body : &hc->down_body;

	if (d == DIR_DOWN && hc->dechunk)
		return http_body_dechunk(s, p, n, used);

	enum parse rv = http_body_scan(b, p, n, used);

	if (d == DIR_UP)
		hc->req_expect = false;  /* the body comes: a stall now is the client's */
	if (rv == PARSE_MORE)
		return RELAY_PASS;
	if (rv == PARSE_ERR) {
		session_data(s, d, p, n);  /* what does not parse is captured all the same */
		if (d == DIR_DOWN || hc->down == DOWN_BODY) {
			/* part of a response is out: no room for an error reply */
			http_end_late(s, d == DIR_DOWN ? "upstream sent bad chunked framing" : "client sent bad chunked framing");
			return RELAY_END;
		}
		http_fail_late(s, 400, "bad chunked framing");
		return RELAY_END;
	}
	if (d == DIR_UP) {
		hc->req_done = true;
		hc->up = UP_WAIT;
		relay_hold(s, d);
		http_resp_clock(s);  /* the response is the upstream's turn from now */
	} else {
		http_resp_end(s);
	}
	return *used > 0 ? RELAY_PASS : RELAY_END;
}

static enum relay_verdict
http_filter_data(struct session *s, enum dir d, const uint8_t *p, size_t n, size_t *used)
{
	struct http_conn *hc = s->proto_state;

	if (d == DIR_DOWN || hc->up == UP_BODY)
		hc->can_retry = false;  /* the answer or the body started: the request cannot go again */
	if (d == DIR_DOWN)
		hc->resp_at = capd_now();  /* response_timeout: a stamp, the timer checks it (http_resp_timer_cb) */
	if (d == DIR_UP) {
		switch (hc->up) {
		case UP_HEAD: return http_up_head(s, p, n, used);
		case UP_BODY: return http_body(s, d, p, n, used);
		case UP_TUNNEL: *used = n; return RELAY_PASS;
		default: return RELAY_END;  /* the next request waits for this response */
		}
	}
	switch (hc->down) {
	case DOWN_HEAD: return http_down_head(s, p, n, used);
	case DOWN_BODY: return http_body(s, d, p, n, used);
	case DOWN_TUNNEL: *used = n; return RELAY_PASS;
	default:
		session_data(s, DIR_DOWN, p, n);  /* captured, never sent */
		if (hc->client_keep && !hc->upstream_gone) {
			/* an upstream that speaks out of turn is not asked again: as
			 * after its FIN, the client's next request moves on to a new
			 * session; its bytes stay unread, this session ends then */
			log_info("session %llu: upstream sent %zu byte%s with no request outstanding: not reused",
			         (unsigned long long)s->id, n, n == 1 ? "" : "s");
			hc->upstream_gone = true;
			hc->gone_why = "upstream sent bytes with no request outstanding";
			return RELAY_END;
		}
		session_close(s, "upstream sent bytes with no request outstanding");
		return RELAY_STOP;
	}
}

static void
http_filter_done(struct session *s, enum dir d)
{
	struct http_conn *hc = s->proto_state;

	if (s->dir[d].shut) {
		/* a FIN went to the client: nothing more can be said on this connection;
		 * after a failure the client may still be sending what we refused */
		if (d == DIR_DOWN && hc->down != DOWN_TUNNEL) {
			if (hc->fail && s->client.fd >= 0)
				session_linger_client(s);
			session_close(s, hc->fail ? hc->fail : "closed");
		}
		/* the client's FIN went upstream: with no request outstanding (it came
		 * in one read with pipelined requests, and http_next went on to a
		 * partial head), or while a complete response is held (the upstream's
		 * FIN stays unread: nothing else would end the session) */
		else if (d == DIR_UP && hc->up == UP_HEAD && hc->down == DOWN_IDLE)
			http_close(s, http_client_end_reason(s));
		else if (d == DIR_UP && hc->resp_done && s->dir[DIR_DOWN].msg == RELAY_MSG_HELD)
			session_close(s, hc->fail ? hc->fail : "closed");
		return;
	}
	if (d == DIR_DOWN && hc->resp_done && !hc->req_done) {
		/* the whole response went out before the whole request came (http_resp_end) */
		http_end_late(s, "upstream answered before the request ended");
	} else if (d == DIR_DOWN && hc->resp_done && hc->req_done)
		http_next(s);
	else if (d == DIR_UP && hc->resp_done && hc->req_done && s->dir[DIR_DOWN].msg == RELAY_MSG_HELD)
		http_next(s);
}

static enum relay_verdict
http_filter_eof(struct session *s, enum dir d)
{
	struct http_conn *hc = s->proto_state;
	const uint8_t *p;
	size_t n;

	if (d == DIR_UP) {
		if (hc->up == UP_HEAD && hc->down == DOWN_IDLE) {
			http_close(s, http_client_end_reason(s));
			return RELAY_STOP;
		}
		return RELAY_PASS;
	}
	switch (hc->down) {
	case DOWN_IDLE:
		if (hc->fail)
			return RELAY_PASS;
		/* the origin closed an idle connection: the client's stays, its next
		 * request moves on to a new session (its FIN is kept from the client) */
		if (hc->client_keep) {
			hc->upstream_gone = true;
			return RELAY_END;
		}
		session_close(s, "closed");
		return RELAY_STOP;
	case DOWN_HEAD:
		if ((n = relay_held(s, d, &p)) > 0)
			session_data(s, DIR_DOWN, p, n);  /* the partial head is still worth having */
		if (n == 0 && http_retry(s, hc->upload_fail ? hc->upload_fail : "upstream closed without a response",
		                         hc->upload_fail != NULL))
			return RELAY_STOP;
		if (n == 0 && hc->upload_fail) {  /* the failed send said more than this EOF does */
			s->upstream_reset = true;
			http_fail_late(s, 502, hc->upload_fail);
			return RELAY_PASS;
		}
		http_fail_late(s, 502, n > 0 ? "upstream closed in the response head" : "upstream closed without a response");
		return RELAY_PASS;
	case DOWN_BODY:
		if (hc->dechunk) {
			/* the 1.0 client's body ends at our close, so a FIN would pass a
			 * cut response off as whole (nginx's proxy_pass, HTTP/1.0 by
			 * default, would keep it): a reset is the one sign it can read */
			session_reset(s, "upstream closed in the response body");
			return RELAY_STOP;
		}
		if (hc->down_body.framing != HTTP_BODY_CLOSE && hc->fail == NULL)
			hc->fail = xstrdup("upstream closed in the response body");
		return RELAY_PASS;
	default:
		return RELAY_PASS;
	}
}

/* The upstream reset (or failed) while its response head was awaited: the
 * client gets a 502 saying so, as from nginx, instead of a reset of its own.
 * While no request was outstanding it is dropped as after its FIN. Once any
 * of the response went out, the reset is passed on as before. */
static enum relay_upfail
http_filter_upstream_failed(struct session *s, const char *why, bool sending)
{
	struct http_conn *hc = s->proto_state;
	const uint8_t *p;
	size_t n;

	if (hc->down == DOWN_IDLE && !sending && hc->fail == NULL) {
		/* an origin drops an idle kept connection with a reset as well as
		 * with a FIN (keepalive_timeout, load balancers): as for its FIN
		 * (http_filter_eof), the client's next request moves on */
		s->upstream_reset = true;  /* an idle_timeout (or any) close later still shows it */
		if (hc->client_keep)
			hc->upstream_gone = true;
		else
			session_close(s, why);
		return RELAY_UPFAIL_GONE;
	}
	if (hc->down != DOWN_HEAD || hc->fail)
		return RELAY_UPFAIL_RESET;
	if (http_retry(s, why, true))
		return RELAY_UPFAIL_GONE;  /* closed */
	/* a server that refuses a body early (413, 401) answers and closes with the
	 * rest unread: its answer waits to be read, as a direct client would */
	if (sending) {
		if (hc->upload_fail == NULL)
			hc->upload_fail = xstrdup(why);  /* the reason should nothing come */
		return RELAY_UPFAIL_READ_ON;
	}
	if ((n = relay_held(s, DIR_DOWN, &p)) > 0)
		session_data(s, DIR_DOWN, p, n);  /* a partial head is still worth having */
	s->upstream_reset = true;
	http_fail_late(s, 502, why);
	return RELAY_UPFAIL_ANSWERED;
}

/* The client closed (closed: 1 FIN, -1 reset) while the relay held it.
 * While its request is in progress (its response head awaited, or its body
 * still coming from the upstream), as nginx (499, with
 * proxy_ignore_client_abort off) and mitmproxy ("Client disconnected") do,
 * a FIN means it left: the session ends, the upstream with it, instead of
 * waiting for an answer nobody reads (forever with idle_timeout 0). Once
 * the whole response is in, what is left goes out and the FIN is read after
 * it, as before. A reset ends the session in any state. */
static bool
http_filter_held_closed(struct session *s, int closed)
{
	struct http_conn *hc = s->proto_state;
	bool head = hc->down == DOWN_HEAD, body = hc->down == DOWN_BODY && !hc->resp_done;
	bool waiting = hc->up == UP_WAIT && (head || body) && hc->fail == NULL;

	if (closed < 0) {
		session_reset_by_client(s, !waiting ? "client reset" : head ? "client reset before the answer"
		                                                           : "client reset during the answer");
		return true;
	}
	if (!waiting)
		return false;
	session_shutdown_dir(s, DIR_UP);  /* the capture shows the client's FIN first */
	http_close(s, head ? "client closed before the answer" : "client closed during the answer");
	return true;
}

static const struct relay_filter http_filter = {
	.data = http_filter_data,
	.done = http_filter_done,
	.eof = http_filter_eof,
	.upstream_failed = http_filter_upstream_failed,
	.held_closed = http_filter_held_closed,
};

/*
 * http: the forward HTTP proxy. Absolute-form requests (`GET http://h/p`)
 * go to their origin in origin form (http-proxy.c does the rest); CONNECT
 * host:port opens a tunnel to the ports in `connect_ports`; optional Basic
 * proxy auth against `users` / `auth`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base64.h"
#include "http-proxy.h"
#include "log.h"
#include "session.h"
#include "tls.h"
#include "users.h"
#include "values.h"
#include "xmalloc.h"

static const char *const http_keys[] = {
	"connect_ports", "users", "auth", "max_header_size", "header_timeout", "response_timeout",
	"tls", "tls_verify", "tls_capture", "tls_passthrough", "tls_auto_passthrough", "tls_timeout",
	"tls_client_cert", NULL,
};

/* Checks Proxy-Authorization: Basic against the users; the name into user on success. */
static bool
http_fwd_auth(const struct http_cfg *cfg, const struct http_msg *m, char *user, size_t usize)
{
	const struct http_hdr *h = http_header(m, "proxy-authorization");
	uint8_t dec[3 * USERS_FIELD_MAX];
	char cred[3 * USERS_FIELD_MAX + 1], *colon;
	size_t i = 0, len;
	long n;

	if (h == NULL || h->value_len < 6 || !http_token_eq(h->value, 5, "basic") || h->value[5] != ' ')
		return false;
	for (i = 6; i < h->value_len && h->value[i] == ' '; i++)
		;
	len = h->value_len - i;
	if (len == 0 || len / 4 * 3 > sizeof dec)
		return false;
	if ((n = base64_decode(dec, h->value + i, len)) < 0)
		return false;
	memcpy(cred, dec, (size_t)n);
	cred[n] = '\0';
	if (strlen(cred) != (size_t)n || (colon = strchr(cred, ':')) == NULL)
		return false;
	*colon = '\0';
	if (!users_check(cfg->users, cred, colon + 1))
		return false;
	snprintf(user, usize, "%s", cred);
	return true;
}

static bool
http_fwd_port_ok(const struct http_cfg *cfg, uint16_t port)
{
	if (cfg->connect_any)
		return true;
	for (unsigned i = 0; i < cfg->nconnect_ports; i++)
		if (cfg->connect_ports[i] == port)
			return true;
	return false;
}

/* Why the authority a (a CONNECT's, or an http URL's) did not parse, when
 * a plainer reason than why fits: a URL's user:password@ (RFC 9110 4.2.4:
 * a recipient should treat it as an error, it hides the host from a
 * reader; clients put credentials in Authorization, as curl does with such
 * a URL), or an IPv6 address without its brackets (Python 3.11's
 * http.client tunnels with "CONNECT ::1:443"; squid refuses it too). */
static const char *
http_fwd_bad_authority(const char *a, size_t n, const char *why)
{
	const char *colon;

	if (memchr(a, '@', n))
		return "userinfo (user@) in the URL; send credentials in Authorization";
	if (n > 0 && a[0] != '[' && (colon = memchr(a, ':', n)) != NULL &&
	    memchr(colon + 1, ':', n - (size_t)(colon + 1 - a)) != NULL)
		return "an IPv6 address needs brackets: [address]:port";
	return why;
}

static int
http_fwd_route(struct session *s, const struct http_msg *m, struct http_target *t, const char **why)
{
	struct http_cfg *cfg = s->inst->cfg;
	static _Thread_local char user[USERS_FIELD_MAX + 1];

	if (http_method_is(m, "CONNECT")) {
		if (http_authority(m->target, m->target_len, t) != 1) {
			*why = http_fwd_bad_authority(m->target, m->target_len, "CONNECT needs host:port");
			return 400;
		}
		t->connect = true;
	} else if (http_method_is(m, "OPTIONS") && m->target_len == 1 && m->target[0] == '*' &&
	           http_max_forwards(m, NULL) == 0) {
		/* asks the proxy itself (RFC 9110 9.3.7, 7.6.2): no URL, capd answers (http-proxy.c) */
	} else {
		size_t i;
		bool https;
		if (http_target_scheme(m, &https) == 0 || https) {
			*why = https ? "https URLs go through CONNECT" : "a proxy request needs an absolute http:// URL";
			return 400;
		}
		for (i = 7; i < m->target_len && m->target[i] != '/' && m->target[i] != '?'; i++)
			;
		if (memchr(m->target, '#', m->target_len)) {
			*why = "fragment in the request target";
			return 400;
		}
		if (http_authority(m->target + 7, i - 7, t) < 0) {
			*why = http_fwd_bad_authority(m->target + 7, i - 7, "bad host in the URL");
			return 400;
		}
		t->authority = m->target + 7;
		t->authority_len = i - 7;
		t->path = m->target + i;
		t->path_len = m->target_len - i;
	}
	if (cfg->users) {
		if (!http_fwd_auth(cfg, m, user, sizeof user)) {
			*why = http_header(m, "proxy-authorization") ? "wrong proxy credentials" : "proxy credentials needed";
			return 407;
		}
		t->user = user;
	}
	if (t->connect && !http_fwd_port_ok(cfg, t->port)) {
		*why = "CONNECT to this port is not allowed (connect_ports)";
		return 403;
	}
	return 0;
}

static int
http_fwd_ports(struct http_cfg *cfg, struct params *p)
{
	const char *v = params_csv(p, "connect_ports", "443");
	char *copy, *tok, *save = NULL;
	int rc = 0;

	if (strcmp(v, "*") == 0) {
		cfg->connect_any = true;
		return 0;
	}
	copy = xstrdup(v);
	for (tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
		uint64_t port;
		if (strcmp(tok, "*") == 0) {  /* "bad port '*' ... (ports or *)" would contradict itself */
			rc = params_fail(p, "connect_ports", "'*' in connect_ports means every port: give it alone, not in a list");
			break;
		}
		if (value_uint(tok, 65535, &port) < 0 || port == 0) {
			rc = params_fail(p, "connect_ports", "bad port '%s' in connect_ports (ports or *)", tok);
			break;
		}
		if (cfg->nconnect_ports >= sizeof cfg->connect_ports / sizeof cfg->connect_ports[0]) {
			rc = params_fail(p, "connect_ports", "too many connect_ports (use *)");
			break;
		}
		cfg->connect_ports[cfg->nconnect_ports++] = (uint16_t)port;
	}
	if (rc == 0 && cfg->nconnect_ports == 0)
		rc = params_fail(p, "connect_ports", "connect_ports is empty");
	free(copy);
	return rc;
}

static int
http_fwd_configure(struct instance *inst, struct params *p)
{
	struct http_cfg *cfg = xcalloc(1, sizeof *cfg);

	inst->cfg = cfg;
	cfg->route = http_fwd_route;
	if (http_cfg_limits(cfg, p) < 0 || http_fwd_ports(cfg, p) < 0)
		return -1;
	cfg->users = users_load(p);
	if (p->why)
		return -1;
	if (inst->expose && cfg->users == NULL)
		params_warn_check(p, "expose", "%s: exposed on %s with no users: this is an open proxy", inst->name,
		                  inst->listen_str);
	return tls_configure(inst, p, &cfg->tls);
}

/* An exposed instance without users relays for anyone who reaches it: said once, as socks says it. */
static int
http_fwd_start(struct instance *inst, char **why)
{
	struct http_cfg *cfg = inst->cfg;

	(void)why;
	if (inst->expose && cfg->users == NULL)
		log_warnx("%s: exposed on %s with no users: this is an open proxy", inst->name, inst->listen_str);
	return 0;
}

static void
http_fwd_describe(struct instance *inst, json_t *o)
{
	struct http_cfg *cfg = inst->cfg;

	if (cfg->connect_any) {
		json_object_set_new(o, "connect_ports", json_string("*"));
	} else {
		json_t *a = json_array();
		for (unsigned i = 0; i < cfg->nconnect_ports; i++)
			json_array_append_new(a, json_integer(cfg->connect_ports[i]));
		json_object_set_new(o, "connect_ports", a);
	}
	json_object_set_new(o, "auth", json_boolean(cfg->users != NULL));
	json_object_set_new(o, "max_header_size", json_integer((json_int_t)cfg->lim.max_head));
	json_object_set_new(o, "header_timeout", json_real(cfg->head_timeout));
	json_object_set_new(o, "response_timeout", json_real(cfg->resp_timeout));
	tls_describe(cfg->tls, o);
}

const struct proto proto_http = {
	.name = "http",
	.keys = http_keys,
	.listens = true,
	.sharded = true,
	.hs_max = HTTP_PROXY_HS_MAX,
	.configure = http_fwd_configure,
	.start = http_fwd_start,
	.accepted = http_proxy_accepted,
	.input = http_proxy_input,
	.connected = http_proxy_connected,
	.hs_ended = http_proxy_hs_ended,
	.session_free = http_proxy_session_free,
	.idle = http_proxy_idle,
	.free = http_cfg_free,
	.describe = http_fwd_describe,
};

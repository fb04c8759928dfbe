/*
 * reverse: the reverse HTTP proxy. Each request is routed by its Host (exact
 * names first, then the longest matching `*.suffix`, then `default`), keeps
 * its Host and gains X-Forwarded-For/-Host/-Proto (a Location naming the
 * upstream gets that Host back: http-proxy.c); 421 when nothing routes.
 * An absolute-form request (`GET http://h/p`; `https://` on a TLS client
 * connection, 421 on a plain one) is routed by the URL's host, whose
 * authority then replaces Host. On a TLS client connection a Host other
 * than the SNI is a 421 too, and a request without Host is routed by the SNI.
 * Framing, keep-alive and capture are http-proxy.c's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http-proxy.h"
#include "log.h"
#include "session.h"
#include "tls.h"
#include "xmalloc.h"

static const char *const reverse_live_keys[] = { "route", "default", NULL };

static const char *const reverse_keys[] = {
	"route", "default", "max_header_size", "header_timeout", "response_timeout",
	"tls", "tls_verify", "tls_capture", "tls_passthrough", "tls_auto_passthrough", "tls_timeout",
	"tls_client_cert", NULL,
};

/* Whether two IP literals are one address: IPv6 has many spellings of
 * each ([::1], [0:0::1], [::0001]), and Host may use any of them. */
static bool
reverse_same_ip(const char *a, const char *b)
{
	struct sockaddr_storage x, y;
	socklen_t xl, yl;

	return addr_from_literal(a, 1, &x, &xl) == 0 && addr_from_literal(b, 1, &y, &yl) == 0 &&
	       addr_same((struct sockaddr *)&x, (struct sockaddr *)&y, false);
}

/* The route for name: exact patterns win, then the longest wildcard. */
static const struct http_route *
reverse_match(const struct http_cfg *cfg, const char *name)
{
	const struct http_route *best = NULL;
	size_t best_len = 0;

	for (unsigned i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		if (r->pattern[0] != '*' && (hostname_match(r->pattern, name) || reverse_same_ip(r->pattern, name)))
			return r;
	}
	for (unsigned i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		size_t len = strlen(r->pattern);
		if (r->pattern[0] == '*' && len > best_len && hostname_match(r->pattern, name)) {
			best = r;
			best_len = len;
		}
	}
	return best;
}

static int
reverse_route(struct session *s, const struct http_msg *m, struct http_target *t, const char **why)
{
	struct http_cfg *cfg = s->inst->cfg;
	const struct hostport *to = NULL;
	struct http_target host = { 0 };
	const char *a = NULL, *sni;
	size_t an = 0, skip;
	bool https;

	if (http_method_is(m, "CONNECT")) {
		*why = "CONNECT is not served by a reverse proxy";
		return 405;
	}
	skip = http_target_scheme(m, &https);
	if (https && s->client.tls == NULL) {
		/* an https resource is served over TLS only (RFC 9110 7.4); a target
		 * that does not match the connection is a 421 (RFC 9110 15.5.20) */
		*why = "an https:// URL on a connection without TLS";
		return 421;
	}
	if (skip) {
		/* absolute form: its authority names the host, the rest goes upstream */
		size_t i;
		for (i = skip; i < m->target_len && m->target[i] != '/' && m->target[i] != '?'; i++)
			;
		a = m->target + skip;
		an = i - skip;
		t->authority = a;  /* it replaces Host (RFC 9112 3.2.2) */
		t->authority_len = an;
		t->path = m->target + i;
		t->path_len = m->target_len - i;
	} else if (m->target[0] != '/' && !(m->target_len == 1 && m->target[0] == '*')) {
		*why = "bad request target";
		return 400;
	} else if (m->target[0] == '*' && !http_method_is(m, "OPTIONS")) {
		/* the asterisk form is for OPTIONS only (RFC 9112 3.2.4) */
		*why = "'*' is a target for OPTIONS only";
		return 400;
	} else if (m->host >= 0) {
		a = m->hdr[m->host].value;
		an = m->hdr[m->host].value_len;
	}
	if (memchr(m->target, '#', m->target_len)) {
		/* a request target has no fragment (RFC 9112 3.2: an invalid
		 * request line SHOULD get 400), as on an http instance */
		*why = "fragment in the request target";
		return 400;
	}
	if (a && http_authority(a, an, &host) < 0) {
		*why = "bad Host";
		return 400;
	}
	sni = tls_client_sni(s);
	if (a && sni && !hostname_match(sni, host.host) && reverse_match(cfg, sni) != reverse_match(cfg, host.host)) {
		/* the certificate capd showed was forged for the SNI, and the
		 * upstream's TLS gets that name too: a Host that routes elsewhere
		 * is misdirected (RFC 9110 7.4), as nginx says. One that routes to
		 * the same upstream (a default alone, one wildcard: domain fronting,
		 * which an analyst wants to see) goes on as sent. */
		*why = "Host differs from the TLS server name (SNI)";
		return 421;
	}
	if (a || sni) {
		/* without Host (HTTP/1.0) the SNI names the host, as nginx takes it */
		const struct http_route *r = reverse_match(cfg, a ? host.host : sni);
		if (r)
			to = &r->to;
	}
	if (to == NULL && cfg->have_default)
		to = &cfg->def;
	if (to == NULL) {
		*why = a     ? "no route for this Host"
		       : sni ? "no route for the TLS server name (SNI)"
		             : "no Host and no default route";
		return 421;
	}
	snprintf(t->host, sizeof t->host, "%s", to->host);
	t->port = to->port;
	return 0;
}

/* What a refused pattern most likely meant, written as nginx's server_name
 * or location would have it, or "". */
static const char *
reverse_pattern_hint(const char *pat)
{
	if (strchr(pat, '/'))
		return ": routes go by Host only, not by path";
	if (pat[0] == '.')
		return ": write *.suffix, and the name itself in a route of its own";
	if (strchr(pat, ':') && !addr_is_ip_literal(pat))
		return ": a pattern has no port (that of Host does not count)";
	return "";
}

static int
reverse_configure(struct instance *inst, struct params *p)
{
	struct http_cfg *cfg = xcalloc(1, sizeof *cfg);
	json_t *routes = params_list(p, "route"), *e;
	const char *def = params_str(p, "default", NULL);
	char *why = NULL;
	size_t i;

	inst->cfg = cfg;
	cfg->reverse = true;
	cfg->route = reverse_route;
	if (http_cfg_limits(cfg, p) < 0)
		return -1;
	if (routes && json_array_size(routes) > 0)
		cfg->routes = xcalloc(json_array_size(routes), sizeof *cfg->routes);
	json_array_foreach(routes, i, e) {
		const char *v = json_string_value(e), *eq = v ? strchr(v, '=') : NULL;
		struct http_route *r = &cfg->routes[cfg->nroutes];
		char *pat;
		size_t len;
		bool bracket;

		if (eq == NULL || eq == v)
			return params_fail_at(p, "route", i, "bad route '%s': expected host=addr:port", v ? v : "");
		pat = xstrndup(v, (size_t)(eq - v));
		len = strlen(pat);
		if (len > 1 && pat[len - 1] == '.' && pat[len - 2] != '.' && pat[len - 2] != '*')
			pat[len - 1] = '\0';  /* "host." is "host": a Host is matched without its dot */
		bracket = len > 2 && pat[0] == '[' && pat[len - 1] == ']';
		if (bracket) {
			/* "[::1]", as Host writes an IPv6 address */
			memmove(pat, pat + 1, len - 2);
			pat[len - 2] = '\0';
		}
		if (bracket ? !(addr_is_ip_literal(pat) && strchr(pat, ':'))
		            : !(strcmp(pat, "*") == 0 || hostname_valid(strncmp(pat, "*.", 2) == 0 ? pat + 2 : pat) ||
		                addr_is_ip_literal(pat))) {
			params_fail_at(p, "route", i, "bad host pattern '%.*s' in route%s", (int)(eq - v), v,
			               reverse_pattern_hint(pat));
			free(pat);
			return -1;
		}
		r->pattern = pat;
		cfg->nroutes++;
		if (hostport_parse(eq + 1, &r->to, &why) < 0) {
			params_fail_at(p, "route", i, "bad route '%s': %s", v, why);
			free(why);
			return -1;
		}
		/* the first route for a pattern takes its Hosts: another one with
		 * a different upstream would never be used, as the user cannot see */
		for (unsigned j = 0; j + 1 < cfg->nroutes; j++) {
			const struct http_route *o = &cfg->routes[j];

			if ((strcasecmp(o->pattern, pat) == 0 || reverse_same_ip(o->pattern, pat)) &&
			    (o->to.port != r->to.port || strcasecmp(o->to.host, r->to.host) != 0))
				return params_fail_at(p, "route", i, "two routes for '%s' go to different upstreams", pat);
		}
	}
	if (def) {
		if (hostport_parse(def, &cfg->def, &why) < 0) {
			params_fail(p, "default", "%s", why);
			free(why);
			return -1;
		}
		cfg->have_default = true;
	}
	if (cfg->nroutes == 0 && !cfg->have_default)
		return params_fail(p, NULL, "a reverse instance needs 'route = host=addr:port' or 'default = addr:port'");
	return tls_configure(inst, p, &cfg->tls);
}

/* A reload's new routes: the next request of every connection goes by them
 * (one kept on another upstream moves to a new session, as for any Host). */
static void
reverse_update(struct instance *inst, struct instance *fresh)
{
	struct http_cfg *cfg = inst->cfg, *f = fresh->cfg;
	struct http_route *routes = cfg->routes;
	unsigned nroutes = cfg->nroutes;

	cfg->routes = f->routes;
	cfg->nroutes = f->nroutes;
	cfg->def = f->def;
	cfg->have_default = f->have_default;
	f->routes = routes;  /* freed with fresh */
	f->nroutes = nroutes;
}

static void
reverse_hostport(json_t *a, const struct hostport *hp, const char *pattern)
{
	char s[2 * HOST_MAX + 16];

	snprintf(s, sizeof s, strchr(hp->host, ':') ? "%s%s[%s]:%u" : "%s%s%s:%u", pattern ? pattern : "",
	         pattern ? "=" : "", hp->host, hp->port);
	json_array_append_new(a, json_string(s));
}

static void
reverse_describe(struct instance *inst, json_t *o)
{
	struct http_cfg *cfg = inst->cfg;
	json_t *a = json_array();

	for (unsigned i = 0; i < cfg->nroutes; i++)
		reverse_hostport(a, &cfg->routes[i].to, cfg->routes[i].pattern);
	json_object_set_new(o, "routes", a);
	if (cfg->have_default) {
		json_t *d = json_array();
		reverse_hostport(d, &cfg->def, NULL);
		json_object_set(o, "default", json_array_get(d, 0));
		json_decref(d);
	}
	json_object_set_new(o, "max_header_size", json_integer((json_int_t)cfg->lim.max_head));
	json_object_set_new(o, "header_timeout", json_real(cfg->head_timeout));
	json_object_set_new(o, "response_timeout", json_real(cfg->resp_timeout));
	tls_describe(cfg->tls, o);
}

const struct proto proto_reverse = {
	.name = "reverse",
	.keys = reverse_keys,
	.listens = true,
	.sharded = true,
	.hs_max = HTTP_PROXY_HS_MAX,
	.configure = reverse_configure,
	.accepted = http_proxy_accepted,
	.input = http_proxy_input,
	.connected = http_proxy_connected,
	.session_free = http_proxy_session_free,
	.idle = http_proxy_idle,
	.free = http_cfg_free,
	.describe = reverse_describe,
	.live_keys = reverse_live_keys,
	.update = reverse_update,
};

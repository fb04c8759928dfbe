/*
 * reverse: the reverse HTTP proxy. Each request is routed by its Host (exact
 * names first, then the longest matching `*.suffix`), then by the longest
 * path prefix among that pattern's routes, as nginx picks a server block and
 * then a location; else by `default`. It keeps its Host and gains
 * X-Forwarded-For/-Host/-Proto (a Location naming the upstream gets that
 * Host back: http-proxy.c); 421 when nothing routes, 404 when the Host has
 * routes but none for the path.
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

/* The host pattern for name, as nginx picks a server block: an exact
 * pattern wins, then the longest wildcard. The index of its first route
 * (http_route.host), or -1. */
static int
reverse_match_host(const struct http_cfg *cfg, const char *name)
{
	int best = -1;
	size_t best_len = 0;

	for (unsigned i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		if (r->host == i && r->pattern[0] != '*' &&
		    (hostname_match(r->pattern, name) || reverse_same_ip(r->pattern, name)))
			return (int)i;
	}
	for (unsigned i = 0; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		size_t len = strlen(r->pattern);
		if (r->host == i && r->pattern[0] == '*' && len > best_len && hostname_match(r->pattern, name)) {
			best = (int)i;
			best_len = len;
		}
	}
	return best;
}

/* The route for a request to name whose path (up to its '?') is path:
 * then, among the routes of the host pattern alone (as nginx looks for a
 * location in the server block it picked, never in another), the longest
 * prefix of path, byte for byte. NULL when none; *named then says whether
 * name has routes, for other paths. */
static const struct http_route *
reverse_match(const struct http_cfg *cfg, const char *name, const char *path, size_t n, bool *named)
{
	const struct http_route *best = NULL;
	int h = reverse_match_host(cfg, name);

	*named = h >= 0;
	for (unsigned i = h < 0 ? cfg->nroutes : (unsigned)h; i < cfg->nroutes; i++) {
		const struct http_route *r = &cfg->routes[i];
		if (r->host == (unsigned)h && r->path_len <= n && memcmp(r->path, path, r->path_len) == 0 &&
		    (best == NULL || r->path_len > best->path_len))
			best = r;
	}
	return best;
}

/* Where a request to name with path goes: its route's upstream, else the
 * default, else NULL (*named as reverse_match says it). */
static const struct hostport *
reverse_pick(const struct http_cfg *cfg, const char *name, const char *path, size_t n, bool *named)
{
	const struct http_route *r = reverse_match(cfg, name, path, n, named);

	return r ? &r->to : cfg->have_default ? &cfg->def : NULL;
}

/* The path a request is routed by, up to its '?' (t->path of an absolute
 * form, else the target as sent): nothing decoded or normalized, as
 * nginx's proxy_pass without a URI passes it on. An absolute form's empty
 * path is "/" (RFC 9112 3.2.2), and so is OPTIONS *, which names no path. */
static const char *
reverse_path(const struct http_msg *m, const struct http_target *t, size_t *n)
{
	const char *p = t->path ? t->path : m->target;
	size_t len = t->path ? t->path_len : m->target_len;
	const char *q = memchr(p, '?', len);

	if (q)
		len = (size_t)(q - p);
	if (len == 0 || p[0] != '/') {
		*n = 1;
		return "/";
	}
	*n = len;
	return p;
}

static int
reverse_route(struct session *s, const struct http_msg *m, struct http_target *t, const char **why)
{
	struct http_cfg *cfg = s->inst->cfg;
	const struct hostport *to = NULL;
	struct http_target host = { 0 };
	const char *a = NULL, *sni, *path;
	size_t an = 0, skip, pn;
	bool https, named = false, sni_named;

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
	path = reverse_path(m, t, &pn);
	sni = tls_client_sni(s);
	if (a && sni && !hostname_match(sni, host.host) &&
	    reverse_pick(cfg, sni, path, pn, &sni_named) != reverse_pick(cfg, host.host, path, pn, &named)) {
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
		const struct http_route *r = reverse_match(cfg, a ? host.host : sni, path, pn, &named);
		if (r)
			to = &r->to;
	}
	if (to == NULL && cfg->have_default)
		to = &cfg->def;
	if (to == NULL && named) {
		/* the host is served, not this path: nginx's 404 for a location it
		 * lacks. A 421 would have the client try again on a new connection
		 * (RFC 9110 15.5.20), for the same answer. */
		*why = a ? "no route for this path of this Host"
		         : "no route for this path of the TLS server name (SNI)";
		return 404;
	}
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

/* What a refused host pattern most likely meant, written as nginx's
 * server_name would have it, or "". rest: what follows it in the route. */
static const char *
reverse_pattern_hint(const char *pat, const char *rest)
{
	if (strncmp(rest, "//", 2) == 0 && pat[0] && pat[strlen(pat) - 1] == ':')
		return ": a route is pattern[/path]=host:port, not a URL";
	if (pat[0] == '\0')
		return ": a path needs a host pattern before it (* for every host)";
	if (pat[0] == '.')
		return ": write *.suffix, and the name itself in a route of its own";
	if (strchr(pat, ':') && !addr_is_ip_literal(pat))
		return ": a pattern has no port (that of Host does not count)";
	return "";
}

/* Why a route's path prefix cannot match a request's path, or NULL: it is
 * matched byte for byte against the path as sent, before its '?'. */
static const char *
reverse_path_problem(const char *path)
{
	for (const char *c = path; *c; c++) {
		if ((unsigned char)*c <= ' ' || *c == 0x7f)
			return "a path has no spaces or control characters (write them %XX, as a request does)";
		if (*c == '?')
			return "routes go by path, not by query: a prefix ends before '?'";
		if (*c == '#')
			return "a request target has no '#' fragment";
	}
	return NULL;
}

/* The host part of a route, [0, n) of v, into r->pattern, normalized as a
 * Host is matched; -1 with the error recorded in p. */
static int
reverse_route_host(struct params *p, size_t i, const char *v, size_t n, struct http_route *r)
{
	char *pat = xstrndup(v, n);
	size_t len = n;
	bool bracket;

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
		params_fail_at(p, "route", i, "bad host pattern '%.*s' in route%s", (int)n, v,
		               reverse_pattern_hint(pat, v + n));
		free(pat);
		return -1;
	}
	r->pattern = pat;
	return 0;
}

/*
 * route = pattern[/path]=host:port into r, which the instance's cfg owns
 * from the start (so a half-filled one is freed with it). The upstream
 * follows the last '=' (an address has none, a path may), the host pattern
 * ends at the first '/', and no path is "/". -1 with the error recorded in p.
 */
static int
reverse_route_parse(struct params *p, size_t i, const char *v, struct http_route *r)
{
	const char *eq = v ? strrchr(v, '=') : NULL, *slash, *bad;
	char *why = NULL;

	if (eq == NULL || eq == v)
		return params_fail_at(p, "route", i, "bad route '%s': expected host[/path]=addr:port", v ? v : "");
	if ((slash = memchr(v, '/', (size_t)(eq - v))) == NULL)
		slash = eq;
	if (reverse_route_host(p, i, v, (size_t)(slash - v), r) < 0)
		return -1;
	r->path = slash < eq ? xstrndup(slash, (size_t)(eq - slash)) : xstrdup("/");
	r->path_len = strlen(r->path);
	if ((bad = reverse_path_problem(r->path)) != NULL)
		return params_fail_at(p, "route", i, "bad path '%s' in route '%s': %s", r->path, v, bad);
	if (hostport_parse(eq + 1, &r->to, &why) < 0) {
		params_fail_at(p, "route", i, "bad route '%s': %s", v, why);
		free(why);
		return -1;
	}
	/* the pattern and path as written, the upstream as used (a port alone is 127.0.0.1's) */
	r->text = xasprintf(strchr(r->to.host, ':') ? "%.*s=[%s]:%u" : "%.*s=%s:%u", (int)(eq - v), v, r->to.host,
	                    r->to.port);
	return 0;
}

/* Routes n of cfg joins its host pattern's (one nginx server block), and
 * is refused when one for the same path goes elsewhere: the first would
 * take all its requests, as the user cannot see. */
static int
reverse_route_join(struct http_cfg *cfg, unsigned n, struct params *p, size_t i)
{
	struct http_route *r = &cfg->routes[n];

	r->host = n;
	for (unsigned j = 0; j < n; j++) {
		const struct http_route *o = &cfg->routes[j];

		if (strcasecmp(o->pattern, r->pattern) != 0 && !reverse_same_ip(o->pattern, r->pattern))
			continue;
		r->host = o->host;
		if (strcmp(o->path, r->path) == 0 &&
		    (o->to.port != r->to.port || strcasecmp(o->to.host, r->to.host) != 0))
			return params_fail_at(p, "route", i, "two routes for '%s%s' go to different upstreams", r->pattern,
			                      strcmp(r->path, "/") ? r->path : "");
	}
	return 0;
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
		unsigned n = cfg->nroutes++;

		if (reverse_route_parse(p, i, json_string_value(e), &cfg->routes[n]) < 0 ||
		    reverse_route_join(cfg, n, p, i) < 0)
			return -1;
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
		return params_fail(p, NULL,
		                   "a reverse instance needs 'route = host[/path]=addr:port' or 'default = addr:port'");
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

/* host:port, an IPv6 address in brackets; caller owns. */
static json_t *
reverse_hostport(const struct hostport *hp)
{
	char s[HOST_MAX + 16];

	snprintf(s, sizeof s, strchr(hp->host, ':') ? "[%s]:%u" : "%s:%u", hp->host, hp->port);
	return json_string(s);
}

static void
reverse_describe(struct instance *inst, json_t *o)
{
	struct http_cfg *cfg = inst->cfg;
	json_t *a = json_array();

	for (unsigned i = 0; i < cfg->nroutes; i++)
		json_array_append_new(a, json_string(cfg->routes[i].text));
	json_object_set_new(o, "routes", a);
	if (cfg->have_default)
		json_object_set_new(o, "default", reverse_hostport(&cfg->def));
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
	.hs_ended = http_proxy_hs_ended,
	.session_free = http_proxy_session_free,
	.idle = http_proxy_idle,
	.free = http_cfg_free,
	.describe = reverse_describe,
	.live_keys = reverse_live_keys,
	.update = reverse_update,
};

/*
 * HTTP/1.x message heads and body framing (RFC 9110, RFC 9112), strict and
 * bounded. See http-parse.h for the contract. Heads are parsed in place:
 * nothing is copied, header names and values point into the caller's bytes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* memrchr */
#endif
#include "http-parse.h"

#include <pthread.h>
#include <string.h>

/* character classes */
#define C_TCHAR 0x01   /* token */
#define C_VCHAR 0x02   /* visible, SP, HTAB and obs-text: field values, reasons */
#define C_TARGET 0x04  /* request-target: visible ASCII and obs-text */
#define C_HEX 0x08

static uint8_t http_ctype[256];

static void
http_ctype_fill(void)
{
	static const char tchar[] = "!#$%&'*+-.^_`|~";

	for (int c = 0; c < 256; c++) {
		uint8_t t = 0;
		if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c != 0 && strchr(tchar, c)))
			t |= C_TCHAR;
		if ((c >= 0x21 && c <= 0x7e) || c == ' ' || c == '\t' || c >= 0x80)
			t |= C_VCHAR;
		/* obs-text too: curl sends a URL's UTF-8 raw, and nginx, squid
		 * (relaxed_header_parser) and origins take it; it goes on as it came */
		if ((c >= 0x21 && c <= 0x7e) || c >= 0x80)
			t |= C_TARGET;
		if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))
			t |= C_HEX;
		http_ctype[c] = t;
	}
}

/* Once per process, whichever session thread parses first (shard.h). */
static void
http_ctype_init(void)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;

	pthread_once(&once, http_ctype_fill);
}

#define IS(c, cls) (http_ctype[(uint8_t)(c)] & (cls))

static enum parse
http_fail(struct http_msg *m, int status, const char *why)
{
	m->status = status;
	m->why = why;
	return PARSE_ERR;
}

bool
http_token_eq(const char *p, size_t n, const char *lit)
{
	size_t l = strlen(lit);

	if (n != l)
		return false;
	for (size_t i = 0; i < n; i++) {
		char a = p[i], b = lit[i];
		if (a >= 'A' && a <= 'Z')
			a = (char)(a - 'A' + 'a');
		if (b >= 'A' && b <= 'Z')
			b = (char)(b - 'A' + 'a');
		if (a != b)
			return false;
	}
	return true;
}

bool
http_method_is(const struct http_msg *m, const char *name)
{
	return m->method_len == strlen(name) && memcmp(m->method, name, m->method_len) == 0;
}

int64_t
http_max_forwards(const struct http_msg *m, const struct http_hdr **h)
{
	const struct http_hdr *mf = NULL;
	int64_t v = 0;

	for (unsigned i = 0; i < m->nhdr; i++) {
		if (!http_token_eq(m->hdr[i].name, m->hdr[i].name_len, "max-forwards"))
			continue;
		if (mf)
			return -1;
		mf = &m->hdr[i];
	}
	if (mf == NULL || mf->value_len == 0 || mf->value_len > 18)
		return -1;
	for (uint32_t i = 0; i < mf->value_len; i++) {
		if (mf->value[i] < '0' || mf->value[i] > '9')
			return -1;
		v = v * 10 + (mf->value[i] - '0');
	}
	if (h)
		*h = mf;
	return v;
}

size_t
http_target_scheme(const struct http_msg *m, bool *https)
{
	*https = m->target_len >= 8 && http_token_eq(m->target, 8, "https://");
	if (*https)
		return 8;
	return m->target_len >= 7 && http_token_eq(m->target, 7, "http://") ? 7 : 0;
}

const struct http_hdr *
http_header(const struct http_msg *m, const char *name)
{
	for (unsigned i = 0; i < m->nhdr; i++)
		if (http_token_eq(m->hdr[i].name, m->hdr[i].name_len, name))
			return &m->hdr[i];
	return NULL;
}

/* Whitespace around a list element: SP, HTAB, and the CR and LF of an
 * obs-fold inside a response's value (http_fold). */
static bool
http_ows(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Calls fn for each element of a comma-separated list value, trimmed; stops when fn returns false. */
static bool
http_list_each(const char *v, size_t n, bool (*fn)(void *arg, const char *e, size_t len), void *arg)
{
	size_t i = 0;

	while (i <= n) {
		size_t start = i, end;
		while (i < n && v[i] != ',')
			i++;
		end = i;
		while (start < end && http_ows(v[start]))
			start++;
		while (end > start && http_ows(v[end - 1]))
			end--;
		if (end > start && !fn(arg, v + start, end - start))
			return false;
		i++;
	}
	return true;
}

struct http_conn_scan {
	struct http_msg *m;
	bool proxy;        /* a Proxy-Connection line: its tokens go to pconn_* */
	const char *name;  /* http_hop_by_hop: the name looked for */
	size_t len;
	bool found;
};

static bool
http_conn_token(void *arg, const char *e, size_t len)
{
	struct http_conn_scan *cs = arg;

	if (cs->name) {
		if (len == cs->len && http_token_eq(e, len, cs->name)) {
			cs->found = true;
			return false;
		}
		return true;
	}
	if (cs->proxy) {
		if (http_token_eq(e, len, "close"))
			cs->m->pconn_close = true;
		else if (http_token_eq(e, len, "keep-alive"))
			cs->m->pconn_keepalive = true;
		return true;
	}
	if (http_token_eq(e, len, "close"))
		cs->m->conn_close = true;
	else if (http_token_eq(e, len, "keep-alive"))
		cs->m->conn_keepalive = true;
	else if (http_token_eq(e, len, "upgrade"))
		cs->m->conn_upgrade = true;
	return true;
}

bool
http_hop_by_hop(const struct http_msg *m, const char *name, size_t len)
{
	static const char *const fixed[] = {
		"connection", "proxy-connection", "keep-alive", "proxy-authorization",
		"te", "upgrade", NULL,  /* not Trailer: it is end-to-end (RFC 9110 6.6.2) */
	};
	char lname[64];

	for (int i = 0; fixed[i]; i++)
		if (http_token_eq(name, len, fixed[i]))
			return true;
	/* Connection cannot take away the fields the message is framed (and
	 * routed) by: capd passes the body by the framing it parsed, so a
	 * "Connection: Content-Length" that dropped the length would let the
	 * body reach the upstream as a request of its own (smuggling), and a
	 * response without it would leave the client reading to a close */
	if (http_token_eq(name, len, "content-length") || http_token_eq(name, len, "transfer-encoding") ||
	    http_token_eq(name, len, "host"))
		return false;
	if (len >= sizeof lname)
		return false;
	memcpy(lname, name, len);
	lname[len] = '\0';
	for (unsigned i = 0; i < m->nhdr; i++) {
		const struct http_hdr *h = &m->hdr[i];
		struct http_conn_scan cs = { .name = lname, .len = len };
		if (!http_token_eq(h->name, h->name_len, "connection"))
			continue;
		http_list_each(h->value, h->value_len, http_conn_token, &cs);
		if (cs.found)
			return true;
	}
	return false;
}

struct http_cl_scan {
	uint64_t value;
	bool seen, bad;
};

static bool
http_cl_elem(void *arg, const char *e, size_t len)
{
	struct http_cl_scan *cl = arg;
	uint64_t v = 0;

	if (len > 18) {
		cl->bad = true;
		return false;
	}
	for (size_t i = 0; i < len; i++) {
		if (e[i] < '0' || e[i] > '9') {
			cl->bad = true;
			return false;
		}
		v = v * 10 + (uint64_t)(e[i] - '0');
	}
	if (cl->seen && v != cl->value) {
		cl->bad = true;
		return false;
	}
	cl->seen = true;
	cl->value = v;
	return true;
}

struct http_te_scan {
	unsigned codings, chunked;
	bool last_chunked;
};

static bool
http_te_elem(void *arg, const char *e, size_t len)
{
	struct http_te_scan *te = arg;
	size_t tok = 0;

	while (tok < len && e[tok] != ';' && e[tok] != ' ' && e[tok] != '\t')
		tok++;
	te->codings++;
	te->last_chunked = http_token_eq(e, tok, "chunked") && tok == len;
	if (http_token_eq(e, tok, "chunked"))
		te->chunked++;
	return true;
}

/*
 * The line starting at p[i], in a head that ends at limit: its content ends
 * at the returned index (its CR, or its LF when the line ends with a bare
 * LF) and *next is where the next line starts; -1 on a CR that is not the
 * one before the line's LF (bare CR). A bare LF ends a whole line and
 * nothing else, as RFC 9112 2.2 lets a recipient take it (nginx, squid,
 * curl and browsers do): capd writes every head it passes on anew, with
 * CRLF, so the next hop never sees a line end capd did not see.
 */
static long
http_line_end(const char *p, size_t i, size_t limit, size_t *next)
{
	const char *lf = memchr(p + i, '\n', limit - i);
	size_t e;

	if (lf == NULL)
		return -1;
	e = (size_t)(lf - p);
	*next = e + 1;
	if (e > i && p[e - 1] == '\r')
		e--;
	if (memchr(p + i, '\r', e - i))
		return -1;
	return (long)e;
}

/* Where the head starting at p[s] ends: the index after the LF of its
 * first empty line (CRLF or a bare LF), 0 when none came yet. */
static size_t
http_head_end(const char *p, size_t s, size_t n)
{
	size_t i = s;

	while (i < n) {
		const char *lf = memchr(p + i, '\n', n - i);
		size_t e;

		if (lf == NULL)
			return 0;
		e = (size_t)(lf - p);
		if (e == i || (e == i + 1 && p[i] == '\r'))
			return e + 1;
		i = e + 1;
	}
	return 0;
}

/* "HTTP/1.x" at p: 0 or 1 into *minor; 0 ok, 400 malformed, 505 another
 * major version. A higher minor version (HTTP/1.2) is taken as the highest
 * one capd speaks, 1.1, as RFC 9110 2.5 says a recipient should (nginx does). */
static int
http_version(const char *p, size_t n, int *minor)
{
	if (n != 8 || memcmp(p, "HTTP/", 5) != 0 || p[6] != '.' || p[5] < '0' || p[5] > '9' || p[7] < '0' ||
	    p[7] > '9')
		return 400;
	if (p[5] != '1')
		return 505;
	*minor = p[7] == '0' ? 0 : 1;
	return 0;
}

/*
 * The shared start: finds the head (a request may follow stray empty
 * lines), fails early on what can never become one, and checks the start
 * line's end. The caller parses the start line, p[*start..*first_end)
 * (*first_end is its CR or bare LF; the next line starts at *first_next),
 * before http_parse_fields parses the header lines, so that a head refused
 * for a header still says what it asked for.
 */
static enum parse
http_head_find(const char *p, size_t n, size_t max, bool request, struct http_msg *m, size_t *start,
               size_t *first_end, size_t *first_next)
{
	size_t s = 0, end;
	long le;

	http_ctype_init();
	memset(m, 0, offsetof(struct http_msg, hdr));
	m->host = -1;
	/* a request may follow a stray empty line (RFC 9112 2.2), CRLF or LF */
	if (request)
		while (s < n && s < 8 && (p[s] == '\n' || (s + 1 < n && p[s] == '\r' && p[s + 1] == '\n')))
			s += p[s] == '\n' ? 1 : 2;
	*start = s;
	/* the CR of such a line whose LF is still to come (a client sending a
	 * byte at a time) is not yet anything: the same bytes in one read pass */
	if (request && s < 8 && n == s + 1 && p[s] == '\r')
		return PARSE_MORE;
	if (n > s && !IS(p[s], C_TCHAR))
		return http_fail(m, 400, request ? "not an HTTP request" : "not an HTTP response");
	end = http_head_end(p, s, n < max ? n : max);
	if (end == 0) {
		if (n >= max)
			return http_fail(m, 431, "header section too large");
		return PARSE_MORE;
	}
	m->head_len = end;
	le = http_line_end(p, s, end, first_next);
	if (le < 0)
		return http_fail(m, 400, "bad line end");
	*first_end = (size_t)le;
	return PARSE_OK;
}

/* A header value [*vs, *ve) without its leading and trailing blanks; -1 for
 * a control character in what is left (a bare CR or LF, NUL). */
static int
http_value_trim(const char *p, size_t *vs, size_t *ve)
{
	while (*vs < *ve && (p[*vs] == ' ' || p[*vs] == '\t'))
		(*vs)++;
	while (*ve > *vs && (p[*ve - 1] == ' ' || p[*ve - 1] == '\t'))
		(*ve)--;
	for (size_t j = *vs; j < *ve; j++)
		if (!IS(p[j], C_VCHAR))
			return -1;
	return 0;
}

/*
 * A response's obs-fold line p[i..le) (RFC 9112 5.2): a proxy must refuse
 * the response or replace each fold with SP before passing it on. Browsers
 * and curl take folded responses, so capd does the latter: the line's
 * value joins the previous header's, whose value then spans the fold (its
 * line end and leading whitespace), which the writer of the head
 * (http_put_value) puts out as one SP; m->folded says some did.
 */
static enum parse
http_fold(const char *p, size_t i, size_t le, struct http_msg *m)
{
	struct http_hdr *h = &m->hdr[m->nhdr - 1];
	size_t vs = i, ve = le;

	/* what frames the body is never guessed at: no sender that means
	 * well folds a length (the response gets 502) */
	if (http_token_eq(h->name, h->name_len, "content-length") ||
	    http_token_eq(h->name, h->name_len, "transfer-encoding"))
		return http_fail(m, 400, "obsolete line folding in Content-Length or Transfer-Encoding");

	if (http_value_trim(p, &vs, &ve) < 0)
		return http_fail(m, 400, "control character in a header value");
	if (vs == ve)
		return PARSE_OK;  /* whitespace alone adds nothing */
	if (h->value_len == 0)
		h->value = p + vs;  /* "Name:" and its value on the next line */
	h->value_len = (uint32_t)(p + ve - h->value);
	m->folded = true;
	return PARSE_OK;
}

/* The header lines after the start line (the first starts at i) into
 * m->hdr; fold: obs-fold is joined (responses) rather than refused. */
static enum parse
http_parse_fields(const char *p, const struct http_limits *lim, struct http_msg *m, size_t i, bool fold)
{
	unsigned max_hdr = lim && lim->max_headers ? lim->max_headers : HTTP_MAX_HEADERS;
	size_t end = m->head_len, next;

	for (; i < end; i = next) {
		struct http_hdr *h;
		size_t k = i, vs, ve;
		long le = http_line_end(p, i, end, &next);

		if (le < 0)
			return http_fail(m, 400, "bad line end");
		if ((size_t)le == i)
			break;  /* the empty line */
		if (p[i] == ' ' || p[i] == '\t') {
			enum parse rv;

			if (!fold || m->nhdr == 0)
				return http_fail(m, 400, "obsolete line folding");
			if ((rv = http_fold(p, i, (size_t)le, m)) != PARSE_OK)
				return rv;
			continue;
		}
		while (k < (size_t)le && IS(p[k], C_TCHAR))
			k++;
		if (k == i || k == (size_t)le || p[k] != ':')
			return http_fail(m, 400, k < (size_t)le && (p[k] == ' ' || p[k] == '\t') ? "whitespace before colon"
			                                                                         : "bad header name");
		if (m->nhdr >= max_hdr)
			return http_fail(m, 431, "too many header fields");
		vs = k + 1;
		ve = (size_t)le;
		if (http_value_trim(p, &vs, &ve) < 0)
			return http_fail(m, 400, "control character in a header value");
		h = &m->hdr[m->nhdr++];
		h->name = p + i;
		h->name_len = (uint32_t)(k - i);
		h->value = p + vs;
		h->value_len = (uint32_t)(ve - vs);
	}
	return PARSE_OK;
}

/* An Upgrade element: sets *arg when it is h2c. */
static bool
http_h2c_elem(void *arg, const char *e, size_t len)
{
	if (http_token_eq(e, len, "h2c"))
		*(bool *)arg = true;
	return true;
}

/* Connection, Proxy-Connection, Content-Length, Transfer-Encoding, Host, Expect, Upgrade. */
static enum parse
http_semantics(struct http_msg *m, bool request)
{
	struct http_cl_scan cl = { 0 };
	struct http_te_scan te = { 0 };
	bool have_te = false, have_upgrade = false, h2c = false;
	unsigned hosts = 0;

	for (unsigned i = 0; i < m->nhdr; i++) {
		const struct http_hdr *h = &m->hdr[i];
		const char *name = h->name;
		uint32_t nl = h->name_len;

		if (http_token_eq(name, nl, "content-length")) {
			http_list_each(h->value, h->value_len, http_cl_elem, &cl);
			if (cl.bad || !cl.seen)
				return http_fail(m, 400, "bad or conflicting Content-Length");
		} else if (http_token_eq(name, nl, "transfer-encoding")) {
			have_te = true;
			http_list_each(h->value, h->value_len, http_te_elem, &te);
		} else if (http_token_eq(name, nl, "connection")) {
			struct http_conn_scan cs = { .m = m };
			m->conn_line = true;
			http_list_each(h->value, h->value_len, http_conn_token, &cs);
		} else if (http_token_eq(name, nl, "proxy-connection")) {
			struct http_conn_scan cs = { .m = m, .proxy = true };
			http_list_each(h->value, h->value_len, http_conn_token, &cs);
		} else if (http_token_eq(name, nl, "host")) {
			hosts++;
			m->host = (int)i;
		} else if (http_token_eq(name, nl, "expect")) {
			if (http_token_eq(h->value, h->value_len, "100-continue"))
				m->expect_continue = true;
		} else if (http_token_eq(name, nl, "upgrade")) {
			have_upgrade = true;
			http_list_each(h->value, h->value_len, http_h2c_elem, &h2c);
		}
	}
	/* an Upgrade in an HTTP/1.0 request is ignored (RFC 9110 7.8: a
	 * server must; a 1.0 intermediary may have passed it on blindly), so
	 * it and its Connection token go no further */
	if (!have_upgrade || (request && m->minor == 0))
		m->conn_upgrade = false;
	/* nor is one to h2c, as mitmproxy drops it: its HTTP2-Settings, which
	 * Connection names, is hop-by-hop and goes no further, and without it
	 * the upgrade is malformed (RFC 7540 3.2); the request goes on as
	 * HTTP/1.1, which capd reads (Java's HttpClient offers h2c by default) */
	if (request && h2c)
		m->conn_upgrade = false;
	if (have_te && cl.seen)
		return http_fail(m, 400, "both Content-Length and Transfer-Encoding");
	if (have_te && m->minor == 0)
		return http_fail(m, 400, "Transfer-Encoding in an HTTP/1.0 message");
	if (have_te && (te.codings == 0 || te.chunked > 1))
		return http_fail(m, 400, "bad Transfer-Encoding");
	if (request) {
		if (hosts > 1)
			return http_fail(m, 400, "more than one Host");
		if (hosts == 0 && m->minor == 1)
			return http_fail(m, 400, "no Host header");
		if (have_te && !te.last_chunked)
			return http_fail(m, te.chunked ? 400 : 501, "Transfer-Encoding does not end with chunked");
	}
	if (have_te)
		m->framing = te.last_chunked ? HTTP_BODY_CHUNKED : HTTP_BODY_CLOSE;
	else if (cl.seen) {
		m->framing = HTTP_BODY_LENGTH;
		m->length = cl.value;
	} else
		m->framing = request ? HTTP_BODY_NONE : HTTP_BODY_CLOSE;
	return PARSE_OK;
}

/* method SP request-target SP HTTP-version in p[s..le): PARSE_OK, or
 * PARSE_ERR with what parsed of it in m (the method, then the target). */
static enum parse
http_request_line(const char *p, size_t s, size_t le, struct http_msg *m)
{
	size_t i, t;
	int st;

	for (i = s; i < le && IS(p[i], C_TCHAR); i++)
		;
	if (i == s || i >= le || p[i] != ' ')
		return http_fail(m, 400, "bad request line");
	m->method = p + s;
	m->method_len = (uint32_t)(i - s);
	for (t = ++i; i < le && IS(p[i], C_TARGET); i++)
		;
	if (i > t && i == le)
		return http_fail(m, 400, "no HTTP version (an HTTP/0.9 request)");
	if (i == t || i >= le || p[i] != ' ')
		return http_fail(m, 400, "bad request target");
	m->target = p + t;
	m->target_len = (uint32_t)(i - t);
	if ((st = http_version(p + i + 1, le - i - 1, &m->minor)) != 0)
		return http_fail(m, st, st == 505 ? "HTTP version not supported" : "bad HTTP version");
	return PARSE_OK;
}

/* The start of a request line that did not end within p[s..upto): its
 * method and as much of its target as came (for the session's record). */
static void
http_request_line_start(const char *p, size_t s, size_t upto, struct http_msg *m)
{
	size_t i, t;

	for (i = s; i < upto && IS(p[i], C_TCHAR); i++)
		;
	if (i == s || i >= upto || p[i] != ' ')
		return;
	for (t = ++i; i < upto && IS(p[i], C_TARGET); i++)
		;
	if (i == t)
		return;
	m->method = p + s;
	m->method_len = (uint32_t)(t - 1 - s);
	m->target = p + t;
	m->target_len = (uint32_t)(i - t);
}

#define HTTP_EARLY_MAX 8192

/*
 * The lines of a request head that came whole, before the rest of it: a
 * request line that can never be a request (HTTP/0.9's "GET /") or a bad
 * header line (a NUL in it) gets its 400 now, as from nginx, rather than
 * a close after header_timeout. Each read parses them again until the
 * head is whole, so only the first 8K (nginx's usual bound for a request
 * line) are: past it, a head waits for its end as all did before.
 * PARSE_MORE when they are fine so far; m keeps nothing of them.
 */
static enum parse
http_request_early(const char *p, size_t s, size_t first, size_t next, size_t upto, const struct http_limits *lim,
                   struct http_msg *m)
{
	const char *last;

	if (first - s > HTTP_EARLY_MAX)
		return PARSE_MORE;
	if (http_request_line(p, s, first, m) == PARSE_ERR)
		return PARSE_ERR;
	if (upto - s > HTTP_EARLY_MAX)
		upto = s + HTTP_EARLY_MAX;
	last = memrchr(p + next, '\n', upto > next ? upto - next : 0);
	if (last != NULL) {
		m->head_len = (size_t)(last - p) + 1;  /* http_parse_fields' end: the last whole line */
		if (http_parse_fields(p, lim, m, next, false) == PARSE_ERR)
			return PARSE_ERR;
	}
	memset(m, 0, offsetof(struct http_msg, hdr));
	m->host = -1;
	return PARSE_MORE;
}

enum parse
http_parse_request(const uint8_t *bytes, size_t n, const struct http_limits *lim, struct http_msg *m)
{
	const char *p = (const char *)bytes;
	size_t max = lim && lim->max_head ? lim->max_head : HTTP_HEAD_DEFAULT;
	size_t s = 0, le = 0, next = 0, upto = n < max ? n : max;
	enum parse rv = http_head_find(p, n, max, true, m, &s, &le, &next);
	long first = -1;
	bool line = rv != PARSE_OK && upto > s && memchr(p + s, '\n', upto - s) != NULL;

	if (line)
		first = http_line_end(p, s, upto, &next);
	if (line && first < 0 && (rv == PARSE_MORE || m->status == 431))
		return http_fail(m, 400, "bad line end");  /* a bare CR in the request line */
	if (rv == PARSE_MORE && line && http_request_early(p, s, (size_t)first, (size_t)next, upto, lim, m) == PARSE_ERR)
		return PARSE_ERR;
	if (rv == PARSE_ERR && m->status == 431) {
		/* too large: what its request line asked for, when that came whole;
		 * a request line that did not is a target too long (RFC 9112 3) */
		const char *why = m->why;

		if (first >= 0) {
			http_request_line(p, s, (size_t)first, m);
			m->status = 431;
			m->why = why;
		} else {
			http_request_line_start(p, s, upto, m);
			http_fail(m, 414, "request line too long");
		}
		return PARSE_ERR;
	}
	if (rv != PARSE_OK)
		return rv;
	if ((rv = http_request_line(p, s, le, m)) != PARSE_OK ||
	    (rv = http_parse_fields(p, lim, m, next, false)) != PARSE_OK)
		return rv;
	return http_semantics(m, true);
}

bool
http_request_line_at(const uint8_t *bytes, size_t n, struct http_msg *m)
{
	const char *p = (const char *)bytes;
	size_t next;
	long le;

	http_ctype_init();
	memset(m, 0, offsetof(struct http_msg, hdr));
	if (n > HTTP_EARLY_MAX)
		n = HTTP_EARLY_MAX;
	if ((le = http_line_end(p, 0, n, &next)) < 0)
		return false;
	return http_request_line(p, 0, (size_t)le, m) == PARSE_OK;
}

enum parse
http_h2_preface(const uint8_t *p, size_t n)
{
	static const char preface[] = HTTP_H2_PREFACE;
	size_t len = sizeof preface - 1;

	if (n > 0 && memcmp(p, preface, n < len ? n : len) != 0)
		return PARSE_ERR;
	return n < len ? PARSE_MORE : PARSE_OK;
}

enum parse
http_parse_response(const uint8_t *bytes, size_t n, const struct http_limits *lim, bool head_request,
                    struct http_msg *m)
{
	const char *p = (const char *)bytes;
	size_t max = lim && lim->max_head ? lim->max_head : HTTP_HEAD_DEFAULT;
	size_t s = 0, le = 0, next = 0, i;
	enum parse rv = http_head_find(p, n, max, false, m, &s, &le, &next);
	int st;

	if (rv != PARSE_OK)
		return rv;
	/* HTTP-version SP 3DIGIT SP [reason] (the last SP is often left out) */
	if (le - s < 12 || p[s + 8] != ' ')
		return http_fail(m, 400, "bad status line");
	if ((st = http_version(p + s, 8, &m->minor)) != 0)
		return http_fail(m, st, "bad HTTP version");
	for (i = s + 9; i < s + 12; i++)
		if (p[i] < '0' || p[i] > '9')
			return http_fail(m, 400, "bad status code");
	m->status = (p[s + 9] - '0') * 100 + (p[s + 10] - '0') * 10 + (p[s + 11] - '0');
	if (m->status < 100)
		return http_fail(m, 400, "bad status code");
	if (le > s + 12) {
		if (p[s + 12] != ' ')
			return http_fail(m, 400, "bad status line");
		for (i = s + 13; i < le; i++)
			if (!IS(p[i], C_VCHAR))
				return http_fail(m, 400, "control character in the reason phrase");
		m->reason = p + s + 13;
		m->reason_len = (uint32_t)(le - s - 13);
	}
	if ((rv = http_parse_fields(p, lim, m, next, true)) != PARSE_OK)
		return rv;
	if ((rv = http_semantics(m, false)) != PARSE_OK) {
		m->status = 502;
		return rv;
	}
	if (head_request || m->status < 200 || m->status == 204 || m->status == 304) {
		m->framing = HTTP_BODY_NONE;
		m->length = 0;
	}
	return PARSE_OK;
}

/* ---- bodies ---- */

enum {
	CH_SIZE0,    /* first hex digit of a chunk size */
	CH_SIZE,     /* more digits, BWS, ';' or CR */
	CH_SIZE_WS,  /* BWS before ';' */
	CH_EXT,      /* chunk extension up to CR */
	CH_SIZE_LF,
	CH_DATA,
	CH_DATA_CR,
	CH_DATA_LF,
	CH_TRAIL0,   /* start of a trailer line, or the final CR */
	CH_TRAIL,    /* in a trailer line */
	CH_TRAIL_LF,
	CH_END_LF,
	CH_DONE,
};

#define CH_LINE_MAX 8192  /* chunk extension or trailer line */

void
http_body_init(struct http_body *b, enum http_framing framing, uint64_t length)
{
	memset(b, 0, sizeof *b);
	b->framing = framing;
	b->left = length;
	b->st = CH_SIZE0;
}

bool
http_body_done(const struct http_body *b)
{
	switch (b->framing) {
	case HTTP_BODY_NONE: return true;
	case HTTP_BODY_LENGTH: return b->left == 0;
	case HTTP_BODY_CHUNKED: return b->st == CH_DONE;
	default: return false;
	}
}

bool
http_body_in_data(const struct http_body *b)
{
	return b->framing == HTTP_BODY_CHUNKED && b->st == CH_DATA && b->left > 0;
}

/* The state a bare LF takes a response's chunked framing to (lf_ends): the
 * one that looks for the LF after the CR it stands for, where a CR may
 * end a line; any other state is left to refuse it. */
static uint8_t
http_chunked_lf(uint8_t st)
{
	switch (st) {
	case CH_SIZE:
	case CH_SIZE_WS:
	case CH_EXT: return CH_SIZE_LF;
	case CH_DATA_CR: return CH_DATA_LF;
	case CH_TRAIL0: return CH_END_LF;
	case CH_TRAIL: return CH_TRAIL_LF;
	default: return st;
	}
}

static enum parse
http_chunked_scan(struct http_body *b, const uint8_t *p, size_t n, size_t *used)
{
	size_t i = 0;

	http_ctype_init();
	while (i < n) {
		uint8_t c = p[i];

		if (c == '\n' && b->lf_ends)
			b->st = http_chunked_lf(b->st);
		switch (b->st) {
		case CH_DATA: {
			uint64_t take = b->left < n - i ? b->left : n - i;
			i += (size_t)take;
			b->left -= take;
			if (b->left == 0)
				b->st = CH_DATA_CR;
			continue;
		}
		case CH_SIZE0:
		case CH_SIZE:
			if (IS(c, C_HEX)) {
				if (++b->digits > 15)
					return PARSE_ERR;
				b->left = b->left * 16 + (uint64_t)(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
				b->st = CH_SIZE;
			} else if (b->st == CH_SIZE0) {
				return PARSE_ERR;
			} else if (c == ';') {
				b->st = CH_EXT;
				b->line = 0;
			} else if (c == ' ' || c == '\t') {
				b->st = CH_SIZE_WS;
				b->line = 1;
			} else if (c == '\r') {
				b->st = CH_SIZE_LF;
			} else {
				return PARSE_ERR;
			}
			break;
		case CH_SIZE_WS:
			/* BWS before CR too: "3 \r\n" from an origin is taken by
			 * nginx and curl (the size is as plain as without it) */
			if (c == ';') {
				b->st = CH_EXT;
				b->line = 0;
			} else if (c == '\r') {
				b->st = CH_SIZE_LF;
			} else if ((c != ' ' && c != '\t') || ++b->line > CH_LINE_MAX) {
				return PARSE_ERR;  /* a run of BWS is bounded as an extension is */
			}
			break;
		case CH_EXT:
			if (c == '\r')
				b->st = CH_SIZE_LF;
			else if (!IS(c, C_VCHAR) || ++b->line > CH_LINE_MAX)
				return PARSE_ERR;
			break;
		case CH_SIZE_LF:
			if (c != '\n')
				return PARSE_ERR;
			b->digits = 0;
			b->st = b->left ? CH_DATA : CH_TRAIL0;
			break;
		case CH_DATA_CR:
			if (c != '\r')
				return PARSE_ERR;
			b->st = CH_DATA_LF;
			break;
		case CH_DATA_LF:
			if (c != '\n')
				return PARSE_ERR;
			b->st = CH_SIZE0;
			break;
		case CH_TRAIL0:
			if (c == '\r') {
				b->st = CH_END_LF;
			} else if (IS(c, C_TCHAR)) {
				b->st = CH_TRAIL;
				b->line = 1;
			} else {
				return PARSE_ERR;  /* obs-fold or garbage */
			}
			break;
		case CH_TRAIL:
			if (c == '\r')
				b->st = CH_TRAIL_LF;
			else if (!IS(c, C_VCHAR) || ++b->line > CH_LINE_MAX)
				return PARSE_ERR;
			break;
		case CH_TRAIL_LF:
			if (c != '\n')
				return PARSE_ERR;
			b->st = CH_TRAIL0;
			break;
		case CH_END_LF:
			if (c != '\n')
				return PARSE_ERR;
			b->st = CH_DONE;
			*used = i + 1;
			return PARSE_OK;
		default:
			*used = i;
			return PARSE_OK;
		}
		i++;
	}
	*used = n;
	return PARSE_MORE;
}

enum parse
http_body_scan(struct http_body *b, const uint8_t *p, size_t n, size_t *used)
{
	switch (b->framing) {
	case HTTP_BODY_LENGTH:
		if (b->left > n) {
			b->left -= n;
			*used = n;
			return PARSE_MORE;
		}
		*used = (size_t)b->left;
		b->left = 0;
		return PARSE_OK;
	case HTTP_BODY_CHUNKED:
		if (b->st == CH_DONE) {
			*used = 0;
			return PARSE_OK;
		}
		return http_chunked_scan(b, p, n, used);
	case HTTP_BODY_CLOSE:
		*used = n;
		return PARSE_MORE;
	default:
		*used = 0;
		return PARSE_OK;
	}
}

const char *
http_status_text(int status)
{
	switch (status) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 403: return "Forbidden";
	case 405: return "Method Not Allowed";
	case 407: return "Proxy Authentication Required";
	case 408: return "Request Timeout";
	case 414: return "URI Too Long";
	case 421: return "Misdirected Request";
	case 431: return "Request Header Fields Too Large";
	case 501: return "Not Implemented";
	case 502: return "Bad Gateway";
	case 504: return "Gateway Timeout";
	case 505: return "HTTP Version Not Supported";
	default: return "Error";
	}
}

/*
 * HTTP/1.x wire format: one strict, bounded parser shared by the forward
 * (http) and reverse proxies. Pure functions, no I/O, no allocation:
 *
 *  - http_parse_request / http_parse_response look at n bytes and answer
 *    PARSE_MORE (no complete head yet, nothing consumed), PARSE_OK (the head
 *    is m->head_len bytes; m points into p) or PARSE_ERR (m->status says
 *    which reply fits: 400, 414, 431, 501, 505; m->why says why; what parsed
 *    before the error stays in m: the start line is parsed before the
 *    header lines, so a request refused for a header still has its method
 *    and target, and hdr[0..nhdr) holds the lines before the bad one; after
 *    a 414, target is the part of it that came).
 *  - http_body_scan walks a body in place (Content-Length, chunked, or up to
 *    the close) and tells where the message ends; chunked framing is checked
 *    byte by byte and passed through unchanged.
 *
 * A line may end with CRLF or a bare LF (RFC 9112 2.2), never a bare CR.
 * A response's obs-fold joins the line before (http_fold in http-parse.c).
 *
 * Refused: obs-fold in requests, bare CR, whitespace before a colon,
 * control bytes, both Content-Length and Transfer-Encoding, differing
 * Content-Length values, a Transfer-Encoding whose last coding is not
 * chunked (requests), chunked twice, Transfer-Encoding in HTTP/1.0, more
 * than one Host, heads over the size or header count limit.
 */
#ifndef CAPD_HTTP_PARSE_H
#define CAPD_HTTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef CAPD_ENUM_PARSE
#define CAPD_ENUM_PARSE
enum parse { PARSE_MORE, PARSE_OK, PARSE_ERR };
#endif

#define HTTP_MAX_HEADERS 128        /* header lines per head */
#define HTTP_HEAD_DEFAULT (64 * 1024)

enum http_framing {
	HTTP_BODY_NONE,     /* no body */
	HTTP_BODY_LENGTH,   /* Content-Length bytes */
	HTTP_BODY_CHUNKED,  /* chunked coding, ends with the last chunk and trailers */
	HTTP_BODY_CLOSE,    /* up to the end of the connection (responses only) */
};

/* One header line; name and value point into the parsed bytes, value without OWS. */
struct http_hdr {
	const char *name, *value;
	uint32_t name_len, value_len;
};

/* A parsed head. Stack- or state-owned by the caller; points into the input. */
struct http_msg {
	const char *method, *target;   /* request */
	uint32_t method_len, target_len;
	int status;                    /* response status; on PARSE_ERR the status to reply */
	const char *reason;            /* response reason phrase */
	uint32_t reason_len;
	int minor;                     /* HTTP/1.minor, 0 or 1 */
	size_t head_len;               /* bytes up to and with the empty line */
	unsigned nhdr;

	enum http_framing framing;
	uint64_t length;               /* HTTP_BODY_LENGTH */
	bool conn_close;               /* Connection: close */
	bool conn_keepalive;           /* Connection: keep-alive */
	bool conn_line;                /* a Connection line came (even an empty one) */
	bool pconn_close;              /* Proxy-Connection: close (not standard; what the */
	bool pconn_keepalive;          /* ... keep-alive; HTTP/1.0 clients of a proxy send) */
	bool conn_upgrade;             /* Connection: upgrade (and an Upgrade header; never in a 1.0 request) */
	bool expect_continue;          /* Expect: 100-continue */
	bool folded;                   /* a response header's value spans an obs-fold (CR, LF, SP/HTAB in it) */
	int host;                      /* index of the Host header, -1 when none */
	const char *why;               /* on PARSE_ERR: static text */
	struct http_hdr hdr[HTTP_MAX_HEADERS];  /* last: a parse clears everything before it */
};

struct http_limits {
	size_t max_head;               /* bytes of a head; 0: HTTP_HEAD_DEFAULT */
	unsigned max_headers;          /* 0: HTTP_MAX_HEADERS */
};

enum parse http_parse_request(const uint8_t *p, size_t n, const struct http_limits *lim, struct http_msg *m);
/* head_request: the request was HEAD (no body whatever the headers say).
 * 1xx, 204 and 304 never have a body. */
enum parse http_parse_response(const uint8_t *p, size_t n, const struct http_limits *lim, bool head_request,
                               struct http_msg *m);

/* The HTTP/2 connection preface (RFC 9113 3.4), which a client that speaks
 * HTTP/2 with prior knowledge sends first, before any frame: PARSE_OK when
 * p starts with it, PARSE_MORE when p is shorter and matches it so far,
 * PARSE_ERR when p does not begin with it. */
#define HTTP_H2_PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
enum parse http_h2_preface(const uint8_t *p, size_t n);

/* The HTTP/1.x request line p starts with (method SP target SP HTTP/1.x,
 * ending in CRLF or a bare LF within p's first 8K) into m's method, target
 * and minor: true; false for anything else (another protocol, a line that
 * did not end within p). Only that line is looked at, not the head. */
bool http_request_line_at(const uint8_t *p, size_t n, struct http_msg *m);
/* Case-insensitive header lookup; the first match or NULL. */
const struct http_hdr *http_header(const struct http_msg *m, const char *name);
/* True when name is hop-by-hop for m: the fixed list or a token of Connection
 * (never Content-Length, Transfer-Encoding or Host: the message's framing and
 * route stay). */
bool http_hop_by_hop(const struct http_msg *m, const char *name, size_t len);
/* ASCII case-insensitive compare of a counted string with a C string. */
bool http_token_eq(const char *p, size_t n, const char *lit);
/* The request's method is exactly name (methods are case-sensitive). */
bool http_method_is(const struct http_msg *m, const char *name);
/* An absolute-form target's scheme: the length of its "http://" or "https://"
 * (*https says which), 0 for any other form (origin, authority, asterisk). */
size_t http_target_scheme(const struct http_msg *m, bool *https);
/* Max-Forwards (RFC 9110 7.6.2): its value, with its line in *h when h is
 * not NULL; -1 when there is none, more than one, or one that is not 1 to
 * 18 digits. */
int64_t http_max_forwards(const struct http_msg *m, const struct http_hdr **h);

/* Where a body stands; init from the head with http_body_init. */
struct http_body {
	enum http_framing framing;
	uint64_t left;                 /* LENGTH: bytes left; CHUNKED: bytes left in this chunk */
	uint8_t st;                    /* chunked state */
	uint8_t digits;                /* hex digits of the chunk size so far */
	uint16_t line;                 /* bytes of the current extension or trailer line */
	bool lf_ends;                  /* a bare LF ends a chunked framing line (responses: as */
	                               /* nginx and curl take it; requests' framing stays strict) */
};

void http_body_init(struct http_body *b, enum http_framing framing, uint64_t length);
/* Looks at the next n body bytes: PARSE_MORE (all n belong to the body, it
 * goes on; *used = n), PARSE_OK (the body ends after *used bytes; 0 for a
 * body that was already complete) or PARSE_ERR (bad chunked framing). */
enum parse http_body_scan(struct http_body *b, const uint8_t *p, size_t n, size_t *used);
/* The body is complete (nothing more to scan). */
bool http_body_done(const struct http_body *b);
/* A chunked body is inside a chunk's data: its next b->left bytes are
 * content, not framing (what a dechunker passes on). */
bool http_body_in_data(const struct http_body *b);

/* The reason phrase of a status capd sends itself. */
const char *http_status_text(int status);

#endif

/* Unit tests for daemon/http-parse.c: request and status lines, headers,
 * limits, framing, smuggling shapes, chunked scanning (issue 5). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "http-parse.h"

static struct http_msg m;

static enum parse
req(const char *s)
{
	return http_parse_request((const uint8_t *)s, strlen(s), NULL, &m);
}

static enum parse
resp(const char *s, bool head)
{
	return http_parse_response((const uint8_t *)s, strlen(s), NULL, head, &m);
}

static void
expect_err(const char *s, int status)
{
	enum parse rv = req(s);
	if (rv != PARSE_ERR || m.status != status)
		fail_msg("request %s: rv %d status %d (%s), expected ERR %d", s, rv, m.status, m.why ? m.why : "", status);
}

static void
test_request_line(void **state)
{
	(void)state;
	assert_int_equal(req("GET http://a.test/x?y HTTP/1.1\r\nHost: a.test\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.method_len, 3);
	assert_memory_equal(m.method, "GET", 3);
	assert_int_equal(m.target_len, 17);
	assert_memory_equal(m.target, "http://a.test/x?y", 17);
	assert_int_equal(m.minor, 1);
	assert_int_equal(m.framing, HTTP_BODY_NONE);
	assert_int_equal(m.head_len, strlen("GET http://a.test/x?y HTTP/1.1\r\nHost: a.test\r\n\r\n"));
	/* HTTP/1.0 needs no Host */
	assert_int_equal(req("GET / HTTP/1.0\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.minor, 0);
	/* one stray empty line before the request is allowed */
	assert_int_equal(req("\r\nGET / HTTP/1.0\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.head_len, 20);
	/* its CR alone (the LF in the next read) is not an error yet */
	assert_int_equal(req("\r"), PARSE_MORE);
	assert_int_equal(req("\r\n\r"), PARSE_MORE);
	expect_err("\r\r", 400);
	assert_int_equal(req("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"), PARSE_OK);
	assert_true(http_method_is(&m, "CONNECT"));
	assert_int_equal(req("connect a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"), PARSE_OK);
	assert_false(http_method_is(&m, "CONNECT"));  /* methods are case-sensitive */

	expect_err("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400);
	expect_err("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400);
	expect_err("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400);
	/* obs-text in the target, as curl sends a URL's UTF-8 */
	assert_int_equal(req("GET /caf\xc3\xa9?\xe9 HTTP/1.1\r\nHost: a\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.target_len, 8);
	expect_err("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
	expect_err("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505);
	/* a higher minor version is 1.1 (RFC 9110 2.5), Host and all */
	assert_int_equal(req("GET / HTTP/1.2\r\nHost: a\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.minor, 1);
	expect_err("GET / HTTP/1.9\r\n\r\n", 400);  /* no Host */
	expect_err("GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\n\r\n", 400);  /* no Host */
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400);
	expect_err("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400);  /* TLS to a plain proxy */
}

static void
test_more(void **state)
{
	const char *full = "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
	size_t head = strlen(full) - 5;

	(void)state;
	for (size_t n = 0; n < head; n++)
		if (http_parse_request((const uint8_t *)full, n, NULL, &m) != PARSE_MORE)
			fail_msg("prefix %zu not MORE: %s", n, m.why);
	assert_int_equal(http_parse_request((const uint8_t *)full, head, NULL, &m), PARSE_OK);
	assert_int_equal(m.head_len, head);
	assert_int_equal(m.framing, HTTP_BODY_LENGTH);
	assert_int_equal(m.length, 5);
}

static void
test_headers(void **state)
{
	const struct http_hdr *h;

	(void)state;
	assert_int_equal(req("GET / HTTP/1.1\r\nHost:a\r\nX-A:  v  w \t\r\nEmpty:\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.nhdr, 3);
	h = http_header(&m, "x-a");
	assert_non_null(h);
	assert_int_equal(h->value_len, 4);
	assert_memory_equal(h->value, "v  w", 4);
	h = http_header(&m, "EMPTY");
	assert_non_null(h);
	assert_int_equal(h->value_len, 0);
	/* obs-text is allowed in values */
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n"), PARSE_OK);

	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n", 400);   /* obs-fold */
	expect_err("GET / HTTP/1.1\r\nHost: a\r\n\tX: 1\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX : 1\r\n\r\n", 400);            /* space before colon */
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01z\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: a\rz\r\n\r\n", 400);          /* bare CR */
	/* a bare LF ends a line (test_bare_lf); a bare CR never does */
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\rz\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fz\r\n\r\n", 400);
}

/* A refused head still says what it asked for, as far as it parsed: the
 * request line comes before the header lines, which fill m->hdr up to the
 * bad one (the proxy names the refused session's target from them). */
static void
test_refused_request_parsed_so_far(void **state)
{
	struct http_limits lim = { .max_head = 1024 };
	char big[2048];

	(void)state;
	expect_err("PUT http://a.test/x HTTP/1.1\r\nHost: h.test\r\nX: 1\r\n folded\r\n\r\n", 400);
	assert_int_equal(m.method_len, 3);
	assert_memory_equal(m.method, "PUT", 3);
	assert_int_equal(m.target_len, 15);
	assert_memory_equal(m.target, "http://a.test/x", 15);
	assert_int_equal(m.nhdr, 2);
	assert_memory_equal(m.hdr[0].value, "h.test", 6);
	expect_err("GET /v HTTP/2.0\r\nHost: a\r\n\r\n", 505);
	assert_int_equal(m.target_len, 2);
	assert_memory_equal(m.target, "/v", 2);
	expect_err("GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400);
	assert_int_equal(m.method_len, 3);
	assert_null(m.target);
	expect_err("\x16\x03\x01\r\n\r\n", 400);
	assert_null(m.method);
	/* too large: the request line still parses when it came whole */
	snprintf(big, sizeof big, "GET http://big.test/ HTTP/1.1\r\nHost: a\r\nX: %01100d\r\n\r\n", 0);
	assert_int_equal(http_parse_request((const uint8_t *)big, strlen(big), &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 431);
	assert_int_equal(m.target_len, 16);
	assert_memory_equal(m.target, "http://big.test/", 16);
	assert_int_equal(http_parse_request((const uint8_t *)big, 1024, &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 431);
	assert_int_equal(m.target_len, 16);
	/* a request line that does not end within the limit: 414, with the target as far as it came */
	snprintf(big, sizeof big, "GET http://big.test/%01100d HTTP/1.1\r\nHost: a\r\n\r\n", 0);
	assert_int_equal(http_parse_request((const uint8_t *)big, strlen(big), &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 414);
	assert_int_equal(m.method_len, 3);
	assert_int_equal(m.target_len, 1024 - 4);
	assert_memory_equal(m.target, "http://big.test/000", 19);
	assert_int_equal(http_parse_request((const uint8_t *)big, 1023, &lim, &m), PARSE_MORE);
	assert_int_equal(http_parse_request((const uint8_t *)big, 1024, &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 414);
}

static void
test_limits(void **state)
{
	struct http_limits lim = { .max_head = 1024, .max_headers = 4 };
	char big[2048];

	(void)state;
	snprintf(big, sizeof big, "GET / HTTP/1.1\r\nHost: a\r\nX: %0900d\r\n\r\n", 0);
	assert_int_equal(http_parse_request((const uint8_t *)big, strlen(big), &lim, &m), PARSE_OK);
	snprintf(big, sizeof big, "GET / HTTP/1.1\r\nHost: a\r\nX: %01100d\r\n\r\n", 0);
	assert_int_equal(http_parse_request((const uint8_t *)big, strlen(big), &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 431);
	/* an unfinished head at the limit can never fit */
	assert_int_equal(http_parse_request((const uint8_t *)big, 1024, &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 431);
	assert_int_equal(http_parse_request((const uint8_t *)big, 1023, &lim, &m), PARSE_MORE);
	const char *many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
	assert_int_equal(http_parse_request((const uint8_t *)many, strlen(many), &lim, &m), PARSE_ERR);
	assert_int_equal(m.status, 431);
	lim.max_headers = 5;
	assert_int_equal(http_parse_request((const uint8_t *)many, strlen(many), &lim, &m), PARSE_OK);
}

static void
test_framing(void **state)
{
	(void)state;
	assert_int_equal(req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_LENGTH);
	assert_int_equal(m.length, 12);
	/* the same value twice, or as a list, is one value */
	assert_int_equal(req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.length, 7);
	assert_int_equal(req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 7\r\n\r\n"), PARSE_OK);
	assert_int_equal(req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_CHUNKED);
	assert_int_equal(req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_CHUNKED);

	/* smuggling shapes */
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 7, 8\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n", 400);
	expect_err("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400);
	expect_err("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400);
}

/* Max-Forwards (RFC 9110 7.6.2): a number, or -1 for what is not one. */
static void
test_max_forwards(void **state)
{
	static const struct {
		const char *value;
		int64_t hops;
	} cases[] = {
		{ "0", 0 }, { "5", 5 }, { "007", 7 }, { "999999999999999999", 999999999999999999 },
		{ "9999999999999999999", -1 }, { "", -1 }, { "-1", -1 }, { "1x", -1 }, { "1, 2", -1 },
	};
	const struct http_hdr *h = NULL;
	char r[128];

	(void)state;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		snprintf(r, sizeof r, "TRACE / HTTP/1.1\r\nHost: a\r\nMax-Forwards:  %s \r\n\r\n", cases[i].value);
		assert_int_equal(req(r), PARSE_OK);
		if (http_max_forwards(&m, NULL) != cases[i].hops)
			fail_msg("Max-Forwards '%s': %lld", cases[i].value, (long long)http_max_forwards(&m, NULL));
	}
	assert_int_equal(req("OPTIONS * HTTP/1.1\r\nHost: a\r\nmax-forwards: 3\r\n\r\n"), PARSE_OK);
	assert_int_equal(http_max_forwards(&m, &h), 3);
	assert_ptr_equal(h, &m.hdr[1]);
	assert_int_equal(req("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), PARSE_OK);
	assert_int_equal(http_max_forwards(&m, NULL), -1);
	/* two lines: which one counts is not ours to pick */
	assert_int_equal(req("OPTIONS * HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\nMax-Forwards: 0\r\n\r\n"), PARSE_OK);
	assert_int_equal(http_max_forwards(&m, NULL), -1);
}

static void
test_connection(void **state)
{
	(void)state;
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, X-Secret\r\nX-Secret: 1\r\n"
	                     "Proxy-Connection: keep-alive\r\nTE: trailers\r\nX-Kept: 2\r\n\r\n"),
	                 PARSE_OK);
	assert_true(m.conn_keepalive);
	assert_false(m.conn_close);
	assert_true(m.conn_line);
	assert_true(m.pconn_keepalive);
	assert_false(m.pconn_close);
	assert_true(http_hop_by_hop(&m, "X-Secret", 8));
	assert_true(http_hop_by_hop(&m, "connection", 10));
	assert_true(http_hop_by_hop(&m, "Proxy-Connection", 16));
	assert_true(http_hop_by_hop(&m, "Proxy-Authorization", 19));
	assert_true(http_hop_by_hop(&m, "TE", 2));
	assert_true(http_hop_by_hop(&m, "Keep-Alive", 10));
	assert_false(http_hop_by_hop(&m, "X-Kept", 6));
	assert_false(http_hop_by_hop(&m, "Host", 4));
	/* Trailer names the trailer fields for the recipient: end-to-end (RFC 9110 6.6.2) */
	assert_false(http_hop_by_hop(&m, "Trailer", 7));
	/* Connection naming the framing or Host does not take them away (smuggling) */
	assert_int_equal(req("POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Transfer-Encoding, Host\r\n"
	                     "Content-Length: 3\r\n\r\n"),
	                 PARSE_OK);
	assert_false(http_hop_by_hop(&m, "Content-Length", 14));
	assert_false(http_hop_by_hop(&m, "transfer-encoding", 17));
	assert_false(http_hop_by_hop(&m, "Host", 4));
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"), PARSE_OK);
	assert_true(m.conn_close);
	/* Proxy-Connection (curl --http1.0, wget) is told apart from Connection */
	assert_int_equal(req("GET http://a/ HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"), PARSE_OK);
	assert_true(m.pconn_keepalive);
	assert_false(m.conn_keepalive);
	assert_false(m.conn_line);
	assert_int_equal(req("GET http://a/ HTTP/1.1\r\nHost: a\r\nProxy-Connection: x, close\r\nConnection:\r\n\r\n"),
	                 PARSE_OK);
	assert_true(m.pconn_close);
	assert_false(m.pconn_keepalive);
	assert_false(m.conn_close);
	assert_true(m.conn_line);
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"), PARSE_OK);
	assert_true(m.conn_upgrade);
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n\r\n"), PARSE_OK);
	assert_false(m.conn_upgrade);  /* no Upgrade header: nothing to upgrade to */
	assert_int_equal(req("GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"), PARSE_OK);
	assert_false(m.conn_upgrade);  /* ignored in an HTTP/1.0 request (RFC 9110 7.8) */
	assert_int_equal(req("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"), PARSE_OK);
	assert_true(m.expect_continue);
	/* nothing of one parse leaks into the next (the same struct is reused) */
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\nContent-Length: 3\r\n\r\n"),
	                 PARSE_OK);
	assert_int_equal(resp("HTTP/1.0 200 OK\r\n\r\n", false), PARSE_OK);
	assert_false(m.conn_keepalive);
	assert_false(m.conn_close);
	assert_false(m.conn_line);
	assert_false(m.pconn_keepalive);
	assert_false(m.expect_continue);
	assert_int_equal(m.length, 0);
	assert_int_equal(m.host, -1);
}

static void
test_response(void **state)
{
	(void)state;
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false), PARSE_OK);
	assert_int_equal(m.status, 200);
	assert_int_equal(m.reason_len, 2);
	assert_int_equal(m.framing, HTTP_BODY_LENGTH);
	assert_int_equal(m.head_len, 38);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_NONE);  /* HEAD */
	assert_int_equal(resp("HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", false), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_NONE);
	assert_int_equal(resp("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", false), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_NONE);
	assert_int_equal(resp("HTTP/1.1 100 Continue\r\n\r\n", false), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_NONE);
	assert_int_equal(resp("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", false),
	                 PARSE_OK);
	assert_int_equal(m.status, 101);
	assert_int_equal(resp("HTTP/1.0 200 OK\r\n\r\n", false), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_CLOSE);
	assert_int_equal(resp("HTTP/1.1 200\r\nTransfer-Encoding: chunked\r\n\r\n", false), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_CHUNKED);
	assert_int_equal(m.reason_len, 0);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_CLOSE);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", false), PARSE_MORE);

	assert_int_equal(resp("HTTP/1.1 20 OK\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 2000 OK\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 099 OK\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("ICY 200 OK\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", false),
	                 PARSE_ERR);
	assert_int_equal(m.status, 502);
	/* a response's obs-fold is joined (test_response_fold) */
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n", false), PARSE_OK);
	assert_true(m.folded);
}

/* Scans body bytes split at every position; returns where the body ended or -1. */
static long
scan_split(enum http_framing f, uint64_t len, const char *s, size_t n, size_t cut)
{
	struct http_body b;
	size_t used = 0, off = 0;
	enum parse rv;

	http_body_init(&b, f, len);
	rv = http_body_scan(&b, (const uint8_t *)s, cut, &used);
	if (rv == PARSE_ERR)
		return -1;
	if (rv == PARSE_OK)
		return (long)used;
	off = used;
	rv = http_body_scan(&b, (const uint8_t *)s + off, n - off, &used);
	if (rv == PARSE_ERR)
		return -1;
	if (rv == PARSE_MORE)
		return -2;
	return (long)(off + used);
}

static void
test_chunked(void **state)
{
	const char *ok[] = {
		"0\r\n\r\n",
		"5\r\nhello\r\n0\r\n\r\n",
		"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\n\r\n",
		"5 ;ext\r\nhello\r\n0\r\n\r\n",
		"1\r\nx\r\n0\r\nTrailer: yes\r\nX: 2\r\n\r\n",
		"000000000000005\r\nhello\r\n0\r\n\r\n",
		"5 \r\nhello\r\n0\t\r\n\r\n",  /* BWS before CR */
	};
	const char *bad[] = {
		"x\r\n",
		"5\nhello\r\n0\r\n\r\n",
		"5\r\nhelloX\r\n",
		"5\r\nhello\n0\r\n\r\n",
		"-5\r\n",
		"0000000000000005\r\n",        /* 16 digits */
		"5 \nhello\r\n0\r\n\r\n",
		"5 5\r\n",
		"5\r\nhello\r\n0\r\n folded: trailer\r\n\r\n",
		"5\r\nhello\r\n0\r\n\n",
		";\r\n",
	};
	char tail[64];

	(void)state;
	for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
		size_t n = strlen(ok[i]);
		/* with a next request behind it: the body must end exactly */
		snprintf(tail, sizeof tail, "%sGET", ok[i]);
		for (size_t cut = 0; cut <= n; cut++) {
			long end = scan_split(HTTP_BODY_CHUNKED, 0, tail, n + 3, cut);
			if (end != (long)n)
				fail_msg("chunked %zu cut %zu: end %ld, expected %zu", i, cut, end, n);
		}
	}
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		size_t n = strlen(bad[i]);
		if (scan_split(HTTP_BODY_CHUNKED, 0, bad[i], n, n) != -1)
			fail_msg("bad chunked %zu accepted", i);
	}
}

static void
test_length(void **state)
{
	struct http_body b;
	size_t used;

	(void)state;
	assert_int_equal(scan_split(HTTP_BODY_LENGTH, 5, "helloGET", 8, 2), 5);
	assert_int_equal(scan_split(HTTP_BODY_LENGTH, 5, "hel", 3, 3), -2);
	http_body_init(&b, HTTP_BODY_LENGTH, 0);
	assert_true(http_body_done(&b));
	assert_int_equal(http_body_scan(&b, (const uint8_t *)"x", 1, &used), PARSE_OK);
	assert_int_equal(used, 0);
	http_body_init(&b, HTTP_BODY_CLOSE, 0);
	assert_int_equal(http_body_scan(&b, (const uint8_t *)"xyz", 3, &used), PARSE_MORE);
	assert_int_equal(used, 3);
	assert_false(http_body_done(&b));
	http_body_init(&b, HTTP_BODY_NONE, 0);
	assert_true(http_body_done(&b));
}

/* A bare LF ends a whole line, in requests and responses (RFC 9112 2.2, as
 * nginx, squid and curl take it); a bare CR anywhere is still refused, and
 * never becomes part of a value. */
static void
test_bare_lf(void **state)
{
	const struct http_hdr *h;
	const char *r = "HTTP/1.1 200 OK\nContent-Length: 3\nX-A: v\n\nabc";
	const char *q = "GET / HTTP/1.1\nHost: a\r\nX: b\n\n";

	(void)state;
	assert_int_equal(resp(r, false), PARSE_OK);
	assert_int_equal(m.status, 200);
	assert_int_equal(m.reason_len, 2);
	assert_int_equal(m.head_len, strlen(r) - 3);
	assert_int_equal(m.framing, HTTP_BODY_LENGTH);
	assert_int_equal(m.length, 3);
	h = http_header(&m, "x-a");
	assert_non_null(h);
	assert_int_equal(h->value_len, 1);
	assert_int_equal(resp("HTTP/1.0 200\n\n", false), PARSE_OK);
	assert_int_equal(m.reason_len, 0);
	assert_int_equal(m.head_len, 14);
	/* "\r\n\n" and "\n\r\n" end a head as "\r\n\r\n" does */
	assert_int_equal(resp("HTTP/1.1 204 No Content\r\nX: 1\r\n\n", false), PARSE_OK);
	assert_int_equal(m.nhdr, 1);
	assert_int_equal(resp("HTTP/1.1 204 No Content\nX: 1\n\r\nrest", false), PARSE_OK);
	assert_int_equal(m.head_len, 31);
	assert_int_equal(resp("HTTP/1.1 200 OK\nX: 1\n", false), PARSE_MORE);
	assert_int_equal(resp("HTTP/1.1 200 OK\nX: a\rb\n\n", false), PARSE_ERR);

	assert_int_equal(req(q), PARSE_OK);
	assert_int_equal(m.head_len, strlen(q));
	assert_int_equal(m.nhdr, 2);
	assert_int_equal(m.target_len, 1);
	h = http_header(&m, "x");
	assert_non_null(h);
	assert_int_equal(h->value_len, 1);
	assert_memory_equal(h->value, "b", 1);
	/* a stray LF before the request line, as a stray CRLF */
	assert_int_equal(req("\nGET / HTTP/1.0\n\n"), PARSE_OK);
	assert_int_equal(m.method_len, 3);
	/* a value cannot hide a line end: a bare LF is one, a bare CR is refused */
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nX: 1\nContent-Length: 2\r\n\r\nab"), PARSE_OK);
	assert_int_equal(m.framing, HTTP_BODY_LENGTH);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: 1\rContent-Length: 2\r\n\r\n", 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\nX: 1\n Content-Length: 2\r\n\r\n", 400);  /* obs-fold */
}

/* A response's obs-fold is joined to the line before, its value spanning
 * the fold (the proxy writes it out as one SP); not in Content-Length or
 * Transfer-Encoding, nor in requests, nor before the first header. */
static void
test_response_fold(void **state)
{
	const struct http_hdr *h;

	(void)state;
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nX-A: one\r\n\t two \r\n   three\r\nY: 2\r\n\r\n", false),
	                 PARSE_OK);
	assert_true(m.folded);
	assert_int_equal(m.nhdr, 2);
	h = http_header(&m, "x-a");
	assert_non_null(h);
	assert_int_equal(h->value_len, strlen("one\r\n\t two \r\n   three"));
	assert_memory_equal(h->value, "one\r\n\t two \r\n   three", h->value_len);
	assert_int_equal(resp("HTTP/1.1 200 OK\nX-A:\n two\n\n", false), PARSE_OK);
	h = http_header(&m, "x-a");
	assert_int_equal(h->value_len, 3);
	assert_memory_equal(h->value, "two", 3);
	/* a folded Connection still lists its tokens */
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nConnection: keep-alive,\r\n close\r\nContent-Length: 0\r\n\r\n",
	                      false), PARSE_OK);
	assert_true(m.conn_close);
	assert_true(m.conn_keepalive);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nX: 1\r\n\r\n", false), PARSE_OK);
	assert_false(m.folded);

	assert_int_equal(resp("HTTP/1.1 200 OK\r\n folded\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nX: 1\r\n a\x01b\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nContent-Length:\r\n 5\r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n \r\n\r\n", false), PARSE_ERR);
	assert_int_equal(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,\r\n chunked\r\n\r\n", false),
	                 PARSE_ERR);
}

/* A request line that came whole and can never be one is refused at once,
 * not after the rest of a head that will never come: HTTP/0.9's "GET /". */
static void
test_request_line_early(void **state)
{
	static const char nul[] = "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n";

	(void)state;
	expect_err("GET /\r\n", 400);
	assert_non_null(strstr(m.why, "0.9"));
	expect_err("GET /\n", 400);
	expect_err("GET / HTTP/1.1 x\r\n", 400);
	expect_err("GET / HTTP/2.0\r\n", 505);
	expect_err("GET / HTTP/1.1\rX\n", 400);
	assert_int_equal(req("GET / HTTP/1.1\r\n"), PARSE_MORE);
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\n"), PARSE_MORE);
	assert_int_equal(req("GET /"), PARSE_MORE);
	/* so is a header line that came whole: a NUL, a fold, a bad name */
	assert_int_equal(http_parse_request((const uint8_t *)nul, sizeof nul - 1, NULL, &m), PARSE_ERR);
	assert_int_equal(m.status, 400);
	expect_err("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n", 400);
	expect_err("GET / HTTP/1.1\nX : 1\n", 400);
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01"), PARSE_MORE);  /* not whole yet */
	assert_int_equal(req("GET / HTTP/1.1\r\nHost: a\r\nX: 1\r"), PARSE_MORE);
	assert_int_equal(m.nhdr, 0);
	assert_null(m.method);
}

/* A response's chunked framing may end its lines with a bare LF (lf_ends),
 * as nginx and curl take it: sizes, extensions, data ends, trailers and the
 * last line; without lf_ends (requests) the same bytes are refused. */
static void
test_chunked_bare_lf(void **state)
{
	const char *ok[] = {
		"5\nhello\n0\n\n",
		"5;ext\nhello\r\n0 \nX: 1\n\r\n",
		"5\r\nhello\n0\r\nX: 1\r\n\n",
	};
	const char *bad[] = {
		"5\nhello\r\r\n",
		"\n5\nhello\n0\n\n",
		"5\nhello\n0\n X: 1\n\n",
		"5\nhelloX\n",
	};
	char tail[64];

	(void)state;
	for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
		size_t n = strlen(ok[i]), used = 0;
		struct http_body b;

		snprintf(tail, sizeof tail, "%sGET", ok[i]);
		for (size_t cut = 0; cut <= n; cut++) {
			size_t off;
			enum parse rv;

			http_body_init(&b, HTTP_BODY_CHUNKED, 0);
			b.lf_ends = true;
			rv = http_body_scan(&b, (const uint8_t *)tail, cut, &used);
			off = used;
			if (rv == PARSE_MORE)
				rv = http_body_scan(&b, (const uint8_t *)tail + off, n + 3 - off, &used), off += used;
			if (rv != PARSE_OK || off != n)
				fail_msg("lf chunked %zu cut %zu: rv %d end %zu, expected %zu", i, cut, rv, off, n);
		}
		if (scan_split(HTTP_BODY_CHUNKED, 0, ok[i], n, n) != -1)
			fail_msg("lf chunked %zu taken without lf_ends", i);
	}
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		size_t used = 0;
		struct http_body b;

		http_body_init(&b, HTTP_BODY_CHUNKED, 0);
		b.lf_ends = true;
		if (http_body_scan(&b, (const uint8_t *)bad[i], strlen(bad[i]), &used) != PARSE_ERR)
			fail_msg("bad lf chunked %zu accepted", i);
	}
}

/* The HTTP/2 preface of a prior-knowledge client is told from HTTP/1 at
 * its first bytes: whole (with frames after it), a prefix of it (the rest
 * may come in a later read), or not it. */
static void
test_h2_preface(void **state)
{
	static const char pre[] = HTTP_H2_PREFACE "\0\0\0\x04\0\0\0\0\0";
	const uint8_t *p = (const uint8_t *)pre;

	(void)state;
	assert_int_equal(http_h2_preface(p, 24), PARSE_OK);
	assert_int_equal(http_h2_preface(p, sizeof pre - 1), PARSE_OK);
	assert_int_equal(http_h2_preface(p, 0), PARSE_MORE);
	assert_int_equal(http_h2_preface(p, 1), PARSE_MORE);
	assert_int_equal(http_h2_preface(p, 18), PARSE_MORE);  /* "PRI * HTTP/2.0\r\n\r\n": a whole HTTP/1 head */
	assert_int_equal(http_h2_preface(p, 23), PARSE_MORE);
	assert_int_equal(http_h2_preface((const uint8_t *)"PUT / HTTP/1.1\r\n", 16), PARSE_ERR);
	assert_int_equal(http_h2_preface((const uint8_t *)"PRI * HTTP/1.1\r\n", 16), PARSE_ERR);
	assert_int_equal(http_h2_preface((const uint8_t *)"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", 24), PARSE_ERR);
}

/* The first line of an intercepted tunnel's plaintext: an HTTP/1.x request
 * line alone, whatever follows it (no head needed); anything else is not. */
static void
test_request_line_at(void **state)
{
	static const char *no[] = {
		"", "GET / HTTP/1.1", "a001 NOOP\r\n", "GET /\r\n", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"GET / HTTP/2.0\r\n", "GET  / HTTP/1.1\r\n", "GET / HTTP/1.1\rx\n", "\r\nGET / HTTP/1.1\r\n",
		"\x16\x03\x01\x02\x00\x01", "SSH-2.0-OpenSSH_9.2\r\n",
	};
	const char *ok = "GET /a?b=c HTTP/1.1\r\nHost: x\r\n";

	(void)state;
	assert_true(http_request_line_at((const uint8_t *)ok, strlen(ok), &m));
	assert_int_equal(m.method_len, 3);
	assert_memory_equal(m.method, "GET", 3);
	assert_int_equal(m.target_len, 6);
	assert_memory_equal(m.target, "/a?b=c", 6);
	assert_true(http_request_line_at((const uint8_t *)"OPTIONS * HTTP/1.0\n", 19, &m));
	assert_int_equal(m.minor, 0);
	for (size_t i = 0; i < sizeof no / sizeof no[0]; i++)
		if (http_request_line_at((const uint8_t *)no[i], strlen(no[i]), &m))
			fail_msg("taken for a request line: %zu", i);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_request_line),
		cmocka_unit_test(test_more),
		cmocka_unit_test(test_headers),
		cmocka_unit_test(test_refused_request_parsed_so_far),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_framing),
		cmocka_unit_test(test_max_forwards),
		cmocka_unit_test(test_connection),
		cmocka_unit_test(test_response),
		cmocka_unit_test(test_chunked),
		cmocka_unit_test(test_length),
		cmocka_unit_test(test_bare_lf),
		cmocka_unit_test(test_response_fold),
		cmocka_unit_test(test_request_line_early),
		cmocka_unit_test(test_chunked_bare_lf),
		cmocka_unit_test(test_h2_preface),
		cmocka_unit_test(test_request_line_at),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Fuzzes the HTTP/1.x parser as the http and reverse proxies use it: the
 * request head (growing byte by byte up to the whole input, as reads arrive),
 * the response head, and the body framing after each head, split in two and
 * byte by byte (both must find the same end); the request line alone, the
 * HTTP/2 preface and the target's scheme, as the proxies look at them. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "http-parse.h"

static struct http_msg m;

/* Every header a parsed head holds lies inside it (a folded value spans
 * lines, never past the head's end). */
static void
fuzz_inside(const struct http_msg *msg, const uint8_t *p)
{
	const char *lo = (const char *)p, *hi = lo + msg->head_len;

	for (unsigned i = 0; i < msg->nhdr; i++) {
		const struct http_hdr *h = &msg->hdr[i];
		if (h->name < lo || h->name + h->name_len > hi || h->value < lo || h->value + h->value_len > hi)
			__builtin_trap();
		/* a line end inside a value only where a response's fold joined it */
		if (!msg->folded && (memchr(h->value, '\n', h->value_len) || memchr(h->value, '\r', h->value_len)))
			__builtin_trap();
	}
}

static void
fuzz_body(const struct http_msg *msg, const uint8_t *p, size_t n, bool lf_ends)
{
	struct http_body b;
	size_t used = 0, half = n / 2, total = 0;
	enum parse rv;

	http_body_init(&b, msg->framing, msg->length);
	b.lf_ends = lf_ends;  /* a response's, as the proxy scans it */
	rv = http_body_scan(&b, p, half, &used);
	if (used > half)
		__builtin_trap();
	total = used;
	if (rv == PARSE_MORE) {
		rv = http_body_scan(&b, p + half, n - half, &used);
		if (used > n - half)
			__builtin_trap();
		total += used;
	}
	if (rv == PARSE_OK && !http_body_done(&b))
		__builtin_trap();
	/* as reads of one byte arrive: the same verdict at the same place */
	{
		struct http_body one;
		size_t at = 0, u = 0;
		enum parse rv1 = PARSE_MORE;

		http_body_init(&one, msg->framing, msg->length);
		one.lf_ends = lf_ends;
		do {
			bool content = http_body_in_data(&one);  /* the next byte is data, never framing */
			rv1 = http_body_scan(&one, p + at, at < n ? 1 : 0, &u);
			if (content && at < n && (rv1 != PARSE_MORE || u != 1))
				__builtin_trap();
			at += u;
		} while (rv1 == PARSE_MORE && at < n);
		if (rv1 != rv || (rv == PARSE_OK && at != total))
			__builtin_trap();
	}
}

/* The request line on its own (http-proxy.c's early look) and the preface. */
static void
fuzz_line(const uint8_t *p, size_t n)
{
	static struct http_msg l;
	static const char preface[] = HTTP_H2_PREFACE;
	size_t plen = sizeof preface - 1;
	enum parse pv = http_h2_preface(p, n);
	bool https;

	if ((pv == PARSE_OK) != (n >= plen && memcmp(p, preface, plen) == 0))
		__builtin_trap();
	if (http_request_line_at(p, n, &l)) {
		const char *lo = (const char *)p, *hi = lo + n;
		if (l.method < lo || l.method + l.method_len > hi || l.target < lo || l.target + l.target_len > hi)
			__builtin_trap();
		if (http_target_scheme(&l, &https) > l.target_len)
			__builtin_trap();
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct http_limits lim = { .max_head = 4096, .max_headers = 32 };
	enum parse rv = PARSE_MORE;
	size_t n;

	/* the first byte picks a split point for incremental parsing */
	n = size > 0 ? (size_t)data[0] * size / 256 : 0;
	if (http_parse_request(data, n, &lim, &m) == PARSE_OK && m.head_len > n)
		__builtin_trap();
	rv = http_parse_request(data, size, &lim, &m);
	if (rv == PARSE_OK) {
		if (m.head_len > size || m.folded)
			__builtin_trap();
		fuzz_inside(&m, data);
		for (unsigned i = 0; i < m.nhdr; i++)
			(void)http_hop_by_hop(&m, m.hdr[i].name, m.hdr[i].name_len);
		(void)http_max_forwards(&m, NULL);
		(void)http_header(&m, "host");
		(void)http_method_is(&m, "CONNECT");
		{
			bool https;
			if (http_target_scheme(&m, &https) > m.target_len)
				__builtin_trap();
		}
		fuzz_body(&m, data + m.head_len, size - m.head_len, false);
	}
	/* a refused request keeps what parsed of it, all inside the input */
	if (rv == PARSE_ERR && m.target &&
	    (m.method == NULL || m.target < (const char *)data || m.target + m.target_len > (const char *)data + size))
		__builtin_trap();
	rv = http_parse_response(data, size, &lim, size > 0 && (data[0] & 1), &m);
	if (rv == PARSE_OK) {
		if (m.head_len > size)
			__builtin_trap();
		fuzz_inside(&m, data);
		fuzz_body(&m, data + m.head_len, size - m.head_len, true);
	}
	fuzz_line(data, size);
	/* bodies on their own */
	struct http_msg chunked = { .framing = HTTP_BODY_CHUNKED };
	fuzz_body(&chunked, data, size, false);
	fuzz_body(&chunked, data, size, true);
	return 0;
}

/*
 * Fuzzes the SOCKS handshake parsers as proto-socks.c drives them: the first
 * byte picks SOCKS4 or SOCKS5, the input is fed in two pieces (every parser
 * must answer MORE without consuming on a prefix), then greeting, auth and
 * request are parsed in sequence; the UDP header parser gets the whole input,
 * and an address it reads must come back the same through the header the
 * relay writes for replies.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "socks-parse.h"

static void
fuzz_check(enum parse rv, size_t used, size_t n)
{
	if (rv == PARSE_OK && (used == 0 || used > n))
		abort();
}

/* Runs the handshake state machine over p[0..n); returns bytes consumed. */
static size_t
fuzz_run(const uint8_t *p, size_t n)
{
	struct socks_greeting g;
	struct socks_auth a;
	struct socks_req r;
	size_t off = 0, used = 0;
	enum parse rv;

	if (n == 0)
		return 0;
	if (p[0] == 4) {
		rv = socks_parse_v4(p, n, &used, &r);
		fuzz_check(rv, used, n);
		if (rv == PARSE_OK && (strlen(r.host) > SOCKS_NAME_MAX || strlen(r.user) > SOCKS_NAME_MAX))
			abort();
		return rv == PARSE_OK ? used : 0;
	}
	rv = socks_parse_greeting(p, n, &used, &g);
	fuzz_check(rv, used, n);
	if (rv != PARSE_OK)
		return 0;
	off += used;
	if (g.userpass && off < n && p[off] == 1) {
		rv = socks_parse_auth(p + off, n - off, &used, &a);
		fuzz_check(rv, used, n - off);
		if (rv != PARSE_OK)
			return off;
		off += used;
	}
	rv = socks_parse_request(p + off, n - off, &used, &r);
	fuzz_check(rv, used, n - off);
	if (rv == PARSE_ERR && r.why == NULL)
		abort();
	if (rv == PARSE_OK) {
		uint8_t out[SOCKS5_REPLY_MAX];
		if (socks_reply5(out, 0, (struct sockaddr *)&r.addr) > sizeof out)
			abort();
		off += used;
	}
	return off;
}

/* A UDP header's address, written back as the relay writes a reply's and read again. */
static void
fuzz_udp_back(const struct socks_req *r)
{
	uint8_t hdr[SOCKS_UDP_HDR_MAX];
	struct socks_req back;
	size_t len, used = 0;

	if (r->addr.ss_family != AF_INET && r->addr.ss_family != AF_INET6)
		return;  /* a name: the relay resolves it first */
	len = socks_udp_header(hdr, (const struct sockaddr *)&r->addr);
	if (len > sizeof hdr || len != socks_udp_header_len((const struct sockaddr *)&r->addr))
		abort();
	if (socks_parse_udp(hdr, len, &used, &back) != PARSE_OK || used != len || back.port != r->port ||
	    strcmp(back.host, r->host) != 0 || back.frag != 0)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct socks_req r;
	size_t used = 0, whole, half;

	whole = fuzz_run(data, size);
	/* a prefix never consumes more than the whole does */
	half = fuzz_run(data, size / 2);
	if (half > whole)
		abort();
	if (socks_parse_udp(data, size, &used, &r) == PARSE_OK) {
		if (used > size)
			abort();
		fuzz_udp_back(&r);
	}
	return 0;
}

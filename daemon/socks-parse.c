/*
 * SOCKS wire formats; see socks-parse.h. Pure functions over byte arrays,
 * shared by proto-socks.c, the UDP relay, the unit tests and the fuzzer.
 */
#include "socks-parse.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

static enum parse
socks_fail(struct socks_req *r, uint8_t rep, const char *why)
{
	r->rep = rep;
	r->why = why;
	return PARSE_ERR;
}

/* A name as a resolver will see it: printable ASCII, no spaces, not empty. */
static bool
socks_name_ok(const uint8_t *p, size_t n)
{
	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++)
		if (p[i] <= 0x20 || p[i] >= 0x7f)
			return false;
	return true;
}

/*
 * A name that is an IPv6 address in brackets, "[::1]", as clients that pass
 * a URL's host on as typed send it (java.net.URL.getHost() keeps them): no
 * resolver knows such a name, and asking one only leaks it. It is read as
 * the address, and r->port must be set already. False for any other name.
 */
static bool
socks_name_v6(const uint8_t *p, size_t n, struct socks_req *r)
{
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&r->addr;
	char lit[INET6_ADDRSTRLEN];
	struct in6_addr a;

	if (n < 4 || n - 2 >= sizeof lit || p[0] != '[' || p[n - 1] != ']')
		return false;
	memcpy(lit, p + 1, n - 2);
	lit[n - 2] = '\0';
	if (inet_pton(AF_INET6, lit, &a) != 1)
		return false;
	memset(&r->addr, 0, sizeof r->addr);
	sin6->sin6_family = AF_INET6;
	sin6->sin6_addr = a;
	sin6->sin6_port = htons(r->port);
	r->atyp = SOCKS_ATYP_IPV6;
	inet_ntop(AF_INET6, &sin6->sin6_addr, r->host, sizeof r->host);
	return true;
}

/* Brackets belong to no host name: a name with them that is no IPv6
 * address would go to the resolver for nothing. */
static bool
socks_name_bracketed(const uint8_t *p, size_t n)
{
	return memchr(p, '[', n) != NULL || memchr(p, ']', n) != NULL;
}

enum parse
socks_parse_greeting(const uint8_t *p, size_t n, size_t *used, struct socks_greeting *g)
{
	if (n < 2)
		return n >= 1 && p[0] != 5 ? PARSE_ERR : PARSE_MORE;
	if (p[0] != 5 || p[1] == 0)
		return PARSE_ERR;
	if (n < 2 + (size_t)p[1])
		return PARSE_MORE;
	g->none = g->userpass = false;
	for (size_t i = 0; i < p[1]; i++) {
		if (p[2 + i] == SOCKS_METHOD_NONE)
			g->none = true;
		else if (p[2 + i] == SOCKS_METHOD_USERPASS)
			g->userpass = true;
	}
	*used = 2 + (size_t)p[1];
	return PARSE_OK;
}

enum parse
socks_parse_auth(const uint8_t *p, size_t n, size_t *used, struct socks_auth *a)
{
	size_t ulen, plen;

	if (n >= 1 && p[0] != 1)
		return PARSE_ERR;
	if (n < 2)
		return PARSE_MORE;
	ulen = p[1];
	if (n < 2 + ulen + 1)
		return PARSE_MORE;
	plen = p[2 + ulen];
	if (n < 3 + ulen + plen)
		return PARSE_MORE;
	if (memchr(p + 2, 0, ulen) || memchr(p + 3 + ulen, 0, plen))
		return PARSE_ERR;
	memcpy(a->user, p + 2, ulen);
	a->user[ulen] = '\0';
	memcpy(a->pass, p + 3 + ulen, plen);
	a->pass[plen] = '\0';
	*used = 3 + ulen + plen;
	return PARSE_OK;
}

/* ATYP DST.ADDR DST.PORT at p; *alen gets its length. */
static enum parse
socks_parse_addr(const uint8_t *p, size_t n, size_t *alen, struct socks_req *r)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)&r->addr;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&r->addr;
	size_t len;

	if (n < 1)
		return PARSE_MORE;
	r->atyp = p[0];
	memset(&r->addr, 0, sizeof r->addr);
	switch (p[0]) {
	case SOCKS_ATYP_IPV4:
		if (n < (len = 1 + 4 + 2))
			return PARSE_MORE;
		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, p + 1, 4);
		memcpy(&sin->sin_port, p + 5, 2);
		inet_ntop(AF_INET, &sin->sin_addr, r->host, sizeof r->host);
		break;
	case SOCKS_ATYP_IPV6:
		if (n < (len = 1 + 16 + 2))
			return PARSE_MORE;
		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, p + 1, 16);
		memcpy(&sin6->sin6_port, p + 17, 2);
		inet_ntop(AF_INET6, &sin6->sin6_addr, r->host, sizeof r->host);
		break;
	case SOCKS_ATYP_NAME:
		if (n < 2 || n < (len = 2 + (size_t)p[1] + 2))
			return PARSE_MORE;
		if (!socks_name_ok(p + 2, p[1]))
			return socks_fail(r, SOCKS_REP_HOST_UNREACH, "bad host name");
		memcpy(r->host, p + 2, p[1]);
		r->host[p[1]] = '\0';
		break;
	default:
		return socks_fail(r, SOCKS_REP_ATYP, "address type not supported");
	}
	r->port = (uint16_t)(p[len - 2] << 8 | p[len - 1]);
	if (r->atyp == SOCKS_ATYP_NAME && !socks_name_v6(p + 2, p[1], r) && socks_name_bracketed(p + 2, p[1]))
		return socks_fail(r, SOCKS_REP_HOST_UNREACH, "bad host name");
	*alen = len;
	return PARSE_OK;
}

enum parse
socks_parse_request(const uint8_t *p, size_t n, size_t *used, struct socks_req *r)
{
	size_t alen;
	enum parse rv;

	r->rep = 0;
	r->why = NULL;
	r->user[0] = '\0';
	r->v4a = false;
	if (n >= 1 && p[0] != 5)
		return socks_fail(r, SOCKS_REP_FAIL, "bad version in request");
	if (n < 4)
		return PARSE_MORE;
	r->ver = 5;
	r->cmd = p[1];
	if ((rv = socks_parse_addr(p + 3, n - 3, &alen, r)) != PARSE_OK)
		return rv;
	*used = 3 + alen;
	return PARSE_OK;
}

enum parse
socks_parse_v4(const uint8_t *p, size_t n, size_t *used, struct socks_req *r)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)&r->addr;
	const uint8_t *nul, *name;
	size_t ulen, hlen;

	r->rep = 0;
	r->why = NULL;
	if (n >= 1 && p[0] != 4)
		return socks_fail(r, SOCKS4_REJECTED, "bad version");
	if (n < 9)
		return PARSE_MORE;
	nul = memchr(p + 8, 0, n - 8);
	if (nul == NULL)
		return n - 8 > SOCKS_NAME_MAX ? socks_fail(r, SOCKS4_REJECTED, "user id too long") : PARSE_MORE;
	ulen = (size_t)(nul - (p + 8));
	if (ulen > SOCKS_NAME_MAX)
		return socks_fail(r, SOCKS4_REJECTED, "user id too long");
	r->ver = 4;
	r->cmd = p[1];
	r->port = (uint16_t)(p[2] << 8 | p[3]);
	memcpy(r->user, p + 8, ulen);
	r->user[ulen] = '\0';
	memset(&r->addr, 0, sizeof r->addr);
	sin->sin_family = AF_INET;
	memcpy(&sin->sin_port, p + 2, 2);
	memcpy(&sin->sin_addr, p + 4, 4);
	/* SOCKS4a: DSTIP 0.0.0.x with x != 0 means a host name follows the user id */
	r->v4a = p[4] == 0 && p[5] == 0 && p[6] == 0 && p[7] != 0;
	if (!r->v4a) {
		r->atyp = SOCKS_ATYP_IPV4;
		inet_ntop(AF_INET, &sin->sin_addr, r->host, sizeof r->host);
		*used = 8 + ulen + 1;
		return PARSE_OK;
	}
	name = nul + 1;
	nul = memchr(name, 0, n - (size_t)(name - p));
	if (nul == NULL)
		return n - (size_t)(name - p) > SOCKS_NAME_MAX ? socks_fail(r, SOCKS4_REJECTED, "host name too long")
		                                                : PARSE_MORE;
	hlen = (size_t)(nul - name);
	if (hlen > SOCKS_NAME_MAX)
		return socks_fail(r, SOCKS4_REJECTED, "host name too long");
	if (!socks_name_ok(name, hlen))
		return socks_fail(r, SOCKS4_REJECTED, "bad host name");
	r->atyp = SOCKS_ATYP_NAME;
	memcpy(r->host, name, hlen);
	r->host[hlen] = '\0';
	if (!socks_name_v6(name, hlen, r) && socks_name_bracketed(name, hlen))
		return socks_fail(r, SOCKS4_REJECTED, "bad host name");
	*used = (size_t)(nul - p) + 1;
	return PARSE_OK;
}

enum parse
socks_parse_udp(const uint8_t *p, size_t n, size_t *used, struct socks_req *r)
{
	size_t alen;
	enum parse rv;

	r->rep = 0;
	r->why = NULL;
	if (n < 4)
		return socks_fail(r, 0, "short datagram");
	r->ver = 5;
	r->cmd = SOCKS_CMD_UDP;
	r->frag = p[2];
	rv = socks_parse_addr(p + 3, n - 3, &alen, r);
	if (rv == PARSE_MORE)
		return socks_fail(r, 0, "short datagram");
	if (rv == PARSE_ERR)
		return rv;
	*used = 3 + alen;
	return PARSE_OK;
}

static size_t
socks_addr_put(uint8_t *out, const struct sockaddr *sa)
{
	if (sa && sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
		out[0] = SOCKS_ATYP_IPV6;
		memcpy(out + 1, &sin6->sin6_addr, 16);
		memcpy(out + 17, &sin6->sin6_port, 2);
		return 19;
	}
	out[0] = SOCKS_ATYP_IPV4;
	if (sa && sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
		memcpy(out + 1, &sin->sin_addr, 4);
		memcpy(out + 5, &sin->sin_port, 2);
	} else {
		memset(out + 1, 0, 6);
	}
	return 7;
}

size_t
socks_reply5(uint8_t *out, uint8_t rep, const struct sockaddr *bnd)
{
	out[0] = 5;
	out[1] = rep;
	out[2] = 0;
	return 3 + socks_addr_put(out + 3, bnd);
}

size_t
socks_reply4(uint8_t *out, uint8_t cd, const struct sockaddr *bnd)
{
	out[0] = 0;
	out[1] = cd;
	if (bnd && bnd->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)bnd;
		memcpy(out + 2, &sin->sin_port, 2);
		memcpy(out + 4, &sin->sin_addr, 4);
	} else {
		memset(out + 2, 0, 6);
	}
	return 8;
}

size_t
socks_udp_header(uint8_t *out, const struct sockaddr *src)
{
	out[0] = out[1] = out[2] = 0;
	return 3 + socks_addr_put(out + 3, src);
}

size_t
socks_udp_header_len(const struct sockaddr *src)
{
	return src->sa_family == AF_INET6 ? 3 + 19 : 3 + 7;
}

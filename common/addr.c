/* Endpoint parsing and formatting; see addr.h. */
#include "addr.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "xmalloc.h"

static int
port_parse(const char *s, uint16_t *port)
{
	char *end;
	long v;

	if (*s == '\0' || !isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end != '\0' || v < 1 || v > 65535)
		return -1;
	*port = (uint16_t)v;
	return 0;
}

/* A name to look up: digits and dots alone are a mistyped IPv4 address (256.1.1.1, 1.2.3). */
static bool
host_is_name(const char *h)
{
	return hostname_valid(h) && h[strspn(h, "0123456789.")] != '\0';
}

int
hostport_parse(const char *s, struct hostport *hp, char **why)
{
	const char *colon, *host = s;
	size_t hlen;

	/* a port alone is a port of this box, as for a listen address */
	if (port_parse(s, &hp->port) == 0) {
		snprintf(hp->host, sizeof hp->host, "127.0.0.1");
		return 0;
	}
	if (strstr(s, "://")) {
		/* a URL, as nginx's proxy_pass takes one: its colons would
		 * otherwise read as an IPv6 address without brackets */
		*why = xasprintf("bad address '%s': expected host:port, not a URL", s);
		return -1;
	}
	if (s[0] == '[') {
		const char *close = strchr(s, ']');
		if (close == NULL || close[1] != ':') {
			*why = xasprintf("bad address '%s': expected [IPv6]:port", s);
			return -1;
		}
		host = s + 1;
		hlen = (size_t)(close - host);
		colon = close + 1;
	} else {
		colon = strrchr(s, ':');
		if (colon == NULL) {
			*why = xasprintf("bad address '%s': expected host:port", s);
			return -1;
		}
		if (memchr(s, ':', (size_t)(colon - s)) != NULL) {
			*why = xasprintf("bad address '%s': write IPv6 as [addr]:port", s);
			return -1;
		}
		hlen = (size_t)(colon - s);
	}
	if (hlen == 0 || hlen > HOST_MAX) {
		*why = xasprintf("bad address '%s': missing or too long host", s);
		return -1;
	}
	if (port_parse(colon + 1, &hp->port) < 0) {
		*why = xasprintf("bad port in '%s': expected 1-65535", s);
		return -1;
	}
	memcpy(hp->host, host, hlen);
	hp->host[hlen] = '\0';
	if (s[0] == '[') {
		struct sockaddr_storage ss;
		socklen_t len;
		if (addr_from_literal(hp->host, 1, &ss, &len) < 0 || ss.ss_family != AF_INET6) {
			*why = xasprintf("bad IPv6 address in '%s'", s);
			return -1;
		}
	} else if (!addr_is_ip_literal(hp->host) && !host_is_name(hp->host)) {
		*why = xasprintf(hostname_valid(hp->host) ? "bad IPv4 address in '%s'" : "bad host name in '%s'", s);
		return -1;
	}
	return 0;
}

int
hostport_parse_opt(const char *s, uint16_t def_port, struct hostport *hp, char **why)
{
	size_t n = strlen(s);

	if (n <= HOST_MAX && (addr_is_ip_literal(s) || (host_is_name(s) && strchr(s, ':') == NULL))) {
		snprintf(hp->host, sizeof hp->host, "%s", s);
		hp->port = def_port;
		return 0;
	}
	/* [IPv6] with no port: the form capd itself prints an IPv6 endpoint in */
	if (n >= 2 && n - 2 <= HOST_MAX && s[0] == '[' && s[n - 1] == ']') {
		struct sockaddr_storage ss;
		socklen_t len;
		memcpy(hp->host, s + 1, n - 2);
		hp->host[n - 2] = '\0';
		if (addr_from_literal(hp->host, 1, &ss, &len) == 0 && ss.ss_family == AF_INET6) {
			hp->port = def_port;
			return 0;
		}
	}
	return hostport_parse(s, hp, why);
}

/*
 * An IPv6 address with its zone, "fe80::1%eth0" (or "%2"), as resolv.conf and
 * ip(8) write a link-local one: inet_pton refuses the zone. getaddrinfo with
 * AI_NUMERICHOST reads it without asking any resolver, so it never blocks.
 */
static int
addr_from_zoned(const char *host, uint16_t port, struct sockaddr_in6 *sin6, socklen_t *len)
{
	struct addrinfo hints = { .ai_family = AF_INET6, .ai_flags = AI_NUMERICHOST };
	struct addrinfo *ai = NULL;

	if (getaddrinfo(host, NULL, &hints, &ai) != 0)
		return -1;
	if (ai->ai_addrlen != sizeof *sin6 || ((struct sockaddr_in6 *)ai->ai_addr)->sin6_scope_id == 0) {
		freeaddrinfo(ai);
		return -1;
	}
	memcpy(sin6, ai->ai_addr, sizeof *sin6);
	sin6->sin6_port = htons(port);
	*len = sizeof *sin6;
	freeaddrinfo(ai);
	return 0;
}

int
addr_from_literal(const char *host, uint16_t port, struct sockaddr_storage *ss, socklen_t *len)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof *ss);
	if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		*len = sizeof *sin;
		return 0;
	}
	if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		*len = sizeof *sin6;
		return 0;
	}
	return strchr(host, '%') != NULL ? addr_from_zoned(host, port, sin6, len) : -1;
}

bool
addr_is_ip_literal(const char *host)
{
	struct sockaddr_storage ss;
	socklen_t len;

	return addr_from_literal(host, 1, &ss, &len) == 0;
}

int
addr_parse_listen(const char *s, struct sockaddr_storage *ss, socklen_t *len, char **why)
{
	struct hostport hp;
	uint16_t port;

	if (port_parse(s, &port) == 0)
		return addr_from_literal("127.0.0.1", port, ss, len);
	if (*s != '\0' && s[strspn(s, "0123456789")] == '\0') {  /* a bare port, out of range */
		*why = xasprintf("bad port '%s': expected 1-65535", s);
		return -1;
	}
	if (strncmp(s, "*:", 2) == 0) {  /* every IPv4 address; no host name is "*" */
		if (port_parse(s + 2, &port) < 0) {
			*why = xasprintf("bad port in '%s': expected 1-65535", s);
			return -1;
		}
		return addr_from_literal("0.0.0.0", port, ss, len);
	}
	if (hostport_parse(s, &hp, why) < 0)
		return -1;
	if (strcmp(hp.host, "localhost") == 0)
		strcpy(hp.host, "127.0.0.1");
	if (addr_from_literal(hp.host, hp.port, ss, len) < 0) {
		*why = xasprintf("listen address '%s' must be an IP address", s);
		return -1;
	}
	if (ss->ss_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&((struct sockaddr_in6 *)ss)->sin6_addr)) {
		/* capd's IPv6 listeners are IPv6-only (a v4 listener on the same
		 * port is another socket), so bind(2) would say only EINVAL */
		char v4[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &((struct sockaddr_in6 *)ss)->sin6_addr.s6_addr[12], v4, sizeof v4);
		*why = xasprintf("listen address '%s' is IPv4-mapped: write %s", s, v4);
		return -1;
	}
	return 0;
}

char *
addr_format_ip(const struct sockaddr *sa, char *out, size_t n)
{
	if (sa->sa_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)n);
	else if (sa->sa_family == AF_INET6)
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, (socklen_t)n);
	else
		snprintf(out, n, "?");
	return out;
}

char *
hostport_format(const char *host, unsigned port, char *out, size_t n)
{
	snprintf(out, n, strchr(host, ':') ? "[%s]:%u" : "%s:%u", host, port);
	return out;
}

char *
addr_format(const struct sockaddr *sa, char *out, size_t n)
{
	char ip[INET6_ADDRSTRLEN], zone[IF_NAMESIZE + 1] = "";
	uint32_t scope = sa->sa_family == AF_INET6 ? ((const struct sockaddr_in6 *)sa)->sin6_scope_id : 0;

	addr_format_ip(sa, ip, sizeof ip);
	/* a link-local endpoint means nothing without its interface */
	if (scope != 0 && if_indextoname(scope, zone + 1) != NULL)
		zone[0] = '%';
	if (sa->sa_family == AF_INET6)
		snprintf(out, n, "[%s%s]:%u", ip, zone, addr_port(sa));
	else
		snprintf(out, n, "%s:%u", ip, addr_port(sa));
	return out;
}

uint16_t
addr_port(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return ntohs(((const struct sockaddr_in *)sa)->sin_port);
	if (sa->sa_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
	return 0;
}

void
addr_set_port(struct sockaddr *sa, uint16_t port)
{
	if (sa->sa_family == AF_INET)
		((struct sockaddr_in *)sa)->sin_port = htons(port);
	else if (sa->sa_family == AF_INET6)
		((struct sockaddr_in6 *)sa)->sin6_port = htons(port);
}

bool
addr_same(const struct sockaddr *a, const struct sockaddr *b, bool port)
{
	if (a->sa_family != b->sa_family)
		return false;
	if (a->sa_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
		return x->sin_addr.s_addr == y->sin_addr.s_addr && (!port || x->sin_port == y->sin_port);
	}
	if (a->sa_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
		return memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0 && (!port || x->sin6_port == y->sin6_port);
	}
	return false;
}

socklen_t
addr_len(const struct sockaddr *sa)
{
	return sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

bool
addr_is_loopback(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
	if (sa->sa_family == AF_INET6) {
		const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
		if (IN6_IS_ADDR_V4MAPPED(a))
			return a->s6_addr[12] == 127;
		return IN6_IS_ADDR_LOOPBACK(a);
	}
	return false;
}

bool
addr_is_any(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return ((const struct sockaddr_in *)sa)->sin_addr.s_addr == htonl(INADDR_ANY);
	if (sa->sa_family == AF_INET6)
		return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)sa)->sin6_addr);
	return false;
}

bool
addr_reaches(const struct sockaddr *dst, const struct sockaddr *bound)
{
	struct sockaddr_storage lo;
	const struct sockaddr_in6 *d6 = (const struct sockaddr_in6 *)dst;

	/* ::ffff:a.b.c.d goes out as IPv4 to a.b.c.d from a socket that is not V6ONLY */
	if (dst->sa_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&d6->sin6_addr)) {
		struct sockaddr_in *v4 = (struct sockaddr_in *)&lo;
		memset(&lo, 0, sizeof lo);
		v4->sin_family = AF_INET;
		v4->sin_port = d6->sin6_port;
		memcpy(&v4->sin_addr, &d6->sin6_addr.s6_addr[12], 4);
		dst = (const struct sockaddr *)&lo;
	}
	if (dst->sa_family != bound->sa_family || addr_port(dst) != addr_port(bound))
		return false;
	if (addr_is_any(dst)) {
		memmove(&lo, dst, addr_len(dst));
		if (lo.ss_family == AF_INET)
			((struct sockaddr_in *)&lo)->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		else
			((struct sockaddr_in6 *)&lo)->sin6_addr = in6addr_loopback;
		dst = (const struct sockaddr *)&lo;
	}
	return addr_same(dst, bound, true) || (addr_is_any(bound) && addr_is_loopback(dst));
}

const char *
hostname_idn_hint(const char *name)
{
	for (; *name; name++)
		if ((unsigned char)*name >= 0x80)
			return " (write a name in another script in its xn-- form)";
	return "";
}

bool
hostname_valid(const char *name)
{
	size_t len = strlen(name), label = 0;

	if (len == 0 || len > 253)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)name[i];
		if (c == '.') {
			if (label == 0 || name[i - 1] == '-')
				return false;
			label = 0;
			continue;
		}
		if (!(isalnum(c) || c == '-' || c == '_'))
			return false;
		if (c == '-' && label == 0)
			return false;
		if (++label > 63)
			return false;
	}
	return name[len - 1] != '-';
}

bool
hostname_match(const char *pattern, const char *name)
{
	size_t nlen = strlen(name), plen;

	if (nlen > 0 && name[nlen - 1] == '.')
		nlen--;  /* a fully qualified name matches like the plain one */
	if (strcmp(pattern, "*") == 0)
		return true;
	if (strncmp(pattern, "*.", 2) == 0) {
		const char *suffix = pattern + 1;  /* ".example.test" */
		plen = strlen(suffix);
		return nlen > plen && strncasecmp(name + nlen - plen, suffix, plen) == 0;
	}
	plen = strlen(pattern);
	return plen == nlen && strncasecmp(pattern, name, nlen) == 0;
}

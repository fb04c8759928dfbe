/*
 * Endpoint parsing and formatting, shared by capd and capctl.
 * Text forms: "PORT" (127.0.0.1:PORT), "1.2.3.4:P", "[::1]:P", "host.name:P".
 */
#ifndef CAPD_ADDR_H
#define CAPD_ADDR_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#define ADDR_STRLEN 64   /* "[ffff:...:ffff%ifname]:65535" fits */
#define HOST_MAX 255

/* A target as the user wrote it: a host name or an IP literal, and a port. */
struct hostport {
	char host[HOST_MAX + 1];
	uint16_t port;
};

/* "host:port", "[v6]:port", or "port" alone (127.0.0.1:port). 0 or -1 with *why (caller frees). */
int hostport_parse(const char *s, struct hostport *hp, char **why);
/* The same, and also a bare host name or IP literal (IPv6 unbracketed), which gets def_port. */
int hostport_parse_opt(const char *s, uint16_t def_port, struct hostport *hp, char **why);
/* A listen address: "PORT", "IP:PORT", "[IP6]:PORT"; IP literals only. */
int addr_parse_listen(const char *s, struct sockaddr_storage *ss, socklen_t *len, char **why);
/* An IP literal with a port into a sockaddr; 0, or -1 when host is not a literal. */
int addr_from_literal(const char *host, uint16_t port, struct sockaddr_storage *ss, socklen_t *len);
bool addr_is_ip_literal(const char *host);
/* Writes "1.2.3.4:5" or "[::1]:5" into out (ADDR_STRLEN); returns out. */
char *addr_format(const struct sockaddr *sa, char *out, size_t n);
/* A host name or address and a port, an IPv6 address in brackets: "h:5", "[::1]:5". */
char *hostport_format(const char *host, unsigned port, char *out, size_t n);
/* Just the address, without port. */
char *addr_format_ip(const struct sockaddr *sa, char *out, size_t n);
uint16_t addr_port(const struct sockaddr *sa);
void addr_set_port(struct sockaddr *sa, uint16_t port);
/* Same family and address, and the same port when port is set. */
bool addr_same(const struct sockaddr *a, const struct sockaddr *b, bool port);
socklen_t addr_len(const struct sockaddr *sa);
bool addr_is_loopback(const struct sockaddr *sa);
bool addr_is_any(const struct sockaddr *sa);
/* Whether a connect() or sendto() to dst reaches a socket bound to bound: the
 * same address and port, 0.0.0.0 or :: (which Linux sends to 127.0.0.1 or ::1)
 * or a loopback address on its port when bound there or to every address; an
 * IPv4-mapped dst counts as the IPv4 address it is sent to. */
bool addr_reaches(const struct sockaddr *dst, const struct sockaddr *bound);
/* Syntax check of a DNS host name (RFC 1123 labels). */
bool hostname_valid(const char *name);
/* For a refused name: " (write a name in another script in its xn-- form)" when it
 * has non-ASCII bytes (DNS and hosts files hold bücher.test as xn--bcher-kva.test,
 * RFC 5890), else "". Static text. */
const char *hostname_idn_hint(const char *name);
/* Matches a name against "name", "*.suffix" or "*" (case-insensitive). */
bool hostname_match(const char *pattern, const char *name);

#endif

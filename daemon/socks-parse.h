/*
 * SOCKS wire formats: pure, incremental parsers for the handshake messages
 * of SOCKS4, SOCKS4a and SOCKS5 (RFC 1928) and RFC 1929 username/password
 * auth, plus the encoders for replies and the UDP request header. No I/O:
 * each parser looks at n bytes, answers PARSE_MORE (nothing consumed),
 * PARSE_OK (*used bytes form one message) or PARSE_ERR (the message can
 * never be valid; the result's rep says which reply to send, 0 for none).
 */
#ifndef CAPD_SOCKS_PARSE_H
#define CAPD_SOCKS_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#ifndef CAPD_ENUM_PARSE
#define CAPD_ENUM_PARSE
enum parse { PARSE_MORE, PARSE_OK, PARSE_ERR };
#endif

#define SOCKS_NAME_MAX 255

enum socks_cmd { SOCKS_CMD_CONNECT = 1, SOCKS_CMD_BIND = 2, SOCKS_CMD_UDP = 3 };
enum socks_atyp { SOCKS_ATYP_IPV4 = 1, SOCKS_ATYP_NAME = 3, SOCKS_ATYP_IPV6 = 4 };

enum socks_method { SOCKS_METHOD_NONE = 0x00, SOCKS_METHOD_USERPASS = 0x02, SOCKS_METHOD_REFUSE = 0xff };

/* SOCKS5 reply codes (RFC 1928 section 6). */
enum socks_rep {
	SOCKS_REP_OK = 0x00,
	SOCKS_REP_FAIL = 0x01,
	SOCKS_REP_DENIED = 0x02,
	SOCKS_REP_NET_UNREACH = 0x03,
	SOCKS_REP_HOST_UNREACH = 0x04,
	SOCKS_REP_REFUSED = 0x05,
	SOCKS_REP_TTL = 0x06,
	SOCKS_REP_CMD = 0x07,
	SOCKS_REP_ATYP = 0x08,
};

/* SOCKS4 reply codes. */
#define SOCKS4_GRANTED 0x5a
#define SOCKS4_REJECTED 0x5b

/* A SOCKS5 method-selection message: which methods the client offers. */
struct socks_greeting {
	bool none;      /* 0x00 offered */
	bool userpass;  /* 0x02 offered */
};

/* RFC 1929 credentials, NUL-terminated (a NUL inside is refused). */
struct socks_auth {
	char user[SOCKS_NAME_MAX + 1];
	char pass[SOCKS_NAME_MAX + 1];
};

/* A request (v4, v4a or v5) or the address of a UDP request header. Stack-owned by the caller. */
struct socks_req {
	uint8_t ver;                  /* 4 or 5 */
	uint8_t cmd;                  /* enum socks_cmd, or what the client sent */
	uint8_t atyp;                 /* enum socks_atyp (v4: IPV4, v4a: NAME) */
	uint8_t frag;                 /* UDP header only */
	bool v4a;
	uint16_t port;
	char host[SOCKS_NAME_MAX + 1]; /* the name, or the IP literal as text */
	struct sockaddr_storage addr; /* atyp IPV4/IPV6: the address with port */
	char user[SOCKS_NAME_MAX + 1]; /* v4 USERID */
	uint8_t rep;                  /* on PARSE_ERR: reply code to send, 0 for none */
	const char *why;              /* on PARSE_ERR: static text */
};

/* VER(5) NMETHODS METHODS... */
enum parse socks_parse_greeting(const uint8_t *p, size_t n, size_t *used, struct socks_greeting *g);
/* VER(1) ULEN UNAME PLEN PASSWD */
enum parse socks_parse_auth(const uint8_t *p, size_t n, size_t *used, struct socks_auth *a);
/* VER(5) CMD RSV ATYP DST.ADDR DST.PORT; an unknown CMD parses (the caller refuses it). */
enum parse socks_parse_request(const uint8_t *p, size_t n, size_t *used, struct socks_req *r);
/* VN(4) CD DSTPORT DSTIP USERID NUL [HOST NUL when DSTIP is 0.0.0.x, x != 0]. */
enum parse socks_parse_v4(const uint8_t *p, size_t n, size_t *used, struct socks_req *r);
/* One whole UDP datagram: RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA; MORE never happens
 * (a short datagram is an error). *used is the header length. */
enum parse socks_parse_udp(const uint8_t *p, size_t n, size_t *used, struct socks_req *r);

/* Longest encoded SOCKS5 address: ATYP + 16 + port. */
#define SOCKS_ADDR_MAX 19
#define SOCKS5_REPLY_MAX (3 + SOCKS_ADDR_MAX)
#define SOCKS_UDP_HDR_MAX (3 + SOCKS_ADDR_MAX)

/* VER REP RSV ATYP BND.ADDR BND.PORT; bnd NULL means 0.0.0.0:0. Returns the length. */
size_t socks_reply5(uint8_t *out, uint8_t rep, const struct sockaddr *bnd);
/* VN(0) CD DSTPORT DSTIP (8 bytes); an IPv6 or NULL bnd is written as 0.0.0.0:0. */
size_t socks_reply4(uint8_t *out, uint8_t cd, const struct sockaddr *bnd);
/* RSV RSV FRAG(0) ATYP ADDR PORT for a datagram from src; returns the length. */
size_t socks_udp_header(uint8_t *out, const struct sockaddr *src);
/* Length socks_udp_header would write for src. */
size_t socks_udp_header_len(const struct sockaddr *src);

#endif

/*
 * The client's first flight, read before any handshake state exists: see
 * tls-hello.h. Pure functions over bytes or a paused server SSL, shared by
 * tls.c and the fuzzer.
 */
#include "tls-hello.h"

#include <string.h>

#include "addr.h"

/*
 * tls = auto: a ClientHello starts a handshake record, 16 03 0x (x the
 * record's version, 00 to 04), as mitmproxy and sslsplit test it. The first
 * byte alone (0x16) took a binary protocol that starts with it for TLS, and
 * its bytes got "protocol mismatch" instead of the relay. 1: TLS, 0: not,
 * -1: more bytes needed.
 */
int
tls_peek_is_hello(const uint8_t *b, size_t n)
{
	if (n >= 1 && b[0] != 0x16)
		return 0;
	if (n >= 2 && b[1] != 0x03)
		return 0;
	if (n >= 3)
		return b[2] <= 0x04;
	return -1;
}

/*
 * Whether the client surely takes the ECDSA certificate: it offers TLS 1.3
 * (which capd then speaks) and ecdsa_secp256r1_sha256, which RFC 8446 makes
 * mandatory. Any other client gets the RSA certificate as well, and OpenSSL
 * picks by its suites and signature algorithms, ECDSA first.
 */
bool
tls_hello_ecdsa(SSL *ssl)
{
	const unsigned char *e;
	size_t len, n;
	bool v13 = false;

	if (!SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions, &e, &len) || len < 1)
		return false;
	n = e[0];
	for (size_t i = 1; i + 1 < len && i + 1 <= n; i += 2)
		if (e[i] == 0x03 && e[i + 1] == 0x04)
			v13 = true;
	if (!v13 || !SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_signature_algorithms, &e, &len) || len < 2)
		return false;
	n = (size_t)e[0] << 8 | e[1];
	for (size_t i = 2; i + 1 < len && i + 1 <= n + 1; i += 2)
		if (e[i] == 0x04 && e[i + 1] == 0x03)
			return true;
	return false;
}

/*
 * The newest version the client offers: the highest of its supported_versions
 * (GREASE values left out), else its legacy_version, as OpenSSL will choose.
 * 0 for a list OpenSSL will refuse as malformed anyway.
 */
unsigned
tls_hello_version(SSL *ssl)
{
	const unsigned char *e;
	size_t len, n;
	unsigned best = 0;

	if (!SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions, &e, &len))
		return SSL_client_hello_get0_legacy_version(ssl);
	if (len < 1)
		return 0;
	n = e[0];
	for (size_t i = 1; i + 1 < len && i + 1 <= n; i += 2) {
		unsigned v = (unsigned)e[i] << 8 | e[i + 1];
		if ((v & 0x0f0f) == 0x0a0a && e[i] == e[i + 1])
			continue;  /* GREASE (RFC 8701) */
		if (v > best)
			best = v;
	}
	return best;
}

void
tls_hello_parse(struct tls_hello *h, SSL *ssl)
{
	const unsigned char *e;
	size_t len;

	if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &e, &len) && len >= 5 && e[2] == 0) {
		size_t n = (size_t)e[3] << 8 | e[4];
		if (n > 0 && n < sizeof h->sni && 5 + n <= len) {
			memcpy(h->sni, e + 5, n);
			h->sni[n] = '\0';
			for (char *p = h->sni; *p; p++)
				if (*p >= 'A' && *p <= 'Z')
					*p = (char)(*p - 'A' + 'a');
			/* RFC 6066 sends no trailing dot, and a client that does means
			 * the same host (browsers check "host." as "host"): as sent, it
			 * failed every verification and went into the forged SANs. One
			 * dot goes before the check, which takes 253 bytes at most: a
			 * name of that length, dotted, is valid ("a.." and "." are not) */
			if (n > 1 && h->sni[n - 1] == '.' && h->sni[n - 2] != '.')
				h->sni[--n] = '\0';
			if ((!hostname_valid(h->sni) && !addr_is_ip_literal(h->sni)) || strlen(h->sni) != n)
				h->sni[0] = '\0';
		}
	}
	if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_application_layer_protocol_negotiation, &e, &len) &&
	    len >= 2) {
		size_t n = (size_t)e[0] << 8 | e[1];
		if (n > 0 && 2 + n <= len && n <= sizeof h->alpn_offer) {
			memcpy(h->alpn_offer, e + 2, n);
			h->alpn_offer_len = n;
		}
	}
	h->want_rsa = !tls_hello_ecdsa(ssl);
	h->hello_version = tls_hello_version(ssl);
}

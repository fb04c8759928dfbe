/*
 * Readers of a TLS client's first flight. tls_peek_is_hello looks at the
 * first raw bytes (tls = auto); the others run in OpenSSL's client-hello
 * callback, on a server SSL paused there, and read the extensions through
 * SSL_client_hello_get0_ext: the SNI and ALPN offer that the upstream
 * handshake repeats, the versions, the signature algorithms. Nothing here
 * touches a session or the event loop: the fuzzer links it alone.
 */
#ifndef CAPD_TLS_HELLO_H
#define CAPD_TLS_HELLO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

/* What tls_hello_parse takes from a ClientHello; a field it cannot read stays as it was. */
struct tls_hello {
	char sni[256];              /* lower case, one trailing dot dropped; "" when absent or invalid */
	uint8_t alpn_offer[256];    /* the client's ALPN list (wire format, no length prefix) */
	size_t alpn_offer_len;
	bool want_rsa;              /* the client may not take ECDSA: offer the RSA certificate too */
	unsigned hello_version;     /* the newest TLS version the client offers */
};

/* 1: the bytes start a TLS handshake record, 0: they do not, -1: more bytes needed. */
int tls_peek_is_hello(const uint8_t *b, size_t n);

/* Whether the client surely takes an ECDSA certificate (TLS 1.3 and ecdsa_secp256r1_sha256). */
bool tls_hello_ecdsa(SSL *ssl);

/* The newest version the client offers; 0 for a malformed supported_versions. */
unsigned tls_hello_version(SSL *ssl);

/* Reads SNI, ALPN offer, versions and signature algorithms into *h. */
void tls_hello_parse(struct tls_hello *h, SSL *ssl);

#endif

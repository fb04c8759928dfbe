/*
 * Fuzzes the readers of a TLS client's first flight (tls-hello.c) as tls.c
 * runs them. The input is the client's first bytes: tls_peek_is_hello takes
 * every prefix of up to three of them, as tls_peek reads them, and must
 * never change its answer once it has one. Then the whole input goes
 * through a memory BIO to a server SSL set up as tls_ctx_common sets up
 * capd's; its client-hello callback runs the readers and pauses the accept,
 * as capd's does while it goes upstream, so the callback comes before any
 * certificate is needed and the context has none. The readers' results are
 * checked against what tls.c relies on: a NUL-terminated SNI that is a
 * valid host name or IP literal (lower case), an ALPN offer within its
 * buffer, want_rsa as tls_hello_ecdsa says, and a version the client
 * offered that is not GREASE.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "addr.h"
#include "tls-hello.h"

static SSL_CTX *ctx;
static bool hello_seen;

/* The version is one the client listed in supported_versions, not GREASE; without
 * that extension its legacy_version, whatever it is (a TLS 1.2 server takes
 * a higher one as 1.2: RFC 5246 E.1). */
static void
fuzz_check_version(SSL *ssl, unsigned v)
{
	const unsigned char *e;
	size_t len;
	bool listed = false;

	if (!SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions, &e, &len)) {
		if (v != SSL_client_hello_get0_legacy_version(ssl))
			abort();
		return;
	}
	if (v == 0)
		return;
	if ((v & 0x0f0f) == 0x0a0a && v >> 8 == (v & 0xff))
		abort();
	for (size_t i = 1; i + 1 < len; i += 2)
		if (((unsigned)e[i] << 8 | e[i + 1]) == v)
			listed = true;
	if (!listed)
		abort();
}

static void
fuzz_check_hello(SSL *ssl, const struct tls_hello *h)
{
	size_t n = strnlen(h->sni, sizeof h->sni);

	if (n == sizeof h->sni)
		abort();  /* not terminated */
	if (n > 0 && !hostname_valid(h->sni) && !addr_is_ip_literal(h->sni))
		abort();
	for (size_t i = 0; i < n; i++)
		if (h->sni[i] >= 'A' && h->sni[i] <= 'Z')
			abort();
	if (h->alpn_offer_len > sizeof h->alpn_offer)
		abort();
	if (h->want_rsa != !tls_hello_ecdsa(ssl))
		abort();
	if (h->hello_version != tls_hello_version(ssl))
		abort();
	fuzz_check_version(ssl, h->hello_version);
}

static int
fuzz_hello_cb(SSL *ssl, int *al, void *arg)
{
	struct tls_hello h = { 0 };

	(void)al;
	(void)arg;
	hello_seen = true;
	tls_hello_parse(&h, ssl);
	fuzz_check_hello(ssl, &h);
	return SSL_CLIENT_HELLO_RETRY;  /* capd's accept waits here for the upstream */
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	if ((ctx = SSL_CTX_new(TLS_server_method())) == NULL)
		abort();
	/* what of tls_ctx_common bears on reading a ClientHello */
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_read_ahead(ctx, 1);
	SSL_CTX_set_client_hello_cb(ctx, fuzz_hello_cb, NULL);
	return 0;
}

static void
fuzz_peek(const uint8_t *data, size_t size)
{
	int first = -1;

	for (size_t n = 0; n <= size && n <= 3; n++) {
		int r = tls_peek_is_hello(data, n);
		if (r < -1 || r > 1 || (first >= 0 && r != first) || (n == 0 && r != -1) || (n == 3 && r < 0))
			abort();
		if (r >= 0)
			first = r;
	}
	if (size >= 3 && tls_peek_is_hello(data, size) != first)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	SSL *ssl;
	BIO *in, *out;
	int rv;

	fuzz_peek(data, size);
	if ((ssl = SSL_new(ctx)) == NULL)
		abort();
	in = BIO_new_mem_buf(data, size > INT32_MAX ? INT32_MAX : (int)size);
	out = BIO_new(BIO_s_mem());
	if (in == NULL || out == NULL)
		abort();
	BIO_set_mem_eof_return(in, 0);  /* the input's end is the client's EOF */
	SSL_set_bio(ssl, in, out);
	SSL_set_accept_state(ssl);
	hello_seen = false;
	rv = SSL_do_handshake(ssl);
	/* the callback pauses the accept; nothing else may look like that pause */
	if ((SSL_get_error(ssl, rv) == SSL_ERROR_WANT_CLIENT_HELLO_CB) != hello_seen)
		abort();
	SSL_free(ssl);
	ERR_clear_error();
	return 0;
}

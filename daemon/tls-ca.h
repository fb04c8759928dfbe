/*
 * capd's certificate authority and the certificates it forges.
 *
 * The CA is loaded from ca_cert/ca_key, or created there on first need
 * (ECDSA P-256, key mode 0600); an existing file is never overwritten. A
 * user's CA may be any key type OpenSSL signs with (RSA, ECDSA, Ed25519,
 * Ed448), and an intermediate: its chain goes out with every forged leaf. Every
 * forged certificate is signed by it and carries one of two leaf keys made
 * once per process, so no handshake ever generates a key: ECDSA P-256 for
 * every client that takes it, RSA 2048 for those that cannot (TLS 1.2 clients
 * with RSA-authenticated suites only). Forged certificates stay in a bounded
 * LRU cache keyed by the names they cover, both kinds in one entry.
 *
 * Nothing here touches the event loop: unit tests link it alone.
 */
#ifndef CAPD_TLS_CA_H
#define CAPD_TLS_CA_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#define TLS_CA_CACHE_DEFAULT 4096  /* forged certificates kept */

/* Loads the CA from cert_path/key_path, creating both when neither exists.
 * Idempotent for the same paths; other paths replace the CA in memory (and
 * empty the cache). -1 and *why when a file is unreadable, only one of the
 * two exists, or key and certificate do not match. The leaf keys are
 * another step (tls_ca_keys_ensure): showing the CA (ca.export) needs none. */
int tls_ca_load_cert(const char *cert_path, const char *key_path, char **why);
/*
 * capd -t: whether tls_ca_load_cert would succeed at start, without making a
 * CA: a pair that exists is loaded and checked; a missing pair needs folders
 * it can be written to (made_dir, state_dir, and the folders above it are made
 * at start). -1 with *why as the start would give it.
 */
int tls_ca_check(const char *cert_path, const char *key_path, const char *made_dir, char **why);
bool tls_ca_loaded(void);
/*
 * The key ("ca_cert" or "ca_key") whose file is no longer the one the CA in
 * force was loaded from (replaced, written, gone), with its path; NULL when
 * both are, or no CA is loaded. By inode, size and mtime, not contents: the
 * key may be readable by root alone, and capd runs as its user by then.
 */
const char *tls_ca_file_changed(const char **path);
/* "expired on DATE" (or "is not valid before DATE") into b when the CA is not
 * valid now; NULL when it is, or when there is none. */
const char *tls_ca_invalid(char *b, size_t n);
/*
 * Makes the leaf keys unless they are made; false when OpenSSL cannot.
 * RSA 2048 takes 0.2-0.6 s, too long for a
 * session thread or a lock every session waits on: an instance that
 * intercepts calls this in its prepare step, on a helper thread (or at
 * start, before the shards run), and nothing else in the daemon does;
 * tls.c only asks tls_ca_keys_ready. It locks on its own (one loop has no
 * capd_lock while a prepare thread runs). tls_ca_keys_ready needs no lock.
 */
bool tls_ca_keys_ensure(void);
bool tls_ca_keys_ready(void);
/* Borrowed; NULL until loaded. */
X509 *tls_ca_cert(void);
/* What follows a forged leaf: the CA when it is an intermediate, then the
 * further certificates of ca_cert but its roots; NULL for a self-signed CA.
 * A new reference (sk_X509_pop_free it), taken under the same lock as the
 * forged certificate: a reload may change the CA right after. */
STACK_OF(X509) *tls_ca_chain_ref(void);
EVP_PKEY *tls_ca_leaf_key(void);      /* ECDSA P-256 */
EVP_PKEY *tls_ca_leaf_key_rsa(void);  /* RSA 2048 */
const char *tls_ca_cert_path(void);

/*
 * A certificate for the ECDSA leaf key, signed by the CA (caller owns a
 * reference: X509_free it). With orig: subject and subjectAltNames copied from
 * it (the SAN critical when orig's is, or when the subject is empty), plus sni
 * as one more name when orig's SANs do not cover it (its CN does not count);
 * without sni, ip the same way.
 * Without orig (or with one that names nothing): CN and SAN from sni, else
 * from ip. An sni that is an IP literal is an IP name (iPAddress SAN), like
 * ip. With rsa, *rsa gets the same certificate for the RSA leaf key (a
 * reference the caller owns; forged on the first call that asks, then cached
 * beside the ECDSA one). NULL (and *rsa NULL) and *why when there is no name
 * at all ("no SNI and no IP") or signing fails.
 */
X509 *tls_ca_forge(X509 *orig, const char *sni, const struct sockaddr *ip, X509 **rsa, char **why);

/* How long forged certificates are valid (tests use short ones; 0: the
 * default, 397 days). A cached one is forged anew a day before its end. */
void tls_ca_leaf_lifetime(long secs);
/* Cache bound (tests use small ones); drops what no longer fits. */
void tls_ca_cache_max(size_t n);
size_t tls_ca_cache_len(void);
unsigned long tls_ca_cache_hits(void);
void tls_ca_cache_clear(void);
void tls_ca_free(void);

#endif

/*
 * capd's CA: load or create it, forge server certificates with it, and keep
 * the forged ones in a bounded LRU cache keyed by the names they cover.
 * Two leaf keys per process (ECDSA P-256, and RSA 2048 for clients that
 * cannot take ECDSA) serve every forged certificate, so a handshake costs at
 * most two signatures here, and none once the cache is warm. The RSA
 * certificate of a cache entry is forged only when a client first needs it.
 */
#include "tls-ca.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "addr.h"
#include "log.h"
#include "xmalloc.h"

#define TLS_CA_DAYS 3650            /* a created CA's lifetime */
#define TLS_LEAF_DAYS 397           /* what browsers accept for a server certificate */
#define TLS_LEAF_RENEW 86400        /* a cached one this close to its end is forged anew */
#define TLS_CACHE_BUCKETS 8192      /* power of two */
#define TLS_LEAF_RSA_BITS 2048
/* an RSA key also serves TLS 1.2's RSA key exchange (RFC 5246 7.4.2) */
#define TLS_LEAF_KU_EC "critical,digitalSignature"
#define TLS_LEAF_KU_RSA "critical,digitalSignature,keyEncipherment"

/* The forged certificates for one set of names; owned by the cache. */
struct tls_ca_entry {
	uint8_t key[32];                /* SHA-256 over the names it covers */
	X509 *x;                        /* ECDSA leaf; one reference held by the cache */
	X509 *rsa;                      /* RSA leaf, NULL until a client needs it; likewise */
	struct tls_ca_entry *hnext;     /* bucket chain */
	TAILQ_ENTRY(tls_ca_entry) lru;  /* head is the most recently used */
};
TAILQ_HEAD(tls_ca_lru, tls_ca_entry);

/* The CA in force; process-wide, freed by tls_ca_free. */
static struct {
	X509 *cert;
	EVP_PKEY *key;
	STACK_OF(X509) *chain;          /* sent after each leaf (tls_ca_chain); NULL: none */
	EVP_PKEY *leaf;                 /* ECDSA P-256 */
	EVP_PKEY *leaf_rsa;             /* RSA 2048 */
	char *cert_path, *key_path;
	struct stat cert_st, key_st;    /* the files as loaded (or made): tls_ca_file_changed */
	struct tls_ca_entry *buckets[TLS_CACHE_BUCKETS];
	struct tls_ca_lru lru;
	size_t len, max;
	unsigned long hits;
	long leaf_secs;                 /* a forged certificate's lifetime */
} ca = { .lru = TAILQ_HEAD_INITIALIZER(ca.lru), .max = TLS_CA_CACHE_DEFAULT, .leaf_secs = TLS_LEAF_DAYS * 86400L };

/* ca.leaf and ca.leaf_rsa are both made: read without any lock. They are
 * set under keys_mu, not the caller's lock, which is none with one loop
 * while an instance's prepare thread makes them (tls_ca_keys_ensure). */
static atomic_bool keys_ready;
static pthread_mutex_t keys_mu = PTHREAD_MUTEX_INITIALIZER;

/* The first OpenSSL error as text, or fallback. */
static const char *
tls_ca_err(const char *fallback)
{
	static _Thread_local char b[256];
	unsigned long e = ERR_get_error();

	ERR_clear_error();
	if (e == 0)
		return fallback;
	ERR_error_string_n(e, b, sizeof b);
	return b;
}

static int
tls_ca_serial(X509 *x)
{
	uint8_t r[16];
	BIGNUM *bn;
	int rv = -1;

	if (RAND_bytes(r, sizeof r) != 1)
		return -1;
	r[0] &= 0x7f;  /* positive, and never zero below */
	r[0] |= 0x40;
	if ((bn = BN_bin2bn(r, sizeof r, NULL)) == NULL)
		return -1;
	if (BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL)
		rv = 0;
	BN_free(bn);
	return rv;
}

static int
tls_ca_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
	X509V3_CTX ctx;
	X509_EXTENSION *ext;
	int ok;

	X509V3_set_ctx(&ctx, issuer, x, NULL, NULL, 0);
	if ((ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value)) == NULL)
		return -1;
	ok = X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	return ok ? 0 : -1;
}

/* ---- loading and creating the CA ---- */

/* A certificate that is its own issuer: a root, which clients already hold. */
static bool
tls_ca_self_issued(X509 *x)
{
	return X509_NAME_cmp(X509_get_subject_name(x), X509_get_issuer_name(x)) == 0;
}

/*
 * The file's first certificate is the CA. When that CA is an intermediate,
 * *chain gets it and the file's further certificates but its roots: what a
 * server sends after its leaf (RFC 8446 4.4.2), so clients that hold only the
 * root can build the path. A self-signed CA (capd's own) leaves *chain NULL.
 */
static X509 *
tls_ca_read_cert(const char *path, STACK_OF(X509) **chain, char **why)
{
	FILE *f = fopen(path, "r");
	X509 *x, *more;

	*chain = NULL;
	if (f == NULL) {
		*why = xasprintf("cannot open ca_cert %s: %s", path, strerror(errno));
		return NULL;
	}
	x = PEM_read_X509(f, NULL, NULL, NULL);
	if (x == NULL) {
		fclose(f);
		*why = xasprintf("ca_cert %s is not a PEM certificate: %s", path, tls_ca_err("no certificate"));
		return NULL;
	}
	if (!tls_ca_self_issued(x) && (*chain = sk_X509_new_null()) != NULL) {
		X509_up_ref(x);
		if (!sk_X509_push(*chain, x))
			X509_free(x);
		while ((more = PEM_read_X509(f, NULL, NULL, NULL)) != NULL) {
			if (tls_ca_self_issued(more) || !sk_X509_push(*chain, more))
				X509_free(more);
		}
	}
	ERR_clear_error();  /* the end of the file reads as an error */
	fclose(f);
	return x;
}

/* Ed25519 and Ed448 sign the message itself (no digest); every other key type SHA-256. */
static const EVP_MD *
tls_ca_md(EVP_PKEY *k)
{
	return EVP_PKEY_is_a(k, "ED25519") || EVP_PKEY_is_a(k, "ED448") ? NULL : EVP_sha256();
}

static EVP_PKEY *
tls_ca_read_key(const char *path, char **why)
{
	FILE *f = fopen(path, "r");
	EVP_PKEY *k;
	struct stat sb;

	if (f == NULL) {
		*why = xasprintf("cannot open ca_key %s: %s", path, strerror(errno));
		return NULL;
	}
	k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
	/* whoever reads the key can pass for any server to every client that
	 * trusts the CA: capd makes its own 0600 (a group may be meant to read) */
	if (k != NULL && fstat(fileno(f), &sb) == 0 && (sb.st_mode & S_IROTH))
		log_warnx("ca_key %s is readable by every user (mode %04o): anyone here can pass for any server to the "
		          "clients that trust the CA; chmod o-r it",
		          path, (unsigned)(sb.st_mode & 07777));
	fclose(f);
	if (k == NULL)
		*why = xasprintf("ca_key %s is not a PEM private key (encrypted keys are not supported): %s", path,
		                 tls_ca_err("no key"));
	return k;
}

/* Writes a new file that must not exist yet; never replaces one. */
static int
tls_ca_write_new(const char *path, mode_t mode, int (*emit)(FILE *, void *), void *arg, char **why)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
	FILE *f;

	if (fd < 0) {
		*why = xasprintf("cannot create %s: %s", path, strerror(errno));
		return -1;
	}
	fchmod(fd, mode);  /* whatever the umask says */
	if ((f = fdopen(fd, "w")) == NULL) {
		close(fd);
		unlink(path);
		*why = xasprintf("cannot create %s: %s", path, strerror(errno));
		return -1;
	}
	if (emit(f, arg) != 1 || fflush(f) != 0 || fsync(fileno(f)) != 0) {
		fclose(f);
		unlink(path);
		*why = xasprintf("cannot write %s", path);
		return -1;
	}
	fclose(f);
	return 0;
}

static int
tls_ca_emit_key(FILE *f, void *k)
{
	return PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
}

static int
tls_ca_emit_cert(FILE *f, void *x)
{
	return PEM_write_X509(f, x);
}

static int
tls_ca_create(const char *cert_path, const char *key_path, X509 **xo, EVP_PKEY **ko, char **why)
{
	EVP_PKEY *k = EVP_EC_gen("P-256");
	X509 *x = X509_new();
	X509_NAME *n;
	char host[128], cn[200];

	if (k == NULL || x == NULL)
		goto fail;
	if (gethostname(host, sizeof host) != 0)
		snprintf(host, sizeof host, "localhost");
	host[sizeof host - 1] = '\0';
	snprintf(cn, sizeof cn, "capd interception CA (%s)", host);
	n = X509_get_subject_name(x);
	if (!X509_set_version(x, X509_VERSION_3) || tls_ca_serial(x) < 0 ||
	    !X509_gmtime_adj(X509_getm_notBefore(x), -86400) ||
	    !X509_gmtime_adj(X509_getm_notAfter(x), (long)TLS_CA_DAYS * 86400) ||
	    !X509_NAME_add_entry_by_txt(n, "O", MBSTRING_UTF8, (const unsigned char *)"capd", -1, -1, 0) ||
	    !X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0) ||
	    !X509_set_issuer_name(x, n) || !X509_set_pubkey(x, k) ||
	    tls_ca_ext(x, x, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") < 0 ||
	    tls_ca_ext(x, x, NID_key_usage, "critical,keyCertSign,cRLSign") < 0 ||
	    tls_ca_ext(x, x, NID_subject_key_identifier, "hash") < 0 || !X509_sign(x, k, EVP_sha256()))
		goto fail;
	/* the key first: a certificate is never on disk without its key */
	if (tls_ca_write_new(key_path, 0600, tls_ca_emit_key, k, why) < 0) {
		X509_free(x);
		EVP_PKEY_free(k);
		return -1;
	}
	if (tls_ca_write_new(cert_path, 0644, tls_ca_emit_cert, x, why) < 0) {
		unlink(key_path);
		X509_free(x);
		EVP_PKEY_free(k);
		return -1;
	}
	log_notice("created capd's CA %s (key %s); install it in the clients to intercept", cert_path, key_path);
	*xo = x;
	*ko = k;
	return 0;
fail:
	*why = xasprintf("cannot create the CA: %s", tls_ca_err("OpenSSL failed"));
	X509_free(x);
	EVP_PKEY_free(k);
	return -1;
}

/* Why x is not valid now ("expired on DATE"), or NULL when it is. */
static const char *
tls_ca_invalid_why(X509 *x, char *b, size_t n)
{
	const ASN1_TIME *t;
	const char *what;
	struct tm tm;
	char date[40];

	if (X509_cmp_current_time(t = X509_get0_notAfter(x)) < 0)
		what = "expired on";
	else if (X509_cmp_current_time(t = X509_get0_notBefore(x)) > 0)
		what = "is not valid before";
	else
		return NULL;
	if (ASN1_TIME_to_tm(t, &tm) != 1 || strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
		snprintf(date, sizeof date, "?");
	snprintf(b, n, "%s %s", what, date);
	return b;
}

const char *
tls_ca_invalid(char *b, size_t n)
{
	return ca.cert ? tls_ca_invalid_why(ca.cert, b, n) : NULL;
}

int
tls_ca_load_cert(const char *cert_path, const char *key_path, char **why)
{
	struct stat st;
	char when[100];
	bool have_cert, have_key;
	X509 *x = NULL;
	EVP_PKEY *k = NULL;
	STACK_OF(X509) *chain = NULL;

	if (ca.cert && !strcmp(ca.cert_path, cert_path) && !strcmp(ca.key_path, key_path))
		return 0;
	have_cert = stat(cert_path, &st) == 0;
	have_key = stat(key_path, &st) == 0;
	if (have_cert != have_key) {
		*why = have_cert ? xasprintf("ca_cert %s exists but ca_key %s does not (capd never overwrites a CA)",
		                             cert_path, key_path)
		                 : xasprintf("ca_key %s exists but ca_cert %s does not (capd never overwrites a CA)",
		                             key_path, cert_path);
		return -1;
	}
	if (!have_cert) {
		if (tls_ca_create(cert_path, key_path, &x, &k, why) < 0)
			return -1;
	} else {
		if ((x = tls_ca_read_cert(cert_path, &chain, why)) == NULL)
			return -1;
		if ((k = tls_ca_read_key(key_path, why)) == NULL) {
			X509_free(x);
			sk_X509_pop_free(chain, X509_free);
			return -1;
		}
		if (X509_check_private_key(x, k) != 1) {
			*why = xasprintf("ca_key %s does not belong to ca_cert %s", key_path, cert_path);
			ERR_clear_error();
			X509_free(x);
			EVP_PKEY_free(k);
			sk_X509_pop_free(chain, X509_free);
			return -1;
		}
		if (X509_check_ca(x) == 0)
			log_warnx("ca_cert %s is not marked as a CA; clients may refuse what it signs", cert_path);
		if (tls_ca_invalid_why(x, when, sizeof when) != NULL)
			log_warnx("ca_cert %s %s; clients refuse every certificate forged with it", cert_path, when);
	}
	tls_ca_cache_clear();
	X509_free(ca.cert);
	EVP_PKEY_free(ca.key);
	sk_X509_pop_free(ca.chain, X509_free);
	ca.chain = chain;
	free(ca.cert_path);
	free(ca.key_path);
	ca.cert = x;
	ca.key = k;
	ca.cert_path = xstrdup(cert_path);
	ca.key_path = xstrdup(key_path);
	/* zeroed when gone already: a reload then says so */
	if (stat(cert_path, &ca.cert_st) < 0)
		memset(&ca.cert_st, 0, sizeof ca.cert_st);
	if (stat(key_path, &ca.key_st) < 0)
		memset(&ca.key_st, 0, sizeof ca.key_st);
	return 0;
}

/* Whether path is still the file was: the same inode, size and mtime. */
static bool
tls_ca_same_file(const char *path, const struct stat *was)
{
	struct stat now;

	return stat(path, &now) == 0 && now.st_dev == was->st_dev && now.st_ino == was->st_ino &&
	       now.st_size == was->st_size && now.st_mtim.tv_sec == was->st_mtim.tv_sec &&
	       now.st_mtim.tv_nsec == was->st_mtim.tv_nsec;
}

const char *
tls_ca_file_changed(const char **path)
{
	if (ca.cert == NULL)
		return NULL;
	if (!tls_ca_same_file(ca.cert_path, &ca.cert_st)) {
		*path = ca.cert_path;
		return "ca_cert";
	}
	if (!tls_ca_same_file(ca.key_path, &ca.key_st)) {
		*path = ca.key_path;
		return "ca_key";
	}
	return NULL;
}

/* Whether folder dir is path itself or a folder above it. */
static bool
tls_ca_dir_within(const char *dir, const char *path)
{
	size_t n = strlen(dir);

	return strncmp(dir, path, n) == 0 && (path[n] == '\0' || path[n] == '/' || (n > 0 && dir[n - 1] == '/'));
}

int
tls_ca_check(const char *cert_path, const char *key_path, const char *made_dir, char **why)
{
	const char *paths[] = { key_path, cert_path };  /* in the order tls_ca_create writes them */
	struct stat st;

	if (stat(cert_path, &st) == 0 || stat(key_path, &st) == 0)
		return tls_ca_load_cert(cert_path, key_path, why);
	for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
		const char *slash = strrchr(paths[i], '/');
		char *dir = slash == NULL ? xstrdup(".")
		          : slash == paths[i] ? xstrdup("/") : xasprintf("%.*s", (int)(slash - paths[i]), paths[i]);
		int err = 0;

		if (tls_ca_dir_within(dir, made_dir))
			;  /* made at start, with state_dir */
		else if (stat(dir, &st) < 0)
			err = errno;
		else if (!S_ISDIR(st.st_mode))
			err = ENOTDIR;
		else if (access(dir, W_OK | X_OK) < 0)
			err = errno;
		free(dir);
		if (err != 0) {
			*why = xasprintf("cannot create %s: %s", paths[i], strerror(err));
			return -1;
		}
	}
	return 0;
}

bool
tls_ca_keys_ensure(void)
{
	EVP_PKEY *ec, *rsa;

	if (atomic_load(&keys_ready))
		return true;
	/* made outside any lock; another thread may be making them too: the first to install wins */
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ec = EVP_EC_gen("P-256");
	rsa = EVP_RSA_gen(TLS_LEAF_RSA_BITS);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	pthread_mutex_lock(&keys_mu);
	if (ca.leaf == NULL) {
		ca.leaf = ec;
		ec = NULL;
	}
	if (ca.leaf_rsa == NULL) {
		ca.leaf_rsa = rsa;
		rsa = NULL;
	}
	if (!atomic_load(&keys_ready) && ca.leaf != NULL && ca.leaf_rsa != NULL)
		log_debug("made the TLS leaf keys (ECDSA P-256, RSA %d) in %.2f s", TLS_LEAF_RSA_BITS,
		          (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	atomic_store(&keys_ready, ca.leaf != NULL && ca.leaf_rsa != NULL);
	pthread_mutex_unlock(&keys_mu);
	EVP_PKEY_free(ec);
	EVP_PKEY_free(rsa);
	return atomic_load(&keys_ready);
}

bool
tls_ca_keys_ready(void)
{
	return atomic_load(&keys_ready);
}

bool
tls_ca_loaded(void)
{
	return ca.cert != NULL;
}

X509 *
tls_ca_cert(void)
{
	return ca.cert;
}

STACK_OF(X509) *
tls_ca_chain_ref(void)
{
	return ca.chain ? X509_chain_up_ref(ca.chain) : NULL;
}

EVP_PKEY *
tls_ca_leaf_key(void)
{
	return ca.leaf;
}

EVP_PKEY *
tls_ca_leaf_key_rsa(void)
{
	return ca.leaf_rsa;
}

const char *
tls_ca_cert_path(void)
{
	return ca.cert_path;
}

/* ---- the cache ---- */

static struct tls_ca_entry **
tls_ca_bucket(const uint8_t *key)
{
	uint32_t h;

	memcpy(&h, key, sizeof h);
	return &ca.buckets[h & (TLS_CACHE_BUCKETS - 1)];
}

static void
tls_ca_evict(struct tls_ca_entry *e)
{
	struct tls_ca_entry **pp = tls_ca_bucket(e->key);

	while (*pp != e)
		pp = &(*pp)->hnext;
	*pp = e->hnext;
	TAILQ_REMOVE(&ca.lru, e, lru);
	X509_free(e->x);
	X509_free(e->rsa);
	free(e);
	ca.len--;
}

/* The entry for key, now the most recently used; NULL when none. */
static struct tls_ca_entry *
tls_ca_cache_get(const uint8_t *key)
{
	for (struct tls_ca_entry *e = *tls_ca_bucket(key); e; e = e->hnext)
		if (!memcmp(e->key, key, sizeof e->key)) {
			time_t soon = time(NULL) + TLS_LEAF_RENEW;

			/* a capd that runs for a year must not serve what clients now find
			 * expired; one that ends with the CA is what a new one would be */
			if (X509_cmp_time(X509_get0_notAfter(e->x), &soon) <= 0 &&
			    ASN1_TIME_compare(X509_get0_notAfter(e->x), X509_get0_notAfter(ca.cert)) < 0) {
				tls_ca_evict(e);
				return NULL;
			}
			if (e != TAILQ_FIRST(&ca.lru)) {
				TAILQ_REMOVE(&ca.lru, e, lru);
				TAILQ_INSERT_HEAD(&ca.lru, e, lru);
			}
			ca.hits++;
			return e;
		}
	return NULL;
}

/* A new entry holding a reference to x (NULL when the cache keeps nothing). */
static struct tls_ca_entry *
tls_ca_cache_put(const uint8_t *key, X509 *x)
{
	struct tls_ca_entry *e, **b;

	if (ca.max == 0)
		return NULL;
	while (ca.len >= ca.max)
		tls_ca_evict(TAILQ_LAST(&ca.lru, tls_ca_lru));
	e = xcalloc(1, sizeof *e);
	memcpy(e->key, key, sizeof e->key);
	X509_up_ref(x);
	e->x = x;
	b = tls_ca_bucket(key);
	e->hnext = *b;
	*b = e;
	TAILQ_INSERT_HEAD(&ca.lru, e, lru);
	ca.len++;
	return e;
}

void
tls_ca_cache_max(size_t n)
{
	ca.max = n;
	while (ca.len > ca.max)
		tls_ca_evict(TAILQ_LAST(&ca.lru, tls_ca_lru));
}

void
tls_ca_leaf_lifetime(long secs)
{
	ca.leaf_secs = secs > 0 ? secs : TLS_LEAF_DAYS * 86400L;
}

size_t
tls_ca_cache_len(void)
{
	return ca.len;
}

unsigned long
tls_ca_cache_hits(void)
{
	return ca.hits;
}

void
tls_ca_cache_clear(void)
{
	while (!TAILQ_EMPTY(&ca.lru))
		tls_ca_evict(TAILQ_FIRST(&ca.lru));
}

void
tls_ca_free(void)
{
	tls_ca_cache_clear();
	X509_free(ca.cert);
	EVP_PKEY_free(ca.key);
	pthread_mutex_lock(&keys_mu);
	EVP_PKEY_free(ca.leaf);
	EVP_PKEY_free(ca.leaf_rsa);
	ca.leaf = ca.leaf_rsa = NULL;
	atomic_store(&keys_ready, false);
	pthread_mutex_unlock(&keys_mu);
	sk_X509_pop_free(ca.chain, X509_free);
	ca.chain = NULL;
	free(ca.cert_path);
	free(ca.key_path);
	ca.cert = NULL;
	ca.key = ca.leaf = ca.leaf_rsa = NULL;
	ca.cert_path = ca.key_path = NULL;
}

/* ---- forging ---- */

/* One name a forged certificate adds to what it copies: DNS, or IP when ip is set
 * (text is then the address in canonical form). */
struct tls_ca_name {
	const char *text;
	const struct sockaddr *ip;
};

static void
tls_ca_key_name(EVP_MD_CTX *md, const char *tag, const struct tls_ca_name *n)
{
	EVP_DigestUpdate(md, "", 1);
	EVP_DigestUpdate(md, tag, strlen(tag) + 1);
	/* the type is part of the key: DNS:127.0.0.1 is not IP:127.0.0.1 */
	EVP_DigestUpdate(md, n->ip ? "ip" : "dns", n->ip ? 3 : 4);
	EVP_DigestUpdate(md, n->text, strlen(n->text));
}

/* The names a forged certificate will cover, hashed: the cache key. */
static void
tls_ca_names_key(X509 *orig, bool san_critical, const struct tls_ca_name *extra, const struct tls_ca_name *fallback,
                 uint8_t key[32])
{
	static EVP_MD *sha256;  /* fetched once: an implicit fetch per handshake costs */
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int n = 32;

	if (sha256 == NULL)
		sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
	EVP_DigestInit_ex(md, sha256, NULL);
	if (orig) {
		unsigned char *der = NULL;
		int len = i2d_X509_NAME(X509_get_subject_name(orig), &der);
		int idx = X509_get_ext_by_NID(orig, NID_subject_alt_name, -1);

		EVP_DigestUpdate(md, "orig", 5);
		if (len > 0)
			EVP_DigestUpdate(md, der, (size_t)len);
		OPENSSL_free(der);
		if (idx >= 0) {
			ASN1_OCTET_STRING *d = X509_EXTENSION_get_data(X509_get_ext(orig, idx));
			EVP_DigestUpdate(md, "\0san", 4);
			EVP_DigestUpdate(md, ASN1_STRING_get0_data(d), (size_t)ASN1_STRING_length(d));
		}
		EVP_DigestUpdate(md, san_critical ? "\0critical" : "\0plain", san_critical ? 9 : 6);
	}
	if (extra)
		tls_ca_key_name(md, "extra", extra);
	if (fallback)
		tls_ca_key_name(md, "name", fallback);
	EVP_DigestFinal_ex(md, key, &n);
	EVP_MD_CTX_free(md);
}

static int
tls_ca_add_name(GENERAL_NAMES *gens, const struct tls_ca_name *n)
{
	const struct sockaddr *ip = n->ip;
	GENERAL_NAME *g = GENERAL_NAME_new();
	ASN1_IA5STRING *s;
	ASN1_OCTET_STRING *o;

	if (g == NULL)
		return -1;
	if (ip == NULL) {
		if ((s = ASN1_IA5STRING_new()) == NULL || !ASN1_STRING_set(s, n->text, -1)) {
			ASN1_IA5STRING_free(s);
			GENERAL_NAME_free(g);
			return -1;
		}
		GENERAL_NAME_set0_value(g, GEN_DNS, s);
	} else {
		const void *a = ip->sa_family == AF_INET ? (const void *)&((const struct sockaddr_in *)ip)->sin_addr
		                                         : (const void *)&((const struct sockaddr_in6 *)ip)->sin6_addr;
		int alen = ip->sa_family == AF_INET ? 4 : 16;
		if ((o = ASN1_OCTET_STRING_new()) == NULL || !ASN1_OCTET_STRING_set(o, a, alen)) {
			ASN1_OCTET_STRING_free(o);
			GENERAL_NAME_free(g);
			return -1;
		}
		GENERAL_NAME_set0_value(g, GEN_IPADD, o);
	}
	if (!sk_GENERAL_NAME_push(gens, g)) {
		GENERAL_NAME_free(g);
		return -1;
	}
	return 0;
}

/* Copies the DNS, IP and other entries of orig's subjectAltName (NULL when none). */
static GENERAL_NAMES *
tls_ca_orig_sans(X509 *orig)
{
	return orig ? X509_get_ext_d2i(orig, NID_subject_alt_name, NULL, NULL) : NULL;
}

static const char *
tls_ca_ip_text(const struct sockaddr *ip, char *b, size_t n)
{
	if (ip == NULL || (ip->sa_family != AF_INET && ip->sa_family != AF_INET6))
		return NULL;
	if (ip->sa_family == AF_INET)
		return inet_ntop(AF_INET, &((const struct sockaddr_in *)ip)->sin_addr, b, (socklen_t)n);
	return inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ip)->sin6_addr, b, (socklen_t)n);
}

/*
 * A forged certificate's validity: from the day before (clocks differ) for
 * leaf_secs, within the CA's own, as mitmproxy clamps: a leaf that outlives
 * its CA (a user's CA that ends in a month) would be sent after the CA ended,
 * and one that starts before it is refused by strict verifiers. A CA that has
 * already ended (or not begun) gives its own period, so the leaf is as
 * invalid as the CA is, never valid before its notBefore.
 */
static int
tls_ca_leaf_validity(X509 *x)
{
	const ASN1_TIME *ca_nb = X509_get0_notBefore(ca.cert), *ca_na = X509_get0_notAfter(ca.cert);
	ASN1_TIME *nb = X509_getm_notBefore(x), *na = X509_getm_notAfter(x);

	if (!X509_gmtime_adj(nb, -86400) || !X509_gmtime_adj(na, ca.leaf_secs))
		return -1;
	if (ASN1_TIME_compare(na, ca_na) > 0 && !X509_set1_notAfter(x, ca_na))
		return -1;
	if ((ASN1_TIME_compare(nb, ca_nb) < 0 || ASN1_TIME_compare(nb, X509_get0_notAfter(x)) > 0) &&
	    !X509_set1_notBefore(x, ca_nb))
		return -1;
	return 0;
}

/* A certificate for leaf with key usage ku, signed by the CA: orig's subject
 * (else CN fallback) and gens as subjectAltName (none when empty). Caller owns
 * it; NULL when OpenSSL fails. */
static X509 *
tls_ca_sign_leaf(X509 *orig, const struct tls_ca_name *fallback, GENERAL_NAMES *gens, bool critical, EVP_PKEY *leaf,
                 const char *ku)
{
	X509 *x = X509_new();

	if (x == NULL)
		return NULL;
	if (orig) {
		if (!X509_set_subject_name(x, X509_get_subject_name(orig)))
			goto fail;
	} else if (strlen(fallback->text) <= ub_common_name) {
		if (!X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_UTF8,
		                                (const unsigned char *)fallback->text, -1, -1, 0))
			goto fail;
	} else {
		/* a DNS name may be 253 bytes, a CN only 64 (RFC 5280): the subject
		 * stays empty, the name is in the subjectAltName, critical then */
		critical = true;
	}
	if (!X509_set_version(x, X509_VERSION_3) || tls_ca_serial(x) < 0 || tls_ca_leaf_validity(x) < 0 ||
	    !X509_set_issuer_name(x, X509_get_subject_name(ca.cert)) || !X509_set_pubkey(x, leaf) ||
	    (sk_GENERAL_NAME_num(gens) > 0 && !X509_add1_ext_i2d(x, NID_subject_alt_name, gens, critical, 0)) ||
	    tls_ca_ext(x, ca.cert, NID_basic_constraints, "critical,CA:FALSE") < 0 ||
	    tls_ca_ext(x, ca.cert, NID_key_usage, ku) < 0 ||
	    tls_ca_ext(x, ca.cert, NID_ext_key_usage, "serverAuth") < 0)
		goto fail;
	/* a user's CA without a key identifier simply gets none in its leaves */
	if (tls_ca_ext(x, ca.cert, NID_authority_key_identifier, "keyid") < 0)
		ERR_clear_error();
	if (!X509_sign(x, ca.key, tls_ca_md(ca.key)))
		goto fail;
	return x;
fail:
	X509_free(x);
	return NULL;
}

X509 *
tls_ca_forge(X509 *orig, const char *sni, const struct sockaddr *ip, X509 **rsa, char **why)
{
	uint8_t key[32];
	char ipb[64], snib[64];
	struct sockaddr_storage sni_ss;
	socklen_t sni_len;
	struct tls_ca_name sni_name = { 0 }, ip_name = { 0 };
	const struct tls_ca_name *extra = NULL, *fallback = NULL;
	GENERAL_NAMES *gens = NULL;
	struct tls_ca_entry *e;
	X509 *x = NULL, *xr = NULL;
	bool orig_names = false, critical = false;

	if (rsa)
		*rsa = NULL;
	if (ca.cert == NULL) {
		*why = xstrdup("capd's CA is not loaded");
		return NULL;
	}
	if (sni && *sni != '\0') {
		sni_name.text = sni;
		/* an address sent as SNI (clients should not, some do) is an IP name,
		 * the same one a client that sends no SNI gets */
		if (addr_from_literal(sni, 0, &sni_ss, &sni_len) == 0) {
			sni_name.ip = (struct sockaddr *)&sni_ss;
			sni_name.text = tls_ca_ip_text(sni_name.ip, snib, sizeof snib);
		}
	}
	if ((ip_name.text = tls_ca_ip_text(ip, ipb, sizeof ipb)) != NULL)
		ip_name.ip = ip;
	if (orig) {
		X509_NAME *subj = X509_get_subject_name(orig);
		int idx = X509_get_ext_by_NID(orig, NID_subject_alt_name, -1);

		gens = tls_ca_orig_sans(orig);
		orig_names = (gens && sk_GENERAL_NAME_num(gens) > 0) ||
		             X509_NAME_get_index_by_NID(subj, NID_commonName, -1) >= 0;
		/* RFC 5280 4.2.1.6: with an empty subject the names are all in the SAN,
		 * which must then be critical (strict verifiers insist) */
		critical = (idx >= 0 && X509_EXTENSION_get_critical(X509_get_ext(orig, idx)) > 0) ||
		           X509_NAME_entry_count(subj) == 0;
		/* a name the client asked for and the real certificate's SANs lack is
		 * added, so a client of a lab server with a mismatched certificate, or
		 * one named only by its CN (which browsers ignore), still gets through;
		 * a client without SNI checks the address it reached, which is added
		 * the same way */
		if (orig_names && sni_name.text) {
			int covered = sni_name.ip ? X509_check_ip_asc(orig, sni_name.text, 0)
			                          : X509_check_host(orig, sni_name.text, 0,
			                                            X509_CHECK_FLAG_NEVER_CHECK_SUBJECT |
			                                                X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS,
			                                            NULL);
			if (covered != 1)
				extra = &sni_name;
		} else if (orig_names && ip_name.text && X509_check_ip_asc(orig, ip_name.text, 0) != 1) {
			extra = &ip_name;
		}
		if (!orig_names) {
			GENERAL_NAMES_free(gens);
			gens = NULL;
			orig = NULL;
			critical = false;
		}
	}
	if (orig == NULL) {
		if (sni_name.text)
			fallback = &sni_name;
		else if (ip_name.text)
			fallback = &ip_name;
		else {
			*why = xstrdup("no SNI and no IP");
			return NULL;
		}
	}
	tls_ca_names_key(orig, critical, extra, fallback, key);
	if ((e = tls_ca_cache_get(key)) != NULL) {
		X509_up_ref(e->x);
		x = e->x;
		if (rsa == NULL || e->rsa != NULL) {
			if (rsa) {
				X509_up_ref(e->rsa);
				*rsa = e->rsa;
			}
			GENERAL_NAMES_free(gens);
			return x;
		}
	}

	/* a miss, or the first client of these names that needs RSA */
	if (gens == NULL && (gens = sk_GENERAL_NAME_new_null()) == NULL)
		goto fail;
	if (extra && tls_ca_add_name(gens, extra) < 0)
		goto fail;
	if (fallback && tls_ca_add_name(gens, fallback) < 0)
		goto fail;
	if (x == NULL && (x = tls_ca_sign_leaf(orig, fallback, gens, critical, ca.leaf, TLS_LEAF_KU_EC)) == NULL)
		goto fail;
	if (rsa && (xr = tls_ca_sign_leaf(orig, fallback, gens, critical, ca.leaf_rsa, TLS_LEAF_KU_RSA)) == NULL)
		goto fail;
	GENERAL_NAMES_free(gens);
	if (e == NULL)
		e = tls_ca_cache_put(key, x);
	if (e && xr) {
		X509_up_ref(xr);
		e->rsa = xr;
	}
	if (rsa)
		*rsa = xr;
	return x;
fail:
	X509_free(x);
	GENERAL_NAMES_free(gens);
	*why = xasprintf("cannot forge a certificate: %s", tls_ca_err("OpenSSL failed"));
	return NULL;
}

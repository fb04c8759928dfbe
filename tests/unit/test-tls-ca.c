/* Unit tests for daemon/tls-ca.c: CA creation and loading, forging, the LRU cache. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "tls-ca.h"

static char dir[] = "/tmp/capd-test-tls-ca-XXXXXX";
static char cert_path[256], key_path[256];

/* A server certificate like an origin's: self-signed, names in subject (O and CN
 * when given) and SAN (X509V3 config text: "critical,DNS:a,IP:1.2.3.4"). */
static X509 *
make_origin_o(const char *org, const char *cn, const char *san)
{
	EVP_PKEY *k = EVP_EC_gen("P-256");
	X509 *x = X509_new();
	X509V3_CTX ctx;
	X509_EXTENSION *ext;

	X509_set_version(x, X509_VERSION_3);
	ASN1_INTEGER_set(X509_get_serialNumber(x), 7);
	X509_gmtime_adj(X509_getm_notBefore(x), 0);
	X509_gmtime_adj(X509_getm_notAfter(x), 86400);
	if (org)
		X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "O", MBSTRING_ASC, (const unsigned char *)org, -1, -1, 0);
	if (cn)
		X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
	X509_set_issuer_name(x, X509_get_subject_name(x));
	X509_set_pubkey(x, k);
	if (san) {
		X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
		ext = X509V3_EXT_conf_nid(NULL, &ctx, NID_subject_alt_name, san);
		assert_non_null(ext);
		X509_add_ext(x, ext, -1);
		X509_EXTENSION_free(ext);
	}
	X509_sign(x, k, EVP_sha256());
	EVP_PKEY_free(k);
	return x;
}

static X509 *
make_origin(const char *cn, const char *san)
{
	return make_origin_o("Origin", cn, san);
}

/* The SAN entries as "DNS:a,IP:1.2.3.4,...". */
static void
sans_text(X509 *x, char *out, size_t n)
{
	GENERAL_NAMES *g = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);

	out[0] = '\0';
	for (int i = 0; g && i < sk_GENERAL_NAME_num(g); i++) {
		GENERAL_NAME *e = sk_GENERAL_NAME_value(g, i);
		size_t len = strlen(out);
		if (e->type == GEN_DNS) {
			snprintf(out + len, n - len, "%sDNS:%s", len ? "," : "", (const char *)ASN1_STRING_get0_data(e->d.dNSName));
		} else if (e->type == GEN_IPADD) {
			char ip[64];
			int alen = ASN1_STRING_length(e->d.iPAddress);
			inet_ntop(alen == 4 ? AF_INET : AF_INET6, ASN1_STRING_get0_data(e->d.iPAddress), ip, sizeof ip);
			snprintf(out + len, n - len, "%sIP:%s", len ? "," : "", ip);
		}
	}
	GENERAL_NAMES_free(g);
}

/* As a strict client checks: RFC 5280 rules (-x509_strict, Python 3.13's
 * default) and, like browsers and Go, a name only from the SAN, never the CN.
 * host may be an IP address. */
static int
verify_as_strict_client(X509 *leaf, const char *host)
{
	X509_STORE *st = X509_STORE_new();
	X509_STORE_CTX *ctx = X509_STORE_CTX_new();
	X509_VERIFY_PARAM *param;
	unsigned char a[16];

	X509_STORE_add_cert(st, tls_ca_cert());
	X509_STORE_CTX_init(ctx, st, leaf, NULL);
	X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_SERVER);
	param = X509_STORE_CTX_get0_param(ctx);
	X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_X509_STRICT);
	X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
	if (host && (inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1))
		X509_VERIFY_PARAM_set1_ip_asc(param, host);
	else if (host)
		X509_VERIFY_PARAM_set1_host(param, host, 0);
	int ok = X509_verify_cert(ctx);
	int err = X509_STORE_CTX_get_error(ctx);
	if (ok != 1)
		fprintf(stderr, "verify %s: %s\n", host ? host : "-", X509_verify_cert_error_string(err));
	X509_STORE_CTX_free(ctx);
	X509_STORE_free(st);
	return ok == 1 ? X509_V_OK : err;
}

static void
assert_verifies(X509 *leaf, const char *host)
{
	assert_int_equal(verify_as_strict_client(leaf, host), X509_V_OK);
}

static bool
san_critical(X509 *x)
{
	int idx = X509_get_ext_by_NID(x, NID_subject_alt_name, -1);

	assert_true(idx >= 0);
	return X509_EXTENSION_get_critical(X509_get_ext(x, idx)) > 0;
}

static int
setup(void **state)
{
	char *why = NULL;

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(cert_path, sizeof cert_path, "%s/ca.pem", dir);
	snprintf(key_path, sizeof key_path, "%s/ca.key", dir);
	/* as capd does: the CA (tls_start, ca.export), then the keys (an instance's prepare) */
	assert_int_equal(tls_ca_load_cert(cert_path, key_path, &why), 0);
	assert_true(tls_ca_keys_ensure());
	return 0;
}

static int
teardown(void **state)
{
	(void)state;
	tls_ca_free();
	unlink(cert_path);
	unlink(key_path);
	rmdir(dir);
	return 0;
}

static void
test_ca_created(void **state)
{
	struct stat st;
	X509 *copy;
	char *why = NULL;

	(void)state;
	assert_int_equal(stat(key_path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_true(tls_ca_loaded());
	assert_int_equal(X509_check_ca(tls_ca_cert()), 1);
	EVP_PKEY *pub = X509_get0_pubkey(tls_ca_cert());
	assert_true(EVP_PKEY_is_a(pub, "EC"));
	char group[32];
	size_t glen = 0;
	assert_int_equal(EVP_PKEY_get_utf8_string_param(pub, "group", group, sizeof group, &glen), 1);
	assert_string_equal(group, "prime256v1");

	/* a fresh process loads the same CA, it never makes a new one */
	copy = X509_dup(tls_ca_cert());
	tls_ca_free();
	assert_int_equal(tls_ca_load_cert(cert_path, key_path, &why), 0);
	assert_int_equal(X509_cmp(copy, tls_ca_cert()), 0);
	X509_free(copy);
	/* the same paths again: the CA in memory stays, nothing is read anew */
	X509 *loaded = tls_ca_cert();
	assert_int_equal(tls_ca_load_cert(cert_path, key_path, &why), 0);
	assert_ptr_equal(tls_ca_cert(), loaded);
	assert_false(tls_ca_keys_ready());
	assert_true(tls_ca_keys_ensure());  /* tls_ca_free dropped them: the next instance makes them */
}

static void
test_ca_half_refused(void **state)
{
	char lone_cert[300], lone_key[300], *why = NULL;

	(void)state;
	snprintf(lone_cert, sizeof lone_cert, "%s/lone.pem", dir);
	snprintf(lone_key, sizeof lone_key, "%s/missing.key", dir);
	FILE *f = fopen(lone_cert, "w");
	PEM_write_X509(f, tls_ca_cert());
	fclose(f);
	assert_int_equal(tls_ca_load_cert(lone_cert, lone_key, &why), -1);
	assert_non_null(strstr(why, "does not"));
	assert_int_equal(access(lone_key, F_OK), -1);  /* nothing was created beside it */
	free(why);
	unlink(lone_cert);
	/* a key that does not belong to the certificate */
	why = NULL;
	snprintf(lone_key, sizeof lone_key, "%s/other.key", dir);
	EVP_PKEY *k = EVP_EC_gen("P-256");
	f = fopen(lone_key, "w");
	PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
	fclose(f);
	EVP_PKEY_free(k);
	f = fopen(lone_cert, "w");
	PEM_write_X509(f, tls_ca_cert());
	fclose(f);
	assert_int_equal(tls_ca_load_cert(lone_cert, lone_key, &why), -1);
	assert_non_null(strstr(why, "does not belong"));
	free(why);
	unlink(lone_cert);
	unlink(lone_key);
	assert_true(tls_ca_loaded());  /* the CA in force stays */
}

static void
test_forge_copies_names(void **state)
{
	X509 *orig = make_origin("www.example.test", "DNS:www.example.test,DNS:alt.example.test,IP:127.0.0.1");
	char *why = NULL, sans[512];
	X509 *x;

	(void)state;
	x = tls_ca_forge(orig, "www.example.test", NULL, NULL, &why);
	assert_non_null(x);
	assert_int_equal(X509_NAME_cmp(X509_get_subject_name(x), X509_get_subject_name(orig)), 0);
	assert_int_equal(X509_NAME_cmp(X509_get_issuer_name(x), X509_get_subject_name(tls_ca_cert())), 0);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:www.example.test,DNS:alt.example.test,IP:127.0.0.1");
	assert_true(EVP_PKEY_eq(X509_get0_pubkey(x), tls_ca_leaf_key()));
	assert_verifies(x, "alt.example.test");
	X509_free(x);

	/* a name the real certificate lacks is added */
	x = tls_ca_forge(orig, "other.test", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:www.example.test,DNS:alt.example.test,IP:127.0.0.1,DNS:other.test");
	assert_verifies(x, "other.test");
	X509_free(x);
	X509_free(orig);
}

static void
test_forge_fallbacks(void **state)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	X509 *x, *nameless = make_origin(NULL, NULL);
	char *why = NULL, sans[256], cn[256];

	(void)state;
	x = tls_ca_forge(NULL, "name.test", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:name.test");
	X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn);
	assert_string_equal(cn, "name.test");
	assert_verifies(x, "name.test");
	X509_free(x);

	inet_pton(AF_INET, "10.1.2.3", &sin.sin_addr);
	x = tls_ca_forge(nameless, NULL, (struct sockaddr *)&sin, NULL, &why);  /* a certificate naming nothing */
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "IP:10.1.2.3");
	X509_free(x);

	assert_null(tls_ca_forge(NULL, NULL, NULL, NULL, &why));
	assert_string_equal(why, "no SNI and no IP");
	free(why);
	X509_free(nameless);
}

/* An address as SNI is an IP name: an iPAddress SAN, cached apart from DNS names,
 * and the same certificate a client without SNI gets for that address. */
static void
test_forge_ip_sni(void **state)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	X509 *orig = make_origin("www.example.test", "DNS:www.example.test,IP:127.0.0.1");
	X509 *x, *y;
	char *why = NULL, sans[256], cn[256];

	(void)state;
	tls_ca_cache_clear();
	x = tls_ca_forge(NULL, "127.0.0.1", NULL, NULL, &why);
	assert_non_null(x);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "IP:127.0.0.1");
	X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn);
	assert_string_equal(cn, "127.0.0.1");
	assert_verifies(x, "127.0.0.1");
	/* the client without SNI that comes next gets an IP name too */
	inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
	y = tls_ca_forge(NULL, NULL, (struct sockaddr *)&sin, NULL, &why);
	sans_text(y, sans, sizeof sans);
	assert_string_equal(sans, "IP:127.0.0.1");
	assert_verifies(y, "127.0.0.1");
	X509_free(x);
	X509_free(y);

	/* a DNS name that looks like no address still is one */
	x = tls_ca_forge(NULL, "127.0.0.1.test", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:127.0.0.1.test");
	X509_free(x);

	x = tls_ca_forge(NULL, "::1", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "IP:::1");
	assert_verifies(x, "::1");
	X509_free(x);

	/* with a real certificate: an address it covers adds nothing, another an IP name */
	x = tls_ca_forge(orig, "127.0.0.1", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:www.example.test,IP:127.0.0.1");
	X509_free(x);
	x = tls_ca_forge(orig, "10.9.8.7", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:www.example.test,IP:127.0.0.1,IP:10.9.8.7");
	assert_verifies(x, "10.9.8.7");
	X509_free(x);
	X509_free(orig);
}

/* The SAN's critical flag is copied, and set whenever the subject is empty (RFC 5280). */
static void
test_forge_san_critical(void **state)
{
	X509 *empty_crit = make_origin_o(NULL, NULL, "critical,DNS:empty.test");
	X509 *empty_plain = make_origin_o(NULL, NULL, "DNS:empty.test");  /* not RFC 5280, seen anyway */
	X509 *named_crit = make_origin("crit.test", "critical,DNS:crit.test");
	X509 *named_plain = make_origin("crit.test", "DNS:crit.test");
	char *why = NULL, sans[256];
	X509 *x;

	(void)state;
	x = tls_ca_forge(empty_crit, "empty.test", NULL, NULL, &why);
	assert_int_equal(X509_NAME_entry_count(X509_get_subject_name(x)), 0);
	assert_true(san_critical(x));
	assert_verifies(x, "empty.test");
	X509_free(x);
	x = tls_ca_forge(empty_crit, "other.test", NULL, NULL, &why);  /* with the SNI added */
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:empty.test,DNS:other.test");
	assert_true(san_critical(x));
	assert_verifies(x, "other.test");
	X509_free(x);

	x = tls_ca_forge(empty_plain, "empty.test", NULL, NULL, &why);
	assert_true(san_critical(x));
	assert_verifies(x, "empty.test");
	X509_free(x);

	x = tls_ca_forge(named_crit, "crit.test", NULL, NULL, &why);
	assert_true(san_critical(x));
	assert_verifies(x, "crit.test");
	X509_free(x);
	/* the same names, not critical: a certificate of its own, not the cached one */
	x = tls_ca_forge(named_plain, "crit.test", NULL, NULL, &why);
	assert_false(san_critical(x));
	assert_verifies(x, "crit.test");
	X509_free(x);

	X509_free(empty_crit);
	X509_free(empty_plain);
	X509_free(named_crit);
	X509_free(named_plain);
}

/* The SNI is covered only by a SAN: a name only in the CN (browsers ignore it) or
 * matched only by a partial wildcard gets the SNI added. */
static void
test_forge_sni_not_covered_by_cn(void **state)
{
	X509 *cn_only = make_origin("lab.test", NULL);
	X509 *wild = make_origin("lab.test", "DNS:*.lab.test,DNS:w*.part.test");
	char *why = NULL, sans[256], cn[256];
	X509 *x;

	(void)state;
	x = tls_ca_forge(cn_only, "lab.test", NULL, NULL, &why);
	X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn);
	assert_string_equal(cn, "lab.test");
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:lab.test");
	assert_verifies(x, "lab.test");
	X509_free(x);

	x = tls_ca_forge(wild, "www.lab.test", NULL, NULL, &why);  /* a whole-label wildcard covers it */
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:*.lab.test,DNS:w*.part.test");
	assert_verifies(x, "www.lab.test");
	X509_free(x);
	x = tls_ca_forge(wild, "www.part.test", NULL, NULL, &why);
	sans_text(x, sans, sizeof sans);
	assert_string_equal(sans, "DNS:*.lab.test,DNS:w*.part.test,DNS:www.part.test");
	X509_free(x);

	X509_free(cn_only);
	X509_free(wild);
}

static void
test_cache_lru(void **state)
{
	X509 *orig = make_origin("www.example.test", "DNS:www.example.test,DNS:alt.example.test");
	char *why = NULL;
	X509 *a1, *a2, *a3, *b1, *b2, *c1, *d1;
	unsigned long hits;

	(void)state;
	tls_ca_cache_clear();
	tls_ca_cache_max(2);
	hits = tls_ca_cache_hits();
	a1 = tls_ca_forge(orig, "www.example.test", NULL, NULL, &why);
	a2 = tls_ca_forge(orig, "www.example.test", NULL, NULL, &why);
	a3 = tls_ca_forge(orig, "alt.example.test", NULL, NULL, &why);  /* same names covered: same entry */
	assert_ptr_equal(a1, a2);
	assert_ptr_equal(a1, a3);
	assert_int_equal(tls_ca_cache_hits(), hits + 2);
	assert_int_equal(tls_ca_cache_len(), 1);

	b1 = tls_ca_forge(NULL, "b.test", NULL, NULL, &why);
	X509_free(tls_ca_forge(orig, "www.example.test", NULL, NULL, &why));  /* a is now the most recent */
	c1 = tls_ca_forge(NULL, "c.test", NULL, NULL, &why);                   /* evicts b */
	assert_int_equal(tls_ca_cache_len(), 2);
	b2 = tls_ca_forge(NULL, "b.test", NULL, NULL, &why);                   /* forged anew, evicts a */
	assert_ptr_not_equal(b1, b2);
	d1 = tls_ca_forge(NULL, "c.test", NULL, NULL, &why);                   /* c stayed */
	assert_ptr_equal(c1, d1);
	assert_int_equal(tls_ca_cache_len(), 2);

	X509 *xs[] = { a1, a2, a3, b1, b2, c1, d1 };
	for (size_t i = 0; i < sizeof xs / sizeof xs[0]; i++)
		X509_free(xs[i]);
	tls_ca_cache_max(TLS_CA_CACHE_DEFAULT);
	X509_free(orig);
}

/* A cached certificate close to its end is forged anew, not served expired. */
static void
test_cache_renews_near_the_end(void **state)
{
	char *why = NULL;
	X509 *a1, *a2, *a3, *b1, *b2;

	(void)state;
	tls_ca_cache_clear();
	tls_ca_leaf_lifetime(3600);  /* within the day before the end from the start */
	a1 = tls_ca_forge(NULL, "renew.test", NULL, NULL, &why);
	a2 = tls_ca_forge(NULL, "renew.test", NULL, NULL, &why);
	assert_non_null(a1);
	assert_non_null(a2);
	assert_ptr_not_equal(a1, a2);
	assert_int_equal(tls_ca_cache_len(), 1);
	tls_ca_leaf_lifetime(0);
	a3 = tls_ca_forge(NULL, "renew.test", NULL, NULL, &why);  /* the short one goes */
	b1 = tls_ca_forge(NULL, "renew.test", NULL, NULL, &why);
	b2 = tls_ca_forge(NULL, "renew.test", NULL, NULL, &why);
	assert_ptr_not_equal(a3, a2);
	assert_ptr_equal(a3, b1);
	assert_ptr_equal(b1, b2);
	X509 *xs[] = { a1, a2, a3, b1, b2 };
	for (size_t i = 0; i < sizeof xs / sizeof xs[0]; i++)
		X509_free(xs[i]);
}

/* Two leaf keys, made once (tls_ca_keys_ensure): ECDSA P-256 and RSA 2048. */
static void
test_leaf_keys(void **state)
{
	(void)state;
	assert_non_null(tls_ca_leaf_key());
	assert_true(EVP_PKEY_is_a(tls_ca_leaf_key(), "EC"));
	assert_non_null(tls_ca_leaf_key_rsa());
	assert_true(EVP_PKEY_is_a(tls_ca_leaf_key_rsa(), "RSA"));
	assert_int_equal(EVP_PKEY_get_bits(tls_ca_leaf_key_rsa()), 2048);
}

/* The RSA twin of a forged certificate: same names, the RSA leaf key, key
 * usage for RSA key exchange too, signed by the CA; forged on first need and
 * then cached in the ECDSA one's entry. */
static void
test_forge_rsa_twin(void **state)
{
	X509 *orig = make_origin("twin.test", "DNS:twin.test,IP:127.0.0.1");
	char *why = NULL, sans[256], rsans[256];
	X509 *x, *x2, *x3, *r, *r2, *f, *fr, *n, *nr;
	unsigned long hits;

	(void)state;
	tls_ca_cache_clear();
	hits = tls_ca_cache_hits();
	/* a client that takes ECDSA: no RSA certificate is made */
	x = tls_ca_forge(orig, "twin.test", NULL, NULL, &why);
	assert_non_null(x);
	assert_true(EVP_PKEY_eq(X509_get0_pubkey(x), tls_ca_leaf_key()));
	assert_int_equal(X509_get_key_usage(x), KU_DIGITAL_SIGNATURE);
	/* then one that may not: the same entry gets the RSA twin */
	x2 = tls_ca_forge(orig, "twin.test", NULL, &r, &why);
	assert_ptr_equal(x, x2);
	assert_non_null(r);
	assert_int_equal(tls_ca_cache_len(), 1);
	assert_true(EVP_PKEY_eq(X509_get0_pubkey(r), tls_ca_leaf_key_rsa()));
	assert_int_equal(X509_get_key_usage(r), KU_DIGITAL_SIGNATURE | KU_KEY_ENCIPHERMENT);
	assert_int_equal(X509_NAME_cmp(X509_get_subject_name(r), X509_get_subject_name(orig)), 0);
	sans_text(x, sans, sizeof sans);
	sans_text(r, rsans, sizeof rsans);
	assert_string_equal(rsans, sans);
	assert_string_equal(rsans, "DNS:twin.test,IP:127.0.0.1");
	assert_int_not_equal(ASN1_INTEGER_cmp(X509_get0_serialNumber(x), X509_get0_serialNumber(r)), 0);
	assert_verifies(r, "twin.test");
	assert_verifies(r, "127.0.0.1");
	/* from then on both come from the cache */
	x3 = tls_ca_forge(orig, "twin.test", NULL, &r2, &why);
	assert_ptr_equal(x3, x);
	assert_ptr_equal(r2, r);
	assert_int_equal(tls_ca_cache_hits(), hits + 2);

	/* a miss that asks for both forges both */
	f = tls_ca_forge(NULL, "fresh.test", NULL, &fr, &why);
	assert_non_null(f);
	assert_non_null(fr);
	assert_int_equal(tls_ca_cache_len(), 2);
	assert_true(EVP_PKEY_eq(X509_get0_pubkey(fr), tls_ca_leaf_key_rsa()));
	sans_text(fr, rsans, sizeof rsans);
	assert_string_equal(rsans, "DNS:fresh.test");
	assert_verifies(fr, "fresh.test");
	assert_verifies(f, "fresh.test");

	/* nothing to name: neither, and *rsa says so too */
	n = tls_ca_forge(NULL, NULL, NULL, &nr, &why);
	assert_null(n);
	assert_null(nr);
	free(why);
	why = NULL;

	/* with the cache off both are still forged, every time */
	tls_ca_cache_max(0);
	n = tls_ca_forge(NULL, "nocache.test", NULL, &nr, &why);
	assert_non_null(n);
	assert_non_null(nr);
	assert_true(EVP_PKEY_eq(X509_get0_pubkey(nr), tls_ca_leaf_key_rsa()));
	assert_int_equal(tls_ca_cache_len(), 0);
	tls_ca_cache_max(TLS_CA_CACHE_DEFAULT);

	X509 *xs[] = { x, x2, x3, r, r2, f, fr, n, nr };
	for (size_t i = 0; i < sizeof xs / sizeof xs[0]; i++)
		X509_free(xs[i]);
	X509_free(orig);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ca_created),
		cmocka_unit_test(test_ca_half_refused),
		cmocka_unit_test(test_forge_copies_names),
		cmocka_unit_test(test_forge_fallbacks),
		cmocka_unit_test(test_forge_ip_sni),
		cmocka_unit_test(test_forge_san_critical),
		cmocka_unit_test(test_forge_sni_not_covered_by_cn),
		cmocka_unit_test(test_cache_lru),
		cmocka_unit_test(test_cache_renews_near_the_end),
		cmocka_unit_test(test_leaf_keys),
		cmocka_unit_test(test_forge_rsa_twin),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

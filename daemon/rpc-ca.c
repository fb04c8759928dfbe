/* RPC methods on capd's CA: ca.export. */
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "buf.h"
#include "control.h"
#include "rpc.h"
#include "tls-ca.h"
#include "tls.h"
#include "xmalloc.h"

/*
 * The subject as X509_NAME_oneline writes it ("/O=capd/CN=..."), but with each
 * value in UTF-8: oneline shows every byte past ASCII as \xC3\xBC, so a CA
 * named "Prüf-CA" read "Pr\xC3\xBCf-CA". Caller owns it.
 */
static char *
rpc_ca_subject(X509 *x)
{
	const X509_NAME *n = X509_get_subject_name(x);
	struct buf b = { 0 };
	char *out;

	for (int i = 0; i < X509_NAME_entry_count(n); i++) {
		const X509_NAME_ENTRY *e = X509_NAME_get_entry(n, i);
		const ASN1_OBJECT *o = X509_NAME_ENTRY_get_object(e);
		int nid = OBJ_obj2nid(o);
		unsigned char *v = NULL;
		int len = ASN1_STRING_to_UTF8(&v, X509_NAME_ENTRY_get_data(e));
		char oid[80];

		if (nid == NID_undef || OBJ_nid2sn(nid) == NULL)
			OBJ_obj2txt(oid, sizeof oid, o, 1);
		else
			snprintf(oid, sizeof oid, "%s", OBJ_nid2sn(nid));
		buf_append(&b, "/", 1);
		buf_append(&b, oid, strlen(oid));
		buf_append(&b, "=", 1);
		if (len >= 0)
			buf_append(&b, v, (size_t)len);
		else
			buf_append(&b, "?", 1);  /* not text in any encoding OpenSSL knows */
		OPENSSL_free(v);
	}
	out = xcalloc(1, buf_used(&b) + 1);
	if (buf_used(&b) > 0)  /* an empty subject has no storage at all */
		memcpy(out, buf_head(&b), buf_used(&b));
	buf_free(&b);
	return out;
}

/* ca.export {"der"?: bool} -> {"path", "subject", "sha256", "pem", "der"? (base64)}.
 * Creates the CA when it does not exist yet, like the first interception would. */
static json_t *
rpc_ca_export(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char *why = NULL, *subject;
	unsigned char md[EVP_MAX_MD_SIZE], *der = NULL;
	unsigned int mdlen = 0;
	char hex[EVP_MAX_MD_SIZE * 3 + 1];
	BIO *mem;
	BUF_MEM *bm;
	X509 *x;
	json_t *r;
	int derlen;

	(void)c;
	if (json_object_get(params, "der") != NULL && !json_is_boolean(json_object_get(params, "der")))
		return rpc_fail(err, RPC_E_PARAMS, "\"der\" must be true or false");
	/* the CA alone: the leaf keys would keep every paused session thread waiting */
	if (tls_ca_ensure_cert(&why) < 0) {
		r = rpc_fail(err, RPC_E_FAILED, "%s", why ? why : "cannot load the CA");
		free(why);
		return r;
	}
	x = tls_ca_cert();
	if ((mem = BIO_new(BIO_s_mem())) == NULL || PEM_write_bio_X509(mem, x) != 1) {
		BIO_free(mem);
		return rpc_fail(err, RPC_E_INTERNAL, "cannot encode the CA certificate");
	}
	BIO_get_mem_ptr(mem, &bm);
	X509_digest(x, EVP_sha256(), md, &mdlen);
	for (unsigned i = 0; i < mdlen; i++)
		snprintf(hex + 3 * i, 4, i + 1 < mdlen ? "%02X:" : "%02X", md[i]);
	hex[mdlen ? 3 * mdlen - 1 : 0] = '\0';
	subject = rpc_ca_subject(x);
	r = json_pack("{s:s, s:s, s:s, s:s%}", "path", tls_ca_cert_path(), "subject", subject, "sha256", hex, "pem",
	              bm->data, bm->length);
	free(subject);
	BIO_free(mem);
	if (r == NULL)  /* jansson takes only valid UTF-8: a BMPString may hold lone surrogates */
		return rpc_fail(err, RPC_E_INTERNAL, "cannot encode the CA certificate's subject");
	if (json_is_true(json_object_get(params, "der"))) {
		if ((derlen = i2d_X509(x, &der)) <= 0) {
			json_decref(r);
			return rpc_fail(err, RPC_E_INTERNAL, "cannot encode the CA certificate");
		}
		char *b64 = xmalloc(4 * ((size_t)derlen / 3 + 1) + 1);
		EVP_EncodeBlock((unsigned char *)b64, der, derlen);
		json_object_set_new(r, "der", json_string(b64));
		free(b64);
		OPENSSL_free(der);
	}
	return r;
}

const struct rpc_method rpc_ca_methods[] = {
	{ "ca.export", rpc_ca_export, "der" },
	{ NULL, NULL, NULL },
};

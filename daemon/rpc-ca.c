/* RPC methods on capd's CA: ca.export. */
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "control.h"
#include "rpc.h"
#include "shard.h"
#include "tls-ca.h"
#include "tls.h"
#include "xmalloc.h"

/* The reply of ca.export for CA certificate x, read from path. */
static json_t *
rpc_ca_json(X509 *x, const char *path, bool der_too, struct rpc_err *err)
{
	unsigned char md[EVP_MAX_MD_SIZE], *der = NULL;
	unsigned int mdlen = 0;
	char hex[EVP_MAX_MD_SIZE * 3 + 1], *subject;
	BIO *mem;
	BUF_MEM *bm;
	json_t *r;
	int derlen;

	if ((mem = BIO_new(BIO_s_mem())) == NULL || PEM_write_bio_X509(mem, x) != 1) {
		BIO_free(mem);
		return rpc_fail(err, RPC_E_INTERNAL, "cannot encode the CA certificate");
	}
	BIO_get_mem_ptr(mem, &bm);
	X509_digest(x, EVP_sha256(), md, &mdlen);
	for (unsigned i = 0; i < mdlen; i++)
		snprintf(hex + 3 * i, 4, i + 1 < mdlen ? "%02X:" : "%02X", md[i]);
	hex[mdlen ? 3 * mdlen - 1 : 0] = '\0';
	subject = X509_NAME_oneline(X509_get_subject_name(x), NULL, 0);
	r = json_pack("{s:s, s:s, s:s, s:s%}", "path", path, "subject", subject ? subject : "",
	              "sha256", hex, "pem", bm->data, bm->length);
	OPENSSL_free(subject);
	BIO_free(mem);
	if (der_too) {
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

/* ca.export {"der"?: bool} -> {"path", "subject", "sha256", "pem", "der"? (base64)}.
 * Creates the CA when it does not exist yet, like the first interception would. */
static json_t *
rpc_ca_export(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char *why = NULL;
	json_t *r;

	(void)c;
	if (tls_ca_ensure_shared(&why) < 0) {
		r = rpc_fail(err, RPC_E_FAILED, "%s", why ? why : "cannot load the CA");
		free(why);
		return r;
	}
	capd_lock();  /* a shard's first interception may be loading it */
	r = rpc_ca_json(tls_ca_cert(), tls_ca_cert_path(), json_is_true(json_object_get(params, "der")), err);
	capd_unlock();
	return r;
}

const struct rpc_method rpc_ca_methods[] = {
	{ "ca.export", rpc_ca_export },
	{ NULL, NULL },
};

/* RPC methods on capd's CA: ca.export. */
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "control.h"
#include "rpc.h"
#include "tls-ca.h"
#include "tls.h"
#include "xmalloc.h"

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
	subject = X509_NAME_oneline(X509_get_subject_name(x), NULL, 0);
	r = json_pack("{s:s, s:s, s:s, s:s%}", "path", tls_ca_cert_path(), "subject", subject ? subject : "",
	              "sha256", hex, "pem", bm->data, bm->length);
	OPENSSL_free(subject);
	BIO_free(mem);
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
	{ "ca.export", rpc_ca_export },
	{ NULL, NULL },
};

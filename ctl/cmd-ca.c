/* capctl ca export [--der]: capd's CA certificate, for clients to trust. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capctl.h"

/* Standard base64 to bytes; -1 on a bad character. */
static long
ca_unbase64(const char *in, unsigned char *out)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	unsigned long acc = 0;
	int bits = 0;
	long n = 0;

	for (const char *p = in; *p && *p != '='; p++) {
		const char *k = strchr(tab, *p);
		if (k == NULL || *p == '\0')
			return -1;
		acc = (acc << 6) | (unsigned long)(k - tab);
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[n++] = (unsigned char)(acc >> bits);
		}
	}
	return n;
}

#define CA_USAGE "usage: capctl ca export [--der]"

static int
ca_exec(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const verbs[] = { "export" };
	bool der = false;
	json_t *r = NULL;
	int rc;

	if (argc < 2)
		return usage_wrong(CA_USAGE, "ca needs export");
	if (word_match(argv[1], verbs, 1) < 0)
		return usage_error("unknown ca command '%s' (export)", argv[1]);
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--der"))
			der = true;
		else
			return usage_extra(CA_USAGE, argv[i]);
	}
	if ((rc = client_call(o, "ca.export", json_pack("{s:b}", "der", der), &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
	} else if (der) {
		const char *b64 = json_string_value(json_object_get(r, "der"));
		unsigned char *bytes = malloc(b64 ? strlen(b64) : 1);
		long n = b64 && bytes ? ca_unbase64(b64, bytes) : -1;
		if (n < 0) {
			fprintf(stderr, "capctl: capd sent no DER certificate\n");
			free(bytes);
			json_decref(r);
			return CTL_FAIL;
		}
		fwrite(bytes, 1, (size_t)n, stdout);
		free(bytes);
	} else {
		fputs(json_string_value(json_object_get(r, "pem")), stdout);
	}
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_ca = { "ca", "export [--der]", ca_exec };

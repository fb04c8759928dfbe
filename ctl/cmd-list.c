/* capctl list: the instances, as a table or JSON. */
#include <stdio.h>
#include <string.h>

#include "capctl.h"

/* TLS interception, and the hosts passed through because clients rejected capd's certificate. */
static void
list_tls_info(json_t *inst, char *info, size_t n)
{
	const char *tls = json_string_value(json_object_get(inst, "tls"));
	json_t *auto_pt = json_object_get(inst, "tls_passthrough_auto"), *h;
	size_t len = strlen(info), i;

	if (tls == NULL || !strcmp(tls, "no"))
		return;
	snprintf(info + len, n - len, "%stls %s", len ? ", " : "", tls);
	json_array_foreach(auto_pt, i, h) {
		len = strlen(info);
		snprintf(info + len, n - len, "%s%s", i ? " " : ", passthrough (clients rejected the certificate): ",
		         json_string_value(h));
	}
}

static int
list_exec(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const hdr[] = { "NAME", "TYPE", "LISTEN", "STATE", "SESSIONS", "UP", "DOWN", "INFO" };
	json_t *r = NULL, *inst;
	size_t i;
	int rc;

	(void)argv;
	if (argc != 1)
		return usage_error("usage: capctl list");
	if ((rc = client_call(o, "instance.list", NULL, &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
		json_decref(r);
		return CTL_OK;
	}
	struct table *t = table_new(hdr, 8);
	json_array_foreach(r, i, inst) {
		char n[24], up[16], down[16], info[512];
		const char *err = json_string_value(json_object_get(inst, "error"));
		const char *to = json_string_value(json_object_get(inst, "to"));
		snprintf(n, sizeof n, "%lld", (long long)json_integer_value(json_object_get(inst, "sessions")));
		if (err)
			snprintf(info, sizeof info, "error: %s", err);
		else if (to)
			snprintf(info, sizeof info, "to %s", to);
		else if (json_object_get(inst, "packets"))
			snprintf(info, sizeof info, "packets %lld, dropped kernel %lld, spool %lld",
			         (long long)json_integer_value(json_object_get(inst, "packets")),
			         (long long)json_integer_value(json_object_get(inst, "dropped_kernel")),
			         (long long)json_integer_value(json_object_get(inst, "dropped_spool")));
		else
			info[0] = '\0';
		list_tls_info(inst, info, sizeof info);
		table_add(t, json_string_value(json_object_get(inst, "name")), json_string_value(json_object_get(inst, "type")),
		          json_string_value(json_object_get(inst, "listen")), json_string_value(json_object_get(inst, "state")), n,
		          output_size(json_object_get(inst, "bytes_up"), up, sizeof up),
		          output_size(json_object_get(inst, "bytes_down"), down, sizeof down), info);
	}
	table_print(t);
	table_free(t);
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_list = { "list", "", list_exec };

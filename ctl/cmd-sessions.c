/*
 * capctl sessions [--instance NAME] [--open]: open and recently closed
 * sessions (the closed history, then the open ones) as an aligned table,
 * or with --json the session objects.
 * AGE is the time since the session started.
 */
#include <stdio.h>
#include <string.h>

#include "capctl.h"

static int
sessions_exec(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const hdr[] = { "ID", "INSTANCE", "PROTO", "CLIENT", "TARGET", "STATE", "UP", "DOWN", "AGE" };
	json_t *params = json_object(), *r = NULL, *s;
	size_t i;
	int rc;

	for (int k = 1; k < argc; k++) {
		const char *name = NULL;

		if (!strcmp(argv[k], "--instance") && k + 1 < argc)
			name = argv[++k];
		else if (!strcmp(argv[k], "--instance")) {
			json_decref(params);
			return usage_error("--instance needs a name");
		} else if (!strncmp(argv[k], "--instance=", 11))
			name = argv[k] + 11;
		if (name != NULL && json_object_get(params, "instance") != NULL) {
			json_decref(params);  /* the filter takes one instance: the last would win */
			return usage_error("--instance given twice");
		} else if (name != NULL) {
			json_t *v = ctl_name("--instance", name);
			if (v == NULL) {
				json_decref(params);
				return CTL_USAGE;
			}
			json_object_set_new(params, "instance", v);
		} else if (!strcmp(argv[k], "--open"))
			json_object_set_new(params, "open", json_true());
		else {
			json_decref(params);
			return usage_error("usage: capctl sessions [--instance NAME] [--open]");
		}
	}
	if ((rc = client_call(o, "session.list", params, &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
		json_decref(r);
		return CTL_OK;
	}
	struct table *t = table_new(hdr, 9);
	json_array_foreach(r, i, s) {
		char id[24], up[16], down[16], age[16];
		snprintf(id, sizeof id, "%lld", (long long)json_integer_value(json_object_get(s, "id")));
		table_add(t, id, json_string_value(json_object_get(s, "instance")), json_string_value(json_object_get(s, "proto")),
		          json_string_value(json_object_get(s, "client")), json_string_value(json_object_get(s, "target")),
		          json_string_value(json_object_get(s, "state")), output_size(json_object_get(s, "bytes_up"), up, sizeof up),
		          output_size(json_object_get(s, "bytes_down"), down, sizeof down),
		          output_age(json_string_value(json_object_get(s, "started")), age, sizeof age));
	}
	table_print(t);
	table_free(t);
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_sessions = { "sessions", "[--instance NAME] [--open]", sessions_exec };

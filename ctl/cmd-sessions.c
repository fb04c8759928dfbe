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
		int rc_opt = ctl_instance_opt(argc, argv, &k, params);

		if (rc_opt == CTL_OK)
			continue;
		if (rc_opt < 0 && !strcmp(argv[k], "--open")) {
			json_object_set_new(params, "open", json_true());
			continue;
		}
		json_decref(params);
		return rc_opt < 0 ? usage_extra("usage: capctl sessions [--instance NAME] [--open]", argv[k]) : rc_opt;
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

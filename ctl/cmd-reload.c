/* capctl reload: re-read the config; capd applies only the difference. */
#include <stdio.h>

#include "capctl.h"

static int
reload_exec(struct ctl_opts *o, int argc, char **argv)
{
	json_t *r = NULL;
	int rc;

	if (argc != 1)
		return usage_extra("usage: capctl reload", argv[1]);
	if ((rc = client_call(o, "daemon.reload", NULL, &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
	} else {
		json_t *k;
		size_t i;

		/* the rest applied, so the status stays 0; a key named here
		 * still has the value capd started with */
		json_array_foreach(json_object_get(r, "restart_only"), i, k)
			fprintf(stderr, "capctl: warning: %s changes only at restart: "
			        "capd keeps the value it started with\n", json_string_value(k));
		printf("reloaded: %lld added, %lld removed, %lld changed\n",
		       json_integer_value(json_object_get(r, "added")),
		       json_integer_value(json_object_get(r, "removed")),
		       json_integer_value(json_object_get(r, "changed")));
	}
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_reload = { "reload", "", reload_exec };

/* capctl kill ID: reset both sides of a session. */
#include <stdio.h>

#include "capctl.h"
#include "values.h"

static int
kill_exec(struct ctl_opts *o, int argc, char **argv)
{
	json_t *r = NULL;
	uint64_t id;
	int rc;

	if (argc != 2)
		return argc < 2 ? usage_wrong("usage: capctl kill ID", "kill needs a session id")
		                : usage_extra("usage: capctl kill ID", argv[2]);
	if (value_uint(argv[1], INT64_MAX, &id) < 0 || id == 0)
		return usage_error("kill: '%s' is not a session id", argv[1]);
	if ((rc = client_call(o, "session.kill", json_pack("{s:I}", "id", (json_int_t)id), &r)) != CTL_OK)
		return rc;
	if (o->json)
		output_json(r);
	else
		printf("killed session %llu\n", (unsigned long long)id);
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_kill = { "kill", "ID", kill_exec };

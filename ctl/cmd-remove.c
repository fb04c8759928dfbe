/* capctl remove NAME: stop an instance and free its port. */
#include <stdio.h>

#include "capctl.h"

static int
remove_exec(struct ctl_opts *o, int argc, char **argv)
{
	json_t *r = NULL, *name;
	int rc;

	if (argc != 2)
		return argc < 2 ? usage_wrong("usage: capctl remove NAME", "remove needs an instance name")
		                : usage_extra("usage: capctl remove NAME", argv[2]);
	if ((name = ctl_name("remove", argv[1])) == NULL)
		return CTL_USAGE;
	if ((rc = client_call(o, "instance.remove", json_pack("{s:o}", "name", name), &r)) != CTL_OK)
		return rc;
	if (o->json)
		output_json(r);
	else
		printf("removed %s\n", argv[1]);
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_remove = { "remove", "NAME", remove_exec };

/* capctl reload: re-read the config; capd applies only the difference. */
#include <stdio.h>

#include "capctl.h"

static int
reload_exec(struct ctl_opts *o, int argc, char **argv)
{
	json_t *r = NULL;
	int rc;

	(void)argv;
	if (argc != 1)
		return usage_error("usage: capctl reload");
	if ((rc = client_call(o, "daemon.reload", NULL, &r)) != CTL_OK)
		return rc;
	if (o->json)
		output_json(r);
	else
		printf("reloaded\n");
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_reload = { "reload", "", reload_exec };

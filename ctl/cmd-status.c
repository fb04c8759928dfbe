/* capctl status: what capd is running. */
#include <stdio.h>

#include "capctl.h"

/* Only while capd cannot write its capture (a full disk): said here too, as it loses data. */
static void
status_capture(struct ctl_opts *o)
{
	json_t *st = NULL;
	const char *e;

	if (client_call(o, "capture.status", NULL, &st) != CTL_OK)
		return;
	if ((e = json_string_value(json_object_get(st, "error"))) != NULL)
		printf("capture:   failing: %s (capctl capture status)\n", e);
	json_decref(st);
}

static int
status_exec(struct ctl_opts *o, int argc, char **argv)
{
	json_t *r = NULL;
	int rc;

	if (argc != 1)
		return usage_extra("usage: capctl status", argv[1]);
	if ((rc = client_call(o, "daemon.status", NULL, &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
	} else {
		printf("capd %s, pid %lld, up %.0fs\n", json_string_value(json_object_get(r, "version")),
		       (long long)json_integer_value(json_object_get(r, "pid")), json_number_value(json_object_get(r, "uptime")));
		printf("config:    %s\n", json_string_value(json_object_get(r, "config")));
		printf("control:   %s\n", json_string_value(json_object_get(r, "control")));
		printf("spool:     %s\n", json_string_value(json_object_get(r, "spool")));
		status_capture(o);
		printf("instances: %lld\n", (long long)json_integer_value(json_object_get(r, "instances")));
		printf("sessions:  %lld open\n", (long long)json_integer_value(json_object_get(r, "sessions")));
		long long w = json_integer_value(json_object_get(r, "workers"));
		printf("workers:   %lld session thread%s\n", w, w == 1 ? "" : "s");
	}
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_status = { "status", "", status_exec };

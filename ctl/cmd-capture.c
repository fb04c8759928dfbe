/* capctl capture status | rotate | sync: the spool. */
#include <stdio.h>
#include <string.h>

#include "capctl.h"

/* One line per sniffer: what it received and what the kernel and the spool dropped. */
static void
capture_sniffers(struct ctl_opts *o)
{
	json_t *list = NULL, *inst;
	size_t i;

	if (client_call(o, "instance.list", NULL, &list) != CTL_OK)
		return;
	json_array_foreach(list, i, inst) {
		if (json_object_get(inst, "packets") == NULL)
			continue;
		long long np = (long long)json_integer_value(json_object_get(inst, "packets"));
		long long ifdrop = (long long)json_integer_value(json_object_get(inst, "dropped_interface"));

		printf("sniffer:  %s on %s (%s): %lld packet%s, dropped kernel %lld, spool %lld",
		       json_string_value(json_object_get(inst, "name")), json_string_value(json_object_get(inst, "listen")),
		       json_string_value(json_object_get(inst, "state")), np, np == 1 ? "" : "s",
		       (long long)json_integer_value(json_object_get(inst, "dropped_kernel")),
		       (long long)json_integer_value(json_object_get(inst, "dropped_spool")));
		if (ifdrop > 0)  /* the device's own, apart as dumpcap says them */
			printf(", interface %lld", ifdrop);
		printf("\n");
	}
	json_decref(list);
}

#define CAPTURE_USAGE "usage: capctl capture status | rotate | sync | follow [--instance NAME]"

/* While capd cannot write (a full disk): the reason, so a growing dropped count is no riddle. */
static void
capture_error(json_t *st)
{
	const char *e = json_string_value(json_object_get(st, "error"));

	if (e != NULL)
		printf("error:    %s: capture is dropped until a write succeeds (tried every second)\n", e);
}

static int
capture_exec(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const verbs[] = { "status", "rotate", "follow", "sync" };
	static const char *const methods[] = { "capture.status", "capture.rotate", NULL, "capture.sync" };
	json_t *r = NULL;
	int v = -1, rc;

	/* follow is one of the words, so that it too may be shortened (capctl(1)) */
	if (argc >= 2 && (v = word_match(argv[1], verbs, 4)) == 2)
		return capture_follow(o, argc, argv);
	if (argc < 2)
		return usage_wrong(CAPTURE_USAGE, "capture needs status, rotate, sync or follow");
	if (v < 0)
		return usage_error("%s capture command '%s' (status, rotate, sync or follow)",
		                   v == -2 ? "ambiguous" : "unknown", argv[1]);
	if (argc != 2)
		return usage_extra(CAPTURE_USAGE, argv[2]);
	if ((rc = client_call(o, methods[v], NULL, &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
	} else {
		char b[16], db[16];
		const char *file = json_string_value(json_object_get(r, "file"));
		printf("file:     %s\n", file && *file ? file : "(none: capture is being dropped)");
		printf("files:    %lld\n", (long long)json_integer_value(json_object_get(r, "files")));
		long long np = (long long)json_integer_value(json_object_get(r, "packets"));
		long long nd = (long long)json_integer_value(json_object_get(r, "dropped_packets"));

		printf("written:  %s bytes, %lld packet%s\n", output_size(json_object_get(r, "bytes"), b, sizeof b),
		       np, np == 1 ? "" : "s");
		printf("dropped:  %lld packet%s, %s bytes\n", nd, nd == 1 ? "" : "s",
		       output_size(json_object_get(r, "dropped_bytes"), db, sizeof db));
		capture_error(r);
		if (v == 0)
			capture_sniffers(o);
	}
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_capture = { "capture", "status | rotate | sync | follow [--instance NAME]", capture_exec };

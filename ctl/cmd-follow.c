/*
 * capctl capture follow [--instance NAME]: the capture as one live pcapng
 * stream on stdout (section header, interfaces, then every packet as the
 * spool writes it), for `capctl capture follow | wireshark -k -i -`.
 * It ends cleanly, exit 0, when the reader goes away.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base64.h"
#include "capctl.h"

/* Writes a base64 string's bytes to stdout: 0, 1 when the reader left, -1 on other errors. */
static int
follow_write(const char *b64)
{
	size_t n = b64 ? strlen(b64) : 0;
	uint8_t *p = malloc(n / 4 * 3 + 1);
	long len;
	int rc = 0;

	if (p == NULL || (len = base64_decode(p, b64 ? b64 : "", n)) < 0) {
		fprintf(stderr, "capctl: capd sent data that is not base64\n");
		free(p);
		return -1;
	}
	for (long off = 0; off < len;) {
		ssize_t w = write(STDOUT_FILENO, p + off, (size_t)(len - off));
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			if (errno != EPIPE)
				fprintf(stderr, "capctl: cannot write: %s\n", strerror(errno));
			rc = errno == EPIPE ? 1 : -1;
			break;
		}
		off += w;
	}
	free(p);
	return rc;
}

int
capture_follow(struct ctl_opts *o, int argc, char **argv)
{
	json_t *params = json_object(), *r = NULL;
	struct client *c;
	long rid;
	int rc;

	for (int k = 2; k < argc; k++) {
		int rc_opt = ctl_instance_opt(argc, argv, &k, params);

		if (rc_opt == CTL_OK)
			continue;
		json_decref(params);
		return rc_opt < 0 ? usage_extra("usage: capctl capture follow [--instance NAME]", argv[k]) : rc_opt;
	}
	if (isatty(STDOUT_FILENO)) {
		json_decref(params);
		return usage_error("capture follow writes pcapng: pipe it, e.g. | wireshark -k -i -  or  | tshark -r -");
	}
	signal(SIGPIPE, SIG_IGN);
	output_watch_reader();  /* `| tshark -c 10` ends the follow without waiting for a packet */
	if ((c = client_open(o)) == NULL) {
		json_decref(params);
		return CTL_FAIL;
	}
	if ((rid = client_send(c, "capture.follow", params)) < 0 || client_wait(c, rid, &r, NULL, NULL) != CTL_OK) {
		client_close(c);
		return CTL_FAIL;
	}
	rc = follow_write(json_string_value(json_object_get(r, "data")));
	json_decref(r);
	while (rc == 0) {
		json_t *m = client_next(c), *p;
		const char *method;

		if (m == NULL) {
			client_close(c);
			return CTL_FAIL;
		}
		method = json_string_value(json_object_get(m, "method"));
		p = json_object_get(m, "params");
		if (method != NULL && !strcmp(method, "capture.data")) {
			json_int_t dropped = json_integer_value(json_object_get(p, "dropped"));
			if (dropped > 0)
				fprintf(stderr, "capctl: [... %lld packets dropped ...]\n", (long long)dropped);
			rc = follow_write(json_string_value(json_object_get(p, "data")));
		} else if (method != NULL && !strcmp(method, "capture.end")) {
			fprintf(stderr, "capctl: %s: %s; the follow ends\n",
			        json_string_value(json_object_get(p, "instance")), json_string_value(json_object_get(p, "reason")));
			/* a sniffer whose interface went away ends it as an error, as dumpcap does */
			rc = json_is_true(json_object_get(p, "failed")) ? -1 : 1;
		}
		json_decref(m);
	}
	client_close(c);
	return rc > 0 ? CTL_OK : CTL_FAIL;
}

/*
 * capctl main: global options (-s PATH, --json, --timeout), then one command from the
 * table. Exit 0 on success, 1 when capd refused or is unreachable, 2 on
 * bad usage.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capctl.h"
#include "config.h"
#include "log.h"
#include "values.h"
#include "xmalloc.h"

static const struct cmd *const cmds[] = {
	&cmd_add, &cmd_capture, &cmd_kill, &cmd_list, &cmd_reload, &cmd_remove, &cmd_sessions, &cmd_status,
	&cmd_tail, &cmd_trace, &cmd_hosts,
	&cmd_ca,
};
#define NCMDS ((int)(sizeof cmds / sizeof cmds[0]))
#define CTL_TIMEOUT_MAX 86400  /* --timeout's largest (a day): poll() counts milliseconds in an int */

static void
usage(FILE *f)
{
	fprintf(f, "usage: capctl [-s PATH] [--json] [--timeout SECONDS] COMMAND [ARGS...]\n\ncommands:\n");
	for (int i = 0; i < NCMDS; i++)
		fprintf(f, "  %s%s%s\n", cmds[i]->name, cmds[i]->usage[0] ? " " : "", cmds[i]->usage);
	fprintf(f, "\nThe socket is -s PATH, else $CAPD_SOCKET, else /run/capd/capd.sock.\n");
}

/* "capctl: " and the message, after the usage line when there is one. */
static int
usage_vprint(const char *usage, const char *fmt, va_list ap)
{
	if (usage != NULL)
		fprintf(stderr, "%s\n", usage);
	fprintf(stderr, "capctl: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	return CTL_USAGE;
}

int
usage_error(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	usage_vprint(NULL, fmt, ap);
	va_end(ap);
	return CTL_USAGE;
}

int
usage_wrong(const char *usage, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	usage_vprint(usage, fmt, ap);
	va_end(ap);
	return CTL_USAGE;
}

int
usage_extra(const char *usage, const char *arg)
{
	if (arg[0] == '-' && arg[1] != '\0')
		return usage_wrong(usage, "unknown option %s", arg);
	return usage_wrong(usage, "unexpected argument '%s'", arg);
}

/* The one message for an option given last without its value: "--dir needs a value". */
int
ctl_needs_value(const char *opt)
{
	return usage_error("%s needs a value", opt);
}

int
word_match(const char *word, const char *const *words, int n)
{
	int found = -1;
	size_t len = strlen(word);

	for (int i = 0; i < n; i++)
		if (!strcmp(word, words[i]))
			return i;
	for (int i = 0; i < n; i++)
		if (len > 0 && !strncmp(word, words[i], len)) {
			if (found >= 0)
				return -2;
			found = i;
		}
	return found;
}

/*
 * s as a JSON string (caller owns), or NULL after a usage message when it is
 * not UTF-8 text: json_string() refuses it, and json_object_set_new() would
 * then drop the key without a word (a --filter or --name left out, a
 * --instance filter that lists every instance's sessions).
 */
json_t *
ctl_string(const char *what, const char *s)
{
	json_t *v = json_string(s);

	if (v == NULL)
		usage_error("%s: the value is not UTF-8 text", what);
	return v;
}

/* No instance has an empty name: capd would only answer "no instance " (exit 1). */
json_t *
ctl_name(const char *what, const char *s)
{
	if (*s == '\0') {
		usage_error("%s: the instance name is empty", what);
		return NULL;
	}
	return ctl_string(what, s);
}

/* A name for a new instance (add --name, trace --name): what capd would
 * refuse as a bad name is a malformed value, capctl's to refuse. */
json_t *
ctl_new_name(const char *what, const char *s)
{
	if (*s != '\0' && !value_name_ok(s)) {
		usage_error("%s: bad instance name '%s' (1 to %d bytes, no spaces, quotes, slashes or control characters)",
		            what, s, VALUE_NAME_MAX);
		return NULL;
	}
	return ctl_name(what, s);
}

int
ctl_instance_opt(int argc, char **argv, int *k, json_t *params)
{
	const char *name;
	json_t *v;

	if (!strcmp(argv[*k], "--instance")) {
		if (*k + 1 >= argc)
			return ctl_needs_value(argv[*k]);
		name = argv[++*k];
	} else if (!strncmp(argv[*k], "--instance=", 11)) {
		name = argv[*k] + 11;
	} else {
		return -1;
	}
	if (json_object_get(params, "instance") != NULL)  /* one instance is asked for: the last would win */
		return usage_error("--instance given twice");
	if ((v = ctl_name("--instance", name)) == NULL)
		return CTL_USAGE;
	json_object_set_new(params, "instance", v);
	return CTL_OK;
}

/*
 * What a command printed must have reached its file: `capctl ca export >
 * ca.pem` on a full disk is a failure, not an empty file and exit 0. A
 * reader that went away (SIGPIPE ignored) is not an error, as for tail.
 */
static int
ctl_stdout_done(int rc)
{
	errno = 0;
	if (fflush(stdout) == 0 && !ferror(stdout))
		return rc;
	if (errno == EPIPE)
		return rc;
	/* stdio drops what it failed to write: errno is gone when the failure came before */
	fprintf(stderr, "capctl: cannot write the output: %s\n", errno ? strerror(errno) : "write error");
	return CTL_FAIL;
}

int
main(int argc, char **argv)
{
	struct ctl_opts o = { .socket = getenv("CAPD_SOCKET") };
	const char *names[NCMDS];
	int i, k, n = 0;

	log_init("capctl", LOG_LVL_INFO);  /* xmalloc's fatal() says who failed */
	if (o.socket == NULL || *o.socket == '\0')
		o.socket = "/run/capd/capd.sock";
	/* global options come first: -s PATH, --json, --timeout SECONDS, -h, -V; "--" ends them */
	for (i = 1; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--")) {  /* the end of the options, as getopt's */
			i++;
			break;
		}
		if (!strcmp(argv[i], "-s") || !strcmp(argv[i], "--socket")) {
			if (++i >= argc)
				return ctl_needs_value(argv[i - 1]);
			o.socket = argv[i];
		} else if (!strncmp(argv[i], "--socket=", 9)) {
			o.socket = argv[i] + 9;
		} else if (!strcmp(argv[i], "--json")) {
			o.json = true;
		} else if (!strcmp(argv[i], "--timeout") || !strncmp(argv[i], "--timeout=", 10)) {
			const char *v = argv[i][9] == '=' ? argv[i] + 10 : argv[i + 1];
			char *end;

			if (v == NULL)
				return ctl_needs_value(argv[i]);
			if (argv[i][9] != '=')
				i++;
			errno = 0;
			o.timeout = strtod(v, &end);
			/* decimal only, as every other number capctl takes: strtod also reads " 5", "0x10", "1e1" */
			if (*v == '\0' || *end != '\0' || errno || !isfinite(o.timeout) || o.timeout < 0 ||
			    strspn(v, "0123456789.") != strlen(v) ||
			    o.timeout > CTL_TIMEOUT_MAX)
				return usage_error("--timeout: '%s' is not a number of seconds from 0 (none) to %d", v,
				                   CTL_TIMEOUT_MAX);
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return ctl_stdout_done(CTL_OK);
		} else if (!strcmp(argv[i], "-V") || !strcmp(argv[i], "--version")) {
			printf("capctl %s\n", CAPD_VERSION);
			return ctl_stdout_done(CTL_OK);
		} else {
			usage(stderr);
			return usage_error("unknown option %s", argv[i]);
		}
	}
	/* an empty path would name no file but Linux's unnamed abstract socket:
	 * "cannot reach capd at : Connection refused" */
	if (*o.socket == '\0')
		return usage_error("the control socket path is empty");
	if (i >= argc) {
		usage(stderr);
		return usage_error("no command given");  /* what was wrong, after the list of what is right */
	}
	/* --json is also accepted after the command, up to a "--" */
	char **rest = xcalloc((size_t)(argc - i + 1), sizeof *rest);
	for (k = i; k < argc; k++) {
		if (!strcmp(argv[k], "--")) {
			while (k < argc)
				rest[n++] = argv[k++];
			break;
		}
		if (!strcmp(argv[k], "--json"))
			o.json = true;
		else
			rest[n++] = argv[k];
	}
	for (k = 0; k < NCMDS; k++)
		names[k] = cmds[k]->name;
	k = word_match(rest[0], names, NCMDS);
	if (k < 0) {
		usage(stderr);
		int rc = usage_error("%s command '%s'", k == -2 ? "ambiguous" : "unknown", rest[0]);
		free(rest);
		return rc;
	}
	/* COMMAND --help: its usage line, as for add TYPE --help (add's own is longer); after a
	 * sub-command or its words too (capctl hosts add --help), but never among the words of
	 * the command that trace runs */
	bool help = false;
	for (int j = 1; j < n && !help && strcmp(rest[j], "--") != 0 && (j == 1 || cmds[k] != &cmd_trace); j++)
		help = !strcmp(rest[j], "-h") || !strcmp(rest[j], "--help");
	if (help && cmds[k] != &cmd_add) {
		printf("usage: capctl %s%s%s\n", cmds[k]->name, cmds[k]->usage[0] ? " " : "", cmds[k]->usage);
		free(rest);
		return ctl_stdout_done(CTL_OK);
	}
	int rc = cmds[k]->exec(&o, n, rest);
	free(rest);
	return ctl_stdout_done(rc);
}

/*
 * capctl trace [--name N] -- COMMAND [ARGS...]
 * capctl trace [--name N] --pid PID
 *
 * Runs COMMAND (or attaches to PID) under the tracer in trace-ptrace.c and
 * streams what its sockets carried to capd as `trace.event` notifications
 * on one control connection; capd records each socket as a session of a
 * `trace` instance that lives as long as that connection. Everything that
 * can refuse (capd, seccomp, ptrace, the instance name) is checked before
 * the command is allowed to exec. The command's exit status becomes ours.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "addr.h"
#include "base64.h"
#include "capctl.h"
#include "rpc.h"
#include "trace-ptrace.h"
#include "values.h"
#include "xmalloc.h"

/* The event stream to capd; owned by trace_exec. */
struct trace_link {
	int fd;          /* -1 once capd is gone */
	struct rpc_framer in;
	const char *path;
	struct buf out;  /* reused encode buffer */
	const sigset_t *stops;  /* while tracing: the blocked signals that end a wait for capd */
	bool told_slow;  /* said that capd takes no events */
};

#define TRACE_LINK_SLOW_MS 5000  /* capd took nothing for this long: say why the program waits */
#define TRACE_LINK_GIVEUP_MS 2000  /* a stop signal and a capd that took nothing for this long: give up */

/*
 * Waits until capd takes more. The traced program waits meanwhile (a slow
 * capd loses nothing), but one of the stop signals, pending since they are
 * blocked, gives up on a capd that took nothing for a while: the trace must
 * end when asked to, even with a capd that stopped reading (a moment's wait
 * is no reason to lose the end of the recording). -1 then; trace_run takes
 * the signal after.
 */
static int
trace_link_wait(struct trace_link *l)
{
	struct pollfd pfd = { .fd = l->fd, .events = POLLOUT };
	int waited = 0;

	for (;;) {
		sigset_t pending;
		int r = poll(&pfd, 1, 200);  /* blocked signals do not wake it: look at them this often */

		if (r > 0 || (r < 0 && errno != EINTR))
			return 0;  /* writable, or the error comes out of send() */
		waited += 200;
		if (l->stops && waited >= TRACE_LINK_GIVEUP_MS && sigpending(&pending) == 0)
			for (int sig = 1; sig < NSIG; sig++)
				if (sigismember(l->stops, sig) == 1 && sigismember(&pending, sig) == 1) {
					fprintf(stderr, "capctl: capd at %s has taken no events for %d s and a stop signal came "
					        "(%s): the rest of the trace is not recorded\n", l->path, waited / 1000,
					        strsignal(sig));
					return -1;
				}
		if (waited >= TRACE_LINK_SLOW_MS && !l->told_slow) {
			fprintf(stderr, "capctl: capd at %s has taken no events for %d s; the traced program waits "
			        "for it (^C or SIGTERM gives up recording)\n", l->path, waited / 1000);
			l->told_slow = true;
		}
	}
}

static int
trace_link_open(struct trace_link *l, const struct ctl_opts *o)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };

	l->path = o->socket;
	l->fd = -1;
	rpc_framer_init(&l->in, SIZE_MAX);  /* as client.c: a reply skipped as too long would never come */
	if (strlen(o->socket) >= sizeof sun.sun_path) {
		fprintf(stderr, "capctl: cannot reach capd at %s: path too long\n", o->socket);
		return -1;
	}
	strcpy(sun.sun_path, o->socket);
	if ((l->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
	    connect(l->fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
		fprintf(stderr, "capctl: cannot reach capd at %s: %s\n", o->socket, strerror(errno));
		if (l->fd >= 0)
			close(l->fd);
		l->fd = -1;
		return -1;
	}
	return 0;
}

static void
trace_link_close(struct trace_link *l)
{
	if (l->fd >= 0)
		close(l->fd);
	l->fd = -1;
	rpc_framer_free(&l->in);
	buf_free(&l->out);
}

/* Writes one message (stolen); a capd that went away is reported once. */
static int
trace_link_send(struct trace_link *l, json_t *msg)
{
	if (l->fd < 0) {
		json_decref(msg);
		return -1;
	}
	buf_consume(&l->out, buf_used(&l->out));
	rpc_encode(&l->out, msg);
	json_decref(msg);
	for (size_t off = 0; off < buf_used(&l->out);) {
		ssize_t n = send(l->fd, buf_head(&l->out) + off, buf_used(&l->out) - off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if (trace_link_wait(l) == 0)
					continue;
				close(l->fd);
				l->fd = -1;
				return -1;
			}
			fprintf(stderr, "capctl: lost capd at %s: %s; the command goes on unrecorded\n", l->path,
			        strerror(errno));
			close(l->fd);
			l->fd = -1;
			return -1;
		}
		off += (size_t)n;
	}
	return 0;
}

/* Waits for the reply to request id 1. */
static int
trace_link_reply(struct trace_link *l, json_t **result)
{
	for (;;) {
		char *line;
		size_t len;
		enum rpc_frame fr = rpc_framer_next(&l->in, &line, &len);

		if (fr == RPC_FRAME_LINE) {
			json_t *m = json_loadb(line, len, 0, NULL), *err;
			if (m == NULL || json_object_get(m, "method")) {
				json_decref(m);
				continue;
			}
			if ((err = json_object_get(m, "error")) != NULL) {
				const char *msg = json_string_value(json_object_get(err, "message"));
				fprintf(stderr, "capctl: %s\n", msg ? msg : "capd refused");
				json_decref(m);
				return CTL_FAIL;
			}
			*result = json_incref(json_object_get(m, "result"));
			json_decref(m);
			return CTL_OK;
		}
		if (fr == RPC_FRAME_TOO_LONG)
			continue;
		ssize_t n = read(l->fd, buf_reserve(&l->in.in, 65536), 65536);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "capctl: capd closed the connection\n");
			return CTL_FAIL;
		}
		buf_commit(&l->in.in, (size_t)n);
	}
}

/* The length of the UTF-8 sequence at p, as jansson checks it; 0 when it is not one. */
static size_t
trace_utf8_len(const unsigned char *p)
{
	uint32_t cp, min;
	size_t n;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2, min = 0x80, cp = p[0] & 0x1f;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		n = 3, min = 0x800, cp = p[0] & 0x0f;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		n = 4, min = 0x10000, cp = p[0] & 0x07;
	else
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)  /* the terminating NUL stops here too */
			return 0;
		cp = cp << 6 | (p[i] & 0x3f);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/*
 * A byte string from our command line or the traced program (arguments,
 * process names) as a JSON string, each byte that is not UTF-8 written as
 * \xNN: json_string() returns NULL for it, and the parameter would be left
 * out. So is a control character: a newline in an `sh -c` script would
 * break capctl list's table and tail events' lines. Caller owns.
 */
static json_t *
trace_text(const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	char *out = xmalloc(strlen(s) * 4 + 1), *o = out;
	json_t *j;

	while (*p) {
		size_t n = trace_utf8_len(p);
		if (n == 0 || *p < 0x20 || *p == 0x7f) {
			o += sprintf(o, "\\x%02x", *p++);
			continue;
		}
		memcpy(o, p, n);
		o += n;
		p += n;
	}
	*o = '\0';
	j = json_string(out);
	free(out);
	return j;
}

static const char *const trace_kinds[] = {
	[TRACE_EV_OPEN] = "open", [TRACE_EV_DATA] = "data", [TRACE_EV_LOST] = "lost",
	[TRACE_EV_SHUTDOWN] = "shutdown", [TRACE_EV_CLOSE] = "close",
};

/* The tracer's callback: one trace.event notification per event. */
static void
trace_event_cb(const struct trace_event *ev, void *arg)
{
	struct trace_link *l = arg;
	json_t *p = json_object();
	char a[ADDR_STRLEN];

	if (l->fd < 0) {
		json_decref(p);
		return;
	}
	json_object_set_new(p, "sock", json_integer((json_int_t)ev->sock));
	json_object_set_new(p, "kind", json_string(trace_kinds[ev->kind]));
	json_object_set_new(p, "pid", json_integer(ev->pid));
	switch (ev->kind) {
	case TRACE_EV_OPEN:
		json_object_set_new(p, "proto", json_string(ev->tcp ? "tcp" : "udp"));
		json_object_set_new(p, "role", json_string(ev->server ? "server" : "client"));
		json_object_set_new(p, "local", json_string(addr_format(ev->local, a, sizeof a)));
		json_object_set_new(p, "remote", json_string(addr_format(ev->remote, a, sizeof a)));
		json_object_set_new(p, "comm", trace_text(ev->comm ? ev->comm : "?"));
		break;
	case TRACE_EV_DATA:
		json_object_set_new(p, "dir", json_string(ev->dir == TRACE_SEND ? "send" : "recv"));
		json_object_set_new(p, "data", base64_json(ev->data, ev->len));
		break;
	case TRACE_EV_LOST:
		json_object_set_new(p, "dir", json_string(ev->dir == TRACE_SEND ? "send" : "recv"));
		json_object_set_new(p, "len", json_integer((json_int_t)ev->len));
		break;
	case TRACE_EV_SHUTDOWN:
		json_object_set_new(p, "dir", json_string(ev->dir == TRACE_SEND ? "send" : "recv"));
		break;
	case TRACE_EV_CLOSE:
		json_object_set_new(p, "reason", json_string(ev->reason ? ev->reason : "closed"));
		break;
	}
	trace_link_send(l, rpc_notification("trace.event", p));
}

static char *
trace_join(char **argv, int argc)
{
	size_t len = 1;
	char *s;

	for (int i = 0; i < argc; i++)
		len += strlen(argv[i]) + 1;
	s = xcalloc(1, len);
	for (int i = 0; i < argc; i++) {
		if (i)
			strcat(s, " ");
		strcat(s, argv[i]);
	}
	return s;
}

static int
trace_exec(struct ctl_opts *o, int argc, char **argv)
{
	const char *name = NULL, *pidarg = NULL;
	char **cmd = NULL, *why = NULL, *cmdline;
	int ncmd = 0, i, rc;
	uint64_t pid = 0;
	struct trace_link link = { .fd = -1 };
	struct tracer *t;
	json_t *params, *result = NULL;

	for (i = 1; i < argc; i++) {
		bool is_name = !strcmp(argv[i], "--name") || !strcmp(argv[i], "-n") || !strncmp(argv[i], "--name=", 7);
		bool is_pid = !strcmp(argv[i], "--pid") || !strcmp(argv[i], "-p") || !strncmp(argv[i], "--pid=", 6);

		if (!strcmp(argv[i], "--")) {
			i++;
			break;
		}
		if ((is_name && name != NULL) || (is_pid && pidarg != NULL))  /* the last would win */
			return usage_error("trace: %s given twice", is_name ? "--name" : "--pid");
		if (!strcmp(argv[i], "--name") || !strcmp(argv[i], "-n")) {
			if (++i >= argc)
				return ctl_needs_value(argv[i - 1]);
			name = argv[i];
		} else if (!strncmp(argv[i], "--name=", 7)) {
			name = argv[i] + 7;
		} else if (!strcmp(argv[i], "--pid") || !strcmp(argv[i], "-p")) {
			if (++i >= argc)
				return ctl_needs_value(argv[i - 1]);
			pidarg = argv[i];
		} else if (!strncmp(argv[i], "--pid=", 6)) {
			pidarg = argv[i] + 6;
		} else if (argv[i][0] == '-') {
			return usage_error("trace: unknown option %s (usage: capctl trace [--name N] -- COMMAND [ARGS...] "
			                   "| --pid PID)", argv[i]);
		} else {
			break;  /* the command, without "--" */
		}
	}
	cmd = argv + i;
	ncmd = argc - i;
	if (pidarg && ncmd > 0)
		return usage_error("trace: give either --pid PID or a command, not both");
	if (!pidarg && ncmd == 0)
		return usage_error("usage: capctl trace [--name N] -- COMMAND [ARGS...] | capctl trace [--name N] --pid PID");
	if (pidarg && (value_uint(pidarg, INT32_MAX, &pid) < 0 || pid == 0))
		return usage_error("trace: '%s' is not a process id", pidarg);
	if (pidarg && (pid_t)pid == getpid())
		return usage_error("trace: capctl cannot trace itself");
	if (name != NULL) {  /* refused now, not left out of the request later */
		json_t *v = ctl_new_name("trace --name", name);
		if (v == NULL)
			return CTL_USAGE;
		json_decref(v);
	}

	/* refuse before the command starts: tracing, then capd */
	if (trace_check(pidarg != NULL, &why) < 0) {
		fprintf(stderr, "capctl: %s\n", why);
		free(why);
		return CTL_FAIL;
	}
	if (trace_link_open(&link, o) < 0) {
		trace_link_close(&link);
		return CTL_FAIL;
	}
	if (pidarg)
		t = trace_attach((pid_t)pid, trace_event_cb, &link, &why);
	else
		t = trace_spawn(cmd, trace_event_cb, &link, &why);
	if (t == NULL) {
		fprintf(stderr, "capctl: %s\n", why);
		free(why);
		trace_link_close(&link);
		return CTL_FAIL;
	}

	cmdline = pidarg ? NULL : trace_join(cmd, ncmd);
	params = json_object();
	json_object_set_new(params, "pid", json_integer(trace_pid(t)));
	json_object_set_new(params, "command", trace_text(cmdline ? cmdline : trace_comm(t)));
	if (name)
		json_object_set_new(params, "name", json_string(name));
	free(cmdline);
	if (trace_link_send(&link, rpc_request("trace.start", params, 1)) < 0 ||
	    trace_link_reply(&link, &result) != CTL_OK) {
		trace_abort(t);  /* after --pid, exiting detaches */
		trace_free(t);
		trace_link_close(&link);
		return CTL_FAIL;
	}
	json_decref(result);

	/*
	 * A spawned command shares our terminal: ^C reaches it directly, so we
	 * wait for it to decide. TERM and HUP sent to capctl alone are passed
	 * on. Once the command has exited, any of them goes to the processes
	 * it left behind (a daemon is deaf to our terminal). After --pid, any
	 * of them detaches. trace_run takes them from here on; they stay
	 * blocked, pending until it does (the command, forked already, runs
	 * with the mask it had).
	 */
	sigset_t stops, oldmask;
	sigemptyset(&stops);
	sigaddset(&stops, SIGTERM);
	sigaddset(&stops, SIGHUP);
	sigaddset(&stops, SIGINT);
	sigaddset(&stops, SIGQUIT);
	sigprocmask(SIG_BLOCK, &stops, &oldmask);
	link.stops = &stops;
	if (!pidarg && trace_release(t, &why) < 0) {
		fprintf(stderr, "capctl: %s\n", why);
		free(why);
		trace_abort(t);
		trace_free(t);
		trace_link_close(&link);
		sigprocmask(SIG_SETMASK, &oldmask, NULL);
		return CTL_FAIL;
	}
	rc = trace_run(t, &stops);
	/* the trace is over: a ^C from here on (a stalled output) ends capctl as usual */
	sigprocmask(SIG_SETMASK, &oldmask, NULL);
	trace_free(t);
	/* closing the connection ends the trace instance in capd */
	trace_link_close(&link);
	return rc;
}

const struct cmd cmd_trace = { "trace", "[--name N] -- COMMAND [ARGS...] | --pid PID", trace_exec };

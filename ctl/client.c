/* The connection to capd: blocking, one request at a time, notifications passed on. */
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "capctl.h"
#include "monotime.h"
#include "rpc.h"
#include "xmalloc.h"

/* Bytes asked of each read: a follow at 150 MB/s took 64 KiB a time, and
 * the wake-ups it cost let capd's queue for it fill and drop packets. */
#define CLIENT_READ (1u << 20)

struct client {
	int fd;
	long next_id;
	struct rpc_framer framer;
	double timeout;      /* --timeout for this call, 0 = none */
	double deadline;     /* CLOCK_MONOTONIC seconds its reply must come by */
	const char *socket;  /* borrowed from the options */
};

static void
client_timed_out(const char *socket, double timeout)
{
	fprintf(stderr, "capctl: no reply from capd at %s within %g s (--timeout): it is stopped or wedged\n",
	        socket, timeout);
}

/* A connection whose connect, request and reply must all be done within
 * timeout seconds (0: none); client_open for streams, which have none. */
static struct client *
client_open_within(const struct ctl_opts *o, double timeout)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	struct client *c;
	double start = mono_now();
	int fd;

	if (strlen(o->socket) >= sizeof sun.sun_path) {
		fprintf(stderr, "capctl: cannot reach capd at %s: path too long\n", o->socket);
		return NULL;
	}
	strcpy(sun.sun_path, o->socket);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && timeout > 0) {
		/* bounds a connect to a capd whose backlog is full (it stopped
		 * accepting) and the send of the request */
		struct timeval tv = { .tv_sec = (time_t)timeout,
		                      .tv_usec = (suseconds_t)((timeout - floor(timeout)) * 1e6) };
		if (tv.tv_sec == 0 && tv.tv_usec == 0)
			tv.tv_usec = 1;
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	}
	if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0) {
		int e = errno;
		struct stat st;

		if (fd >= 0 && timeout > 0 && (e == EAGAIN || e == EINPROGRESS)) {
			client_timed_out(o->socket, timeout);
			close(fd);
			return NULL;
		}

		/* Linux refuses a connect to a file or a folder as to a socket nobody
		 * accepts on: "Connection refused" would send the user to start capd */
		if (fd >= 0 && e == ECONNREFUSED && stat(o->socket, &st) == 0 && !S_ISSOCK(st.st_mode))
			fprintf(stderr, "capctl: cannot reach capd at %s: not a socket (a %s)\n", o->socket,
			        S_ISDIR(st.st_mode) ? "folder" : "file");
		else if (fd >= 0 && e == ECONNREFUSED)
			/* a capd that stopped after giving up root may have been unable
			 * to remove it; a killed one leaves it too */
			fprintf(stderr, "capctl: cannot reach capd at %s: %s (capd is not running; the socket "
			        "is left from an earlier one)\n", o->socket, strerror(e));
		else
			fprintf(stderr, "capctl: cannot reach capd at %s: %s\n", o->socket, strerror(e));
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	c = xcalloc(1, sizeof *c);
	c->fd = fd;
	c->next_id = 1;
	/* capd caps what it reads, not what it answers: a list of thousands of
	 * sessions is one line of many MiB, and capctl reads it whole */
	rpc_framer_init(&c->framer, SIZE_MAX);
	c->timeout = timeout;
	c->deadline = timeout > 0 ? start + timeout : 0;
	c->socket = o->socket;
	return c;
}

struct client *
client_open(const struct ctl_opts *o)
{
	return client_open_within(o, 0);
}

void
client_close(struct client *c)
{
	if (c == NULL)
		return;
	close(c->fd);
	rpc_framer_free(&c->framer);
	free(c);
}

/* What capd said before it closed on us (why it refused this user), printed;
 * -1 when it said nothing. */
static int
client_last_word(struct client *c)
{
	char *line;
	size_t len;

	for (;;) {
		if (rpc_framer_next(&c->framer, &line, &len) == RPC_FRAME_LINE) {
			json_t *m = json_loadb(line, len, 0, NULL);
			const char *msg = json_string_value(json_object_get(json_object_get(m, "error"), "message"));
			int rc = msg ? 0 : -1;
			if (msg)
				fprintf(stderr, "capctl: %s\n", msg);
			json_decref(m);
			return rc;
		}
		ssize_t n = recv(c->fd, buf_reserve(&c->framer.in, 4096), 4096, MSG_DONTWAIT);
		if (n <= 0)
			return -1;
		buf_commit(&c->framer.in, (size_t)n);
	}
}

long
client_send(struct client *c, const char *method, json_t *params)
{
	struct buf out = { 0 };
	long id = c->next_id++;
	json_t *req = rpc_request(method, params ? params : json_object(), id);

	rpc_encode(&out, req);
	json_decref(req);
	for (size_t off = 0; off < buf_used(&out);) {
		ssize_t n = send(c->fd, buf_head(&out) + off, buf_used(&out) - off, MSG_NOSIGNAL);
		if (n < 0) {
			int e = errno;
			if (e == EINTR)
				continue;
			if (e == EAGAIN && c->deadline > 0) {
				client_timed_out(c->socket, c->timeout);
				buf_free(&out);
				return -1;
			}
			if ((e == EPIPE || e == ECONNRESET) && client_last_word(c) == 0) {
				buf_free(&out);
				return -1;
			}
			fprintf(stderr, "capctl: lost capd: %s\n", strerror(e));
			buf_free(&out);
			return -1;
		}
		off += (size_t)n;
	}
	buf_free(&out);
	return id;
}

/*
 * A session.data or capture.data line parsed without running jansson's
 * lexer over its payload: that took three quarters of capctl's time, and
 * `capture follow` could not read more than ~80 MB/s, so capd dropped
 * packets for a reader that kept up. The base64 string (no escapes, no
 * quotes: checked) is cut out, the rest parsed, the string put back as
 * params.data. NULL when the line is not of that shape: it is parsed whole.
 */
static json_t *
client_parse_data(const char *line, size_t len)
{
	static const char *const heads[] = {
		"{\"jsonrpc\":\"2.0\",\"method\":\"capture.data\",\"params\":{",
		"{\"jsonrpc\":\"2.0\",\"method\":\"session.data\",\"params\":{",
	};
	const char *end = line + len, *key = NULL, *b, *q;
	json_t *m, *params;
	char *rest;

	if (len < 4096)  /* small lines gain nothing */
		return NULL;
	for (size_t i = 0; i < sizeof heads / sizeof heads[0] && key == NULL; i++) {
		size_t hl = strlen(heads[i]);
		/* params' keys before "data" (id, dir, time, offset) hold no objects and no such text */
		if (len > hl && !memcmp(line, heads[i], hl))
			key = memmem(line + hl, len - hl, "\"data\":\"", 8);
	}
	if (key == NULL)
		return NULL;
	b = key + 8;
	if ((q = memchr(b, '"', (size_t)(end - b))) == NULL || memchr(b, '\\', (size_t)(q - b)) != NULL)
		return NULL;
	rest = malloc((size_t)(b - line) + (size_t)(end - q));
	if (rest == NULL)
		return NULL;
	memcpy(rest, line, (size_t)(b - line));
	memcpy(rest + (b - line), q, (size_t)(end - q));
	m = json_loadb(rest, (size_t)(b - line) + (size_t)(end - q), 0, NULL);
	free(rest);
	if (m == NULL || !json_is_object(params = json_object_get(m, "params"))) {
		json_decref(m);
		return NULL;
	}
	/* base64 is ASCII: nothing for jansson's UTF-8 check to find */
	json_object_set_new(params, "data", json_stringn_nocheck(b, (size_t)(q - b)));
	return m;
}

/* One line of capd's as JSON; prints why and returns NULL when it is not. */
static json_t *
client_parse(const char *line, size_t len)
{
	json_error_t err;
	json_t *m = client_parse_data(line, len);

	if (m != NULL)
		return m;
	m = json_loadb(line, len, 0, &err);

	if (m == NULL)
		fprintf(stderr, "capctl: capd sent something that is not JSON: %s\n", err.text);
	return m;
}

json_t *
client_next(struct client *c)
{
	char *line;
	size_t len;

	for (;;) {
		enum rpc_frame fr = rpc_framer_next(&c->framer, &line, &len);
		if (fr == RPC_FRAME_LINE)
			return client_parse(line, len);
		if (fr == RPC_FRAME_TOO_LONG) {
			/* skipping it would leave us waiting for a reply that was just dropped */
			fprintf(stderr, "capctl: capd sent a message too long to read\n");
			return NULL;
		}
		if (c->deadline > 0) {
			double left = c->deadline - mono_now();
			struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
			int r = left > 0 ? poll(&pfd, 1, (int)ceil(left * 1000)) : 0;
			if (r < 0 && errno == EINTR)
				continue;
			if (r == 0) {
				client_timed_out(c->socket, c->timeout);
				return NULL;
			}
		}
		ssize_t n = read(c->fd, buf_reserve(&c->framer.in, CLIENT_READ), CLIENT_READ);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fprintf(stderr, "capctl: lost capd: %s\n", strerror(errno));
			return NULL;
		}
		if (n == 0) {
			fprintf(stderr, "capctl: capd closed the connection\n");
			return NULL;
		}
		buf_commit(&c->framer.in, (size_t)n);
	}
}

int
client_wait(struct client *c, long id, json_t **result, void (*cb)(json_t *note, void *arg), void *arg)
{
	for (;;) {
		json_t *m = client_next(c);
		json_t *mid, *err;

		if (m == NULL)
			return CTL_FAIL;  /* client_next said why */
		mid = json_object_get(m, "id");
		if (mid == NULL && json_object_get(m, "method")) {
			if (cb)
				cb(m, arg);
			json_decref(m);
			continue;
		}
		if (!json_is_integer(mid) || json_integer_value(mid) != id) {
			/* an error with a null id: capd could not read our request */
			if ((err = json_object_get(m, "error")) != NULL && json_is_null(mid)) {
				fprintf(stderr, "capctl: %s\n", json_string_value(json_object_get(err, "message")));
				json_decref(m);
				return CTL_FAIL;
			}
			json_decref(m);
			continue;
		}
		if ((err = json_object_get(m, "error")) != NULL) {
			const char *msg = json_string_value(json_object_get(err, "message"));
			fprintf(stderr, "capctl: %s\n", msg ? msg : "capd refused");
			json_decref(m);
			return CTL_FAIL;
		}
		if (result)
			*result = json_incref(json_object_get(m, "result"));
		json_decref(m);
		return CTL_OK;
	}
}

int
client_call(const struct ctl_opts *o, const char *method, json_t *params, json_t **result)
{
	struct client *c = client_open_within(o, o->timeout);
	long id;
	int rc;

	if (c == NULL) {
		json_decref(params);
		return CTL_FAIL;
	}
	if ((id = client_send(c, method, params)) < 0) {
		client_close(c);
		return CTL_FAIL;
	}
	rc = client_wait(c, id, result, NULL, NULL);
	client_close(c);
	return rc;
}

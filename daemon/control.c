/*
 * The control server: a Unix stream socket speaking newline-delimited
 * JSON-RPC 2.0. Each connection frames lines, dispatches them to the method
 * tables of the rpc-*.c files, and queues replies and notifications.
 * A connection that fails is only marked dead; it is closed on the next
 * loop pass, so callers that are sending to it never see it freed.
 */
#include "control.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <poll.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "capd.h"
#include "config.h"
#include "log.h"
#include "monotime.h"
#include "rpc.h"
#include "xmalloc.h"

#if HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#define CTL_OUT_MAX (64 * 1024 * 1024)  /* a peer that stops reading this much is dropped */
#define CTL_REQUEST_TIMEOUT 30.0        /* a request line must arrive complete within this */
#define CTL_PEER_CACHE_TTL 5.0          /* seconds a uid's group answer is reused (capd.8) */
#define CTL_PEER_CACHE_MAX 16           /* uids remembered at once */

struct ctl_on_close {
	void (*cb)(void *arg);
	void *arg;
};

/* Owned by the connection list; freed by ctl_conn_reap after it is marked dead. */
struct ctl_conn {
	struct ctl_conn *next;
	int fd;
	ev_io rio, wio;
	ev_timer timer;          /* first- and partial-request deadline */
	struct rpc_framer framer;
	struct buf out;
	int uid, gid, pid;
	bool dead;
	bool rd_eof;             /* the peer sent its last request (a half-close): close once answered */
	bool heard;              /* a complete request came: the connection may idle from now on */
	struct ctl_on_close *on_close;  /* owned; grows with the connection's subscriptions */
	struct ctl_on_close on_drain;   /* a stream that queues as the peer reads (ctl_conn_on_drain) */
	int n_on_close, cap_on_close;
	json_t *call_id;         /* the id of the request being dispatched, borrowed */
	json_t *batch;           /* owned: a batch being answered, its requests taken in turn */
	size_t batch_next;       /* the batch's next request */
	json_t *batch_out;       /* owned: the batch's replies so far, sent as one array at its end */
	bool in_call, deferred;  /* a method is running; it took its reply for later */
	struct ctl_later *later; /* the reply it waits for: its next requests wait too */
};

/* A reply owed for a method whose work finishes later (ctl_later_new). */
struct ctl_later {
	struct ctl_conn *c;      /* NULL once the connection closed */
	json_t *id;              /* owned; NULL for a notification */
};

static const struct rpc_method *const rpc_tables[] = {
	rpc_daemon_methods,
	rpc_instance_methods,
	rpc_session_methods,
	rpc_tail_methods,
	rpc_capture_methods,
	rpc_hosts_methods,
	rpc_trace_methods,
	rpc_ca_methods,
};

#define CTL_LISTEN_MAX 8  /* sockets systemd may pass (capd.socket's ListenStream= lines) */

/* The listening sockets: ctl_fds[0] is the one capctl is told about. */
static int ctl_fds[CTL_LISTEN_MAX];
static int ctl_nfds;
static ev_io ctl_accept_io[CTL_LISTEN_MAX];
/* A descriptor held for the control socket alone: when sessions have taken
 * every other one, the operator still gets in to see and kill them. */
static int ctl_spare_fd = -1;
static char *ctl_path;       /* unlinked at stop when we created it */
static char *ctl_made_dir;   /* the socket's folder, when capd made it: given to capd's user */
static char *ctl_lock_path;  /* <socket>.lock, flocked while capd owns the socket path */
static int ctl_lock_fd = -1;
static char *ctl_passed_path; /* the socket systemd passed, where capctl finds capd */
static gid_t ctl_gid = (gid_t)-1;
static ev_timer ctl_accept_pause;
/* The answers of the group database for the last few uids, so that a burst of
 * capctl calls (a script, a watch) costs one getgrouplist on the main loop,
 * which may be a round trip to LDAP or SSSD. */
static struct ctl_peer_seen {
	uid_t uid;
	bool allowed;
	double when;  /* CLOCK_MONOTONIC seconds; 0 for an empty slot */
} ctl_peer_cache[CTL_PEER_CACHE_MAX];
static ev_prepare ctl_reaper;
static struct ctl_conn *ctl_conns;
static int ctl_dead_pending;

static void ctl_conn_kill(struct ctl_conn *c);
static void ctl_conn_process(struct ctl_conn *c);

json_t *
rpc_fail(struct rpc_err *err, int code, const char *fmt, ...)
{
	va_list ap;

	free(err->msg);
	va_start(ap, fmt);
	if (vasprintf(&err->msg, fmt, ap) < 0)
		err->msg = NULL;
	va_end(ap);
	err->code = code;
	return NULL;
}

static const struct rpc_method *
ctl_find_method(const char *name)
{
	for (size_t t = 0; t < sizeof rpc_tables / sizeof rpc_tables[0]; t++)
		for (const struct rpc_method *m = rpc_tables[t]; m->name; m++)
			if (!strcmp(m->name, name))
				return m;
	return NULL;
}

/* A peer that half-closed after its requests gets every reply, then the
 * close; one that subscribed keeps its stream until a send fails. */
static void
ctl_conn_done_check(struct ctl_conn *c)
{
	if (c->rd_eof && !c->dead && !c->in_call && c->later == NULL && c->batch == NULL && c->n_on_close == 0 &&
	    buf_used(&c->out) == 0 && buf_used(&c->framer.in) == 0)
		ctl_conn_kill(c);
}

static void
ctl_conn_flush(struct ctl_conn *c)
{
	while (buf_used(&c->out) > 0) {
		ssize_t n = send(c->fd, buf_head(&c->out), buf_used(&c->out), MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				/* tail and events send from worker threads too: the main loop must see it */
				ev_io_start(capd_main, &c->wio);
				shard_wake(capd_main);
				return;
			}
			ctl_conn_kill(c);
			return;
		}
		buf_consume(&c->out, (size_t)n);
	}
	ev_io_stop(capd_main, &c->wio);
	ctl_conn_done_check(c);
}

/* After a message was queued: the peer gets it now, or when it can take it. */
static void
ctl_conn_sent(struct ctl_conn *c)
{
	if (buf_used(&c->out) > CTL_OUT_MAX) {
		log_warnx("control: peer pid %d stopped reading; dropping it", c->pid);
		ctl_conn_kill(c);
		return;
	}
	if (!ev_is_active(&c->wio))
		ctl_conn_flush(c);
}

void
ctl_conn_send(struct ctl_conn *c, json_t *msg)
{
	if (c->dead) {
		json_decref(msg);
		return;
	}
	rpc_encode(&c->out, msg);
	json_decref(msg);
	ctl_conn_sent(c);
}

void
ctl_conn_send_line(struct ctl_conn *c, const void *p, size_t n)
{
	if (c->dead)
		return;
	buf_append(&c->out, p, n);
	ctl_conn_sent(c);
}

size_t
ctl_conn_queued(struct ctl_conn *c)
{
	return c->dead ? 0 : buf_used(&c->out);
}

int
ctl_conn_uid(struct ctl_conn *c)
{
	return c->uid;
}

void
ctl_conn_on_close(struct ctl_conn *c, void (*cb)(void *arg), void *arg)
{
	if (c->n_on_close == c->cap_on_close) {
		c->cap_on_close = c->cap_on_close ? c->cap_on_close * 2 : 4;
		c->on_close = xrealloc(c->on_close, (size_t)c->cap_on_close * sizeof *c->on_close);
	}
	c->on_close[c->n_on_close++] = (struct ctl_on_close){ cb, arg };
}

void
ctl_conn_on_drain(struct ctl_conn *c, void (*cb)(void *arg), void *arg)
{
	c->on_drain = (struct ctl_on_close){ cb, arg };
}

void
ctl_conn_stream_buffer(struct ctl_conn *c, int bytes)
{
	/* the kernel caps it at net.core.wmem_max: what is left waits in c->out */
	if (setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) < 0)
		log_debug("control: SO_SNDBUF %d for peer pid %d: %s", bytes, c->pid, strerror(errno));
}

bool
ctl_conn_closing(struct ctl_conn *c)
{
	return c->dead;
}

void
ctl_conn_on_close_cancel(struct ctl_conn *c, void (*cb)(void *arg), void *arg)
{
	for (int i = 0; i < c->n_on_close; i++)
		if (c->on_close[i].cb == cb && c->on_close[i].arg == arg) {
			c->on_close[i] = c->on_close[--c->n_on_close];
			/* a half-closed peer whose last stream ended (session.end) is done */
			ctl_conn_done_check(c);
			return;
		}
}

static void
ctl_conn_kill(struct ctl_conn *c)
{
	if (c->dead)
		return;
	c->dead = true;
	ev_io_stop(capd_main, &c->rio);
	ev_io_stop(capd_main, &c->wio);
	ev_timer_stop(capd_main, &c->timer);
	ctl_dead_pending = 1;
	shard_wake(capd_main);  /* its reaper runs on the main loop */
}

/* Takes the spare descriptor again once one is free (a control connection closed). */
static void
ctl_spare_take(void)
{
	if (ctl_spare_fd < 0)
		ctl_spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

static void
ctl_reap_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct ctl_conn **pp, *c;

	(void)loop; (void)w; (void)revents;
	if (!ctl_dead_pending)
		return;
	ctl_dead_pending = 0;
	for (pp = &ctl_conns; (c = *pp) != NULL;) {
		if (!c->dead) {
			pp = &c->next;
			continue;
		}
		*pp = c->next;
		/* subscriptions let go of the connection before it is freed */
		for (int i = 0; i < c->n_on_close; i++)
			c->on_close[i].cb(c->on_close[i].arg);
		free(c->on_close);
		json_decref(c->batch);
		json_decref(c->batch_out);
		close(c->fd);
		ctl_spare_take();
		rpc_framer_free(&c->framer);
		buf_free(&c->out);
		free(c);
	}
}

/* A reply (stolen) goes out now, or into the array of the batch it answers. */
static void
ctl_reply(struct ctl_conn *c, json_t *msg)
{
	if (c->batch != NULL)
		json_array_append_new(c->batch_out, msg);
	else
		ctl_conn_send(c, msg);
}

static void
ctl_reply_error(struct ctl_conn *c, json_t *id, int code, const char *msg)
{
	ctl_reply(c, rpc_error(id, code, msg));
}

/* A key of params that m does not take (a word of its list, matched whole), or NULL. */
static const char *
ctl_unknown_param(const struct rpc_method *m, json_t *params)
{
	const char *takes = m->params, *key;
	json_t *v;

	if (takes == NULL)
		return NULL;
	json_object_foreach(params, key, v) {
		size_t n = strlen(key);
		const char *p = takes;
		bool known = false;

		/* no key holds the list's separators: "instance, open" is none of its words */
		while (n > 0 && strpbrk(key, ", ") == NULL && !known && (p = strstr(p, key)) != NULL) {
			known = (p == takes || p[-1] == ' ') && (p[n] == ',' || p[n] == '\0');
			p += n;
		}
		if (!known)
			return key;
	}
	return NULL;
}

/* One request object (borrowed), alone or from a batch. */
static void
ctl_call(struct ctl_conn *c, json_t *req)
{
	json_t *id, *params, *result;
	const char *method, *version;
	const struct rpc_method *m;
	struct rpc_err err = { 0 };
	char msg[300];

	id = json_object_get(req, "id");
	method = json_string_value(json_object_get(req, "method"));
	version = json_string_value(json_object_get(req, "jsonrpc"));
	/* what is not a JSON-RPC 2.0 request is answered with id null, even
	 * when it has an id: JSON-RPC 2.0 gives the id only to valid requests */
	if (!json_is_object(req) || method == NULL) {
		ctl_reply_error(c, NULL, RPC_E_INVALID, "invalid request: expected an object with a \"method\" string");
		return;
	}
	if (version == NULL || strcmp(version, "2.0") != 0) {
		ctl_reply_error(c, NULL, RPC_E_INVALID, "invalid request: \"jsonrpc\" must be \"2.0\"");
		return;
	}
	if (id != NULL && !json_is_string(id) && !json_is_number(id) && !json_is_null(id)) {
		ctl_reply_error(c, NULL, RPC_E_INVALID, "invalid request: \"id\" must be a string, a number or null");
		return;
	}
	/* a notification (no id) is never answered, not even with an error
	 * (JSON-RPC 2.0): a reply of id null would pass for the client's own */
	params = json_object_get(req, "params");
	if (params != NULL && !json_is_object(params) && !json_is_null(params)) {
		if (id != NULL)
			ctl_reply_error(c, id, RPC_E_PARAMS, "params must be an object");
		return;
	}
	if ((m = ctl_find_method(method)) == NULL) {
		snprintf(msg, sizeof msg, "unknown method '%.200s'", method);
		if (id != NULL)
			ctl_reply_error(c, id, RPC_E_NO_METHOD, msg);
		else
			log_debug("control: pid %d: notification of %s", c->pid, msg);
		return;
	}
	json_t *empty = NULL;
	if (params == NULL || json_is_null(params))
		params = empty = json_object();
	const char *unknown = ctl_unknown_param(m, params);
	if (unknown != NULL) {
		snprintf(msg, sizeof msg, "%s takes no parameter '%.100s' (%s%s)", method, unknown,
		         *m->params ? "it takes: " : "it takes none", m->params);
		if (id != NULL)
			ctl_reply_error(c, id, RPC_E_PARAMS, msg);
		json_decref(empty);
		return;
	}
	log_debug("control: pid %d calls %s", c->pid, method);
	/* methods read and change sessions and instances: the shards wait (shard.h) */
	shards_pause();
	c->call_id = id;
	c->in_call = true;
	result = m->fn(c, params, &err);
	c->in_call = false;
	shards_resume();
	json_decref(empty);
	if (c->deferred) {  /* the method replies through its ctl_later */
		c->deferred = false;
		json_decref(result);
		free(err.msg);
		return;
	}
	if (id == NULL) {  /* a notification: no reply, whatever happened */
		json_decref(result);
		free(err.msg);
		return;
	}
	if (result == NULL) {
		ctl_reply_error(c, id, err.code ? err.code : RPC_E_INTERNAL, err.msg ? err.msg : "failed");
		free(err.msg);
	} else {
		ctl_reply(c, rpc_result(id, result));
	}
}

/* The error (caller owns) for one request of a line refused whole, or NULL for a notification. */
typedef json_t *(*ctl_refusal)(json_t *req, const char *msg, bool id_unclear);

/* Answers each request of a line refused whole (req as read again, a
 * request or a batch; NULL when it could not be), none of them run. */
static void
ctl_refuse_line(struct ctl_conn *c, json_t *req, ctl_refusal error, const char *msg, bool id_unclear)
{
	json_t *out, *r, *el;
	size_t i;

	if (req == NULL || !json_is_array(req) || json_array_size(req) == 0) {
		r = req ? error(req, msg, id_unclear) : rpc_error(NULL, RPC_E_INVALID, msg);
		if (r != NULL)
			ctl_reply(c, r);
		return;
	}
	out = json_array();
	json_array_foreach(req, i, el) {
		if ((r = error(el, msg, id_unclear)) != NULL)
			json_array_append_new(out, r);
	}
	if (json_array_size(out) > 0)
		ctl_conn_send(c, out);
	else
		json_decref(out);
}

/* The error (caller owns) for one request of a line that holds a number
 * capd cannot hold (ctl_overflow), or NULL for a notification. */
static json_t *
ctl_overflow_error(json_t *req, const char *msg, bool id_unclear)
{
	json_t *id = json_object_get(req, "id"), *n, *r;
	double d;

	if (json_is_object(req) && id == NULL)  /* a notification is never answered */
		return NULL;
	if (!json_is_real(id))  /* a string, null, or no valid id (answered with null) */
		return rpc_error(json_is_string(id) ? id : NULL, RPC_E_INVALID, msg);
	/* every number was read as a real: one with a fraction came so; an
	 * integer is the id as it came only up to 2^53, where a real holds it */
	d = json_real_value(id);
	if (d != floor(d))
		return rpc_error(id, RPC_E_INVALID, msg);
	if (fabs(d) > 9007199254740992.0)
		return rpc_error(NULL, RPC_E_INVALID, msg);
	n = json_integer((json_int_t)d);
	r = rpc_error(n, RPC_E_INVALID, msg);
	json_decref(n);
	return r;
}

/*
 * Good JSON that holds a number jansson cannot: an integer past 2^63 - 1
 * (an id of 2^64, a session id of twenty digits) or a real past DBL_MAX.
 * That is no parse error (-32700 would say the JSON is broken), but the
 * request cannot be run as written: each request of the line is refused
 * as invalid, none is run. Read again with integers as reals to find the
 * ids; one that is itself out of range cannot be echoed as it came, so it
 * is answered with id null, as JSON-RPC has it for an id that cannot be
 * made out. A client that needs such ids can send them as strings.
 */
static void
ctl_overflow(struct ctl_conn *c, const char *line, size_t len, const json_error_t *first)
{
	json_error_t jerr;
	json_t *req = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, &jerr);
	char msg[300];

	snprintf(msg, sizeof msg, "invalid request: %s at column %d (integers go from -2^63 to 2^63-1; an id may be a string)",
	         first->text, first->column);
	ctl_refuse_line(c, req, ctl_overflow_error, msg, false);
	json_decref(req);
}

/* The error (caller owns) for one request of a line capd cannot run as
 * written (ctl_unrunnable), or NULL for a notification. */
static json_t *
ctl_unrunnable_error(json_t *req, const char *msg, bool id_unclear)
{
	json_t *id = json_object_get(req, "id");

	if (json_is_object(req) && id == NULL)  /* a notification is never answered */
		return NULL;
	/* an id given twice cannot be made out: JSON-RPC answers that with null */
	if (id_unclear || !(json_is_string(id) || json_is_number(id) || json_is_null(id)))
		id = NULL;
	return rpc_error(id, RPC_E_INVALID, msg);
}

/*
 * Good JSON that capd cannot run as written, each request of the line
 * refused as an invalid request (not a parse error, which would say the
 * JSON is broken), none run: a key named twice ({"method":"a","method":"b"}:
 * RFC 8259 only says names SHOULD be unique, and which one counts is
 * anyone's guess), or a string holding \u0000 (capd's strings end at a NUL:
 * "daemon.status\u0000x" would run daemon.status). The line is read again as
 * it allows (flags) to find the ids.
 */
static void
ctl_unrunnable(struct ctl_conn *c, const char *line, size_t len, size_t flags, const char *msg, bool id_unclear)
{
	json_error_t jerr;
	json_t *req = json_loadb(line, len, JSON_DECODE_ANY | flags, &jerr);

	if (req == NULL && json_error_code(&jerr) == json_error_numeric_overflow) {
		ctl_overflow(c, line, len, &jerr);
		return;
	}
	ctl_refuse_line(c, req, ctl_unrunnable_error, msg, id_unclear);
	json_decref(req);
}

/* One line: a request, or a batch (an array of them) whose requests
 * ctl_conn_process then takes one at a time like lines. */
static void
ctl_dispatch(struct ctl_conn *c, const char *line, size_t len)
{
	json_error_t jerr;
	json_t *req = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
	char msg[300];

	if (req == NULL && json_error_code(&jerr) == json_error_numeric_overflow) {
		ctl_overflow(c, line, len, &jerr);
		return;
	}
	if (req == NULL && json_error_code(&jerr) == json_error_duplicate_key) {
		/* jansson names the key as it came, quotes and all: near '"method"' */
		const char *q = strchr(jerr.text, '\''), *e = strrchr(jerr.text, '\'');
		int n = q != NULL && e > q ? (int)(e - q - 1) : 0;
		snprintf(msg, sizeof msg,
		         "invalid request: duplicate key %.*s at column %d (a name may appear once in an object)",
		         n > 160 ? 160 : n, q ? q + 1 : "", jerr.column);
		ctl_unrunnable(c, line, len, 0, msg, n == 4 && !strncmp(q + 1, "\"id\"", 4));
		return;
	}
	if (req == NULL && (json_error_code(&jerr) == json_error_null_character ||
	                    json_error_code(&jerr) == json_error_null_byte_in_key)) {
		snprintf(msg, sizeof msg,
		         "invalid request: \\u0000 in a string at column %d (capd takes no NUL in a string)",
		         jerr.column);
		ctl_unrunnable(c, line, len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, msg, false);
		return;
	}
	if (req == NULL) {
		snprintf(msg, sizeof msg, "parse error: %s at column %d", jerr.text, jerr.column);
		ctl_reply_error(c, NULL, RPC_E_PARSE, msg);
		return;
	}
	if (json_is_array(req) && json_array_size(req) > 0) {
		c->batch = req;
		c->batch_next = 0;
		c->batch_out = json_array();
		return;
	}
	ctl_call(c, req);  /* an empty batch is an invalid request too */
	json_decref(req);
}

/* The batch's next request, or, past its last, its replies as one array
 * (nothing when all were notifications). */
static void
ctl_batch_step(struct ctl_conn *c)
{
	json_t *out;

	if (c->batch_next < json_array_size(c->batch)) {
		ctl_call(c, json_array_get(c->batch, c->batch_next++));
		return;
	}
	out = c->batch_out;
	json_decref(c->batch);
	c->batch = c->batch_out = NULL;
	if (json_array_size(out) > 0)
		ctl_conn_send(c, out);
	else
		json_decref(out);
}

static void
ctl_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct ctl_conn *c = w->data;

	(void)loop; (void)revents;
	if (!c->heard && buf_used(&c->framer.in) == 0 && !c->framer.skipping)
		log_warnx("control: pid %d connected and sent nothing in %.0f s; closing", c->pid,
		          CTL_REQUEST_TIMEOUT);
	else
		log_warnx("control: pid %d sent half a request and went quiet; closing", c->pid);
	ctl_conn_kill(c);
}

static void
ctl_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct ctl_conn *c = w->data;
	ssize_t n;

	(void)loop; (void)revents;
	n = read(c->fd, buf_reserve(&c->framer.in, 65536), 65536);
	if (n == 0) {
		/* gone altogether (its subscriptions and trace end with it), or only
		 * half-closed: that ends the requests, not the replies (echo ... |
		 * socat - UNIX-CONNECT:...), and a last request without its newline
		 * is complete too. A stream socket whose peer closed polls as hung up. */
		struct pollfd pfd = { .fd = c->fd, .events = POLLOUT };
		if (poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLHUP | POLLERR))) {
			ctl_conn_kill(c);
			return;
		}
		c->rd_eof = true;
		ev_io_stop(capd_main, &c->rio);
		ev_timer_stop(capd_main, &c->timer);
		if (buf_used(&c->framer.in) > 0 || c->framer.skipping)
			buf_append(&c->framer.in, "\n", 1);
		ctl_conn_process(c);
		return;
	}
	if (n < 0) {
		if (errno == EAGAIN || errno == EINTR)
			return;
		ctl_conn_kill(c);
		return;
	}
	buf_commit(&c->framer.in, (size_t)n);
	ctl_conn_process(c);
}

/* Dispatches the complete requests read so far, one at a time: a method that
 * replies later holds the ones behind it, so replies keep the requests' order. */
static void
ctl_conn_process(struct ctl_conn *c)
{
	char *line;
	size_t len;
	bool progressed = false;

	while (c->later == NULL) {
		if (c->batch != NULL) {
			ctl_batch_step(c);
			progressed = true;
			if (c->dead)
				return;
			continue;
		}
		enum rpc_frame fr = rpc_framer_next(&c->framer, &line, &len);
		if (fr == RPC_FRAME_NONE)
			break;
		progressed = true;
		if (fr == RPC_FRAME_TOO_LONG) {
			ctl_reply_error(c, NULL, RPC_E_TOO_LARGE, "request too large (over 1 MiB)");
			continue;
		}
		ctl_dispatch(c, line, len);
		if (c->dead)
			return;
	}
	if (progressed)
		c->heard = true;
	if (c->later) {
		/* nothing more is read until the reply goes (ctl_later_reply starts it again) */
		ev_io_stop(capd_main, &c->rio);
		ev_timer_stop(capd_main, &c->timer);
		return;
	}
	if (c->rd_eof) {
		ctl_conn_done_check(c);
		return;
	}
	/* a partial line must complete in time; a quiet, idle connection may stay
	 * once it has asked something (a tail, a subscription), while one that
	 * never did keeps the deadline it got at accept: else any member of the
	 * control group could hold capd's descriptors with silent connections.
	 * The clock runs from the last complete request: a client streaming
	 * requests whose reads each end inside one is making progress */
	if (progressed)
		ev_timer_stop(capd_main, &c->timer);
	if (buf_used(&c->framer.in) > 0 || c->framer.skipping) {
		if (!ev_is_active(&c->timer)) {
			ev_timer_set(&c->timer, CTL_REQUEST_TIMEOUT, 0.);
			ev_timer_start(capd_main, &c->timer);
		}
	} else if (c->heard) {
		ev_timer_stop(capd_main, &c->timer);
	}
}

static void
ctl_later_gone(void *arg)
{
	struct ctl_later *l = arg;

	l->c = NULL;
}

struct ctl_later *
ctl_later_new(struct ctl_conn *c)
{
	struct ctl_later *l = xcalloc(1, sizeof *l);

	l->c = c;
	l->id = json_incref(c->call_id);
	c->later = l;
	c->deferred = true;
	ctl_conn_on_close(c, ctl_later_gone, l);
	return l;
}

void
ctl_later_reply(struct ctl_later *l, json_t *result, int code, const char *msg)
{
	struct ctl_conn *c = l->c;

	if (c != NULL) {
		ctl_conn_on_close_cancel(c, ctl_later_gone, l);
		c->later = NULL;
		if (l->id == NULL)
			json_decref(result);
		else if (result != NULL)
			ctl_reply(c, rpc_result(l->id, result));
		else
			ctl_reply_error(c, l->id, code ? code : RPC_E_INTERNAL, msg ? msg : "failed");
		if (!c->in_call && !c->dead) {
			/* the requests that waited behind this one */
			if (!c->rd_eof)
				ev_io_start(capd_main, &c->rio);
			ctl_conn_process(c);
		}
	} else {
		json_decref(result);
	}
	json_decref(l->id);
	free(l);
}

static void
ctl_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct ctl_conn *c = w->data;

	(void)loop; (void)revents;
	ctl_conn_flush(c);
	/* the peer took some: a stream held back for it queues its next part */
	if (!c->dead && c->on_drain.cb != NULL)
		c->on_drain.cb(c->on_drain.arg);
}

void
control_forget_peers(void)
{
	memset(ctl_peer_cache, 0, sizeof ctl_peer_cache);
}

/* Is uid in the control group by the group database (getgrouplist)? */
static bool
ctl_peer_member(int uid)
{
	struct passwd *pw;
	gid_t few[256], *groups = few;
	int ngroups = 256;
	bool member = false;

	if ((pw = getpwuid((uid_t)uid)) == NULL)
		return false;
	/* a user in more groups than that: getgrouplist said how many (the
	 * control group may be the 300th) */
	if (getgrouplist(pw->pw_name, pw->pw_gid, groups, &ngroups) < 0) {
		groups = xcalloc((size_t)ngroups, sizeof *groups);
		if (getgrouplist(pw->pw_name, pw->pw_gid, groups, &ngroups) < 0)
			ngroups = 0;
	}
	for (int i = 0; i < ngroups && !member; i++)
		member = groups[i] == ctl_gid;
	if (groups != few)
		free(groups);
	return member;
}

/*
 * root, capd's own user, and members of the socket's group may talk to capd.
 * A member by the group database is asked about at most once per
 * CTL_PEER_CACHE_TTL seconds (and again after a reload): a user taken out of
 * the group loses access within that time.
 */
static bool
ctl_peer_allowed(int uid, int gid)
{
	struct ctl_peer_seen *slot = NULL;
	double now;

	if (uid == 0 || (uid_t)uid == geteuid())
		return true;
	if (ctl_gid == (gid_t)-1)
		return false;
	if ((gid_t)gid == ctl_gid)
		return true;
	now = mono_now();
	for (int i = 0; i < CTL_PEER_CACHE_MAX; i++) {
		struct ctl_peer_seen *e = &ctl_peer_cache[i];
		if (e->when > 0 && e->uid == (uid_t)uid) {
			if (now - e->when < CTL_PEER_CACHE_TTL)
				return e->allowed;
			slot = e;
			break;
		}
		if (slot == NULL || e->when < slot->when)  /* an empty slot, else the oldest */
			slot = e;
	}
	*slot = (struct ctl_peer_seen){ .uid = (uid_t)uid, .allowed = ctl_peer_member(uid), .when = now };
	return slot->allowed;
}

static void
ctl_accept_resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w; (void)revents;
	ctl_spare_take();
	for (int i = 0; i < ctl_nfds; i++)
		ev_io_start(loop, &ctl_accept_io[i]);
}

/* One line saying why, written once and for all before the close: without
 * it capctl could only say that capd reset the connection. */
static void
ctl_refuse(int fd, int uid)
{
	struct buf b = { 0 };
	char msg[200];
	json_t *e;

	snprintf(msg, sizeof msg, "permission denied: uid %d is not root, capd's user or in the control socket's group",
	         uid);
	e = rpc_error(NULL, RPC_E_FAILED, msg);
	rpc_encode(&b, e);
	json_decref(e);
	/* a fresh socket's buffer takes the line whole; if not, the close says enough */
	if (send(fd, buf_head(&b), buf_used(&b), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
		log_debug("control: cannot tell uid %d why: %s", uid, strerror(errno));
	buf_free(&b);
}

static void
ctl_accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)revents;
	for (;;) {
		struct ucred cred;
		socklen_t len = sizeof cred;
		int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		struct ctl_conn *c;

		if (fd < 0) {
			if (errno == EMFILE && ctl_spare_fd >= 0) {
				log_warnx("control: out of descriptors; using the one kept for capctl");
				close(ctl_spare_fd);
				ctl_spare_fd = -1;
				continue;
			}
			if (errno == EMFILE || errno == ENFILE) {
				for (int i = 0; i < ctl_nfds; i++)
					ev_io_stop(loop, &ctl_accept_io[i]);
				ev_timer_set(&ctl_accept_pause, 1., 0.);
				ev_timer_start(loop, &ctl_accept_pause);
			}
			return;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
			close(fd);
			ctl_spare_take();  /* it may have been this connection's */
			continue;
		}
		if (!ctl_peer_allowed((int)cred.uid, (int)cred.gid)) {
			log_warnx("control: refused pid %d uid %d gid %d (not root, capd's user or in the socket's group)",
			          (int)cred.pid, (int)cred.uid, (int)cred.gid);
			ctl_refuse(fd, (int)cred.uid);
			close(fd);
			ctl_spare_take();  /* a refused user does not keep the operator out */
			continue;
		}
		log_debug("control: connection from pid %d uid %d gid %d", (int)cred.pid, (int)cred.uid, (int)cred.gid);
		c = xcalloc(1, sizeof *c);
		c->fd = fd;
		c->uid = (int)cred.uid;
		c->gid = (int)cred.gid;
		c->pid = (int)cred.pid;
		rpc_framer_init(&c->framer, RPC_MAX_LINE);
		ev_io_init(&c->rio, ctl_read_cb, fd, EV_READ);
		ev_io_init(&c->wio, ctl_write_cb, fd, EV_WRITE);
		ev_timer_init(&c->timer, ctl_timer_cb, CTL_REQUEST_TIMEOUT, 0.);
		c->rio.data = c->wio.data = c->timer.data = c;
		ev_io_start(loop, &c->rio);
		ev_timer_start(loop, &c->timer);  /* the first request is due in time too */
		c->next = ctl_conns;
		ctl_conns = c;
	}
}

/* Lets go of the socket path's lock; removes the file first, still holding it. */
static void
ctl_unlock(void)
{
	if (ctl_lock_fd < 0)
		return;
	if (unlink(ctl_lock_path) < 0 && errno != ENOENT)
		log_debug("control: cannot remove %s: %s", ctl_lock_path, strerror(errno));
	close(ctl_lock_fd);
	ctl_lock_fd = -1;
	free(ctl_lock_path);
	ctl_lock_path = NULL;
}

/*
 * Two capds with state_dirs of their own but one control socket path: each
 * saw no live capd answer, removed the stale file and bound, the second
 * removing the first's socket (which then ran unreachable and, at its stop,
 * removed the second's). Whoever owns the path holds <socket>.lock with
 * flock(2) for as long as it runs, so the look and the replacement are one.
 * A capd that stops removes the file while holding it: one that opened it
 * just before then locks a file no longer there, and tries again.
 */
static int
ctl_lock(const char *path, char **why)
{
	char *lp = xasprintf("%s.lock", path);

	for (int tries = 0; tries < 16; tries++) {
		struct stat fsb, psb;
		int fd = open(lp, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);

		if (fd < 0) {
			*why = xasprintf("cannot open %s: %s", lp, strerror(errno));
			free(lp);
			return -1;
		}
		if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
			if (errno == EWOULDBLOCK)
				*why = xasprintf("capd already running on %s (it holds %s)", path, lp);
			else
				*why = xasprintf("cannot lock %s: %s", lp, strerror(errno));
			close(fd);
			free(lp);
			return -1;
		}
		if (fstat(fd, &fsb) == 0 && stat(lp, &psb) == 0 && fsb.st_dev == psb.st_dev &&
		    fsb.st_ino == psb.st_ino) {
			ctl_lock_fd = fd;
			ctl_lock_path = lp;
			return 0;
		}
		close(fd);
	}
	*why = xasprintf("cannot lock %s: it keeps being replaced", lp);
	free(lp);
	return -1;
}

static int
ctl_bind(const char *path, const char *group, char **why)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	char *dir, *slash;
	int fd;

	if (strlen(path) >= sizeof sun.sun_path) {
		*why = xasprintf("control socket path too long: %s", path);
		return -1;
	}
	strcpy(sun.sun_path, path);
	dir = xstrdup(path);
	if ((slash = strrchr(dir, '/')) != NULL && slash != dir) {
		*slash = '\0';
		if (mkdir(dir, 0755) == 0) {
			ctl_made_dir = dir;
			dir = NULL;
		} else if (errno != EEXIST) {
			*why = xasprintf("cannot create %s: %s", dir, strerror(errno));
			free(dir);
			return -1;
		}
	}
	free(dir);
	if (ctl_lock(path, why) < 0)
		return -1;

	/* a live capd answers on the socket; a dead one left a file nobody accepts on */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sun, sizeof sun) == 0) {
		close(fd);
		*why = xasprintf("capd already running on %s", path);
		return -1;
	}
	if (fd >= 0)
		close(fd);
	/* only a socket is stale: a file or a link there is someone's (control = a typo) */
	struct stat sb;
	if (lstat(path, &sb) == 0 && !S_ISSOCK(sb.st_mode)) {
		*why = xasprintf("%s exists and is not a socket: capd replaces only a stale socket", path);
		return -1;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		*why = xasprintf("cannot remove stale %s: %s", path, strerror(errno));
		return -1;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		*why = xasprintf("socket: %s", strerror(errno));
		return -1;
	}
	mode_t old = umask(0117);  /* the file is 0660 from its first moment */
	int rc = bind(fd, (struct sockaddr *)&sun, sizeof sun);
	umask(old);
	if (rc < 0) {
		*why = xasprintf("cannot bind %s: %s", path, strerror(errno));
		close(fd);
		return -1;
	}
	/* no chmod: the umask made it 0660, and a chmod by path as root would
	 * follow a link put there (the folder may be capd's user's: ctl_made_dir) */
	if (group) {
		struct group *gr = getgrnam(group);
		if (gr == NULL) {
			*why = xasprintf("control_group '%s' does not exist", group);
			close(fd);
			unlink(path);
			return -1;
		}
		if (lchown(path, (uid_t)-1, gr->gr_gid) < 0) {  /* never through a link, as above */
			*why = xasprintf("cannot give %s to group %s: %s", path, group, strerror(errno));
			close(fd);
			unlink(path);
			return -1;
		}
		ctl_gid = gr->gr_gid;
	}
	if (listen(fd, 64) < 0) {
		*why = xasprintf("listen %s: %s", path, strerror(errno));
		close(fd);
		unlink(path);
		return -1;
	}
	ctl_path = xstrdup(path);
	return fd;
}

#if HAVE_SYSTEMD
/*
 * Takes the sockets systemd passed. Each listening Unix stream socket is
 * served: capd.socket may list several (ListenStream=), and a capctl
 * connecting to one capd ignored waited for ever in its backlog. The one
 * named "control" (FileDescriptorName=) comes first, else the first passed;
 * anything else (a TCP or datagram socket) is no control socket and closed.
 */
static void
ctl_take_passed(void)
{
	char **names = NULL;
	int n = sd_listen_fds_with_names(1, &names);

	for (int i = 0; i < n; i++) {
		int fd = SD_LISTEN_FDS_START + i;
		const char *name = names && names[i] ? names[i] : "unknown";

		if (sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) <= 0 || ctl_nfds == CTL_LISTEN_MAX) {
			log_warnx("control: socket %d (%s) passed by systemd is %s; closing it", fd, name,
			          ctl_nfds == CTL_LISTEN_MAX ? "one too many" : "no listening Unix stream socket");
			close(fd);
			continue;
		}
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
		fcntl(fd, F_SETFD, FD_CLOEXEC);
		if (strcmp(name, "control") == 0 && ctl_nfds > 0) {
			ctl_fds[ctl_nfds++] = ctl_fds[0];
			ctl_fds[0] = fd;
		} else {
			ctl_fds[ctl_nfds++] = fd;
		}
	}
	if (names)
		for (int i = 0; i < n; i++)
			free(names[i]);
	free(names);
}
#endif

int
control_start(const struct capd_settings *st, char **why)
{
#if HAVE_SYSTEMD
	ctl_take_passed();
	if (ctl_nfds > 0) {
		struct stat sb;
		struct sockaddr_un sun = { 0 };
		socklen_t len = sizeof sun - 1;
		/* control = is ignored: status and the log name the socket capctl reaches */
		if (getsockname(ctl_fds[0], (struct sockaddr *)&sun, &len) == 0 && sun.sun_path[0] != '\0')
			ctl_passed_path = xstrdup(sun.sun_path);
		if (st->control_group) {
			struct group *gr = getgrnam(st->control_group);
			if (gr)
				ctl_gid = gr->gr_gid;
		} else if (ctl_passed_path && stat(ctl_passed_path, &sb) == 0 && sb.st_gid != 0) {
			/* no control_group: the group capd.socket gave the file (SocketGroup=) may talk to capd */
			ctl_gid = sb.st_gid;
		}
		log_info("control: using the socket%s passed by systemd%s%s", ctl_nfds > 1 ? "s" : "",
		         ctl_passed_path ? ", " : "", ctl_passed_path ? ctl_passed_path : "");
	}
#endif
	if (ctl_nfds == 0) {
		if ((ctl_fds[0] = ctl_bind(st->control, st->control_group, why)) < 0) {
			ctl_unlock();
			free(ctl_made_dir);
			ctl_made_dir = NULL;
			return -1;
		}
		ctl_nfds = 1;
	}
	ctl_spare_take();
	for (int i = 0; i < ctl_nfds; i++) {
		ev_io_init(&ctl_accept_io[i], ctl_accept_cb, ctl_fds[i], EV_READ);
		ev_io_start(capd_main, &ctl_accept_io[i]);
	}
	ev_init(&ctl_accept_pause, ctl_accept_resume_cb);
	ev_prepare_init(&ctl_reaper, ctl_reap_cb);
	ev_prepare_start(capd_main, &ctl_reaper);
	ev_unref(capd_main);
	return 0;
}

const char *
control_made_dir(void)
{
	return ctl_made_dir;
}

const char *
control_path(const struct capd_settings *st)
{
	return ctl_passed_path ? ctl_passed_path : st->control;
}

void
control_stop(void)
{
	struct ctl_conn *c;

	if (ctl_nfds == 0)
		return;
	for (c = ctl_conns; c; c = c->next) {
		ctl_conn_flush(c);
		ctl_conn_kill(c);
	}
	ctl_reap_cb(capd_main, &ctl_reaper, 0);
	for (int i = 0; i < ctl_nfds; i++) {
		ev_io_stop(capd_main, &ctl_accept_io[i]);
		close(ctl_fds[i]);
	}
	ctl_nfds = 0;
	ev_timer_stop(capd_main, &ctl_accept_pause);
	ev_ref(capd_main);
	ev_prepare_stop(capd_main, &ctl_reaper);
	if (ctl_spare_fd >= 0)
		close(ctl_spare_fd);
	ctl_spare_fd = -1;
	if (ctl_path) {
		/* a folder root owns and capd did not make stays root's after the
		 * switch of user: the file stays, and the next start replaces it */
		if (unlink(ctl_path) < 0 && errno != ENOENT)
			log_notice("control: cannot remove %s: %s (a stale socket: the next start replaces it)",
			           ctl_path, strerror(errno));
		free(ctl_path);
		ctl_path = NULL;
	}
	ctl_unlock();
	free(ctl_made_dir);
	ctl_made_dir = NULL;
	free(ctl_passed_path);
	ctl_passed_path = NULL;
}

/*
 * The control socket: newline-delimited JSON-RPC 2.0 over a Unix stream
 * socket. Method handlers live in rpc-*.c, one file per noun.
 */
#ifndef CAPD_CONTROL_H
#define CAPD_CONTROL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct ctl_conn;
struct capd_settings;

struct rpc_err {
	int code;
	char *msg;  /* owned */
};

/* Returns the result (caller owns) or NULL with err set by rpc_fail(). */
typedef json_t *(*rpc_fn)(struct ctl_conn *c, json_t *params, struct rpc_err *err);

struct rpc_method {
	const char *name;  /* "noun.verb" */
	rpc_fn fn;
	/* The params keys it takes, "a, b" ("" none), others refused with
	 * -32602 before fn runs; NULL: fn judges them itself (instance.add:
	 * each type's keys). A misspelt filter ({"instanse":"web"}) listed every
	 * session as if none were asked for, and a script never learnt why. */
	const char *params;
};

/* Sets err and returns NULL, for `return rpc_fail(...)`. */
json_t *rpc_fail(struct rpc_err *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

int control_start(const struct capd_settings *st, char **why);
void control_stop(void);
/* The control socket's path: the one systemd passed, else control =. */
const char *control_path(const struct capd_settings *st);
/* The control socket's folder when capd made it (NULL if it was there):
 * privdrop gives it to capd's user, so that the stop can remove the socket. */
const char *control_made_dir(void);
/* Drops what the control plane remembers of uids' groups (a reload asks again). */
void control_forget_peers(void);

/* Queues a message (stolen) to the connection; dropped if the peer is gone. */
void ctl_conn_send(struct ctl_conn *c, json_t *msg);
/* Queues a message already encoded: one JSON line with its newline (a big
 * payload written straight, without jansson walking it character by character). */
void ctl_conn_send_line(struct ctl_conn *c, const void *p, size_t n);
/* Bytes waiting to go out, for subscribers that must drop instead of queueing. */
size_t ctl_conn_queued(struct ctl_conn *c);
/* Called on the loop each time the peer read some of what was queued (NULL:
 * no more), for a stream that queues a little at a time as it goes out
 * (capture follow) instead of all it has at once. */
void ctl_conn_on_drain(struct ctl_conn *c, void (*cb)(void *arg), void *arg);
/* Asks the kernel to hold up to bytes of what goes to the peer (SO_SNDBUF),
 * for a stream that moves MB/s: each wake-up of the reader then takes a
 * larger part, where 208 KiB a time cost a follower at 150 MB/s packets. */
void ctl_conn_stream_buffer(struct ctl_conn *c, int bytes);
/* The connection failed or is closing: what is sent to it goes nowhere. */
bool ctl_conn_closing(struct ctl_conn *c);
/* Called once when the connection closes (subscriptions clean up here). */
void ctl_conn_on_close(struct ctl_conn *c, void (*cb)(void *arg), void *arg);
void ctl_conn_on_close_cancel(struct ctl_conn *c, void (*cb)(void *arg), void *arg);
/*
 * A method whose work ends later takes its reply with ctl_later_new(c), returns
 * NULL, and sends it with ctl_later_reply (now or from a later loop pass). The
 * connection's next requests wait for it. result is stolen; without one the
 * reply is the error code and msg (borrowed).
 */
struct ctl_later;
struct ctl_later *ctl_later_new(struct ctl_conn *c);
void ctl_later_reply(struct ctl_later *l, json_t *result, int code, const char *msg);
/* The peer's uid/pid from SO_PEERCRED. */
int ctl_conn_uid(struct ctl_conn *c);

/* Method tables, one per rpc-*.c file. */
extern const struct rpc_method rpc_daemon_methods[];
extern const struct rpc_method rpc_instance_methods[];
extern const struct rpc_method rpc_session_methods[];
extern const struct rpc_method rpc_tail_methods[];
extern const struct rpc_method rpc_capture_methods[];
extern const struct rpc_method rpc_hosts_methods[];
extern const struct rpc_method rpc_trace_methods[];
extern const struct rpc_method rpc_ca_methods[];

#endif

/* RPC methods on the capture spool: capture.status, capture.rotate, capture.sync. */
#include <stdlib.h>

#include <ev.h>

#include "control.h"
#include "shard.h"
#include "rpc.h"
#include "spool-follow.h"
#include "spool.h"
#include "xmalloc.h"

static json_t *
rpc_capture_status(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	(void)c; (void)params; (void)err;
	return spool_status();
}

/* A capture.rotate whose reply waits for the writer's new file. */
struct rotate_wait {
	ev_timer poll;
	struct ctl_later *reply;
	unsigned want;
	double until;
};

#define ROTATE_POLL_SECS 0.01

static void
rotate_wait_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct rotate_wait *rw = w->data;
	char *why = NULL;
	int r;

	(void)revents;
	if ((r = spool_rotated(rw->want, &why)) == 0 && ev_now(loop) < rw->until)
		return;  /* the timer repeats */
	ev_timer_stop(loop, w);
	if (r > 0) {
		ctl_later_reply(rw->reply, spool_status(), 0, NULL);
	} else {
		if (r == 0)
			why = xasprintf("capd's writer has not started the new capture file within %d s "
			                "(a slow or hung disk?); it will when it can", ROTATE_WAIT_SECS);
		ctl_later_reply(rw->reply, NULL, RPC_E_FAILED, why);
	}
	free(why);
	free(rw);
}

/*
 * Replies, with the status, once the writer has made the new file, so that
 * exit 0 means it exists; the loop looks every 10 ms rather than wait on a
 * disk that may hang, and gives up after ROTATE_WAIT_SECS (the request stays).
 */
static json_t *
rpc_capture_rotate(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	struct rotate_wait *rw;
	unsigned want;

	(void)params;
	if ((want = spool_rotate_request()) == 0)
		return rpc_fail(err, RPC_E_FAILED, "capture is not running");
	rw = xcalloc(1, sizeof *rw);
	rw->reply = ctl_later_new(c);
	rw->want = want;
	rw->until = ev_now(capd_main) + ROTATE_WAIT_SECS;
	ev_timer_init(&rw->poll, rotate_wait_cb, 0., ROTATE_POLL_SECS);
	rw->poll.data = rw;
	ev_timer_start(capd_main, &rw->poll);
	return NULL;
}

/*
 * Replies, with the status, once every record queued before the call (by
 * any session thread) is in the file, so a reader of it sees them all: the
 * writer's mark comes back through the followers' hand-over, never
 * blocking the loop (spool_follow_sync).
 */
static json_t *
rpc_capture_sync(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	(void)params; (void)err;
	spool_follow_sync(ctl_later_new(c));
	return NULL;
}

const struct rpc_method rpc_capture_methods[] = {
	{ "capture.status", rpc_capture_status, "" },
	{ "capture.rotate", rpc_capture_rotate, "" },
	{ "capture.sync", rpc_capture_sync, "" },
	{ NULL, NULL, NULL },
};

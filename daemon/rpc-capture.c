/* RPC methods on the capture spool: capture.status, capture.rotate, capture.sync. */
#include <stdlib.h>

#include "control.h"
#include "rpc.h"
#include "spool-follow.h"
#include "spool.h"

static json_t *
rpc_capture_status(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	(void)c; (void)params; (void)err;
	return spool_status();
}

static json_t *
rpc_capture_rotate(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char *why = NULL;

	(void)c; (void)params;
	if (spool_rotate(&why) < 0) {
		json_t *r = rpc_fail(err, RPC_E_FAILED, "%s", why ? why : "rotation failed");
		free(why);
		return r;
	}
	return spool_status();
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

/* RPC methods on the capture spool: capture.status, capture.rotate. */
#include <stdlib.h>

#include "control.h"
#include "rpc.h"
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

const struct rpc_method rpc_capture_methods[] = {
	{ "capture.status", rpc_capture_status },
	{ "capture.rotate", rpc_capture_rotate },
	{ NULL, NULL },
};

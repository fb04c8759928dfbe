/*
 * Streaming RPC methods: session.tail and events.subscribe. Each answers at
 * once, then sends notifications on the same connection (see tail.c):
 *   session.data  {id, dir: "c2s"|"s2c", time, offset, data (base64), dropped?}
 *   session.end   {id, reason, bytes_up, bytes_down}
 *   event         {event, time, ...the subject's fields}
 *   events.dropped {dropped}: events lost while the subscriber was behind
 */
#include <stdint.h>
#include <stdlib.h>

#include "control.h"
#include "rpc.h"
#include "session.h"
#include "tail.h"

int rpc_session_id(json_t *params, uint64_t *id);  /* rpc-session.c */

static json_t *
rpc_session_tail(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	json_t *v = json_object_get(params, "backlog");
	uint64_t id, backlog = UINT64_MAX;
	struct session *s;
	char *why = NULL;

	if (rpc_session_id(params, &id) < 0)
		return rpc_fail(err, RPC_E_PARAMS, "session.tail needs \"id\", a positive session number");
	if (v != NULL && !json_is_null(v)) {
		if (!json_is_integer(v) || json_integer_value(v) < 0)
			return rpc_fail(err, RPC_E_PARAMS, "\"backlog\" must be a number of bytes, 0 or more");
		backlog = (uint64_t)json_integer_value(v);
	}
	if ((s = session_find(id)) == NULL || s->state == SESSION_CLOSED)
		return rpc_fail(err, RPC_E_NOT_FOUND, "no session %llu", (unsigned long long)id);
	if (tail_subscribe(s, c, backlog, &why) < 0) {
		json_t *r = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return r;
	}
	return session_json(s);
}

static json_t *
rpc_events_subscribe(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char *why = NULL;

	(void)params;
	if (events_subscribe(c, &why) < 0) {
		json_t *r = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return r;
	}
	return json_pack("{s:b}", "subscribed", 1);
}

const struct rpc_method rpc_tail_methods[] = {
	{ "session.tail", rpc_session_tail },
	{ "events.subscribe", rpc_events_subscribe },
	{ NULL, NULL },
};

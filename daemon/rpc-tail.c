/*
 * Streaming RPC methods: session.tail {id, backlog?, dir?: "c2s"|"s2c"} and
 * events.subscribe. Each answers at once, then sends notifications on the
 * same connection (see tail.c):
 *   session.data  {id, dir: "c2s"|"s2c", time, offset, data (base64), dropped?}
 *   session.end   {id, reason, bytes_up, bytes_down}
 *   event         {event, time, ...the subject's fields}
 *   events.dropped {dropped}: events lost while the subscriber was behind
 * and capture.follow, whose reply carries the head of a pcapng stream
 * ({data}: section header and interfaces, base64) and whose notifications
 * carry the rest:
 *   capture.data  {data (base64 pcapng blocks), dropped?: packets lost before them}
 *   capture.end   {instance, reason, failed?}: the followed instance was removed, or failed
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "instance.h"
#include "rpc.h"
#include "session.h"
#include "spool-follow.h"
#include "tail.h"

int rpc_session_id(json_t *params, uint64_t *id);  /* rpc-session.c */
json_t *rpc_session_missing(uint64_t id, struct rpc_err *err);

static json_t *
rpc_session_tail(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	json_t *v = json_object_get(params, "backlog");
	const char *dirs = json_string_value(json_object_get(params, "dir"));
	uint64_t id, backlog = UINT64_MAX;
	int dir = -1;
	struct session *s;
	char *why = NULL;

	if (rpc_session_id(params, &id) < 0)
		return rpc_fail(err, RPC_E_PARAMS, "session.tail needs \"id\", a positive session number");
	if (v != NULL && !json_is_null(v)) {
		if (!json_is_integer(v) || json_integer_value(v) < 0)
			return rpc_fail(err, RPC_E_PARAMS, "\"backlog\" must be a number of bytes, 0 or more");
		backlog = (uint64_t)json_integer_value(v);
	}
	/* one direction: the other is not encoded nor queued, so it cannot crowd out the one watched */
	if (json_object_get(params, "dir") != NULL && !json_is_null(json_object_get(params, "dir"))) {
		if (dirs != NULL && !strcmp(dirs, "c2s"))
			dir = DIR_UP;
		else if (dirs != NULL && !strcmp(dirs, "s2c"))
			dir = DIR_DOWN;
		else
			return rpc_fail(err, RPC_E_PARAMS, "\"dir\" must be \"c2s\" or \"s2c\"");
	}
	if ((s = session_find(id)) == NULL || s->state == SESSION_CLOSED) {
		/* a session that already ended is named as such: its backlog went with it */
		return rpc_session_missing(id, err);
	}
	if (tail_subscribe(s, c, backlog, dir, &why) < 0) {
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

static json_t *
rpc_capture_follow(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	const char *name = json_string_value(json_object_get(params, "instance"));
	struct instance *inst = NULL;
	char *why = NULL;
	json_t *head;

	if (json_object_get(params, "instance") != NULL && name == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "\"instance\" must be a name");
	if (name != NULL && (inst = instance_find(name)) == NULL)
		return rpc_fail(err, RPC_E_NOT_FOUND, "no instance %s", name);
	if (inst != NULL && inst->spool_iface < 0)
		return rpc_fail(err, RPC_E_FAILED, "instance %s does not capture", name);
	if (inst != NULL && inst->state == INSTANCE_FAILED)  /* nothing more of it will come */
		return rpc_fail(err, RPC_E_FAILED, "instance %s failed: %s", name, inst->error ? inst->error : "");
	if ((head = spool_follow_subscribe(c, inst ? inst->spool_iface : -1, &why)) == NULL) {
		json_t *r = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return r;
	}
	return json_pack("{s:o}", "data", head);
}

const struct rpc_method rpc_tail_methods[] = {
	{ "session.tail", rpc_session_tail, "id, backlog, dir" },
	{ "events.subscribe", rpc_events_subscribe, "" },
	{ "capture.follow", rpc_capture_follow, "instance" },
	{ NULL, NULL, NULL },
};

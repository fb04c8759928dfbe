/* RPC methods on sessions: session.list, session.kill. */
#include <errno.h>
#include <stdlib.h>

#include "control.h"
#include "instance.h"
#include "rpc.h"
#include "session.h"

/* Session ids come as numbers or as strings of digits. */
int rpc_session_id(json_t *params, uint64_t *id);
int
rpc_session_id(json_t *params, uint64_t *id)
{
	json_t *v = json_object_get(params, "id");

	if (json_is_integer(v) && json_integer_value(v) > 0) {
		*id = (uint64_t)json_integer_value(v);
		return 0;
	}
	if (json_is_string(v)) {
		const char *s = json_string_value(v);
		char *end;
		unsigned long long u;
		/* digits only: strtoull takes "-1" (and " 1") and wraps it */
		if (*s < '0' || *s > '9')
			return -1;
		errno = 0;
		u = strtoull(s, &end, 10);
		if (errno == 0 && *end == '\0' && u > 0) {
			*id = u;
			return 0;
		}
	}
	return -1;
}

/* Why id cannot be watched or killed: one that has ended is named as such,
 * as `capctl sessions` still lists it. Returns NULL, err filled in. */
json_t *rpc_session_missing(uint64_t id, struct rpc_err *err);
json_t *
rpc_session_missing(uint64_t id, struct rpc_err *err)
{
	json_t *all = session_list_json(NULL, false), *o;
	json_t *found = NULL;
	size_t i;

	json_array_foreach(all, i, o)
		if (json_integer_value(json_object_get(o, "id")) == (json_int_t)id)
			found = o;
	if (found != NULL) {
		const char *reason = json_string_value(json_object_get(found, "reason"));
		rpc_fail(err, RPC_E_NOT_FOUND, "session %llu has ended (%s)", (unsigned long long)id,
		         reason ? reason : "closed");
	} else {
		rpc_fail(err, RPC_E_NOT_FOUND, "no session %llu", (unsigned long long)id);
	}
	json_decref(all);
	return NULL;
}

static json_t *
rpc_session_list(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	const char *inst = json_string_value(json_object_get(params, "instance"));
	json_t *open = json_object_get(params, "open");
	bool open_only = json_is_true(open);

	(void)c;
	/* a filter of the wrong type must not list every session as if none were asked for */
	if (json_object_get(params, "instance") != NULL && inst == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "\"instance\" must be a name");
	if (open != NULL && !json_is_boolean(open))
		return rpc_fail(err, RPC_E_PARAMS, "\"open\" must be true or false");
	if (inst && instance_find(inst) == NULL) {
		/* closed sessions of a removed instance are still worth listing; one that had
		 * none (kept) has an empty list, as a running one does; a name never run is a typo */
		json_t *a = session_list_json(inst, open_only);
		if (json_array_size(a) == 0 && !instance_was_removed(inst)) {
			json_decref(a);
			return rpc_fail(err, RPC_E_NOT_FOUND, "no instance %s", inst);
		}
		return a;
	}
	return session_list_json(inst, open_only);
}

/* On the session's own shard: its sockets are that thread's alone. */
static void
rpc_session_kill_here(struct session *s, void *arg)
{
	session_reset(s, "killed by capctl");
	*(json_t **)arg = session_json(s);
}

static json_t *
rpc_session_kill(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	uint64_t id;
	json_t *o = NULL;

	(void)c;
	if (rpc_session_id(params, &id) < 0)
		return rpc_fail(err, RPC_E_PARAMS, "session.kill needs \"id\", a positive session number");
	if (session_call(id, rpc_session_kill_here, &o) < 0)
		return rpc_session_missing(id, err);
	return o;
}

const struct rpc_method rpc_session_methods[] = {
	{ "session.list", rpc_session_list, "instance, open" },
	{ "session.kill", rpc_session_kill, "id" },
	{ NULL, NULL, NULL },
};

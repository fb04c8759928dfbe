/* RPC methods on instances: instance.list, instance.add, instance.remove. */
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "instance.h"
#include "rpc.h"

static json_t *
rpc_instance_list(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	json_t *a = json_array();
	struct instance *inst;

	(void)c; (void)params; (void)err;
	TAILQ_FOREACH(inst, &instances, entry)
		json_array_append_new(a, instance_json(inst));
	return a;
}

static void
rpc_instance_added(void *arg, struct instance *inst, const char *why)
{
	ctl_later_reply(arg, inst ? instance_json(inst) : NULL, RPC_E_FAILED, why);
}

/* Replies once the instance runs, or could not start: a sniffer prepares off the loop. */
static json_t *
rpc_instance_add(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	if (!json_is_string(json_object_get(params, "type")))
		return rpc_fail(err, RPC_E_PARAMS, "instance.add needs \"type\"");
	/* trace_configure says so too, but only after a name-less one got "a name is needed" */
	if (!strcmp(json_string_value(json_object_get(params, "type")), "trace"))
		return rpc_fail(err, RPC_E_FAILED, "trace instances are made by `capctl trace` (trace.start), not by instance.add");
	instance_add_async(params, false, rpc_instance_added, ctl_later_new(c));
	return NULL;
}

static json_t *
rpc_instance_remove(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	const char *name = json_string_value(json_object_get(params, "name"));
	struct instance *inst;
	json_t *o;

	(void)c;
	if (name == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "instance.remove needs \"name\"");
	if ((inst = instance_find(name)) == NULL)
		return rpc_fail(err, RPC_E_NOT_FOUND, "no instance %s", name);
	o = instance_json(inst);
	instance_remove(inst, "removed by capctl");
	/* as its instance.remove event has it: instance_json's word for an
	 * instance that runs no more (the method's name says it was removed) */
	json_object_set_new(o, "state", json_string("stopped"));
	json_object_set_new(o, "sessions", json_integer(0));
	return o;
}

const struct rpc_method rpc_instance_methods[] = {
	{ "instance.list", rpc_instance_list, "" },
	{ "instance.add", rpc_instance_add, NULL },
	{ "instance.remove", rpc_instance_remove, "name" },
	{ NULL, NULL, NULL },
};

/* RPC methods on the daemon itself: daemon.status, daemon.reload. */
#include <stdlib.h>
#include <unistd.h>

#include "capd.h"
#include "control.h"
#include "instance.h"
#include "rpc.h"
#include "session.h"
#include "xmalloc.h"

extern double capd_started;

static json_t *
rpc_daemon_status(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char t[40];
	struct instance *inst;
	unsigned n = 0;

	(void)c; (void)params; (void)err;
	TAILQ_FOREACH(inst, &instances, entry)
		n++;
	return json_pack("{s:s, s:i, s:s, s:f, s:s, s:s, s:s, s:i, s:i, s:i}",
	                 "version", CAPD_VERSION, "pid", (int)getpid(),
	                 "started", session_time(capd_started, t, sizeof t), "uptime", capd_now() - capd_started,
	                 "config", capd_config_path ? capd_config_path : "",
	                 "control", control_path(capd_settings), "spool", capd_settings->spool,
	                 "instances", n, "sessions", session_open_count(),
	                 "workers", (int)(shards_count() - shards_session_first()));
}

/* {"reloaded": true, "restart_only": [...], "added": n, "removed": n, "changed": n} */
static void
rpc_daemon_reloaded(void *arg, const char *errs, json_t *summary)
{
	json_t *keys = json_object_get(summary, "restart_only"), *k;
	char *msg, *not = NULL, *t;
	size_t i;

	if (errs == NULL) {
		json_t *r = json_deep_copy(summary);

		json_object_set_new(r, "reloaded", json_true());
		ctl_later_reply(arg, r, 0, NULL);
		return;
	}
	/* parsed and applied, but some instances could not start; the error
	 * names the restart-only keys as a result would have */
	json_array_foreach(keys, i, k) {
		t = xasprintf("%s%s%s", not ? not : "", not ? ", " : "", json_string_value(k));
		free(not);
		not = t;
	}
	if (not)
		msg = xasprintf("reload applied with errors: %s; not applied until restart: %s", errs, not);
	else
		msg = xasprintf("reload applied with errors: %s", errs);
	ctl_later_reply(arg, NULL, RPC_E_FAILED, msg);
	free(not);
	free(msg);
}

/* Replies once the new instances have started (a sniffer's filter compiles off the loop). */
static json_t *
rpc_daemon_reload(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	struct ctl_later *l = ctl_later_new(c);
	char *why = NULL, *msg;

	(void)params; (void)err;
	if (capd_reload(rpc_daemon_reloaded, l, &why) < 0) {
		msg = xasprintf("reload failed, nothing changed: %s", why);
		ctl_later_reply(l, NULL, RPC_E_FAILED, msg);
		free(msg);
		free(why);
	}
	return NULL;
}

const struct rpc_method rpc_daemon_methods[] = {
	{ "daemon.status", rpc_daemon_status, "" },
	{ "daemon.reload", rpc_daemon_reload, "" },
	{ NULL, NULL, NULL },
};

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

static void
rpc_daemon_reloaded(void *arg, const char *errs)
{
	char *msg;

	if (errs == NULL) {
		ctl_later_reply(arg, json_pack("{s:b}", "reloaded", 1), 0, NULL);
		return;
	}
	/* parsed and applied, but some instances could not start */
	msg = xasprintf("reload applied with errors: %s", errs);
	ctl_later_reply(arg, NULL, RPC_E_FAILED, msg);
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

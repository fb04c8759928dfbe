/*
 * Hosts redirection in the daemon: the RPC methods hosts.add, hosts.remove,
 * hosts.list and hosts.clear on capd_settings->hosts_file, and the removal
 * of capd's block at a clean stop (hosts_restore). The file's block is the
 * truth; capd also remembers the last set it wrote, so a block that another
 * program dropped (a DHCP client, a container runtime rewriting /etc/hosts)
 * comes back with the next hosts command.
 */
#include <stdlib.h>
#include <string.h>

#include "capd.h"
#include "control.h"
#include "hosts.h"
#include "log.h"
#include "rpc.h"
#include "xmalloc.h"

enum hosts_op { HOSTS_OP_ADD, HOSTS_OP_REMOVE, HOSTS_OP_CLEAR };

/* What one edit does; lives on the caller's stack. */
struct hosts_edit {
	enum hosts_op op;
	const char *name, *addr;
	bool found;       /* remove: the name was there */
	size_t removed;   /* clear: how many went */
};

static struct hosts_set hosts_mem;  /* the set capd last wrote, for re-applying a dropped block */
static char *hosts_mem_path;        /* the file it was written to */

static const char *
hosts_path(void)
{
	return capd_settings && capd_settings->hosts_file ? capd_settings->hosts_file : "/etc/hosts";
}

static char *
hosts_edit_cb(const char *cur, size_t len, size_t *outlen, void *arg, char **why)
{
	struct hosts_edit *e = arg;
	struct hosts_set set = { 0 };
	char *out;
	int found;

	if ((found = hosts_block_parse(cur, len, &set, why)) < 0)
		return NULL;
	if (found == 0 && hosts_mem.n > 0 && hosts_mem_path && !strcmp(hosts_mem_path, hosts_path())) {
		/* our block went missing behind our back: put our entries back */
		for (size_t i = 0; i < hosts_mem.n; i++)
			hosts_set_put(&set, hosts_mem.v[i].name, hosts_mem.v[i].addr);
	}
	switch (e->op) {
	case HOSTS_OP_ADD:
		hosts_set_put(&set, e->name, e->addr);
		break;
	case HOSTS_OP_REMOVE:
		e->found = hosts_set_del(&set, e->name);
		break;
	case HOSTS_OP_CLEAR:
		e->removed = set.n;
		hosts_set_free(&set);
		break;
	}
	out = hosts_block_apply(cur, len, &set, outlen, why);
	if (out) {
		hosts_set_free(&hosts_mem);
		hosts_mem = set;
		free(hosts_mem_path);
		hosts_mem_path = xstrdup(hosts_path());
	} else {
		hosts_set_free(&set);
	}
	return out;
}

static int
hosts_run(struct hosts_edit *e, char **why)
{
	const char *state = capd_settings ? capd_settings->state_dir : NULL;

	return hosts_file_update(hosts_path(), state, hosts_edit_cb, e, why);
}

int
hosts_add(const char *name, const char *addr, json_t **result, char **why)
{
	char norm[HOSTS_ADDR_MAX];
	struct hosts_edit e = { .op = HOSTS_OP_ADD, .name = name };

	if (hosts_entry_check(name, addr, norm, why) < 0)
		return -1;
	e.addr = norm;
	if (hosts_run(&e, why) < 0)
		return -1;
	log_info("hosts: %s -> %s in %s", name, norm, hosts_path());
	*result = json_pack("{s:s, s:s, s:s}", "name", name, "addr", norm, "file", hosts_path());
	return 0;
}

/* 0 removed, 1 no such entry (why set), -1 failed. */
int
hosts_remove(const char *name, char **why)
{
	struct hosts_edit e = { .op = HOSTS_OP_REMOVE, .name = name };

	if (hosts_run(&e, why) < 0)
		return -1;
	if (!e.found) {
		*why = xasprintf("no hosts entry for %s in %s", name, hosts_path());
		return 1;
	}
	log_info("hosts: %s removed from %s", name, hosts_path());
	return 0;
}

int
hosts_clear(size_t *removed, char **why)
{
	struct hosts_edit e = { .op = HOSTS_OP_CLEAR };

	if (hosts_run(&e, why) < 0)
		return -1;
	*removed = e.removed;
	log_info("hosts: %zu entries cleared from %s", e.removed, hosts_path());
	return 0;
}

json_t *
hosts_list(char **why)
{
	struct hosts_set set = { 0 };
	size_t len = 0;
	char *text = hosts_file_read(hosts_path(), &len, why);
	json_t *a;

	if (text == NULL) {
		free(*why);
		*why = NULL;
		return json_array();  /* no file, no entries */
	}
	if (hosts_block_parse(text, len, &set, why) < 0) {
		free(text);
		return NULL;
	}
	free(text);
	a = json_array();
	for (size_t i = 0; i < set.n; i++)
		json_array_append_new(a, json_pack("{s:s, s:s}", "name", set.v[i].name, "addr", set.v[i].addr));
	hosts_set_free(&set);
	return a;
}

void
hosts_restore(void)
{
	struct hosts_edit e = { .op = HOSTS_OP_CLEAR };
	char *why = NULL;

	if (capd_settings == NULL || !capd_settings->hosts_restore) {
		hosts_set_free(&hosts_mem);
		free(hosts_mem_path);
		hosts_mem_path = NULL;
		return;
	}
	hosts_set_free(&hosts_mem);
	if (hosts_run(&e, &why) < 0) {
		log_warnx("hosts: cannot remove capd's entries from %s: %s", hosts_path(), why);
		free(why);
	} else if (e.removed > 0) {
		log_info("hosts: removed capd's %zu entries from %s", e.removed, hosts_path());
	}
	hosts_set_free(&hosts_mem);
	free(hosts_mem_path);
	hosts_mem_path = NULL;
}

/* ---- RPC ---- */

static json_t *
rpc_hosts_add(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	const char *name = json_string_value(json_object_get(params, "name"));
	json_t *addr_v = json_object_get(params, "addr"), *r = NULL;
	const char *addr = addr_v && !json_is_null(addr_v) ? json_string_value(addr_v) : "127.0.0.1";
	char *why = NULL;

	(void)c;
	if (name == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "hosts.add needs \"name\", a host name");
	if (addr == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "hosts.add: \"addr\" must be a string");
	if (hosts_add(name, addr, &r, &why) < 0) {
		json_t *f = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return f;
	}
	return r;
}

static json_t *
rpc_hosts_remove(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	const char *name = json_string_value(json_object_get(params, "name"));
	char *why = NULL;
	int rv;

	(void)c;
	if (name == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "hosts.remove needs \"name\", a host name");
	if ((rv = hosts_remove(name, &why)) != 0) {
		json_t *f = rpc_fail(err, rv > 0 ? RPC_E_NOT_FOUND : RPC_E_FAILED, "%s", why);
		free(why);
		return f;
	}
	return json_pack("{s:s, s:s}", "name", name, "file", hosts_path());
}

static json_t *
rpc_hosts_list(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char *why = NULL;
	json_t *a;

	(void)c; (void)params;
	if ((a = hosts_list(&why)) == NULL) {
		json_t *f = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return f;
	}
	return a;
}

static json_t *
rpc_hosts_clear(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char *why = NULL;
	size_t n = 0;

	(void)c; (void)params;
	if (hosts_clear(&n, &why) < 0) {
		json_t *f = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return f;
	}
	return json_pack("{s:I, s:s}", "removed", (json_int_t)n, "file", hosts_path());
}

const struct rpc_method rpc_hosts_methods[] = {
	{ "hosts.add", rpc_hosts_add },
	{ "hosts.remove", rpc_hosts_remove },
	{ "hosts.list", rpc_hosts_list },
	{ "hosts.clear", rpc_hosts_clear },
	{ NULL, NULL },
};

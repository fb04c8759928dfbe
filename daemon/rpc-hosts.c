/*
 * Hosts redirection in the daemon: the RPC methods hosts.add, hosts.remove,
 * hosts.list and hosts.clear on capd_settings->hosts_file, and the removal
 * of capd's block at a clean stop (hosts_restore). The file's block is the
 * truth; capd also remembers the last set it wrote, so a block that another
 * program dropped (a DHCP client, a container runtime rewriting /etc/hosts)
 * comes back: at the next hosts command, or within HOSTS_WATCH_INTERVAL when
 * the watch timer sees the file change.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "capd.h"
#include "control.h"
#include "hosts.h"
#include "log.h"
#include "rpc.h"
#include "xmalloc.h"

#define HOSTS_WATCH_INTERVAL 2.0  /* seconds between stat()s of the file while capd has entries in it */

enum hosts_op { HOSTS_OP_ADD, HOSTS_OP_REMOVE, HOSTS_OP_CLEAR, HOSTS_OP_REAPPLY };

/* What one edit does; lives on the caller's stack, and hosts_run frees its set. */
struct hosts_edit {
	enum hosts_op op;
	const char *name, *addr;
	bool found;             /* remove: the name was there */
	char was[8 * HOSTS_ADDR_MAX]; /* add: the name's addresses of addr's family before, ", " between, "" when none */
	struct hosts_set kept;  /* add: the name's entries of the other family, which stay */
	size_t shadow_line;     /* add: a line before the block that maps the name (0: none) ... */
	char shadow[HOSTS_ADDR_MAX]; /* ... and its address */
	size_t removed;         /* clear: how many went */
	struct hosts_set next;  /* the entries the last run of hosts_edit_cb proposed */
};

static struct hosts_set hosts_mem;  /* the set capd last wrote, for re-applying a dropped block */
static char *hosts_mem_path;        /* the file it was written to */
static ev_timer hosts_watch;        /* runs while hosts_mem has entries; unref'd: it keeps no loop alive */
static bool hosts_watch_ready;
static struct stat hosts_seen;      /* the file as capd last saw it */
static bool hosts_seen_valid;

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
	if (e->op == HOSTS_OP_ADD) {
		/* what the file said, before a missing block is put back below: "was there
		 * already" must not be said of a name the file no longer had */
		e->was[0] = '\0';  /* this may run again, on a file changed meanwhile */
		for (size_t i = 0, w = 0; i < set.n; i++)
			if (strcasecmp(set.v[i].name, e->name) == 0 &&
			    hosts_addr_family(set.v[i].addr) == hosts_addr_family(e->addr) &&
			    w + strlen(set.v[i].addr) + 3 <= sizeof e->was) {
				/* every address of its family ("10.0.0.5, 10.0.0.6"): the add replaces them all */
				w += (size_t)snprintf(e->was + w, sizeof e->was - w, "%s%s", w ? ", " : "", set.v[i].addr);
			}
		e->shadow_line = hosts_shadow(cur, len, e->name, e->shadow);
	}
	if (found == 0 && hosts_mem.n > 0 && hosts_mem_path && !strcmp(hosts_mem_path, hosts_path())) {
		/* our block went missing behind our back: put our entries back */
		for (size_t i = 0; i < hosts_mem.n; i++)
			hosts_set_keep(&set, hosts_mem.v[i].name, hosts_mem.v[i].addr);
	}
	switch (e->op) {
	case HOSTS_OP_ADD:
		hosts_set_put(&set, e->name, e->addr);
		/* the name's lines of the other family stay (an IPv4 and an IPv6 address): said, as they
		 * still send clients that prefer that family elsewhere */
		hosts_set_free(&e->kept);
		for (size_t i = 0; i < set.n; i++)
			if (strcasecmp(set.v[i].name, e->name) == 0 &&
			    hosts_addr_family(set.v[i].addr) != hosts_addr_family(e->addr))
				hosts_set_keep(&e->kept, set.v[i].name, set.v[i].addr);
		break;
	case HOSTS_OP_REMOVE:
		e->found = hosts_set_del(&set, e->name);
		break;
	case HOSTS_OP_CLEAR:
		e->removed = set.n;
		hosts_set_free(&set);
		break;
	case HOSTS_OP_REAPPLY:
		break;  /* the remembered entries went back in above */
	}
	out = hosts_block_apply(cur, len, &set, outlen, why);
	/* not in hosts_mem yet: the write may still fail, and the file may change and bring us back here */
	hosts_set_free(&e->next);
	e->next = set;
	return out;
}

static void hosts_watch_cb(struct ev_loop *loop, ev_timer *w, int revents);

/* Watches the file while capd has entries in it; stops when it has none. */
static void
hosts_watch_update(void)
{
	if (capd_loop == NULL)
		return;
	if (!hosts_watch_ready) {
		ev_timer_init(&hosts_watch, hosts_watch_cb, HOSTS_WATCH_INTERVAL, HOSTS_WATCH_INTERVAL);
		hosts_watch_ready = true;
	}
	if (hosts_mem.n > 0 && !ev_is_active(&hosts_watch)) {
		ev_timer_start(capd_loop, &hosts_watch);
		ev_unref(capd_loop);
	} else if (hosts_mem.n == 0 && ev_is_active(&hosts_watch)) {
		ev_ref(capd_loop);
		ev_timer_stop(capd_loop, &hosts_watch);
	}
}

static int
hosts_run(struct hosts_edit *e, char **why)
{
	const char *state = capd_settings ? capd_settings->state_dir : NULL;
	int rv = hosts_file_update(hosts_path(), state, hosts_edit_cb, e, why);

	if (rv == 0) {
		/* only what reached the file is remembered: a failed add must not come back with a later edit */
		hosts_set_free(&hosts_mem);
		hosts_mem = e->next;
		e->next = (struct hosts_set){ 0 };
		free(hosts_mem_path);
		hosts_mem_path = xstrdup(hosts_path());
	}
	hosts_set_free(&e->next);
	hosts_seen_valid = stat(hosts_path(), &hosts_seen) == 0;
	hosts_watch_update();
	return rv;
}

/* The file changed behind capd's back: adopt a block a person edited, put back one that went missing. */
static void
hosts_watch_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct hosts_set set = { 0 };
	struct hosts_edit e = { .op = HOSTS_OP_REAPPLY };
	struct stat st;
	char *text, *why = NULL;
	size_t len, n = hosts_mem.n;
	int found;

	(void)loop; (void)w; (void)revents;
	if (hosts_mem_path == NULL || strcmp(hosts_mem_path, hosts_path()) != 0 || stat(hosts_mem_path, &st) < 0)
		return;  /* hosts_file changed by a reload, or the file is gone: the next command decides */
	if (hosts_seen_valid && hosts_stat_same(&st, &hosts_seen))
		return;
	hosts_seen = st;
	hosts_seen_valid = true;
	if ((text = hosts_file_read(hosts_mem_path, &len, &why)) == NULL ||
	    (found = hosts_block_parse(text, len, &set, &why)) < 0) {
		log_debug("hosts: %s changed: %s", hosts_mem_path, why);
		free(why);
		free(text);
		return;
	}
	free(text);
	if (found) {
		hosts_set_free(&hosts_mem);
		hosts_mem = set;  /* a person's edits inside the block are theirs to make */
		hosts_watch_update();
		return;
	}
	if (hosts_run(&e, &why) < 0) {
		log_warnx("hosts: capd's block went missing from %s and cannot be put back: %s", hosts_mem_path, why);
		free(why);
		return;
	}
	log_notice("hosts: capd's block went missing from %s: %zu %s put back", hosts_path(), n,
	           n == 1 ? "entry" : "entries");
}

int
hosts_add(const char *name, const char *addr, json_t **result, char **why)
{
	char norm[HOSTS_ADDR_MAX], kept[8 * HOSTS_ADDR_MAX] = "";
	struct hosts_edit e = { .op = HOSTS_OP_ADD, .name = name };
	json_t *kept_v;

	if (hosts_entry_check(name, addr, norm, why) < 0)
		return -1;
	e.addr = norm;
	if (hosts_run(&e, why) < 0) {
		hosts_set_free(&e.kept);
		return -1;
	}
	kept_v = json_array();
	for (size_t i = 0, w = 0; i < e.kept.n; i++) {
		json_array_append_new(kept_v, json_string(e.kept.v[i].addr));
		if (w + strlen(e.kept.v[i].addr) + 3 <= sizeof kept)
			w += (size_t)snprintf(kept + w, sizeof kept - w, "%s%s", w ? ", " : "", e.kept.v[i].addr);
	}
	hosts_set_free(&e.kept);
	/* the same line again writes nothing (hosts_file_update), and says so */
	if (strcmp(e.was, norm) == 0)
		log_info("hosts: %s -> %s already in %s", name, norm, hosts_path());
	else if (e.was[0] != '\0')
		log_info("hosts: %s -> %s in %s (was %s)%s%s", name, norm, hosts_path(), e.was, kept[0] ? ", kept " : "",
		         kept);
	else
		log_info("hosts: %s -> %s in %s%s%s", name, norm, hosts_path(), kept[0] ? ", kept " : "", kept);
	*result = json_pack("{s:s, s:s, s:s, s:b, s:o, s:o}", "name", name, "addr", norm, "file", hosts_path(), "already",
	                    strcmp(e.was, norm) == 0, "previous", e.was[0] ? json_string(e.was) : json_null(), "kept",
	                    kept_v);
	if (e.shadow_line > 0 && strcmp(e.shadow, norm) != 0) {
		/* written, but resolvers take the other line: the user has to hear it */
		log_warnx("hosts: line %zu of %s maps %s to %s before capd's block: resolvers take that one",
		          e.shadow_line, hosts_path(), name, e.shadow);
		json_object_set_new(*result, "shadowed",
		                    json_pack("{s:I, s:s}", "line", (json_int_t)e.shadow_line, "addr", e.shadow));
	}
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
	log_info("hosts: %zu %s cleared from %s", e.removed, e.removed == 1 ? "entry" : "entries", hosts_path());
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
		if (errno != ENOENT)
			return NULL;  /* unreadable (a directory, too large): not "no entries" */
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
		hosts_watch_update();
		return;
	}
	hosts_set_free(&hosts_mem);
	if (hosts_run(&e, &why) < 0) {
		log_warnx("hosts: cannot remove capd's entries from %s: %s", hosts_path(), why);
		free(why);
	} else if (e.removed > 0) {
		log_info("hosts: removed capd's %zu %s from %s", e.removed, e.removed == 1 ? "entry" : "entries",
		         hosts_path());
	}
	hosts_set_free(&hosts_mem);
	free(hosts_mem_path);
	hosts_mem_path = NULL;
	hosts_watch_update();
}

/* ---- RPC ---- */

/* name without its one trailing dot ("www.example.test." is the same name, as in a dns
 * answer rule): the hosts file holds names without it, and resolvers look them up so. */
static const char *
hosts_name_undot(const char *name, char buf[HOST_MAX + 1])
{
	size_t len = name ? strlen(name) : 0;

	if (len < 2 || len > HOST_MAX || name[len - 1] != '.')
		return name;
	memcpy(buf, name, len - 1);
	buf[len - 1] = '\0';
	return buf;
}

static json_t *
rpc_hosts_add(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	char buf[HOST_MAX + 1];
	const char *name = hosts_name_undot(json_string_value(json_object_get(params, "name")), buf);
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
	char buf[HOST_MAX + 1];
	const char *name = hosts_name_undot(json_string_value(json_object_get(params, "name")), buf);
	char *why = NULL, norm[HOSTS_ADDR_MAX];
	int rv;

	(void)c;
	if (name == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "hosts.remove needs \"name\", a host name");
	/* a name no entry can have is a mistake to name, not "no hosts entry" (capctl refuses it too) */
	if (hosts_entry_check(name, "127.0.0.1", norm, &why) < 0) {
		json_t *f = rpc_fail(err, RPC_E_PARAMS, "%s", why);
		free(why);
		return f;
	}
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
	/* the keys each takes, others refused: {"name": ...} to hosts.clear would clear them all */
	{ "hosts.add", rpc_hosts_add, "name, addr" },
	{ "hosts.remove", rpc_hosts_remove, "name" },
	{ "hosts.list", rpc_hosts_list, "" },
	{ "hosts.clear", rpc_hosts_clear, "" },
	{ NULL, NULL, NULL },
};

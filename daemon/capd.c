/*
 * capd: main, signals, sd_notify, reload. Always in the foreground;
 * systemd (or the developer's terminal) supervises it.
 */
#include "capd.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conf.h"
#include "config.h"
#include "control.h"
#include "hosts.h"
#include "instance.h"
#include "linger.h"
#include "log.h"
#include "params.h"
#include "path.h"
#include "privdrop.h"
#include "relay.h"
#include "resolve.h"
#include "session.h"
#include "spool.h"
#include "tls.h"
#include "tls-ca.h"
#include "xmalloc.h"

#if HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#define capd_notify(...) sd_notifyf(0, __VA_ARGS__)
#else
/* no systemd to tell: the arguments are still checked and used, as with it */
static inline __attribute__((format(printf, 1, 2))) void
capd_notify(const char *fmt, ...)
{
	(void)fmt;
}
#endif

#define CAPD_SHUTDOWN_GRACE 2.0  /* seconds open sessions get to finish at stop */

struct capd_settings *capd_settings;
const char *capd_config_path = "/etc/capd/capd.conf";
double capd_started;

static struct conf *capd_conf;  /* the config in force */
static int capd_verbose;
static ev_signal sig_term, sig_int, sig_hup;
static ev_timer capd_grace;
#if HAVE_SYSTEMD
static ev_timer capd_watchdog;
#endif
static double capd_grace_deadline;
static int capd_stopping;
static bool capd_preparing;  /* at the stop, an instance's prepare still ran on its thread */

/* Asked for (-h, --help): on standard output, exit 0, as capctl --help;
 * after a wrong option: on standard error, exit 2. */
static void
usage(FILE *out, int rc)
{
	fprintf(out, "usage: capd [-tvV] [-c FILE]\n"
	             "  -c, --config FILE  configuration file (default /etc/capd/capd.conf)\n"
	             "  -t, --test         check the configuration and exit (0 good, 1 bad)\n"
	             "  -v, --verbose      more logging (repeat for debug)\n"
	             "  -V, --version      print the version and exit\n"
	             "  -h, --help         print this and exit\n");
	exit(rc);
}

static void
capd_apply_log_level(const struct capd_settings *st)
{
	int lvl = st->log_level + capd_verbose;
	log_set_level(lvl > LOG_LVL_DEBUG ? LOG_LVL_DEBUG : lvl);
}

static int
capd_mkdirs(const char *path, char **why)
{
	char *p = xstrdup(path);

	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			goto fail;
		*s = '/';
	}
	if (mkdir(p, 0750) < 0 && errno != EEXIST)
		goto fail;
	free(p);
	return 0;
fail:
	*why = xasprintf("cannot create %s: %s", p, strerror(errno));
	free(p);
	return -1;
}

/*
 * Holds a folder for this capd alone (flock on the folder itself, released
 * by the kernel however capd ends). A second capd on the same spool would
 * "repair" the file the first is writing and delete its files at rotation;
 * on the same state_dir it would hand out the same session ids. Taken
 * before the control socket: a second capd of the same config, started at
 * the same moment, could take the first's socket file for a stale one
 * (it does not accept before listen(2)) and replace it. The descriptor
 * stays open until exit; held is the folder already locked, if any, which
 * the same folder named twice must not lock against itself.
 */
static int
capd_lock_dir(const char *path, const char *key, int held, char **why)
{
	struct stat a, b;
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0) {
		*why = xasprintf("%s %s: %s", key, path, strerror(errno));
		return -1;
	}
	if (held >= 0 && fstat(held, &a) == 0 && fstat(fd, &b) == 0 && a.st_dev == b.st_dev &&
	    a.st_ino == b.st_ino) {
		close(fd);
		return held;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if (errno == EWOULDBLOCK) {
			*why = xasprintf("%s %s is in use by another capd", key, path);
			close(fd);
			return -1;
		}
		/* a file system that cannot lock a folder (NFS) is used as before, unguarded */
		log_warn("cannot lock %s %s; another capd there would not be noticed", key, path);
	}
	return fd;
}

/* Finds a config instance's entry (conf.h) in a parsed config by name. */
static json_t *
capd_conf_instance(struct conf *c, const char *name)
{
	size_t i;
	json_t *e;

	json_array_foreach(c->instances, i, e) {
		json_t *p = json_object_get(e, "params");
		if (!strcmp(json_string_value(json_object_get(p, "name")), name))
			return e;
	}
	return NULL;
}

/* Adds msg (stolen) to the "; "-separated list in *errs, and logs it. */
static void
capd_errs_add(char **errs, char *msg)
{
	log_error("%s", msg);
	if (*errs == NULL) {
		*errs = msg;
	} else {
		char *both = xasprintf("%s; %s", *errs, msg);
		free(*errs);
		free(msg);
		*errs = both;
	}
}

/* "file:line: [type name]", where a config instance's errors point. */
static char *
capd_conf_where(struct conf *c, json_t *e)
{
	json_t *p = json_object_get(e, "params");

	return xasprintf("%s:%d: [%s %s]", c->file, (int)json_integer_value(json_object_get(e, "line")),
	                 json_string_value(json_object_get(p, "type")),
	                 json_string_value(json_object_get(p, "name")));
}

/* Start-up: starts the config's instances, in line; errors are collected in *errs. */
static void
capd_start_instances(struct conf *c, char **errs)
{
	size_t i;
	json_t *e;

	json_array_foreach(c->instances, i, e) {
		json_t *p = json_object_get(e, "params");
		char *why = NULL, *where;

		if (instance_add(p, true, &why) == NULL) {
			where = capd_conf_where(c, e);
			capd_errs_add(errs, xasprintf("%s: %s", where, why));
			free(where);
			free(why);
		}
	}
}

/*
 * A reload whose new instances are still starting: an instance may prepare
 * on a helper thread (instance_add_async), and the reload's outcome waits
 * for the last of them.
 */
struct capd_reload {
	capd_reloaded_fn *done;
	void *arg;
	char *errs;          /* owned */
	unsigned pending;    /* instances still starting, +1 while they are being started */
	json_t *summary;     /* owned: what changed, for daemon.reload's answer */
};

/* One config instance a reload starts. */
struct capd_reload_add {
	struct capd_reload *r;
	char *where;         /* owned: capd_conf_where */
};

static struct capd_reload *capd_reloading;
static bool capd_reload_again;  /* a SIGHUP came while capd_reloading: reload once it ends */

static void
capd_reload_end(struct capd_reload *r)
{
	log_info("reloaded %s%s", capd_config_path, r->errs ? ", with errors" : "");
	if (!capd_stopping) {  /* a reload whose instances started while the stop began */
		unsigned n = session_open_count();

		capd_notify("READY=1\nSTATUS=running, %u session%s", n, n == 1 ? "" : "s");
	}
	capd_reloading = NULL;
	if (r->done)
		r->done(r->arg, r->errs, r->summary);
	free(r->errs);
	json_decref(r->summary);
	free(r);
	if (capd_reload_again) {
		char *why = NULL;

		capd_reload_again = false;
		capd_reload(NULL, NULL, &why);
		free(why);
	}
}

static void
capd_reload_added(void *arg, struct instance *inst, const char *why)
{
	struct capd_reload_add *a = arg;
	struct capd_reload *r = a->r;

	if (inst == NULL)
		capd_errs_add(&r->errs, xasprintf("%s: %s", a->where, why));
	free(a->where);
	free(a);
	if (--r->pending == 0)
		capd_reload_end(r);
}

/* A [capd] key the file now sets otherwise than the value in force, which
 * only a restart applies: the reload's answer names it. */
static void
capd_restart_only(struct capd_reload *r, const char *key)
{
	json_array_append_new(json_object_get(r->summary, "restart_only"), json_string(key));
}

/* A reload keeps the value in force (cur) of a setting read at start only, and
 * says so, naming key (and logging it unless logged is given), when the file
 * now asks for another. */
static void
capd_keep(struct capd_reload *r, char **next, const char *cur, const char *key, bool logged)
{
	if (strcmp(*next ? *next : "", cur ? cur : "") != 0) {
		if (!logged)
			log_notice("%s changes only at restart", key);
		capd_restart_only(r, key);
	}
	free(*next);
	*next = cur ? xstrdup(cur) : NULL;
}

/* Whether the reload's answer names key already. */
static bool
capd_restart_listed(struct capd_reload *r, const char *key)
{
	json_t *k;
	size_t i;

	json_array_foreach(json_object_get(r->summary, "restart_only"), i, k)
		if (!strcmp(json_string_value(k), key))
			return true;
	return false;
}

/*
 * The CA is read once (at start or first need), and a reload keeps it as it
 * keeps ca_cert: one replaced on disk (a CA of the lab's own put in place)
 * is named as that key would be, rather than left unsaid while capd goes on
 * forging with the old one.
 */
static void
capd_ca_changed(struct capd_reload *r)
{
	const char *path = NULL, *key = tls_ca_file_changed(&path);

	if (key == NULL || capd_restart_listed(r, key))
		return;
	log_notice("%s %s changed on disk: the CA loaded before stays until restart", key, path);
	capd_restart_only(r, key);
}

static int
capd_reload_paused(capd_reloaded_fn *done, void *arg, char **why)
{
	struct capd_reload *r;
	struct conf *c;
	struct instance *inst, *next;

	if (capd_stopping) {
		/* it would start listeners that the stop then cuts, and tell
		 * systemd READY=1 after STOPPING=1 */
		*why = xstrdup("capd is stopping");
		log_warnx("reload refused: %s", *why);
		return -1;
	}
	if (capd_reloading) {
		*why = xstrdup("the last reload is still starting its instances");
		log_warnx("reload refused: %s", *why);
		return -1;
	}
	capd_notify("RELOADING=1\nSTATUS=reloading %s", capd_config_path);
	control_forget_peers();  /* who is in the control group is asked again */
	c = conf_load(capd_config_path, why);
	/* the checks of start-up and capd -t (user and control_group change only at restart) */
	if (c != NULL && conf_check(c, capd_settings, why) < 0) {
		conf_free(c);
		c = NULL;
	}
	if (c == NULL) {
		log_error("reload refused, the running config stays: %s", *why);
		capd_notify("READY=1\nSTATUS=reload failed: %s", *why);
		return -1;
	}
	r = xcalloc(1, sizeof *r);
	r->done = done;
	r->arg = arg;
	r->pending = 1;
	r->summary = json_pack("{s:[], s:i, s:i, s:i}", "restart_only", "added", 0, "removed", 0, "changed", 0);
	unsigned n_added = 0, n_removed = 0;
	json_t *changed = json_object();  /* names of the instances a reload restarts */
	/*
	 * Instances from the old file that changed or went away stop; capctl's
	 * stay. One that failed (a sniffer whose interface went away) is
	 * restarted as if changed: a reload is how the file's instances are
	 * asked to run, and it would otherwise stay failed until its section
	 * was edited.
	 */
	for (inst = TAILQ_FIRST(&instances); inst; inst = next) {
		next = TAILQ_NEXT(inst, entry);
		if (!inst->from_config)
			continue;
		json_t *e = capd_conf_instance(c, inst->name);
		json_t *p = json_object_get(e, "params");
		bool failed = inst->state == INSTANCE_FAILED;
		/* a file its keys name (users, tls_client_cert) that now reads otherwise
		 * counts as a changed key, as nginx reads its certificates again */
		const char *file = p && !failed ? instance_file_changed(inst, json_object_get(e, "files")) : NULL;
		if (p && json_equal(p, inst->params) && !failed && file == NULL)
			continue;
		if (p && !failed && file == NULL && instance_update(inst, p)) {
			/* new routes for a reverse instance: its requests in flight go on */
			json_object_set_new(changed, inst->name, json_true());
			continue;
		}
		if (p)
			json_object_set_new(changed, inst->name, json_true());
		else
			n_removed++;
		if (file != NULL) {
			char *reason = xasprintf("changed by reload: %s changed", file);
			instance_remove(inst, reason);
			free(reason);
		} else {
			instance_remove(inst, !p ? "removed from the config" : failed ? "failed, restarted by reload"
			                                                               : "changed by reload");
		}
	}
	capd_reloading = r;
	size_t i;
	json_t *e;
	json_array_foreach(c->instances, i, e) {
		json_t *p = json_object_get(e, "params");
		const char *name = json_string_value(json_object_get(p, "name"));
		struct instance *cur = instance_find(name);

		if (cur && !cur->from_config) {
			/* a name now used by a capctl instance cannot come from the file too */
			char *where = capd_conf_where(c, e);
			capd_errs_add(&r->errs, xasprintf("%s: the name of an instance added by capctl; remove that first",
			                                  where));
			free(where);
		} else if (cur == NULL) {
			struct capd_reload_add *a = xcalloc(1, sizeof *a);

			if (json_object_get(changed, name) == NULL)
				n_added++;
			a->r = r;
			a->where = capd_conf_where(c, e);
			r->pending++;
			instance_add_async(p, true, capd_reload_added, a);
		}
	}

	json_object_set_new(r->summary, "added", json_integer(n_added));
	json_object_set_new(r->summary, "removed", json_integer(n_removed));
	json_object_set_new(r->summary, "changed", json_integer(json_object_size(changed)));
	json_decref(changed);
	if (strcmp(c->settings.control, capd_settings->control) != 0)
		log_notice("control socket path changes only at restart");
	if (c->settings.workers != capd_settings->workers) {
		log_notice("workers changes only at restart");
		capd_restart_only(r, "workers");
		c->settings.workers = capd_settings->workers;  /* or the next reload would not say it */
	}
	capd_apply_log_level(&c->settings);
	spool_reconfigure(&c->settings);  /* says itself that the spool folder stays */
	/*
	 * What start-up used stays in force, or capd would show and half use a
	 * setting it never applied: the socket bound and its group, the spool
	 * folder written, the user switched to, the state folder of the session
	 * ids, the CA read, the hosts file holding capd's block.
	 */
	capd_keep(r, &c->settings.control, capd_settings->control, "control", true);
	capd_keep(r, &c->settings.spool, capd_settings->spool, "spool", true);
	capd_keep(r, &c->settings.control_group, capd_settings->control_group, "control_group", false);
	capd_keep(r, &c->settings.user, capd_settings->user, "user", false);
	capd_keep(r, &c->settings.state_dir, capd_settings->state_dir, "state_dir", false);
	capd_keep(r, &c->settings.hosts_file, capd_settings->hosts_file, "hosts_file", false);
	/* unset means state_dir/ca.pem, which the TLS code may have filled in */
	if (c->settings.ca_cert == NULL && capd_settings->ca_cert != NULL)
		c->settings.ca_cert = xasprintf("%s/ca.pem", c->settings.state_dir);
	if (c->settings.ca_key == NULL && capd_settings->ca_key != NULL)
		c->settings.ca_key = xasprintf("%s/ca.key", c->settings.state_dir);
	capd_keep(r, &c->settings.ca_cert, capd_settings->ca_cert, "ca_cert", false);
	capd_keep(r, &c->settings.ca_key, capd_settings->ca_key, "ca_key", false);
	capd_ca_changed(r);
	conf_free(capd_conf);
	capd_conf = c;
	capd_settings = &c->settings;
	tls_keylog_reopen();  /* keylog_file may be gone or another (or moved away by logrotate) */
	tls_trust_reload();   /* a CA added to (or removed from) the system store */
	if (--r->pending == 0)
		capd_reload_end(r);
	return 0;
}

/* The settings and instances change under the shards' feet: they wait (shard.h). */
int
capd_reload(capd_reloaded_fn *done, void *arg, char **why)
{
	shards_pause();
	int rc = capd_reload_paused(done, arg, why);
	shards_resume();
	return rc;
}

static void
capd_finish(void)
{
	static bool finished;

	/* a second signal and the grace timer can both be pending in one loop pass */
	if (finished)
		return;
	finished = true;
	ev_timer_stop(capd_loop, &capd_grace);
	instance_stop_accepting();
	capd_preparing = instance_jobs_stop();
	instance_remove_all();
	session_table_shutdown();
	shards_stop();
	hosts_restore();
	control_stop();
	resolve_shutdown();
	spool_stop();
	tls_stop();
	linger_stop_all();
	relay_shutdown();
	ev_break(capd_loop, EVBREAK_ALL);
}

static void
capd_grace_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	/* UDP flows, DNS queries and traced sockets are not waited for: a flow
	 * ends only at its idle timeout, a query's client asks again */
	if (session_stream_open_count() > 0 && ev_now(loop) < capd_grace_deadline)
		return;
	ev_timer_stop(loop, w);
	capd_finish();
}

static void
capd_stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	(void)revents;
	if (capd_stopping++) {
		capd_finish();  /* a second signal: stop now */
		return;
	}
	log_notice("stopping on signal %d", w->signum);
	capd_notify("STOPPING=1\nSTATUS=stopping");
	instance_stop_accepting();
	capd_grace_deadline = ev_now(loop) + CAPD_SHUTDOWN_GRACE;
	ev_timer_set(&capd_grace, 0., 0.05);
	ev_timer_start(loop, &capd_grace);
}

static void
capd_hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	char *why = NULL;

	(void)loop; (void)w; (void)revents;
	if (capd_reloading) {
		log_notice("SIGHUP: reloading again once the last reload's instances have started");
		capd_reload_again = true;
		return;
	}
	capd_reload(NULL, NULL, &why);  /* its outcome is logged */
	free(why);
}

#if HAVE_SYSTEMD
static void
capd_watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	capd_notify("WATCHDOG=1");
}
#endif

/* The settings' workers, or one loop per CPU. */
static unsigned
capd_workers(const struct capd_settings *st)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	if (st->workers > 0)
		return st->workers;
	return n < 1 ? 1 : n > 16 ? 16 : (unsigned)n;
}

/* What each worker thread's loop needs of its own (shard.h). */
static void
capd_shard_init(void)
{
	char *why = NULL;

	session_loop_init();
	if (resolve_init(&why) < 0) {
		/* names then fail to resolve on this shard, with the reason in each session */
		log_error("worker: %s", why);
		free(why);
	}
}

static void
capd_shard_fini(void)
{
	resolve_shutdown();
	session_loop_fini();
	linger_stop_all();
	relay_shutdown();  /* the thread's buffer and pipe pools */
}

static void
capd_raise_nofile(void)
{
	struct rlimit rl, up = { 1 << 20, 1 << 20 };

	/* 10,000 tunnels need 20,000 descriptors: as root raise a lower hard
	 * limit itself (never lower one an administrator set higher, as
	 * LimitNOFILE= may), else take all the hard limit allows */
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	if (rl.rlim_max < up.rlim_max && setrlimit(RLIMIT_NOFILE, &up) == 0)
		return;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/* capd -c capd.conf from a shell's folder: daemon.status, reload's log lines
 * and warnings name the file absolute, so that capctl status run elsewhere
 * says which file it is; capd never changes folder, so the relative path
 * would still open (-t keeps the path as the user gave it). Cleaned as the
 * paths in the file are (-c ../conf/capd.conf): the same file, named plainly. */
static void
capd_absolute_config_path(void)
{
	char *cwd = NULL, *path;
	json_t *text;

	if (capd_config_path[0] != '/' && (cwd = getcwd(NULL, 0)) == NULL)
		return;
	path = path_clean(cwd, capd_config_path);
	free(cwd);
	if ((text = json_string(path)) == NULL) {  /* a folder whose name is not UTF-8 */
		free(path);
		return;
	}
	json_decref(text);
	capd_config_path = path;
}

/*
 * capd -t: the CA that an instance intercepting TLS needs is loaded, or could
 * be made, as the start would (a ca_cert in a folder that does not exist
 * passed -t, then the start failed), and the message names the same line.
 */
static int
capd_check_ca(const struct conf *c, char **why)
{
	const struct capd_settings *st = &c->settings;
	size_t i;
	json_t *e;

	json_array_foreach(c->instances, i, e) {
		json_t *params = json_object_get(e, "params");
		const char *mode = json_string_value(json_object_get(params, "tls"));
		char *cert, *key, *err = NULL;
		int rc;

		if (mode == NULL || !strcmp(mode, "no") || !strcmp(mode, "false") || !strcmp(mode, "0"))
			continue;
		cert = st->ca_cert ? xstrdup(st->ca_cert) : xasprintf("%s/ca.pem", st->state_dir);
		key = st->ca_key ? xstrdup(st->ca_key) : xasprintf("%s/ca.key", st->state_dir);
		rc = tls_ca_check(cert, key, st->state_dir, &err);
		free(cert);
		free(key);
		if (rc < 0) {
			*why = xasprintf("%s:%d: [%s %s]: cannot intercept TLS: %s", c->file,
			                 (int)json_integer_value(json_object_get(e, "line")),
			                 json_string_value(json_object_get(params, "type")),
			                 json_string_value(json_object_get(params, "name")), err);
			free(err);
			return -1;
		}
		return 0;  /* one CA for every instance */
	}
	return 0;
}

int
main(int argc, char **argv)
{
	int ch, test_only = 0, state_lock;
	char *why = NULL, *errs = NULL;

	/* the long forms an admin tries first (capctl takes --help and --version too) */
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' }, { "test", no_argument, NULL, 't' },
		{ "verbose", no_argument, NULL, 'v' },      { "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },         { NULL, 0, NULL, 0 },
	};

	log_init("capd", LOG_LVL_INFO);
	while ((ch = getopt_long(argc, argv, "c:tvVh", longopts, NULL)) != -1) {
		switch (ch) {
		case 'c': capd_config_path = optarg; break;
		case 't': test_only = 1; params_warn_checks = true; break;
		case 'v': capd_verbose++; break;
		case 'V': printf("capd %s\n", CAPD_VERSION); return 0;
		case 'h': usage(stdout, 0); break;
		default: usage(stderr, 2);
		}
	}
	if (optind != argc)
		usage(stderr, 2);
	/* as the [capd] paths: daemon.status shows it in JSON, which cannot hold
	 * it otherwise (capctl status said only "failed") */
	json_t *text = json_string(capd_config_path);
	if (text == NULL) {
		fprintf(stderr, "capd: -c: the path is not valid UTF-8\n");
		return 1;
	}
	json_decref(text);

	if ((capd_conf = conf_load(capd_config_path, &why)) == NULL || conf_check(capd_conf, NULL, &why) < 0) {
		fprintf(stderr, "capd: %s\n", why);
		free(why);
		conf_free(capd_conf);
		return 1;
	}
	if (test_only && capd_check_ca(capd_conf, &why) < 0) {
		fprintf(stderr, "capd: %s\n", why);
		free(why);
		conf_free(capd_conf);
		return 1;
	}
	if (test_only) {
		size_t n = json_array_size(capd_conf->instances);

		printf("capd: %s: configuration is good (%zu instance%s)\n", capd_config_path, n,
		       n == 1 ? "" : "s");
		conf_free(capd_conf);
		return 0;
	}
	capd_absolute_config_path();
	capd_settings = &capd_conf->settings;
	capd_apply_log_level(capd_settings);
	capd_raise_nofile();
	signal(SIGPIPE, SIG_IGN);
	/* a spool or key log file at the file-size limit (ulimit -f, LimitFSIZE=)
	 * fails its write with EFBIG, which the writer handles, instead of
	 * killing capd and every session with it */
	signal(SIGXFSZ, SIG_IGN);

	shards_init(ev_default_loop(EVFLAG_AUTO), capd_workers(capd_settings));
	capd_started = ev_time();
	ev_now_update(capd_loop);
	/* signals first: a supervisor may signal us as soon as the socket exists */
	ev_signal_init(&sig_term, capd_stop_cb, SIGTERM);
	ev_signal_init(&sig_int, capd_stop_cb, SIGINT);
	ev_signal_init(&sig_hup, capd_hup_cb, SIGHUP);
	ev_signal_start(capd_loop, &sig_term);
	ev_signal_start(capd_loop, &sig_int);
	ev_signal_start(capd_loop, &sig_hup);
	ev_init(&capd_grace, capd_grace_cb);

	if (capd_mkdirs(capd_settings->state_dir, &why) < 0 || capd_mkdirs(capd_settings->spool, &why) < 0 ||
	    (state_lock = capd_lock_dir(capd_settings->state_dir, "state_dir", -1, &why)) < 0 ||
	    capd_lock_dir(capd_settings->spool, "spool", state_lock, &why) < 0 ||
	    control_start(capd_settings, &why) < 0 || resolve_init(&why) < 0 ||
	    session_table_init(capd_settings->state_dir, &why) < 0 || spool_start(capd_settings, &why) < 0 ||
	    tls_start(capd_settings, &why) < 0) {
		log_error("%s", why);
		free(why);
		control_stop();
		return 1;
	}
	capd_start_instances(capd_conf, &errs);
	if (errs) {
		/* a config whose instances cannot start is a failed start, as with nginx */
		free(errs);
		capd_finish();
		return 1;
	}
	/* everything the config asks for is bound and open: root is no longer needed */
	tls_prepare();
	/* threads after the drop: capset(2) changes only the calling thread */
	if (privdrop(capd_settings, &why) < 0 || shards_run(capd_shard_init, capd_shard_fini, &why) < 0) {
		log_error("%s", why);
		free(why);
		capd_finish();
		return 1;
	}


#if HAVE_SYSTEMD
	uint64_t wd_usec;
	if (sd_watchdog_enabled(0, &wd_usec) > 0) {
		ev_timer_init(&capd_watchdog, capd_watchdog_cb, 0., (double)wd_usec / 2e6);
		ev_timer_again(capd_loop, &capd_watchdog);
		ev_unref(capd_loop);
	}
#endif
	log_notice("capd %s ready: control %s, spool %s", CAPD_VERSION, control_path(capd_settings),
	           capd_settings->spool);
	capd_notify("READY=1\nSTATUS=running, control %s", control_path(capd_settings));

	capd_serving = true;
	ev_run(capd_loop, 0);

	if (capd_preparing) {
		/*
		 * Not waited for (a filter's host name may take the resolver's
		 * timeout): everything is closed and flushed, but exit() would run
		 * OpenSSL's cleanup under a thread still making the leaf keys, and
		 * capd died of SIGSEGV. Leave without the atexit handlers.
		 */
		log_notice("stopped, leaving an instance that was still being prepared");
		_exit(0);
	}
	log_notice("stopped");
	conf_free(capd_conf);
	return 0;
}

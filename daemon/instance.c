/*
 * The instance registry: the protocol table, creating an instance from its
 * parameters (the same path for a config section and instance.add),
 * binding its listener, accepting connections into sessions, and removal.
 */
#include "instance.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "capd.h"
#include "chain.h"
#include "log.h"
#include "session.h"
#include "spool-follow.h"
#include "spool.h"
#include "tail.h"
#include "tls-ca.h"
#include "tls.h"
#include "values.h"
#include "xmalloc.h"

/*
 * Connections taken per wake-up. The listener stays readable while its
 * backlog lasts, so it drains over a few loop rounds, and the sessions
 * already taken are served in between: interleaved runs of 50 clients gave
 * a p99 latency 5-10 % lower than with 64 (forward, CONNECT), and the same
 * connections/s.
 */
#define ACCEPT_BATCH 16

extern const struct proto proto_dns;
extern const struct proto proto_forward;
extern const struct proto proto_http;
extern const struct proto proto_reverse;
extern const struct proto proto_socks;
extern const struct proto proto_sniff;
extern const struct proto proto_trace;

static const struct proto *const protos[] = {
	&proto_forward,
	&proto_http,
	&proto_reverse,
	&proto_socks,
	&proto_dns,
	&proto_sniff,
	&proto_trace,
};

struct instance_list instances = TAILQ_HEAD_INITIALIZER(instances);
static bool instance_stopping;  /* capd stops: no instance starts any more */

const struct proto *
proto_find(const char *type)
{
	for (size_t i = 0; i < sizeof protos / sizeof protos[0]; i++)
		if (strcmp(protos[i]->name, type) == 0)
			return protos[i];
	return NULL;
}

static void
instance_free(struct instance *inst)
{
	if (inst == NULL)
		return;
	if (inst->proto && inst->proto->free)
		inst->proto->free(inst);
	json_decref(inst->params);
	json_decref(inst->files);
	free(inst->name);
	free(inst->error);
	free(inst);
}

/*
 * The name of an instance added without one: base (TYPE-PORT, sniff-IFACE),
 * or when that is taken (the same port on ::1, a second sniffer of the
 * interface) base-2, base-3 ..., the first free, as docker compose numbers
 * replicas: the second add was refused for a name the user never chose.
 * Takes base. Config sections always name theirs.
 */
static char *
instance_default_name(char *base)
{
	char *name = base;

	for (unsigned n = 2; instance_find(name) != NULL; n++) {
		if (name != base)
			free(name);
		name = xasprintf("%s-%u", base, n);
	}
	if (name != base)
		free(base);
	return name;
}

/* Parses the common keys and the protocol's own; nothing is opened. */
static struct instance *
instance_configure(json_t *params, const char *file, json_t *lines, int section_line, char **why)
{
	struct instance *inst = xcalloc(1, sizeof *inst);
	struct params p = { .obj = params, .file = file, .lines = lines, .section_line = section_line };
	const char *type = params_str(&p, "type", NULL), *name, *listen;
	char *err = NULL;

	inst->spool_iface = -1;
	inst->params = params;
	json_incref(params);
	inst->files = json_object();
	p.files = inst->files;
	if (type == NULL || (inst->proto = proto_find(type)) == NULL) {
		params_fail(&p, NULL, "unknown instance type '%s'", type ? type : "");
		goto fail;
	}
	if (params_check_keys(&p, inst->proto->keys) < 0)
		goto fail;
	if (inst->proto->listens) {
		listen = params_str(&p, "listen", NULL);
		if (listen == NULL) {
			params_fail(&p, NULL, "a %s instance needs 'listen'", type);
			goto fail;
		}
		if (addr_parse_listen(listen, &inst->listen, &inst->listen_len, &err) < 0) {
			params_fail(&p, "listen", "%s", err);
			free(err);
			goto fail;
		}
		addr_format((struct sockaddr *)&inst->listen, inst->listen_str, sizeof inst->listen_str);
	}
	if (!inst->proto->listens) {
		/* what only a listening proxy does: taken silently, it would seem to work */
		static const char *const only_listening[] = { "expose", "idle_timeout", "connect_timeout" };
		for (size_t i = 0; i < sizeof only_listening / sizeof *only_listening; i++)
			if (json_object_get(params, only_listening[i]) != NULL) {
				params_fail(&p, only_listening[i], "'%s' applies to instances that listen, not to %s",
				            only_listening[i], type);
				goto fail;
			}
	}
	if (params_bool(&p, "expose", false, &inst->expose) < 0 ||
	    params_bool(&p, "capture", true, &inst->capture) < 0 ||
	    params_duration(&p, "idle_timeout", 0, &inst->idle_timeout) < 0 ||
	    params_duration(&p, "connect_timeout", 10, &inst->connect_timeout) < 0)
		goto fail;
	if (inst->proto->listens && !inst->expose && !addr_is_loopback((struct sockaddr *)&inst->listen)) {
		params_fail(&p, "listen", "%s is not a loopback address: set expose = yes (or --expose) to listen there",
		            inst->listen_str);
		goto fail;
	}
	name = params_str(&p, "name", NULL);
	if (name == NULL && inst->proto->listens) {
		inst->name = instance_default_name(xasprintf("%s-%u", type, addr_port((struct sockaddr *)&inst->listen)));
		json_object_set_new(params, "name", json_string(inst->name));
	} else if (name == NULL && json_is_string(json_object_get(params, "interface"))) {
		inst->name = instance_default_name(xasprintf("%s-%s", type,
		                                             json_string_value(json_object_get(params, "interface"))));
		json_object_set_new(params, "name", json_string(inst->name));
	} else if (name == NULL) {
		params_fail(&p, NULL, "a name is needed");
		goto fail;
	} else {
		/* value_name_ok, as capctl checks it: a control character (a newline,
		 * an escape) would break capctl list's table and tail events' lines */
		if (!value_name_ok(name)) {
			params_fail(&p, "name", "bad instance name '%s' (1 to %d bytes, no spaces, quotes, slashes or control characters)",
			            name, VALUE_NAME_MAX);
			goto fail;
		}
		inst->name = xstrdup(name);
	}
	if (inst->expose)
		params_warn_check(&p, "expose", "%s listens on %s, beyond loopback", inst->name, inst->listen_str);
	if (inst->proto->configure && inst->proto->configure(inst, &p) < 0)
		goto fail;
	if (p.why)
		goto fail;
	return inst;
fail:
	*why = p.why ? p.why : xstrdup("bad parameters");
	instance_free(inst);
	return NULL;
}

int
instance_check(json_t *params, const char *file, json_t *lines, int section_line, json_t **files, char **why)
{
	json_t *copy = json_deep_copy(params);
	struct instance *inst = instance_configure(copy, file, lines, section_line, why);

	json_decref(copy);
	if (inst == NULL)
		return -1;
	if (files)
		*files = json_incref(inst->files);
	instance_free(inst);
	return 0;
}

const char *
instance_file_changed(const struct instance *inst, json_t *files)
{
	const char *path;
	json_t *v;

	json_object_foreach(files, path, v) {
		if (!json_equal(v, json_object_get(inst->files, path)))
			return path;
	}
	json_object_foreach(inst->files, path, v) {
		if (json_object_get(files, path) == NULL)
			return path;
	}
	return NULL;
}

/* Whether key is one of proto's live_keys. */
static bool
instance_key_live(const struct proto *proto, const char *key)
{
	for (const char *const *k = proto->live_keys; k && *k; k++)
		if (strcmp(*k, key) == 0)
			return true;
	return false;
}

/* Whether a and b differ only in keys proto can change on a running instance. */
static bool
instance_diff_live(const struct proto *proto, json_t *a, json_t *b)
{
	const char *key;
	json_t *v;

	json_object_foreach(a, key, v) {
		if (!json_equal(v, json_object_get(b, key)) && !instance_key_live(proto, key))
			return false;
	}
	json_object_foreach(b, key, v) {
		if (json_object_get(a, key) == NULL && !instance_key_live(proto, key))
			return false;
	}
	return true;
}

bool
instance_update(struct instance *inst, json_t *params)
{
	struct instance *fresh;
	json_t *copy, *old;
	char *why = NULL;

	if (inst->proto->update == NULL || inst->state != INSTANCE_RUNNING ||
	    !instance_diff_live(inst->proto, inst->params, params))
		return false;
	/* the reload checked the file already: a failure here is unexpected, and restarting is the safe answer */
	copy = json_deep_copy(params);
	fresh = instance_configure(copy, NULL, NULL, 0, &why);
	json_decref(copy);
	if (fresh == NULL) {
		log_warnx("instance %s: %s; restarting it", inst->name, why);
		free(why);
		return false;
	}
	/* the sessions read the config on every shard: they wait (shard.h) */
	shards_pause();
	inst->proto->update(inst, fresh);
	old = inst->params;
	inst->params = fresh->params;
	fresh->params = old;
	shards_resume();
	instance_free(fresh);
	log_info("instance %s changed by reload, its sessions kept", inst->name);
	return true;
}

static void
instance_accept_resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct listener *l = w->data;

	(void)revents;
	ev_io_start(loop, &l->io);
}

static void
instance_accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct listener *l = w->data;
	struct instance *inst = l->inst;

	(void)revents;
	for (int i = 0; i < ACCEPT_BATCH; i++) {
		struct sockaddr_storage peer;
		socklen_t len = sizeof peer;
		int fd = accept4(l->fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
				return;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				/* out of descriptors: pause instead of spinning on a ready listener */
				log_warn("%s: accept paused for 1 s", inst->name);
				ev_io_stop(loop, &l->io);
				ev_timer_set(&l->pause, 1., 0.);
				ev_timer_start(loop, &l->pause);
				return;
			}
			log_warn("%s: accept", inst->name);
			return;
		}
		session_read_first(session_new(inst, fd, (struct sockaddr *)&peer));
	}
}

/* A bound, listening socket. -1 and *why. */
static int
instance_socket(struct instance *inst, char **why)
{
	struct sockaddr *sa = (struct sockaddr *)&inst->listen;
	int fd, one = 1;

	fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		*why = xasprintf("socket: %s", strerror(errno));
		return -1;
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	/* accepted sockets inherit these: one call here instead of one per
	 * session (TCP_INQ: relay.c, a FIN seen behind the data) */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, IPPROTO_TCP, TCP_INQ, &one, sizeof one);
	if (sa->sa_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
	if (bind(fd, sa, inst->listen_len) < 0) {
		if (errno == EADDRINUSE)
			*why = xasprintf("port %u is in use (%s)", addr_port(sa), inst->listen_str);
		else if (errno == EACCES)
			*why = xasprintf("cannot bind %s: permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
			                 inst->listen_str);
		else
			*why = xasprintf("cannot bind %s: %s", inst->listen_str, strerror(errno));
		close(fd);
		return -1;
	}
	if (listen(fd, SOMAXCONN) < 0) {
		*why = xasprintf("listen %s: %s", inst->listen_str, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* Run on the listener's own shard (shard_call). */
static void
instance_listener_start(void *arg)
{
	struct listener *l = arg;

	ev_io_start(capd_loop, &l->io);
}

static void
instance_listener_stop(void *arg)
{
	struct listener *l = arg;

	ev_io_stop(capd_loop, &l->io);
	ev_timer_stop(capd_loop, &l->pause);
}

static int
instance_listen(struct instance *inst, char **why)
{
	unsigned first = inst->proto->sharded ? shards_session_first() : 0;
	unsigned n = inst->proto->sharded ? shards_count() - first : 1;

	/*
	 * One socket, watched by every session thread: whichever is free takes
	 * the next connection. (A SO_REUSEPORT socket per thread spreads them by
	 * a hash of the addresses instead, busy or not: measured, p99 latency
	 * 20 % worse and no faster; and it would let a process of our uid join
	 * the port.)
	 */
	int shared = instance_socket(inst, why);

	if (shared < 0)
		return -1;
	inst->lis = xcalloc(n, sizeof *inst->lis);
	for (unsigned i = 0; i < n; i++) {
		struct listener *l = &inst->lis[i];

		l->inst = inst;
		l->shard = shard_at(first + i);
		l->fd = shared;
		ev_io_init(&l->io, instance_accept_cb, shared, EV_READ);
		l->io.data = l;
		ev_init(&l->pause, instance_accept_resume_cb);
		l->pause.data = l;
		shard_call(l->shard, instance_listener_start, l);
	}
	inst->nlis = n;
	return 0;
}

static void
instance_close_listener(struct instance *inst)
{
	if (inst->nlis == 0)
		return;
	for (unsigned i = 0; i < inst->nlis; i++)
		shard_call(inst->lis[i].shard, instance_listener_stop, &inst->lis[i]);
	close(inst->lis[0].fd);  /* the one socket, once every shard stopped watching it */
	free(inst->lis);
	inst->lis = NULL;
	inst->nlis = 0;
}

/* True (and inst freed, *why set) when a registered instance has inst's name. */
static bool
instance_name_taken(struct instance *inst, char **why)
{
	if (instance_find(inst->name) == NULL)
		return false;
	*why = xasprintf("an instance named '%s' exists already", inst->name);
	instance_free(inst);
	return true;
}

static uint64_t instance_serial;  /* main thread */

/* Configured and named, nothing opened: what prepare and instance_finish take. */
static struct instance *
instance_new(json_t *params, bool from_config, char **why)
{
	json_t *copy = json_deep_copy(params);
	struct instance *inst = instance_configure(copy, NULL, NULL, 0, why);

	json_decref(copy);
	if (inst == NULL)
		return NULL;
	inst->serial = ++instance_serial;
	/* keep the parameters as given, so a reload compares like with like */
	json_decref(inst->params);
	inst->params = json_deep_copy(params);
	json_object_set_new(inst->params, "name", json_string(inst->name));
	inst->from_config = from_config;
	return instance_name_taken(inst, why) ? NULL : inst;
}

/* What may block before an instance starts: its protocol's prepare, and the
 * TLS leaf keys of the first instance that intercepts (tls-ca.h). */
static bool
instance_has_prepare(const struct instance *inst)
{
	return inst->proto->prepare != NULL || (inst->intercepts && !tls_ca_keys_ready());
}

static int
instance_prepare(struct instance *inst, char **why)
{
	if (inst->intercepts)
		(void)tls_ca_keys_ensure();  /* outside capd_lock; instance_finish reports a failure */
	return inst->proto->prepare ? inst->proto->prepare(inst, why) : 0;
}

/*
 * A config instance that could not start (its port taken, its interface
 * gone) stays listed as failed with the reason, as a sniffer that failed
 * while running does: after a reload `capctl list` showed neither the old
 * instance, stopped, nor the new one, and the next reload restarts a failed
 * one. One from capctl is refused and freed, as before. Either way *why
 * stays for the caller to report.
 */
static void
instance_drop(struct instance *inst, const char *why)
{
	/* at start-up one that cannot start stops capd: nothing to list */
	if (!inst->from_config || !capd_serving || instance_stopping || instance_find(inst->name) != NULL) {
		instance_free(inst);
		return;
	}
	inst->state = INSTANCE_FAILED;
	inst->never_started = true;
	free(inst->error);
	inst->error = xstrdup(why);
	TAILQ_INSERT_TAIL(&instances, inst, entry);
	events_emit("instance.fail", instance_json(inst));  /* the caller logs why, with the file's line */
}

/* Binds, starts and registers a new (prepared) instance; on failure drops it (instance_drop). */
static struct instance *
instance_finish(struct instance *inst, char **why)
{
	if (instance_name_taken(inst, why))  /* another may have taken it while this one prepared */
		return NULL;
	if (instance_stopping) {
		/* it would listen and take clients in the stop's grace, to be cut at its end */
		*why = xstrdup("capd is stopping");
		instance_free(inst);
		return NULL;
	}
	/* an instance that cannot intercept is refused, not left to fail each client */
	if (inst->intercepts && tls_instance_ready(why) < 0) {
		instance_drop(inst, *why);
		return NULL;
	}
	if (inst->proto->listens && instance_listen(inst, why) < 0) {
		instance_drop(inst, *why);
		return NULL;
	}
	if (inst->capture && inst->proto->listens) {
		char *desc = xasprintf("capd %s instance on %s", inst->proto->name, inst->listen_str);
		inst->spool_iface = spool_iface_add(inst->name, desc, 101 /* LINKTYPE_RAW */, 65535, false);
		free(desc);
	}
	if (inst->proto->start && inst->proto->start(inst, why) < 0) {
		instance_close_listener(inst);
		if (inst->spool_iface >= 0)
			spool_iface_remove(inst->spool_iface);
		inst->spool_iface = -1;
		instance_drop(inst, *why);
		return NULL;
	}
	if (inst->expose)
		log_warnx("%s listens on %s, beyond loopback", inst->name, inst->listen_str);
	TAILQ_INSERT_TAIL(&instances, inst, entry);
	chain_ports_update();
	log_info("instance %s (%s) started on %s", inst->name, inst->proto->name, inst->listen_str);
	events_emit("instance.add", instance_json(inst));
	return inst;
}

struct instance *
instance_add(json_t *params, bool from_config, char **why)
{
	struct instance *inst = instance_new(params, from_config, why);

	if (inst == NULL)
		return NULL;
	if (instance_prepare(inst, why) < 0) {
		instance_drop(inst, *why);
		return NULL;
	}
	return instance_finish(inst, why);
}

/* An instance being prepared on a helper thread, then finished on the main loop. */
struct instance_job {
	struct instance_job *next;
	struct instance *inst;       /* owned until finished */
	char *why;
	int rc;                      /* prepare's */
	instance_added_fn *done;
	void *arg;
	pthread_t thread;
	bool threaded;               /* thread is to be joined when the job ends */
};

static pthread_mutex_t instance_jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static struct instance_job *instance_jobs_done;  /* under the lock */
static unsigned instance_jobs_running;           /* under the lock: prepares not yet done */
static ev_async instance_jobs_async;

static void
instance_job_end(struct instance_job *j)
{
	struct instance *inst = NULL;

	if (j->threaded)
		pthread_join(j->thread, NULL);  /* it has pushed the job: it is returning */
	shards_pause();
	if (j->rc < 0 && j->inst != NULL)
		instance_drop(j->inst, j->why ? j->why : "cannot be prepared");
	else if (j->rc >= 0)
		inst = instance_finish(j->inst, &j->why);
	j->done(j->arg, inst, j->why);
	shards_resume();
	free(j->why);
	free(j);
}

static void
instance_jobs_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	struct instance_job *j, *next, *fifo = NULL;

	(void)loop; (void)w; (void)revents;
	pthread_mutex_lock(&instance_jobs_lock);
	j = instance_jobs_done;
	instance_jobs_done = NULL;
	pthread_mutex_unlock(&instance_jobs_lock);
	for (; j; j = next) {  /* pushed newest first: finish them in the order they ended */
		next = j->next;
		j->next = fifo;
		fifo = j;
	}
	for (j = fifo; j; j = next) {
		next = j->next;
		instance_job_end(j);
	}
}

static void *
instance_job_run(void *arg)
{
	struct instance_job *j = arg;

	j->rc = instance_prepare(j->inst, &j->why);
	pthread_mutex_lock(&instance_jobs_lock);
	j->next = instance_jobs_done;
	instance_jobs_done = j;
	ev_async_send(capd_main, &instance_jobs_async);
	instance_jobs_running--;
	pthread_mutex_unlock(&instance_jobs_lock);
	return NULL;
}

bool
instance_jobs_stop(void)
{
	unsigned running;

	/* read with the list: a prepare that is over has pushed its job by then */
	pthread_mutex_lock(&instance_jobs_lock);
	running = instance_jobs_running;
	pthread_mutex_unlock(&instance_jobs_lock);
	instance_jobs_cb(capd_main, &instance_jobs_async, 0);  /* ends and joins those */
	return running > 0;
}

void
instance_add_async(json_t *params, bool from_config, instance_added_fn *done, void *arg)
{
	struct instance_job *j = xcalloc(1, sizeof *j);

	j->done = done;
	j->arg = arg;
	j->inst = instance_new(params, from_config, &j->why);
	if (j->inst == NULL || !instance_has_prepare(j->inst)) {
		j->rc = j->inst ? 0 : -1;  /* nothing to wait for */
		instance_job_end(j);
		return;
	}
	if (!ev_is_active(&instance_jobs_async)) {
		ev_async_init(&instance_jobs_async, instance_jobs_cb);
		ev_async_start(capd_main, &instance_jobs_async);
	}
	pthread_mutex_lock(&instance_jobs_lock);
	instance_jobs_running++;
	pthread_mutex_unlock(&instance_jobs_lock);
	if (pthread_create(&j->thread, NULL, instance_job_run, j) != 0) {
		pthread_mutex_lock(&instance_jobs_lock);
		instance_jobs_running--;
		pthread_mutex_unlock(&instance_jobs_lock);
		log_warnx("%s: no thread to prepare it on; preparing it in line", j->inst->name);
		j->rc = instance_prepare(j->inst, &j->why);
		instance_job_end(j);
		return;
	}
	j->threaded = true;
}

/*
 * Names of instances removed since capd started, newest last: capctl sessions
 * --instance NAME of one whose sessions all fell out of the history (or that
 * never had one) is an empty list, not "no instance" for a name that ran.
 * Bounded like that history; main thread only.
 */
#define REMOVED_NAMES_MAX 1000
static char **removed_names;
static size_t removed_n;

static void
instance_remember_removed(const char *name)
{
	for (size_t i = 0; i < removed_n; i++)
		if (strcmp(removed_names[i], name) == 0)
			return;
	if (removed_n == REMOVED_NAMES_MAX) {
		free(removed_names[0]);
		memmove(removed_names, removed_names + 1, --removed_n * sizeof *removed_names);
	}
	removed_names = xrealloc(removed_names, (removed_n + 1) * sizeof *removed_names);
	removed_names[removed_n++] = xstrdup(name);
}

bool
instance_was_removed(const char *name)
{
	for (size_t i = 0; i < removed_n; i++)
		if (strcmp(removed_names[i], name) == 0)
			return true;
	return false;
}

void
instance_remove(struct instance *inst, const char *reason)
{
	/* none of its sessions may start or run while it goes (shard.h) */
	shards_pause();
	TAILQ_REMOVE(&instances, inst, entry);
	chain_ports_update();
	instance_close_listener(inst);
	if (inst->proto->stop && inst->state == INSTANCE_RUNNING)
		inst->proto->stop(inst);
	session_close_instance(inst, reason);
	if (inst->spool_iface >= 0) {
		spool_follow_iface_removed(inst->spool_iface, inst->name);
		spool_iface_remove(inst->spool_iface);
	}
	log_info("instance %s removed: %s", inst->name, reason);
	inst->state = INSTANCE_STOPPED;  /* what the event reports: it runs no more */
	events_emit("instance.remove", instance_json(inst));
	instance_remember_removed(inst->name);
	/* closed sessions keep their instance name in the history only as text, so freeing is safe */
	instance_free(inst);
	shards_resume();
}

void
instance_remove_all(void)
{
	struct instance *inst;

	while ((inst = TAILQ_FIRST(&instances)) != NULL)
		instance_remove(inst, "capd stopped");
}

void
instance_stop_accepting(void)
{
	struct instance *inst;

	instance_stopping = true;
	TAILQ_FOREACH(inst, &instances, entry)
		instance_close_listener(inst);
}

struct instance *
instance_find(const char *name)
{
	struct instance *inst;

	TAILQ_FOREACH(inst, &instances, entry)
		if (strcmp(inst->name, name) == 0)
			return inst;
	return NULL;
}

void
instance_fail(struct instance *inst, const char *why)
{
	if (inst->state == INSTANCE_FAILED)
		return;
	instance_close_listener(inst);
	if (inst->proto->stop)
		inst->proto->stop(inst);
	inst->state = INSTANCE_FAILED;
	free(inst->error);
	inst->error = xstrdup(why);
	log_warnx("instance %s failed: %s", inst->name, why);
	if (inst->spool_iface >= 0)
		spool_follow_iface_failed(inst->spool_iface, inst->name, why);
	events_emit("instance.fail", instance_json(inst));
}

json_t *
instance_json(struct instance *inst)
{
	static const char *const states[] = {
		[INSTANCE_RUNNING] = "running", [INSTANCE_FAILED] = "failed", [INSTANCE_STOPPED] = "stopped",
	};
	json_t *o = json_object();

	json_object_set_new(o, "name", json_string(inst->name));
	json_object_set_new(o, "type", json_string(inst->proto->name));
	json_object_set_new(o, "listen", json_string(inst->listen_str));
	json_object_set_new(o, "state", json_string(states[inst->state]));
	json_object_set_new(o, "sessions", json_integer(inst->open_sessions));
	json_object_set_new(o, "bytes_up", json_integer((json_int_t)inst->bytes_up));
	json_object_set_new(o, "bytes_down", json_integer((json_int_t)inst->bytes_down));
	json_object_set_new(o, "capture", json_boolean(inst->capture));
	if (inst->proto->listens) {  /* as given (capctl add --idle-timeout, the file): list showed neither */
		json_object_set_new(o, "idle_timeout", json_real(inst->idle_timeout));
		json_object_set_new(o, "connect_timeout", json_real(inst->connect_timeout));
	}
	json_object_set_new(o, "origin", json_string(inst->from_config ? "config" : "capctl"));
	if (inst->error)
		json_object_set_new(o, "error", json_string(inst->error));
	if (inst->proto->describe)
		inst->proto->describe(inst, o);
	return o;
}

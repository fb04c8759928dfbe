/*
 * Shards: the loops, their threads, the lock, calls across threads and the
 * closes deferred to the moment a loop is about to wait (see shard.h).
 */
#include "shard.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "xmalloc.h"

/* A call waiting for its shard; lives on the caller's stack until done. */
struct shard_job {
	void (*fn)(void *);
	void *arg;
	bool done;
	struct shard_job *next;
};

struct shard {
	struct ev_loop *loop;
	unsigned index;
	pthread_t thread;
	bool running;             /* a worker thread runs the loop (shard 0: always the caller's) */
	bool stopping;
	ev_async wake;            /* jobs waiting, a stop, or watchers changed by another thread */
	struct shard_job *jobs, **jobs_tail;
	int *closing;             /* descriptors to close before the loop next waits */
	size_t nclosing, capclosing;
	void (*thread_init)(void), (*thread_fini)(void);
};

struct ev_loop *capd_main;
_Thread_local struct ev_loop *capd_loop;
_Thread_local struct shard *shard_self;

static struct shard *shards;
static unsigned nshards;
static bool shards_locking;   /* workers run: the lock is real */
static pthread_mutex_t capd_mu;
static pthread_cond_t shard_done = PTHREAD_COND_INITIALIZER;

void
capd_lock(void)
{
	if (shards_locking)
		pthread_mutex_lock(&capd_mu);
}

void
capd_unlock(void)
{
	if (shards_locking)
		pthread_mutex_unlock(&capd_mu);
}

static void
shard_close_pending(struct shard *sh)
{
	size_t n = sh->nclosing;

	sh->nclosing = 0;
	for (size_t i = 0; i < n; i++)
		close(sh->closing[i]);
}

/* libev calls these around epoll_wait: the lock is free while the loop waits. */
static void
shard_release_cb(struct ev_loop *loop)
{
	struct shard *sh = ev_userdata(loop);

	capd_unlock();
	/* only this thread adds to its list, so no lock is needed to empty it */
	shard_close_pending(sh);
}

static void
shard_acquire_cb(struct ev_loop *loop)
{
	(void)loop;
	capd_lock();
}

static void
shard_wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	struct shard *sh = w->data;
	struct shard_job *j;
	bool ran = false;

	(void)revents;
	while ((j = sh->jobs) != NULL) {
		sh->jobs = j->next;
		if (sh->jobs == NULL)
			sh->jobs_tail = &sh->jobs;
		j->fn(j->arg);
		j->done = true;
		ran = true;
	}
	if (ran)
		pthread_cond_broadcast(&shard_done);
	if (sh->stopping)
		ev_break(loop, EVBREAK_ALL);
}

void
shards_init(struct ev_loop *main_loop, unsigned n)
{
	pthread_mutexattr_t ma;

	if (n < 1)
		n = 1;
	pthread_mutexattr_init(&ma);
	/* held for a few microseconds at a time: spin briefly before sleeping */
	pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
	pthread_mutex_init(&capd_mu, &ma);
	pthread_mutexattr_destroy(&ma);

	capd_main = capd_loop = main_loop;
	nshards = n;
	shards = xcalloc(n, sizeof *shards);
	for (unsigned i = 0; i < n; i++) {
		struct shard *sh = &shards[i];

		sh->index = i;
		sh->loop = i == 0 ? main_loop : ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
		if (sh->loop == NULL)
			fatalx("cannot create event loop %u", i);
		sh->jobs_tail = &sh->jobs;
		ev_set_userdata(sh->loop, sh);
		ev_set_loop_release_cb(sh->loop, shard_release_cb, shard_acquire_cb);
		ev_async_init(&sh->wake, shard_wake_cb);
		sh->wake.data = sh;
		ev_async_start(sh->loop, &sh->wake);
		if (i == 0)
			ev_unref(sh->loop);  /* shard 0's wake-up alone must not keep capd running */
	}
	shard_self = &shards[0];
}

static void *
shard_main(void *arg)
{
	struct shard *sh = arg;

	capd_loop = sh->loop;
	shard_self = sh;
	capd_lock();
	if (sh->thread_init)
		sh->thread_init();
	ev_run(sh->loop, 0);
	if (sh->thread_fini)
		sh->thread_fini();
	shard_close_pending(sh);
	capd_unlock();
	return NULL;
}

int
shards_run(void (*thread_init)(void), void (*thread_fini)(void), char **why)
{
	sigset_t all, old;

	if (nshards <= 1)
		return 0;
	/* from here on the main thread holds the lock except while it waits */
	shards_locking = true;
	capd_lock();
	/* signals stay with the main thread, whose loop handles them */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (unsigned i = 1; i < nshards; i++) {
		struct shard *sh = &shards[i];
		int err;

		sh->thread_init = thread_init;
		sh->thread_fini = thread_fini;
		if ((err = pthread_create(&sh->thread, NULL, shard_main, sh)) != 0) {
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			*why = xasprintf("cannot start worker thread %u: %s", i, strerror(err));
			shards_stop();
			return -1;
		}
		sh->running = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return 0;
}

void
shards_stop(void)
{
	for (unsigned i = 1; i < nshards; i++) {
		struct shard *sh = &shards[i];
		if (!sh->running)
			continue;
		sh->stopping = true;
		ev_async_send(sh->loop, &sh->wake);
	}
	/* the workers need the lock to finish */
	capd_unlock();
	for (unsigned i = 1; i < nshards; i++) {
		struct shard *sh = &shards[i];
		if (!sh->running)
			continue;
		pthread_join(sh->thread, NULL);
		sh->running = false;
	}
	shards_locking = false;
	for (unsigned i = 0; i < nshards; i++) {
		struct shard *sh = &shards[i];
		shard_close_pending(sh);
		free(sh->closing);
		sh->closing = NULL;
		sh->capclosing = 0;
		if (i > 0) {
			ev_async_stop(sh->loop, &sh->wake);
			ev_loop_destroy(sh->loop);
		} else {
			ev_ref(sh->loop);
			ev_async_stop(sh->loop, &sh->wake);
			ev_set_loop_release_cb(sh->loop, NULL, NULL);
		}
	}
	free(shards);
	shards = NULL;
	nshards = 0;
	shard_self = NULL;
}

unsigned
shards_count(void)
{
	return nshards;
}

struct shard *
shard_at(unsigned i)
{
	return i < nshards ? &shards[i] : NULL;
}

struct ev_loop *
shard_loop(const struct shard *sh)
{
	return sh ? sh->loop : capd_loop;
}

void
shard_call(struct shard *sh, void (*fn)(void *), void *arg)
{
	struct shard_job j = { .fn = fn, .arg = arg };

	if (sh == shard_self || !sh->running) {
		/* not running (yet, or any more): run it here, as if on that loop */
		struct ev_loop *loop = capd_loop;
		struct shard *self = shard_self;
		capd_loop = sh->loop;
		shard_self = sh;
		fn(arg);
		capd_loop = loop;
		shard_self = self;
		return;
	}
	*sh->jobs_tail = &j;
	sh->jobs_tail = &j.next;
	ev_async_send(sh->loop, &sh->wake);
	while (!j.done)
		pthread_cond_wait(&shard_done, &capd_mu);
}

void
shard_wake(struct ev_loop *loop)
{
	struct shard *sh;

	if (loop == capd_loop || !shards_locking)
		return;
	sh = ev_userdata(loop);
	ev_async_send(loop, &sh->wake);
}

void
shard_close(int fd)
{
	struct shard *sh = shard_self;

	if (sh == NULL || sh->loop != capd_loop) {
		close(fd);
		return;
	}
	if (sh->nclosing == sh->capclosing) {
		sh->capclosing = sh->capclosing ? sh->capclosing * 2 : 64;
		sh->closing = xrealloc(sh->closing, sh->capclosing * sizeof *sh->closing);
	}
	sh->closing[sh->nclosing++] = fd;
}

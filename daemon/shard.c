/*
 * Shards: the loops, their threads, the lock, and the pauses that let the
 * main thread act on any session (see shard.h).
 */
#include "shard.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "relay.h"
#include "xmalloc.h"

struct shard {
	struct ev_loop *loop;
	unsigned index;
	pthread_t thread;
	bool running;             /* a worker thread runs the loop */
	bool stopping;            /* under the lock */
	ev_async wake;            /* a pause, a stop, or watchers changed by another thread */
	unsigned sessions;        /* open sessions it owns; under the lock */
	bool trim;                /* under the lock: its pools are to be trimmed (shard_trim) */
	void (*thread_init)(void), (*thread_fini)(void);
};

struct ev_loop *capd_main;
bool capd_serving;
_Thread_local struct ev_loop *capd_loop;
_Thread_local struct shard *shard_self;
static _Thread_local struct shard *shard_own;  /* the thread's own shard; shard_call does not change it */

static struct shard *shards;
static unsigned nshards;
static bool shards_threaded;          /* workers run: the lock is real */
static pthread_mutex_t capd_mu = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local unsigned lock_depth;

/* Pauses; all under capd_mu. */
static bool shards_pausing;
static unsigned shards_parked;
static unsigned pause_depth;          /* main thread only */
static pthread_cond_t parked_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t resume_cv = PTHREAD_COND_INITIALIZER;

void
capd_lock(void)
{
	if (shards_threaded && lock_depth++ == 0)
		pthread_mutex_lock(&capd_mu);
}

void
capd_unlock(void)
{
	if (shards_threaded && --lock_depth == 0)
		pthread_mutex_unlock(&capd_mu);
}

/* libev calls these around the main loop's epoll_wait: the lock is free while it waits. */
static void
shard_release_cb(struct ev_loop *loop)
{
	(void)loop;
	capd_unlock();
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
	bool stop;

	(void)revents;
	if (sh->index == 0)
		return;  /* the main loop only needed to wake up */
	capd_lock();
	if (shards_pausing) {
		shards_parked++;
		pthread_cond_signal(&parked_cv);
		while (shards_pausing)
			pthread_cond_wait(&resume_cv, &capd_mu);
		shards_parked--;
	}
	stop = sh->stopping;
	bool trim = sh->trim && sh->sessions == 0;
	sh->trim = false;
	capd_unlock();
	if (trim)
		relay_trim();
	if (stop)
		ev_break(loop, EVBREAK_ALL);
}

void
shards_init(struct ev_loop *main_loop, unsigned workers)
{
	nshards = workers >= 2 ? workers + 1 : 1;
	capd_main = capd_loop = main_loop;
	shards = xcalloc(nshards, sizeof *shards);
	for (unsigned i = 0; i < nshards; i++) {
		struct shard *sh = &shards[i];

		sh->index = i;
		sh->loop = i == 0 ? main_loop : ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
		if (sh->loop == NULL)
			fatalx("cannot create event loop %u", i);
		ev_set_userdata(sh->loop, sh);
		ev_async_init(&sh->wake, shard_wake_cb);
		sh->wake.data = sh;
		ev_async_start(sh->loop, &sh->wake);
		ev_unref(sh->loop);  /* the wake-up alone must not keep a loop running */
	}
	shard_self = shard_own = &shards[0];
}

static void *
shard_main(void *arg)
{
	struct shard *sh = arg;

	char name[16];

	snprintf(name, sizeof name, "capd-worker-%u", sh->index);
	pthread_setname_np(pthread_self(), name);  /* top -H, /proc/PID/task/N/comm */
	capd_loop = sh->loop;
	shard_self = shard_own = sh;
	capd_lock();
	if (sh->thread_init)
		sh->thread_init();
	capd_unlock();
	/* the wake-up is unref'd: run until told to stop, even with nothing to do */
	ev_ref(sh->loop);
	ev_run(sh->loop, 0);
	ev_unref(sh->loop);
	capd_lock();
	if (sh->thread_fini)
		sh->thread_fini();
	capd_unlock();
	return NULL;
}

int
shards_run(void (*thread_init)(void), void (*thread_fini)(void), char **why)
{
	sigset_t all, old;

	if (nshards <= 1)
		return 0;
	/* from here on the main thread holds the lock except while its loop waits */
	shards_threaded = true;
	capd_lock();
	ev_set_loop_release_cb(capd_main, shard_release_cb, shard_acquire_cb);
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
	if (shards == NULL)
		return;
	if (shards_threaded) {
		for (unsigned i = 1; i < nshards; i++) {
			shards[i].stopping = true;
			if (shards[i].running)
				ev_async_send(shards[i].loop, &shards[i].wake);
		}
		/* the workers need the lock to finish */
		lock_depth = 0;
		pthread_mutex_unlock(&capd_mu);
		for (unsigned i = 1; i < nshards; i++) {
			if (!shards[i].running)
				continue;
			pthread_join(shards[i].thread, NULL);
			shards[i].running = false;
		}
		shards_threaded = false;
		ev_set_loop_release_cb(capd_main, NULL, NULL);
	}
	for (unsigned i = 0; i < nshards; i++) {
		struct shard *sh = &shards[i];

		ev_ref(sh->loop);
		ev_async_stop(sh->loop, &sh->wake);
		if (i > 0)
			ev_loop_destroy(sh->loop);
	}
	free(shards);
	shards = NULL;
	nshards = 0;
	shard_self = shard_own = NULL;
}

unsigned
shards_count(void)
{
	return nshards;
}

unsigned
shards_session_first(void)
{
	return nshards > 1 ? 1 : 0;
}

struct shard *
shard_at(unsigned i)
{
	return i < nshards ? &shards[i] : NULL;
}

void
shards_pause(void)
{
	if (!shards_threaded)
		return;
	if (shard_own != &shards[0])
		fatalx("shards_pause called on a worker thread");  /* it would wait for itself */
	if (pause_depth++ > 0)
		return;
	shards_pausing = true;
	for (unsigned i = 1; i < nshards; i++)
		if (shards[i].running)
			ev_async_send(shards[i].loop, &shards[i].wake);
	/* waiting releases the lock, so that a worker inside it can get to its wake-up */
	for (;;) {
		unsigned want = 0;
		for (unsigned i = 1; i < nshards; i++)
			want += shards[i].running;
		if (shards_parked >= want)
			break;
		pthread_cond_wait(&parked_cv, &capd_mu);
	}
}

void
shards_resume(void)
{
	if (!shards_threaded || --pause_depth > 0)
		return;
	shards_pausing = false;
	/* they go on once the main loop releases the lock, when it next waits */
	pthread_cond_broadcast(&resume_cv);
}

void
shard_call(struct shard *sh, void (*fn)(void *), void *arg)
{
	struct ev_loop *loop = capd_loop;
	struct shard *self = shard_self;

	if (sh == NULL || sh == shard_self) {
		fn(arg);
		return;
	}
	shards_pause();
	capd_loop = sh->loop;
	shard_self = sh;
	fn(arg);
	capd_loop = loop;
	shard_self = self;
	shards_resume();
}

void
shard_as_main(void (*fn)(void *), void *arg)
{
	struct ev_loop *loop = capd_loop;
	struct shard *self = shard_self;

	capd_lock();
	capd_loop = capd_main;
	shard_self = &shards[0];
	/* from a worker: the main loop's clock stopped when it last woke, maybe
	 * long ago, and what fn stamps (a session's end) would carry that time;
	 * it sleeps in epoll_wait, without the lock, so its clock is ours to set */
	if (shard_own != &shards[0])
		ev_now_update(capd_main);
	fn(arg);
	capd_loop = loop;
	shard_self = self;
	capd_unlock();
	if (shards_threaded && shard_own != &shards[0])
		ev_async_send(capd_main, &shards[0].wake);
}

unsigned
shard_sessions_add(struct shard *sh, int delta)
{
	if (sh == NULL)
		return 0;
	sh->sessions += (unsigned)delta;
	return sh->sessions;
}

void
shard_trim(struct shard *sh)
{
	if (sh == NULL || !shards_threaded || sh == shard_own || sh->index == 0)
		return;
	capd_lock();
	sh->trim = true;
	capd_unlock();
	ev_async_send(sh->loop, &sh->wake);
}

void
shard_wake(struct ev_loop *loop)
{
	struct shard *sh;

	if (loop == capd_loop || !shards_threaded)
		return;
	sh = ev_userdata(loop);
	ev_async_send(loop, &sh->wake);
}

/*
 * Shards: one libev loop per worker thread, so that the kernel's share of
 * each connection (accept, connect, send, recv, close: nearly all of a
 * short connection's cost) runs on every core. Shard 0 is the main thread's
 * loop; it alone runs the control socket, instances, DNS, sniffers and
 * trace. TCP proxy sessions live on the shard whose listener accepted them
 * (SO_REUSEPORT spreads connections over the shards' listeners).
 *
 * Locking is one mutex, held by whichever thread runs capd code and released
 * only around the kernel calls that cost the time: epoll_wait, and the
 * relay's, accept's and connect's socket calls on a session's own sockets.
 * All of capd's state is therefore touched by one thread at a time, as
 * before, and needs no locks of its own. Two rules make that safe:
 *  - a session's sockets are used and closed only by its own shard (another
 *    thread asks it with shard_call), so no socket is closed under a thread
 *    that is in a call on it, and a closed descriptor number is never reused
 *    behind one;
 *  - code that starts a watcher on another thread's loop wakes that loop
 *    (shard_wake), as libev's threading rules ask.
 * With one shard the lock and the wake-ups cost nothing.
 */
#ifndef CAPD_SHARD_H
#define CAPD_SHARD_H

#include <ev.h>
#include <stdbool.h>

struct shard;

extern struct ev_loop *capd_main;                 /* shard 0's loop: control, instances */
extern _Thread_local struct ev_loop *capd_loop;   /* the loop of the thread running this code */
extern _Thread_local struct shard *shard_self;    /* its shard, NULL on threads without a loop */

/* Creates the loops of n shards (n >= 1; shard 0 wraps main_loop) without starting threads. */
void shards_init(struct ev_loop *main_loop, unsigned n);
/* Starts the worker threads; each runs thread_init first (resolver, reaper) and thread_fini last. */
int shards_run(void (*thread_init)(void), void (*thread_fini)(void), char **why);
/* Stops and joins the workers (their sessions must be closed already). */
void shards_stop(void);

unsigned shards_count(void);
struct shard *shard_at(unsigned i);
struct ev_loop *shard_loop(const struct shard *sh);

/* Runs fn(arg) on sh's thread and waits for it; inline when sh is ours or not running.
 * Only the main thread calls it, so no two threads ever wait on each other. */
void shard_call(struct shard *sh, void (*fn)(void *), void *arg);
/* Wakes loop's thread after another thread changed its watchers. */
void shard_wake(struct ev_loop *loop);
/* Closes fd right before this thread's loop next waits, outside the lock. */
void shard_close(int fd);

/* The lock (see above). No-ops while only one shard runs. */
void capd_lock(void);
void capd_unlock(void);

#endif

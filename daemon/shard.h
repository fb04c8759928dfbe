/*
 * Shards: event loops on worker threads, so that the kernel's share of each
 * connection (accept, connect, send, recv, close: nearly all of a short
 * connection's cost) runs on every core.
 *
 * With one worker (workers = 1) there are no threads: shard 0, the main
 * thread's loop, runs everything, and the lock, pauses and calls below cost
 * nothing. With n >= 2 workers, shards 1..n each run a loop on a thread of
 * their own (named capd-worker-N) and host the TCP proxies' sessions: each
 * of them watches every such instance's listening socket, the one that is
 * free accepts, and a session lives on the shard that accepted it. Shard 0
 * keeps the control socket, instances, DNS, sniffers, trace, UDP relaying,
 * tail and events.
 *
 * Who may touch what:
 *  - A worker owns its sessions (watchers, sockets, buffers, TLS state) and
 *    runs without the lock. It takes the lock (capd_lock) only around what
 *    is shared: the session table (ids, list, history, counts), tail and
 *    events of a watched session, the UDP relays, the certificate cache.
 *  - The main thread holds the lock all the time except while its loop
 *    waits in epoll_wait, so a worker that takes it never runs alongside
 *    control code.
 *  - Control code that reads or changes sessions (every RPC method, reload,
 *    stop) runs between shards_pause() and shards_resume(): the workers are
 *    parked in their loops' wake-up callback, so it may read any session and
 *    call into one as its owner would with shard_call().
 *  - Code that starts a watcher on the main loop from a worker (a control
 *    connection's output) holds the lock and wakes it (shard_wake), as
 *    libev's threading rules ask.
 */
#ifndef CAPD_SHARD_H
#define CAPD_SHARD_H

#include <ev.h>
#include <stdbool.h>

struct shard;

extern struct ev_loop *capd_main;                 /* shard 0's loop: control, instances */
extern _Thread_local struct ev_loop *capd_loop;   /* the loop of the thread running this code */
extern _Thread_local struct shard *shard_self;    /* its shard, NULL on threads without a loop */
/* Set as the main loop starts to serve: from then on nothing may wait in it (a
 * name lookup). Before, start-up may, and `capd -t` never serves. */
extern bool capd_serving;

/* Shard 0 wraps main_loop; workers >= 2 adds that many worker shards (no threads yet). */
void shards_init(struct ev_loop *main_loop, unsigned workers);
/* Starts the worker threads; each runs thread_init first (resolver, reaper) and thread_fini last. */
int shards_run(void (*thread_init)(void), void (*thread_fini)(void), char **why);
/* Stops and joins the workers (their sessions must be closed already). */
void shards_stop(void);

/* Shards, and the first and count of those that host TCP sessions. */
unsigned shards_count(void);
unsigned shards_session_first(void);
struct shard *shard_at(unsigned i);

/* Main thread only; nests. While paused no worker runs capd code. */
void shards_pause(void);
void shards_resume(void);
/* Runs fn(arg) as sh's owner would: on this (main) thread, with the workers
 * paused and capd_loop/shard_self set to sh's. */
void shard_call(struct shard *sh, void (*fn)(void *), void *arg);
/* Runs fn(arg) as shard 0 would, from any thread: under the lock, with
 * capd_loop/shard_self set to shard 0's (a worker's session ending what the
 * main loop owns: a SOCKS UDP association's datagram sessions). From a
 * worker it then wakes the main loop, whose watchers fn may have changed. */
void shard_as_main(void (*fn)(void *), void *arg);
/* Adds delta to sh's count of open sessions and returns it; under capd_lock. */
unsigned shard_sessions_add(struct shard *sh, int delta);
/* Asks sh's own thread to give back its pooled relay buffers and pipes once it
 * has no session (a control request closed its last one from the main thread,
 * whose pools are the ones trimmed there). No-op for the calling thread's own. */
void shard_trim(struct shard *sh);
/* Wakes loop's thread after another thread changed its watchers. */
void shard_wake(struct ev_loop *loop);

/* The lock (see above); recursive per thread. No-ops while no worker runs. */
void capd_lock(void);
void capd_unlock(void);

#endif

/*
 * The session table: ids that never repeat, handshake I/O, the upstream
 * connect (resolve, try each address, deadline), and session_close(), the
 * one teardown path that logs one summary line per session.
 *
 * A session belongs to the shard that made it (shard.h) and runs on that
 * thread's loop; only the table (ids, list, counts, history) is shared, and
 * it is changed under capd_lock. Control code reaches a session while the
 * workers are paused, and closes one through shard_call.
 */
#include "session.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/sockios.h>

#include "capd.h"
#include "chain.h"
#include "instance.h"
#include "linger.h"
#include "log.h"
#include "relay.h"
#include "resolve.h"
#include "spool.h"
#include "tail.h"
#include "tls.h"
#include "values.h"
#include "xmalloc.h"

#define SESSION_ID_BLOCK 65536 /* ids reserved on disk at a time (one fsync each): a crash skips at most this many */
#define SESSION_HISTORY 1000   /* closed sessions kept for `capctl sessions` */
#define SESSION_HS_DEFAULT 4096
#define SESSION_HS_READ 16384 /* the most one handshake read takes (on the stack) */

struct session_list sessions = TAILQ_HEAD_INITIALIZER(sessions);

/*
 * Ids are reserved on disk a block at a time, durably (fsync) before any id
 * of the block is handed out, so that a crash never repeats one. The fsync
 * runs on a thread of its own, started when half the block is used, so that
 * a session's loop (which takes ids under capd_lock) never waits on the
 * disk; only a loop that used up the rest of the block during one fsync
 * would wait for it.
 */
static uint64_t session_next_id = 1;  /* under capd_lock */
static uint64_t session_id_refill;    /* under capd_lock: from this id on, look at the reservation */
static pthread_mutex_t session_id_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t session_id_cond = PTHREAD_COND_INITIALIZER;
static uint64_t session_reserved;     /* under session_id_mu: ids below this are on disk as used */
static bool session_id_saving;        /* under session_id_mu: a saver thread runs */
static char *session_id_path;
static unsigned session_count;
static unsigned session_stream_count;  /* of them, the accepted ones (session_new) */

/* A closed session as `capctl sessions` shows it: plain data, so closing a
 * session costs a copy rather than a JSON object nobody may ever ask for. */
struct session_rec {
	uint64_t id;
	char instance[72];
	const char *proto;
	struct sockaddr_storage client, target;
	bool have_target;
	char target_name[HOST_MAX + 8];
	uint64_t bytes[2];
	double started, ended;
	/* why it closed, whole (the log's words): owned in the history, which
	 * takes it over from the session; borrowed in session_json's copy */
	char *reason;
	char *note;  /* owned */
};

static struct session_rec session_history[SESSION_HISTORY];  /* ring of closed sessions */
static unsigned session_history_head, session_history_len;

/* per loop thread: closed sessions, freed on that loop's next pass */
static _Thread_local struct session *session_graveyard;
static _Thread_local ev_prepare session_reaper;

static void session_reap_cb(struct ev_loop *loop, ev_prepare *w, int revents);
static void session_timer_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void session_hs_read_cb(struct ev_loop *loop, ev_io *w, int revents);
static void session_hs_write_cb(struct ev_loop *loop, ev_io *w, int revents);
static void session_connect_next(struct session *s);

/* Copies a string, cut to fit: strlcpy without the printf machinery (every session closes through here). */
static void
session_strcpy(char *dst, const char *src, size_t size)
{
	size_t n = strnlen(src, size - 1);

	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* Writes the first id the next capd may use atomically; -1 on failure. */
static int
session_id_save(uint64_t next)
{
	char tmp[4096];
	FILE *f;

	if (session_id_path == NULL)
		return 0;
	snprintf(tmp, sizeof tmp, "%s.tmp", session_id_path);
	if ((f = fopen(tmp, "w")) == NULL)
		return -1;
	fprintf(f, "%llu\n", (unsigned long long)next);
	if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
		fclose(f);
		return -1;
	}
	fclose(f);
	if (rename(tmp, session_id_path) < 0)
		return -1;
	/* the rename is durable only once its folder is: without this a power
	 * cut could bring back the file of the block before and repeat its ids */
	snprintf(tmp, sizeof tmp, "%s", session_id_path);
	*strrchr(tmp, '/') = '\0';
	int dfd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
	return 0;
}

/* The saver thread: makes the reservation (arg) durable, then says so. */
static void *
session_id_saver(void *arg)
{
	uint64_t upto = (uint64_t)(uintptr_t)arg;

	if (session_id_save(upto) < 0)  /* the block is used all the same, as before: only a crash then repeats ids */
		log_warn("cannot save the session id counter in %s", session_id_path);
	pthread_mutex_lock(&session_id_mu);
	session_reserved = upto;
	session_id_saving = false;
	pthread_cond_broadcast(&session_id_cond);
	pthread_mutex_unlock(&session_id_mu);
	return NULL;
}

/*
 * Past half the reserved block: reserves the next one on the saver thread,
 * and waits for it only once the block is used up. Under capd_lock (the
 * saver never takes it) and session_id_mu.
 */
static void
session_id_ahead(void)
{
	pthread_attr_t attr;
	sigset_t all, old;
	pthread_t t;

	if (!session_id_saving && session_next_id + SESSION_ID_BLOCK / 2 >= session_reserved) {
		uint64_t upto = session_next_id + SESSION_ID_BLOCK;
		/* no signal for it: they belong to the main loop */
		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		session_id_saving = true;
		if (pthread_create(&t, &attr, session_id_saver, (void *)(uintptr_t)upto) != 0) {
			/* no thread: save here, as capd did before it had one */
			pthread_mutex_unlock(&session_id_mu);
			session_id_saver((void *)(uintptr_t)upto);
			pthread_mutex_lock(&session_id_mu);
		}
		pthread_attr_destroy(&attr);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
	}
	while (session_next_id >= session_reserved && session_id_saving)
		pthread_cond_wait(&session_id_cond, &session_id_mu);
	/* while a save runs every new id looks again, which is cheap */
	session_id_refill = session_id_saving ? session_next_id + 1 : session_reserved - SESSION_ID_BLOCK / 2;
}

/* Waits for a save under way (the stop then writes the file itself). */
static void
session_id_settle(void)
{
	pthread_mutex_lock(&session_id_mu);
	while (session_id_saving)
		pthread_cond_wait(&session_id_cond, &session_id_mu);
	pthread_mutex_unlock(&session_id_mu);
}

int
session_table_init(const char *state_dir, char **why)
{
	FILE *f;

	session_loop_init();
	if (state_dir == NULL)
		return 0;
	session_id_path = xasprintf("%s/session-id", state_dir);
	if ((f = fopen(session_id_path, "r")) != NULL) {
		unsigned long long v;
		if (fscanf(f, "%llu", &v) == 1 && v > 0)
			session_next_id = v;
		fclose(f);
	}
	/* before the first session, so here and at once */
	session_reserved = session_next_id + SESSION_ID_BLOCK;
	session_id_refill = session_reserved - SESSION_ID_BLOCK / 2;
	if (session_id_save(session_reserved) < 0) {
		*why = xasprintf("cannot write %s: %s", session_id_path, strerror(errno));
		return -1;
	}
	return 0;
}

void
session_loop_init(void)
{
	ev_prepare_init(&session_reaper, session_reap_cb);
	ev_prepare_start(capd_loop, &session_reaper);
	ev_unref(capd_loop);  /* the reaper alone must not keep the loop alive */
}

void
session_loop_fini(void)
{
	session_reap_cb(capd_loop, &session_reaper, 0);
	if (ev_is_active(&session_reaper)) {
		ev_ref(capd_loop);
		ev_prepare_stop(capd_loop, &session_reaper);
	}
}

struct session_close_arg {
	struct session *s;
	const char *reason;
};

static void
session_close_here(void *arg)
{
	struct session_close_arg *a = arg;

	session_close(a->s, a->reason);
}

static struct session *
session_first_of(struct instance *inst)
{
	struct session *s;

	TAILQ_FOREACH(s, &sessions, entry)
		if (inst == NULL || s->inst == inst)
			return s;
	return NULL;
}

/* Closes the sessions of inst (NULL: all), each as its own shard would. */
void
session_close_instance(struct instance *inst, const char *reason)
{
	struct session *s;

	shards_pause();
	/* from the start each time: closing one may close another */
	while ((s = session_first_of(inst)) != NULL) {
		struct session_close_arg a = { s, reason };
		shard_call(s->shard, session_close_here, &a);
	}
	shards_resume();
}

void
session_table_shutdown(void)
{
	session_close_instance(NULL, "capd stopped");
	session_loop_fini();
	/* a crash skips the rest of the reserved block; a stop hands it back,
	 * so that ids go on from here after a restart (state_dir is ours alone) */
	session_id_settle();
	if (session_id_path && session_id_save(session_next_id) < 0)
		log_warn("cannot save the session id counter in %s", session_id_path);
	for (unsigned i = 0; i < SESSION_HISTORY; i++) {
		free(session_history[i].note);
		free(session_history[i].reason);
		session_history[i].note = session_history[i].reason = NULL;
	}
	session_history_len = 0;
	free(session_id_path);
	session_id_path = NULL;
}

/* Under capd_lock. */
static uint64_t
session_id_new(void)
{
	if (session_id_path && session_next_id >= session_id_refill) {
		pthread_mutex_lock(&session_id_mu);
		session_id_ahead();
		pthread_mutex_unlock(&session_id_mu);
	}
	return session_next_id++;
}

static struct session *
session_alloc(struct instance *inst, const char *proto, bool accepted)
{
	struct session *s = xcalloc(1, sizeof *s);

	s->inst = inst;
	s->datagram = !accepted;
	s->accepted = accepted;
	s->shard = shard_self;
	s->proto = proto;
	s->state = SESSION_HANDSHAKE;
	s->client.fd = s->upstream.fd = -1;
	s->started = s->last_active = capd_now();
	ev_init(&s->timer, session_timer_cb);
	s->timer.data = s;
	capd_lock();
	s->id = session_id_new();
	TAILQ_INSERT_TAIL(&sessions, s, entry);
	session_count++;
	if (accepted)
		session_stream_count++;
	shard_sessions_add(s->shard, 1);
	inst->open_sessions++;
	capd_unlock();
	return s;
}

/* What an accepted socket inherits from its listener (instance.c): no Nagle
 * delay, and TCP_INQ, which lets the relay see a FIN behind the data. */
static void
session_tcp_opts(int fd)
{
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(fd, IPPROTO_TCP, TCP_INQ, &one, sizeof one);
}

struct session *
session_new(struct instance *inst, int fd, const struct sockaddr *peer)
{
	struct session *s = session_alloc(inst, "tcp", true);

	s->client.fd = fd;
	memcpy(&s->client_addr, peer, addr_len(peer));
	/* no setsockopt here: accepted sockets inherit TCP_NODELAY from the listener (instance_listen) */
	ev_io_init(&s->client.rio, session_hs_read_cb, fd, EV_READ);
	ev_io_init(&s->client.wio, session_hs_write_cb, fd, EV_WRITE);
	s->client.rio.data = s->client.wio.data = s;
	if ((s->chain = chain_take(peer)) != NULL && chain_has(s->chain, inst)) {
		/* a loop that the connect did not see (an address of this host
		 * that is none of the instances' listen addresses) ends here */
		session_close(s, "a loop of capd instances: this connection came from capd through this instance already");
		return s;
	}
	if (inst->proto->input)
		ev_io_start(capd_loop, &s->client.rio);
	if (inst->proto->accepted)
		inst->proto->accepted(s);
	return s;
}

struct session *
session_new_datagram(struct instance *inst, const char *proto, const struct sockaddr *client,
                     const struct sockaddr *target)
{
	struct session *s = session_alloc(inst, proto, false);

	memcpy(&s->client_addr, client, addr_len(client));
	if (target) {
		memcpy(&s->target_addr, target, addr_len(target));
		s->have_target = true;
	}
	return s;
}

struct session *
session_find(uint64_t id)
{
	struct session *s;

	TAILQ_FOREACH(s, &sessions, entry)
		if (s->id == id)
			return s;
	return NULL;
}

unsigned
session_open_count(void)
{
	return session_count;
}

unsigned
session_stream_open_count(void)
{
	return session_stream_count;
}

/* ---- handshake I/O ---- */

static void session_end(struct session *s, const char *reason, bool reset_client, bool reset_upstream,
                        enum synth_end how);

/* A client's reset seen by a read or send of the handshake: the capture ends
 * with its RST (a refusal's flow, session_end), not with capd's close. */
static void
session_hs_client_failed(struct session *s, int err, const char *why)
{
	if (err == ECONNRESET || err == EPIPE)
		session_end(s, why, false, false, SYNTH_END_RST_CLIENT);
	else
		session_close(s, why);
}

static void
session_hs_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct session *s = w->data;
	size_t max = s->inst->proto->hs_max ? s->inst->proto->hs_max : SESSION_HS_DEFAULT;
	ssize_t n;

	(void)loop; (void)revents;
	if (buf_used(&s->hs_in) >= max) {
		session_close(s, "handshake too large");
		return;
	}
	/* Read on the stack and keep only what came: reserving max (64 KiB for
	 * HTTP) in hs_in cost every connection a large malloc, a free and heap
	 * trimming for a head of a few hundred bytes. A read that fills tmp is
	 * followed by another, so that nothing waits unseen inside TLS (OpenSSL
	 * reads ahead). After tls_accept_start the handshake is plaintext inside TLS. */
	uint8_t tmp[SESSION_HS_READ];
	size_t had = buf_used(&s->hs_in), want;
	do {
		size_t room = max - buf_used(&s->hs_in);
		want = room < sizeof tmp ? room : sizeof tmp;
		n = s->client.tls ? tls_side_read(s->client.tls, tmp, want) : read(s->client.fd, tmp, want);
		if (n > 0)
			buf_append(&s->hs_in, tmp, (size_t)n);
	} while (n == (ssize_t)want && buf_used(&s->hs_in) < max);
	if (n < 0 && errno != EAGAIN && errno != EINTR) {
		/* an open session read here (a UDP association's control connection, a
		 * DNS TCP client) is past its handshake: it would be a wrong lead */
		int err = errno;
		char *why = xasprintf("client error%s: %s", s->state == SESSION_OPEN ? "" : " during handshake",
		                      strerror(err));
		session_hs_client_failed(s, err, why);
		free(why);
		return;
	}
	if (n < 0 && buf_used(&s->hs_in) == had)
		return;
	if (n == 0) {
		s->client_eof = true;
		ev_io_stop(capd_loop, &s->client.rio);
	}
	s->inst->proto->input(s);
	/* input may have closed s; a closed session is in the graveyard and has client_eof handled */
}

void
session_read_first(struct session *s)
{
	/* through the watcher's callback: a TLS handshake may have put its own there */
	if (s->inst->proto->input && s->state == SESSION_HANDSHAKE && ev_is_active(&s->client.rio))
		ev_invoke(capd_loop, &s->client.rio, EV_READ);
}

static void
session_hs_flush(struct session *s)
{
	while (buf_used(&s->hs_out) > 0) {
		ssize_t n = s->client.tls ? tls_side_write(s->client.tls, buf_head(&s->hs_out), buf_used(&s->hs_out))
		                          : send(s->client.fd, buf_head(&s->hs_out), buf_used(&s->hs_out), MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				ev_io_start(capd_loop, &s->client.wio);
				return;
			}
			session_hs_client_failed(s, errno, "client went away during handshake");
			return;
		}
		buf_consume(&s->hs_out, (size_t)n);
	}
	ev_io_stop(capd_loop, &s->client.wio);
}

static void
session_hs_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop; (void)revents;
	session_hs_flush(w->data);
}

void
session_send(struct session *s, const void *p, size_t n)
{
	if (s->state == SESSION_CLOSED)
		return;
	s->hs_replied = true;
	buf_append(&s->hs_out, p, n);
	if (!ev_is_active(&s->client.wio))
		session_hs_flush(s);
}

void
session_set_deadline(struct session *s, double seconds)
{
	ev_timer_stop(capd_loop, &s->timer);
	s->deadline_at = 0;
	s->deadline_len = (float)seconds;
	if (seconds > 0) {
		s->deadline_at = ev_time() + seconds;  /* the clock's: capd_now() may be a long callback old */
		ev_timer_set(&s->timer, seconds, 0.);
		ev_timer_start(capd_loop, &s->timer);
	}
}

/* ---- upstream connect ---- */

static void session_cands_free(struct session *s);

static void
session_connected(struct session *s, int err)
{
	ev_io_stop(capd_loop, &s->upstream.wio);
	session_cands_free(s);
	if (err == 0) {
		ev_timer_stop(capd_loop, &s->timer);
		s->deadline_at = 0;
	}
	s->inst->proto->connected(s, err);
}

static void
session_connect_fail(struct session *s, int err, const char *why)
{
	free(s->why_connect);
	s->why_connect = xstrdup(why);
	if (s->upstream.fd >= 0) {
		ev_io_stop(capd_loop, &s->upstream.wio);
		close(s->upstream.fd);
		s->upstream.fd = -1;
	}
	session_connected(s, err);
}

static void
session_connect_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct session *s = w->data;
	int err = 0;
	socklen_t len = sizeof err;

	(void)loop; (void)revents;
	if (s->up_established)
		s->up_established = false;  /* session_established() saw it: nothing to ask */
	else if (getsockopt(s->upstream.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err == EINPROGRESS)
		return;
	ev_io_stop(capd_loop, &s->upstream.wio);
	if (err != 0) {
		close(s->upstream.fd);
		s->upstream.fd = -1;
		free(s->why_connect);
		s->why_connect = xasprintf("connect to %s: %s",
		                           addr_format((struct sockaddr *)&s->target_addr, (char[ADDR_STRLEN]){0}, ADDR_STRLEN),
		                           strerror(err));
		if (s->cand < s->ncands) {
			session_connect_next(s);
			return;
		}
		session_connected(s, err);
		return;
	}
	session_connected(s, 0);
}

/* The addresses still to try live only while connecting: idle sessions carry none. */
static void
session_cands_set(struct session *s, const struct sockaddr_storage *addrs, int n)
{
	free(s->cands);
	s->cands = xmalloc((size_t)n * sizeof *addrs);
	memcpy(s->cands, addrs, (size_t)n * sizeof *addrs);
	s->ncands = n;
}

static void
session_cands_free(struct session *s)
{
	free(s->cands);
	s->cands = NULL;
	s->ncands = s->cand = 0;
}

/* Immediate connect failures are reported on the next loop pass, so that
 * proto->connected never runs inside the proto's own call to session_connect. */
static void
session_connect_defer(struct session *s, int err)
{
	s->pending_err = err;
	ev_timer_stop(capd_loop, &s->timer);
	ev_timer_set(&s->timer, 0., 0.);
	ev_timer_start(capd_loop, &s->timer);
}

/* A local upstream has usually answered the SYN before connect(2) returns
 * (on loopback the whole handshake runs inside the call): then no watcher
 * and no wake-up are needed to learn it. */
static bool
session_established(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof ti;

	return getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 && ti.tcpi_state == TCP_ESTABLISHED;
}

/*
 * An address that never answers (its SYN dropped) may use only its share of
 * what is left of connect_timeout when more addresses follow, as curl does:
 * the next ones still get their turn before the deadline.
 */
static void
session_connect_share(struct session *s)
{
	double left;

	if (s->deadline_at <= 0)
		return;
	left = s->deadline_at - ev_time();
	ev_timer_stop(capd_loop, &s->timer);
	ev_timer_set(&s->timer, left > 0 ? left / (s->ncands - s->cand + 1) : 0., 0.);
	ev_timer_start(capd_loop, &s->timer);
}

/*
 * Whether a connect to sa would reach this instance's own listener: its own
 * address and port, a loopback address on its port while it listens on every
 * address, or 0.0.0.0 / :: on its port (the kernel connects those to loopback,
 * so `to = 0.0.0.0:PORT` looped as surely as 127.0.0.1). A hosts entry or DNS
 * answer that sends a name to capd also reaches capd's resolver: a forward or
 * reverse instance whose target is that name would connect to itself, and each
 * new session again, until capd runs out of descriptors.
 */
static bool
session_target_is_self(const struct session *s, const struct sockaddr *sa)
{
	if (!s->inst->proto->listens)
		return false;
	return addr_reaches(sa, (const struct sockaddr *)&s->inst->listen);
}

/*
 * Why a connect to sa is refused (caller frees), or NULL: it would reach this
 * instance, or another instance that this connection came through already
 * (chain.h), or one more than CHAIN_MAX instances in a row. Only a target on
 * a port that some instance listens on (ours) costs more than a comparison.
 */
static char *
session_target_refused(const struct session *s, const struct sockaddr *sa, bool ours)
{
	char a[ADDR_STRLEN];
	struct instance *to;

	if (session_target_is_self(s, sa)) {
		addr_format(sa, a, sizeof a);
		if (s->target_name[0])
			return xasprintf("%s resolves to this instance's own address %s (a hosts entry or "
			                 "DNS answer sends the name to capd): use the server's address",
			                 s->target_name, a);
		return xasprintf("%s is this instance's own address", a);
	}
	if (!ours || (to = chain_instance_at(sa)) == NULL)
		return NULL;
	if (chain_has(s->chain, to))
		return xasprintf("a loop of capd instances: %s is instance %s's address, and this connection came "
		                 "through %s already", addr_format(sa, a, sizeof a), to->name, to->name);
	if (chain_len(s->chain) >= CHAIN_MAX)
		return xasprintf("%s is instance %s's address, and this connection came through %d capd instances "
		                 "already", addr_format(sa, a, sizeof a), to->name, CHAIN_MAX);
	return NULL;
}

/*
 * A link-local target without an interface (SOCKS and HTTP have no room
 * for one, curl drops a URL's %zone, a hosts line has none), which the
 * kernel refuses (EINVAL). A client that came over a link-local address
 * means the link it is on, as does an instance listening on one: that
 * interface is taken. False when there is none to take.
 */
static bool
session_link_scope(const struct session *s, struct sockaddr *sa)
{
	struct sockaddr_in6 *d = (struct sockaddr_in6 *)sa;
	const struct sockaddr_in6 *c = (const struct sockaddr_in6 *)&s->client_addr;
	const struct sockaddr_in6 *l = (const struct sockaddr_in6 *)&s->inst->listen;

	if (sa->sa_family != AF_INET6 || !IN6_IS_ADDR_LINKLOCAL(&d->sin6_addr) || d->sin6_scope_id != 0)
		return true;
	if (c->sin6_family == AF_INET6 && IN6_IS_ADDR_LINKLOCAL(&c->sin6_addr))
		d->sin6_scope_id = c->sin6_scope_id;
	else if (l->sin6_family == AF_INET6 && IN6_IS_ADDR_LINKLOCAL(&l->sin6_addr))
		d->sin6_scope_id = l->sin6_scope_id;
	return d->sin6_scope_id != 0;
}

static void
session_connect_next(struct session *s)
{
	for (; s->cand < s->ncands; s->cand++) {
		struct sockaddr *sa = (struct sockaddr *)&s->cands[s->cand];
		bool scoped = session_link_scope(s, sa);  /* sa is ours to change */
		char *why;
		bool ours;
		int fd;
		int err;

		memcpy(&s->target_addr, sa, addr_len(sa));
		s->have_target = true;
		chain_forget(s->chain_port, SOCK_STREAM);  /* the last address's socket is closed */
		s->chain_port = 0;
		ours = chain_port_listened(addr_port(sa));  /* maybe one of capd's own listeners */
		why = scoped ? session_target_refused(s, sa, ours)
		             : xasprintf("link-local target %s names no interface: reach capd over a link-local "
		                         "address of its link", addr_format(sa, (char[ADDR_STRLEN]){0}, ADDR_STRLEN));
		if (why != NULL) {
			free(s->why_connect);
			s->why_connect = why;
			if (s->cand + 1 >= s->ncands) {
				s->cand++;
				session_connect_defer(s, scoped ? ELOOP : ENETUNREACH);
				return;
			}
			continue;
		}
		fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			err = errno;
			free(s->why_connect);
			s->why_connect = xasprintf("socket: %s", strerror(err));
			session_connect_defer(s, err);
			return;
		}
		session_tcp_opts(fd);
		if (ours)  /* tell the instance that may accept it where it came from */
			s->chain_port = chain_note(fd, SOCK_STREAM, s->chain, s->inst);
		if (connect(fd, sa, addr_len(sa)) == 0 || errno == EINPROGRESS) {
			s->upstream.fd = fd;
			s->cand++;
			ev_io_init(&s->upstream.wio, session_connect_cb, fd, EV_WRITE);
			s->upstream.wio.data = s;
			if ((s->up_established = session_established(fd))) {
				ev_feed_event(capd_loop, &s->upstream.wio, EV_WRITE);  /* later in this pass */
			} else {
				ev_io_start(capd_loop, &s->upstream.wio);
				session_connect_share(s);
			}
			return;
		}
		err = errno;
		close(fd);
		free(s->why_connect);
		s->why_connect = xasprintf("connect to %s: %s",
		                           addr_format(sa, (char[ADDR_STRLEN]){0}, ADDR_STRLEN), strerror(err));
		if (s->cand + 1 >= s->ncands) {
			s->cand++;
			session_connect_defer(s, err);
			return;
		}
	}
}

static void
session_resolved_cb(void *arg, int err, const char *why, const struct sockaddr_storage *addrs, int n)
{
	struct session *s = arg;

	s->resolving = NULL;
	if (err != 0) {
		char *msg = xasprintf("cannot resolve %s: %s", s->target_name, why);
		session_connect_fail(s, err, msg);
		free(msg);
		return;
	}
	session_cands_set(s, addrs, n);
	s->cand = 0;
	session_connect_next(s);
}

void
session_connect(struct session *s, const char *host, uint16_t port)
{
	socklen_t len;
	struct sockaddr_storage lit;

	s->connect_port = port;
	if (addr_from_literal(host, port, &lit, &len) == 0) {
		/* an IP literal needs no resolver round trip: connect in this pass */
		s->target_name[0] = '\0';
		session_connect_addr(s, (struct sockaddr *)&lit);
		return;
	}
	snprintf(s->target_name, sizeof s->target_name, "%s:%u", host, port);
	if (s->inst->connect_timeout > 0)
		session_set_deadline(s, s->inst->connect_timeout);
	s->resolving = resolve_start(host, port, session_resolved_cb, s);
}

void
session_connect_addr(struct session *s, const struct sockaddr *sa)
{
	struct sockaddr_storage one;
	memset(&one, 0, sizeof one);
	memcpy(&one, sa, addr_len(sa));
	session_cands_set(s, &one, 1);
	s->cand = 0;
	if (s->inst->connect_timeout > 0)
		session_set_deadline(s, s->inst->connect_timeout);
	session_connect_next(s);
}

void
session_set_upstream(struct session *s, int fd, const struct sockaddr *peer)
{
	s->upstream.fd = fd;
	session_tcp_opts(fd);
	memcpy(&s->target_addr, peer, addr_len(peer));
	s->have_target = true;
}

uint64_t
session_held(const struct session *s, enum dir d)
{
	const struct relay_dir *rd = &s->dir[d];

	return (uint64_t)(rd->len - rd->off) + buf_used(&rd->pre) + rd->piped;
}

uint64_t
session_outq(const struct side *sd)
{
	int q = 0;

	if (sd->fd < 0 || ioctl(sd->fd, SIOCOUTQ, &q) < 0 || q < 0)
		return 0;
	return (uint64_t)q;
}

/*
 * A peer still taking bytes keeps the session from idling out: under
 * back-pressure capd reads nothing while a slow reader drains what waits for
 * it, and only reads stamp last_active. What a peer has taken is what capd
 * counted for its direction less what waits in capd and in the kernel's send
 * queue; a peer with nothing waiting is idle, one that stopped taking is left
 * to the timeout one check later.
 */
static bool
session_draining(struct session *s)
{
	bool moved = false;

	if (s->datagram)
		return false;
	for (int i = 0; i < 2; i++) {
		enum dir d = i == 0 ? DIR_DOWN : DIR_UP;
		uint64_t q = session_outq(i == 0 ? &s->client : &s->upstream);
		if (q == 0)
			continue;
		uint64_t taken = s->bytes[d] - session_held(s, d) - q;
		if (taken != s->taken_seen[i])
			moved = true;
		s->taken_seen[i] = taken;
	}
	return moved;
}

/*
 * Whether a peer's bytes wait unread in its socket while capd reads that side:
 * the loop's clock stands still while capd is not scheduled (held up under
 * load, SIGSTOP), and after such a pause libev runs an expired timer before
 * the read that would have stamped the session. Asked only when a timer runs
 * out, never per byte. A side capd does not read (back-pressure) is not asked:
 * what waits there has waited on capd, not on the peer.
 */
static bool
session_unread(const struct side *sd)
{
	int q = 0;

	return sd->fd >= 0 && ev_is_active(&sd->rio) && ioctl(sd->fd, SIOCINQ, &q) == 0 && q > 0;
}

/* A connect capd waits on that is up: session_connect_cb takes it later in this pass. */
static bool
session_connect_up(struct session *s, struct ev_loop *loop)
{
	if (s->upstream.fd < 0 || !ev_is_active(&s->upstream.wio) || ev_cb(&s->upstream.wio) != session_connect_cb ||
	    !session_established(s->upstream.fd))
		return false;
	ev_feed_event(loop, &s->upstream.wio, EV_WRITE);
	return true;
}

bool
session_peer_moved(struct session *s, struct ev_loop *loop)
{
	return session_connect_up(s, loop) || session_unread(&s->client) || session_unread(&s->upstream);
}

/*
 * Whether a handshake's timer ran out too soon to blame the upstream; if so
 * the session goes on. The loop's clock stands still while a callback runs and
 * while capd does not run at all, and after such a pause libev runs the expired
 * timer before the watchers: an upstream whose SYN-ACK came while capd was held
 * up is connected, and session_connect_cb says so later in this pass; a timer
 * set in a long callback ran out early by the clock, and runs again for what
 * is left.
 */
static bool
session_connect_too_soon(struct session *s, struct ev_loop *loop)
{
	double left;

	if (session_connect_up(s, loop))
		return true;
	if (s->deadline_at <= 0 || (s->upstream.fd >= 0 && s->cand < s->ncands))
		return false;  /* none, or an address's share (session_connect_share) */
	left = s->deadline_at - ev_time();
	if (left <= 0)
		return false;
	ev_timer_set(&s->timer, left, 0.);
	ev_timer_start(loop, &s->timer);
	return true;
}

/*
 * Whether the client's handshake deadline (handshake_timeout, header_timeout)
 * ran out on capd rather than on the client; if so the client gets its time
 * again. After a pause (held up under load, SIGSTOP) libev runs the expired
 * timer before the read, so a greeting or request head the client sent in
 * time may wait unread, and a SOCKS5 client then still needs the time for its
 * next step. As with tls_timeout, SESSION_EXCUSES times at most: a client
 * that trickles bytes still cannot hold its handshake open for ever. Asked
 * only when the timer runs out.
 */
#define SESSION_EXCUSES 3

static bool
session_hs_too_soon(struct session *s)
{
	if (s->excused >= SESSION_EXCUSES || s->deadline_len <= 0 || !session_unread(&s->client))
		return false;
	s->excused++;
	session_set_deadline(s, s->deadline_len);  /* the read watcher takes what waits, in this pass */
	return true;
}

/*
 * Likewise for connect_timeout while the target's name resolves: an answer
 * that came while capd was held up waits unread in the resolver's socket.
 * The connect that follows gets the time again (the answer may be another
 * session's: hence SESSION_EXCUSES here too).
 */
static bool
session_resolve_too_soon(struct session *s)
{
	if (s->excused >= SESSION_EXCUSES || s->deadline_len <= 0 || !resolve_take_unread())
		return false;
	s->excused++;
	session_set_deadline(s, s->deadline_len);
	return true;
}

static void
session_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;
	double now = ev_now(loop);

	(void)revents;
	if (s->pending_err) {
		int err = s->pending_err;
		s->pending_err = 0;
		session_connected(s, err);
		return;
	}
	if (s->state == SESSION_HANDSHAKE) {
		if (session_connect_too_soon(s, loop))
			return;
		if (s->upstream.fd >= 0 && s->cand < s->ncands && s->deadline_at > ev_time()) {
			/* this address had its share (session_connect_share): on to the next */
			ev_io_stop(loop, &s->upstream.wio);
			close(s->upstream.fd);
			s->upstream.fd = -1;
			free(s->why_connect);
			s->why_connect = xasprintf("connect to %s: timed out",
			                           addr_format((struct sockaddr *)&s->target_addr, (char[ADDR_STRLEN]){0},
			                                       ADDR_STRLEN));
			session_connect_next(s);
			return;
		}
		if (s->resolving && session_resolve_too_soon(s))
			return;
		if (s->resolving) {
			/* no connect began: the name is what did not come back in time */
			char *msg = xasprintf("cannot resolve %s: timed out", s->target_name);
			resolve_cancel(s->resolving);
			s->resolving = NULL;
			session_connect_fail(s, ETIMEDOUT, msg);
			free(msg);
		} else if (s->upstream.fd >= 0) {
			session_connect_fail(s, ETIMEDOUT, "connect timed out");
		} else if (!session_hs_too_soon(s)) {
			session_close(s, "handshake timed out");
		}
		return;
	}
	/* idle check: activity only stamps last_active, the timer re-arms itself lazily */
	double idle = s->inst->idle_timeout;
	if (idle <= 0 || s->state != SESSION_OPEN)
		return;
	if (now - s->last_active >= idle && (session_draining(s) || session_unread(&s->client) ||
	                                     session_unread(&s->upstream)))
		s->last_active = now;  /* the read watcher takes what waits, in this pass */
	if (now - s->last_active >= idle) {
		if (s->inst->proto->idle && s->inst->proto->idle(s))
			return;
		session_close(s, "idle timeout");
		return;
	}
	ev_timer_set(w, s->last_active + idle - now, 0.);
	ev_timer_start(loop, w);
}

/* ---- data and state ---- */

#define SESSION_COMMENT_MAX 128

/* A capture flow's comment, "forward/web": two copies rather than snprintf,
 * once per session. */
static void
session_flow_comment(const struct instance *inst, char comment[SESSION_COMMENT_MAX])
{
	size_t pn = strlen(inst->proto->name);

	memcpy(comment, inst->proto->name, pn);
	comment[pn] = '/';
	session_strcpy(comment + pn + 1, inst->name, SESSION_COMMENT_MAX - pn - 1);
}

void
session_opened(struct session *s)
{
	struct instance *inst = s->inst;

	s->state = SESSION_OPEN;
	ev_timer_stop(capd_loop, &s->timer);
	s->deadline_at = 0;
	s->last_active = capd_now();
	if (inst->idle_timeout > 0) {
		ev_timer_set(&s->timer, inst->idle_timeout, 0.);
		ev_timer_start(capd_loop, &s->timer);
	}
	if (inst->capture && inst->spool_iface >= 0 && s->have_target) {
		char comment[SESSION_COMMENT_MAX];

		session_flow_comment(inst, comment);
		if (s->inbound)
			s->flow = spool_flow_open_inbound(inst->spool_iface, s->id, (struct sockaddr *)&s->client_addr,
			                                  (struct sockaddr *)&s->target_addr, comment);
		else
			s->flow = spool_flow_open(inst->spool_iface, s->id, s->datagram ? IPPROTO_UDP : IPPROTO_TCP,
			                          (struct sockaddr *)&s->client_addr, (struct sockaddr *)&s->target_addr,
			                          comment);
	}
	if (events_active()) {
		capd_lock();
		events_emit("session.open", session_json(s));
		capd_unlock();
	}
}

/* The refusal's flow (session_refused_heard), opened on first use; NULL when
 * the instance does not capture. */
static struct spool_flow *
session_refused_flow(struct session *s)
{
	struct instance *inst = s->inst;
	struct sockaddr_storage local;
	socklen_t len = sizeof local;
	char comment[SESSION_COMMENT_MAX];

	if (s->refused != NULL)
		return s->refused;
	/* a TLS client's leg, with tls_capture = both once relaying, is that
	 * conversation already: a second stream of the same addresses would mix
	 * with it (before the relay there is none: tls_raw_open) */
	if (!inst->capture || inst->spool_iface < 0 || !s->accepted || s->client.fd < 0 ||
	    tls_client_leg_captured(s) || getsockname(s->client.fd, (struct sockaddr *)&local, &len) < 0)
		return NULL;
	session_flow_comment(inst, comment);
	s->refused = spool_flow_open(inst->spool_iface, s->id, IPPROTO_TCP, (struct sockaddr *)&s->client_addr,
	                             (struct sockaddr *)&local, comment);
	return s->refused;
}

void
session_refused_heard(struct session *s, const void *p, size_t n)
{
	struct spool_flow *f = session_refused_flow(s);

	if (f != NULL)
		spool_flow_data(f, DIR_UP, p, n);
}

void
session_refused_said(struct session *s, const void *p, size_t n)
{
	struct spool_flow *f = session_refused_flow(s);

	if (f != NULL)
		spool_flow_data(f, DIR_DOWN, p, n);
}

void
session_refused_say(struct session *s, const void *p, size_t n)
{
	if (s->state == SESSION_CLOSED)
		return;
	session_refused_said(s, p, n);
	session_send(s, p, n);
}

void
session_refused_shut(struct session *s)
{
	if (s->refused == NULL)
		return;
	if (s->client_eof || s->dir[DIR_UP].eof)
		spool_flow_fin(s->refused, DIR_UP);
	spool_flow_fin(s->refused, DIR_DOWN);
}

/* The refusal's flow as capd closes the client connection: the FIN the
 * client sent already, then capd's (session_refused_shut; none written twice).
 * The caller takes the flow (NULL: none). */
static struct spool_flow *
session_refused_end(struct session *s)
{
	struct spool_flow *f = s->refused;

	session_refused_shut(s);
	s->refused = NULL;
	return f;
}

/*
 * The refusal's flow as the session ends: the client's RST when it reset;
 * capd's RST when it reset the client, or when its close finds bytes unread
 * (the kernel resets then: a handshake too large); else the FINs
 * (session_refused_end). None when the client's connection went on in
 * another session (http_handoff) or lingers (session_linger_client took the
 * flow). Only a refusal pays the ioctl.
 */
static void
session_refused_close(struct session *s, bool reset_client, enum synth_end how)
{
	struct spool_flow *f = s->refused;
	int q = 0;

	if (f == NULL)
		return;
	if (how == SYNTH_END_RST_CLIENT)
		spool_flow_close(f, SYNTH_END_RST_CLIENT);
	else if (s->client.fd < 0)
		spool_flow_close(f, SYNTH_END_NONE);
	else if (reset_client || (ioctl(s->client.fd, SIOCINQ, &q) == 0 && q > 0))
		spool_flow_close(f, SYNTH_END_RST_TARGET);
	else
		spool_flow_close(session_refused_end(s), SYNTH_END_NONE);
	s->refused = NULL;
}

void
session_bytes(struct session *s, enum dir d, size_t n)
{
	s->bytes[d] += n;
	atomic_fetch_add_explicit(d == DIR_UP ? &s->inst->bytes_up : &s->inst->bytes_down, n, memory_order_relaxed);
	s->last_active = ev_now(capd_loop);
}

void
session_data(struct session *s, enum dir d, const void *p, size_t n)
{
	session_bytes(s, d, n);
	if (s->flow)
		spool_flow_data(s->flow, d, p, n);
	tail_data(s, d, p, n);
}

void
session_shutdown_dir(struct session *s, enum dir d)
{
	if (s->flow)
		spool_flow_fin(s->flow, d);
}

char *
session_time(double t, char *out, size_t n)
{
	time_t secs = (time_t)t;
	struct tm tm;
	char base[32];

	gmtime_r(&secs, &tm);
	strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out, n, "%s.%03dZ", base, (int)((t - (double)secs) * 1000.0));
	return out;
}

static const char *const session_state_names[] = {
	[SESSION_HANDSHAKE] = "handshake", [SESSION_OPEN] = "open",
	[SESSION_CLOSING] = "closing", [SESSION_CLOSED] = "closed",
};

static void
session_rec_fill(struct session_rec *r, struct session *s)
{
	r->id = s->id;
	session_strcpy(r->instance, s->inst->name, sizeof r->instance);
	r->proto = s->proto;
	memcpy(&r->client, &s->client_addr, sizeof r->client);
	memcpy(&r->target, &s->target_addr, sizeof r->target);
	r->have_target = s->have_target;
	memcpy(r->target_name, s->target_name, sizeof r->target_name);
	r->bytes[0] = s->bytes[0];
	r->bytes[1] = s->bytes[1];
	r->started = s->started;
	r->ended = s->ended;
	r->reason = s->reason;
}

/* Whether a "host:port" (or "[v6]:port") names an IP literal: a request
 * capd refused keeps what it asked for as its target, and target_name is a
 * name capd looked up (capctl.1), which an address is not. */
static bool
session_is_literal(const char *hostport)
{
	char host[HOST_MAX + 1];
	const char *colon = strrchr(hostport, ':');
	size_t n = colon ? (size_t)(colon - hostport) : strlen(hostport);

	if (n >= 2 && hostport[0] == '[' && hostport[n - 1] == ']') {
		hostport++;
		n -= 2;
	}
	if (n > HOST_MAX)
		return false;
	memcpy(host, hostport, n);
	host[n] = '\0';
	return addr_is_ip_literal(host);
}

static json_t *
session_rec_json(const struct session_rec *r, enum session_state state, const char *note)
{
	char a[ADDR_STRLEN], t[40];
	json_t *o = json_object();

	json_object_set_new(o, "id", json_integer((json_int_t)r->id));
	json_object_set_new(o, "instance", json_string(r->instance));
	json_object_set_new(o, "proto", json_string(r->proto));
	json_object_set_new(o, "client", json_string(addr_format((struct sockaddr *)&r->client, a, sizeof a)));
	if (r->have_target)
		json_object_set_new(o, "target", json_string(addr_format((struct sockaddr *)&r->target, a, sizeof a)));
	else
		json_object_set_new(o, "target", json_string(r->target_name));
	if (r->target_name[0] && (r->have_target || !session_is_literal(r->target_name)))
		json_object_set_new(o, "target_name", json_string(r->target_name));
	json_object_set_new(o, "state", json_string(session_state_names[state]));
	json_object_set_new(o, "bytes_up", json_integer((json_int_t)r->bytes[DIR_UP]));
	json_object_set_new(o, "bytes_down", json_integer((json_int_t)r->bytes[DIR_DOWN]));
	json_object_set_new(o, "started", json_string(session_time(r->started, t, sizeof t)));
	if (state == SESSION_CLOSED)
		json_object_set_new(o, "ended", json_string(session_time(r->ended, t, sizeof t)));
	if (r->reason && r->reason[0])
		json_object_set_new(o, "reason", json_string(r->reason));
	if (note)
		json_object_set_new(o, "note", json_string(note));
	return o;
}

/* The TLS part of s's note, or NULL. */
static const char *
session_note_tls(const struct session *s)
{
	if (s->note_tls == 0 || s->note == NULL || s->note_tls - 1 > strlen(s->note))
		return NULL;
	return s->note + s->note_tls - 1;
}

bool
session_note_has_proto(const struct session *s)
{
	return s->note != NULL && session_note_tls(s) != s->note;
}

void
session_note_proto(struct session *s, const char *text)
{
	const char *tls = session_note_tls(s);
	char *n;

	if (tls == NULL) {
		n = xstrdup(text);
	} else {
		n = xasprintf("%s; %s", text, tls);
		s->note_tls = strlen(text) + 3;  /* 1 + where the TLS part starts now */
	}
	free(s->note);
	s->note = n;
}

void
session_note_proto_add(struct session *s, const char *text)
{
	const char *tls = session_note_tls(s);
	size_t len;
	char *n;

	if (!session_note_has_proto(s)) {
		session_note_proto(s, text);
		return;
	}
	len = tls ? (size_t)(tls - s->note) - 2 : strlen(s->note);  /* the "; " before the TLS part */
	n = xasprintf("%.*s %s", (int)len, s->note, text);
	session_note_proto(s, n);
	free(n);
}

json_t *
session_json(struct session *s)
{
	struct session_rec r;
	enum session_state state = s->state;

	/* one direction ended (its FIN passed on), the other still going: closing */
	if (state == SESSION_OPEN && !s->datagram && (s->dir[DIR_UP].shut || s->dir[DIR_DOWN].shut))
		state = SESSION_CLOSING;
	session_rec_fill(&r, s);
	return session_rec_json(&r, state, s->note);
}

json_t *
session_list_json(const char *instance, bool open_only)
{
	json_t *a = json_array();
	struct session *s;

	if (!open_only)
		for (unsigned i = 0; i < session_history_len; i++) {
			unsigned k = (session_history_head + SESSION_HISTORY - session_history_len + i) % SESSION_HISTORY;
			const struct session_rec *r = &session_history[k];
			if (instance && strcmp(r->instance, instance) != 0)
				continue;
			json_array_append_new(a, session_rec_json(r, SESSION_CLOSED, r->note));
		}
	TAILQ_FOREACH(s, &sessions, entry) {
		if (s->state == SESSION_CLOSED)
			continue;
		if (instance && strcmp(s->inst->name, instance) != 0)
			continue;
		json_array_append_new(a, session_json(s));
	}
	return a;
}

static void
session_history_add(struct session *s)
{
	struct session_rec *r = &session_history[session_history_head];

	free(r->note);
	free(r->reason);
	session_rec_fill(r, s);
	r->note = s->note;  /* the record takes the note and the reason over */
	s->note = NULL;
	s->reason = NULL;
	session_history_head = (session_history_head + 1) % SESSION_HISTORY;
	if (session_history_len < SESSION_HISTORY)
		session_history_len++;
}

static void
side_close(struct side *sd, bool reset)
{
	if (sd->fd < 0)
		return;
	ev_io_stop(capd_loop, &sd->rio);
	ev_io_stop(capd_loop, &sd->wio);
	if (reset) {
		struct linger lg = { .l_onoff = 1, .l_linger = 0 };
		setsockopt(sd->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	}
	close(sd->fd);
	sd->fd = -1;
}

static void
session_end(struct session *s, const char *reason, bool reset_client, bool reset_upstream, enum synth_end how)
{
	char c[ADDR_STRLEN], t[ADDR_STRLEN], up[16], down[16];
	struct instance *inst = s->inst;

	if (s->state == SESSION_CLOSED)
		return;
	bool in_handshake = s->state == SESSION_HANDSHAKE;
	s->state = SESSION_CLOSED;
	s->ended = capd_now();
	/* reason may live in state that the teardown below frees (TLS, the
	 * caller's own s->reason): from here on only our copy is used */
	char *why = xstrdup(reason);
	free(s->reason);
	s->reason = why;
	reason = why;

	/* a handshake that ends with nothing of capd's said (a timeout, the
	 * client's close or reset, a failed connect): what capd read is
	 * captured as a refusal's is. A session that relays (open) pays one
	 * test of its state here, nothing more. A TLS handshake that failed
	 * is its own (tls_hs_ended): then the protocol's has nothing to add. */
	if (in_handshake && s->tls != NULL)
		tls_hs_ended(s);
	if (in_handshake && s->refused == NULL && inst->proto->hs_ended != NULL && inst->capture &&
	    s->client.fd >= 0)
		inst->proto->hs_ended(s);
	session_refused_close(s, reset_client, how);
	tls_session_ending(s, how);
	relay_stop(s);
	ev_timer_stop(capd_loop, &s->timer);
	resolve_cancel(s->resolving);
	s->resolving = NULL;
	side_close(&s->client, reset_client);
	side_close(&s->upstream, reset_upstream);
	chain_forget(s->chain_port, SOCK_STREAM);  /* its connect was never accepted, or by whom capd does not know */
	s->chain_port = 0;
	if (s->flow) {
		spool_flow_close(s->flow, how);
		s->flow = NULL;
	}
	/* an intercepted session's TLS version, SNI and ALPN: the one line a log
	 * reader has, and a forwarder's target there is only an address */
	const char *tls_note = session_note_tls(s);
	if (log_get_level() >= LOG_LVL_INFO)
		log_info("session %llu %s/%s %s -> %s up=%s down=%s %s%s%s%s", (unsigned long long)s->id,
		         inst->proto->name,
		         inst->name, addr_format((struct sockaddr *)&s->client_addr, c, sizeof c),
		         s->have_target ? addr_format((struct sockaddr *)&s->target_addr, t, sizeof t)
		                        : (s->target_name[0] ? s->target_name : "-"),
		         value_human_size(s->bytes[DIR_UP], up, sizeof up),
		         value_human_size(s->bytes[DIR_DOWN], down, sizeof down), reason,
		         tls_note ? " [" : "", tls_note ? tls_note : "", tls_note ? "]" : "");
	/* after the line: a tail's session.end is the first thing a reader sees
	 * of the close, and whoever waits for it and then reads the log finds the
	 * line there (the history and session.close below come later still) */
	tail_session_end(s);

	/* the table, history and events are shared by the shards (shard.h) */
	capd_lock();
	if (events_active())
		events_emit("session.close", session_json(s));
	session_history_add(s);
	TAILQ_REMOVE(&sessions, s, entry);
	session_count--;
	if (s->accepted)
		session_stream_count--;
	/* its shard is idle: trim the pools of this thread, where the session's
	 * buffers went back (the main thread's when it closed it for the shard) */
	bool idle = shard_sessions_add(s->shard, -1) == 0;
	inst->open_sessions--;
	if (inst->proto->session_free)
		inst->proto->session_free(s);
	capd_unlock();
	/* an idle capd holds no pooled memory or pipe descriptors: this thread's
	 * pools, and the shard's own when this is the main thread closing for it */
	if (idle) {
		relay_trim();
		shard_trim(s->shard);
	}
	s->proto_state = NULL;
	/* callers up the stack may still hold s: free it on the next loop pass */
	*(struct session **)&s->entry.tqe_next = session_graveyard;
	session_graveyard = s;
}

void
session_linger_client(struct session *s)
{
	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	/* a refusal's capture ends with the client's close, which linger sees;
	 * what a TLS client sends there is ciphertext, no part of that stream */
	linger_start_flow(capd_loop, s->client.fd, session_refused_end(s), s->client.tls == NULL);
	s->client.fd = -1;
}

void
session_close(struct session *s, const char *reason)
{
	/* whatever ends it later (idle_timeout, a removed instance, capd's
	 * stop), the upstream's last word in the capture is the RST it sent */
	if (s->upstream_reset)
		session_end(s, reason, false, true, SYNTH_END_RST_TARGET);
	else
		session_end(s, reason, false, false, SYNTH_END_FIN);
}

void
session_reset(struct session *s, const char *reason)
{
	session_end(s, reason, true, true, SYNTH_END_RST_TARGET);
}

void
session_reset_by_client(struct session *s, const char *reason)
{
	session_end(s, reason, true, true, SYNTH_END_RST_CLIENT);
}

struct session_call {
	struct session *s;
	void (*fn)(struct session *s, void *arg);
	void *arg;
};

static void
session_call_here(void *arg)
{
	struct session_call *c = arg;

	c->fn(c->s, c->arg);
}

int
session_call(uint64_t id, void (*fn)(struct session *s, void *arg), void *arg)
{
	struct session *s = session_find(id);
	struct session_call c = { .s = s, .fn = fn, .arg = arg };

	if (s == NULL || s->state == SESSION_CLOSED)
		return -1;
	shard_call(s->shard, session_call_here, &c);
	return 0;
}

static void
session_reap_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	while (session_graveyard) {
		struct session *s = session_graveyard;
		session_graveyard = s->entry.tqe_next;
		buf_free(&s->hs_in);
		buf_free(&s->hs_out);
		free(s->reason);
		free(s->note);
		free(s->why_connect);
		free(s->cands);
		free(s->chain);
		free(s);
	}
}

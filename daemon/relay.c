/*
 * The relay: the one byte pump for every proxy. Per direction one buffer,
 * taken from a free list only while bytes wait, so idle sessions hold none.
 * A plain direction whose reads come back with RELAY_BUF bytes or more is a
 * bulk flow: it reads into a RELAY_BULK buffer instead (16x fewer syscalls,
 * spool records and tail copies per byte); a short read makes it small again.
 * Reads are written on at once; when the destination cannot take more, the
 * source stops being read (back-pressure) until the destination drains.
 * A FIN is passed on as shutdown(SHUT_WR); a reset is passed on as a reset.
 * Every TCP side has TCP_INQ set (instance.c, session.c), so a read also
 * says whether anything waits behind it: after a short read with a FIN
 * waiting (a server's reply, then its close) the FIN is read at once and
 * leaves with the data in one segment (MSG_MORE holds the data for the
 * shutdown): a segment and a wake-up fewer per connection, and no recv()
 * spent on EAGAIN when nothing waits.
 *
 * Filters (relay.h, struct relay_filter): a message-aware proxy (http,
 * reverse) sets s->filter before relay_start and the session's pumps go
 * through relay_pump_msg instead; the plain pump pays one branch. The same
 * buffer then holds three runs: buf[off..len) passed and not yet sent,
 * buf[len..fill) read and not yet judged; dir->pre holds injected bytes
 * (rewritten heads, error replies) that go out before buf[off..len). Each
 * round sends what waits, then shows the unjudged run to filter->data, which
 * answers PASS n (capture and send n bytes in place: bodies, chunked framing
 * included, are never copied), EAT n (the filter took a head; it injects the
 * rewritten head and captures what it means to), MORE (keep, read after it),
 * END (a message ended: hold the rest, read nothing, and once everything
 * before it is sent call filter->done; relay_resume reads on) or STOP (the
 * session was closed or its client handed to a new session). A FIN from the
 * source goes to filter->eof first, which passes it on (PASS), keeps it from
 * the destination (END: the direction is held) or has closed the session
 * (STOP). The filter judges only when nothing waits to be sent, so injected
 * bytes always keep their place in the stream. A held client stays watched
 * (relay_held_watch): its close goes to filter->held_closed, which may end
 * the session (a request whose client left waits for no answer); its next
 * bytes stay unread until relay_resume, so pipelined requests keep their turn.
 *
 * Splice: a plain direction that nobody captures (no spool flow) and nobody
 * tails (no subscriber), once it has filled its tail backlog ring
 * (tail_backlog, 64 KiB: so small exchanges keep their whole backlog), moves
 * its bytes src -> pipe -> dst with splice(2): they never enter user space,
 * two copies fewer per byte. The pipe, like the buffer, is taken from a pool
 * only while bytes wait in it. Spliced bytes are counted (session_bytes) and
 * advance the tail offsets (tail_skip) but are not kept: a `capctl tail`
 * that starts later gets no backlog from before the last spliced chunk,
 * only what passes after it subscribed (a subscriber turns copying on again;
 * a pipe still holding bytes is emptied to its destination first).
 *
 * Capture in place: a bulk direction of a captured session reads straight
 * into a slot of the spool's queue (spool_flow_reserve) and sends from it,
 * so its bytes are copied by nobody in user space on their way to the
 * writer; what the destination leaves is copied to the direction's buffer,
 * then the slot goes to the writer (spool_flow_commit). The queue has no
 * room: the buffer path, which counts the capture dropped. The slot grows
 * from RELAY_SLOT_MIN to RELAY_BULK while reads fill it and shrinks when
 * they come back under half of it: its unused rest still counts against the
 * queue's bound and toward the writer's wake-up, so a flow that reads
 * little reserves little, and one that keeps the socket full reads a MiB a
 * call: against slots of 256 KiB, a quarter of the reads and sends and half
 * the context switches per byte.
 *
 * TLS (tls.c): a side whose `tls` is set is read and written through
 * tls_side_read/tls_side_write (SSL_read/SSL_write) instead of recv/send, and
 * its FIN is close_notify then shutdown; the plain path costs one predictable
 * branch. Plaintext can wait inside OpenSSL where no watcher sees it, so a
 * short read is trusted to have drained the side only when tls_side_pending()
 * says so, and a spent round budget feeds the read watcher an event. A TLS
 * read may need its side writable (or a write readable): tls.c arms that
 * watcher and tls_side_crossed() tells its callback to pump the other
 * direction too. relay_stop() frees the session's TLS state (tls_session_free)
 * and a clean close asks tls_close_reason() for its words (a passed-through
 * session says so).
 */
#include "relay.h"

#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "capd.h"
#include "instance.h"
#include "log.h"
#include "spool.h"
#include "tail.h"
#include "tls.h"
#include "xmalloc.h"

#define RELAY_POOL_MAX 64   /* free buffers kept for reuse */
#define RELAY_ROUNDS 8      /* chunks per callback before yielding to other sessions */
#define RELAY_BUDGET (2 * 1024 * 1024) /* and bytes: a bulk flow yields after two full reads */
#define RELAY_PIPE_MAX 64   /* free pipes kept for reuse */
#define RELAY_BULK (1024 * 1024) /* buffer of a bulk direction, and the most it reads at once */
#define RELAY_BULK_POOL_MAX 4
#define RELAY_SLOT_MIN (256 * 1024) /* a bulk direction's smallest spool slot (relay_recv_spool) */
#define RELAY_SPLICE (256 * 1024) /* pipe size and bytes asked of one splice */

/* A pipe for splice(2): taken from the pool only while bytes wait in it. */
struct relay_pipe {
	int fd[2];          /* read end, write end */
};

/* per loop thread (shard.h): a buffer or pipe is only ever in one thread's pool */
static _Thread_local uint8_t *relay_pool[RELAY_POOL_MAX];
static _Thread_local int relay_pool_len;
static _Thread_local uint8_t *relay_bulk_pool[RELAY_BULK_POOL_MAX];
static _Thread_local int relay_bulk_pool_len;
/* a RELAY_BULK buffer the full pool did not take went back to malloc since the last relay_trim */
static _Thread_local bool relay_bulk_freed;

/* A RELAY_BUF buffer, or a RELAY_BULK one for a bulk direction. */
static uint8_t *
relay_buf_get(bool big)
{
	if (big)
		return relay_bulk_pool_len > 0 ? relay_bulk_pool[--relay_bulk_pool_len] : xmalloc(RELAY_BULK);
	if (relay_pool_len > 0)
		return relay_pool[--relay_pool_len];
	return xmalloc(RELAY_BUF);
}

static void
relay_buf_put(uint8_t *b, bool big)
{
	if (b == NULL)
		return;
	if (big && relay_bulk_pool_len < RELAY_BULK_POOL_MAX)
		relay_bulk_pool[relay_bulk_pool_len++] = b;
	else if (!big && relay_pool_len < RELAY_POOL_MAX)
		relay_pool[relay_pool_len++] = b;
	else {
		free(b);
		relay_bulk_freed |= big;
	}
}

static _Thread_local struct relay_pipe *relay_pipe_pool[RELAY_PIPE_MAX];
static _Thread_local int relay_pipe_len;

/* NULL when no pipe can be made (out of descriptors): the caller copies instead. */
static struct relay_pipe *
relay_pipe_get(void)
{
	struct relay_pipe *p;

	if (relay_pipe_len > 0)
		return relay_pipe_pool[--relay_pipe_len];
	p = xmalloc(sizeof *p);
	if (pipe2(p->fd, O_NONBLOCK | O_CLOEXEC) < 0) {
		free(p);
		return NULL;
	}
	/* fewer, larger splices; at the default 64 KiB when the user's pipe quota says no */
	(void)fcntl(p->fd[1], F_SETPIPE_SZ, RELAY_SPLICE);
	return p;
}

/* An empty pipe goes back to the pool; one with bytes left in it is closed. */
static void
relay_pipe_put(struct relay_pipe *p, bool empty)
{
	if (p == NULL)
		return;
	if (empty && relay_pipe_len < RELAY_PIPE_MAX) {
		relay_pipe_pool[relay_pipe_len++] = p;
		return;
	}
	close(p->fd[0]);
	close(p->fd[1]);
	free(p);
}

/*
 * Called when the thread's last session has ended. Freed bulk buffers are
 * not given back to the system by free() alone: after the first one glibc
 * raises its mmap threshold past RELAY_BULK and keeps the later ones in its
 * arena, so an idle capd kept the peak of its stalled bulk flows (500
 * downloads whose clients stopped reading: 390 MB, for good). One
 * malloc_trim then, only after more bulk buffers were in use at once than
 * the pool keeps: a capd that goes idle between single downloads keeps
 * reusing the same arena memory, with no trim and no fresh page faults.
 */
void
relay_trim(void)
{
	while (relay_pool_len > 0)
		free(relay_pool[--relay_pool_len]);
	while (relay_bulk_pool_len > 0)
		free(relay_bulk_pool[--relay_bulk_pool_len]);
	while (relay_pipe_len > 0)
		relay_pipe_put(relay_pipe_pool[--relay_pipe_len], false);
#ifdef __GLIBC__
	if (relay_bulk_freed)
		malloc_trim(0);
#endif
	relay_bulk_freed = false;
}

void
relay_shutdown(void)
{
	relay_trim();
}

static inline struct side *
relay_src(struct session *s, enum dir d)
{
	return d == DIR_UP ? &s->client : &s->upstream;
}

static inline struct side *
relay_dst(struct session *s, enum dir d)
{
	return d == DIR_UP ? &s->upstream : &s->client;
}

/* The relay's only I/O calls: plain sockets, or TLS when the side has it. */
static inline ssize_t
relay_recv(struct side *sd, void *p, size_t n)
{
	if (__builtin_expect(sd->tls != NULL, 0))
		return tls_side_read(sd->tls, p, n);
	return recv(sd->fd, p, n, 0);
}

/*
 * relay_recv, and on a plain side what the kernel says is left behind the
 * read (TCP_INQ): *inq > 0, more bytes or a FIN; 0, drained; -1, not known
 * (a TLS side, or a socket without the option).
 */
static inline ssize_t
relay_recv_inq(struct side *sd, void *p, size_t n, int *inq)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { .iov_base = p, .iov_len = n };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
	struct cmsghdr *c;
	ssize_t r;

	*inq = -1;
	if (__builtin_expect(sd->tls != NULL, 0))
		return relay_recv(sd, p, n);
	r = recvmsg(sd->fd, &mh, 0);
	if (r > 0 && (c = CMSG_FIRSTHDR(&mh)) != NULL && c->cmsg_level == IPPROTO_TCP && c->cmsg_type == TCP_CM_INQ)
		memcpy(inq, CMSG_DATA(c), sizeof *inq);
	return r;
}

/* flags: MSG_MORE holds a plain side's bytes for what follows (a shutdown) */
static inline ssize_t
relay_send_flags(struct side *sd, const void *p, size_t n, int flags)
{
	if (__builtin_expect(sd->tls != NULL, 0))
		return tls_side_write(sd->tls, p, n);
	return send(sd->fd, p, n, MSG_NOSIGNAL | flags);
}

static inline ssize_t
relay_send(struct side *sd, const void *p, size_t n)
{
	return relay_send_flags(sd, p, n, 0);
}

static inline void
relay_shut(struct side *sd)
{
	if (sd->tls)
		tls_side_shutdown(sd->tls);
	shutdown(sd->fd, SHUT_WR);
}

/* Bytes (or an EOF) wait where the read watcher cannot see them. */
static inline bool
relay_more(const struct side *sd)
{
	return sd->tls != NULL && tls_side_pending(sd->tls);
}

static const char *
relay_side_name(enum dir d, bool src)
{
	return (d == DIR_UP) == src ? "client" : "upstream";
}

/* Nothing goes to the upstream again, and the client is not read (its bytes
 * wait for the close, which lingers). */
static void
relay_upload_gone(struct session *s)
{
	struct relay_dir *rd = &s->dir[DIR_UP];

	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->upstream.wio);
	rd->eof = rd->finished = rd->shut = true;
	rd->msg = RELAY_MSG_FLOW;
	relay_buf_put(rd->buf, rd->big);
	rd->buf = NULL;
	rd->off = rd->len = rd->fill = 0;
	buf_free(&rd->pre);
}

/* The upstream is neither read nor written again, as after a FIN the filter
 * kept (RELAY_UPFAIL_GONE); the client's direction goes on. */
static void
relay_upstream_gone(struct session *s)
{
	struct relay_dir *rd = &s->dir[DIR_DOWN];

	ev_io_stop(capd_loop, &s->upstream.rio);
	ev_io_stop(capd_loop, &s->upstream.wio);
	rd->eof = true;
	rd->msg = RELAY_MSG_HELD;
}

/* A socket error ends the session; a reset is passed on to the other side,
 * unless the filter answers the client for a failed upstream itself, or
 * goes on without it. */
static void
relay_fail(struct session *s, enum dir d, bool at_src, int err)
{
	char why[320];
	struct side *sd = at_src ? relay_src(s, d) : relay_dst(s, d);
	const char *whole = sd->tls ? tls_side_fail(sd->tls) : NULL;

	if (whole)
		snprintf(why, sizeof why, "%s", whole);
	else if (err == EPROTO && sd->tls)
		snprintf(why, sizeof why, "%s TLS error: %s", relay_side_name(d, at_src), tls_side_why(sd->tls));
	else if (err == ECONNRESET || err == EPIPE)
		snprintf(why, sizeof why, "%s reset", relay_side_name(d, at_src));
	else
		snprintf(why, sizeof why, "%s error: %s", relay_side_name(d, at_src), strerror(err));
	if (sd == &s->upstream && s->filter && s->filter->upstream_failed) {
		switch (s->filter->upstream_failed(s, why, !at_src)) {
		case RELAY_UPFAIL_ANSWERED:  /* direction down is the filter's to finish */
			relay_upload_gone(s);
			ev_io_stop(capd_loop, &s->upstream.rio);
			return;
		case RELAY_UPFAIL_READ_ON:
			relay_upload_gone(s);
			ev_feed_event(capd_loop, &s->upstream.rio, EV_READ);
			return;
		case RELAY_UPFAIL_GONE:
			if (s->state == SESSION_OPEN)
				relay_upstream_gone(s);
			return;
		case RELAY_UPFAIL_RESET:
			break;
		}
	}
	if (sd == &s->client && (err == ECONNRESET || err == EPIPE))
		session_reset_by_client(s, why);  /* the capture shows whose RST it was */
	else
		session_reset(s, why);
}

/* Both directions finished with FIN: a clean close. */
static void
relay_check_done(struct session *s)
{
	if (s->dir[DIR_UP].shut && s->dir[DIR_DOWN].shut)
		session_close(s, s->tls ? tls_close_reason(s, "closed") : "closed");
}

static void relay_pump_msg(struct session *s, enum dir d);
static bool relay_held_watch(struct session *s, enum dir d);

/* Nothing needs to see d's next bytes: no capture, no TLS, no tail subscriber and a full backlog ring. */
static inline bool
relay_can_splice(struct session *s, enum dir d)
{
	return s->flow == NULL && s->client.tls == NULL && s->upstream.tls == NULL && !s->dir[d].nosplice &&
	       tail_can_skip(s, d);
}

/*
 * relay_pump's zero-copy path (see the top of this file). Returns false,
 * with no pipe held, when the copying pump must take over: the source sent
 * FIN (relay_pump passes it on), splicing is no longer allowed, or no pipe
 * could be made. Otherwise it has armed the watchers, or closed the session.
 */
static bool
relay_pump_splice(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d), *dst = relay_dst(s, d);

	for (int round = 0; round < RELAY_ROUNDS; round++) {
		if (rd->piped > 0) {
			ssize_t w = splice(rd->pipe->fd[0], NULL, dst->fd, NULL, rd->piped,
			                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					goto dst_full;
				relay_fail(s, d, false, errno);
				return true;
			}
			rd->piped -= (uint32_t)w;
			if (rd->piped > 0)
				goto dst_full;
		}
		if (ev_is_active(&dst->wio))
			ev_io_stop(capd_loop, &dst->wio);
		if (rd->eof || !relay_can_splice(s, d))
			break;
		if (rd->pipe == NULL && (rd->pipe = relay_pipe_get()) == NULL)
			return false;
		ssize_t r = splice(src->fd, NULL, rd->pipe->fd[1], NULL, RELAY_SPLICE,
		                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (r > 0) {
			rd->piped = (uint32_t)r;
			session_bytes(s, d, (size_t)r);
			tail_skip(s, d, (size_t)r);
			continue;
		}
		if (r == 0) {
			rd->eof = true;
			ev_io_stop(capd_loop, &src->rio);
			break;
		}
		if (errno == EAGAIN || errno == EINTR) {
			relay_pipe_put(rd->pipe, true);
			rd->pipe = NULL;
			if (!rd->eof && !ev_is_active(&src->rio))
				ev_io_start(capd_loop, &src->rio);
			return true;
		}
		if (errno == EINVAL || errno == ENOSYS || errno == EPERM) {
			/* sockets (or a sandbox) splice(2) does not serve: the copying pump does */
			rd->nosplice = true;
			break;
		}
		relay_fail(s, d, true, errno);
		return true;
	}
	/* a pipe still holding bytes stays (the next pass empties it), whatever the copying pump would do */
	if (rd->piped == 0 && (rd->eof || !relay_can_splice(s, d))) {
		relay_pipe_put(rd->pipe, true);
		rd->pipe = NULL;
		return false;
	}
	/* round budget spent with data still flowing: come back on the next pass */
	ev_feed_event(capd_loop, &src->rio, EV_READ);
	if (!ev_is_active(&src->rio))
		ev_io_start(capd_loop, &src->rio);
	return true;
dst_full:
	if (ev_is_active(&src->rio))
		ev_io_stop(capd_loop, &src->rio);
	if (!ev_is_active(&dst->wio))
		ev_io_start(capd_loop, &dst->wio);
	return true;
}

/*
 * relay_pump's capture path (see the top of this file): a bulk read goes
 * straight into the spool's queue (spool_flow_reserve) and is sent from
 * there, so the relay copies nothing itself; what the destination does not
 * take is copied to the direction's buffer (rd->off..rd->len), and only
 * then is the record handed to the writer. Returns recv()'s result, with
 * *err the send error that ends the session (0: none), or -2 when the spool
 * has no room (the caller reads into its buffer, and the capture drop is
 * counted there). want: the slot's size, RELAY_SLOT_MIN << rd->slot, which
 * the read then sizes for the next one.
 */
static ssize_t
relay_recv_spool(struct session *s, enum dir d, size_t want, int *err)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d), *dst = relay_dst(s, d);
	struct spool_slot slot;
	uint8_t *p = spool_flow_reserve(s->flow, d, want, &slot);
	ssize_t r, w;

	*err = 0;
	if (p == NULL)
		return -2;
	relay_buf_put(rd->buf, rd->big);  /* nothing waits in it here */
	rd->buf = NULL;
	rd->off = rd->len = 0;
	r = relay_recv(src, p, want);
	if (r <= 0) {
		int e = errno;

		spool_flow_commit(&slot, 0);
		errno = e;
		return r;
	}
	rd->bulk = (size_t)r >= RELAY_BUF;
	/* session_data() without the copy into the spool */
	session_bytes(s, d, (size_t)r);
	tail_data(s, d, p, (size_t)r);
	w = relay_send(dst, p, (size_t)r);
	if (w < 0) {
		if (errno != EAGAIN && errno != EINTR)
			*err = errno;
		w = 0;
	}
	if (w < r && *err == 0) {
		rd->buf = relay_buf_get(true);
		rd->big = true;
		memcpy(rd->buf, p + w, (size_t)(r - w));
		rd->len = (uint32_t)(r - w);
	}
	spool_flow_commit(&slot, (size_t)r);
	if ((size_t)r == want && want < RELAY_BULK)
		rd->slot++;
	else if ((size_t)r < want / 2 && rd->slot > 0)
		rd->slot--;
	return r;
}

/*
 * Hands d to the zero-copy path when it may take it: bytes wait in its pipe,
 * or none wait in its buffer and nothing needs to see them (relay_can_splice;
 * the backlog ring may fill in the middle of a pass). Returns
 * relay_pump_splice's answer, false when it was not asked.
 */
static bool
relay_to_splice(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];

	if (rd->pipe == NULL && (rd->len != rd->off || !relay_can_splice(s, d)))
		return false;
	if (rd->len == rd->off) {
		relay_buf_put(rd->buf, rd->big);  /* splicing takes no buffer */
		rd->buf = NULL;
		rd->off = rd->len = 0;
	}
	return relay_pump_splice(s, d);
}

/*
 * After a short read that TCP_INQ says something waits behind: reads it at
 * once, appending to the buffer. A FIN puts the direction at EOF, so the
 * caller sends the data with MSG_MORE and the shutdown at the loop's top
 * carries the FIN on the same segment. Returns what the read returned.
 */
static ssize_t
relay_read_behind(struct session *s, enum dir d, size_t cap)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d);
	ssize_t e = relay_recv(src, rd->buf + rd->len, cap - rd->len);

	if (e > 0) {
		session_data(s, d, rd->buf + rd->len, (size_t)e);
		rd->len += (uint32_t)e;
	} else if (e == 0) {
		rd->eof = true;
		ev_io_stop(capd_loop, &src->rio);
	}
	return e;
}

/*
 * Moves bytes for direction d until the source has nothing more, the
 * destination is full, or the round budget is spent. Returns after
 * session_close without touching s again.
 */
static void
relay_pump(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d), *dst = relay_dst(s, d);

	if (s->filter) {
		relay_pump_msg(s, d);
		return;
	}
	if (relay_to_splice(s, d))
		return;
	size_t moved = 0;

	for (int round = 0; round < RELAY_ROUNDS && moved < RELAY_BUDGET; round++) {
		ssize_t r;

		if (rd->len > rd->off) {
			ssize_t w = relay_send(dst, rd->buf + rd->off, rd->len - rd->off);
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					goto dst_full;
				relay_fail(s, d, false, errno);
				return;
			}
			rd->off += (uint32_t)w;
			if (rd->off < rd->len)
				goto dst_full;
			rd->off = rd->len = 0;
		}
		if (ev_is_active(&dst->wio))
			ev_io_stop(capd_loop, &dst->wio);
		if (rd->eof) {
			relay_buf_put(rd->buf, rd->big);
			rd->buf = NULL;
			if (!rd->shut) {
				rd->shut = true;
				/* the last FIN of a plain session: the close() that follows
				 * sends it (both receive queues are read to EOF, so no RST) */
				if (dst->tls != NULL || !s->dir[!d].shut)
					relay_shut(dst);
				session_shutdown_dir(s, d);
				relay_check_done(s);
			}
			return;
		}
		if (relay_to_splice(s, d))
			return;
		if (rd->eof)
			continue;  /* the splice path read the FIN: the top passes it on */
		if (rd->bulk && s->flow != NULL) {
			size_t want = (size_t)RELAY_SLOT_MIN << rd->slot;
			int err;

			r = relay_recv_spool(s, d, want, &err);
			if (r > 0) {
				if (err != 0) {
					relay_fail(s, d, false, err);
					return;
				}
				moved += (size_t)r;
				if (rd->len > rd->off)
					goto dst_full;
				if ((size_t)r < want && !relay_more(src))
					goto src_wait;  /* short read: as below */
				continue;
			}
			if (r != -2)
				goto read_end;
		}
		if (rd->buf != NULL && rd->big != rd->bulk) {
			/* nothing waits in it here: change to the size the flow wants */
			relay_buf_put(rd->buf, rd->big);
			rd->buf = NULL;
		}
		if (rd->buf == NULL) {
			rd->buf = relay_buf_get(rd->bulk);
			rd->big = rd->bulk;
		}
		size_t cap = rd->big ? RELAY_BULK : RELAY_BUF;
		int inq;
		r = relay_recv_inq(src, rd->buf, cap, &inq);
		if (r > 0) {
			moved += (size_t)r;
			rd->len = (uint32_t)r;
			/* a read of RELAY_BUF or more: a bulk flow, read RELAY_BULK at a time */
			rd->bulk = (size_t)r >= RELAY_BUF;
			session_data(s, d, rd->buf, (size_t)r);
			if ((size_t)r < cap && !relay_more(src)) {
				/* short read: unless TCP_INQ says something waits, the socket is
				 * drained; write and let the level-triggered watcher call again
				 * rather than spend a recv() on EAGAIN */
				int flags = 0;
				if (inq > 0) {
					ssize_t e = relay_read_behind(s, d, cap);
					if (e > 0)
						continue;  /* more bytes: the loop's top sends them all */
					if (e == 0)
						flags = MSG_MORE;
				}
				ssize_t w = relay_send_flags(dst, rd->buf, rd->len, flags);
				if (w < 0) {
					if (errno == EAGAIN || errno == EINTR)
						goto dst_full;
					relay_fail(s, d, false, errno);
					return;
				}
				rd->off = (uint32_t)w;
				if (rd->off < rd->len)
					goto dst_full;
				rd->off = rd->len = 0;
				if (rd->eof)
					continue;
				relay_buf_put(rd->buf, rd->big);
				rd->buf = NULL;
				goto src_wait;
			}
			continue;
		}
read_end:
		if (r == 0) {
			rd->eof = true;
			ev_io_stop(capd_loop, &src->rio);
			continue;
		}
		if (errno == EAGAIN || errno == EINTR) {
			relay_buf_put(rd->buf, rd->big);
			rd->buf = NULL;
			goto src_wait;
		}
		relay_fail(s, d, true, errno);
		return;
	}
	/* round budget spent with data still flowing: come back on the next pass.
	 * The last full read may still be in the buffer, unsent, with a source
	 * that has gone quiet, or the last round read the FIN (and stopped the
	 * source's watcher) without passing it on: only a fed event brings us
	 * back to write the one or shut the other. */
	if (rd->len > rd->off || relay_more(src) || (rd->eof && !rd->shut))
		ev_feed_event(capd_loop, &src->rio, EV_READ);
src_wait:
	if (!rd->eof && !ev_is_active(&src->rio))
		ev_io_start(capd_loop, &src->rio);
	return;
dst_full:
	if (ev_is_active(&src->rio))
		ev_io_stop(capd_loop, &src->rio);
	if (!ev_is_active(&dst->wio))
		ev_io_start(capd_loop, &dst->wio);
}

/* ---- filters: message-aware relaying (see the top of this file) ---- */

/* Asks the filter about the bytes buf[len..fill) until some pass, a message
 * ends, or more must be read. Returns false when the session is gone. */
static bool
relay_judge(struct session *s, enum dir d, bool *need_read)
{
	struct relay_dir *rd = &s->dir[d];

	*need_read = false;
	while (rd->fill > rd->len) {
		size_t avail = rd->fill - rd->len, n = 0;
		enum relay_verdict v = s->filter->data(s, d, rd->buf + rd->len, avail, &n);

		switch (v) {
		case RELAY_STOP:
			return false;
		case RELAY_PASS:
		case RELAY_EAT:
			if (n == 0 || n > avail)
				fatalx("relay filter judged %zu of %zu bytes", n, avail);
			if (v == RELAY_PASS) {
				session_data(s, d, rd->buf + rd->len, n);
				rd->len += (uint32_t)n;
				return true;
			}
			/* eaten bytes lie where nothing waits to be sent (off == len) */
			rd->off += (uint32_t)n;
			rd->len += (uint32_t)n;
			if (rd->msg != RELAY_MSG_FLOW)
				return true;  /* relay_hold: the head was the whole message */
			break;
		case RELAY_END:
			relay_hold(s, d);
			return true;
		case RELAY_MORE:
			if (rd->len > 0) {
				memmove(rd->buf, rd->buf + rd->len, avail);
				rd->off = rd->len = 0;
				rd->fill = (uint32_t)avail;
			}
			if (rd->fill >= RELAY_BUF) {
				session_close(s, "message head larger than the relay buffer");
				return false;
			}
			*need_read = true;
			return true;
		}
	}
	*need_read = true;
	return true;
}

/*
 * relay_pump for a session with a filter. Each round: write what waits
 * (injected bytes, then passed ones), tell the filter when a message has
 * ended, judge what was read, and read more. A held direction reads nothing.
 */
static void
relay_pump_msg(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d), *dst = relay_dst(s, d);
	bool drained = false, need_read;

	for (int round = 0; round < RELAY_ROUNDS; round++) {
		if (buf_used(&rd->pre) > 0) {
			size_t np = buf_used(&rd->pre), nb = rd->len - rd->off;
			ssize_t w;

			if (nb > 0 && dst->tls == NULL) {
				/* a rewritten head and the body after it leave in one segment */
				struct iovec iov[2] = { { buf_head(&rd->pre), np }, { rd->buf + rd->off, nb } };
				struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };
				w = sendmsg(dst->fd, &mh, MSG_NOSIGNAL);
			} else {
				w = relay_send(dst, buf_head(&rd->pre), np);
			}
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					goto dst_full;
				relay_fail(s, d, false, errno);
				return;
			}
			if ((size_t)w < np) {
				buf_consume(&rd->pre, (size_t)w);
				goto dst_full;
			}
			buf_consume(&rd->pre, np);
			rd->off += (uint32_t)((size_t)w - np);
		}
		if (rd->len > rd->off) {
			ssize_t w = relay_send(dst, rd->buf + rd->off, rd->len - rd->off);
			if (w < 0) {
				if (errno == EAGAIN || errno == EINTR)
					goto dst_full;
				relay_fail(s, d, false, errno);
				return;
			}
			rd->off += (uint32_t)w;
			if (rd->off < rd->len)
				goto dst_full;
		}
		if (ev_is_active(&dst->wio))
			ev_io_stop(capd_loop, &dst->wio);
		if (rd->off == rd->fill)
			rd->off = rd->len = rd->fill = 0;
		if (rd->msg != RELAY_MSG_FLOW) {
			if (rd->msg == RELAY_MSG_HELD)
				goto held;
			rd->msg = RELAY_MSG_HELD;
			s->filter->done(s, d);
			if (s->state != SESSION_OPEN)
				return;
			if (rd->msg != RELAY_MSG_FLOW)
				goto held;
			continue;
		}
		if (rd->fill > rd->len) {
			if (!relay_judge(s, d, &need_read))
				return;
			if (!need_read || rd->off < rd->len || buf_used(&rd->pre) > 0)
				continue;
		}
		if (rd->eof) {
			if (rd->off == rd->fill) {
				relay_buf_put(rd->buf, rd->big);
				rd->buf = NULL;
				rd->off = rd->len = rd->fill = 0;
			}
			if (!rd->shut) {
				rd->shut = true;
				relay_shut(dst);
				session_shutdown_dir(s, d);
				s->filter->done(s, d);
				if (s->state != SESSION_OPEN)
					return;
				relay_check_done(s);
			}
			return;
		}
		if (drained)
			goto src_wait;
		if (rd->buf == NULL) {
			rd->buf = relay_buf_get(false);
			rd->big = false;
		}
		ssize_t r = relay_recv(src, rd->buf + rd->fill, RELAY_BUF - rd->fill);
		if (r > 0) {
			drained = (size_t)r < RELAY_BUF - rd->fill && !relay_more(src);
			rd->fill += (uint32_t)r;
			continue;
		}
		if (r == 0) {
			enum relay_verdict v;

			rd->eof = true;
			ev_io_stop(capd_loop, &src->rio);
			v = s->filter->eof ? s->filter->eof(s, d) : RELAY_PASS;
			if (v == RELAY_STOP)
				return;
			if (v == RELAY_END) {
				rd->msg = RELAY_MSG_HELD;
				goto held;
			}
			continue;
		}
		if (errno == EAGAIN || errno == EINTR) {
			if (rd->off == rd->fill) {
				relay_buf_put(rd->buf, rd->big);
				rd->buf = NULL;
				rd->off = rd->len = rd->fill = 0;
			}
			goto src_wait;
		}
		relay_fail(s, d, true, errno);
		return;
	}
	/* round budget spent: bytes may wait unjudged where no watcher sees them */
	ev_feed_event(capd_loop, &src->rio, EV_READ);
src_wait:
	if (!rd->eof && !ev_is_active(&src->rio))
		ev_io_start(capd_loop, &src->rio);
	return;
held:
	if (relay_held_watch(s, d)) {
		if (!ev_is_active(&src->rio))
			ev_io_start(capd_loop, &src->rio);
	} else if (ev_is_active(&src->rio)) {
		ev_io_stop(capd_loop, &src->rio);
	}
	return;
dst_full:
	if (ev_is_active(&src->rio))
		ev_io_stop(capd_loop, &src->rio);
	if (!ev_is_active(&dst->wio))
		ev_io_start(capd_loop, &dst->wio);
}

/* Whether held direction d keeps its source watched: the client, with
 * nothing read after the message, so that its close (or its next bytes)
 * wakes relay_held_readable. Costs no more than the stop it replaces (the
 * watcher stays on, relay_resume finds it on); the rest is per event. */
static bool
relay_held_watch(struct session *s, enum dir d)
{
	const struct relay_dir *rd = &s->dir[d];

	return d == DIR_UP && s->filter != NULL && s->filter->held_closed != NULL && rd->msg == RELAY_MSG_HELD &&
	       !rd->unread && !rd->eof && rd->fill == rd->len && !relay_more(&s->client);
}

/* A held TLS client sent a record: its close_notify, or the bytes of a
 * next request, which are read now and wait unjudged, in order, for
 * relay_resume. As recv: bytes, 0 for the close, -1 with errno. */
static ssize_t
relay_held_read_tls(struct session *s)
{
	struct relay_dir *rd = &s->dir[DIR_UP];
	ssize_t r;

	if (rd->buf == NULL) {
		rd->buf = relay_buf_get(false);
		rd->big = false;
	}
	r = relay_recv(&s->client, rd->buf + rd->fill, RELAY_BUF - rd->fill);
	if (r > 0) {
		rd->fill += (uint32_t)r;
	} else if (rd->fill == 0) {
		relay_buf_put(rd->buf, rd->big);  /* idle sessions hold no buffer */
		rd->buf = NULL;
		rd->off = rd->len = 0;
	}
	return r;
}

/* The held client is readable: a FIN or a reset goes to the filter
 * (filter->held_closed), which may end the session; bytes (a pipelined
 * request) and a close it leaves are not read (a peek; a TLS client's
 * record is read, its bytes kept), and the client is watched no more until
 * relay_resume. One recv per such event, none per byte. */
static void
relay_held_readable(struct session *s)
{
	struct relay_dir *rd = &s->dir[DIR_UP];
	char c;
	ssize_t r = recv(s->client.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);

	if (r > 0 && s->client.tls != NULL)
		r = relay_held_read_tls(s);
	if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
		if (rd->fill == rd->len)
			return;  /* a fed event, nothing after all, or a record with no bytes: still watched */
	} else if (r < 0 && s->client.tls != NULL && errno != ECONNRESET) {
		relay_fail(s, DIR_UP, true, errno);  /* a TLS error: as from any read */
		return;
	} else if (r <= 0 && s->filter->held_closed(s, r == 0 ? 1 : -1)) {
		return;
	}
	rd->unread = true;
	ev_io_stop(capd_loop, &s->client.rio);
}

void
relay_inject(struct session *s, enum dir d, const void *p, size_t n)
{
	struct relay_dir *rd = &s->dir[d];

	/* pre goes out before buf[off..len): keep the order by moving those first */
	if (rd->len > rd->off) {
		buf_append(&rd->pre, rd->buf + rd->off, rd->len - rd->off);
		rd->off = rd->len;
	}
	buf_append(&rd->pre, p, n);
}

void
relay_hold(struct session *s, enum dir d)
{
	/* a finished direction (relay_finish) has nothing left to hold; a FIN
	 * read already (eof) does not finish it: what came before the FIN is
	 * still judged message by message */
	if (!s->dir[d].finished)
		s->dir[d].msg = RELAY_MSG_ENDING;
}

void
relay_resume(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d);

	rd->msg = RELAY_MSG_FLOW;
	rd->unread = false;
	if (rd->fill > rd->len || rd->len > rd->off || buf_used(&rd->pre) > 0 || rd->eof || relay_more(src)) {
		/* bytes wait: on the next loop pass, since the caller may be inside this direction's pump */
		ev_feed_event(capd_loop, &src->rio, EV_READ);
		return;
	}
	/* nothing read ahead (the usual keep-alive case): the watcher tells when
	 * the next message comes, instead of a recv() spent on EAGAIN */
	if (!ev_is_active(&src->rio))
		ev_io_start(capd_loop, &src->rio);
}

void
relay_finish(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];

	rd->eof = true;
	rd->finished = true;
	rd->fill = rd->len;
	rd->msg = RELAY_MSG_FLOW;
	ev_io_stop(capd_loop, &relay_src(s, d)->rio);
	ev_feed_event(capd_loop, &relay_dst(s, d)->wio, EV_WRITE);
}

size_t
relay_held(struct session *s, enum dir d, const uint8_t **p)
{
	struct relay_dir *rd = &s->dir[d];

	*p = rd->buf ? rd->buf + rd->len : NULL;
	return rd->fill - rd->len;
}

int
relay_src_closed(struct session *s, enum dir d)
{
	struct relay_dir *rd = &s->dir[d];
	struct side *src = relay_src(s, d);
	char c;
	ssize_t r;

	if (rd->eof)
		return 1;
	if (rd->fill > rd->len || src->tls != NULL)
		return 0;
	r = recv(src->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
	if (r == 0)
		return 1;
	return r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR ? -1 : 0;
}

/* Every relay watcher: a readable source or a writable destination pumps its direction. */
static void
relay_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct session *s = w->data;
	struct side *sd = w == &s->client.rio || w == &s->client.wio ? &s->client : &s->upstream;
	bool reading = w == &sd->rio;
	/* the client's read side carries the up direction, its write side the down one */
	enum dir d = (sd == &s->client) == reading ? DIR_UP : DIR_DOWN;

	(void)loop; (void)revents;
	/* a held client is watched only for its close (a stale fed event finds
	 * it so too: the peek sees nothing) */
	if (reading && d == DIR_UP && relay_held_watch(s, DIR_UP))
		relay_held_readable(s);
	else
		relay_pump(s, d);
	/* a TLS read may have waited for this side to be writable, or a write for it to be readable */
	if (sd->tls && s->state == SESSION_OPEN && tls_side_crossed(sd->tls))
		relay_pump(s, (enum dir)!d);
}

static void
relay_preload(struct session *s, enum dir d, struct buf *b, bool capture)
{
	struct relay_dir *rd = &s->dir[d];
	size_t n = buf_used(b);

	if (n == 0)
		return;
	if (n > RELAY_BUF)
		fatalx("handshake leftover %zu exceeds relay buffer", n);
	rd->buf = relay_buf_get(false);
	rd->big = false;
	memcpy(rd->buf, buf_head(b), n);
	rd->off = 0;
	rd->len = (uint32_t)n;
	buf_free(b);
	if (capture)
		session_data(s, d, rd->buf, n);
}

/*
 * Points a stopped watcher at the relay. A watcher the handshake already
 * used on the same fd only changes its callback: ev_io_init would tell libev
 * the fd may be a new file, and libev would try an epoll_ctl ADD that fails
 * with EEXIST (one wasted syscall per socks or CONNECT session).
 */
static void
relay_watch(ev_io *w, void (*cb)(struct ev_loop *, ev_io *, int), int fd, int events)
{
	if (w->fd == fd && (w->events & (EV_READ | EV_WRITE)) == events)
		ev_set_cb(w, cb);
	else
		ev_io_init(w, cb, fd, events);
}

void
relay_start(struct session *s)
{
	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	ev_io_stop(capd_loop, &s->upstream.rio);
	ev_io_stop(capd_loop, &s->upstream.wio);
	relay_watch(&s->client.rio, relay_io_cb, s->client.fd, EV_READ);
	relay_watch(&s->client.wio, relay_io_cb, s->client.fd, EV_WRITE);
	relay_watch(&s->upstream.rio, relay_io_cb, s->upstream.fd, EV_READ);
	relay_watch(&s->upstream.wio, relay_io_cb, s->upstream.fd, EV_WRITE);
	s->client.rio.data = s->client.wio.data = s->upstream.rio.data = s->upstream.wio.data = s;

	session_opened(s);
	/* a handshake reply still unsent goes first to the client; it is not application data */
	relay_preload(s, DIR_DOWN, &s->hs_out, false);
	relay_preload(s, DIR_UP, &s->hs_in, s->filter == NULL);
	if (s->filter) {
		/* with a filter the client's leftover is judged like any read */
		s->dir[DIR_UP].fill = s->dir[DIR_UP].len;
		s->dir[DIR_UP].len = 0;
		s->dir[DIR_DOWN].fill = s->dir[DIR_DOWN].len;
	}
	if (s->client_eof)
		s->dir[DIR_UP].eof = true;
	/* kick both directions: preloaded bytes are written, then reads start */
	bool replying = s->dir[DIR_DOWN].len > 0 || s->hs_replied;
	for (int d = DIR_UP; d <= DIR_DOWN; d++) {
		struct side *src = relay_src(s, (enum dir)d);

		bool idle = s->dir[d].len == 0 &&
		            (s->filter == NULL || (s->dir[d].fill == 0 && buf_used(&s->dir[d].pre) == 0));
		if (src->tls == NULL && idle && !s->dir[d].eof && (d == DIR_DOWN || (replying && s->filter == NULL))) {
			/* nothing to write or judge, and a source that has most likely sent
			 * nothing yet (a server connected just now, a client still waiting
			 * for the handshake reply): the watcher tells when, instead of a
			 * recv() spent on EAGAIN. A forward client has usually sent already: read. */
			ev_io_start(capd_loop, &src->rio);
			continue;
		}
		relay_pump(s, (enum dir)d);
		if (s->state != SESSION_OPEN)
			return;
	}
}

void
relay_stop(struct session *s)
{
	if (s->tls)
		tls_session_free(s);
	for (int d = 0; d < 2; d++) {
		relay_pipe_put(s->dir[d].pipe, s->dir[d].piped == 0);
		s->dir[d].pipe = NULL;
		s->dir[d].piped = 0;
		relay_buf_put(s->dir[d].buf, s->dir[d].big);
		s->dir[d].buf = NULL;
		s->dir[d].off = s->dir[d].len = s->dir[d].fill = 0;
		buf_free(&s->dir[d].pre);
	}
}

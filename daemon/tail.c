/*
 * Live watching: session.tail subscribers with each session's backlog, and
 * the event stream of events.subscribe.
 *
 * A session that carries data keeps the last tail_backlog bytes of each
 * direction in a ring that grows only as far as the session has carried, so
 * idle sessions hold nothing, plus "marks": the order in which the two
 * directions took turns, so a late subscriber sees the backlog as the
 * conversation went. Consecutive chunks of one direction share a mark, like
 * the blocks of Wireshark's Follow Stream.
 *
 * A new subscriber first reads the backlog from the rings with a cursor of
 * its own (next[]), a piece at a time while its connection has less than
 * TAIL_SUB_RESUME waiting, going on as the connection drains (tail_replay_cb
 * runs before each pass of the main loop), so a reader that keeps up gets a
 * backlog of any size whole. Data that passes meanwhile joins the rings and is
 * read from there; what the rings overwrite before the cursor gets to it
 * counts as dropped. Once the cursor has caught up, the subscriber gets live
 * data.
 *
 * Subscribers are control connections. Each is bounded by what waits in its
 * output buffer: past TAIL_SUB_MAX a subscriber loses data (counted) instead
 * of queueing it, until it has drained below TAIL_SUB_RESUME; its next
 * notification then says how much it missed (or, if nothing new comes, a
 * notice sent when a timer finds it drained). A session never waits for a
 * subscriber.
 *
 * Threads (shard.h): subscribers, their control connections and the event
 * stream are the main loop's. A session on a worker touches its own rings
 * without the lock while nobody watches it (t->watched == 0; subscribing
 * pauses the workers, so the count cannot rise under a running append) and
 * takes the lock for everything else.
 */
#include "tail.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "base64.h"
#include "capd.h"
#include "control.h"
#include "rpc.h"
#include "spool-follow.h"
#include "xmalloc.h"

#define TAIL_SUB_MAX (4u << 20)     /* queued bytes at which a subscriber starts losing data */
#define TAIL_SUB_RESUME (1u << 20)  /* ... and below which it gets data again */
#define TAIL_MARKS_MAX 1024         /* turns remembered for the backlog's order */
#define TAIL_PIECE (64u << 10)      /* backlog replayed in notifications of at most this */
#define TAIL_LIVE_PIECE (256u << 10) /* live data too: its base64 line stays under RPC_MAX_LINE */
#define TAIL_CONN_SUBS 4            /* subscriptions one control connection may hold */
#define TAIL_RING_MIN 256           /* first allocation of a ring; it doubles as the session carries more */
#define TAIL_DRAIN_SECS 0.25        /* how often subscribers that lost data are checked for room */
/*
 * All backlogs together stay under this: with thousands of busy sessions,
 * tail_backlog each would be gigabytes. Past it, rings stop growing and
 * keep what they hold (at least TAIL_RING_MIN), newest bytes first.
 */
#define TAIL_MEM_MAX (64u << 20)

static atomic_size_t tail_ring_bytes;  /* bytes held by every ring: the shards' sessions grow theirs */

/* One direction's backlog: the last min(total - base, cap) bytes of the stream. */
struct tail_ring {
	uint8_t *buf;       /* NULL until the direction carries data */
	size_t cap;         /* grows up to tail->max; wraps once it is there, or before when TAIL_MEM_MAX stops it */
	uint64_t total;     /* bytes carried: stream offset of the next byte */
	uint64_t base;      /* bytes before it are not held: spliced past (tail_skip) or lost to a wrap (ring_grow) */
};

/* A turn of one direction: bytes [off, off + len) of its stream. */
struct tail_mark {
	uint64_t off, len;
	double time;        /* when its first byte passed */
	enum dir d;
};

/* A subscriber: owned by its list; freed when the session ends or the connection closes. */
struct tail_sub {
	LIST_ENTRY(tail_sub) entry;  /* its session's subscribers, or the event subscribers */
	LIST_ENTRY(tail_sub) all;    /* every subscriber, to count them per connection */
	LIST_ENTRY(tail_sub) pend;   /* backlog still to send */
	struct ctl_conn *conn;       /* borrowed; on_close tells us when it goes */
	struct session *s;           /* NULL for an event subscriber */
	uint64_t dropped[2];         /* bytes per direction (events: events in [0]) not sent yet */
	bool dropping;               /* over TAIL_SUB_MAX, waiting to drain */
	bool pending;                /* on the pend list: still reading the backlog */
	uint64_t next[2];            /* while pending: stream offset of the next byte to send per direction */
	bool want[2];                /* directions it asked for: the other is neither sent nor queued */
};

LIST_HEAD(tail_sub_list, tail_sub);

/* Per-session state, s->tail: allocated at the first byte or subscriber, freed by tail_session_end. */
struct tail {
	struct tail_ring ring[2];
	size_t max;                  /* tail_backlog when it was made */
	struct tail_mark *marks;     /* a ring of capmarks, nmarks from first */
	unsigned first, nmarks, capmarks;
	struct tail_sub_list subs;
	atomic_uint watched;         /* subscribers in subs: read without the lock by the session's shard */
};

static struct tail_sub_list events_subs = LIST_HEAD_INITIALIZER(events_subs);
static atomic_bool events_on;        /* events_subs is not empty */
static struct tail_sub_list tail_all = LIST_HEAD_INITIALIZER(tail_all);
static struct tail_sub_list tail_pending = LIST_HEAD_INITIALIZER(tail_pending);
static ev_prepare tail_replay_w;
static bool tail_replay_init;
static ev_timer tail_drain_w;        /* runs while some subscriber owes a drop notice */
static bool tail_drain_init;

static void tail_drain_cb(struct ev_loop *loop, ev_timer *w, int revents);

static const char *const tail_dir_names[2] = { [DIR_UP] = "c2s", [DIR_DOWN] = "s2c" };

/* ---- backlog rings ---- */

static size_t
ring_held(const struct tail_ring *r)
{
	return r->total - r->base < r->cap ? (size_t)(r->total - r->base) : r->cap;
}

/* Copies stream bytes [off, off + n), which the ring holds, to out. */
static void
ring_read(const struct tail_ring *r, uint64_t off, size_t n, uint8_t *out)
{
	size_t pos = (size_t)(off % r->cap);
	size_t first = n < r->cap - pos ? n : r->cap - pos;

	memcpy(out, r->buf + pos, first);
	memcpy(out + first, r->buf, n - first);
}

/*
 * Makes r's buffer want bytes (more than cap). Byte off sits at off % cap: a
 * ring that never wrapped keeps its layout, one that wrapped (held small by
 * TAIL_MEM_MAX, and now let grow) has what it holds laid out anew.
 */
static void
ring_grow(struct tail_ring *r, size_t want)
{
	if (r->cap == 0) {
		r->buf = xmalloc(want);
		r->base = r->total;
	} else if (r->total <= r->cap) {
		r->buf = xrealloc(r->buf, want);
	} else {
		size_t held = ring_held(r);
		uint64_t from = r->total - held;
		size_t pos = (size_t)(from % want);
		size_t first = held < want - pos ? held : want - pos;
		uint8_t *nb = xmalloc(want);

		ring_read(r, from, first, nb + pos);
		ring_read(r, from + first, held - first, nb);
		free(r->buf);
		r->buf = nb;
		r->base = from;  /* what it had overwritten stays lost */
	}
	atomic_fetch_add_explicit(&tail_ring_bytes, want - r->cap, memory_order_relaxed);
	r->cap = want;
}

static void
ring_append(struct tail_ring *r, size_t max, const uint8_t *p, size_t n)
{
	if (max == 0) {
		r->total += n;
		return;
	}
	if (r->total + n > r->cap && r->cap < max) {
		/* grow toward max, if all rings together stay under TAIL_MEM_MAX */
		size_t want = r->cap ? r->cap : TAIL_RING_MIN;
		while (want < r->total + n && want < max)
			want *= 2;
		if (want > max)
			want = max;
		if (atomic_load_explicit(&tail_ring_bytes, memory_order_relaxed) + (want - r->cap) > TAIL_MEM_MAX)
			want = r->cap ? r->cap : TAIL_RING_MIN;
		if (want != r->cap)
			ring_grow(r, want);
	}
	if (n > r->cap) {
		r->total += n - r->cap;
		p += n - r->cap;
		n = r->cap;
	}
	size_t pos = (size_t)(r->total % r->cap);
	size_t first = n < r->cap - pos ? n : r->cap - pos;
	memcpy(r->buf + pos, p, first);
	memcpy(r->buf, p + first, n - first);
	r->total += n;
}

static struct tail_mark *
tail_mark_at(struct tail *t, unsigned i)
{
	return &t->marks[(t->first + i) % t->capmarks];
}

static void
tail_mark_add(struct tail *t, enum dir d, uint64_t off, size_t n, double now)
{
	struct tail_mark *m;

	if (t->max == 0)
		return;
	/* a chunk right after the last turn's bytes extends it; after spliced bytes
	 * (tail_skip) the turn ends where the ring's bytes stopped */
	if (t->nmarks > 0 && (m = tail_mark_at(t, t->nmarks - 1))->d == d && m->off + m->len == off) {
		m->len += n;
		return;
	}
	/* forget turns whose bytes both rings have overwritten */
	while (t->nmarks > 0) {
		m = tail_mark_at(t, 0);
		const struct tail_ring *r = &t->ring[m->d];
		if (m->off + m->len > r->total - ring_held(r))
			break;
		t->first = (t->first + 1) % t->capmarks;
		t->nmarks--;
	}
	if (t->nmarks == t->capmarks) {
		if (t->capmarks < TAIL_MARKS_MAX) {
			unsigned cap = t->capmarks ? t->capmarks * 2 : 8;
			struct tail_mark *nm = xmalloc(cap * sizeof *nm);
			for (unsigned i = 0; i < t->nmarks; i++)
				nm[i] = *tail_mark_at(t, i);
			free(t->marks);
			t->marks = nm;
			t->capmarks = cap;
			t->first = 0;
		} else {
			/* the oldest turn loses its place; its bytes replay first (see tail_replay) */
			t->first = (t->first + 1) % t->capmarks;
			t->nmarks--;
		}
	}
	m = tail_mark_at(t, t->nmarks++);
	*m = (struct tail_mark){ .off = off, .len = n, .time = now, .d = d };
}

static struct tail *
tail_get(struct session *s)
{
	if (s->tail == NULL) {
		s->tail = xcalloc(1, sizeof *s->tail);
		s->tail->max = capd_settings ? (size_t)capd_settings->tail_backlog : 64 * 1024;
		LIST_INIT(&s->tail->subs);
	}
	return s->tail;
}

/* ---- subscribers ---- */

/* Whether sub may be sent more now; a subscriber over the mark waits until it drains. */
static bool
tail_sub_room(struct tail_sub *sub)
{
	size_t q = ctl_conn_queued(sub->conn);

	if (sub->dropping) {
		if (q > TAIL_SUB_RESUME)
			return false;
		sub->dropping = false;
		return true;
	}
	if (q > TAIL_SUB_MAX) {
		sub->dropping = true;
		if (!tail_drain_init) {
			ev_init(&tail_drain_w, tail_drain_cb);
			tail_drain_w.repeat = TAIL_DRAIN_SECS;
			tail_drain_init = true;
		}
		if (!ev_is_active(&tail_drain_w)) {
			/* subscribers are the main loop's, whichever thread carried the data */
			ev_timer_again(capd_main, &tail_drain_w);
			shard_wake(capd_main);
		}
		return false;
	}
	return true;
}

/* Tells sub what it lost and has not been told yet: empty session.data notices, or events.dropped. */
static void
tail_tell_dropped(struct tail_sub *sub)
{
	char tm[40];

	if (sub->s == NULL) {
		if (sub->dropped[0] > 0)
			ctl_conn_send(sub->conn, rpc_notification("events.dropped",
			                                          json_pack("{s:I}", "dropped", (json_int_t)sub->dropped[0])));
		sub->dropped[0] = 0;
		return;
	}
	for (int d = 0; d < 2; d++) {
		if (sub->dropped[d] == 0)
			continue;
		json_t *o = json_pack("{s:I, s:s, s:s, s:I, s:s, s:I}", "id", (json_int_t)sub->s->id, "dir", tail_dir_names[d],
		                      "time", session_time(capd_now(), tm, sizeof tm), "offset",
		                      (json_int_t)sub->s->tail->ring[d].total, "data", "", "dropped",
		                      (json_int_t)sub->dropped[d]);
		ctl_conn_send(sub->conn, rpc_notification("session.data", o));
		sub->dropped[d] = 0;
	}
}

/* Subscribers that lost data while a session or the event stream went quiet hear of it once they drain. */
static void
tail_drain_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct tail_sub *sub;
	bool owed = false;

	(void)revents;
	LIST_FOREACH(sub, &tail_all, all) {
		if (sub->pending || (!sub->dropping && sub->dropped[0] == 0 && sub->dropped[1] == 0))
			continue;
		if (!tail_sub_room(sub)) {
			owed = true;
			continue;
		}
		tail_tell_dropped(sub);
	}
	if (!owed)
		ev_timer_stop(loop, w);
}

/*
 * One session.data notification line, with "dropped" when it is not 0:
 * written here rather than by jansson, whose dump of the base64 string (a
 * character at a time) cost the session's thread more than its relay, so a
 * tail that kept up slowed a bulk session by a third.
 */
static void
tail_data_line(struct buf *line, struct session *s, enum dir d, uint64_t off, const void *p, size_t n, double when,
               uint64_t dropped)
{
	size_t len = base64_len(n);
	char t[40];

	buf_printf(line,
	           "{\"jsonrpc\":\"2.0\",\"method\":\"session.data\",\"params\":{\"id\":%llu,\"dir\":\"%s\","
	           "\"time\":\"%s\",\"offset\":%llu,\"data\":\"",
	           (unsigned long long)s->id, tail_dir_names[d], session_time(when, t, sizeof t),
	           (unsigned long long)off);
	base64_encode((char *)buf_reserve(line, len), p, n);
	buf_commit(line, len);
	if (dropped > 0)
		buf_printf(line, "\",\"dropped\":%llu}}\n", (unsigned long long)dropped);
	else
		buf_append(line, "\"}}\n", 4);
}

/* Sends one chunk to sub, telling what it lost of d before. */
static void
tail_deliver(struct tail_sub *sub, enum dir d, uint64_t off, const void *p, size_t n, double when)
{
	struct buf line = { 0 };

	tail_data_line(&line, sub->s, d, off, p, n, when, sub->dropped[d]);
	sub->dropped[d] = 0;
	ctl_conn_send_line(sub->conn, buf_head(&line), buf_used(&line));
	buf_free(&line);
}

/* Sends one chunk to one subscriber, or counts it as dropped. */
static void
tail_send(struct tail_sub *sub, enum dir d, uint64_t off, const void *p, size_t n, double when)
{
	if (!tail_sub_room(sub)) {
		sub->dropped[d] += n;
		return;
	}
	tail_deliver(sub, d, off, p, n, when);
}

/*
 * The next stretch of backlog sub is owed, [*from, *to) of direction *d, in
 * the order the turns went: bytes kept from turns whose marks were forgotten
 * first, then each turn's. False once sub has caught up with both directions.
 * What the rings overwrote before sub got to it counts as dropped.
 */
static bool
tail_replay_next(struct tail_sub *sub, enum dir *d, uint64_t *from, uint64_t *to, double *when)
{
	struct tail *t = sub->s->tail;
	uint64_t first[2];

	for (int i = 0; i < 2; i++) {
		const struct tail_ring *r = &t->ring[i];
		uint64_t oldest = r->total - ring_held(r);
		if (!sub->want[i])
			sub->next[i] = r->total;  /* nothing of it is owed */
		if (sub->next[i] < oldest) {
			sub->dropped[i] += oldest - sub->next[i];
			sub->next[i] = oldest;
		}
		first[i] = r->total;
	}
	for (unsigned i = t->nmarks; i-- > 0;) {
		const struct tail_mark *m = tail_mark_at(t, i);
		first[m->d] = m->off;
	}
	for (int i = 0; i < 2; i++)
		if (sub->next[i] < first[i]) {
			*d = (enum dir)i;
			*from = sub->next[i];
			*to = first[i];
			*when = t->nmarks > 0 ? tail_mark_at(t, 0)->time : capd_now();
			return true;
		}
	for (unsigned i = 0; i < t->nmarks; i++) {
		const struct tail_mark *m = tail_mark_at(t, i);
		if (sub->next[m->d] < m->off + m->len) {
			*d = m->d;
			*from = m->off > sub->next[m->d] ? m->off : sub->next[m->d];
			*to = m->off + m->len;
			*when = m->time;
			return true;
		}
	}
	return false;
}

/*
 * Sends sub the backlog it is owed, in pieces. With wait, only while its
 * connection has less than TAIL_SUB_RESUME waiting: the rest goes as it
 * drains (tail_replay_cb). Without (the session ends, the rings go with it),
 * all of it, bounded as live data is. Once sub has caught up it is live.
 */
static void
tail_replay(struct tail_sub *sub, bool wait)
{
	struct tail *t = sub->s->tail;
	uint8_t *tmp = NULL;
	uint64_t from, to;
	double when;
	enum dir d;

	for (;;) {
		if (wait && ctl_conn_queued(sub->conn) >= TAIL_SUB_RESUME) {
			free(tmp);
			return;
		}
		if (!tail_replay_next(sub, &d, &from, &to, &when))
			break;
		size_t n = to - from < TAIL_PIECE ? (size_t)(to - from) : TAIL_PIECE;
		if (tmp == NULL)
			tmp = xmalloc(TAIL_PIECE);
		ring_read(&t->ring[d], from, n, tmp);
		if (wait)
			tail_deliver(sub, d, from, tmp, n, when);
		else
			tail_send(sub, d, from, tmp, n, when);
		sub->next[d] = from + n;
	}
	free(tmp);
	LIST_REMOVE(sub, pend);
	sub->pending = false;
}

/* Before each pass of the main loop: subscribers whose connections drained read on. */
static void
tail_replay_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct tail_sub *sub, *next;

	(void)revents;
	for (sub = LIST_FIRST(&tail_pending); sub != NULL; sub = next) {
		next = LIST_NEXT(sub, pend);
		tail_replay(sub, true);
	}
	if (LIST_EMPTY(&tail_pending))
		ev_prepare_stop(loop, w);
}

static void
tail_sub_free(struct tail_sub *sub)
{
	if (sub->pending)
		LIST_REMOVE(sub, pend);
	LIST_REMOVE(sub, entry);
	LIST_REMOVE(sub, all);
	if (sub->s != NULL)
		atomic_fetch_sub(&sub->s->tail->watched, 1);
	else
		atomic_store(&events_on, !LIST_EMPTY(&events_subs));
	free(sub);
}

/* The subscriber's connection closed. */
static void
tail_sub_gone_cb(void *arg)
{
	tail_sub_free(arg);
}

static int
tail_sub_check(struct ctl_conn *c, char **why)
{
	struct tail_sub *sub;
	int n = 0;

	LIST_FOREACH(sub, &tail_all, all)
		if (sub->conn == c)
			n++;
	if (n >= TAIL_CONN_SUBS) {
		*why = xasprintf("this connection holds %d subscriptions already; open another", n);
		return -1;
	}
	return 0;
}

static struct tail_sub *
tail_sub_new(struct ctl_conn *c, struct session *s)
{
	struct tail_sub *sub = xcalloc(1, sizeof *sub);

	sub->conn = c;
	sub->s = s;
	LIST_INSERT_HEAD(&tail_all, sub, all);
	ctl_conn_on_close(c, tail_sub_gone_cb, sub);
	return sub;
}

int
tail_subscribe(struct session *s, struct ctl_conn *c, uint64_t backlog, int dir, char **why)
{
	struct tail *t;
	struct tail_sub *sub, *last;

	if (tail_sub_check(c, why) < 0)
		return -1;
	t = tail_get(s);
	sub = tail_sub_new(c, s);
	for (int d = 0; d < 2; d++) {
		sub->want[d] = dir < 0 || dir == d;
		const struct tail_ring *r = &t->ring[d];
		uint64_t held = ring_held(r);
		sub->next[d] = r->total - (backlog < held ? backlog : held);
	}
	/* keep subscription order: the oldest subscriber is served first */
	if ((last = LIST_FIRST(&t->subs)) == NULL) {
		LIST_INSERT_HEAD(&t->subs, sub, entry);
	} else {
		while (LIST_NEXT(last, entry) != NULL)
			last = LIST_NEXT(last, entry);
		LIST_INSERT_AFTER(last, sub, entry);
	}
	atomic_fetch_add(&t->watched, 1);
	/* the backlog must follow the method's reply, which is sent when we return;
	 * it goes on before each pass of the main loop until sub has caught up */
	sub->pending = true;
	LIST_INSERT_HEAD(&tail_pending, sub, pend);
	if (!tail_replay_init) {
		ev_prepare_init(&tail_replay_w, tail_replay_cb);
		tail_replay_init = true;
	}
	ev_prepare_start(capd_main, &tail_replay_w);
	return 0;
}

/* Live data to every subscriber of s: one notification built once and shared by
 * those with room, counted as dropped for the others. (Called under capd_lock.) */
static void
tail_publish(struct session *s, enum dir d, uint64_t off, const void *p, size_t n, double now)
{
	struct tail_sub *sub;
	struct buf line = { 0 };

	LIST_FOREACH(sub, &s->tail->subs, entry) {
		if (sub->pending || !sub->want[d])
			continue;  /* still reading the backlog: it reads this from the ring; or it asked for the other direction */
		if (!tail_sub_room(sub)) {
			sub->dropped[d] += n;
			continue;
		}
		if (sub->dropped[d] > 0) {  /* its own line, saying what it lost */
			tail_deliver(sub, d, off, p, n, now);
			continue;
		}
		if (buf_used(&line) == 0)
			tail_data_line(&line, s, d, off, p, n, now, 0);
		ctl_conn_send_line(sub->conn, buf_head(&line), buf_used(&line));
	}
	buf_free(&line);
}

void
tail_data(struct session *s, enum dir d, const void *p, size_t n)
{
	struct tail *t;
	struct tail_sub *sub;
	uint64_t off;
	double now;

	if (n == 0 || s->state == SESSION_CLOSED)
		return;
	t = tail_get(s);
	if (atomic_load_explicit(&t->watched, memory_order_acquire) == 0) {
		/* nobody else looks at an unwatched session's rings (subscribing pauses the shards) */
		off = t->ring[d].total;
		ring_append(&t->ring[d], t->max, p, n);
		tail_mark_add(t, d, off, n, capd_now());
		return;
	}
	capd_lock();
	/* a new subscriber's backlog goes before this chunk: if it gets all of it
	 * now, it gets the chunk live, else it reads the chunk from the ring later */
	LIST_FOREACH(sub, &t->subs, entry)
		if (sub->pending)
			tail_replay(sub, true);
	now = capd_now();
	off = t->ring[d].total;
	ring_append(&t->ring[d], t->max, p, n);
	tail_mark_add(t, d, off, n, now);

	/* in pieces: each notification is one line of base64, under RPC_MAX_LINE */
	for (size_t at = 0; at < n; at += TAIL_LIVE_PIECE)
		tail_publish(s, d, off + at, (const uint8_t *)p + at, n - at < TAIL_LIVE_PIECE ? n - at : TAIL_LIVE_PIECE,
		             now);
	capd_unlock();
}

bool
tail_can_skip(struct session *s, enum dir d)
{
	const struct tail *t = s->tail;

	/* a ring still growing would be laid out anew: skip only past a full one */
	return t != NULL && atomic_load_explicit(&t->watched, memory_order_acquire) == 0 &&
	       (t->max == 0 || t->ring[d].cap == t->max);
}

void
tail_skip(struct session *s, enum dir d, size_t n)
{
	struct tail_ring *r = &s->tail->ring[d];

	r->total += n;
	r->base = r->total;
}

void
tail_session_end(struct session *s)
{
	struct tail *t = s->tail;
	struct tail_sub *sub;

	if (t == NULL)
		return;
	/* no subscriber: nothing shared to tell, no lock to take */
	bool watched = atomic_load_explicit(&t->watched, memory_order_acquire) > 0;
	if (watched)
		capd_lock();
	while (watched && (sub = LIST_FIRST(&t->subs)) != NULL) {
		if (sub->pending)
			tail_replay(sub, false);
		/* what was lost is told even to a subscriber still behind: the notices are small */
		tail_tell_dropped(sub);
		ctl_conn_send(sub->conn, rpc_notification("session.end", json_pack("{s:I, s:s, s:I, s:I}", "id",
		                                          (json_int_t)s->id, "reason", s->reason ? s->reason : "closed",
		                                          "bytes_up", (json_int_t)s->bytes[DIR_UP],
		                                          "bytes_down", (json_int_t)s->bytes[DIR_DOWN])));
		ctl_conn_on_close_cancel(sub->conn, tail_sub_gone_cb, sub);
		tail_sub_free(sub);
	}
	if (watched)
		capd_unlock();
	for (int d = 0; d < 2; d++) {
		atomic_fetch_sub_explicit(&tail_ring_bytes, t->ring[d].cap, memory_order_relaxed);
		free(t->ring[d].buf);
	}
	free(t->marks);
	free(t);
	s->tail = NULL;
}

/* ---- events ---- */

bool
events_active(void)
{
	return atomic_load_explicit(&events_on, memory_order_relaxed);
}

void
events_emit(const char *event, json_t *obj)
{
	struct tail_sub *sub;
	json_t *o, *note;
	char t[40];

	if (LIST_EMPTY(&events_subs)) {
		json_decref(obj);
		return;
	}
	/* "event" and "time" first, the subject's fields beside them */
	o = json_pack("{s:s, s:s}", "event", event, "time", session_time(capd_now(), t, sizeof t));
	json_object_update_missing(o, obj);
	json_decref(obj);
	note = rpc_notification("event", o);
	LIST_FOREACH(sub, &events_subs, entry) {
		if (!tail_sub_room(sub)) {
			sub->dropped[0]++;
			continue;
		}
		tail_tell_dropped(sub);
		ctl_conn_send(sub->conn, json_incref(note));
	}
	json_decref(note);
}

int
events_subscribe(struct ctl_conn *c, char **why)
{
	struct tail_sub *sub;

	/* a second subscription would deliver every event twice on the one stream */
	LIST_FOREACH(sub, &events_subs, entry)
		if (sub->conn == c) {
			*why = xstrdup("this connection is subscribed to events already");
			return -1;
		}
	if (tail_sub_check(c, why) < 0)
		return -1;
	spool_follow_init();  /* capture.rotate comes from the spool's writer through it */
	sub = tail_sub_new(c, NULL);
	LIST_INSERT_HEAD(&events_subs, sub, entry);
	atomic_store(&events_on, true);
	return 0;
}

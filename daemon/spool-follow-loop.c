/*
 * Live pcapng for followers, the capture.rotate event and capture.sync's
 * answer, the loop's half; see spool-follow.h.
 *
 * An ev_async wakes the loop when the writer has queued records; the loop
 * takes the whole queue at once and gives every follower its own stream:
 * its section header, the IDBs it has been sent (numbered in its own order,
 * the EPBs' interface ids rewritten to match), and the packets of the
 * interfaces it follows. Those blocks wait in the follower's own queue and
 * are encoded a notification at a time as its connection drains, so the
 * loop never spends a whole take's encoding while the socket sits idle, and
 * never holds more than a few notifications of base64 for anyone. Each
 * follower is bounded like a tail subscriber: past FOLLOW_SUB_MAX queued
 * bytes it loses packets, counted and told in its next notification. A
 * capture.sync waits here for its mark to come back from the writer, behind
 * the blocks of every packet before it.
 */
#include "spool-follow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/utsname.h>

#include "base64.h"
#include "buf.h"
#include "capd.h"
#include "control.h"
#include "rpc.h"
#include "spool.h"
#include "tail.h"
#include "xmalloc.h"

/* Bytes queued for a follower (its packets not sent yet, and the base64 in
 * its connection) at which it loses packets: above one take of the writer's
 * queue (FOLLOW_Q_MAX, 32 MiB), which comes in one callback. The packets wait
 * as they are and only a few notifications' worth is encoded at a time, so
 * the connection stays far below its own bound (CTL_OUT_MAX, 64 MiB); when a
 * take was encoded into it at once, the bound had to be counted in base64 and
 * left room for a whole take, and a reader that kept up lost packets. */
#define FOLLOW_SUB_MAX (48u << 20)
#define FOLLOW_SUB_RESUME (8u << 20)   /* ... and below which it gets them again */
#define FOLLOW_NOTE_RETRY 0.25         /* a loss not yet told is retried this often */
#define FOLLOW_NOTE_MAX (256u << 10)   /* blocks batched into one notification */
#define FOLLOW_SEND_LOW (1u << 20)     /* encoded bytes in the connection below which the next notification is made */
#define FOLLOW_SNDBUF (4 << 20)        /* the follower's socket send buffer (as far as net.core.wmem_max lets) */
#define FOLLOW_END_WAIT 1.0            /* a removed instance's last packets reach its followers within this */
#define FOLLOW_ALL (-1)                /* follow_sub.iface: every interface */
#define SYNC_WAIT 10.0                 /* capture.sync gives up on a writer stuck this long (a hung disk) */

/* A follower: owned by follow_list; freed when its connection closes or its instance's follow ends. */
struct follow_sub {
	LIST_ENTRY(follow_sub) entry;
	struct ctl_conn *conn;     /* borrowed; on_close frees the follower */
	int iface;                 /* handle it follows, or FOLLOW_ALL */
	char *gone;                /* owned: the name of its instance, removed or failed; the follow ends */
	char *why;                 /* owned: ... and why, for capture.end */
	bool failed;               /* ... the instance failed (capctl exits 1), not removed */
	ev_timer end;              /* ... once the instance's last packets had time to come */
	int *fidx;                 /* handle -> IDB index in its stream, -1 not sent */
	int nfidx, nidb;
	struct buf pend;           /* blocks not sent yet: encoded as the connection drains (follow_pump) */
	uint64_t dropped;          /* packets lost since its last notification */
	bool dropping;
	bool ending;               /* capture.end goes once pend is out */
};

static LIST_HEAD(, follow_sub) follow_list = LIST_HEAD_INITIALIZER(follow_list);

/* A capture.sync waiting for its mark: owned by sync_list until it is answered. */
struct follow_sync {
	LIST_ENTRY(follow_sync) entry;
	unsigned seq;              /* its mark (spool_sync) */
	struct ctl_later *later;   /* the reply; safe to answer after its connection closed */
	ev_timer timeout;
};

static LIST_HEAD(, follow_sync) sync_list = LIST_HEAD_INITIALIZER(sync_list);
/* Each handle's IDB as the writer encoded it (empty: not seen yet). */
static struct buf *idb_table;
static int nidb_table;
/* Handles whose instance was removed: a new follower's head leaves them out,
 * as a new spool file does (their late packets still bring their IDB). */
static bool *idb_gone;
static int nidb_gone;
static ev_async follow_async;
static ev_timer follow_retry;          /* tells losses when no packet comes to carry them */
static bool follow_started;


static bool
follow_room(struct follow_sub *sub)
{
	size_t q = ctl_conn_queued(sub->conn) + buf_used(&sub->pend);

	if (sub->dropping) {
		if (q > FOLLOW_SUB_RESUME)
			return false;
		sub->dropping = false;
		return true;
	}
	if (q > FOLLOW_SUB_MAX) {
		sub->dropping = true;
		return false;
	}
	return true;
}

/* Bytes of whole blocks at the head of sub's queue for one notification:
 * up to FOLLOW_NOTE_MAX, at least one block (a reader may take each
 * notification's data as blocks). */
static size_t
follow_cut(const struct follow_sub *sub)
{
	const uint8_t *p = buf_head(&sub->pend);
	size_t n = buf_used(&sub->pend), at = 0;

	while (at + 8 <= n) {
		uint32_t blen;

		memcpy(&blen, p + at + 4, sizeof blen);  /* the block's total length, in host order as written */
		if (blen < 12 || blen > n - at)
			return n;  /* not a block boundary we wrote: send the rest as it is */
		if (at > 0 && at + blen > FOLLOW_NOTE_MAX)
			break;
		at += blen;
	}
	return at > 0 ? at : n;
}

/*
 * Sends n bytes of sub's queue as one capture.data notification, written
 * here rather than by jansson, whose dump of the base64 string (a byte at a
 * time, checked for escapes) took most of the loop's time: at 100 MB/s of
 * capture the loop fell behind and followers lost packets.
 */
static void
follow_send(struct follow_sub *sub, size_t n)
{
	static const char head[] = "{\"jsonrpc\":\"2.0\",\"method\":\"capture.data\",\"params\":{\"data\":\"";
	static struct buf line;  /* kept: one allocation for every notification */
	size_t len = base64_len(n);

	buf_reset(&line);
	buf_append(&line, head, sizeof head - 1);
	base64_encode((char *)buf_reserve(&line, len), buf_head(&sub->pend), n);
	buf_commit(&line, len);
	if (sub->dropped > 0)
		buf_printf(&line, "\",\"dropped\":%llu}}\n", (unsigned long long)sub->dropped);
	else
		buf_append(&line, "\"}}\n", 4);
	sub->dropped = 0;
	buf_consume(&sub->pend, n);
	ctl_conn_send_line(sub->conn, buf_head(&line), buf_used(&line));
}

/* Encodes and sends sub's queue while its connection has little waiting, so
 * the reader always has the next notification and capd holds no more base64
 * than that; the rest goes as the connection drains (follow_drain_cb). A
 * loss not told yet goes with the next one, or alone when the queue is
 * empty and the reader has caught up. */
static void
follow_pump(struct follow_sub *sub)
{
	if (ctl_conn_closing(sub->conn)) {
		buf_reset(&sub->pend);  /* nobody to send it to; on_close frees the follower */
		return;
	}
	while (ctl_conn_queued(sub->conn) < FOLLOW_SEND_LOW && !ctl_conn_closing(sub->conn)) {
		size_t n = follow_cut(sub);

		if (n == 0 && (sub->dropped == 0 || !follow_room(sub)))
			break;
		follow_send(sub, n);
	}
}

/* Appends handle h's IDB to sub's stream unless it is there; -1 when the IDB is not known. */
static int
follow_idb(struct follow_sub *sub, struct buf *b, int h)
{
	if (h >= sub->nfidx) {
		int n = h + 16;
		sub->fidx = xrealloc(sub->fidx, (size_t)n * sizeof *sub->fidx);
		for (int i = sub->nfidx; i < n; i++)
			sub->fidx[i] = -1;
		sub->nfidx = n;
	}
	if (sub->fidx[h] >= 0)
		return sub->fidx[h];
	if (h >= nidb_table || buf_used(&idb_table[h]) == 0)
		return -1;
	buf_append(b, buf_head(&idb_table[h]), buf_used(&idb_table[h]));
	return sub->fidx[h] = sub->nidb++;
}

static void
follow_packet(struct follow_sub *sub, int h, const uint8_t *epb, size_t len)
{
	uint32_t idx;
	size_t at;
	int i;

	if (sub->iface != FOLLOW_ALL && sub->iface != h)
		return;
	if (!follow_room(sub) || (i = follow_idb(sub, &sub->pend, h)) < 0) {
		sub->dropped++;
		return;
	}
	idx = (uint32_t)i;
	at = buf_used(&sub->pend);
	buf_append(&sub->pend, epb, len);
	memcpy(buf_head(&sub->pend) + at + 8, &idx, sizeof idx);  /* the EPB's interface id */
}

/* Sends what every follower's connection has room for; a loss that could
 * not be told yet (the follower still over its bound) is retried on a timer,
 * not left for a next packet that may never come. */
static void
follow_flush_all(void)
{
	struct follow_sub *sub;
	bool untold = false;

	LIST_FOREACH(sub, &follow_list, entry) {
		follow_pump(sub);
		untold |= sub->dropped > 0;
	}
	if (untold && !ev_is_active(&follow_retry)) {
		ev_timer_set(&follow_retry, FOLLOW_NOTE_RETRY, FOLLOW_NOTE_RETRY);
		ev_timer_start(capd_main, &follow_retry);
	} else if (!untold) {
		ev_timer_stop(capd_main, &follow_retry);
	}
}

static void
follow_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	follow_flush_all();
}

static void
follow_rotated(const char *path)
{
	json_t *o;

	if (!events_active())
		return;
	o = spool_status();
	json_object_set_new(o, "file", json_string(path));
	events_emit("capture.rotate", o);
}

/* Answers a capture.sync (m: the writer's word; NULL: it did not come in time) and frees it. */
static void
follow_sync_reply(struct follow_sync *fs, const struct frec_sync *m)
{
	char *msg;

	LIST_REMOVE(fs, entry);
	ev_timer_stop(capd_main, &fs->timeout);
	if (m != NULL && m->err == 0) {
		ctl_later_reply(fs->later, spool_status(), 0, NULL);
	} else {
		if (m == NULL)
			msg = xasprintf("the capture writer has not got this far in %.0f s (a slow or hung disk?); "
			                "what was queued is still on its way",
			                SYNC_WAIT);
		else if (m->failing)
			msg = xasprintf("cannot write the capture: %s; what was queued is counted as dropped "
			                "(capture status), capd tries again every second",
			                strerror(m->err));
		else
			msg = xasprintf("cannot write the capture: %llu %s queued before this went to no file "
			                "(%s) and %s counted as dropped; capd writes again now",
			                (unsigned long long)m->lost, m->lost == 1 ? "packet" : "packets",
			                strerror(m->err), m->lost == 1 ? "is" : "are");
		ctl_later_reply(fs->later, NULL, RPC_E_FAILED, msg);
		free(msg);
	}
	free(fs);
}

static void
follow_sync_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	follow_sync_reply(w->data, NULL);
}

void
spool_follow_sync(struct ctl_later *l)
{
	struct follow_sync *fs;
	unsigned seq;

	spool_follow_init();  /* the mark comes back through the hand-over */
	if ((seq = spool_sync()) == 0) {
		ctl_later_reply(l, NULL, RPC_E_FAILED, "capture is not running");
		return;
	}
	fs = xcalloc(1, sizeof *fs);
	fs->seq = seq;
	fs->later = l;
	ev_timer_init(&fs->timeout, follow_sync_timeout_cb, SYNC_WAIT, 0.);
	fs->timeout.data = fs;
	ev_timer_start(capd_main, &fs->timeout);
	LIST_INSERT_HEAD(&sync_list, fs, entry);
}

/* The writer got to mark m: its capture.sync is answered (unless it timed out). */
static void
follow_synced(const struct frec_sync *m)
{
	struct follow_sync *fs;

	LIST_FOREACH(fs, &sync_list, entry)
		if (fs->seq == m->seq) {
			follow_sync_reply(fs, m);
			return;
		}
}

/* Key lines that came in a row go to every follower in one Decryption
 * Secrets Block, ahead of the packets after them (a follower of one instance
 * too: a line does not say whose session it is). */
static void
follow_keys(struct buf *keys)
{
	struct follow_sub *sub;

	if (buf_used(keys) == 0)
		return;
	LIST_FOREACH(sub, &follow_list, entry)
		pcapng_dsb(&sub->pend, PCAPNG_SECRETS_TLS, buf_head(keys), buf_used(keys));
	buf_reset(keys);
}

static void
follow_async_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	static struct spool_follow_lost lost;  /* kept for its array; zero between calls */
	struct buf take, keys = { 0 };
	struct follow_sub *sub;
	bool synced = false;

	(void)loop; (void)w; (void)revents;
	spool_follow_take(&take, &lost);
	for (int h = 0; h < lost.len; h++) {
		if (lost.n[h] == 0)
			continue;
		LIST_FOREACH(sub, &follow_list, entry)
			if (sub->iface == FOLLOW_ALL || sub->iface == h)
				sub->dropped += lost.n[h];
		lost.n[h] = 0;
	}
	for (size_t off = 0; off + sizeof(struct frec) <= buf_used(&take);) {
		struct frec r;
		const uint8_t *p = buf_head(&take) + off + sizeof r;

		memcpy(&r, buf_head(&take) + off, sizeof r);
		off += sizeof r + r.len;
		switch (r.type) {
		case FREC_IDB:
			if (r.iface >= nidb_table) {
				int n = r.iface + 16;
				idb_table = xrealloc(idb_table, (size_t)n * sizeof *idb_table);
				memset(idb_table + nidb_table, 0, (size_t)(n - nidb_table) * sizeof *idb_table);
				nidb_table = n;
			}
			buf_reset(&idb_table[r.iface]);
			buf_append(&idb_table[r.iface], p, r.len);
			/* a handle given again (spool_iface_new): followers get the new interface's IDB */
			if (r.iface < nidb_gone)
				idb_gone[r.iface] = false;
			LIST_FOREACH(sub, &follow_list, entry)
				if (r.iface < sub->nfidx)
					sub->fidx[r.iface] = -1;
			break;
		case FREC_EPB:
			follow_keys(&keys);
			LIST_FOREACH(sub, &follow_list, entry)
				follow_packet(sub, r.iface, p, r.len);
			break;
		case FREC_KEYS:
			buf_append(&keys, p, r.len);
			break;
		case FREC_ROTATE:
			follow_rotated((const char *)p);
			break;
		case FREC_SYNC:
			synced = true;
			break;
		}
	}
	follow_keys(&keys);
	buf_free(&keys);
	follow_flush_all();
	/* after the packets: a follower's queue has the blocks before a mark when its sync is answered */
	for (size_t off = 0; synced && off + sizeof(struct frec) <= buf_used(&take);) {
		struct frec r;
		struct frec_sync m;

		memcpy(&r, buf_head(&take) + off, sizeof r);
		if (r.type == FREC_SYNC) {
			memcpy(&m, buf_head(&take) + off + sizeof r, sizeof m);
			follow_synced(&m);
		}
		off += sizeof r + r.len;
	}
	buf_free(&take);
}

/* Runs on the writer thread: ev_async_send is the one libev call made for other threads. */
static void
follow_wake(void)
{
	ev_async_send(capd_main, &follow_async);
}

void
spool_follow_init(void)
{
	if (follow_started)
		return;
	ev_async_init(&follow_async, follow_async_cb);
	ev_async_start(capd_main, &follow_async);
	ev_unref(capd_main);  /* followers alone do not keep capd running */
	ev_init(&follow_retry, follow_retry_cb);
	follow_started = true;
	spool_follow_start(follow_wake);
}

static void
follow_gone_cb(void *arg)
{
	struct follow_sub *sub = arg;

	LIST_REMOVE(sub, entry);
	if (LIST_EMPTY(&follow_list))
		ev_timer_stop(capd_main, &follow_retry);
	spool_follow_count(-1);
	if (sub->iface != FOLLOW_ALL)
		spool_iface_hold(sub->iface, -1);
	ev_timer_stop(capd_main, &sub->end);
	ctl_conn_on_drain(sub->conn, NULL, NULL);
	free(sub->gone);
	free(sub->why);
	buf_free(&sub->pend);
	free(sub->fidx);
	free(sub);
}

/* The followed instance is gone and its queue is out: capture.end, upon
 * which capctl ends the stream (a follow of nothing would hang silent). */
static void
follow_end(struct follow_sub *sub)
{
	json_t *p;

	p = json_pack("{s:s, s:s}", "instance", sub->gone, "reason", sub->why);
	if (sub->failed)
		json_object_set_new(p, "failed", json_true());
	ctl_conn_send(sub->conn, rpc_notification("capture.end", p));
	/* the follow is over: a peer that half-closed after asking for it gets the close */
	ctl_conn_on_close_cancel(sub->conn, follow_gone_cb, sub);
	follow_gone_cb(sub);
}

/* The followed instance is gone: what came of it goes out, then capture.end. */
static void
follow_end_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct follow_sub *sub = w->data;

	(void)loop; (void)revents;
	follow_pump(sub);
	if (buf_used(&sub->pend) == 0)
		follow_end(sub);
	else
		sub->ending = true;  /* the rest as the reader takes it (follow_drain_cb) */
}

/* sub's reader took some of its connection's queue: the next notifications. */
static void
follow_drain_cb(void *arg)
{
	struct follow_sub *sub = arg;

	follow_pump(sub);
	if (sub->ending && buf_used(&sub->pend) == 0)
		follow_end(sub);
}

/* Ends the follows of handle iface (its instance, name, is gone: why) once its last packets came. */
static void
follow_end_later(int iface, const char *name, const char *why, bool failed)
{
	struct follow_sub *sub;

	LIST_FOREACH(sub, &follow_list, entry)
		if (sub->iface == iface && sub->gone == NULL) {
			sub->gone = xstrdup(name);
			sub->why = xstrdup(why);
			sub->failed = failed;
			/* its sessions' (or sniffer's) last packets are still on their way through the writer */
			ev_timer_set(&sub->end, FOLLOW_END_WAIT, 0.);
			ev_timer_start(capd_main, &sub->end);
		}
}

void
spool_follow_iface_removed(int iface, const char *name)
{
	if (iface >= nidb_gone) {
		int n = iface + 16;
		idb_gone = xrealloc(idb_gone, (size_t)n * sizeof *idb_gone);
		memset(idb_gone + nidb_gone, 0, (size_t)(n - nidb_gone) * sizeof *idb_gone);
		nidb_gone = n;
	}
	if (iface >= 0)
		idb_gone[iface] = true;
	follow_end_later(iface, name, "instance removed", false);
}

void
spool_follow_iface_failed(int iface, const char *name, const char *why)
{
	char *reason = xasprintf("instance failed: %s", why);

	follow_end_later(iface, name, reason, true);
	free(reason);
}

json_t *
spool_follow_subscribe(struct ctl_conn *c, int iface, char **why)
{
	struct follow_sub *sub;
	struct buf head = { 0 };
	struct utsname u;
	char os[160] = "";
	json_t *j;

	/* capture.data names no follow: a second stream on the connection would
	 * interleave its blocks with the first's, which no reader could part */
	LIST_FOREACH(sub, &follow_list, entry)
		if (sub->conn == c) {
			*why = xstrdup("this connection follows the capture already");
			return NULL;
		}
	spool_follow_init();
	sub = xcalloc(1, sizeof *sub);
	sub->conn = c;
	sub->iface = iface < 0 ? FOLLOW_ALL : iface;
	if (sub->iface != FOLLOW_ALL)
		spool_iface_hold(sub->iface, 1);  /* its handle goes to no other interface while it follows */
	ev_init(&sub->end, follow_end_cb);
	sub->end.data = sub;
	if (uname(&u) == 0)
		snprintf(os, sizeof os, "%s %s", u.sysname, u.release);
	pcapng_shb(&head, NULL, os[0] ? os : NULL, "capd " CAPD_VERSION);
	/* the interfaces seen so far; later ones come with their first packet */
	for (int h = 0; h < nidb_table; h++)
		if ((iface < 0 || h == iface) && buf_used(&idb_table[h]) > 0 && !(h < nidb_gone && idb_gone[h]))
			follow_idb(sub, &head, h);
	j = base64_json(buf_head(&head), buf_used(&head));
	buf_free(&head);
	LIST_INSERT_HEAD(&follow_list, sub, entry);
	ctl_conn_on_close(c, follow_gone_cb, sub);
	ctl_conn_on_drain(c, follow_drain_cb, sub);
	ctl_conn_stream_buffer(c, FOLLOW_SNDBUF);
	spool_follow_count(1);
	return j;
}

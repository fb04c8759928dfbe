/*
 * Live pcapng for followers, the capture.rotate event and capture.sync's
 * answer, the writer's half: the queue the spool's writer thread fills;
 * spool-follow-loop.c empties it on the loop thread. (Two files so that
 * spool.c, and whatever links it, does not pull in the control server.)
 *
 * The writer thread appends records (an interface's IDB the first time it is
 * used, each EPB, each key log line, each new file, each capture.sync mark
 * it reaches) to fq under a mutex and calls the loop side's wake function.
 * The queue is bounded: past FOLLOW_Q_MAX packets are dropped for the
 * followers (counted); the writer never waits.
 */
#include "spool-follow.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "xmalloc.h"

#define FOLLOW_Q_MAX (32u << 20)  /* records waiting for the loop; beyond, packets drop (8 MiB lost parts of a 2 x 3 MB burst to a fast reader) */

/* Shared between the writer and the loop, under mu. */
static struct {
	pthread_mutex_t mu;
	struct buf recs;
	struct spool_follow_lost dropped;  /* packets the queue had no room for */
} fq = { .mu = PTHREAD_MUTEX_INITIALIZER };

static atomic_int follow_count;    /* followers (the loop writes, the writer reads) */
static void (*_Atomic follow_wake)(void);  /* set by the loop side: records may be queued */

/* Writer thread only: interfaces whose IDB went into the queue. */
static bool *w_told;
static int w_ntold;

/* Adds n to lost's count of handle h, growing it to fit. */
static void
lost_add(struct spool_follow_lost *lost, int h, uint64_t n)
{
	if (h >= lost->len) {
		int len = h + 16;
		lost->n = xrealloc(lost->n, (size_t)len * sizeof *lost->n);
		memset(lost->n + lost->len, 0, (size_t)(len - lost->len) * sizeof *lost->n);
		lost->len = len;
	}
	lost->n[h] += n;
}

/* ---- writer thread ---- */

bool
spool_follow_wanted(void)
{
	return atomic_load_explicit(&follow_count, memory_order_relaxed) > 0;
}

/* Starts a record in fq.recs (under mu); returns its offset for fq_end. */
static size_t
fq_begin(uint32_t type, int iface)
{
	struct frec r = { .type = type, .iface = iface };
	size_t at = buf_used(&fq.recs);

	buf_append(&fq.recs, &r, sizeof r);
	return at;
}

static void
fq_end(size_t at)
{
	uint32_t len = (uint32_t)(buf_used(&fq.recs) - at - sizeof(struct frec));

	memcpy(buf_head(&fq.recs) + at + offsetof(struct frec, len), &len, sizeof len);
}

static void
fq_wake(void)
{
	void (*wake)(void) = atomic_load(&follow_wake);

	if (wake != NULL)
		wake();
}

void
spool_follow_packet(int iface, const struct pcapng_idb *idb, const struct timespec *ts, const void *hdr,
                    size_t hdrlen, const void *data, size_t datalen, uint32_t origlen, uint32_t flags,
                    const char *comment)
{
	struct pcapng_epb e = {
		.iface = 0,  /* each follower's own index is written in on the loop */
		.ts = 0,
		.hdr = hdr,
		.hdrlen = hdrlen,
		.data = data,
		.datalen = datalen,
		.origlen = origlen,
		.flags = flags,
		.comment = comment,
	};
	size_t at;

	if (idb == NULL || iface < 0 || atomic_load(&follow_wake) == NULL)
		return;
	e.ts = pcapng_ts(ts, idb->tsnano);
	if (iface >= w_ntold) {
		int n = iface + 16;
		w_told = xrealloc(w_told, (size_t)n * sizeof *w_told);
		memset(w_told + w_ntold, 0, (size_t)(n - w_ntold) * sizeof *w_told);
		w_ntold = n;
	}
	pthread_mutex_lock(&fq.mu);
	if (buf_used(&fq.recs) > FOLLOW_Q_MAX) {
		lost_add(&fq.dropped, iface, 1);
		pthread_mutex_unlock(&fq.mu);
		return;
	}
	if (!w_told[iface]) {
		at = fq_begin(FREC_IDB, iface);
		pcapng_idb(&fq.recs, idb);
		fq_end(at);
		w_told[iface] = true;
	}
	at = fq_begin(FREC_EPB, iface);
	pcapng_epb(&fq.recs, &e);
	fq_end(at);
	pthread_mutex_unlock(&fq.mu);
	fq_wake();
}

/* Key lines are never dropped: they are few, and a follower without them
 * sees the rest of a TLS session's packets it cannot decrypt. */
void
spool_follow_iface_reused(int iface)
{
	if (iface >= 0 && iface < w_ntold)
		w_told[iface] = false;
}

void
spool_follow_keylog(const void *line, size_t n)
{
	size_t at;

	if (atomic_load(&follow_wake) == NULL)
		return;
	pthread_mutex_lock(&fq.mu);
	at = fq_begin(FREC_KEYS, -1);
	buf_append(&fq.recs, line, n);
	buf_append(&fq.recs, "\n", 1);
	fq_end(at);
	pthread_mutex_unlock(&fq.mu);
	fq_wake();
}

void
spool_follow_rotated(const char *dir, const char *name)
{
	size_t at;

	if (atomic_load(&follow_wake) == NULL)
		return;
	pthread_mutex_lock(&fq.mu);
	at = fq_begin(FREC_ROTATE, -1);
	buf_printf(&fq.recs, "%s/%s", dir ? dir : ".", name);
	buf_append(&fq.recs, "", 1);
	fq_end(at);
	pthread_mutex_unlock(&fq.mu);
	fq_wake();
}

void
spool_follow_synced(const struct frec_sync *m)
{
	size_t at;

	if (atomic_load(&follow_wake) == NULL)
		return;
	pthread_mutex_lock(&fq.mu);
	at = fq_begin(FREC_SYNC, -1);
	buf_append(&fq.recs, m, sizeof *m);
	fq_end(at);
	pthread_mutex_unlock(&fq.mu);
	fq_wake();
}

/* ---- the loop side's hooks ---- */

void
spool_follow_start(void (*wake)(void))
{
	atomic_store(&follow_wake, wake);
}

void
spool_follow_count(int delta)
{
	atomic_fetch_add(&follow_count, delta);
}

void
spool_follow_take(struct buf *out, struct spool_follow_lost *lost)
{
	pthread_mutex_lock(&fq.mu);
	*out = fq.recs;
	fq.recs = (struct buf){ 0 };
	for (int h = 0; h < fq.dropped.len; h++)
		if (fq.dropped.n[h] > 0) {
			lost_add(lost, h, fq.dropped.n[h]);
			fq.dropped.n[h] = 0;
		}
	pthread_mutex_unlock(&fq.mu);
}

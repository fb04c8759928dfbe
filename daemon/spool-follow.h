/*
 * Live pcapng for followers (capctl capture follow) and the capture.rotate
 * event. The spool's writer thread hands each packet it encodes, each TLS
 * key log line, each new file it opens, and each capture.sync mark it
 * reaches, to a small bounded queue here; an ev_async wakes the loop
 * thread, which sends the blocks to the followers as "capture.data"
 * notifications, emits the events and answers capture.sync. The writer
 * never waits: a full queue drops packets for the followers only (counted,
 * and told to them).
 */
#ifndef CAPD_SPOOL_FOLLOW_H
#define CAPD_SPOOL_FOLLOW_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "buf.h"
#include "pcapng.h"

struct ctl_conn;

/* ---- writer thread (spool.c) ---- */

/* True while someone follows: the writer skips the hand-over otherwise. */
bool spool_follow_wanted(void);
/* A packet of interface handle iface (idb describes it; NULL: unknown, skipped), as the spool writes it. */
void spool_follow_packet(int iface, const struct pcapng_idb *idb, const struct timespec *ts, const void *hdr,
                         size_t hdrlen, const void *data, size_t datalen, uint32_t origlen, uint32_t flags,
                         const char *comment);
/* An NSS key log line (n bytes, no newline): followers get it in a Decryption
 * Secrets Block ahead of the packets that come after it. */
void spool_follow_keylog(const void *line, size_t n);
/* The spool opened file name in folder dir: becomes a "capture.rotate" event. */
void spool_follow_rotated(const char *dir, const char *name);
/* The writer has handled every record queued before sync mark m->seq (spool_sync). */
struct frec_sync;
void spool_follow_synced(const struct frec_sync *m);

/* ---- loop thread: the queue's other end (spool-follow.c) ---- */

/* A queued record; len bytes follow: an encoded IDB or EPB (interface id 0), a file path with
 * its NUL, a struct frec_sync, or key log lines, each ending in a newline. */
enum { FREC_IDB, FREC_EPB, FREC_ROTATE, FREC_SYNC, FREC_KEYS };
struct frec_sync {
	uint32_t seq;
	int32_t err;       /* 0: all of it is in the file; else why not */
	uint64_t lost;     /* packets dropped since the mark before (counted as dropped) */
	bool failing;      /* the disk fails now: capture is being dropped */
};
struct frec {
	uint32_t type;
	int32_t iface;     /* the spool's interface handle */
	uint32_t len;
};

/* Lets records be queued; wake is called (on the writer thread) when there are some. */
void spool_follow_start(void (*wake)(void));
/* Followers came (+1) or went (-1). */
void spool_follow_count(int delta);
/* Packets lost to a full queue, per interface handle: a follower of one
 * instance is told only of its own. */
struct spool_follow_lost {
	uint64_t *n;       /* n[h]: packets of handle h */
	int len;
};
/* Takes everything queued (records, see spool-follow.c) into *out, and adds
 * the packets lost since to *lost (grown to fit). */
void spool_follow_take(struct buf *out, struct spool_follow_lost *lost);

/* ---- loop thread: followers (spool-follow-loop.c) ---- */

/* Starts the hand-over (the ev_async); called before the first follower or event subscriber. */
void spool_follow_init(void);
/* capture.sync: replies to l with the capture status once the writer has
 * written all that was queued before now (followers' queues have it first);
 * with an error when some of it went to no file (frec_sync), when capture is
 * off, or when the writer has not got there within SYNC_WAIT seconds. */
struct ctl_later;
void spool_follow_sync(struct ctl_later *l);
/* capture.follow: c follows interface handle iface (-1: all). Returns the stream's head
 * (section header and known interfaces) as a JSON string of base64 (caller owns), or
 * NULL with *why (owned). */
json_t *spool_follow_subscribe(struct ctl_conn *c, int iface, char **why);
/* Interface handle iface's instance (name) was removed: its followers get its
 * last packets, then capture.end. */
void spool_follow_iface_removed(int iface, const char *name);
/* Writer thread: handle iface was given to a new interface, whose IDB followers must get. */
void spool_follow_iface_reused(int iface);
/* Interface handle iface's instance (name) failed (why): a sniffer whose
 * interface went away captures nothing more, so its followers get its last
 * packets, then capture.end saying so. */
void spool_follow_iface_failed(int iface, const char *name, const char *why);

#endif

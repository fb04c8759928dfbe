/*
 * The capture spool: rotating pcapng files. The event loop only enqueues
 * small records (flow open, data, FIN, RST, datagram, raw packet); a writer
 * thread turns them into synthetic packets and writes whole blocks, so a
 * slow or full disk costs dropped capture, never a stalled relay.
 */
#ifndef CAPD_SPOOL_H
#define CAPD_SPOOL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#include "session.h"
#include "spool-synth.h"

struct capd_settings;

/* Opens the spool folder and starts the writer thread. */
int spool_start(const struct capd_settings *st, char **why);
/* Applies rotation settings from a reload. */
void spool_reconfigure(const struct capd_settings *st);
/* Flushes what is queued and joins the writer. */
void spool_stop(void);

/*
 * One pcapng interface per instance. linktype: LINKTYPE_RAW (101) for proxies.
 * A name registered before in this run (an instance removed and added again)
 * gets a description that tells it from the earlier ones. A removed
 * interface's handle is given to a later one once the writer is done with it
 * (its flows closed, a new file begun), so the tables stay the size of what
 * is live, not of every instance capd ever ran.
 */
int spool_iface_add(const char *name, const char *description, int linktype, unsigned snaplen, bool tsnano);
/*
 * The same for a sniffer, as dumpcap writes an interface: its IDBs carry its
 * capture filter (if_filter, NULL for none), and each file it is in ends with
 * an ISB of its counters, the last spool_iface_stats() gave.
 */
int spool_iface_add_sniffer(const char *name, const char *description, int linktype, unsigned snaplen,
                            bool tsnano, const char *filter);
/* A sniffer's counts since it started: the kernel's drops, and the packets
 * the spool's queue refused (the writer counts the rest itself). */
void spool_iface_stats(int iface, uint64_t kernel_drop, uint64_t queue_drop);
void spool_iface_remove(int iface);
/* Someone follows handle iface (delta 1) or stopped (-1): a removed
 * interface's handle is given to a new one only once nobody follows it. */
void spool_iface_hold(int iface, int delta);
/* Packets of the interface the writer could not write (a failing disk, no
 * file), besides those the queue refused, which spool_packet() reports. */
uint64_t spool_iface_dropped(int iface);

/* A capture flow for one session. proto is IPPROTO_TCP or IPPROTO_UDP. Caller owns the flow
 * until spool_flow_close(), which frees it. */
struct spool_flow *spool_flow_open(int iface, uint64_t session_id, int proto,
                                   const struct sockaddr *client, const struct sockaddr *target,
                                   const char *comment);
/* spool_flow_open of a TCP connection the target opened toward capd (a SOCKS
 * BIND peer): the capture shows the target's SYN first. */
struct spool_flow *spool_flow_open_inbound(int iface, uint64_t session_id, const struct sockaddr *client,
                                           const struct sockaddr *target, const char *comment);
/* TCP: stream bytes in one direction; UDP: one datagram. */
void spool_flow_data(struct spool_flow *f, enum dir d, const void *p, size_t n);
/*
 * A slot of queue memory: a TCP direction's next bytes are read straight
 * into the capture queue (and may be sent from there) instead of being
 * copied in by spool_flow_data().
 */
struct spool_slot {
	void *rec;          /* the claimed record; NULL once committed */
	size_t cap;
	bool wake;          /* the writer is woken at commit */
};

/*
 * Room for up to n bytes of d; NULL when nothing is captured or the queue
 * is full (the caller reads into its own buffer and calls spool_flow_data,
 * which counts the drop). The writer reads none of it, and later records
 * wait behind it, until spool_flow_commit(slot, bytes) with the bytes
 * filled in (0: none); the caller commits before it returns to its loop.
 */
void *spool_flow_reserve(struct spool_flow *f, enum dir d, size_t n, struct spool_slot *slot);
void spool_flow_commit(struct spool_slot *slot, size_t n);
/*
 * TCP: n bytes of d crossed but capd never saw them (a traced program moved
 * them where the tracer cannot read): the sequence numbers skip them, so the
 * capture shows a gap (tshark: previous segment not captured), not a stream
 * that looks whole.
 */
void spool_flow_lost(struct spool_flow *f, enum dir d, size_t n);
/* TCP: FIN from the source of direction d. */
void spool_flow_fin(struct spool_flow *f, enum dir d);
/* Ends the flow (FINs, or a RST from the side that reset) and frees f. */
void spool_flow_close(struct spool_flow *f, enum synth_end how);

/* A captured packet (sniffers): caplen bytes of a packet origlen long; false
 * when the queue refused it (counted in the spool's drops too). */
bool spool_packet(int iface, const struct timespec *ts, const void *p, size_t caplen, size_t origlen);
/* Adds an NSS key log line to the next Decryption Secrets Block. */
void spool_keylog(const char *line);

/* capd switches to uid and gid: the spool's tail guard process, forked as
 * root, switches too. Main thread, before capd's own switch. */
void spool_guard_user(uid_t uid, gid_t gid);

json_t *spool_status(void);  /* caller owns: {"file","files","bytes","packets","dropped_packets","dropped_bytes"} */
/*
 * capture.rotate: asks the writer for a new file and returns the request's
 * number (0: capture is not running); spool_rotated() then says whether it
 * was made: 1 made, 0 not yet, -1 none could be (why, caller frees).
 * spool_rotate() asks and waits up to ROTATE_WAIT_SECS, blocking: for the
 * unit tests; the RPC polls from the loop instead.
 */
unsigned spool_rotate_request(void);
int spool_rotated(unsigned want, char **why);
int spool_rotate(char **why);
#define ROTATE_WAIT_SECS 5  /* how long capture.rotate waits for the new file */
/*
 * capture.sync: queues a mark behind every record queued so far, by any
 * thread. The writer, reaching it, writes out everything before it (key
 * lines too) and reports it with spool_follow_synced(). Loop thread;
 * returns the mark's number, 0 when capture is off.
 */
unsigned spool_sync(void);

#endif

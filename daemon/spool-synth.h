/*
 * Streams to packets: turns a proxied TCP byte stream or UDP datagrams into
 * the IPv4/IPv6 packets a capture between the real client and the real
 * target would have shown (LINKTYPE_RAW), with valid checksums and sequence
 * numbers, so Wireshark's Follow TCP Stream gives back exactly the bytes
 * that crossed. Pure computation: packets go to a callback, no I/O here.
 */
#ifndef CAPD_SPOOL_SYNTH_H
#define CAPD_SPOOL_SYNTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Directions, the same values as enum dir in session.h. */
#define SYNTH_UP 0    /* client to target */
#define SYNTH_DOWN 1  /* target to client */

/*
 * Largest TCP payload per segment: the whole IP packet stays within 65535
 * bytes (IPv4 20 + TCP 20, IPv6 40 + TCP 20), what loopback itself produces,
 * so a relay chunk of 64 KiB becomes two segments and no packet exceeds the
 * 65535 snaplen readers assume for LINKTYPE_RAW.
 */
#define SYNTH_MSS4 65495
#define SYNTH_MSS6 65475
/*
 * Largest UDP payload: what the 16-bit length fields allow (IPv4's total
 * length, UDP's length); longer datagrams are cut (see synth_data). An IPv6
 * datagram past 65487 bytes is whole but would not fit one packet within
 * 65535 bytes: it is written as IPv6 fragments of at most SYNTH_FRAG6
 * bytes after the fixed and fragment headers, as a stack sends it over a
 * link that takes no more, so no packet passes that snaplen either.
 */
#define SYNTH_UDP_MAX4 65507
#define SYNTH_UDP_MAX6 65527
#define SYNTH_FRAG6 65480  /* a multiple of 8, and 40 + 8 + 65480 <= 65535 */

/* One synthetic packet: IP and transport header in hdr, payload in data. */
struct synth_pkt {
	int dir;              /* SYNTH_UP or SYNTH_DOWN: who sent it */
	const uint8_t *hdr;
	size_t hdrlen;
	const void *data;
	size_t datalen;
	size_t truncated_from;  /* UDP: the datagram's real length when cut, else 0 */
	size_t truncated_to;    /* ... and what of it the capture keeps (over two fragments in IPv6) */
};

typedef void synth_emit_fn(void *arg, const struct synth_pkt *pkt);

/* The state of one flow. Owned by whoever embeds it (the spool writer); no heap. */
struct synth_flow {
	int proto;            /* IPPROTO_TCP or IPPROTO_UDP */
	int family;           /* AF_INET, or AF_INET6 (also when the endpoints' families mix) */
	uint8_t addr[2][16];  /* [SYNTH_UP] client, [SYNTH_DOWN] target; 4 bytes for AF_INET */
	uint16_t port[2];     /* host order */
	uint32_t seq[2];      /* next sequence number the client / the target sends */
	uint16_t ipid[2];
	uint32_t fragid[2];   /* IPv6: the next fragment identification of the client / the target */
	bool opened;          /* handshake written */
	bool inbound;         /* the target opened the connection (a SOCKS BIND peer): its SYN comes first */
	bool fin[2];          /* FIN sent by the client / the target */
	bool closed;          /* RST or final FINs written: nothing more */
	bool nocsum;          /* leave checksums zero: the packets are being counted, not kept */
	synth_emit_fn *emit;
	void *arg;
};

/*
 * Sets up a flow between client and target (AF_INET or AF_INET6; v4-mapped
 * IPv6 counts as IPv4). isn: initial sequence numbers of client and target.
 * -1 for other address families.
 */
int synth_flow_init(struct synth_flow *sf, int proto, const struct sockaddr *client,
                    const struct sockaddr *target, uint32_t isn_client, uint32_t isn_target,
                    synth_emit_fn *emit, void *arg);

/* TCP: SYN, SYN-ACK, ACK (from the target first when inbound). Nothing for UDP. */
void synth_open(struct synth_flow *sf);
/*
 * TCP: n stream bytes sent by dir's source, cut into segments, then an ACK
 * from the other side. UDP: one datagram (cut to SYNTH_UDP_MAX*, with
 * truncated_from set so the caller can say so), in fragments when it is
 * longer than one IPv6 packet holds.
 */
void synth_data(struct synth_flow *sf, int dir, const void *p, size_t n);
/*
 * synth_data() with the payload sums computed already, one per segment of
 * synth_mss() bytes (the last one shorter): synth_sum() of each, or NULL.
 * A producer that has the bytes in its cache sums them there, and the
 * writer reads them once, when it writes them.
 */
void synth_data_summed(struct synth_flow *sf, int dir, const void *p, size_t n, const uint16_t *sums);
/* The TCP segment size of a flow between client and target, as synth_flow_init() would set it up. */
size_t synth_mss(const struct sockaddr *client, const struct sockaddr *target);
/* The one's complement sum of p[0..n), folded to 16 bits, not complemented, for synth_data_summed(). */
uint16_t synth_sum(const void *p, size_t n);
/* TCP: n bytes from dir's source that were not captured; later segments stay in sequence. */
void synth_gap(struct synth_flow *sf, int dir, uint64_t n);
/* TCP: FIN from dir's source and the other side's ACK. */
void synth_fin(struct synth_flow *sf, int dir);
/* How a TCP flow ends: a FIN from each side that has not sent one, or a RST
 * from one side; or nothing more (SYNTH_END_NONE): a side whose close capd
 * never saw gets none invented (a refused request's client that went on on
 * the same connection in another session, or that never closed). */
enum synth_end { SYNTH_END_FIN, SYNTH_END_RST_TARGET, SYNTH_END_RST_CLIENT, SYNTH_END_NONE };
void synth_close(struct synth_flow *sf, enum synth_end how);

/* How many packets synth_data() makes of n bytes of a flow whose synth_mss()
 * is mss (which says IPv4 or IPv6), for counting what is dropped. */
uint64_t synth_count(int proto, size_t mss, size_t n);

#endif

/*
 * Streams to packets; see spool-synth.h. Headers are built on the stack and
 * handed to the callback beside the caller's payload, so the payload is only
 * read here (for the checksum), never copied.
 */
#include "spool-synth.h"

#include <netinet/in.h>
#include <string.h>

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

#define TCP_WSCALE 7        /* advertised in the SYNs so windows read as 8 MiB, above any burst */
#define HDR_MAX (40 + 20 + 40)

static inline void
put16be(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void
put32be(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/*
 * One's-complement sum (RFC 1071) in host order, folded later; it is
 * byte-order independent as long as each piece starts at an even offset of
 * the checksummed span, which holds for every header size.
 *
 * The payload (nearly all the writer's work under bulk load) is summed as
 * 16-bit words into the 32-bit lanes of two 16-byte vectors: no carries to
 * chase, so the additions run side by side (SSE2 on x86-64, NEON on arm64,
 * plain integers elsewhere). A lane takes two words below 2^16 per step, so
 * it cannot overflow within CSUM_BLOCK bytes; each block is folded into the
 * 64-bit sum.
 */
typedef uint32_t csum_v4 __attribute__((vector_size(16)));

#define CSUM_BLOCK (64u << 10)   /* 2048 steps of 32 bytes: lanes stay below 2^29 */

static uint64_t
csum_add64(uint64_t sum, uint64_t v)
{
	sum += v;
	return sum + (sum < v);  /* end-around carry */
}

static uint64_t
csum_add(uint64_t sum, const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t v;

	while (n >= 32) {
		size_t blk = n < CSUM_BLOCK ? n & ~(size_t)31 : CSUM_BLOCK;
		csum_v4 a = { 0 }, c = { 0 }, x, y;
		const csum_v4 lo = { 0xffff, 0xffff, 0xffff, 0xffff };

		for (size_t i = 0; i < blk; i += 32) {
			memcpy(&x, b + i, 16);
			memcpy(&y, b + i + 16, 16);
			a += (x & lo) + (x >> 16);
			c += (y & lo) + (y >> 16);
		}
		a += c;
		sum = csum_add64(sum, (uint64_t)a[0] + a[1] + a[2] + a[3]);
		b += blk;
		n -= blk;
	}
	while (n >= 8) {
		memcpy(&v, b, 8);
		sum = csum_add64(sum, v);
		b += 8;
		n -= 8;
	}
	if (n > 0) {
		v = 0;
		memcpy(&v, b, n);
		sum = csum_add64(sum, v);
	}
	return sum;
}

/* Folds a sum to 16 bits and complements it, ready to store with memcpy. */
static uint16_t
csum_fold(uint64_t sum)
{
	sum = (sum & 0xffffffffu) + (sum >> 32);
	sum = (sum & 0xffffffffu) + (sum >> 32);
	sum = (sum & 0xffffu) + (sum >> 16);
	sum = (sum & 0xffffu) + (sum >> 16);
	return (uint16_t)~sum;
}

/* Reads an endpoint; a v4-mapped IPv6 address counts as IPv4. */
static int
endpoint(const struct sockaddr *sa, uint8_t addr[16], uint16_t *port)
{
	static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;

		memcpy(addr, &sin->sin_addr, 4);
		*port = ntohs(sin->sin_port);
		return AF_INET;
	}
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;

		*port = ntohs(sin6->sin6_port);
		if (memcmp(&sin6->sin6_addr, mapped, 12) == 0) {
			memcpy(addr, (const uint8_t *)&sin6->sin6_addr + 12, 4);
			return AF_INET;
		}
		memcpy(addr, &sin6->sin6_addr, 16);
		return AF_INET6;
	}
	return -1;
}

int
synth_flow_init(struct synth_flow *sf, int proto, const struct sockaddr *client,
                const struct sockaddr *target, uint32_t isn_client, uint32_t isn_target,
                synth_emit_fn *emit, void *arg)
{
	int fam[2];

	memset(sf, 0, sizeof *sf);
	fam[SYNTH_UP] = endpoint(client, sf->addr[SYNTH_UP], &sf->port[SYNTH_UP]);
	fam[SYNTH_DOWN] = endpoint(target, sf->addr[SYNTH_DOWN], &sf->port[SYNTH_DOWN]);
	if (fam[0] < 0 || fam[1] < 0)
		return -1;
	if (fam[0] == fam[1]) {
		sf->family = fam[0];
	} else {
		/* Mixed families: both as IPv6, the IPv4 one as ::ffff:a.b.c.d. */
		sf->family = AF_INET6;
		for (int i = 0; i < 2; i++) {
			if (fam[i] != AF_INET)
				continue;
			memmove(sf->addr[i] + 12, sf->addr[i], 4);
			memset(sf->addr[i], 0, 10);
			sf->addr[i][10] = sf->addr[i][11] = 0xff;
		}
	}
	sf->proto = proto;
	sf->seq[SYNTH_UP] = isn_client;
	sf->seq[SYNTH_DOWN] = isn_target;
	sf->ipid[SYNTH_UP] = (uint16_t)isn_client;
	sf->ipid[SYNTH_DOWN] = (uint16_t)isn_target;
	sf->fragid[SYNTH_UP] = isn_client;
	sf->fragid[SYNTH_DOWN] = isn_target;
	sf->emit = emit;
	sf->arg = arg;
	return 0;
}

static size_t
ip_hdrlen(const struct synth_flow *sf)
{
	return sf->family == AF_INET ? 20 : 40;
}

/* Writes the IP header for l4len bytes of transport header and payload. */
static void
ip_header(struct synth_flow *sf, int dir, uint8_t *h, size_t l4len)
{
	if (sf->family == AF_INET) {
		uint16_t sum;

		h[0] = 0x45;
		h[1] = 0;
		put16be(h + 2, (uint16_t)(20 + l4len));
		put16be(h + 4, sf->ipid[dir]++);
		put16be(h + 6, 0x4000);  /* DF */
		h[8] = 64;
		h[9] = (uint8_t)sf->proto;
		h[10] = h[11] = 0;
		memcpy(h + 12, sf->addr[dir], 4);
		memcpy(h + 16, sf->addr[!dir], 4);
		sum = sf->nocsum ? 0 : csum_fold(csum_add(0, h, 20));
		memcpy(h + 10, &sum, 2);
		return;
	}
	put32be(h, 0x60000000u);
	put16be(h + 4, (uint16_t)l4len);
	h[6] = (uint8_t)sf->proto;
	h[7] = 64;
	memcpy(h + 8, sf->addr[dir], 16);
	memcpy(h + 24, sf->addr[!dir], 16);
}

/* The transport checksum over the pseudo-header, l4 header and payload. */
static uint16_t
l4_csum(const struct synth_flow *sf, int dir, const uint8_t *l4, size_t l4hlen,
        const void *data, size_t n, const uint16_t *psum)
{
	uint8_t ph[40];
	size_t phlen;
	size_t len = l4hlen + n;
	uint64_t sum;

	if (sf->family == AF_INET) {
		memcpy(ph, sf->addr[dir], 4);
		memcpy(ph + 4, sf->addr[!dir], 4);
		ph[8] = 0;
		ph[9] = (uint8_t)sf->proto;
		put16be(ph + 10, (uint16_t)len);
		phlen = 12;
	} else {
		memcpy(ph, sf->addr[dir], 16);
		memcpy(ph + 16, sf->addr[!dir], 16);
		put32be(ph + 32, (uint32_t)len);
		ph[36] = ph[37] = ph[38] = 0;
		ph[39] = (uint8_t)sf->proto;
		phlen = 40;
	}
	sum = csum_add(0, ph, phlen);
	sum = csum_add(sum, l4, l4hlen);
	sum = psum != NULL ? csum_add64(sum, *psum) : csum_add(sum, data, n);
	return csum_fold(sum);
}

/* One TCP segment from dir's source; advances its sequence number. psum: the payload's sum, or NULL. */
static void
tcp_segment(struct synth_flow *sf, int dir, uint8_t flags, const void *data, size_t n, const uint16_t *psum)
{
	static const uint8_t synopts[8] = { 2, 4, 0, 0, 1, 3, 3, TCP_WSCALE };
	uint8_t h[HDR_MAX];
	size_t iphl = ip_hdrlen(sf);
	size_t thl = (flags & TH_SYN) ? 28 : 20;
	uint8_t *t = h + iphl;
	struct synth_pkt pkt;

	put16be(t, sf->port[dir]);
	put16be(t + 2, sf->port[!dir]);
	put32be(t + 4, sf->seq[dir]);
	put32be(t + 8, (flags & TH_ACK) ? sf->seq[!dir] : 0);
	t[12] = (uint8_t)((thl / 4) << 4);
	t[13] = flags;
	put16be(t + 14, 0xffff);
	t[16] = t[17] = 0;
	t[18] = t[19] = 0;
	if (flags & TH_SYN) {
		memcpy(t + 20, synopts, sizeof synopts);
		put16be(t + 22, sf->family == AF_INET ? SYNTH_MSS4 : SYNTH_MSS6);
	}
	ip_header(sf, dir, h, thl + n);
	if (!sf->nocsum) {
		uint16_t sum = l4_csum(sf, dir, t, thl, data, n, psum);

		memcpy(t + 16, &sum, 2);
	}
	pkt = (struct synth_pkt){ .dir = dir, .hdr = h, .hdrlen = iphl + thl, .data = data, .datalen = n };
	sf->emit(sf->arg, &pkt);
	sf->seq[dir] += (uint32_t)n + ((flags & (TH_SYN | TH_FIN)) ? 1 : 0);
}

/*
 * A UDP datagram (udp: its header, checksum set) too long for one IPv6
 * packet within 65535 bytes, as the fragments a sender's stack makes of it:
 * each carries SYNTH_FRAG6 bytes of the UDP header and payload, the last
 * what is left. A reader reassembles the datagram from them.
 */
static void
udp_fragments(struct synth_flow *sf, int dir, const uint8_t udp[8], const uint8_t *data, size_t n,
              size_t truncated_from)
{
	uint8_t h[40 + 8 + 8];
	uint32_t id = sf->fragid[dir]++;
	size_t total = 8 + n;

	for (size_t off = 0; off < total; off += SYNTH_FRAG6) {
		size_t len = total - off < SYNTH_FRAG6 ? total - off : SYNTH_FRAG6;
		struct synth_pkt pkt = { .dir = dir, .hdr = h, .hdrlen = 48 };

		ip_header(sf, dir, h, 8 + len);
		h[6] = 44;  /* next header: the fragment header, which names UDP */
		h[40] = IPPROTO_UDP;
		h[41] = 0;
		/* the offset counts 8-byte units from bit 3: off, a multiple of 8, as it is; bit 0 "more" */
		put16be(h + 42, (uint16_t)(off | (off + len < total)));
		put32be(h + 44, id);
		if (off == 0) {
			memcpy(h + 48, udp, 8);
			pkt.hdrlen += 8;
			pkt.data = data;
			pkt.datalen = len - 8;
			pkt.truncated_from = truncated_from;
			pkt.truncated_to = truncated_from ? n : 0;
		} else {
			pkt.data = data + off - 8;
			pkt.datalen = len;
		}
		sf->emit(sf->arg, &pkt);
	}
}

static void
udp_datagram(struct synth_flow *sf, int dir, const void *data, size_t n)
{
	uint8_t h[HDR_MAX];
	size_t iphl = ip_hdrlen(sf);
	size_t max = sf->family == AF_INET ? SYNTH_UDP_MAX4 : SYNTH_UDP_MAX6;
	uint8_t *u = h + iphl;
	struct synth_pkt pkt = { .dir = dir, .hdr = h, .hdrlen = iphl + 8, .data = data };

	if (n > max) {
		/* No IP packet can carry it whole; keep the head and say so. */
		pkt.truncated_from = n;
		pkt.truncated_to = n = max;
	}
	pkt.datalen = n;
	put16be(u, sf->port[dir]);
	put16be(u + 2, sf->port[!dir]);
	put16be(u + 4, (uint16_t)(8 + n));
	u[6] = u[7] = 0;
	if (!sf->nocsum) {
		uint16_t sum = l4_csum(sf, dir, u, 8, data, n, NULL);

		if (sum == 0)
			sum = 0xffff;  /* 0 would mean "no checksum" */
		memcpy(u + 6, &sum, 2);
	}
	if (iphl + 8 + n > 65535) {
		udp_fragments(sf, dir, u, data, n, pkt.truncated_from);
		return;
	}
	ip_header(sf, dir, h, 8 + n);
	sf->emit(sf->arg, &pkt);
}

void
synth_open(struct synth_flow *sf)
{
	if (sf->proto != IPPROTO_TCP || sf->opened)
		return;
	sf->opened = true;
	int from = sf->inbound ? SYNTH_DOWN : SYNTH_UP, to = sf->inbound ? SYNTH_UP : SYNTH_DOWN;
	tcp_segment(sf, from, TH_SYN, NULL, 0, NULL);
	tcp_segment(sf, to, TH_SYN | TH_ACK, NULL, 0, NULL);
	tcp_segment(sf, from, TH_ACK, NULL, 0, NULL);
}

void
synth_data(struct synth_flow *sf, int dir, const void *p, size_t n)
{
	synth_data_summed(sf, dir, p, n, NULL);
}

void
synth_data_summed(struct synth_flow *sf, int dir, const void *p, size_t n, const uint16_t *sums)
{
	const uint8_t *b = p;
	size_t mss = sf->family == AF_INET ? SYNTH_MSS4 : SYNTH_MSS6;

	if (sf->closed)
		return;
	if (sf->proto == IPPROTO_UDP) {
		udp_datagram(sf, dir, p, n);
		return;
	}
	if (n == 0 || sf->fin[dir])
		return;  /* the relay reads nothing after a FIN */
	synth_open(sf);
	while (n > 0) {
		size_t seg = n < mss ? n : mss;

		tcp_segment(sf, dir, TH_ACK | (seg == n ? TH_PSH : 0), b, seg, sums);
		if (sums != NULL)
			sums++;
		b += seg;
		n -= seg;
	}
	/* The receiver's ACK keeps bytes in flight low for the analyser. */
	tcp_segment(sf, !dir, TH_ACK, NULL, 0, NULL);
}

void
synth_gap(struct synth_flow *sf, int dir, uint64_t n)
{
	if (sf->proto == IPPROTO_TCP)
		sf->seq[dir] += (uint32_t)n;
}

void
synth_fin(struct synth_flow *sf, int dir)
{
	if (sf->proto != IPPROTO_TCP || sf->closed || sf->fin[dir])
		return;
	synth_open(sf);
	sf->fin[dir] = true;
	tcp_segment(sf, dir, TH_FIN | TH_ACK, NULL, 0, NULL);
	tcp_segment(sf, !dir, TH_ACK, NULL, 0, NULL);
	if (sf->fin[!dir])
		sf->closed = true;
}

void
synth_close(struct synth_flow *sf, enum synth_end how)
{
	if (sf->proto != IPPROTO_TCP || sf->closed || how == SYNTH_END_NONE)
		return;
	synth_open(sf);
	if (how != SYNTH_END_FIN) {
		tcp_segment(sf, how == SYNTH_END_RST_CLIENT ? SYNTH_UP : SYNTH_DOWN, TH_RST | TH_ACK, NULL, 0, NULL);
		sf->closed = true;
		return;
	}
	synth_fin(sf, SYNTH_UP);
	synth_fin(sf, SYNTH_DOWN);
}

uint64_t
synth_count(int proto, size_t mss, size_t n)
{
	if (proto != IPPROTO_TCP)
		return mss == SYNTH_MSS6 && 40 + 8 + n > 65535 ? 2 : 1;  /* as udp_fragments makes them */
	return (n + mss - 1) / mss + 1;
}

size_t
synth_mss(const struct sockaddr *client, const struct sockaddr *target)
{
	uint8_t a[16];
	uint16_t port;

	return endpoint(client, a, &port) == AF_INET && endpoint(target, a, &port) == AF_INET ? SYNTH_MSS4
	                                                                                    : SYNTH_MSS6;
}

uint16_t
synth_sum(const void *p, size_t n)
{
	return (uint16_t)~csum_fold(csum_add(0, p, n));
}

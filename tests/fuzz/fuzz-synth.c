/*
 * Fuzzes the capture encoder: random session events (open, data, gaps,
 * FINs, close or reset, for TCP or UDP, IPv4, IPv6 or mixed endpoints)
 * through spool-synth into pcapng blocks, checking that every block is
 * whole (its two length fields agree and are a multiple of four), that
 * every IP and transport checksum verifies (the payload repeats the input,
 * so its bytes are the fuzzer's), that data with sums given beforehand
 * (synth_data_summed, as the spool writer passes them) comes out the same,
 * that synth_count() counts the packets synth_data() makes, and that the
 * block without its payload (pcapng_epb_nodata) is the same one.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "pcapng.h"
#include "spool-synth.h"

static struct buf out;
static uint64_t emitted;  /* packets since the last data op */

/* The one's complement sum of p[0..n) added to s (RFC 1071), unfolded. */
static uint64_t
sum16(uint64_t s, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		s += (uint32_t)p[i] << 8 | p[i + 1];
	if (n % 2)
		s += (uint32_t)p[n - 1] << 8;
	return s;
}

static uint16_t
fold16(uint64_t s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)s;
}

/* The IPv4 header's checksum and the TCP or UDP one (not in IPv6 fragments) verify. */
static void
check_sums(const struct synth_pkt *pkt)
{
	const uint8_t *h = pkt->hdr;
	uint8_t ph[40];
	size_t iphl, phlen, l4len;
	uint64_t s;

	if (h[0] >> 4 == 4) {
		if (fold16(sum16(0, h, 20)) != 0xffff)
			abort();
		iphl = 20;
		l4len = pkt->hdrlen - iphl + pkt->datalen;
		memcpy(ph, h + 12, 8);
		ph[8] = 0;
		ph[9] = h[9];
		ph[10] = (uint8_t)(l4len >> 8);
		ph[11] = (uint8_t)l4len;
		phlen = 12;
	} else {
		if (h[6] == 44)
			return;  /* a fragment: its datagram's sum needs them all */
		iphl = 40;
		l4len = pkt->hdrlen - iphl + pkt->datalen;
		memcpy(ph, h + 8, 32);
		ph[32] = (uint8_t)(l4len >> 24);
		ph[33] = (uint8_t)(l4len >> 16);
		ph[34] = (uint8_t)(l4len >> 8);
		ph[35] = (uint8_t)l4len;
		ph[36] = ph[37] = ph[38] = 0;
		ph[39] = h[6];
		phlen = 40;
	}
	s = sum16(0, ph, phlen);
	s = sum16(s, h + iphl, pkt->hdrlen - iphl);  /* an even length: the payload's bytes keep their places */
	s = sum16(s, pkt->data, pkt->datalen);
	if (fold16(s) != 0xffff)
		abort();
}

static void
emit(void *arg, const struct synth_pkt *pkt)
{
	struct pcapng_epb e = {
		.iface = 0, .ts = 1, .hdr = pkt->hdr, .hdrlen = pkt->hdrlen, .data = pkt->data,
		.datalen = pkt->datalen, .flags = pkt->dir == SYNTH_UP ? PCAPNG_EPB_INBOUND : PCAPNG_EPB_OUTBOUND,
		.comment = "capd session 1",
	};
	size_t before = buf_used(&out), len;
	uint32_t first, last;

	(void)arg;
	emitted++;
	if (pkt->hdrlen + pkt->datalen > 65535)
		abort();  /* no packet is larger than IP allows */
	if (pkt->truncated_from && pkt->truncated_to >= pkt->truncated_from)
		abort();
	check_sums(pkt);
	len = pcapng_epb(&out, &e);
	memcpy(&first, buf_head(&out) + before + 4, 4);
	memcpy(&last, buf_head(&out) + before + len - 4, 4);
	if (first != len || last != len || len % 4 != 0)
		abort();
	/* the block the writer hands to writev: the same bytes, the payload left out at split */
	{
		static struct buf nod;
		size_t split = 0, nlen = pcapng_epb_nodata(&nod, &e, &split);
		const uint8_t *whole = buf_head(&out) + before, *part = buf_head(&nod);

		if (nlen != len || buf_used(&nod) != len - pkt->datalen || split > buf_used(&nod) ||
		    memcmp(part, whole, split) != 0 ||
		    (pkt->datalen > 0 && memcmp(whole + split, pkt->data, pkt->datalen) != 0) ||
		    memcmp(part + split, whole + split + pkt->datalen, buf_used(&nod) - split) != 0)
			abort();
		buf_reset(&nod);
	}
	buf_reset(&out);
}

static void
endpoint(uint8_t kind, uint16_t port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	if (kind % 3 == 0) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		inet_pton(AF_INET, "127.0.0.1", &sin->sin_addr);
	} else {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		inet_pton(AF_INET6, kind % 3 == 1 ? "::1" : "::ffff:127.0.0.2", &sin6->sin6_addr);
	}
}

/* synth_data(), or with the sums when op says so; synth_count() must say how many packets came. */
static void
fuzz_data(struct synth_flow *sf, uint8_t op, int dir, const uint8_t *p, size_t n, const struct sockaddr_storage *c,
          const struct sockaddr_storage *t)
{
	size_t mss = synth_mss((const struct sockaddr *)c, (const struct sockaddr *)t);
	uint16_t sums[16];
	bool counted = !sf->closed && (sf->proto == IPPROTO_UDP || (n > 0 && sf->opened && !sf->fin[dir]));

	if (n / mss + 1 > sizeof sums / sizeof sums[0])
		abort();
	emitted = 0;
	if (op & 0x20) {
		for (size_t k = 0, off = 0; off < n; k++, off += mss)
			sums[k] = synth_sum(p + off, n - off < mss ? n - off : mss);
		synth_data_summed(sf, dir, p, n, sums);
	} else {
		synth_data(sf, dir, p, n);
	}
	if (counted && emitted != synth_count(sf->proto, mss, n))
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t payload[200000];
	struct sockaddr_storage c, t;
	struct synth_flow sf;
	size_t i = 4;

	if (size < 4)
		return 0;
	/* the input over and over (doubling copies: a byte loop would be most of the time) */
	memcpy(payload, data, size < sizeof payload ? size : sizeof payload);
	for (size_t have = size; have < sizeof payload; have *= 2)
		memcpy(payload + have, payload, have < sizeof payload - have ? have : sizeof payload - have);
	endpoint(data[0], (uint16_t)(data[1] | 1), &c);
	endpoint(data[2], 443, &t);
	if (synth_flow_init(&sf, (data[3] & 1) ? IPPROTO_UDP : IPPROTO_TCP, (struct sockaddr *)&c,
	                    (struct sockaddr *)&t, 0xfffffff0u, 12345, emit, NULL) < 0)
		return 0;
	synth_open(&sf);
	while (i + 3 <= size) {
		uint8_t op = data[i];
		size_t n = ((size_t)data[i + 1] << 8 | data[i + 2]) * (op & 0x80 ? 3 : 1);
		int dir = op & 1;

		i += 3;
		switch ((op >> 1) & 3) {
		case 0: fuzz_data(&sf, op, dir, payload, n < sizeof payload ? n : sizeof payload, &c, &t); break;
		case 1: synth_gap(&sf, dir, n); break;
		case 2: synth_fin(&sf, dir); break;
		case 3: synth_close(&sf, op & 0x40); break;
		}
	}
	synth_close(&sf, false);
	return 0;
}

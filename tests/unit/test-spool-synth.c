/*
 * Unit tests for daemon/spool-synth.c (streams -> packets) and, end to end,
 * daemon/spool.c: checksums recomputed here independently, sequence and
 * acknowledgement numbers, segment sizes, v4-mapped mixing, UDP; then real
 * files checked with tshark when it is installed (Follow TCP Stream gives
 * back the exact bytes; no bad checksum, malformed packet or error).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "buf.h"
#include "capd.h"
#include "pcapng.h"
#include "spool-synth.h"
#include "spool.h"

/* spool.c reads capd.h; these stand in for capd.c. */
struct capd_settings *capd_settings;
const char *capd_config_path;

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

struct pkt {
	int dir;
	uint8_t *b;
	size_t len;
	size_t cut;   /* truncated_from */
	size_t kept;  /* truncated_to */
};

struct pkts {
	struct pkt v[64];
	size_t n;
};

static void
collect_cb(void *arg, const struct synth_pkt *p)
{
	struct pkts *ps = arg;
	struct pkt *k;

	assert_true(ps->n < 64);
	k = &ps->v[ps->n++];
	k->dir = p->dir;
	k->len = p->hdrlen + p->datalen;
	k->cut = p->truncated_from;
	k->kept = p->truncated_to;
	k->b = malloc(k->len ? k->len : 1);
	memcpy(k->b, p->hdr, p->hdrlen);
	if (p->datalen)
		memcpy(k->b + p->hdrlen, p->data, p->datalen);
}

static void
pkts_free(struct pkts *ps)
{
	for (size_t i = 0; i < ps->n; i++)
		free(ps->v[i].b);
	ps->n = 0;
}

static uint16_t
get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t
get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* A plain big-endian 16-bit word sum: deliberately not synth's algorithm. */
static uint32_t
sum16(uint32_t s, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		s += get16(p + i);
	if (n & 1)
		s += (uint32_t)p[n - 1] << 8;
	return s;
}

static uint16_t
fold(uint32_t s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)s;
}

/* Checks the IP header and the transport checksum; returns the transport header. */
static const uint8_t *
check_ip(const struct pkt *k, int *proto, size_t *l4len)
{
	const uint8_t *b = k->b;
	uint32_t s;

	if ((b[0] >> 4) == 4) {
		assert_int_equal(b[0], 0x45);
		assert_int_equal(get16(b + 2), k->len);
		assert_true(k->len <= 65535);
		assert_int_equal(fold(sum16(0, b, 20)), 0xffff);
		*proto = b[9];
		*l4len = k->len - 20;
		s = sum16(0, b + 12, 8);
		s += (uint32_t)*proto + (uint32_t)*l4len;
		s = sum16(s, b + 20, *l4len);
		assert_int_equal(fold(s), 0xffff);
		return b + 20;
	}
	assert_int_equal(b[0] >> 4, 6);
	assert_int_equal(get16(b + 4), k->len - 40);
	assert_true(k->len <= 65535);
	*proto = b[6];
	*l4len = k->len - 40;
	s = sum16(0, b + 8, 32);
	s += (uint32_t)(*l4len >> 16) + (uint32_t)(*l4len & 0xffff) + (uint32_t)*proto;
	s = sum16(s, b + 40, *l4len);
	assert_int_equal(fold(s), 0xffff);
	return b + 40;
}

/*
 * Checks that v[0..n) are the IPv6 fragments of one UDP datagram, in order,
 * each within 65535 bytes; reassembles the datagram (UDP header and payload)
 * into out, checks its checksum and returns its length.
 */
static size_t
check_frags6(const struct pkt *v, size_t n, uint8_t *out)
{
	size_t total = 0;
	uint32_t s;

	for (size_t i = 0; i < n; i++) {
		const uint8_t *b = v[i].b;

		assert_int_equal(b[0] >> 4, 6);
		assert_int_equal(get16(b + 4), v[i].len - 40);
		assert_true(v[i].len <= 65535);
		assert_int_equal(b[6], 44);  /* a fragment header */
		assert_int_equal(b[40], IPPROTO_UDP);
		assert_int_equal(get16(b + 42) & ~7u, total);  /* the offset, in bytes */
		assert_int_equal(get16(b + 42) & 1, i + 1 < n);
		assert_int_equal(get32(b + 44), get32(v[0].b + 44));
		assert_memory_equal(b + 8, v[0].b + 8, 32);
		assert_int_equal(v[i].dir, v[0].dir);
		if (i + 1 < n)
			assert_int_equal((v[i].len - 48) % 8, 0);
		memcpy(out + total, b + 48, v[i].len - 48);
		total += v[i].len - 48;
	}
	assert_int_equal(get16(out + 4), total);
	s = sum16(0, v[0].b + 8, 32);
	s += (uint32_t)(total >> 16) + (uint32_t)(total & 0xffff) + IPPROTO_UDP;
	s = sum16(s, out, total);
	assert_int_equal(fold(s), 0xffff);
	return total;
}

/* Checks a TCP packet's checksums and fields; returns its payload length. */
static size_t
check_tcp(const struct pkt *k, uint8_t flags, uint32_t seq, uint32_t ack)
{
	int proto;
	size_t l4len, thl;
	const uint8_t *t = check_ip(k, &proto, &l4len);

	assert_int_equal(proto, IPPROTO_TCP);
	thl = (size_t)(t[12] >> 4) * 4;
	assert_int_equal(t[13], flags);
	assert_int_equal(get32(t + 4), seq);
	if (flags & TH_ACK)
		assert_int_equal(get32(t + 8), ack);
	return l4len - thl;
}

static struct sockaddr_storage
sa4(const char *ip, uint16_t port)
{
	struct sockaddr_storage ss = { 0 };
	struct sockaddr_in *s = (struct sockaddr_in *)&ss;

	s->sin_family = AF_INET;
	s->sin_port = htons(port);
	inet_pton(AF_INET, ip, &s->sin_addr);
	return ss;
}

static struct sockaddr_storage
sa6(const char *ip, uint16_t port)
{
	struct sockaddr_storage ss = { 0 };
	struct sockaddr_in6 *s = (struct sockaddr_in6 *)&ss;

	s->sin6_family = AF_INET6;
	s->sin6_port = htons(port);
	inet_pton(AF_INET6, ip, &s->sin6_addr);
	return ss;
}

static uint8_t *
pattern(size_t n, uint32_t seed)
{
	uint8_t *p = malloc(n ? n : 1);

	for (size_t i = 0; i < n; i++) {
		seed ^= seed << 13;
		seed ^= seed >> 17;
		seed ^= seed << 5;
		p[i] = (uint8_t)seed;
	}
	return p;
}

static void
test_tcp_v4(void **state)
{
	struct sockaddr_storage c = sa4("10.1.2.3", 51234), t = sa4("93.184.216.34", 443);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };
	uint32_t ic = 1000, it = 0xfffffff0u;  /* the target's numbers wrap */
	uint8_t *data = pattern(100000, 1);

	(void)state;
	assert_int_equal(synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, ic, it,
	                                 collect_cb, &ps), 0);
	assert_int_equal(sf.family, AF_INET);
	synth_open(&sf);
	assert_int_equal(ps.n, 3);
	assert_int_equal(check_tcp(&ps.v[0], TH_SYN, ic, 0), 0);
	assert_int_equal(ps.v[0].dir, SYNTH_UP);
	assert_memory_equal(ps.v[0].b + 12, "\x0a\x01\x02\x03", 4);
	assert_int_equal(get16(ps.v[0].b + 20), 51234);
	assert_int_equal(get16(ps.v[0].b + 22), 443);
	assert_int_equal(check_tcp(&ps.v[1], TH_SYN | TH_ACK, it, ic + 1), 0);
	assert_int_equal(ps.v[1].dir, SYNTH_DOWN);
	assert_int_equal(check_tcp(&ps.v[2], TH_ACK, ic + 1, it + 1), 0);
	pkts_free(&ps);

	/* 100000 bytes up: two segments within 65535-byte packets, then the target's ACK. */
	synth_data(&sf, SYNTH_UP, data, 100000);
	assert_int_equal(ps.n, 3);
	assert_int_equal(check_tcp(&ps.v[0], TH_ACK, ic + 1, it + 1), SYNTH_MSS4);
	assert_int_equal(ps.v[0].len, 65535);
	assert_memory_equal(ps.v[0].b + 40, data, SYNTH_MSS4);
	assert_int_equal(check_tcp(&ps.v[1], TH_ACK | TH_PSH, ic + 1 + SYNTH_MSS4, it + 1),
	                 100000 - SYNTH_MSS4);
	assert_memory_equal(ps.v[1].b + 40, data + SYNTH_MSS4, 100000 - SYNTH_MSS4);
	assert_int_equal(ps.v[2].dir, SYNTH_DOWN);
	assert_int_equal(check_tcp(&ps.v[2], TH_ACK, it + 1, ic + 1 + 100000), 0);
	pkts_free(&ps);

	/* 7 bytes down (odd length: the checksum pads), past the wrap of the target's numbers. */
	synth_data(&sf, SYNTH_DOWN, data, 7);
	assert_int_equal(ps.n, 2);
	assert_int_equal(check_tcp(&ps.v[0], TH_ACK | TH_PSH, it + 1, ic + 100001), 7);
	assert_int_equal(check_tcp(&ps.v[1], TH_ACK, ic + 100001, it + 8), 0);
	pkts_free(&ps);

	/* 50 bytes up were not captured: the next segment still sits where it belongs. */
	synth_gap(&sf, SYNTH_UP, 50);
	synth_data(&sf, SYNTH_UP, data, 5);
	assert_int_equal(check_tcp(&ps.v[0], TH_ACK | TH_PSH, ic + 100051, it + 8), 5);
	assert_int_equal(check_tcp(&ps.v[1], TH_ACK, it + 8, ic + 100056), 0);
	pkts_free(&ps);

	/* Half-close up, more data down, then close: the target's FIN. */
	synth_fin(&sf, SYNTH_UP);
	assert_int_equal(ps.n, 2);
	assert_int_equal(check_tcp(&ps.v[0], TH_FIN | TH_ACK, ic + 100056, it + 8), 0);
	assert_int_equal(check_tcp(&ps.v[1], TH_ACK, it + 8, ic + 100057), 0);
	pkts_free(&ps);
	synth_data(&sf, SYNTH_UP, data, 5);  /* nothing after our own FIN */
	assert_int_equal(ps.n, 0);
	synth_data(&sf, SYNTH_DOWN, data, 3);
	assert_int_equal(check_tcp(&ps.v[0], TH_ACK | TH_PSH, it + 8, ic + 100057), 3);
	pkts_free(&ps);
	synth_close(&sf, false);
	assert_int_equal(ps.n, 2);
	assert_int_equal(check_tcp(&ps.v[0], TH_FIN | TH_ACK, it + 11, ic + 100057), 0);
	assert_int_equal(check_tcp(&ps.v[1], TH_ACK, ic + 100057, it + 12), 0);
	pkts_free(&ps);
	synth_close(&sf, true);
	assert_int_equal(ps.n, 0);
	free(data);
}

/*
 * The payload checksum at every length and alignment its vector and tail
 * paths split at, over random bytes and over all-ones bytes (the most
 * carries), in IPv4 and IPv6 flows (odd MSS: the second segment starts at
 * an odd address), computed by synth_data and from a producer's per-segment
 * sums (synth_data_summed).
 */
static void
test_tcp_csum_lengths(void **state)
{
	struct sockaddr_storage c4 = sa4("10.1.2.3", 51234), t4 = sa4("93.184.216.34", 443);
	struct sockaddr_storage c6 = sa6("2001:db8::1", 40000), t6 = sa6("2001:db8::2", 80);
	static const size_t big[] = { 4095, 65536, SYNTH_MSS4 + 1, 2 * SYNTH_MSS4 + 33, 3 * 65536 + 7 };
	size_t max = 3 * 65536 + 7 + 8;
	uint8_t *rnd = pattern(max, 7), *ones = malloc(max);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };

	(void)state;
	memset(ones, 0xff, max);
	for (int v6 = 0; v6 < 2; v6++) {
		assert_int_equal(synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)(v6 ? &c6 : &c4),
		                                 (struct sockaddr *)(v6 ? &t6 : &t4), 1, 2, collect_cb, &ps), 0);
		synth_open(&sf);
		pkts_free(&ps);
		for (size_t i = 0; i < 300 + sizeof big / sizeof big[0]; i++) {
			size_t n = i < 300 ? i + 1 : big[i - 300];

			for (size_t off = 0; off < 8; off += (i < 300 ? 1 : 3)) {
				for (int k = 0; k < 4; k++) {
					const uint8_t *b = (k & 1 ? ones : rnd) + off;
					size_t got = 0, mss = synth_mss((struct sockaddr *)(v6 ? &c6 : &c4),
					                                (struct sockaddr *)(v6 ? &t6 : &t4));
					uint16_t sums[8];

					if (k < 2) {
						synth_data(&sf, SYNTH_UP, b, n);
					} else {
						/* the producer's sums, one per segment */
						for (size_t j = 0, at = 0; at < n; j++, at += mss)
							sums[j] = synth_sum(b + at, n - at < mss ? n - at : mss);
						synth_data_summed(&sf, SYNTH_UP, b, n, sums);
					}
					for (size_t j = 0; j < ps.n; j++) {
						int proto;
						size_t l4len;
						const uint8_t *t = check_ip(&ps.v[j], &proto, &l4len);

						got += l4len - (size_t)(t[12] >> 4) * 4;
					}
					assert_int_equal(got, n);
					pkts_free(&ps);
				}
			}
		}
	}
	free(rnd);
	free(ones);
}

static void
test_tcp_reset(void **state)
{
	struct sockaddr_storage c = sa4("127.0.0.1", 4000), t = sa4("127.0.0.1", 80);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };

	(void)state;
	synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, 1, 2, collect_cb, &ps);
	synth_open(&sf);
	synth_data(&sf, SYNTH_UP, "GET", 3);
	pkts_free(&ps);
	synth_close(&sf, true);
	assert_int_equal(ps.n, 1);
	assert_int_equal(ps.v[0].dir, SYNTH_DOWN);
	assert_int_equal(check_tcp(&ps.v[0], TH_RST | TH_ACK, 3, 5), 0);
	pkts_free(&ps);
	synth_data(&sf, SYNTH_DOWN, "x", 1);
	synth_fin(&sf, SYNTH_DOWN);
	assert_int_equal(ps.n, 0);
}

/* SYNTH_END_NONE: a refusal whose client never closed (or went on in
 * another session) ends with no packet, after the FIN capd did send. */
static void
test_tcp_end_none(void **state)
{
	struct sockaddr_storage c = sa4("127.0.0.1", 4000), t = sa4("127.0.0.1", 8080);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };

	(void)state;
	synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, 1, 2, collect_cb, &ps);
	synth_open(&sf);
	synth_data(&sf, SYNTH_DOWN, "HTTP/1.1 400", 12);
	synth_fin(&sf, SYNTH_DOWN);
	pkts_free(&ps);
	synth_close(&sf, SYNTH_END_NONE);
	assert_int_equal(ps.n, 0);
	assert_false(sf.fin[SYNTH_UP]);
}

static void
test_tcp_v6(void **state)
{
	struct sockaddr_storage c = sa6("2001:db8::1", 40000), t = sa6("2001:db8::2", 8080);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };
	uint8_t *data = pattern(65536, 2);
	struct in6_addr a;

	(void)state;
	synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, 7, 9, collect_cb, &ps);
	assert_int_equal(sf.family, AF_INET6);
	synth_data(&sf, SYNTH_UP, data, 65536);  /* opens first */
	assert_int_equal(ps.n, 6);
	assert_int_equal(check_tcp(&ps.v[0], TH_SYN, 7, 0), 0);
	inet_pton(AF_INET6, "2001:db8::1", &a);
	assert_memory_equal(ps.v[0].b + 8, &a, 16);
	assert_int_equal(check_tcp(&ps.v[3], TH_ACK, 8, 10), SYNTH_MSS6);
	assert_int_equal(ps.v[3].len, 65535);
	assert_int_equal(check_tcp(&ps.v[4], TH_ACK | TH_PSH, 8 + SYNTH_MSS6, 10), 65536 - SYNTH_MSS6);
	assert_int_equal(check_tcp(&ps.v[5], TH_ACK, 10, 8 + 65536), 0);
	pkts_free(&ps);
	free(data);
}

static void
test_mixed(void **state)
{
	struct sockaddr_storage c = sa4("127.0.0.1", 5555), t = sa6("::1", 443);
	struct sockaddr_storage m = sa6("::ffff:192.0.2.7", 5555), t4 = sa4("198.51.100.1", 80);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };
	static const uint8_t mapped[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1 };
	static const uint8_t one[16] = { [15] = 1 };

	(void)state;
	/* IPv4 client, IPv6 target: both as IPv6, the client v4-mapped. */
	synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, 1, 1, collect_cb, &ps);
	assert_int_equal(sf.family, AF_INET6);
	synth_open(&sf);
	check_tcp(&ps.v[0], TH_SYN, 1, 0);
	assert_memory_equal(ps.v[0].b + 8, mapped, 16);
	assert_memory_equal(ps.v[0].b + 24, one, 16);
	assert_memory_equal(ps.v[1].b + 8, one, 16);
	assert_memory_equal(ps.v[1].b + 24, mapped, 16);
	pkts_free(&ps);

	/* A v4-mapped client (dual-stack socket) with an IPv4 target stays IPv4. */
	synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&m, (struct sockaddr *)&t4, 1, 1, collect_cb, &ps);
	assert_int_equal(sf.family, AF_INET);
	synth_open(&sf);
	check_tcp(&ps.v[0], TH_SYN, 1, 0);
	assert_memory_equal(ps.v[0].b + 12, "\xc0\x00\x02\x07", 4);
	pkts_free(&ps);

	/* Not IP: refused. */
	c.ss_family = AF_UNIX;
	assert_int_equal(synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, 1, 1,
	                                 collect_cb, &ps), -1);
}

static void
test_udp(void **state)
{
	struct sockaddr_storage c = sa4("127.0.0.1", 5353), t = sa4("8.8.8.8", 53);
	struct sockaddr_storage c6 = sa6("::1", 5353), t6 = sa6("2001:4860:4860::8888", 53);
	struct synth_flow sf;
	struct pkts ps = { .n = 0 };
	uint8_t *big = pattern(70000, 3), *whole = malloc(65536);
	const uint8_t *u;
	size_t l4len;
	int proto;

	(void)state;
	synth_flow_init(&sf, IPPROTO_UDP, (struct sockaddr *)&c, (struct sockaddr *)&t, 1, 1, collect_cb, &ps);
	synth_open(&sf);
	assert_int_equal(ps.n, 0);
	synth_data(&sf, SYNTH_UP, "query", 5);
	synth_data(&sf, SYNTH_DOWN, big, 1001);
	synth_data(&sf, SYNTH_DOWN, big, 70000);
	synth_fin(&sf, SYNTH_UP);
	synth_close(&sf, true);
	assert_int_equal(ps.n, 3);
	u = check_ip(&ps.v[0], &proto, &l4len);
	assert_int_equal(proto, IPPROTO_UDP);
	assert_int_equal(get16(u), 5353);
	assert_int_equal(get16(u + 2), 53);
	assert_int_equal(get16(u + 4), 13);
	assert_memory_equal(u + 8, "query", 5);
	u = check_ip(&ps.v[1], &proto, &l4len);
	assert_int_equal(ps.v[1].dir, SYNTH_DOWN);
	assert_int_equal(get16(u), 53);
	assert_int_equal(get16(u + 4), 1009);
	u = check_ip(&ps.v[2], &proto, &l4len);
	assert_int_equal(ps.v[2].len, 65535);
	assert_int_equal(get16(u + 4), 8 + SYNTH_UDP_MAX4);
	assert_int_equal(ps.v[2].cut, 70000);
	assert_int_equal(ps.v[2].kept, SYNTH_UDP_MAX4);
	pkts_free(&ps);

	/* IPv6 carries up to 65527 bytes; past 65487 they take two fragments within 65535 bytes */
	synth_flow_init(&sf, IPPROTO_UDP, (struct sockaddr *)&c6, (struct sockaddr *)&t6, 1, 1, collect_cb, &ps);
	synth_data(&sf, SYNTH_UP, big, 70000);
	synth_data(&sf, SYNTH_UP, big, 65487);
	synth_data(&sf, SYNTH_DOWN, big, 65488);
	synth_data(&sf, SYNTH_UP, big, 333);
	assert_int_equal(ps.n, 6);
	assert_int_equal(check_frags6(&ps.v[0], 2, whole), 8 + SYNTH_UDP_MAX6);
	assert_memory_equal(whole + 8, big, SYNTH_UDP_MAX6);
	assert_int_equal(ps.v[0].len, 48 + SYNTH_FRAG6);
	assert_int_equal(ps.v[0].cut, 70000);  /* cut to what IPv6 carries, said once */
	assert_int_equal(ps.v[0].kept, SYNTH_UDP_MAX6);  /* over both fragments, not the first's share */
	assert_int_equal(ps.v[1].cut, 0);
	u = check_ip(&ps.v[2], &proto, &l4len);
	assert_int_equal(ps.v[2].len, 65535);
	assert_int_equal(get16(u + 4), 8 + 65487);
	assert_int_equal(ps.v[2].cut, 0);
	assert_int_equal(check_frags6(&ps.v[3], 2, whole), 8 + 65488);
	assert_memory_equal(whole + 8, big, 65488);
	assert_int_equal(ps.v[3].dir, SYNTH_DOWN);
	assert_int_equal(get16(whole), 53);
	u = check_ip(&ps.v[5], &proto, &l4len);
	assert_int_equal(get16(u + 4), 341);
	pkts_free(&ps);

	/* a client's next datagram is another reassembly */
	synth_data(&sf, SYNTH_UP, big, 65500);
	synth_data(&sf, SYNTH_UP, big + 1, 65500);
	assert_int_equal(ps.n, 4);
	check_frags6(&ps.v[0], 2, whole);
	check_frags6(&ps.v[2], 2, whole);
	assert_memory_equal(whole + 8, big + 1, 65500);
	assert_int_not_equal(get32(ps.v[0].b + 44), get32(ps.v[2].b + 44));
	pkts_free(&ps);
	free(big);
	free(whole);
}

static void
test_count(void **state)
{
	(void)state;
	assert_int_equal(synth_count(IPPROTO_UDP, SYNTH_MSS6, 65487), 1);
	assert_int_equal(synth_count(IPPROTO_UDP, SYNTH_MSS6, 65488), 2);  /* two IPv6 fragments */
	assert_int_equal(synth_count(IPPROTO_UDP, SYNTH_MSS4, 65507), 1);  /* IPv4 never fragments */
	assert_int_equal(synth_count(IPPROTO_TCP, SYNTH_MSS6, 1), 2);
	assert_int_equal(synth_count(IPPROTO_TCP, SYNTH_MSS6, 65536), 3);
	assert_int_equal(synth_count(IPPROTO_TCP, SYNTH_MSS4, 2 * SYNTH_MSS4), 3);
}

/* ---- real files, read back by tshark ---- */

static bool
have_tshark(void)
{
	return system("command -v tshark >/dev/null 2>&1") == 0;
}

static int
hexval(int c)
{
	return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/*
 * Runs Follow TCP Stream (raw) on stream n and returns the bytes each node
 * sent: node 0 on unindented lines, node 1 on tab-indented ones.
 */
static void
tshark_follow(const char *file, int n, struct buf out[2])
{
	char cmd[512], *line = NULL;
	size_t cap = 0;
	ssize_t len;
	bool body = false;
	FILE *p;

	snprintf(cmd, sizeof cmd, "tshark -r '%s' -q -z follow,tcp,raw,%d 2>/dev/null", file, n);
	p = popen(cmd, "r");
	assert_non_null(p);
	while ((len = getline(&line, &cap, p)) > 0) {
		char *s = line;
		int side = 0;

		if (strncmp(line, "Node 1:", 7) == 0) {
			body = true;
			continue;
		}
		if (!body || line[0] == '=')
			continue;
		if (*s == '\t') {
			side = 1;
			s++;
		}
		for (; s[0] && s[1] && s[0] != '\n'; s += 2) {
			uint8_t b = (uint8_t)(hexval(s[0]) << 4 | hexval(s[1]));

			buf_append(&out[side], &b, 1);
		}
	}
	free(line);
	assert_int_equal(pclose(p), 0);
}

/* tshark finds no bad checksum, malformed packet or error, and reads the whole file. */
static void
tshark_clean(const char *file)
{
	char cmd[768], out[4096], err[64];
	size_t n;
	FILE *p;

	/* stderr aside: tshark warns there about running as root. Per process: runs side by side share /tmp. */
	snprintf(err, sizeof err, "/tmp/capd-test-tshark-%d.err", (int)getpid());
	snprintf(cmd, sizeof cmd,
	         "tshark -o tcp.check_checksum:TRUE -o ip.check_checksum:TRUE -o udp.check_checksum:TRUE -r '%s' "
	         "-Y 'tcp.checksum.status==0 || ip.checksum.status==0 || udp.checksum.status==0 || "
	         "_ws.malformed || _ws.expert.severity>=error' 2>%s",
	         file, err);
	p = popen(cmd, "r");
	assert_non_null(p);
	n = fread(out, 1, sizeof out - 1, p);
	out[n] = '\0';
	if (n > 0)
		fprintf(stderr, "tshark on %s:\n%s\n", file, out);
	assert_int_equal(n, 0);
	if (pclose(p) != 0) {
		snprintf(cmd, sizeof cmd, "cat %s >&2", err);
		system(cmd);
		fail_msg("tshark could not read %s", file);
	}
	unlink(err);
}

static void
file_emit_cb(void *arg, const struct synth_pkt *p)
{
	struct buf *b = arg;
	struct pcapng_epb e = {
		.ts = 1700000000000000ull, .hdr = p->hdr, .hdrlen = p->hdrlen, .data = p->data,
		.datalen = p->datalen, .comment = "capd session 1",
		.flags = p->dir == SYNTH_UP ? PCAPNG_EPB_OUTBOUND : PCAPNG_EPB_INBOUND,
	};

	pcapng_epb(b, &e);
}

/* synth + pcapng alone: three conversations (v4, v6, mixed) in one file. */
static void
test_tshark_synth(void **state)
{
	char file[64];
	struct sockaddr_storage ep[3][2] = {
		{ sa4("127.0.0.1", 40001), sa4("127.0.0.2", 80) },
		{ sa6("::1", 40002), sa6("2001:db8::5", 443) },
		{ sa4("192.0.2.1", 40003), sa6("2001:db8::6", 8443) },
	};
	size_t sizes[3][2] = { { 200000, 150001 }, { 1, 65536 }, { 65495, 3 } };
	struct pcapng_idb idb = { .linktype = PCAPNG_LINKTYPE_RAW, .snaplen = 65535, .name = "test" };
	struct buf b = { 0 };
	struct synth_flow sf;
	FILE *f;

	(void)state;
	if (!have_tshark())
		skip();
	snprintf(file, sizeof file, "/tmp/capd-test-synth-%d.pcapng", (int)getpid());
	pcapng_shb(&b, NULL, NULL, "capd test");
	pcapng_idb(&b, &idb);
	for (int i = 0; i < 3; i++) {
		uint8_t *up = pattern(sizes[i][0], 10 + (uint32_t)i), *down = pattern(sizes[i][1], 20 + (uint32_t)i);

		synth_flow_init(&sf, IPPROTO_TCP, (struct sockaddr *)&ep[i][0], (struct sockaddr *)&ep[i][1],
		                0xfffff000u * (uint32_t)i, 77, file_emit_cb, &b);
		synth_open(&sf);
		/* Interleaved, in relay-sized chunks, as a real session arrives. */
		for (size_t o = 0; o < sizes[i][0] || o < sizes[i][1]; o += 65536) {
			if (o < sizes[i][0])
				synth_data(&sf, SYNTH_UP, up + o, sizes[i][0] - o < 65536 ? sizes[i][0] - o : 65536);
			if (o < sizes[i][1])
				synth_data(&sf, SYNTH_DOWN, down + o, sizes[i][1] - o < 65536 ? sizes[i][1] - o : 65536);
		}
		synth_fin(&sf, SYNTH_DOWN);
		synth_close(&sf, i == 2);
		free(up);
		free(down);
	}
	f = fopen(file, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(buf_head(&b), 1, buf_used(&b), f), buf_used(&b));
	fclose(f);
	buf_free(&b);

	tshark_clean(file);
	for (int i = 0; i < 3; i++) {
		struct buf got[2] = { { 0 }, { 0 } };
		uint8_t *up = pattern(sizes[i][0], 10 + (uint32_t)i), *down = pattern(sizes[i][1], 20 + (uint32_t)i);

		tshark_follow(file, i, got);
		assert_int_equal(buf_used(&got[0]), sizes[i][0]);
		assert_int_equal(buf_used(&got[1]), sizes[i][1]);
		assert_memory_equal(buf_head(&got[0]), up, sizes[i][0]);
		assert_memory_equal(buf_head(&got[1]), down, sizes[i][1]);
		buf_free(&got[0]);
		buf_free(&got[1]);
		free(up);
		free(down);
	}
	unlink(file);
}

/* ---- spool.c end to end: writer thread, files, rotation ---- */

static char spool_tmp[64];

static void
rm_spool(void)
{
	DIR *d = opendir(spool_tmp);
	struct dirent *de;
	char path[512];

	if (d == NULL)
		return;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "%s/%s", spool_tmp, de->d_name);
		unlink(path);
	}
	closedir(d);
	rmdir(spool_tmp);
}

/* A fresh spool folder /tmp/capd-test-NAME-PID for st; starts the spool. */
static void
spool_fresh(struct capd_settings *st, const char *name)
{
	char *why = NULL;

	snprintf(spool_tmp, sizeof spool_tmp, "/tmp/capd-test-%s-%d", name, (int)getpid());
	rm_spool();
	st->spool = spool_tmp;
	assert_int_equal(spool_start(st, &why), 0);
}

/* Our files in the spool, sorted by name (and so by time). */
static int
spool_files(char names[][400], int max)
{
	struct dirent **list;
	int n = scandir(spool_tmp, &list, NULL, alphasort), k = 0;

	for (int i = 0; i < n; i++) {
		if (strncmp(list[i]->d_name, "capd-", 5) == 0 && k < max)
			snprintf(names[k++], 400, "%s/%s", spool_tmp, list[i]->d_name);
		free(list[i]);
	}
	free(list);
	return k;
}

static int64_t
status_int(const char *key)
{
	json_t *st = spool_status();
	int64_t v = json_integer_value(json_object_get(st, key));

	json_decref(st);
	return v;
}

static void
test_spool_files(void **state)
{
	struct capd_settings st = { .keep_files = 32, .flush_interval = 0.2 };
	struct sockaddr_storage c = sa4("127.0.0.1", 45000), t = sa6("::1", 9000);
	struct sockaddr_storage c2 = sa4("10.0.0.1", 45001), t2 = sa4("10.0.0.2", 9999);
	char *why = NULL, names[8][400];
	struct spool_flow *f, *u;
	uint8_t *up = pattern(300000, 5), *down = pattern(1 << 20, 6);
	json_t *s;
	int iface;

	(void)state;
	spool_fresh(&st, "spool");
	s = spool_status();
	assert_non_null(strstr(json_string_value(json_object_get(s, "file")), "/capd-00001-"));
	json_decref(s);
	assert_int_equal(status_int("files"), 1);

	iface = spool_iface_add("fwd", "capd forward instance", PCAPNG_LINKTYPE_RAW, 65535, false);
	f = spool_flow_open(iface, 42, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, "forward/fwd");
	u = spool_flow_open(iface, 43, IPPROTO_UDP, (struct sockaddr *)&c2, (struct sockaddr *)&t2, NULL);
	assert_non_null(f);
	spool_keylog("CLIENT_RANDOM 00 11\n");
	for (size_t o = 0; o < (1 << 20); o += 65536) {
		if (o < 300000)
			spool_flow_data(f, DIR_UP, up + o, 300000 - o < 65536 ? 300000 - o : 65536);
		spool_flow_data(f, DIR_DOWN, down + o, 65536);
	}
	spool_flow_data(u, DIR_UP, "q", 1);
	spool_flow_data(u, DIR_DOWN, "answer", 6);
	spool_flow_fin(f, DIR_UP);
	spool_flow_close(f, false);
	spool_flow_close(u, false);
	/* Written within the flush interval, before any stop. */
	for (int i = 0; i < 50 && status_int("packets") < 40; i++)
		usleep(20000);
	assert_true(status_int("packets") >= 40);
	spool_stop();

	assert_int_equal(spool_files(names, 8), 1);
	if (have_tshark()) {
		struct buf got[2] = { { 0 }, { 0 } };
		char cmd[2048];

		tshark_clean(names[0]);
		tshark_follow(names[0], 0, got);
		assert_int_equal(buf_used(&got[0]), 300000);
		assert_int_equal(buf_used(&got[1]), 1 << 20);
		assert_memory_equal(buf_head(&got[0]), up, 300000);
		assert_memory_equal(buf_head(&got[1]), down, 1 << 20);
		buf_free(&got[0]);
		buf_free(&got[1]);
		/* The comment names the session; the mixed pair shows as v4-mapped IPv6. */
		snprintf(cmd, sizeof cmd,
		         "tshark -r '%s' -Y 'frame.comment contains \"capd session 42 forward/fwd\" && "
		         "ipv6.src == ::ffff:127.0.0.1' | grep -q . && "
		         "tshark -r '%s' -Y 'udp && frame.comment == \"capd session 43\"' | wc -l | grep -qx 2",
		         names[0], names[0]);
		assert_int_equal(system(cmd), 0);
	}

	/* A restart continues the numbering. */
	assert_int_equal(spool_start(&st, &why), 0);
	s = spool_status();
	assert_non_null(strstr(json_string_value(json_object_get(s, "file")), "/capd-00002-"));
	json_decref(s);
	assert_int_equal(spool_rotate(&why), 0);
	s = spool_status();
	assert_non_null(strstr(json_string_value(json_object_get(s, "file")), "/capd-00003-"));
	json_decref(s);
	spool_stop();
	assert_int_equal(spool_files(names, 8), 3);
	free(up);
	free(down);
	rm_spool();
}

/* One producer thread of test_spool_producers: its own flow, filled by copy and in place. */
struct producer {
	pthread_t th;
	int iface, i;
	uint8_t *down;
	size_t n;
};

static void *
producer_main(void *arg)
{
	struct producer *pr = arg;
	struct sockaddr_storage c = sa4("10.9.0.1", (uint16_t)(40000 + pr->i)), t = sa4("10.9.0.2", 443);
	struct spool_flow *f = spool_flow_open(pr->iface, 100 + (uint64_t)pr->i, IPPROTO_TCP, (struct sockaddr *)&c,
	                                       (struct sockaddr *)&t, NULL);
	size_t o = 0, k = 0;

	spool_flow_data(f, DIR_UP, "hi", 2);
	while (o < pr->n) {
		size_t want = 1 + (k * 7919 + (size_t)pr->i * 104729) % (300 << 10), n;
		struct spool_slot slot;
		uint8_t *p;

		if (want > pr->n - o)
			want = pr->n - o;
		if (k++ % 3 == 0) {
			spool_flow_data(f, DIR_DOWN, pr->down + o, want);
			o += want;
			continue;
		}
		/* a slot as the relay uses it: filled, sometimes only partly or not at all */
		p = spool_flow_reserve(f, DIR_DOWN, 256 << 10, &slot);
		assert_non_null(p);
		n = k % 5 == 0 ? 0 : want < (256u << 10) ? want : 256u << 10;
		memcpy(p, pr->down + o, n);
		spool_flow_commit(&slot, n);
		o += n;
	}
	spool_flow_fin(f, DIR_UP);
	spool_flow_fin(f, DIR_DOWN);
	spool_flow_close(f, false);
	return NULL;
}

/*
 * Producers on several threads at once (one loop per core): each flow's
 * bytes come back exact and in order, whichever way they were queued.
 */
static void
test_spool_producers(void **state)
{
	struct capd_settings st = { .keep_files = 32, .flush_interval = 0.2 };
	struct producer pr[4];
	char names[8][400];
	int iface;

	(void)state;
	spool_fresh(&st, "spool");
	iface = spool_iface_add("mt", NULL, PCAPNG_LINKTYPE_RAW, 65535, false);
	for (int i = 0; i < 4; i++) {
		pr[i] = (struct producer){ .iface = iface, .i = i, .n = (size_t)(3 + i) << 20 };
		pr[i].down = pattern(pr[i].n, 50 + (uint32_t)i);
		assert_int_equal(pthread_create(&pr[i].th, NULL, producer_main, &pr[i]), 0);
	}
	for (int i = 0; i < 4; i++)
		pthread_join(pr[i].th, NULL);
	spool_stop();
	assert_int_equal(status_int("dropped_bytes"), 0);
	assert_int_equal(spool_files(names, 8), 1);
	if (have_tshark()) {
		bool seen[4] = { false };

		tshark_clean(names[0]);
		for (int stream = 0; stream < 4; stream++) {
			struct buf got[2] = { { 0 }, { 0 } };
			int i;

			tshark_follow(names[0], stream, got);
			assert_int_equal(buf_used(&got[0]), 2);
			/* streams are numbered by first packet: find whose bytes these are */
			for (i = 0; i < 4; i++)
				if (!seen[i] && buf_used(&got[1]) == pr[i].n)
					break;
			assert_true(i < 4);
			seen[i] = true;
			assert_memory_equal(buf_head(&got[1]), pr[i].down, pr[i].n);
			buf_free(&got[0]);
			buf_free(&got[1]);
		}
	}
	for (int i = 0; i < 4; i++)
		free(pr[i].down);
	rm_spool();
}

static void
test_spool_rotation(void **state)
{
	struct capd_settings st = { .keep_files = 3, .flush_interval = 0.2, .rotate_size = 200000 };
	struct sockaddr_storage c = sa6("::1", 45000), t = sa6("::1", 9000);
	char names[16][400];
	struct spool_flow *f;
	size_t total = (2 << 20) + 1000;
	uint8_t *down = pattern(total, 7);
	int n, iface;

	(void)state;
	spool_fresh(&st, "ring");
	iface = spool_iface_add("ring", NULL, PCAPNG_LINKTYPE_RAW, 65535, true);
	f = spool_flow_open(iface, 7, IPPROTO_TCP, (struct sockaddr *)&c, (struct sockaddr *)&t, NULL);
	for (size_t o = 0; o < total; o += 65536) {
		spool_flow_data(f, DIR_DOWN, down + o, total - o < 65536 ? total - o : 65536);
		usleep(1000);  /* lets the writer keep pace: no drops in this test */
	}
	spool_flow_close(f, true);
	spool_stop();
	assert_int_equal(status_int("dropped_packets"), 0);

	/* Exactly keep_files files, each standing alone; together they end the stream. */
	n = spool_files(names, 16);
	assert_int_equal(n, 3);
	for (int i = 0; i < n; i++) {
		struct stat sb;

		assert_int_equal(stat(names[i], &sb), 0);
		assert_true(sb.st_size > 1000);
		if (have_tshark()) {
			char cmd[2048];

			tshark_clean(names[i]);
			snprintf(cmd, sizeof cmd, "capinfos '%.400s' >/dev/null 2>&1", names[i]);
			assert_int_equal(system(cmd), 0);
		}
	}
	if (have_tshark()) {
		char cmd[2048];
		struct buf got[2] = { { 0 }, { 0 } };
		char merged[64];

		/*
		 * The newest files hold the tail of the stream, byte-exact. Without
		 * the SYN, tshark's node 0 is the target (the first sender).
		 */
		snprintf(merged, sizeof merged, "/tmp/capd-test-ring-merged-%d.pcapng", (int)getpid());
		snprintf(cmd, sizeof cmd, "mergecap -w %s '%s' '%s' '%s'", merged, names[0], names[1], names[2]);
		assert_int_equal(system(cmd), 0);
		tshark_follow(merged, 0, got);
		assert_int_equal(buf_used(&got[1]), 0);
		assert_true(buf_used(&got[0]) > 2 * 200000 && buf_used(&got[0]) < total);
		assert_memory_equal(buf_head(&got[0]), down + total - buf_used(&got[0]), buf_used(&got[0]));
		buf_free(&got[0]);
		buf_free(&got[1]);
		unlink(merged);
	}
	free(down);
	rm_spool();
}

/* Time rotation makes a file per period with traffic, and none without. */
static void
test_spool_rotate_time(void **state)
{
	struct capd_settings st = { .keep_files = 0, .flush_interval = 0.1, .rotate_time = 0.3 };
	struct sockaddr_storage c = sa4("127.0.0.1", 45000), t = sa4("127.0.0.1", 9000);
	char names[32][400];
	struct spool_flow *f;
	int n;

	(void)state;
	spool_fresh(&st, "time");
	f = spool_flow_open(spool_iface_add("t", NULL, PCAPNG_LINKTYPE_RAW, 65535, false), 1, IPPROTO_TCP,
	                    (struct sockaddr *)&c, (struct sockaddr *)&t, NULL);
	for (int i = 0; i < 10; i++) {
		spool_flow_data(f, DIR_UP, "ping", 4);
		usleep(100000);
	}
	n = spool_files(names, 32);
	assert_true(n >= 3 && n <= 5);
	usleep(1000000);
	assert_int_equal(spool_files(names, 32), n);
	spool_flow_close(f, false);
	spool_stop();
	n = spool_files(names, 32);
	for (int i = 0; i < n && have_tshark(); i++)
		tshark_clean(names[i]);
	rm_spool();
}

/* spool_packet says which packets its queue refused: a sniffer counts its
 * own drops from that, not from the spool's global count. */
static void
test_spool_packet_refused(void **state)
{
	struct capd_settings st = { .keep_files = 3, .flush_interval = 0.1 };
	struct timespec ts = { 1, 0 };
	static const uint8_t pkt[64];
	int64_t dropped;
	int iface;

	(void)state;
	spool_fresh(&st, "refused");
	iface = spool_iface_add("sn", NULL, PCAPNG_LINKTYPE_RAW, 65535, false);
	dropped = status_int("dropped_packets");
	assert_true(spool_packet(iface, &ts, pkt, sizeof pkt, sizeof pkt));
	/* larger than the whole queue: refused before its bytes are read */
	assert_false(spool_packet(iface, &ts, pkt, (size_t)1 << 31, (size_t)1 << 31));
	assert_int_equal(status_int("dropped_packets"), dropped + 1);
	spool_stop();
	rm_spool();
}

/*
 * A disk that fills up, simulated with RLIMIT_FSIZE: writes fail part way,
 * capture is dropped and counted, the file keeps only whole blocks, and
 * writing resumes once there is room again.
 */
static void
test_spool_disk_full(void **state)
{
	struct capd_settings st = { .keep_files = 3, .flush_interval = 0.1 };
	struct sockaddr_storage c = sa4("127.0.0.1", 45000), t = sa4("127.0.0.1", 9000);
	char *why = NULL, names[4][400];
	struct rlimit old, lim;
	struct spool_flow *f;
	uint8_t *data = pattern(1 << 20, 9), *tail = pattern(100000, 10);
	int64_t dropped, packets;
	struct stat sb;

	(void)state;
	snprintf(spool_tmp, sizeof spool_tmp, "/tmp/capd-test-full-%d", (int)getpid());
	rm_spool();
	st.spool = spool_tmp;
	signal(SIGXFSZ, SIG_IGN);
	getrlimit(RLIMIT_FSIZE, &old);
	lim = old;
	lim.rlim_cur = 300000;
	assert_int_equal(spool_start(&st, &why), 0);
	dropped = status_int("dropped_packets");
	assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
	f = spool_flow_open(spool_iface_add("full", NULL, PCAPNG_LINKTYPE_RAW, 65535, false), 9, IPPROTO_TCP,
	                    (struct sockaddr *)&c, (struct sockaddr *)&t, NULL);
	for (size_t o = 0; o < (1 << 20); o += 65536) {
		spool_flow_data(f, DIR_DOWN, data + o, 65536);
		usleep(5000);
	}
	usleep(300000);
	assert_true(status_int("dropped_packets") > dropped);
	assert_int_equal(spool_files(names, 4), 1);
	assert_int_equal(stat(names[0], &sb), 0);
	assert_true(sb.st_size <= 300000);

	/* Room again: after the retry interval the rest of the stream is written. */
	assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
	usleep(1200000);
	packets = status_int("packets");
	dropped = status_int("dropped_packets");
	spool_flow_data(f, DIR_DOWN, tail, 100000);
	spool_flow_close(f, false);
	spool_stop();
	assert_int_equal(status_int("dropped_packets"), dropped);
	assert_true(status_int("packets") > packets);
	assert_int_equal(spool_files(names, 4), 1);
	if (have_tshark()) {
		struct buf got[2] = { { 0 }, { 0 } };

		tshark_clean(names[0]);
		tshark_follow(names[0], 0, got);
		assert_true(buf_used(&got[1]) > 100000);
		assert_memory_equal(buf_head(&got[1]), data, 65536);
		assert_memory_equal(buf_head(&got[1]) + buf_used(&got[1]) - 100000, tail, 100000);
		buf_free(&got[0]);
		buf_free(&got[1]);
	}
	free(data);
	free(tail);
	rm_spool();
}

/*
 * A flush that fails takes the Decryption Secrets Block in its buffer with
 * it, but not the file: once the writer retries, the session's later
 * packets go on in the same file. Its IDBs were written again; its key
 * lines were not, so those packets could not be decrypted.
 */
static void
test_spool_keys_after_failed_write(void **state)
{
	struct capd_settings st = { .keep_files = 3, .flush_interval = 0.05 };
	struct sockaddr_storage c = sa4("127.0.0.1", 45001), t = sa4("127.0.0.1", 443);
	static const char line[] = "CLIENT_RANDOM 0101010101010101010101010101010101010101010101010101010101010101 "
	                           "020202020202020202020202020202020202020202020202020202020202020202020202020202020202"
	                           "020202020202";
	uint8_t *data = pattern(1000, 12);
	char names[4][400], *file;
	struct rlimit old, lim;
	struct spool_flow *f;
	int64_t dropped;
	struct stat sb;
	FILE *fp;

	(void)state;
	signal(SIGXFSZ, SIG_IGN);
	spool_fresh(&st, "keys");
	f = spool_flow_open(spool_iface_add("keys", NULL, PCAPNG_LINKTYPE_RAW, 65535, false), 12, IPPROTO_TCP,
	                    (struct sockaddr *)&c, (struct sockaddr *)&t, NULL);
	spool_flow_data(f, DIR_UP, data, 300);  /* the handshake: on disk */
	usleep(200000);
	assert_int_equal(spool_files(names, 4), 1);
	assert_int_equal(stat(names[0], &sb), 0);
	/* the next write fails: the key lines and the packets after them are lost */
	getrlimit(RLIMIT_FSIZE, &old);
	lim = old;
	lim.rlim_cur = (rlim_t)sb.st_size;
	assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
	dropped = status_int("dropped_packets");
	spool_keylog(line);
	spool_flow_data(f, DIR_DOWN, data, 300);
	usleep(200000);
	assert_true(status_int("dropped_packets") > dropped);
	/* room again: after the retry the session goes on in this file */
	assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
	usleep(1100000);
	spool_flow_data(f, DIR_UP, data + 300, 300);
	spool_flow_close(f, false);
	spool_stop();
	assert_int_equal(spool_files(names, 4), 1);
	assert_int_equal(stat(names[0], &sb), 0);
	file = malloc((size_t)sb.st_size);
	fp = fopen(names[0], "rb");
	assert_non_null(fp);
	assert_int_equal(fread(file, 1, (size_t)sb.st_size, fp), (size_t)sb.st_size);
	fclose(fp);
	assert_non_null(memmem(file, (size_t)sb.st_size, line, sizeof line - 1));
	if (have_tshark())
		tshark_clean(names[0]);
	free(file);
	free(data);
	rm_spool();
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_tcp_v4),
		cmocka_unit_test(test_tcp_csum_lengths),
		cmocka_unit_test(test_tcp_reset),
		cmocka_unit_test(test_tcp_end_none),
		cmocka_unit_test(test_tcp_v6),
		cmocka_unit_test(test_mixed),
		cmocka_unit_test(test_udp),
		cmocka_unit_test(test_count),
		cmocka_unit_test(test_tshark_synth),
		cmocka_unit_test(test_spool_files),
		cmocka_unit_test(test_spool_producers),
		cmocka_unit_test(test_spool_rotation),
		cmocka_unit_test(test_spool_rotate_time),
		cmocka_unit_test(test_spool_packet_refused),
		cmocka_unit_test(test_spool_disk_full),
		cmocka_unit_test(test_spool_keys_after_failed_write),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

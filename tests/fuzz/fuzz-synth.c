/*
 * Fuzzes the capture encoder: random session events (open, data, gaps,
 * FINs, close or reset, for TCP or UDP, IPv4, IPv6 or mixed endpoints)
 * through spool-synth into pcapng blocks, checking that every block is
 * whole (its two length fields agree and are a multiple of four).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "pcapng.h"
#include "spool-synth.h"

static struct buf out;

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
	if (pkt->hdrlen + pkt->datalen > 65535)
		abort();  /* no packet is larger than IP allows */
	len = pcapng_epb(&out, &e);
	memcpy(&first, buf_head(&out) + before + 4, 4);
	memcpy(&last, buf_head(&out) + before + len - 4, 4);
	if (first != len || last != len || len % 4 != 0)
		abort();
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

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t payload[200000];
	struct sockaddr_storage c, t;
	struct synth_flow sf;
	size_t i = 4;

	if (size < 4)
		return 0;
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
		case 0: synth_data(&sf, dir, payload, n < sizeof payload ? n : sizeof payload); break;
		case 1: synth_gap(&sf, dir, n); break;
		case 2: synth_fin(&sf, dir); break;
		case 3: synth_close(&sf, op & 0x40); break;
		}
	}
	synth_close(&sf, false);
	return 0;
}

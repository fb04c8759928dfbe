/*
 * Unit tests for common/pcapng.c: every block type byte for byte, against
 * layouts written out by hand from the pcapng specification (little-endian
 * host, the only kind capd builds for).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "buf.h"
#include "pcapng.h"

#define FF8 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff

static void
assert_block(struct buf *b, const uint8_t *want, size_t n, size_t got)
{
	assert_int_equal(got, n);
	assert_int_equal(buf_used(b), n);
	assert_memory_equal(buf_head(b), want, n);
}

static void
test_shb(void **state)
{
	static const uint8_t bare[] = {
		0x0a, 0x0d, 0x0d, 0x0a, 28, 0, 0, 0,
		0x4d, 0x3c, 0x2b, 0x1a, 1, 0, 0, 0,  /* byte-order magic, version 1.0 */
		FF8,                                 /* section length unknown */
		28, 0, 0, 0,
	};
	static const uint8_t opts[] = {
		0x0a, 0x0d, 0x0d, 0x0a, 52, 0, 0, 0,
		0x4d, 0x3c, 0x2b, 0x1a, 1, 0, 0, 0,
		FF8,
		3, 0, 5, 0, 'L', 'i', 'n', 'u', 'x', 0, 0, 0,  /* shb_os, padded */
		4, 0, 4, 0, 'c', 'a', 'p', 'd',              /* shb_userappl */
		0, 0, 0, 0,                                  /* opt_endofopt */
		52, 0, 0, 0,
	};
	struct buf b = { 0 };

	(void)state;
	assert_block(&b, bare, sizeof bare, pcapng_shb(&b, NULL, NULL, ""));
	buf_reset(&b);
	assert_block(&b, opts, sizeof opts, pcapng_shb(&b, NULL, "Linux", "capd"));
	buf_free(&b);
}

static void
test_idb(void **state)
{
	static const uint8_t us[] = {
		1, 0, 0, 0, 40, 0, 0, 0,
		101, 0, 0, 0, 0xff, 0xff, 0, 0,     /* LINKTYPE_RAW, reserved, snaplen 65535 */
		2, 0, 2, 0, 'l', 'o', 0, 0,         /* if_name */
		9, 0, 1, 0, 6, 0, 0, 0,             /* if_tsresol 6 */
		0, 0, 0, 0,
		40, 0, 0, 0,
	};
	static const uint8_t ns[] = {
		1, 0, 0, 0, 48, 0, 0, 0,
		1, 0, 0, 0, 0, 0, 4, 0,             /* Ethernet, snaplen 262144 */
		2, 0, 1, 0, 'a', 0, 0, 0,
		3, 0, 4, 0, 'd', 'e', 's', 'c',     /* if_description */
		9, 0, 1, 0, 9, 0, 0, 0,             /* if_tsresol 9 */
		0, 0, 0, 0,
		48, 0, 0, 0,
	};
	static const uint8_t filtered[] = {
		1, 0, 0, 0, 52, 0, 0, 0,
		1, 0, 0, 0, 0, 0, 4, 0,
		2, 0, 1, 0, 'a', 0, 0, 0,
		9, 0, 1, 0, 9, 0, 0, 0,
		11, 0, 6, 0, 0, 'u', 'd', 'p',     /* if_filter: 0 (a libpcap string), then it */
		' ', '9', 0, 0,
		0, 0, 0, 0,
		52, 0, 0, 0,
	};
	struct buf b = { 0 };
	struct pcapng_idb i = { .linktype = PCAPNG_LINKTYPE_RAW, .snaplen = 65535, .name = "lo" };

	(void)state;
	assert_block(&b, us, sizeof us, pcapng_idb(&b, &i));
	buf_reset(&b);
	i = (struct pcapng_idb){ .linktype = 1, .snaplen = 262144, .name = "a", .description = "desc",
	                         .tsnano = true };
	assert_block(&b, ns, sizeof ns, pcapng_idb(&b, &i));
	buf_reset(&b);
	i = (struct pcapng_idb){ .linktype = 1, .snaplen = 262144, .name = "a", .filter = "udp 9", .tsnano = true };
	assert_block(&b, filtered, sizeof filtered, pcapng_idb(&b, &i));
	buf_free(&b);
}

/*
 * A string longer than an option holds (65535 bytes) is cut between UTF-8
 * characters: "é" (c3 a9) after an odd prefix straddles byte 65535, and the
 * cut keeps the whole characters before it. Also if_filter (65534 bytes
 * after its code byte) and an EPB comment.
 */
static void
test_long_strings_cut_between_characters(void **state)
{
	size_t n = 70001;
	char *s = malloc(n + 1);
	struct buf b = { 0 };
	const uint8_t *p;
	uint16_t len;

	(void)state;
	s[0] = 'a';
	for (size_t i = 1; i + 1 < n; i += 2)
		memcpy(s + i, "\xc3\xa9", 2);
	s[n] = '\0';
	pcapng_idb(&b, &(struct pcapng_idb){ .linktype = 1, .name = "a", .description = s, .filter = s });
	p = buf_head(&b) + 16 + 8;             /* past the head and if_name "a" */
	memcpy(&len, p + 2, 2);
	assert_int_equal(len, 65535);          /* 'a' and 32767 é: odd, and whole */
	p += 4 + 65536 + 8;                    /* past the description and if_tsresol */
	memcpy(&len, p + 2, 2);
	assert_int_equal(len, 1 + 65533);      /* the code byte, 'a' and 32766 é */
	assert_int_equal(p[4 + len - 1] & 0xff, 0xa9);
	buf_reset(&b);
	s[1] = 'b';                            /* "ab" then é from byte 3: byte 65535 is a c3 */
	memmove(s + 2, s + 3, n - 2);
	pcapng_epb(&b, &(struct pcapng_epb){ .comment = s });
	p = buf_head(&b) + 28;
	memcpy(&len, p + 2, 2);
	assert_int_equal(len, 65534);
	assert_int_equal(p[4 + len - 1] & 0xff, 0xa9);
	buf_free(&b);
	free(s);
}

static void
test_epb(void **state)
{
	static const uint8_t full[] = {
		6, 0, 0, 0, 56, 0, 0, 0,
		2, 0, 0, 0,                         /* interface 2 */
		1, 0, 0, 0, 2, 0, 0, 0,             /* timestamp high, low */
		3, 0, 0, 0, 3, 0, 0, 0,             /* captured, original length */
		'a', 'b', 'c', 0,                   /* hdr then data, padded */
		1, 0, 2, 0, 'h', 'i', 0, 0,         /* opt_comment */
		2, 0, 4, 0, 2, 0, 0, 0,             /* epb_flags: outbound */
		0, 0, 0, 0,
		56, 0, 0, 0,
	};
	static const uint8_t bare[] = {
		6, 0, 0, 0, 36, 0, 0, 0,
		0, 0, 0, 0,
		0, 0, 0, 0, 7, 0, 0, 0,
		4, 0, 0, 0, 0xe8, 3, 0, 0,          /* a 1000-byte packet cut to 4 */
		1, 2, 3, 4,                         /* no padding needed, no options */
		36, 0, 0, 0,
	};
	static const uint8_t pkt[] = { 1, 2, 3, 4 };
	struct buf b = { 0 };
	struct pcapng_epb e = {
		.iface = 2, .ts = 0x0000000100000002ull, .hdr = "ab", .hdrlen = 2, .data = "c", .datalen = 1,
		.flags = PCAPNG_EPB_OUTBOUND, .comment = "hi",
	};

	(void)state;
	assert_int_equal(pcapng_epb_len(&e), sizeof full);
	assert_block(&b, full, sizeof full, pcapng_epb(&b, &e));
	buf_reset(&b);
	e = (struct pcapng_epb){ .ts = 7, .data = pkt, .datalen = 4, .origlen = 1000 };
	assert_int_equal(pcapng_epb_len(&e), sizeof bare);
	assert_block(&b, bare, sizeof bare, pcapng_epb(&b, &e));
	buf_free(&b);
}

static void
test_dsb(void **state)
{
	static const uint8_t want[] = {
		0x0a, 0, 0, 0, 24, 0, 0, 0,
		0x4b, 0x53, 0x4c, 0x54,             /* "TLSK" secrets type */
		2, 0, 0, 0,
		'k', '\n', 0, 0,
		24, 0, 0, 0,
	};
	struct buf b = { 0 };

	(void)state;
	assert_block(&b, want, sizeof want, pcapng_dsb(&b, PCAPNG_SECRETS_TLS, "k\n", 2));
	buf_free(&b);
}

static void
test_isb(void **state)
{
	static const uint8_t want[] = {
		5, 0, 0, 0, 64, 0, 0, 0,
		3, 0, 0, 0,                         /* interface 3 */
		1, 0, 0, 0, 2, 0, 0, 0,             /* timestamp high, low */
		4, 0, 8, 0, 7, 0, 0, 0, 0, 0, 0, 0, /* isb_ifrecv */
		5, 0, 8, 0, 1, 0, 0, 0, 0, 0, 0, 0, /* isb_ifdrop */
		7, 0, 8, 0, 0, 1, 0, 0, 0, 0, 0, 0, /* isb_osdrop */
		0, 0, 0, 0,
		64, 0, 0, 0,
	};
	struct buf b = { 0 };
	struct pcapng_isb s = { .iface = 3, .ts = 0x0000000100000002ull, .ifrecv = 7, .ifdrop = 1, .osdrop = 256 };

	(void)state;
	assert_block(&b, want, sizeof want, pcapng_isb(&b, &s));
	assert_int_equal(sizeof want, PCAPNG_ISB_LEN);
	buf_free(&b);
}

/* Without its data, plus the data put back at split: the same bytes as pcapng_epb. */
static void
test_epb_nodata(void **state)
{
	struct buf a = { 0 }, b = { 0 };
	struct pcapng_epb e = {
		.iface = 1, .ts = 99, .hdr = "HDR", .hdrlen = 3, .data = "payload!x", .datalen = 9,
		.flags = PCAPNG_EPB_INBOUND, .comment = "capd session 5",
	};
	size_t split = 0, len;

	(void)state;
	pcapng_shb(&a, NULL, NULL, NULL);
	pcapng_shb(&b, NULL, NULL, NULL);
	pcapng_epb(&a, &e);
	len = pcapng_epb_nodata(&b, &e, &split);
	assert_int_equal(len, pcapng_epb_len(&e));
	assert_int_equal(buf_used(&b), 28 + len - 9);
	assert_int_equal(split, 8 + 20 + 3);  /* type, length, body fields, hdr */
	assert_memory_equal(buf_head(&a), buf_head(&b), 28 + split);
	assert_memory_equal(buf_head(&a) + 28 + split, "payload!x", 9);
	assert_memory_equal(buf_head(&a) + 28 + split + 9, buf_head(&b) + 28 + split, len - split - 9);
	buf_free(&a);
	buf_free(&b);
}

/* Blocks append one after another, each with matching leading and trailing lengths. */
static void
test_sequence(void **state)
{
	struct buf b = { 0 };
	struct pcapng_idb i = { .linktype = PCAPNG_LINKTYPE_RAW, .name = "x" };
	struct pcapng_epb e = { .data = "hello", .datalen = 5, .comment = "capd session 1" };
	size_t off = 0, n = 0;
	uint32_t type, len, trail;

	(void)state;
	pcapng_shb(&b, NULL, NULL, "capd");
	pcapng_idb(&b, &i);
	pcapng_epb(&b, &e);
	pcapng_epb(&b, &e);
	while (off < buf_used(&b)) {
		memcpy(&type, buf_head(&b) + off, 4);
		memcpy(&len, buf_head(&b) + off + 4, 4);
		memcpy(&trail, buf_head(&b) + off + len - 4, 4);
		assert_int_equal(len % 4, 0);
		assert_int_equal(len, trail);
		off += len;
		n++;
	}
	assert_int_equal(off, buf_used(&b));
	assert_int_equal(n, 4);
	buf_free(&b);
}

static void
test_ts(void **state)
{
	struct timespec ts = { .tv_sec = 1700000000, .tv_nsec = 123456789 };

	(void)state;
	assert_true(pcapng_ts(&ts, false) == 1700000000123456ull);
	assert_true(pcapng_ts(&ts, true) == 1700000000123456789ull);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_shb),
		cmocka_unit_test(test_idb),
		cmocka_unit_test(test_long_strings_cut_between_characters),
		cmocka_unit_test(test_epb),
		cmocka_unit_test(test_epb_nodata),
		cmocka_unit_test(test_dsb),
		cmocka_unit_test(test_isb),
		cmocka_unit_test(test_sequence),
		cmocka_unit_test(test_ts),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

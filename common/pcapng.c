/*
 * pcapng block encoder; see pcapng.h. Every block is laid out as
 * type, total length, body, options, total length again, with the body and
 * each option value padded to 32 bits. Blocks are sized first and then
 * written in place with one buf_reserve(), so a packet's payload is copied
 * exactly once.
 */
#include "pcapng.h"

#include <string.h>

#define OPT_ENDOFOPT 0
#define OPT_COMMENT 1
#define SHB_HARDWARE 2
#define SHB_OS 3
#define SHB_USERAPPL 4
#define IF_NAME 2
#define IF_DESCRIPTION 3
#define IF_TSRESOL 9
#define IF_FILTER 11
#define ISB_IFRECV 4
#define ISB_IFDROP 5
#define ISB_OSDROP 7
#define EPB_FLAGS 2

static inline size_t
pad4(size_t n)
{
	return (n + 3) & ~(size_t)3;
}

/* Room one option takes: code, length, value padded. */
static inline size_t
opt_len(size_t vlen)
{
	return 4 + pad4(vlen);
}

/*
 * The first n bytes of s or fewer, ending on a UTF-8 character boundary:
 * pcapng strings must be valid UTF-8, and a cut through a character
 * leaves half of it (Wireshark shows a replacement character).
 */
static size_t
utf8_cut(const char *s, size_t n)
{
	const unsigned char *u = (const unsigned char *)s;

	while (n > 0 && (u[n] & 0xc0) == 0x80)
		n--;
	return n;
}

/* An option's length field is 16 bits: longer strings are cut, between characters. */
static inline size_t
str_len(const char *s)
{
	size_t n = s != NULL ? strnlen(s, UINT16_MAX) : 0;

	return n == UINT16_MAX ? utf8_cut(s, n) : n;
}

static inline size_t
opt_str_len(const char *s)
{
	size_t n = str_len(s);

	return n ? opt_len(n) : 0;
}

static inline uint8_t *
put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
	return p + 4;
}

static inline uint8_t *
put16(uint8_t *p, uint16_t v)
{
	memcpy(p, &v, 2);
	return p + 2;
}

/* Copies n bytes and zero-fills up to the next 32-bit boundary. */
static inline uint8_t *
put_padded(uint8_t *p, const void *v, size_t n)
{
	size_t padded = pad4(n);

	if (n > 0)
		memcpy(p, v, n);
	memset(p + n, 0, padded - n);
	return p + padded;
}

static uint8_t *
put_opt(uint8_t *p, uint16_t code, const void *v, size_t n)
{
	p = put16(p, code);
	p = put16(p, (uint16_t)n);
	return put_padded(p, v, n);
}

static uint8_t *
put_opt_str(uint8_t *p, uint16_t code, const char *s)
{
	size_t n = str_len(s);

	return n ? put_opt(p, code, s, n) : p;
}

/* The end-of-options marker, present only when some option was written. */
static uint8_t *
put_end(uint8_t *p)
{
	return put32(p, OPT_ENDOFOPT);
}

/* Reserves a block of len bytes and writes its type and leading length. */
static uint8_t *
block_begin(struct buf *b, uint32_t type, size_t len)
{
	uint8_t *p = buf_reserve(b, len);

	p = put32(p, type);
	return put32(p, (uint32_t)len);
}

static size_t
block_end(struct buf *b, uint8_t *p, size_t len)
{
	put32(p, (uint32_t)len);
	buf_commit(b, len);
	return len;
}

size_t
pcapng_shb(struct buf *b, const char *hardware, const char *os, const char *userappl)
{
	size_t opts = opt_str_len(hardware) + opt_str_len(os) + opt_str_len(userappl);
	size_t len = 12 + 4 + 2 + 2 + 8 + opts + (opts ? 4 : 0);
	uint8_t *p = block_begin(b, PCAPNG_BT_SHB, len);
	uint64_t unknown = UINT64_MAX;  /* section length not known in advance */

	p = put32(p, PCAPNG_BYTE_ORDER_MAGIC);
	p = put16(p, 1);
	p = put16(p, 0);
	memcpy(p, &unknown, 8);
	p += 8;
	p = put_opt_str(p, SHB_HARDWARE, hardware);
	p = put_opt_str(p, SHB_OS, os);
	p = put_opt_str(p, SHB_USERAPPL, userappl);
	if (opts)
		p = put_end(p);
	return block_end(b, p, len);
}

/* if_filter's value is a byte saying what follows (0: a libpcap filter string), then it */
static size_t
filter_len(const char *filter)
{
	size_t n = str_len(filter);

	return n < UINT16_MAX ? n : utf8_cut(filter, UINT16_MAX - 1);
}

size_t
pcapng_idb(struct buf *b, const struct pcapng_idb *idb)
{
	size_t nfilter = filter_len(idb->filter);
	size_t opts = opt_str_len(idb->name) + opt_str_len(idb->description) + opt_len(1) +
	              (nfilter ? opt_len(1 + nfilter) : 0);
	size_t len = 12 + 2 + 2 + 4 + opts + 4;
	uint8_t *p = block_begin(b, PCAPNG_BT_IDB, len);
	uint8_t tsresol = idb->tsnano ? 9 : 6;

	p = put16(p, idb->linktype);
	p = put16(p, 0);
	p = put32(p, idb->snaplen);
	p = put_opt_str(p, IF_NAME, idb->name);
	p = put_opt_str(p, IF_DESCRIPTION, idb->description);
	/* Always written, though 6 is the default: readers then never guess. */
	p = put_opt(p, IF_TSRESOL, &tsresol, 1);
	if (nfilter) {
		p = put16(p, IF_FILTER);
		p = put16(p, (uint16_t)(1 + nfilter));
		*p = 0;
		memcpy(p + 1, idb->filter, nfilter);
		memset(p + 1 + nfilter, 0, pad4(1 + nfilter) - 1 - nfilter);
		p += pad4(1 + nfilter);
	}
	p = put_end(p);
	return block_end(b, p, len);
}

static size_t
epb_opts_len(const struct pcapng_epb *e)
{
	size_t opts = opt_str_len(e->comment) + (e->flags ? opt_len(4) : 0);

	return opts ? opts + 4 : 0;
}

size_t
pcapng_epb_len(const struct pcapng_epb *e)
{
	return 12 + 20 + pad4(e->hdrlen + e->datalen) + epb_opts_len(e);
}

/* The EPB, with or without its data bytes in b (see pcapng_epb_nodata). */
static size_t
epb_encode(struct buf *b, const struct pcapng_epb *e, bool copy, size_t *split)
{
	size_t caplen = e->hdrlen + e->datalen;
	size_t len = pcapng_epb_len(e);
	size_t room = copy ? len : len - e->datalen;
	uint8_t *start = buf_reserve(b, room), *p = start;
	size_t padded = pad4(caplen);

	p = put32(p, PCAPNG_BT_EPB);
	p = put32(p, (uint32_t)len);
	p = put32(p, e->iface);
	p = put32(p, (uint32_t)(e->ts >> 32));
	p = put32(p, (uint32_t)e->ts);
	p = put32(p, (uint32_t)caplen);
	p = put32(p, e->origlen ? e->origlen : (uint32_t)caplen);
	if (e->hdrlen > 0)
		memcpy(p, e->hdr, e->hdrlen);
	p += e->hdrlen;
	if (split != NULL)
		*split = (size_t)(p - start);
	if (copy && e->datalen > 0)
		memcpy(p, e->data, e->datalen);
	if (copy)
		p += e->datalen;
	memset(p, 0, padded - caplen);
	p += padded - caplen;
	if (epb_opts_len(e)) {
		p = put_opt_str(p, OPT_COMMENT, e->comment);
		if (e->flags)
			p = put_opt(p, EPB_FLAGS, &e->flags, 4);
		p = put_end(p);
	}
	put32(p, (uint32_t)len);
	buf_commit(b, room);
	return len;
}

size_t
pcapng_epb(struct buf *b, const struct pcapng_epb *e)
{
	return epb_encode(b, e, true, NULL);
}

size_t
pcapng_epb_nodata(struct buf *b, const struct pcapng_epb *e, size_t *split)
{
	return epb_encode(b, e, false, split);
}

size_t
pcapng_dsb(struct buf *b, uint32_t type, const void *secrets, size_t n)
{
	size_t len = 12 + 8 + pad4(n);
	uint8_t *p = block_begin(b, PCAPNG_BT_DSB, len);

	p = put32(p, type);
	p = put32(p, (uint32_t)n);
	p = put_padded(p, secrets, n);
	return block_end(b, p, len);
}

size_t
pcapng_isb(struct buf *b, const struct pcapng_isb *s)
{
	size_t len = PCAPNG_ISB_LEN;
	uint8_t *p = block_begin(b, PCAPNG_BT_ISB, len);

	p = put32(p, s->iface);
	p = put32(p, (uint32_t)(s->ts >> 32));
	p = put32(p, (uint32_t)s->ts);
	p = put_opt(p, ISB_IFRECV, &s->ifrecv, 8);
	p = put_opt(p, ISB_IFDROP, &s->ifdrop, 8);
	p = put_opt(p, ISB_OSDROP, &s->osdrop, 8);
	p = put_end(p);
	return block_end(b, p, len);
}

uint64_t
pcapng_ts(const struct timespec *ts, bool nano)
{
	uint64_t s = (uint64_t)ts->tv_sec;

	if (nano)
		return s * 1000000000u + (uint64_t)ts->tv_nsec;
	return s * 1000000u + (uint64_t)ts->tv_nsec / 1000u;
}

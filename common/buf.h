/*
 * A growable byte buffer with a read offset: bytes are appended at the end
 * and consumed from the front. Used for handshakes and control framing;
 * the relay has its own fixed buffers.
 * Owner: whoever embeds it; buf_free() releases the storage.
 */
#ifndef CAPD_BUF_H
#define CAPD_BUF_H

#include <stddef.h>
#include <stdint.h>

struct buf {
	uint8_t *data;
	size_t off;  /* first unread byte */
	size_t len;  /* end of valid data */
	size_t cap;
};

/* Where a buffer that never grew points (buf.c): buffers are made zeroed
 * (= {0}, memset, calloc), so their data is NULL, and NULL + 0 is undefined
 * in C, as is memcpy(dst, NULL, 0). Never written: its length is 0. */
extern const uint8_t buf_empty[1];

/* The buffer's storage, never NULL: a test and a cmov where buf_head is
 * called per send, no branch. */
static inline uint8_t *buf_base(const struct buf *b) { return b->data ? b->data : (uint8_t *)buf_empty; }
static inline size_t buf_used(const struct buf *b) { return b->len - b->off; }
static inline uint8_t *buf_head(const struct buf *b) { return buf_base(b) + b->off; }

void buf_append(struct buf *b, const void *p, size_t n);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Makes room for n more bytes and returns where to write them; call buf_commit after. */
uint8_t *buf_reserve(struct buf *b, size_t n);
void buf_commit(struct buf *b, size_t n);
void buf_consume(struct buf *b, size_t n);
void buf_reset(struct buf *b);
void buf_free(struct buf *b);

#endif

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

static inline size_t buf_used(const struct buf *b) { return b->len - b->off; }
static inline uint8_t *buf_head(const struct buf *b) { return b->data + b->off; }

void buf_append(struct buf *b, const void *p, size_t n);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Makes room for n more bytes and returns where to write them; call buf_commit after. */
uint8_t *buf_reserve(struct buf *b, size_t n);
void buf_commit(struct buf *b, size_t n);
void buf_consume(struct buf *b, size_t n);
void buf_reset(struct buf *b);
void buf_free(struct buf *b);

#endif

/*
 * pcapng encoding (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html):
 * appends whole blocks to a caller's buffer, in host byte order (the byte-order
 * magic in the Section Header tells readers which). Pure functions with no I/O,
 * shared by the daemon's spool and by capctl's live streams.
 */
#ifndef CAPD_PCAPNG_H
#define CAPD_PCAPNG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "buf.h"

#define PCAPNG_BT_SHB 0x0A0D0D0Au
#define PCAPNG_BT_IDB 0x00000001u
#define PCAPNG_BT_EPB 0x00000006u
#define PCAPNG_BT_DSB 0x0000000Au
#define PCAPNG_BT_ISB 0x00000005u
#define PCAPNG_ISB_LEN 64u         /* what pcapng_isb appends, always */
#define PCAPNG_BYTE_ORDER_MAGIC 0x1A2B3C4Du

#define PCAPNG_LINKTYPE_RAW 101          /* bare IPv4/IPv6 packets */
#define PCAPNG_SECRETS_TLS 0x544c534bu   /* "TLSK": NSS key log lines */

/* epb_flags bits 0-1: direction the packet travelled. */
#define PCAPNG_EPB_INBOUND 0x1u
#define PCAPNG_EPB_OUTBOUND 0x2u

/* One interface (IDB); strings may be NULL. */
struct pcapng_idb {
	uint16_t linktype;
	uint32_t snaplen;          /* 0: no limit */
	const char *name;          /* if_name */
	const char *description;   /* if_description */
	const char *filter;        /* if_filter, a libpcap filter string; NULL: none */
	bool tsnano;               /* if_tsresol 9 (ns) instead of 6 (us) */
};

/*
 * One packet (EPB). Its bytes are hdr followed by data, so a caller that
 * builds headers separately does not copy the payload twice.
 */
struct pcapng_epb {
	uint32_t iface;            /* index of the IDB in this section */
	uint64_t ts;               /* in the interface's if_tsresol units */
	const void *hdr;
	size_t hdrlen;
	const void *data;
	size_t datalen;
	uint32_t origlen;          /* length on the wire; 0: hdrlen + datalen */
	uint32_t flags;            /* epb_flags; 0: option left out */
	const char *comment;       /* opt_comment, or NULL */
};

/* Each appends one block to b and returns its length in bytes. */
size_t pcapng_shb(struct buf *b, const char *hardware, const char *os, const char *userappl);
size_t pcapng_idb(struct buf *b, const struct pcapng_idb *idb);
size_t pcapng_epb(struct buf *b, const struct pcapng_epb *epb);
/*
 * The same EPB without its data bytes, for writers that hand the payload to
 * writev(2) instead of copying it: appends the block minus e->datalen bytes,
 * which belong at *split bytes after the start of what was appended. Returns
 * the full block length.
 */
size_t pcapng_epb_nodata(struct buf *b, const struct pcapng_epb *e, size_t *split);
/* Decryption Secrets Block: type is e.g. PCAPNG_SECRETS_TLS. */
size_t pcapng_dsb(struct buf *b, uint32_t type, const void *secrets, size_t n);

/* An interface's counters (ISB), as dumpcap writes them when it closes a file. */
struct pcapng_isb {
	uint32_t iface;            /* index of the IDB in this section */
	uint64_t ts;               /* when they were read, in the interface's if_tsresol units */
	uint64_t ifrecv;           /* isb_ifrecv: packets the capture got from the interface */
	uint64_t ifdrop;           /* isb_ifdrop: ... that the kernel dropped */
	uint64_t osdrop;           /* isb_osdrop: ... that the capturing program dropped */
};
size_t pcapng_isb(struct buf *b, const struct pcapng_isb *s);

/* The length pcapng_epb() would append, for budgeting before encoding. */
size_t pcapng_epb_len(const struct pcapng_epb *epb);
/* A timestamp in microseconds, or nanoseconds when nano. */
uint64_t pcapng_ts(const struct timespec *ts, bool nano);

#endif

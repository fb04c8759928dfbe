/*
 * The relay: the one byte pump every proxy hands its two connected sockets to.
 * Bounded buffer per direction, back-pressure, half-close, RST passed as RST,
 * idle timeout; each chunk goes through session_data() for capture and tail.
 */
#ifndef CAPD_RELAY_H
#define CAPD_RELAY_H

#include "session.h"

#define RELAY_BUF (64 * 1024)

/* Both s->client.fd and s->upstream.fd are connected. Bytes left in
 * s->hs_in go upstream first, bytes in s->hs_out go to the client first. */
void relay_start(struct session *s);
/* Stops watchers and releases buffers (session_close calls it). */
void relay_stop(struct session *s);
void relay_shutdown(void);
/* Gives back the pooled buffers and pipes (session.c calls it when no session is open). */
void relay_trim(void);

/*
 * Filters: how a message-aware proxy (http, reverse) frames what it relays
 * without moving bytes itself. Set s->filter before relay_start(); bytes of
 * either direction are then shown to filter->data before they pass, and the
 * hs_in leftover is shown too (not sent as is). Details at the top of relay.c.
 */
enum relay_verdict {
	RELAY_PASS,  /* the first *used bytes pass unchanged: captured (session_data) and sent */
	RELAY_EAT,   /* the filter took the first *used bytes (a head it rewrites): not sent, not captured */
	RELAY_MORE,  /* too few bytes to judge: keep all, read more, ask again with the longer run */
	RELAY_END,   /* a message ended before p: hold p, stop reading, call ->done once all before is sent */
	RELAY_STOP,  /* the filter closed the session (or handed its client on): return at once */
};

enum { RELAY_MSG_FLOW, RELAY_MSG_ENDING, RELAY_MSG_HELD };

/* Static table owned by the proxy module. */
/* What a filter makes of a failed upstream (relay_filter.upstream_failed). */
enum relay_upfail {
	RELAY_UPFAIL_RESET,    /* the session is reset, both sockets */
	RELAY_UPFAIL_ANSWERED, /* the filter queued an answer and finished DIR_DOWN: the upstream is dropped */
	RELAY_UPFAIL_READ_ON,  /* the upload is dropped and the upstream read on: its answer may wait there */
	RELAY_UPFAIL_GONE,     /* as a FIN ->eof keeps: the upstream is dropped, direction down held, the
	                        * client read on (the filter sends nothing upstream again); or the filter
	                        * closed the session */
};

struct relay_filter {
	/* n > 0 bytes at p wait in direction d; *used must be 1..n for PASS and EAT. */
	enum relay_verdict (*data)(struct session *s, enum dir d, const uint8_t *p, size_t n, size_t *used);
	/* Direction d is quiet: a message ended (RELAY_END) and all of it was sent,
	 * or the FIN was passed on (s->dir[d].shut). May resume, finish, close. */
	void (*done)(struct session *s, enum dir d);
	/* The source of d sent FIN. RELAY_PASS: pass it on (then ->done);
	 * RELAY_END: keep it (d is held; relay_resume passes it on);
	 * RELAY_STOP: the filter closed the session or handed its client on. */
	enum relay_verdict (*eof)(struct session *s, enum dir d);
	/* The upstream socket failed (why: "upstream reset", ...) while sending
	 * direction up (sending) or reading direction down. May be NULL (RESET). */
	enum relay_upfail (*upstream_failed)(struct session *s, const char *why, bool sending);
	/* The client closed (closed: 1 for a FIN, -1 for a reset) while direction
	 * up was held with nothing read after the message. May be NULL: the client
	 * is then not watched while held. True: the filter closed the session;
	 * false: the close is left unread until relay_resume, as are bytes. */
	bool (*held_closed)(struct session *s, int closed);
};

/* Queues bytes for d's destination after everything already passed; the
 * caller captures them itself (session_data) when they are application data. */
void relay_inject(struct session *s, enum dir d, const void *p, size_t n);
/* From filter->data: the message of d ends after the bytes of this verdict. */
void relay_hold(struct session *s, enum dir d);
/* A held direction reads and judges again, beginning with what it held. */
void relay_resume(struct session *s, enum dir d);
/* Direction d sends what is queued, then a FIN, then calls ->done; its source
 * is not read again and held or unjudged bytes are dropped. */
void relay_finish(struct session *s, enum dir d);
/* The bytes direction d holds or has not judged yet (valid until the relay runs again). */
size_t relay_held(struct session *s, enum dir d, const uint8_t **p);
/* Whether d's source has closed, its FIN read or waiting unread behind
 * nothing else: 1 for a FIN, -1 for a reset or error, 0 while open (or not
 * known: a TLS side's close waits in a record). */
int relay_src_closed(struct session *s, enum dir d);

#endif

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

#endif

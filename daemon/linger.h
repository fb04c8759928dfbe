/*
 * Lingering close: a client refused while it still sends (an upload to a
 * route that does not exist) must read the refusal before the connection
 * goes. Closed with unread bytes, or with bytes still arriving, the socket
 * sends a reset, and the client's stack throws the reply away with it (and
 * curl, still writing, reports a failed send). Like nginx's lingering_close,
 * the socket is handed over after the reply and its FIN: what the client
 * still sends is read and dropped until it closes or LINGER_SECS pass.
 */
#ifndef CAPD_LINGER_H
#define CAPD_LINGER_H

#include <ev.h>
#include <stdbool.h>

struct spool_flow;

#define LINGER_SECS 5.0

/* Takes fd (its reply and FIN sent): reads and drops on loop until EOF, an
 * error or LINGER_SECS, then closes it. Never keeps the loop alive. */
void linger_start(struct ev_loop *loop, int fd);
/* linger_start for a refusal's capture flow (session_refused_say), which it
 * takes: what the client still sends is captured (read, so seen) when data
 * is true, and the flow ends as the client ends: its FIN, or its RST; at
 * LINGER_SECS or when the loop ends with no close, which the client has not
 * made. flow may be NULL. */
void linger_start_flow(struct ev_loop *loop, int fd, struct spool_flow *flow, bool data);
/* Closes the calling thread's lingering sockets now (its loop is ending). */
void linger_stop_all(void);

#endif

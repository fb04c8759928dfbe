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

#define LINGER_SECS 5.0

/* Takes fd (its reply and FIN sent): reads and drops on loop until EOF, an
 * error or LINGER_SECS, then closes it. Never keeps the loop alive. */
void linger_start(struct ev_loop *loop, int fd);
/* Closes the calling thread's lingering sockets now (its loop is ending). */
void linger_stop_all(void);

#endif

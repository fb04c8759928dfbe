/*
 * Chains of capd instances: a connection that capd makes to one of its own
 * listeners (a forward whose target is another instance, a SOCKS CONNECT to
 * one) becomes a session there that knows which instances it came through.
 * A connect toward one of those would go round again, each lap one more
 * session and two more descriptors, until capd ran out (forward a -> b,
 * b -> a): it fails instead.
 *
 * The connect path pays one bit test (chain_port_listened) unless the target
 * port is one that an instance listens on; the accept path one atomic load
 * unless such a connect is waiting to be accepted. A forward's UDP relay does
 * the same for each association's socket, and looks for a note when a new
 * client address sends.
 */
#ifndef CAPD_CHAIN_H
#define CAPD_CHAIN_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

struct instance;

#define CHAIN_MAX 8  /* instances one connection may pass through */

/* The instances a session's connection came through before its own, oldest
 * first, by serial (struct instance). Owned by the session, NULL when its
 * client is not capd. */
struct chain {
	unsigned n;
	uint64_t serial[CHAIN_MAX];
};

/* Rebuilds the set of listened ports; main thread, shards paused. */
void chain_ports_update(void);
/* Whether an instance listens on TCP port (any address): one bit test. */
bool chain_port_listened(uint16_t port);
/* The listed instance whose listen address a connect to sa reaches, or NULL. */
struct instance *chain_instance_at(const struct sockaddr *sa);
/* Whether c (may be NULL) passed through inst. */
bool chain_has(const struct chain *c, const struct instance *inst);
unsigned chain_len(const struct chain *c);

/*
 * Binds fd (a socket of type SOCK_STREAM about to connect to a listened port,
 * or SOCK_DGRAM about to send to one) to a port of its own and notes it as
 * leaving a session of instance from whose chain is c. Returns the port, or 0
 * when the bind failed (the socket then goes ahead unnoted).
 */
uint16_t chain_note(int fd, int type, const struct chain *c, const struct instance *from);
/* The note of port goes (its socket closes); port 0 does nothing. */
void chain_forget(uint16_t port, int type);
/* For a connection accepted from peer: the chain it continues (caller owns,
 * free()), or NULL when capd did not make it. Its note goes. */
struct chain *chain_take(const struct sockaddr *peer);
/* For a datagram from peer: the chain it continues, or NULL. The note stays
 * while its socket lives (chain_forget). */
struct chain *chain_find_udp(const struct sockaddr *peer);

#endif

/*
 * The datagram relay shared by SOCKS5 UDP ASSOCIATE and `forward` with
 * `udp = yes`: one UDP socket toward the clients, one association per
 * client address with its own upstream sockets, and one datagram session
 * per (association, remote endpoint) so each conversation is captured as
 * UDP between the real client and the real target.
 */
#ifndef CAPD_UDP_RELAY_H
#define CAPD_UDP_RELAY_H

#include <stdbool.h>
#include <sys/socket.h>

#include "addr.h"

struct instance;
struct session;
struct udp_relay;
struct udp_assoc;

#define UDP_IDLE_DEFAULT 60.0  /* seconds, when the instance sets no idle_timeout */

/*
 * Binds the client-facing socket on addr. socks: datagrams carry the RFC 1928
 * header and associations are made by udp_assoc_new(); otherwise (forward)
 * every client address becomes an association on its first datagram and all
 * its datagrams go to `to`. When addr's port is taken and fallback is set, an
 * ephemeral port is used. NULL with *why on failure. Owned by the caller's
 * instance runtime state; udp_relay_stop() ends it.
 */
struct udp_relay *udp_relay_start(struct instance *inst, const struct sockaddr *addr, bool socks,
                                  const struct hostport *to, bool fallback, char **why);
/* Ends every association (and its sessions) and frees r. NULL does nothing. */
void udp_relay_stop(struct udp_relay *r);
/* The address the client-facing socket is bound to. */
const struct sockaddr *udp_relay_addr(const struct udp_relay *r);

/*
 * SOCKS5 UDP ASSOCIATE: datagrams are accepted from client's address; a port
 * of 0 means the first datagram from that address fixes the port. ctrl is the
 * TCP control session. *backref is set to NULL if the relay ends the
 * association itself. The relay is the main loop's: a session on another
 * shard calls these under capd_lock (shard.h).
 */
struct udp_assoc *udp_assoc_new(struct udp_relay *r, struct session *ctrl, const struct sockaddr *client,
                                struct udp_assoc **backref);
/* Whether r has an association from client's address (its port aside) whose
 * client port is not known yet: another such one from there could not be
 * told apart from it on r's socket. */
bool udp_relay_loose_from(const struct udp_relay *r, const struct sockaddr *client);
/* When its last datagram passed: the control session's idle clock (proto->idle). */
double udp_assoc_last(const struct udp_assoc *a);
/*
 * Whether a datagram waits unread on a socket a is read from: its own upstream
 * ones, or the relay's toward the clients, which others share. An idle clock
 * that ran out then looks again UDP_RELOOK later, when capd has read it and
 * it has stamped a's clock if it was a's. Asked only when the clock runs out.
 */
bool udp_assoc_unread(const struct udp_assoc *a);
#define UDP_RELOOK 0.1  /* seconds */
/* Ends the association: its datagram sessions close with reason. NULL does nothing. */
void udp_assoc_end(struct udp_assoc *a, const char *reason);

/* For proto->session_free of a datagram session that belongs to a UDP relay. */
void udp_relay_session_free(struct session *s);
/* For proto->idle of such a session whose idle_timeout ran out: true when its
 * association has a datagram unread (udp_assoc_unread), and it looks again. */
bool udp_relay_session_idle(struct session *s);

#endif

/*
 * Sessions: one client connection (or UDP association) through an instance.
 * session.c owns the table, ids, handshake I/O, upstream connect and the one
 * teardown path; relay.c moves the bytes once both sides are connected.
 */
#ifndef CAPD_SESSION_H
#define CAPD_SESSION_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/socket.h>

#include "addr.h"
#include "buf.h"

struct chain;
struct instance;
struct resolve_req;
struct relay_filter;
struct relay_pipe;
struct spool_flow;
struct tail;
struct tls_session;
struct tls_side;

enum dir { DIR_UP = 0, DIR_DOWN = 1 };  /* up: client to server */

enum session_state { SESSION_HANDSHAKE, SESSION_OPEN, SESSION_CLOSING, SESSION_CLOSED };

/* One direction of the relay: bytes read from one side wait here for the other. */
struct relay_dir {
	uint8_t *buf;       /* RELAY_BUF bytes while data waits, else NULL (idle sessions hold none) */
	uint32_t off, len;  /* unsent bytes are buf[off..len) */
	bool eof;           /* the source sent FIN */
	bool shut;          /* FIN passed on to the destination */
	/* with a relay filter only (relay.h): bytes buf[len..fill) wait to be judged,
	 * pre holds injected bytes that go out before buf[off..len) */
	uint8_t msg;        /* RELAY_MSG_FLOW, _ENDING (a message ended), _HELD (until relay_resume) */
	bool finished;      /* relay_finish: nothing more is judged or held (in what was padding) */
	uint32_t fill;
	struct buf pre;
	/* splice path only (relay.c): a pipe while spliced bytes wait in it, else NULL */
	struct relay_pipe *pipe;
	uint32_t piped;     /* bytes in pipe */
	bool nosplice;      /* splice(2) refused these sockets: copy */
	/* beside nosplice, in what was padding: idle sessions stay as small */
	bool big;           /* buf is RELAY_BULK bytes (plain relay of a bulk flow) */
	bool bulk;          /* the last read was RELAY_BUF or more: the next buffer is big */
	uint8_t slot;       /* capture in place: the next spool slot is RELAY_SLOT_MIN << slot bytes */
	bool unread;        /* held (filter): bytes wait unread behind the message, the source is not watched */
};

struct side {
	int fd;             /* -1 when closed */
	ev_io rio, wio;
	struct tls_side *tls; /* TLS on this side (tls.c owns it), NULL for plain bytes */
};

/* Owned by the session table; session_close() ends it and frees it on the next loop pass. */
struct session {
	TAILQ_ENTRY(session) entry;
	uint64_t id;
	struct instance *inst;      /* borrowed; the instance outlives its sessions */
	struct shard *shard;        /* whose loop runs its watchers; only that thread uses its sockets */
	const char *proto;          /* "tcp", "udp", "socks5", "http" ... (static string) */
	enum session_state state;
	bool datagram;              /* UDP: no relay, data arrives by session_data() */
	bool accepted;              /* on a client connection of its own (session_new) */

	struct side client, upstream;
	struct sockaddr_storage client_addr, target_addr;
	bool have_target;           /* target_addr is set */
	bool inbound;               /* the target connected to capd (a SOCKS BIND peer): so in the capture */
	char target_name[HOST_MAX + 8]; /* "name:port" as the client asked, or "" */

	struct buf hs_in, hs_out;   /* handshake bytes; what is left passes to the relay */
	bool client_eof;            /* the client closed during the handshake */
	bool hs_replied;            /* the handshake sent the client a reply (it now waits for us) */
	bool up_established;        /* the upstream connect finished inside connect(2) */
	uint8_t excused;            /* times its deadline ran out on capd (session_hs_too_soon, session_resolve_too_soon) */
	float deadline_len;         /* seconds the deadline gave (session_set_deadline) */
	ev_timer timer;             /* handshake/connect deadline, then idle check */
	double deadline_at;         /* handshake/connect deadline, 0 when none */

	struct relay_dir dir[2];
	const struct relay_filter *filter; /* message-aware proxies (relay.h); NULL: plain byte relay */
	bool client_rd_paused, upstream_rd_paused;

	double started, ended, last_active;
	uint64_t taken_seen[2];     /* bytes the client, the upstream had taken at the last idle check */
	uint64_t bytes[2];          /* per enum dir, application bytes */
	char *reason;               /* why it closed, owned */
	char *note;                 /* handshake metadata for the session object (e.g. "socks5 user=bob") */
	size_t note_tls;            /* 1 + where TLS interception's part of note starts (the close line shows it); 0: none */
	char *why_connect;          /* text of the last connect failure */

	struct resolve_req *resolving;
	struct sockaddr_storage *cands;  /* addresses still to try, owned, only while connecting */
	int ncands, cand;
	uint16_t connect_port;
	uint16_t chain_port;        /* its upstream socket's port, noted for the instance it connects to, or 0 */
	int pending_err;            /* a connect failure waiting for the next loop pass */
	struct chain *chain;        /* the capd instances its client came through (chain.h), owned, or NULL */

	void *proto_state;          /* the protocol's, freed by proto->session_free */
	struct spool_flow *flow;    /* capture state, NULL when not capturing */
	struct spool_flow *refused; /* a refusal's capture, toward capd's own address (session_refused_heard), or NULL */
	struct tail *tail;          /* live subscribers and backlog, NULL until used */
	struct tls_session *tls;    /* interception state (tls.c), freed by relay_stop */
	bool upstream_reset;        /* the upstream reset and the session went on (HTTP: the client
	                             * got an answer, or goes on): session_close ends the capture
	                             * with that RST */
};

TAILQ_HEAD(session_list, session);
extern struct session_list sessions;

int session_table_init(const char *state_dir, char **why);
void session_table_shutdown(void);
/* Per event-loop thread: the reaper that frees closed sessions on the next pass. */
void session_loop_init(void);
void session_loop_fini(void);

/* Takes ownership of fd. Starts reading the handshake into hs_in and calls proto->accepted. */
struct session *session_new(struct instance *inst, int fd, const struct sockaddr *peer);
/* A client that speaks first (SOCKS, HTTP) has usually sent by the time it is
 * accepted: reads its first bytes now instead of waiting for the watcher. */
void session_read_first(struct session *s);
/* A datagram session (UDP association, DNS query): no sockets of its own. */
struct session *session_new_datagram(struct instance *inst, const char *proto,
                                     const struct sockaddr *client, const struct sockaddr *target);
struct session *session_find(uint64_t id);

/* Queues handshake reply bytes to the client (flushed by the write watcher). */
void session_send(struct session *s, const void *p, size_t n);
/* Resolves host (name or literal) asynchronously and connects; calls proto->connected. */
void session_connect(struct session *s, const char *host, uint16_t port);
void session_connect_addr(struct session *s, const struct sockaddr *sa);
/* Deadline for the handshake phase; cleared by relay_start. */
void session_set_deadline(struct session *s, double seconds);
/* For a timer about to blame a peer (only then, never per byte): whether the
 * peer did its part while capd was held up, and the loop's clock stood still:
 * its bytes wait unread on a side capd reads, or the upstream's connect is up
 * (then session_connect_cb runs later in this pass). */
bool session_peer_moved(struct session *s, struct ev_loop *loop);
/* Sets the upstream socket directly (BIND): takes fd, target is the peer. */
void session_set_upstream(struct session *s, int fd, const struct sockaddr *peer);

/* Every application byte passes here once: counters, capture, tail. */
void session_data(struct session *s, enum dir d, const void *p, size_t n);
/* Counters only, for bytes the relay spliced without seeing them (no capture, no tail). */
void session_bytes(struct session *s, enum dir d, size_t n);
/* Bytes of direction d the relay holds for its destination (buffer, injected, pipe). */
uint64_t session_held(const struct session *s, enum dir d);
/* Bytes in the kernel's send queue of side sd, not yet taken by its peer; 0 when none or unknown. */
uint64_t session_outq(const struct side *sd);
/* Half-close seen in direction d (FIN from its source). */
void session_shutdown_dir(struct session *s, enum dir d);
/* Hands the client's socket, its reply and FIN sent, to linger.h before a
 * session_close: a client that still sends is read a while, so that the close
 * is not a reset that throws the reply away. */
void session_linger_client(struct session *s);
/* The one teardown path: logs the summary line, records reason, frees later. */
void session_close(struct session *s, const char *reason);
/* Like session_close but resets both sockets (capctl kill); the capture's
 * flow ends with a RST from the target, or from the client when it reset. */
void session_reset(struct session *s, const char *reason);
void session_reset_by_client(struct session *s, const char *reason);
/*
 * A refusal before any upstream (an HTTP error reply, a SOCKS failure
 * reply): the capture shows it as the TCP conversation it was, between the
 * client and the address it connected to (its socket's local address), and
 * the flow opens only here, so an accepted session costs nothing more. heard:
 * n bytes the client sent that capd read, in their order; say: capd's reply,
 * sent (session_send) and captured as sent. The close follows as it comes:
 * capd's FIN and the client's close at session_linger_client; a session whose
 * client goes on in another (http_handoff) leaves the flow with no close.
 * Nothing when the instance does not capture. A session that relays has its
 * own flow besides (a request refused on a kept connection, http-proxy.c).
 */
void session_refused_heard(struct session *s, const void *p, size_t n);
void session_refused_say(struct session *s, const void *p, size_t n);
/* session_refused_say of a reply sent before (the steps of a handshake that
 * went on): captured only. */
void session_refused_said(struct session *s, const void *p, size_t n);
/* capd's FIN after the reply, in the refusal's capture, when it is decided
 * (relay_finish), before the client's close that answers it: the FIN the
 * client sent already, then capd's. */
void session_refused_shut(struct session *s);
/* Marks the handshake done: capture starts, state open, "session.open" event. */
void session_opened(struct session *s);

/* Runs fn(s, arg) as the shard that owns session id would (shard_call); -1 when no open session has that id. */
int session_call(uint64_t id, void (*fn)(struct session *s, void *arg), void *arg);

/*
 * A note is the protocol's part (a SOCKS request, an HTTP session's first
 * request line) and then TLS interception's, from note_tls on, joined by
 * "; ". The protocol's part can come second: a TLS client's first read may
 * bring its request and the end of its TLS, which TLS notes at once.
 */
/* Whether s's note has the protocol's part. */
bool session_note_has_proto(const struct session *s);
/* text (copied) becomes the protocol's part of s's note, in front of the TLS part. */
void session_note_proto(struct session *s, const char *text);
/* text (copied) goes at the end of the protocol's part of s's note, after a
 * space (an intercepted tunnel's first request after its CONNECT). */
void session_note_proto_add(struct session *s, const char *text);

json_t *session_json(struct session *s);  /* caller owns */
/* Open sessions then the closed history, newest last; instance may be NULL. */
json_t *session_list_json(const char *instance, bool open_only);
/* Closes inst's sessions (NULL: every session), each as its shard would. */
void session_close_instance(struct instance *inst, const char *reason);
unsigned session_open_count(void);
/* The open sessions on a client connection of their own, which may finish of
 * themselves: a datagram session ends only at its idle timeout, a traced
 * program's when the program's socket closes. */
unsigned session_stream_open_count(void);
/* ISO 8601 UTC "2026-11-25T18:12:00.123Z". */
char *session_time(double t, char *out, size_t n);

#endif

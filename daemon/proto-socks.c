/*
 * socks: SOCKS4, SOCKS4a and SOCKS5 (RFC 1928, RFC 1929 auth) on one port,
 * the version sniffed from the first byte. CONNECT connects upstream and
 * hands both sockets to the relay; BIND listens for one peer and hands that
 * connection to the relay; UDP ASSOCIATE keeps the TCP connection as the
 * association's lifeline while the datagram relay (udp-relay.c) moves the
 * datagrams. This file only parses handshakes and picks upstreams.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "capd.h"
#include "http-proxy.h"
#include "instance.h"
#include "log.h"
#include "relay.h"
#include "resolve.h"
#include "session.h"
#include "socks-parse.h"
#include "tls.h"
#include "udp-relay.h"
#include "users.h"
#include "xmalloc.h"

#define SOCKS_HS_MAX 2048  /* greeting + auth + request with room for early data */

/* The instance's parsed config: inst->cfg, freed by socks_free. */
struct socks_cfg {
	struct users *users;  /* NULL: no auth */
	bool socks4;          /* SOCKS4/4a accepted */
	double hs_timeout;    /* seconds; 0 = none */
	struct tls_cfg *tls;  /* tls* keys (tls.h): CONNECT tunnels may be intercepted */
};

enum socks_stage {
	SOCKS_ST_GREETING,    /* first byte decides the version */
	SOCKS_ST_AUTH,        /* RFC 1929 sub-negotiation */
	SOCKS_ST_REQUEST,     /* SOCKS5 request */
	SOCKS_ST_V4,          /* SOCKS4/4a request */
	SOCKS_ST_CONNECTING,  /* waiting for session_connect */
	SOCKS_ST_BIND,        /* BIND: resolving, then waiting for the peer */
	SOCKS_ST_UDP,         /* UDP ASSOCIATE: the TCP connection only keeps it alive */
};

/* BIND's listener; only BIND sessions have one. Owned by struct socks. */
struct socks_bind {
	int fd;                          /* listener, -1 when closed */
	ev_io io;
	ev_timer timer;                  /* how long the peer may take */
	struct resolve_req *rq;          /* resolving a named DST */
	struct sockaddr_storage expect;  /* the peer announced by the client */
	bool any;                        /* accept any peer address */
	int hup_fd;                      /* epoll set of the client's close alone (socks_bind_hup), or -1 */
	ev_io hup;
};

/*
 * A reply the handshake went on after (the method chosen, an auth status,
 * BIND's first reply), kept for the capture of a refusal that may follow
 * (socks_refused), which is opened only then.
 */
struct socks_step {
	uint16_t heard;       /* bytes of hs_in before it */
	uint8_t n;
	uint8_t said[SOCKS5_REPLY_MAX];
};
#define SOCKS_STEPS 3

/* s->proto_state during the handshake; freed before relay_start or by socks_session_free. */
struct socks {
	uint8_t stage;        /* enum socks_stage */
	uint8_t ver;          /* 4 or 5 once known */
	uint8_t nstep;
	uint16_t taken;       /* bytes of hs_in the parsed messages took: they stay there, for a
	                       * refusal's capture, until the grant consumes them */
	struct socks_step step[SOCKS_STEPS];
	char *user;           /* authenticated (or SOCKS4) user, owned, or NULL */
	struct socks_bind *bind;
	struct udp_assoc *assoc;  /* UDP ASSOCIATE; cleared by the relay if it ends it */
	struct udp_relay *relay;  /* a relay of assoc's own (socks_udp_start), or NULL */
};

static const char *const socks_keys[] = {
	"users", "auth", "socks4", "handshake_timeout",
	"tls", "tls_verify", "tls_capture", "tls_passthrough", "tls_auto_passthrough", "tls_timeout",
	"tls_client_cert", NULL,
};

/* Why an exposed instance is an open proxy, or NULL: said at start and by capd -t. */
static const char *
socks_open_why(const struct instance *inst, const struct socks_cfg *c)
{
	if (!inst->expose)
		return NULL;
	if (c->users == NULL)
		return "no users: this is an open proxy";
	/* SOCKS4 carries no password: its clients pass without the users */
	if (c->socks4)
		return "socks4 = yes: SOCKS4 needs no password, this is an open proxy";
	return NULL;
}

static int
socks_configure(struct instance *inst, struct params *p)
{
	struct socks_cfg *c = xcalloc(1, sizeof *c);
	const char *open_why;

	inst->cfg = c;
	c->users = users_load(p);
	if (p->why)
		return -1;
	/* SOCKS4 has no password: allowed by default only when no users are configured */
	if (params_bool(p, "socks4", c->users == NULL, &c->socks4) < 0 ||
	    params_duration(p, "handshake_timeout", 10, &c->hs_timeout) < 0)
		return -1;
	if ((open_why = socks_open_why(inst, c)) != NULL)
		params_warn_check(p, c->users == NULL ? "expose" : "socks4",
		                  "%s: exposed on %s with %s", inst->name, inst->listen_str, open_why);
	return tls_configure(inst, p, &c->tls);
}

static int
socks_start(struct instance *inst, char **why)
{
	struct socks_cfg *c = inst->cfg;
	const char *open_why = socks_open_why(inst, c);
	char *err = NULL;

	(void)why;
	if (open_why != NULL)
		log_warnx("%s: exposed on %s with %s", inst->name, inst->listen_str, open_why);
	/* UDP ASSOCIATE's relay on the same address and port when free */
	inst->proto_state = udp_relay_start(inst, (struct sockaddr *)&inst->listen, true, NULL, true, &err);
	if (inst->proto_state == NULL) {
		log_warnx("%s: UDP ASSOCIATE unavailable: %s", inst->name, err);
		free(err);
	}
	return 0;
}

static void
socks_stop(struct instance *inst)
{
	udp_relay_stop(inst->proto_state);
	inst->proto_state = NULL;
}

static void
socks_free(struct instance *inst)
{
	struct socks_cfg *c = inst->cfg;

	if (c == NULL)
		return;
	users_free(c->users);
	tls_cfg_free(c->tls);
	free(c);
}

static void
socks_describe(struct instance *inst, json_t *o)
{
	struct socks_cfg *c = inst->cfg;
	char a[ADDR_STRLEN];

	json_object_set_new(o, "auth", json_boolean(c->users != NULL));
	json_object_set_new(o, "users", json_integer((json_int_t)users_count(c->users)));
	json_object_set_new(o, "socks4", json_boolean(c->socks4));
	json_object_set_new(o, "handshake_timeout", json_real(c->hs_timeout));
	tls_describe(c->tls, o);
	if (inst->proto_state)
		json_object_set_new(o, "udp", json_string(addr_format(udp_relay_addr(inst->proto_state), a, sizeof a)));
}

/* ---- session side ---- */

static void
socks_bind_free(struct socks_bind *b)
{
	if (b == NULL)
		return;
	if (b->fd >= 0) {
		ev_io_stop(capd_loop, &b->io);
		close(b->fd);
	}
	if (b->hup_fd >= 0) {
		ev_io_stop(capd_loop, &b->hup);
		close(b->hup_fd);
	}
	ev_timer_stop(capd_loop, &b->timer);
	resolve_cancel(b->rq);
	free(b);
}

/* RFC 1928: the association lives as long as its control connection, so its
 * datagrams (carried on the main loop) keep the connection from idling out. */
static bool
socks_idle(struct session *s)
{
	struct socks *sk = s->proto_state;
	double last = 0, idle = s->inst->idle_timeout, now = capd_now();
	bool unread = false;

	if (s->datagram)
		return udp_relay_session_idle(s);
	if (sk == NULL)
		return false;
	capd_lock();
	if (sk->assoc) {
		last = udp_assoc_last(sk->assoc);
		unread = now - last >= idle && udp_assoc_unread(sk->assoc);
	}
	capd_unlock();
	if (unread)  /* the main loop reads it meanwhile: then it counts if it is the association's */
		last = now - idle + UDP_RELOOK;
	else if (now - last >= idle)
		return false;
	ev_timer_set(&s->timer, last + idle - now, 0.);
	ev_timer_start(capd_loop, &s->timer);
	return true;
}

/* The association and its datagram sessions are the main loop's (shard_as_main). */
static void
socks_assoc_end(void *assoc)
{
	udp_assoc_end(assoc, "udp association ended");
}

/* Likewise a relay of an association's own: it ends with its one association. */
static void
socks_relay_end(void *relay)
{
	udp_relay_stop(relay);
}

static void
socks_session_free(struct session *s)
{
	struct socks *sk = s->proto_state;

	if (s->datagram) {
		udp_relay_session_free(s);
		return;
	}
	if (sk == NULL)
		return;
	socks_bind_free(sk->bind);
	if (sk->assoc)
		shard_as_main(socks_assoc_end, sk->assoc);
	if (sk->relay)
		shard_as_main(socks_relay_end, sk->relay);
	free(sk->user);
	free(sk);
	s->proto_state = NULL;
}

static void
socks_accepted(struct session *s)
{
	struct socks_cfg *c = s->inst->cfg;
	struct socks *sk = xcalloc(1, sizeof *sk);

	sk->stage = SOCKS_ST_GREETING;
	s->proto_state = sk;
	s->proto = "socks";
	if (c->hs_timeout > 0)
		session_set_deadline(s, c->hs_timeout);
}

/*
 * Closes the client's side after its failure reply, so that the close is a
 * FIN and not a reset: a client that still sends (data pipelined behind a
 * request, as with optimistic data, up to a whole upload) would otherwise
 * get an RST, and its stack may throw the reply away with it. Once the reply
 * is out the socket lingers (linger.h), read and dropped until the client
 * closes; a reply still queued leaves only what has come read and dropped.
 */
static void
socks_client_done(struct session *s)
{
	uint8_t junk[2048];

	if (s->client.fd < 0)
		return;
	if (buf_used(&s->hs_out) == 0) {
		shutdown(s->client.fd, SHUT_WR);
		session_linger_client(s);
		return;
	}
	for (int i = 0; i < 8; i++)
		if (recv(s->client.fd, junk, sizeof junk, MSG_DONTWAIT) <= 0)
			break;
}

/* A reply the handshake goes on after: sent, and kept (struct socks_step). */
static void
socks_say(struct session *s, const uint8_t *p, size_t n)
{
	struct socks *sk = s->proto_state;

	if (sk->nstep < SOCKS_STEPS && n <= sizeof sk->step[0].said) {
		struct socks_step *st = &sk->step[sk->nstep++];

		st->heard = sk->taken;
		st->n = (uint8_t)n;
		memcpy(st->said, p, n);
	}
	session_send(s, p, n);
}

/* The refused handshake as it went, for the capture: what the client sent
 * and the replies in their turns, then the last reply (n bytes, maybe none),
 * which goes to the client now. */
static void
socks_refused(struct session *s, const uint8_t *reply, size_t n)
{
	struct socks *sk = s->proto_state;
	const uint8_t *p = buf_head(&s->hs_in);
	size_t at = 0;

	for (unsigned i = 0; i < sk->nstep; i++) {
		session_refused_heard(s, p + at, sk->step[i].heard - at);
		session_refused_said(s, sk->step[i].said, sk->step[i].n);
		at = sk->step[i].heard;
	}
	session_refused_heard(s, p + at, buf_used(&s->hs_in) - at);
	if (n > 0)
		session_refused_say(s, reply, n);
}

/* Refuses the handshake with reply (n bytes, maybe none), then one close with the reason. */
static void
socks_refuse_va(struct session *s, const uint8_t *reply, size_t n, const char *fmt, va_list ap)
{
	char why[512];

	vsnprintf(why, sizeof why, fmt, ap);
	socks_refused(s, reply, n);
	if (s->state != SESSION_CLOSED) {
		socks_client_done(s);
		session_close(s, why);
	}
}

/* socks_refuse with a reply of its own: a method or auth status that refuses. */
static void __attribute__((format(printf, 4, 5)))
socks_refuse_with(struct session *s, const uint8_t *reply, size_t n, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	socks_refuse_va(s, reply, n, fmt, ap);
	va_end(ap);
}

/* Refuses the handshake: the protocol's failure reply (when rep != 0), then one close with the reason. */
static void __attribute__((format(printf, 3, 4)))
socks_refuse(struct session *s, uint8_t rep, const char *fmt, ...)
{
	struct socks *sk = s->proto_state;
	uint8_t out[SOCKS5_REPLY_MAX];
	size_t n = 0;
	va_list ap;

	if (rep != 0 && sk->ver == 5)
		n = socks_reply5(out, rep, NULL);
	else if (rep != 0 && sk->ver == 4)
		n = socks_reply4(out, SOCKS4_REJECTED, NULL);
	va_start(ap, fmt);
	socks_refuse_va(s, out, n, fmt, ap);
	va_end(ap);
}

/* A copy of a client-supplied name fit for logs, notes and reasons: control
 * bytes become '?', and so do the non-ASCII bytes of a name that is not UTF-8
 * (a Latin-1 'J\xfcrgen'): notes and reasons go out as JSON strings, which
 * refuse it, and the session would show neither. */
static char *
socks_printable(const char *name)
{
	char *t = xstrdup(name);
	json_t *j;

	for (char *q = t; *q; q++)
		if ((unsigned char)*q < 0x20 || *q == 0x7f)
			*q = '?';
	if ((j = json_string(t)) != NULL) {
		json_decref(j);
		return t;
	}
	for (char *q = t; *q; q++)
		if ((unsigned char)*q >= 0x80)
			*q = '?';
	return t;
}

static uint8_t
socks_rep_of(int err)
{
	switch (err) {
	case ECONNREFUSED: return SOCKS_REP_REFUSED;
	case ENETUNREACH:  return SOCKS_REP_NET_UNREACH;
	case EHOSTUNREACH:
	case ENOENT:       return SOCKS_REP_HOST_UNREACH;
	case ETIMEDOUT:    return SOCKS_REP_TTL;
	/* capd's own refusal (session_target_refused: the instance itself, a loop
	 * of instances): "not allowed by ruleset", as dante answers its rules */
	case ELOOP:        return SOCKS_REP_DENIED;
	default:           return SOCKS_REP_FAIL;
	}
}

/* Sends the success reply naming bnd and hands the session to the relay,
 * through TLS interception for a CONNECT (intercept) when the instance asks. */
static void
socks_grant(struct session *s, const struct sockaddr *bnd, bool intercept)
{
	struct socks *sk = s->proto_state;
	struct socks_cfg *c = s->inst->cfg;
	uint8_t out[SOCKS5_REPLY_MAX];

	if (sk->ver == 5)
		session_send(s, out, socks_reply5(out, SOCKS_REP_OK, bnd));
	else
		session_send(s, out, socks_reply4(out, SOCKS4_GRANTED, bnd));
	if (s->state == SESSION_CLOSED)
		return;
	buf_consume(&s->hs_in, sk->taken);  /* what is left is early data, for the relay */
	/* the handshake state is done: idle tunnels keep only the session */
	socks_session_free(s);
	if (buf_used(&s->hs_in) == 0)
		buf_free(&s->hs_in);
	if (buf_used(&s->hs_out) == 0)
		buf_free(&s->hs_out);
	/* CONNECT tunnels may carry TLS to intercept; a BIND peer is not a server */
	if (intercept)
		tls_intercept_start(s, c->tls, http_note_inner);  /* relay_start() unless tls = yes|auto */
	else
		relay_start(s);
}

static void
socks_connected(struct session *s, int err)
{
	struct socks *sk = s->proto_state;
	struct sockaddr_storage bnd;
	socklen_t len = sizeof bnd;

	if (err != 0) {
		socks_refuse(s, sk->ver == 5 ? socks_rep_of(err) : SOCKS4_REJECTED, "%s",
		             s->why_connect ? s->why_connect : strerror(err));
		return;
	}
	if (getsockname(s->upstream.fd, (struct sockaddr *)&bnd, &len) < 0)
		memset(&bnd, 0, sizeof bnd);
	socks_grant(s, (struct sockaddr *)&bnd, true);
}

/* ---- BIND ---- */

/*
 * Whether BIND's peer connected and waits in the backlog: the loop's clock
 * stands still while capd is not scheduled (held up under load, SIGSTOP),
 * and after such a pause libev runs the expired timer before the accept.
 * Asked only when the timer runs out.
 */
static bool
socks_bind_peer_waits(const struct socks_bind *b)
{
	struct pollfd p = { .fd = b->fd, .events = POLLIN };

	return b->fd >= 0 && poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

static void
socks_bind_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;
	struct socks *sk = s->proto_state;

	(void)revents;
	if (sk->bind->rq != NULL ? resolve_take_unread() : socks_bind_peer_waits(sk->bind)) {
		/* what came while capd was held up is read later in this pass: the
		 * name's answer (the listener then starts the clock again), or the
		 * peer (one the accept refuses, not the announced one, leaves the
		 * wait to end at the next look) */
		if (sk->bind->rq == NULL)
			ev_feed_event(loop, &sk->bind->io, EV_READ);
		ev_timer_set(w, 0., 0.);
		ev_timer_start(loop, w);
		return;
	}
	/* the clock also runs while BIND's name resolves: no peer was waited for yet */
	if (sk->bind->rq != NULL)
		socks_refuse(s, sk->ver == 5 ? SOCKS_REP_TTL : SOCKS4_REJECTED, "%s: BIND: cannot resolve %s: timed out",
		             s->proto, s->target_name);
	else
		socks_refuse(s, sk->ver == 5 ? SOCKS_REP_TTL : SOCKS4_REJECTED, "%s: BIND timed out waiting for the peer",
		             s->proto);
}

static void
socks_bind_accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct session *s = w->data;
	struct socks *sk = s->proto_state;
	struct socks_bind *b = sk->bind;
	struct sockaddr_storage peer;
	socklen_t len = sizeof peer;
	int fd;

	(void)loop; (void)revents;
	fd = accept4(b->fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		/* the peer came but cannot be taken (no descriptor left): left in
		 * the backlog it kept the listener readable, and the loop spun
		 * until connect_timeout said, wrongly, that nobody came */
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
			socks_refuse(s, sk->ver == 5 ? SOCKS_REP_FAIL : SOCKS4_REJECTED, "%s: BIND: cannot accept the peer: %s",
			             s->proto, strerror(errno));
		return;
	}
	if (!b->any && !addr_is_any((struct sockaddr *)&b->expect)) {
		char e[ADDR_STRLEN], g[ADDR_STRLEN];
		addr_format_ip((struct sockaddr *)&b->expect, e, sizeof e);
		addr_format_ip((struct sockaddr *)&peer, g, sizeof g);
		if (strcmp(e, g) != 0) {
			log_info("session %llu: BIND peer %s is not the announced %s, refused", (unsigned long long)s->id,
			         g, e);
			close(fd);
			return;
		}
	}
	sk->bind = NULL;
	socks_bind_free(b);
	session_set_upstream(s, fd, (struct sockaddr *)&peer);
	s->inbound = true;  /* the peer connected: its SYN comes first in the capture */
	socks_grant(s, (struct sockaddr *)&peer, false);
}

/* The local address the upstream would use toward dst: a UDP connect() sends nothing. */
static int
socks_local_addr(struct session *s, const struct sockaddr *dst, struct sockaddr_storage *out)
{
	struct sockaddr_storage t;
	socklen_t len = sizeof *out;
	int fd, rv = -1;

	if (addr_is_any(dst))
		return getsockname(s->client.fd, (struct sockaddr *)out, &len);
	memcpy(&t, dst, addr_len(dst));
	if (addr_port((struct sockaddr *)&t) == 0) {
		if (t.ss_family == AF_INET)
			((struct sockaddr_in *)&t)->sin_port = htons(9);
		else
			((struct sockaddr_in6 *)&t)->sin6_port = htons(9);
	}
	if ((fd = socket(t.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&t, addr_len((struct sockaddr *)&t)) == 0 &&
	    getsockname(fd, (struct sockaddr *)out, &len) == 0)
		rv = 0;
	close(fd);
	return rv;
}

/* Listens where the upstream would connect from and sends the first reply. */
/* BIND's waits (the name, then the peer) have their own clock, connect_timeout,
 * which ends in a failure reply; the handshake's would end in silence. */
static void
socks_bind_clock(struct session *s, struct socks_bind *b)
{
	ev_timer_stop(capd_loop, &b->timer);
	ev_timer_set(&b->timer, s->inst->connect_timeout > 0 ? s->inst->connect_timeout : 10., 0.);
	b->timer.data = s;
	ev_timer_start(capd_loop, &b->timer);
}

static void
socks_bind_listen(struct session *s, const struct sockaddr *dst)
{
	struct socks *sk = s->proto_state;
	struct socks_bind *b = sk->bind;
	struct sockaddr_storage local;
	socklen_t len = sizeof local;
	uint8_t out[SOCKS5_REPLY_MAX];
	int fd;

	memcpy(&b->expect, dst, addr_len(dst));
	if (socks_local_addr(s, dst, &local) < 0) {
		socks_refuse(s, sk->ver == 5 ? socks_rep_of(errno) : SOCKS4_REJECTED, "%s: BIND: no route to %s",
		             s->proto, addr_format(dst, (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN));
		return;
	}
	/* a SOCKS4 reply holds an IPv4 address and port only: an IPv6 listener
	 * (reached over IPv6, or a 4a name with only IPv6) would be named 0.0.0.0:0,
	 * where no peer can be sent, and the wait would end at connect_timeout */
	if (sk->ver == 4 && local.ss_family != AF_INET) {
		socks_refuse(s, SOCKS4_REJECTED, "%s: BIND: its port would be IPv6, which a SOCKS4 reply cannot name",
		             s->proto);
		return;
	}
	if (local.ss_family == AF_INET)
		((struct sockaddr_in *)&local)->sin_port = 0;
	else
		((struct sockaddr_in6 *)&local)->sin6_port = 0;
	fd = socket(local.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&local, addr_len((struct sockaddr *)&local)) < 0 ||
	    listen(fd, 1) < 0 || getsockname(fd, (struct sockaddr *)&local, &len) < 0) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		socks_refuse(s, sk->ver == 5 ? SOCKS_REP_FAIL : SOCKS4_REJECTED, "%s: BIND: cannot listen: %s", s->proto,
		             strerror(err));
		return;
	}
	b->fd = fd;
	ev_io_init(&b->io, socks_bind_accept_cb, fd, EV_READ);
	b->io.data = s;
	ev_io_start(capd_loop, &b->io);
	/* the peer's wait has its own clock (connect_timeout), with a failure reply at the end */
	session_set_deadline(s, 0);
	socks_bind_clock(s, b);
	if (sk->ver == 5)
		socks_say(s, out, socks_reply5(out, SOCKS_REP_OK, (struct sockaddr *)&local));
	else
		socks_say(s, out, socks_reply4(out, SOCKS4_GRANTED, (struct sockaddr *)&local));
}

static void
socks_bind_resolved_cb(void *arg, int err, const char *why, const struct sockaddr_storage *addrs, int n)
{
	struct session *s = arg;
	struct socks *sk = s->proto_state;

	sk->bind->rq = NULL;
	if (err != 0 || n < 1) {
		socks_refuse(s, sk->ver == 5 ? socks_rep_of(err) : SOCKS4_REJECTED, "%s: BIND: cannot resolve %s: %s",
		             s->proto, s->target_name, why ? why : "no address");
		return;
	}
	socks_bind_listen(s, (const struct sockaddr *)&addrs[0]);
}

static void
socks_bind_start(struct session *s, const struct socks_req *r)
{
	struct socks *sk = s->proto_state;
	struct socks_bind *b = xcalloc(1, sizeof *b);

	b->fd = b->hup_fd = -1;
	ev_init(&b->timer, socks_bind_timeout_cb);
	sk->bind = b;
	sk->stage = SOCKS_ST_BIND;
	if (r->atyp == SOCKS_ATYP_NAME) {
		b->any = false;
		snprintf(s->target_name, sizeof s->target_name, "%s:%u", r->host, r->port);
		session_set_deadline(s, 0);
		socks_bind_clock(s, b);
		b->rq = resolve_start(r->host, r->port, socks_bind_resolved_cb, s);
		return;
	}
	socks_bind_listen(s, (const struct sockaddr *)&r->addr);
}

static void
socks_bind_hup_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop; (void)revents;
	session_close(w->data, "client closed during BIND");
}

/*
 * The BIND wait with hs_in full of early data: reading the client stops
 * (the peer is to get those bytes first), yet a client that closes must end
 * the wait then, not at connect_timeout. libev watches readability only,
 * which unread data keeps up, so an epoll set of its own holding just the
 * client's FIN or reset (EPOLLRDHUP) is watched instead, until the peer
 * comes (socks_bind_free). Without it, the wait goes on as before.
 */
static void
socks_bind_hup(struct session *s, struct socks_bind *b)
{
	struct epoll_event ev = { .events = EPOLLRDHUP };

	if (b->hup_fd >= 0)
		return;
	if ((b->hup_fd = epoll_create1(EPOLL_CLOEXEC)) < 0)
		return;
	if (epoll_ctl(b->hup_fd, EPOLL_CTL_ADD, s->client.fd, &ev) < 0) {
		close(b->hup_fd);
		b->hup_fd = -1;
		return;
	}
	ev_io_init(&b->hup, socks_bind_hup_cb, b->hup_fd, EV_READ);
	b->hup.data = s;
	ev_io_start(capd_loop, &b->hup);
}

/* ---- UDP ASSOCIATE ---- */

static void
socks_udp_start(struct session *s, const struct socks_req *r)
{
	struct socks *sk = s->proto_state;
	struct udp_relay *relay = s->inst->proto_state;
	struct sockaddr_storage client, bnd;
	socklen_t len = sizeof bnd;
	uint8_t out[SOCKS5_REPLY_MAX];

	if (relay == NULL) {
		socks_refuse(s, SOCKS_REP_FAIL, "socks5: UDP ASSOCIATE: no udp relay on this instance");
		return;
	}
	/* datagrams are taken from the control connection's address, at the port announced (0: any) */
	memcpy(&client, &s->client_addr, sizeof client);
	if (client.ss_family == AF_INET)
		((struct sockaddr_in *)&client)->sin_port = htons(r->port);
	else
		((struct sockaddr_in6 *)&client)->sin6_port = htons(r->port);
	/* the relay is the main loop's; one hold from the look at its loose
	 * associations to the new one, or two requests at once could both pass */
	capd_lock();
	if (r->port == 0 && udp_relay_loose_from(relay, (struct sockaddr *)&client)) {
		/*
		 * Another association from this host left its port open too: on one
		 * socket the first datagram of either could not be told whose it is,
		 * and would live or die with the other. This one gets a socket of its
		 * own (BND.PORT says where), as dante gives every association.
		 */
		char *why = NULL;
		struct sockaddr_storage own;

		memcpy(&own, udp_relay_addr(relay), addr_len(udp_relay_addr(relay)));
		addr_set_port((struct sockaddr *)&own, 0);
		if ((sk->relay = udp_relay_start(s->inst, (struct sockaddr *)&own, true, NULL, false, &why)) != NULL)
			relay = sk->relay;
		else
			log_warnx("%s: UDP ASSOCIATE: no relay socket of its own (%s); sharing the instance's", s->inst->name, why);
		free(why);
	}
	memcpy(&bnd, udp_relay_addr(relay), addr_len(udp_relay_addr(relay)));
	sk->assoc = udp_assoc_new(relay, s, (struct sockaddr *)&client, &sk->assoc);
	capd_unlock();
	if (addr_is_any((struct sockaddr *)&bnd)) {
		/* a wildcard relay: name the address this client reached us on */
		uint16_t port = addr_port((struct sockaddr *)&bnd);
		if (getsockname(s->client.fd, (struct sockaddr *)&bnd, &len) == 0) {
			if (bnd.ss_family == AF_INET)
				((struct sockaddr_in *)&bnd)->sin_port = htons(port);
			else
				((struct sockaddr_in6 *)&bnd)->sin6_port = htons(port);
		}
	}
	sk->stage = SOCKS_ST_UDP;
	session_send(s, out, socks_reply5(out, SOCKS_REP_OK, (struct sockaddr *)&bnd));
	if (s->state == SESSION_CLOSED)
		return;
	session_opened(s);
}

/* ---- requests ---- */

static const char *
socks_cmd_name(uint8_t cmd)
{
	switch (cmd) {
	case SOCKS_CMD_CONNECT: return "connect";
	case SOCKS_CMD_BIND: return "bind";
	case SOCKS_CMD_UDP: return "udp-associate";
	default: return "unknown";
	}
}

/* A request refused before any connect: its TARGET is what it asked for, as
 * for a request an http instance refused (capctl.1), not empty. */
static void
socks_asked(struct session *s, const struct socks_req *r)
{
	hostport_format(r->host, r->port, s->target_name, sizeof s->target_name);
}

static void
socks_request(struct session *s, const struct socks_req *r)
{
	struct socks_cfg *c = s->inst->cfg;
	struct socks *sk = s->proto_state;
	const char *fmt = strchr(r->host, ':') ? "%s %s [%s]:%u%s%s" : "%s %s %s:%u%s%s";

	s->proto = r->ver == 5 ? "socks5" : r->v4a ? "socks4a" : "socks4";
	if (r->ver == 4 && r->user[0] && sk->user == NULL)
		sk->user = socks_printable(r->user);
	free(s->note);
	s->note = xasprintf(fmt, s->proto, socks_cmd_name(r->cmd), r->host, r->port, sk->user ? " user=" : "",
	                    sk->user ? sk->user : "");
	if (r->ver == 4 && !c->socks4) {
		socks_asked(s, r);
		socks_refuse(s, SOCKS4_REJECTED, "%s: refused: this instance requires SOCKS5 username/password", s->proto);
		return;
	}
	switch (r->cmd) {
	case SOCKS_CMD_CONNECT:
		sk->stage = SOCKS_ST_CONNECTING;
		/* the client's part is done: the connect runs on its own clock
		 * (connect_timeout, where 0 sets none), not on what is left of
		 * handshake_timeout, which would end it with 0x06 regardless */
		session_set_deadline(s, 0);
		if (r->atyp == SOCKS_ATYP_NAME)
			session_connect(s, r->host, r->port);
		else
			session_connect_addr(s, (const struct sockaddr *)&r->addr);
		return;
	case SOCKS_CMD_BIND:
		socks_bind_start(s, r);
		return;
	case SOCKS_CMD_UDP:
		if (r->ver == 5) {
			socks_udp_start(s, r);
			return;
		}
		break;
	}
	socks_asked(s, r);
	socks_refuse(s, r->ver == 5 ? SOCKS_REP_CMD : SOCKS4_REJECTED, "%s: command 0x%02x not supported", s->proto,
	             r->cmd);
}

/* SOCKS5 greeting: picks the method. Returns false when the session was closed. */
static bool
socks_greeting(struct session *s, const struct socks_greeting *g)
{
	struct socks_cfg *c = s->inst->cfg;
	struct socks *sk = s->proto_state;
	uint8_t out[2] = { 5, SOCKS_METHOD_REFUSE };

	if (c->users) {
		if (g->userpass)
			out[1] = SOCKS_METHOD_USERPASS;
	} else if (g->none) {
		out[1] = SOCKS_METHOD_NONE;
	} else if (g->userpass) {
		/* no users configured: any credentials pass, and the name is noted */
		out[1] = SOCKS_METHOD_USERPASS;
	}
	if (out[1] == SOCKS_METHOD_REFUSE) {
		socks_refuse_with(s, out, 2, "socks5: no acceptable auth method%s",
		                  c->users ? " (username/password required)" : "");
		return false;
	}
	socks_say(s, out, 2);
	if (s->state == SESSION_CLOSED)
		return false;
	sk->stage = out[1] == SOCKS_METHOD_USERPASS ? SOCKS_ST_AUTH : SOCKS_ST_REQUEST;
	return true;
}

static bool
socks_auth(struct session *s, const struct socks_auth *a)
{
	struct socks_cfg *c = s->inst->cfg;
	struct socks *sk = s->proto_state;
	uint8_t out[2] = { 1, 0 };
	bool ok = c->users == NULL || users_check(c->users, a->user, a->pass);

	out[1] = ok ? 0 : 1;
	/* RFC 1929 names have 1 to 255 bytes: an empty one (let in without
	 * users) is no name to note, as a SOCKS4 request's empty user id */
	if (a->user[0] != '\0')
		sk->user = socks_printable(a->user);
	if (!ok) {
		if (sk->user == NULL)
			socks_refuse_with(s, out, 2, "socks5: auth failed for an empty user name");
		else
			socks_refuse_with(s, out, 2, "socks5: auth failed for user %s", sk->user);
		return false;
	}
	socks_say(s, out, 2);
	if (s->state == SESSION_CLOSED)
		return false;
	if (sk->user == NULL) {
		sk->stage = SOCKS_ST_REQUEST;
		return true;
	}
	free(s->note);
	s->note = xasprintf("socks5 user=%s", sk->user);
	sk->stage = SOCKS_ST_REQUEST;
	return true;
}

static void
socks_input(struct session *s)
{
	struct socks *sk = s->proto_state;

	for (;;) {
		/* the messages parsed stay in hs_in (sk->taken) */
		const uint8_t *p = buf_head(&s->hs_in) + sk->taken;
		size_t n = buf_used(&s->hs_in) - sk->taken, used = 0;
		enum parse rv = PARSE_MORE;
		struct socks_req req;

		switch (sk->stage) {
		case SOCKS_ST_GREETING: {
			struct socks_greeting g;

			if (n == 0)
				break;
			if (p[0] == 4) {
				sk->ver = 4;
				sk->stage = SOCKS_ST_V4;
				/* a request refused as malformed is listed as SOCKS4 too
				 * (socks_request says 4a once it parsed) */
				s->proto = "socks4";
				continue;
			}
			if (p[0] != 5) {
				socks_refuse(s, 0, "socks: unknown version 0x%02x", p[0]);
				return;
			}
			sk->ver = 5;
			s->proto = "socks5";
			rv = socks_parse_greeting(p, n, &used, &g);
			if (rv == PARSE_ERR) {
				/* NMETHODS 0 (the only way a version 5 greeting is
				 * bad): none of its methods is acceptable, which
				 * RFC 1928 answers with X'FF', not with silence */
				socks_refuse_with(s, (const uint8_t[]){ 5, SOCKS_METHOD_REFUSE }, 2,
				                  "socks5: bad greeting: no methods offered");
				return;
			}
			if (rv == PARSE_OK) {
				sk->taken += (uint16_t)used;
				if (!socks_greeting(s, &g))
					return;
				continue;
			}
			break;
		}
		case SOCKS_ST_AUTH: {
			struct socks_auth a;

			rv = socks_parse_auth(p, n, &used, &a);
			if (rv == PARSE_ERR) {
				/* RFC 1929's failure status, as for wrong credentials:
				 * a client waiting for the status would see only a close */
				static const uint8_t fail[] = { 1, 1 };

				if (p[0] != 1)
					socks_refuse_with(s, fail, 2, "socks5: bad auth message: version 0x%02x, not 1", p[0]);
				else
					socks_refuse_with(s, fail, 2,
					                  "socks5: bad auth message: a NUL byte in the user name or password");
				return;
			}
			if (rv == PARSE_OK) {
				sk->taken += (uint16_t)used;
				bool ok = socks_auth(s, &a);
				memset(&a, 0, sizeof a);
				if (!ok)
					return;
				continue;
			}
			break;
		}
		case SOCKS_ST_REQUEST:
		case SOCKS_ST_V4:
			if (sk->stage == SOCKS_ST_REQUEST)
				rv = socks_parse_request(p, n, &used, &req);
			else
				rv = socks_parse_v4(p, n, &used, &req);
			if (rv == PARSE_ERR) {
				/* DSTIP 0.0.0.x, x != 0: a 4a request whose name was bad */
				if (sk->ver == 4 && n >= 8 && p[4] == 0 && p[5] == 0 && p[6] == 0 && p[7] != 0)
					s->proto = "socks4a";
				socks_refuse(s, req.rep, "%s: bad request: %s", s->proto, req.why ? req.why : "malformed");
				return;
			}
			if (rv == PARSE_OK) {
				sk->taken += (uint16_t)used;
				socks_request(s, &req);  /* may close s */
				return;
			}
			break;
		case SOCKS_ST_UDP:
			/* the control connection carries nothing more: drop what comes, end on close */
			buf_reset(&s->hs_in);
			sk->taken = 0;
			if (s->client_eof)
				session_close(s, "closed");
			return;
		default:
			/* a client gone while BIND waits for its peer: nobody would take the
			 * peer's connection, so stop listening now, not at connect_timeout */
			if (sk->stage == SOCKS_ST_BIND && s->client_eof) {
				session_close(s, "client closed during BIND");
				return;
			}
			/* connecting or waiting for the BIND peer: early bytes wait in hs_in
			 * for the relay; once it is full the client waits (relay_start reads on) */
			if (buf_used(&s->hs_in) >= SOCKS_HS_MAX) {
				ev_io_stop(capd_loop, &s->client.rio);
				if (sk->stage == SOCKS_ST_BIND && sk->bind != NULL)
					socks_bind_hup(s, sk->bind);
			}
			return;
		}
		/* PARSE_MORE */
		if (s->client_eof)
			session_close(s, "client closed during handshake");
		return;
	}
}

/* The handshake ends with no reply of capd's to its last step (a timeout, the
 * client's close or reset, a handshake too large): the capture has it as far
 * as it went, capd's replies in their turns (socks_refused). A client that
 * sent nothing is nothing to see. */
static void
socks_hs_ended(struct session *s)
{
	if (s->proto_state != NULL && buf_used(&s->hs_in) > 0)
		socks_refused(s, NULL, 0);
}

const struct proto proto_socks = {
	.name = "socks",
	.keys = socks_keys,
	.listens = true,
	.sharded = true,
	.idle = socks_idle,
	.hs_max = SOCKS_HS_MAX,
	.configure = socks_configure,
	.start = socks_start,
	.stop = socks_stop,
	.accepted = socks_accepted,
	.input = socks_input,
	.connected = socks_connected,
	.hs_ended = socks_hs_ended,
	.session_free = socks_session_free,
	.free = socks_free,
	.describe = socks_describe,
};

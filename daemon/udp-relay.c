/*
 * The datagram relay; see udp-relay.h. Datagrams are received into one
 * static buffer with room for a SOCKS UDP header in front, so a reply gets
 * its header written in place and no payload is ever copied. Names in SOCKS
 * datagrams (and a forward target given by name) are resolved with c-ares,
 * a few at once per association; each name's datagrams wait in their order
 * meanwhile, in queues of bounded total size, and are dropped beyond it, as
 * UDP allows.
 */
#include "udp-relay.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <unistd.h>

#include "buf.h"
#include "capd.h"
#include "chain.h"
#include "instance.h"
#include "log.h"
#include "resolve.h"
#include "session.h"
#include "socks-parse.h"
#include "xmalloc.h"

#define UDP_DGRAM_MAX 65535
#define UDP_BATCH 32              /* datagrams taken per wake-up */
#define UDP_PENDING_MAX 65536     /* bytes queued per association while names resolve */
#define UDP_RESOLVING 4           /* names resolved at once per association */
#define UDP_FLOWS_MAX 64          /* remote endpoints per association */
#define UDP_ASSOCS_MAX 4096       /* associations per relay */
#define UDP_NAMES 4               /* resolved names remembered per association */
#define UDP_BUCKETS 256           /* hash of client address:port -> association */
#define UDP_RCVBUF (1 << 20)      /* the clients' socket's receive buffer (the kernel doubles it) */

/* One conversation (association, remote endpoint): the datagram session's proto_state. */
struct udp_flow {
	LIST_ENTRY(udp_flow) entry;
	struct udp_assoc *a;
	struct session *s;            /* its datagram session */
	struct sockaddr_storage peer; /* the remote endpoint */
};

/*
 * A name being resolved for an association, and the datagrams waiting for
 * it in the order they came. Owned by its association: freed once the
 * answer has been used, or by udp_assoc_end(), which cancels the resolution.
 */
struct udp_resolving {
	struct udp_assoc *a;
	struct resolve_req *rq;           /* NULL once answered */
	struct buf queue;                 /* [port:2][len:2][payload] for name */
	char name[SOCKS_NAME_MAX + 1];
};

/* One client address. Owned by its relay; udp_assoc_end() frees it. */
struct udp_assoc {
	LIST_ENTRY(udp_assoc) entry;      /* every association of the relay */
	LIST_ENTRY(udp_assoc) hentry;     /* its hash bucket when bound, else the loose list */
	struct udp_relay *r;
	struct session *ctrl;             /* SOCKS control session (borrowed), or NULL */
	struct udp_assoc **backref;       /* cleared when the relay ends the association */
	struct sockaddr_storage client;   /* where datagrams come from and replies go */
	struct sockaddr_storage local;    /* wildcard relay: the address the client sent to, replies' source */
	bool bound;                       /* client's port is known */
	bool have_local;
	bool resolve_warned;              /* forward: its target's failed resolution was logged */
	bool self_warned;                 /* a datagram for the relay itself was dropped and logged */
	bool loop_warned;                 /* a datagram that would go round capd instances was dropped and logged */
	int fd[2];                        /* upstream sockets: [0] IPv4, [1] IPv6, -1 until needed */
	uint16_t chain_port[2];           /* their ports, noted for the instance they send to (chain.h), or 0 */
	struct chain *chain;              /* the capd instances its client's datagrams came through, owned, or NULL */
	ev_io rio[2];
	ev_timer idle;                    /* forward: ends the association when quiet */
	double last;
	unsigned nflows;
	LIST_HEAD(, udp_flow) flows;

	struct udp_resolving *resolving[UDP_RESOLVING];  /* names in flight; NULL: a free slot */
	size_t queued;                    /* bytes waiting in all of them, at most UDP_PENDING_MAX */
	struct {
		char name[SOCKS_NAME_MAX + 1];
		struct sockaddr_storage addr;
	} names[UDP_NAMES];
	unsigned names_next;
};

/* Owned by its instance's runtime state; udp_relay_stop() frees it. */
struct udp_relay {
	struct instance *inst;
	int fd;                           /* toward the clients */
	ev_io rio;
	struct sockaddr_storage addr;
	bool pktinfo;                     /* bound to a wildcard: each datagram says its destination */
	bool socks;
	struct hostport to;               /* forward: the fixed target */
	double idle;
	unsigned nassocs;
	bool evict_warned;          /* the table-full warning was logged */
	bool loop_warned;           /* a datagram from capd that went round was dropped and logged */
	LIST_HEAD(, udp_assoc) assocs;
	LIST_HEAD(, udp_assoc) loose;     /* client port not known yet (SOCKS, DST.PORT 0) */
	LIST_HEAD(udp_bucket, udp_assoc) buckets[UDP_BUCKETS];
};

/* room for the largest SOCKS header in front of the largest datagram */
static uint8_t udp_buf[SOCKS_UDP_HDR_MAX + UDP_DGRAM_MAX];

static void udp_client_cb(struct ev_loop *loop, ev_io *w, int revents);
static void udp_resolving_free(struct udp_resolving *rs);
static void udp_upstream_cb(struct ev_loop *loop, ev_io *w, int revents);
static void udp_idle_cb(struct ev_loop *loop, ev_timer *w, int revents);

static unsigned
udp_hash(const struct sockaddr *sa)
{
	const uint8_t *p;
	size_t n;
	uint32_t h = 2166136261u;  /* FNV-1a over address and port */

	if (sa->sa_family == AF_INET6) {
		p = (const uint8_t *)&((const struct sockaddr_in6 *)sa)->sin6_addr;
		n = 16;
	} else {
		p = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
		n = 4;
	}
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	h = (h ^ (addr_port(sa) & 0xff)) * 16777619u;
	h = (h ^ (addr_port(sa) >> 8)) * 16777619u;
	return h % UDP_BUCKETS;
}

/*
 * A burst of datagrams from many clients (each new one is a session to make)
 * outran the default receive buffer (212992 bytes, some 250 small datagrams)
 * and the kernel dropped the rest unseen, as it did to the dns instance's
 * queries: asked as dns_udp_rcvbuf does, past net.core.rmem_max while capd
 * may (root, before it drops privileges), else as large as that lets it be.
 */
static void
udp_relay_rcvbuf(struct instance *inst, int fd)
{
	int size = UDP_RCVBUF;

	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0 &&
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size) < 0)
		log_warn("%s: UDP receive buffer of %d bytes", inst->name, size);
}

struct udp_relay *
udp_relay_start(struct instance *inst, const struct sockaddr *addr, bool socks, const struct hostport *to,
                bool fallback, char **why)
{
	struct udp_relay *r;
	struct sockaddr_storage ss;
	socklen_t len = addr_len(addr);
	int fd, one = 1;
	char a[ADDR_STRLEN];

	memcpy(&ss, addr, len);
	fd = socket(addr->sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		*why = xasprintf("udp socket: %s", strerror(errno));
		return NULL;
	}
	if (addr->sa_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&ss, len) < 0) {
		if (errno == EADDRINUSE && fallback) {
			if (ss.ss_family == AF_INET)
				((struct sockaddr_in *)&ss)->sin_port = 0;
			else
				((struct sockaddr_in6 *)&ss)->sin6_port = 0;
		}
		if (!(errno == EADDRINUSE && fallback) || bind(fd, (struct sockaddr *)&ss, len) < 0) {
			*why = xasprintf("cannot bind udp %s: %s", addr_format(addr, a, sizeof a), strerror(errno));
			close(fd);
			return NULL;
		}
	}
	udp_relay_rcvbuf(inst, fd);
	r = xcalloc(1, sizeof *r);
	len = sizeof r->addr;
	getsockname(fd, (struct sockaddr *)&r->addr, &len);
	/* on a wildcard a reply would leave from whatever address the route picks,
	 * and a client that connect()ed its socket to the one it sent to (PySocks
	 * does) would drop it: each datagram's destination becomes the reply's source */
	if (addr_is_any((struct sockaddr *)&r->addr))
		r->pktinfo = setsockopt(fd, addr->sa_family == AF_INET ? IPPROTO_IP : IPPROTO_IPV6,
		                        addr->sa_family == AF_INET ? IP_PKTINFO : IPV6_RECVPKTINFO, &one, sizeof one) == 0;
	r->inst = inst;
	r->fd = fd;
	r->socks = socks;
	if (to)
		r->to = *to;
	r->idle = inst->idle_timeout > 0 ? inst->idle_timeout : UDP_IDLE_DEFAULT;
	LIST_INIT(&r->assocs);
	LIST_INIT(&r->loose);
	for (int i = 0; i < UDP_BUCKETS; i++)
		LIST_INIT(&r->buckets[i]);
	ev_io_init(&r->rio, udp_client_cb, fd, EV_READ);
	r->rio.data = r;
	ev_io_start(capd_main, &r->rio);
	shard_wake(capd_main);
	log_debug("%s: udp relay on %s", inst->name, addr_format((struct sockaddr *)&r->addr, a, sizeof a));
	return r;
}

void
udp_relay_stop(struct udp_relay *r)
{
	struct udp_assoc *a;

	if (r == NULL)
		return;
	while ((a = LIST_FIRST(&r->assocs)) != NULL)
		udp_assoc_end(a, "instance stopped");
	ev_io_stop(capd_main, &r->rio);
	close(r->fd);
	free(r);
}

bool
udp_relay_loose_from(const struct udp_relay *r, const struct sockaddr *client)
{
	const struct udp_assoc *a;

	LIST_FOREACH(a, &r->loose, hentry)
		if (addr_same((const struct sockaddr *)&a->client, client, false))
			return true;
	return false;
}

const struct sockaddr *
udp_relay_addr(const struct udp_relay *r)
{
	return (const struct sockaddr *)&r->addr;
}

static struct udp_assoc *
udp_assoc_alloc(struct udp_relay *r, const struct sockaddr *client, bool bound)
{
	struct udp_assoc *a = xcalloc(1, sizeof *a);

	a->r = r;
	memcpy(&a->client, client, addr_len(client));
	a->bound = bound;
	if (bound)
		LIST_INSERT_HEAD(&r->buckets[udp_hash(client)], a, hentry);
	else
		LIST_INSERT_HEAD(&r->loose, a, hentry);
	a->fd[0] = a->fd[1] = -1;
	a->last = capd_now();
	LIST_INIT(&a->flows);
	ev_init(&a->idle, udp_idle_cb);
	a->idle.data = a;
	LIST_INSERT_HEAD(&r->assocs, a, entry);
	r->nassocs++;
	return a;
}

struct udp_assoc *
udp_assoc_new(struct udp_relay *r, struct session *ctrl, const struct sockaddr *client, struct udp_assoc **backref)
{
	struct udp_assoc *a = udp_assoc_alloc(r, client, addr_port(client) != 0);

	a->ctrl = ctrl;
	a->backref = backref;
	return a;
}

void
udp_assoc_end(struct udp_assoc *a, const char *reason)
{
	struct udp_flow *f;

	if (a == NULL)
		return;
	LIST_REMOVE(a, entry);
	LIST_REMOVE(a, hentry);
	a->r->nassocs--;
	if (a->backref)
		*a->backref = NULL;
	while ((f = LIST_FIRST(&a->flows)) != NULL) {
		struct session *s = f->s;

		LIST_REMOVE(f, entry);
		s->proto_state = NULL;  /* the session_free hook must not find it again */
		free(f);
		session_close(s, reason);
	}
	for (int i = 0; i < 2; i++) {
		if (a->fd[i] >= 0) {
			ev_io_stop(capd_main, &a->rio[i]);
			close(a->fd[i]);
		}
		chain_forget(a->chain_port[i], SOCK_DGRAM);
	}
	free(a->chain);
	ev_timer_stop(capd_main, &a->idle);
	for (int i = 0; i < UDP_RESOLVING; i++)
		udp_resolving_free(a->resolving[i]);
	free(a);
}

void
udp_relay_session_free(struct session *s)
{
	struct udp_flow *f = s->proto_state;

	if (f == NULL)
		return;
	LIST_REMOVE(f, entry);
	f->a->nflows--;
	free(f);
	s->proto_state = NULL;
}

static void
udp_touch(struct udp_assoc *a)
{
	a->last = capd_now();
}

double
udp_assoc_last(const struct udp_assoc *a)
{
	return a->last;
}

/*
 * The loop's clock stands still while capd is not scheduled (held up under
 * load, SIGSTOP), and after such a pause libev runs an expired timer before
 * the read that would have stamped the association: what waits unread is
 * looked at before the association is blamed. One poll(2), only when the
 * clock runs out, never per datagram.
 */
bool
udp_assoc_unread(const struct udp_assoc *a)
{
	struct pollfd p[3];
	nfds_t n = 0;

	p[n++] = (struct pollfd){ .fd = a->r->fd, .events = POLLIN };
	for (int i = 0; i < 2; i++)
		if (a->fd[i] >= 0)
			p[n++] = (struct pollfd){ .fd = a->fd[i], .events = POLLIN };
	return poll(p, n, 0) > 0;
}

bool
udp_relay_session_idle(struct session *s)
{
	struct udp_flow *f = s->proto_state;

	if (f == NULL || !udp_assoc_unread(f->a))
		return false;
	ev_timer_set(&s->timer, UDP_RELOOK, 0.);  /* reading it stamps the session if it is its */
	ev_timer_start(capd_loop, &s->timer);
	return true;
}

static void
udp_idle_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct udp_assoc *a = w->data;
	double now = ev_now(loop), idle = a->r->idle;

	(void)revents;
	if (now - a->last >= idle && udp_assoc_unread(a)) {
		ev_timer_set(w, UDP_RELOOK, 0.);  /* udp_client_cb and udp_upstream_cb read it first */
		ev_timer_start(loop, w);
		return;
	}
	if (now - a->last >= idle) {
		udp_assoc_end(a, "idle timeout");
		return;
	}
	ev_timer_set(w, a->last + idle - now, 0.);
	ev_timer_start(loop, w);
}

/*
 * The association has UDP_FLOWS_MAX endpoints: like a NAT's table, the flow
 * quiet the longest is closed to make room. Refusing the new endpoint instead
 * cut a long-lived association (a DHT node, a resolver walking servers) off
 * from every endpoint after its 64th, silently, for the rest of its life.
 */
static void
udp_flow_evict(struct udp_assoc *a)
{
	struct udp_flow *f, *oldest = NULL;

	LIST_FOREACH(f, &a->flows, entry)
		if (oldest == NULL || f->s->last_active < oldest->s->last_active)
			oldest = f;
	/* its session_free hook (udp_relay_session_free) takes the flow off the list */
	if (oldest != NULL)
		session_close(oldest->s, "evicted: too many UDP endpoints in the association");
}

/* The flow to peer, made (with its session) on first use; NULL for a new
 * endpoint heard from (not sent to) when the table is full. name: the host
 * name peer was resolved from, or NULL. */
static struct udp_flow *
udp_flow_get(struct udp_assoc *a, const struct sockaddr *peer, bool outbound, const char *name)
{
	struct udp_flow *f;
	struct session *s;

	LIST_FOREACH(f, &a->flows, entry)
		if (addr_same((struct sockaddr *)&f->peer, peer, true))
			return f;
	if (a->nflows >= UDP_FLOWS_MAX) {
		/* only the client's own sends make room: datagrams sprayed at the
		 * association from anywhere would otherwise churn its flows */
		if (!outbound)
			return NULL;
		udp_flow_evict(a);
	}
	f = xcalloc(1, sizeof *f);
	f->a = a;
	memcpy(&f->peer, peer, addr_len(peer));
	s = session_new_datagram(a->r->inst, "udp", (struct sockaddr *)&a->client, peer);
	f->s = s;
	s->proto_state = f;
	if (a->ctrl)
		s->note = xasprintf("socks5 udp via session %llu%s%s", (unsigned long long)a->ctrl->id,
		                    a->ctrl->note ? ": " : "", a->ctrl->note ? a->ctrl->note : "");
	/* as a TCP session to a name shows it: the address alone hides what was asked */
	if (name)
		snprintf(s->target_name, sizeof s->target_name, "%s:%u", name, addr_port(peer));
	LIST_INSERT_HEAD(&a->flows, f, entry);
	a->nflows++;
	session_opened(s);
	return f;
}

/* The association's socket for peer's family, made on first use. */
static int
udp_upstream_fd(struct udp_assoc *a, const struct sockaddr *peer)
{
	int i = peer->sa_family == AF_INET6;

	if (a->fd[i] >= 0)
		return a->fd[i];
	a->fd[i] = socket(peer->sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (a->fd[i] < 0)
		return -1;
	/* a forward's target is fixed: one bit test per association tells
	 * whether it may be one of capd's own relays */
	if (!a->r->socks && chain_port_listened(addr_port(peer)))
		a->chain_port[i] = chain_note(a->fd[i], SOCK_DGRAM, a->chain, a->r->inst);
	ev_io_init(&a->rio[i], udp_upstream_cb, a->fd[i], EV_READ);
	a->rio[i].data = a;
	ev_io_start(capd_main, &a->rio[i]);
	shard_wake(capd_main);
	return a->fd[i];
}

/*
 * Whether datagrams that came to a through other capd instances would go
 * round them if sent to peer: peer is an instance they came through, or one
 * more than CHAIN_MAX in a row (chain.h). Logged once per association.
 */
static bool
udp_loops(struct udp_assoc *a, const struct sockaddr *peer)
{
	struct instance *to;
	char b[ADDR_STRLEN];

	if (!chain_port_listened(addr_port(peer)) || (to = chain_instance_at(peer)) == NULL)
		return false;
	if (!chain_has(a->chain, to) && chain_len(a->chain) < CHAIN_MAX)
		return false;
	if (!a->loop_warned) {
		a->loop_warned = true;
		addr_format(peer, b, sizeof b);
		if (chain_has(a->chain, to))
			log_warnx("%s: udp: a loop of capd instances: target %s is instance %s's address, and these "
			          "datagrams came through %s already; dropped", a->r->inst->name, b, to->name, to->name);
		else
			log_warnx("%s: udp: target %s is instance %s's address, and these datagrams came through %d capd "
			          "instances already; dropped", a->r->inst->name, b, to->name, CHAIN_MAX);
	}
	return true;
}

/* One datagram from the client to peer (resolved from name, or NULL): capture, then send. */
static void
udp_send_up(struct udp_assoc *a, const struct sockaddr *peer, const char *name, const uint8_t *p, size_t n)
{
	struct udp_flow *f;
	int fd;

	/* The relay's own address (a forward's 'to' naming its own listen, or
	 * 0.0.0.0 on its port): the datagram would come back as a new client's,
	 * go out again, and circle for ever, an association and a session more
	 * each time. A SOCKS client's destinations are its own business: debug. */
	if (addr_reaches(peer, (const struct sockaddr *)&a->r->addr)) {
		char b[ADDR_STRLEN];
		addr_format(peer, b, sizeof b);
		if (!a->r->socks && !a->self_warned) {
			a->self_warned = true;
			log_warnx("%s: udp: target %s is this instance's own address; datagrams dropped", a->r->inst->name, b);
		} else {
			log_debug("%s: udp: datagram to %s, the relay itself, dropped", a->r->inst->name, b);
		}
		return;
	}
	if (a->chain && udp_loops(a, peer))
		return;
	if ((f = udp_flow_get(a, peer, true, name)) == NULL)
		return;
	if ((fd = udp_upstream_fd(a, peer)) < 0)
		return;
	/* captured once sent: a datagram the kernel refused did not cross */
	if (sendto(fd, p, n, 0, peer, addr_len(peer)) < 0) {
		if (errno != EAGAIN)
			log_debug("%s: udp send to %s: %s", a->r->inst->name,
			          addr_format(peer, (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN), strerror(errno));
		return;
	}
	session_data(f->s, DIR_UP, p, n);
}

/* Cancels rs's resolution, if still in flight, and frees it with its queue. NULL does nothing. */
static void
udp_resolving_free(struct udp_resolving *rs)
{
	if (rs == NULL)
		return;
	resolve_cancel(rs->rq);
	buf_free(&rs->queue);
	free(rs);
}

/* Takes rs out of its association's slots: its datagrams no longer count there. */
static void
udp_resolving_take(struct udp_assoc *a, struct udp_resolving *rs)
{
	for (int i = 0; i < UDP_RESOLVING; i++)
		if (a->resolving[i] == rs)
			a->resolving[i] = NULL;
	a->queued -= buf_used(&rs->queue);
}

/* The resolution of host under way, else a new one in a free slot (not started); NULL when none is free. */
static struct udp_resolving *
udp_resolving_get(struct udp_assoc *a, const char *host)
{
	int free_slot = -1;

	for (int i = 0; i < UDP_RESOLVING; i++) {
		if (a->resolving[i] == NULL) {
			if (free_slot < 0)
				free_slot = i;
		} else if (strcasecmp(a->resolving[i]->name, host) == 0) {
			return a->resolving[i];
		}
	}
	if (free_slot < 0)
		return NULL;
	a->resolving[free_slot] = xcalloc(1, sizeof **a->resolving);
	a->resolving[free_slot]->a = a;
	snprintf(a->resolving[free_slot]->name, sizeof a->resolving[0]->name, "%s", host);
	return a->resolving[free_slot];
}

static void
udp_resolving_queue(struct udp_assoc *a, struct udp_resolving *rs, uint16_t port, const uint8_t *p, size_t n)
{
	uint8_t *q = buf_reserve(&rs->queue, 4 + n);

	q[0] = (uint8_t)(port >> 8);
	q[1] = (uint8_t)port;
	q[2] = (uint8_t)(n >> 8);
	q[3] = (uint8_t)n;
	memcpy(q + 4, p, n);
	buf_commit(&rs->queue, 4 + n);
	a->queued += 4 + n;
}

/* Sends the datagrams queued for rs's name, in order, to addr at each one's port. */
static void
udp_resolving_send(struct udp_assoc *a, struct udp_resolving *rs, const struct sockaddr_storage *addr)
{
	/* sending may end nothing here: a failed send only logs */
	while (buf_used(&rs->queue) >= 4) {
		const uint8_t *h = buf_head(&rs->queue);
		uint16_t port = (uint16_t)(h[0] << 8 | h[1]);
		size_t len = (size_t)(h[2] << 8 | h[3]);
		struct sockaddr_storage peer = *addr;

		if (peer.ss_family == AF_INET)
			((struct sockaddr_in *)&peer)->sin_port = htons(port);
		else
			((struct sockaddr_in6 *)&peer)->sin6_port = htons(port);
		udp_send_up(a, (struct sockaddr *)&peer, rs->name, h + 4, len);
		buf_consume(&rs->queue, 4 + len);
	}
}

static void
udp_resolved_cb(void *arg, int err, const char *why, const struct sockaddr_storage *addrs, int n)
{
	struct udp_resolving *rs = arg;
	struct udp_assoc *a = rs->a;

	rs->rq = NULL;  /* the resolver frees it after this call */
	udp_resolving_take(a, rs);
	if (err != 0 || n < 1) {
		/* a forward's own target not resolving is the operator's to know (once per
		 * client, as every datagram asks again); a SOCKS client's names are its own */
		if (!a->r->socks && !a->resolve_warned) {
			a->resolve_warned = true;
			log_warnx("%s: udp: cannot resolve %s: %s; datagrams dropped", a->r->inst->name, rs->name,
			          why ? why : "no address");
		} else {
			log_debug("%s: udp: cannot resolve %s: %s", a->r->inst->name, rs->name, why ? why : "no address");
		}
		udp_resolving_free(rs);
		return;
	}
	snprintf(a->names[a->names_next].name, sizeof a->names[0].name, "%s", rs->name);
	memcpy(&a->names[a->names_next].addr, &addrs[0], sizeof addrs[0]);
	a->names_next = (a->names_next + 1) % UDP_NAMES;
	udp_resolving_send(a, rs, &addrs[0]);
	udp_resolving_free(rs);
}

/* A datagram for host:port (a literal or a name). */
static void
udp_send_host(struct udp_assoc *a, const char *host, uint16_t port, const uint8_t *p, size_t n)
{
	struct sockaddr_storage peer;
	struct udp_resolving *rs;
	socklen_t len;

	if (addr_from_literal(host, port, &peer, &len) == 0) {
		udp_send_up(a, (struct sockaddr *)&peer, NULL, p, n);
		return;
	}
	for (int i = 0; i < UDP_NAMES; i++)
		if (a->names[i].name[0] && strcasecmp(a->names[i].name, host) == 0) {
			peer = a->names[i].addr;
			if (peer.ss_family == AF_INET)
				((struct sockaddr_in *)&peer)->sin_port = htons(port);
			else
				((struct sockaddr_in6 *)&peer)->sin6_port = htons(port);
			udp_send_up(a, (struct sockaddr *)&peer, host, p, n);
			return;
		}
	/* it waits behind the resolution of its name, which other names' do not hold up */
	if (a->queued + 4 + n > UDP_PENDING_MAX) {
		log_debug("%s: udp: datagram to %s dropped: %zu bytes wait for names already", a->r->inst->name, host,
		          a->queued);
		return;
	}
	if ((rs = udp_resolving_get(a, host)) == NULL) {
		log_debug("%s: udp: datagram to %s dropped: %d names resolving already", a->r->inst->name, host,
		          UDP_RESOLVING);
		return;
	}
	udp_resolving_queue(a, rs, port, p, n);
	/* a datagram cannot try each address as a connect does: it goes to
	 * the one getaddrinfo gives first, as dig's and every other program's */
	if (rs->rq == NULL)
		rs->rq = resolve_start_sorted(host, port, udp_resolved_cb, rs);
}

/* The destination address of a datagram received with its pktinfo, in *out; NULL without one. */
static const struct sockaddr_storage *
udp_dst_of(struct msghdr *mh, struct sockaddr_storage *out)
{
	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
		memset(out, 0, sizeof *out);
		if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
			struct in_pktinfo pi;
			memcpy(&pi, CMSG_DATA(c), sizeof pi);
			((struct sockaddr_in *)out)->sin_family = AF_INET;
			((struct sockaddr_in *)out)->sin_addr = pi.ipi_addr;
			return out;
		}
		if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
			struct in6_pktinfo pi;
			memcpy(&pi, CMSG_DATA(c), sizeof pi);
			((struct sockaddr_in6 *)out)->sin6_family = AF_INET6;
			((struct sockaddr_in6 *)out)->sin6_addr = pi.ipi6_addr;
			return out;
		}
	}
	return NULL;
}

/* A datagram to a's client, from the address it sends to when the relay is a wildcard. */
static ssize_t
udp_client_send(struct udp_assoc *a, const void *p, size_t n)
{
	union { struct cmsghdr h; uint8_t b[CMSG_SPACE(sizeof(struct in6_pktinfo))]; } ctl;
	struct iovec iov = { (void *)p, n };
	struct msghdr mh = { .msg_name = &a->client, .msg_namelen = addr_len((struct sockaddr *)&a->client),
	                     .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *c;

	if (!a->r->pktinfo || !a->have_local)
		return sendmsg(a->r->fd, &mh, 0);
	memset(&ctl, 0, sizeof ctl);
	mh.msg_control = &ctl;
	c = &ctl.h;
	if (a->local.ss_family == AF_INET) {
		struct in_pktinfo pi = { .ipi_spec_dst = ((struct sockaddr_in *)&a->local)->sin_addr };
		mh.msg_controllen = CMSG_SPACE(sizeof pi);
		c->cmsg_level = IPPROTO_IP;
		c->cmsg_type = IP_PKTINFO;
		c->cmsg_len = CMSG_LEN(sizeof pi);
		memcpy(CMSG_DATA(c), &pi, sizeof pi);
	} else {
		struct in6_pktinfo pi = { .ipi6_addr = ((struct sockaddr_in6 *)&a->local)->sin6_addr };
		mh.msg_controllen = CMSG_SPACE(sizeof pi);
		c->cmsg_level = IPPROTO_IPV6;
		c->cmsg_type = IPV6_PKTINFO;
		c->cmsg_len = CMSG_LEN(sizeof pi);
		memcpy(CMSG_DATA(c), &pi, sizeof pi);
	}
	ssize_t w = sendmsg(a->r->fd, &mh, 0);
	if (w < 0 && errno == EINVAL) {
		/* it sent to a broadcast or multicast address, which is no source: the route's then */
		a->have_local = false;
		mh.msg_control = NULL;
		mh.msg_controllen = 0;
		w = sendmsg(a->r->fd, &mh, 0);
	}
	return w;
}

/* The association a datagram from src belongs to, or NULL. */
static struct udp_assoc *
udp_assoc_find(struct udp_relay *r, const struct sockaddr *src)
{
	struct udp_assoc *a;
	unsigned h = udp_hash(src);

	LIST_FOREACH(a, &r->buckets[h], hentry)
		if (addr_same((struct sockaddr *)&a->client, src, true))
			return a;
	/* The first datagram fixes the port of an association that left it open.
	 * Two such associations from one address are not made on one relay
	 * (udp_relay_loose_from); should they be, the oldest takes it (the list
	 * is newest first). */
	struct udp_assoc *oldest = NULL;
	LIST_FOREACH(a, &r->loose, hentry)
		if (addr_same((struct sockaddr *)&a->client, src, false))
			oldest = a;
	if (oldest != NULL) {
		memcpy(&oldest->client, src, addr_len(src));
		oldest->bound = true;
		LIST_REMOVE(oldest, hentry);
		LIST_INSERT_HEAD(&r->buckets[h], oldest, hentry);
	}
	return oldest;
}

/*
 * The table is full: like a NAT's connection table, the association quiet
 * the longest makes room (forward only; SOCKS associations belong to their
 * TCP control connection). Scanning is fine: it happens only when full.
 */
static int
udp_evict_oldest(struct udp_relay *r)
{
	struct udp_assoc *a, *oldest = NULL;

	LIST_FOREACH(a, &r->assocs, entry)
		if (a->ctrl == NULL && (oldest == NULL || a->last < oldest->last))
			oldest = a;
	if (oldest == NULL)
		return -1;
	if (!r->evict_warned) {
		log_warnx("%s: %d UDP associations: ending the quietest to make room", r->inst->name, UDP_ASSOCS_MAX);
		r->evict_warned = true;
	}
	udp_assoc_end(oldest, "evicted: too many UDP associations");
	return 0;
}

static void
udp_client_dgram(struct udp_relay *r, const struct sockaddr *src, const struct sockaddr_storage *local,
                 const uint8_t *p, size_t n)
{
	struct udp_assoc *a = udp_assoc_find(r, src);
	char b[ADDR_STRLEN];

	if (a == NULL && r->socks) {
		log_debug("%s: udp datagram from %s outside any association dropped", r->inst->name,
		          addr_format(src, b, sizeof b));
		return;
	}
	if (a == NULL) {
		/* capd's own datagram comes from this host: from loopback, or from
		 * the address it was sent to; a remote client's port says nothing */
		const struct sockaddr *dst = local ? (const struct sockaddr *)local : (const struct sockaddr *)&r->addr;
		struct chain *c = addr_is_loopback(src) || addr_same(src, dst, false) ? chain_find_udp(src) : NULL;

		if (chain_has(c, r->inst)) {
			/* a loop the sender did not see (an address of this host that
			 * is none of the instances' listen addresses) ends here */
			if (!r->loop_warned) {
				r->loop_warned = true;
				log_warnx("%s: udp: a loop of capd instances: datagrams from %s came from capd through "
				          "this instance already; dropped", r->inst->name, addr_format(src, b, sizeof b));
			}
			free(c);
			return;
		}
		if (r->nassocs >= UDP_ASSOCS_MAX && udp_evict_oldest(r) < 0) {
			free(c);
			return;
		}
		a = udp_assoc_alloc(r, src, true);
		a->chain = c;
		ev_timer_set(&a->idle, r->idle, 0.);
		ev_timer_start(capd_main, &a->idle);
		shard_wake(capd_main);
	}
	udp_touch(a);
	if (local != NULL) {
		a->local = *local;
		a->have_local = true;
	}
	if (!r->socks) {
		udp_send_host(a, r->to.host, r->to.port, p, n);
		return;
	}

	struct socks_req req;
	size_t used;

	if (socks_parse_udp(p, n, &used, &req) != PARSE_OK) {
		log_debug("%s: udp datagram from %s dropped: %s", r->inst->name, addr_format(src, b, sizeof b),
		          req.why ? req.why : "bad header");
		return;
	}
	if (req.frag != 0) {
		/* fragments are not supported (RFC 1928 section 7 allows dropping them) */
		log_debug("%s: udp fragment from %s dropped", r->inst->name, addr_format(src, b, sizeof b));
		return;
	}
	if (req.atyp == SOCKS_ATYP_NAME)
		udp_send_host(a, req.host, req.port, p + used, n - used);
	else
		udp_send_up(a, (struct sockaddr *)&req.addr, NULL, p + used, n - used);
}

static void
udp_client_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct udp_relay *r = w->data;
	uint8_t *p = udp_buf + SOCKS_UDP_HDR_MAX;

	(void)loop; (void)revents;
	for (int i = 0; i < UDP_BATCH; i++) {
		struct sockaddr_storage src, local;
		union { struct cmsghdr h; uint8_t b[CMSG_SPACE(sizeof(struct in6_pktinfo))]; } ctl;
		struct iovec iov = { p, UDP_DGRAM_MAX };
		struct msghdr mh = { .msg_name = &src, .msg_namelen = sizeof src, .msg_iov = &iov, .msg_iovlen = 1,
		                     .msg_control = r->pktinfo ? &ctl : NULL, .msg_controllen = r->pktinfo ? sizeof ctl : 0 };
		ssize_t n = recvmsg(r->fd, &mh, 0);

		if (n < 0)
			return;
		udp_client_dgram(r, (struct sockaddr *)&src, udp_dst_of(&mh, &local), p, (size_t)n);
	}
}

static void
udp_upstream_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct udp_assoc *a = w->data;
	struct udp_relay *r = a->r;
	uint8_t *p = udp_buf + SOCKS_UDP_HDR_MAX;

	(void)loop; (void)revents;
	for (int i = 0; i < UDP_BATCH; i++) {
		struct sockaddr_storage src;
		socklen_t len = sizeof src;
		ssize_t n = recvfrom(w->fd, p, UDP_DGRAM_MAX, 0, (struct sockaddr *)&src, &len);
		struct udp_flow *f = NULL, *g;
		const uint8_t *out = p;
		size_t outlen = (size_t)n;

		if (n < 0)
			return;
		if (r->socks) {
			/* a reply from a new endpoint (TFTP answers from another port) is a new flow */
			f = udp_flow_get(a, (struct sockaddr *)&src, false, NULL);
		} else {
			LIST_FOREACH(g, &a->flows, entry)
				if (addr_same((struct sockaddr *)&g->peer, (struct sockaddr *)&src, true)) {
					f = g;
					break;
				}
		}
		if (f == NULL)
			continue;
		udp_touch(a);
		if (r->socks) {
			size_t h = socks_udp_header_len((struct sockaddr *)&src);
			socks_udp_header(p - h, (struct sockaddr *)&src);
			out = p - h;
			outlen += h;
		}
		if (!a->bound)
			continue;
		if (udp_client_send(a, out, outlen) < 0) {
			if (errno != EAGAIN)
				log_debug("%s: udp send to client: %s", r->inst->name, strerror(errno));
			continue;
		}
		session_data(f->s, DIR_DOWN, p, (size_t)n);  /* as udp_send_up: once it crossed */
	}
}

/*
 * dns: a DNS server on the instance's listen address, over UDP (a socket of
 * its own, opened in start) and TCP (the core's listener; each connection is
 * one session whose input is length-prefixed messages). Queries a rule
 * claims are answered here; the others go to the upstream resolver over
 * UDP (retried, then TCP when the answer is truncated and the client has
 * EDNS; one without gets the truncated answer) or over TCP when the client
 * came over TCP, and the reply goes back under the client's id; one whose
 * CNAME chain leads to a name a rule claims ends there, with capd's records.
 * A zone transfer (AXFR, IXFR) from a TCP client is several messages from
 * the upstream: each is relayed as it comes, until the closing SOA.
 * Every UDP query becomes a datagram session; message decisions are in
 * dns-msg.c. Nothing here blocks the loop.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/queue.h>
#include <unistd.h>

#include <linux/sockios.h>

#include "capd.h"
#include "chain.h"
#include "dns-msg.h"
#include "instance.h"
#include "log.h"
#include "resolve.h"
#include "session.h"
#include "values.h"
#include "xmalloc.h"

/* seconds per upstream attempt: the DNS_TRIES of them end before the 5 s a stub
 * resolver (glibc, dig) waits, so that it hears SERVFAIL instead of silence */
#define DNS_TRY_TIMEOUT 1.5
#define DNS_XFR_GAP 2.0          /* seconds a zone transfer may wait for its next message */
#define DNS_TRIES 3              /* attempts per transport before SERVFAIL */
#define DNS_MAX_PENDING 1024     /* forwarded queries in flight per instance */
#define DNS_UDP_BATCH 64         /* datagrams taken per wake-up */
#define DNS_UDP_RCVBUF (1 << 20) /* the UDP socket's receive buffer: holds ~2500 queries (the kernel doubles it) */
#define DNS_TCP_QUERY_MAX 16384  /* a larger TCP frame from a client closes it */
#define DNS_TCP_IDLE 10.0        /* a TCP client with nothing in flight is closed after this */
#define DNS_TCP_PENDING_MAX 64   /* a TCP client's queries upstream at once; more wait in hs_in */
#define DNS_TCP_OUT_MAX (256 * 1024)  /* answers a TCP client leaves unread before it is closed */
#define DNS_XFR_OUT_HIGH (DNS_TCP_OUT_MAX / 2)  /* a transfer stops reading the upstream past this */
#define DNS_WHY_MAX 512          /* room for the upstream name and an error text */

static const char *const dns_keys[] = { "answer", "upstream", "ttl", NULL };

/* Parsed parameters. Owned by the instance; dns_free frees it. */
struct dns_cfg {
	struct dns_rules rules;
	struct hostport upstream;  /* host "" until start reads resolv.conf */
	bool upstream_set;
};

struct dns_fwd;

/* Runtime state between start and stop; inst->proto_state. dns_stop frees it. */
struct dns_state {
	struct instance *inst;
	int ufd;                           /* the UDP socket on listen, -1 when closed */
	ev_io uio;
	bool pktinfo;                      /* bound to a wildcard address: learn and reply from the local address */
	struct hostport up;                /* upstream as configured or from resolv.conf */
	struct resolve_conf_seen conf;     /* resolv.conf as up was taken from it (no upstream =) */
	struct sockaddr_storage up_addr;
	bool have_up;
	struct resolve_req *resolving;
	char up_str[HOST_MAX + 16];
	TAILQ_HEAD(, dns_fwd) fwds;
	unsigned nfwd;
	uint8_t buf[DNS_MAX_MSG + 1];
};

/*
 * One query on its way upstream. Owned by dns_state.fwds; dns_fwd_free frees it.
 * A UDP client's query has its own datagram session (s->proto_state points
 * back here); a TCP client's shares the connection's session.
 */
struct dns_fwd {
	TAILQ_ENTRY(dns_fwd) entry;
	struct dns_state *ds;
	struct session *s;
	bool client_tcp;
	struct sockaddr_storage client, local;  /* UDP client and the address it sent to */
	uint16_t client_id;
	unsigned repeats;                  /* the UDP client sent it again meanwhile: not forwarded */
	struct dns_fwd *leader;            /* a UDP query waiting for the answer to leader's, the same asked
	                                      before (dns_fwd_join): no socket or timer of its own */
	unsigned joined;                   /* queries waiting for this one's answer */
	uint64_t leader_sid;               /* the leader's session, for the reason */
	uint32_t qkey;                     /* question hash (the name in lower case): a quick filter */
	uint16_t udp_max;                  /* largest reply the UDP client takes */
	uint8_t *q;                        /* the query under the upstream id */
	size_t qlen;
	bool tcp;                          /* this attempt is over TCP */
	int tries;
	int fd;                            /* upstream socket, -1 between attempts */
	uint16_t chain_port;               /* fd's port, noted for the instance it asks (chain.h), or 0 */
	int chain_type;                    /* the note's socket type */
	ev_io io;
	ev_timer timer;
	bool connected;                    /* TCP connect done */
	size_t sent;                       /* TCP: framed query bytes written */
	struct buf in;                     /* TCP: reply bytes */
	uint8_t *trunc;                    /* the truncated UDP answer, for a UDP client if TCP fails */
	size_t trunc_len;
	struct dns_xfr xfr;                /* a TCP client's AXFR or IXFR (qtype 0: any other query) */
	unsigned msgs;                     /* transfer messages relayed so far */
	double timer_set;                  /* TCP: when the timer last started, by the clock (ev_time) */
	ev_io wait;                        /* a transfer held back: the client's socket taking more */
};

/* A TCP client connection: s->proto_state. Freed with the session. */
struct dns_conn {
	unsigned pending;                  /* its queries still upstream */
	unsigned queries;
	bool eof;                          /* the client closed its side */
	bool paused;                       /* too many queries upstream: reading stopped */
	ev_timer timer;                    /* idle and end-of-input check */
	double last;
	struct session *s;
};

static void dns_fwd_try(struct dns_fwd *f);
static void dns_up_follow(struct dns_state *ds);
static void dns_tcp_reply(struct session *s, const uint8_t *p, size_t n);

/* ---- configuration ---- */

static int
dns_configure(struct instance *inst, struct params *p)
{
	struct dns_cfg *dc = xcalloc(1, sizeof *dc);
	json_t *answers, *e;
	const char *up;
	uint64_t ttl;
	char *why = NULL;
	size_t i;

	inst->cfg = dc;
	answers = params_list(p, "answer");
	if (p->why)
		return -1;
	json_array_foreach(answers, i, e) {
		if (dns_rules_add(&dc->rules, json_string_value(e), &why) < 0) {
			params_fail_at(p, "answer", i, "%s", why);
			free(why);
			return -1;
		}
	}
	if (params_uint(p, "ttl", 60, VALUE_TTL_MAX, &ttl) < 0)
		return -1;
	dc->rules.ttl = (uint32_t)ttl;
	if ((up = params_str(p, "upstream", NULL)) != NULL) {
		if (hostport_parse_opt(up, 53, &dc->upstream, &why) < 0) {
			params_fail(p, "upstream", "bad upstream '%s': %s", up, why);
			free(why);
			return -1;
		}
		dc->upstream_set = true;
	}
	return 0;
}

static void
dns_free(struct instance *inst)
{
	struct dns_cfg *dc = inst->cfg;

	if (dc == NULL)
		return;
	dns_rules_free(&dc->rules);
	free(dc);
}

static void
dns_describe(struct instance *inst, json_t *o)
{
	struct dns_cfg *dc = inst->cfg;
	struct dns_state *ds = inst->proto_state;
	json_t *a = json_array();
	char addr[INET6_ADDRSTRLEN], up[HOST_MAX + 16];

	for (size_t i = 0; i < dc->rules.n; i++) {
		struct dns_rule *r = &dc->rules.v[i];
		inet_ntop(r->family, &r->addr, addr, sizeof addr);
		json_array_append_new(a, json_sprintf("%s=%s", r->pattern, addr));
	}
	json_object_set_new(o, "answer", a);
	if (ds) {
		dns_up_follow(ds);  /* what a query would be sent to now */
		json_object_set_new(o, "upstream", json_string(ds->up_str));
	} else if (dc->upstream_set) {
		if (strchr(dc->upstream.host, ':'))
			snprintf(up, sizeof up, "[%s]:%u", dc->upstream.host, dc->upstream.port);
		else
			snprintf(up, sizeof up, "%s:%u", dc->upstream.host, dc->upstream.port);
		json_object_set_new(o, "upstream", json_string(up));
	}
	json_object_set_new(o, "ttl", json_integer(dc->rules.ttl));
}

/* ---- upstream address ---- */

/*
 * Whether a nameserver at ns would be this instance: its own address and port, or a
 * loopback address on its port while it listens on every address. A lab box whose
 * resolv.conf points at capd lists capd first and the real resolver after it, and a
 * name such as localhost:PORT can lead back here too.
 */
static bool
dns_is_self(const struct sockaddr_storage *ns, const struct sockaddr_storage *listen)
{
	const struct sockaddr *l = (const struct sockaddr *)listen, *a = (const struct sockaddr *)ns;

	if (addr_same(a, l, true))
		return true;
	return addr_is_any(l) && addr_port(a) == addr_port(l) && a->sa_family == l->sa_family && addr_is_loopback(a);
}

/* The first nameserver of resolv.conf that is not this instance, or -1. */
static int
dns_resolv_conf(struct hostport *hp, const struct sockaddr_storage *listen)
{
	FILE *f = fopen(RESOLVE_CONF, "re");
	char line[512], ns[256];
	struct sockaddr_storage ss;
	socklen_t len;
	int rv = -1;

	if (f == NULL)
		return -1;
	while (fgets(line, sizeof line, f)) {
		if (sscanf(line, " nameserver %255s", ns) != 1 || addr_from_literal(ns, 53, &ss, &len) < 0)
			continue;
		if (dns_is_self(&ss, listen)) {
			log_info("%s: skipping nameserver %s: it is this instance", RESOLVE_CONF, ns);
			continue;
		}
		snprintf(hp->host, sizeof hp->host, "%s", ns);
		hp->port = 53;
		rv = 0;
		break;
	}
	fclose(f);
	return rv;
}

/* ds->up_str: "host:port", "[v6]:port", or "none". */
static void
dns_up_format(struct dns_state *ds)
{
	if (ds->up.host[0] == '\0')
		snprintf(ds->up_str, sizeof ds->up_str, "none");
	else if (strchr(ds->up.host, ':'))
		snprintf(ds->up_str, sizeof ds->up_str, "[%s]:%u", ds->up.host, ds->up.port);
	else
		snprintf(ds->up_str, sizeof ds->up_str, "%s:%u", ds->up.host, ds->up.port);
}

/*
 * Without upstream =, the instance follows resolv.conf as capd's resolver
 * does (resolve.h) and glibc's stub resolver: when the file changed (DHCP,
 * NetworkManager, an analyst), the queries forwarded from now on go to its
 * first nameserver that is not this instance. A query out already has its
 * socket to the old one and takes its answer; only a retry goes to the new.
 */
static void
dns_up_follow(struct dns_state *ds)
{
	struct dns_cfg *dc = ds->inst->cfg;
	struct hostport hp = { .host = "" };
	char was[sizeof ds->up_str];
	socklen_t len;

	if (dc->upstream_set || !resolve_conf_changed(&ds->conf, ev_now(capd_loop)))
		return;
	dns_resolv_conf(&hp, &ds->inst->listen);
	if (strcmp(hp.host, ds->up.host) == 0 && hp.port == ds->up.port)
		return;
	memcpy(was, ds->up_str, sizeof was);
	ds->up = hp;
	dns_up_format(ds);
	/* resolv.conf names addresses only: no name to resolve */
	ds->have_up = hp.host[0] && addr_from_literal(hp.host, hp.port, &ds->up_addr, &len) == 0;
	if (ds->have_up)
		log_info("%s: %s changed: upstream %s (was %s)", ds->inst->name, RESOLVE_CONF, ds->up_str, was);
	else
		log_warnx("%s: %s changed: no nameserver in it other than this instance (upstream was %s): "
		          "queries no rule answers get SERVFAIL", ds->inst->name, RESOLVE_CONF, was);
}

static void dns_fwd_fail(struct dns_fwd *f, const char *why);

/* Queries that waited for the upstream's name go now, or get SERVFAIL with why when it has no address. */
static void
dns_fwd_kick_waiting(struct dns_state *ds, const char *why)
{
	struct dns_fwd *f, *next;

	for (f = TAILQ_FIRST(&ds->fwds); f; f = next) {
		next = TAILQ_NEXT(f, entry);
		if (f->fd >= 0 || f->leader != NULL)
			continue;
		ev_timer_stop(capd_loop, &f->timer);
		if (ds->have_up) {
			f->tries--;  /* the wait does not count as an attempt */
			dns_fwd_try(f);
		} else {
			dns_fwd_fail(f, why);
		}
		/* f may be gone, and next with it when f was a TCP client's last query: restart */
		next = TAILQ_FIRST(&ds->fwds);
	}
}

static void
dns_up_resolved_cb(void *arg, int err, const char *why, const struct sockaddr_storage *addrs, int n)
{
	struct dns_state *ds = arg;
	int i = 0;

	ds->resolving = NULL;
	if (err != 0 || n < 1) {
		log_warnx("%s: cannot resolve upstream %s: %s", ds->inst->name, ds->up.host, why ? why : "no address");
		dns_fwd_kick_waiting(ds, "cannot resolve the upstream");
		return;
	}
	/* a query sent to ourselves comes back as a new query to forward: a storm up to DNS_MAX_PENDING */
	while (i < n && dns_is_self(&addrs[i], &ds->inst->listen))
		i++;
	if (i == n) {
		log_warnx("%s: upstream %s resolves only to this instance's own address %s: "
		          "queries no rule answers get SERVFAIL", ds->inst->name, ds->up_str,
		          addr_format((const struct sockaddr *)&addrs[0], (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN));
		dns_fwd_kick_waiting(ds, "the upstream is this instance");
		return;
	}
	ds->up_addr = addrs[i];
	ds->have_up = true;
	log_debug("%s: upstream %s is %s", ds->inst->name, ds->up.host,
	          addr_format((const struct sockaddr *)&addrs[i], (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN));
	dns_fwd_kick_waiting(ds, NULL);
}

/* ---- forwarding ---- */

static void
dns_fwd_close_fd(struct dns_fwd *f)
{
	ev_io_stop(capd_loop, &f->io);
	ev_io_stop(capd_loop, &f->wait);
	ev_timer_stop(capd_loop, &f->timer);
	if (f->fd >= 0) {
		close(f->fd);
		f->fd = -1;
	}
	chain_forget(f->chain_port, f->chain_type);
	f->chain_port = 0;
	buf_reset(&f->in);
	f->sent = 0;
	f->connected = false;
}

/*
 * f goes without an answer (its client's session was closed): the queries
 * waiting for it ask on their own, on the next loop pass (dns_fwd_timer_cb),
 * never from inside this free.
 */
static void
dns_fwd_release_joined(struct dns_fwd *f)
{
	struct dns_fwd *g;

	TAILQ_FOREACH(g, &f->ds->fwds, entry) {
		if (g->leader != f)
			continue;
		g->leader = NULL;
		g->leader_sid = 0;
		f->joined--;
		ev_timer_stop(capd_loop, &g->timer);
		ev_timer_set(&g->timer, 0., 0.);
		ev_timer_start(capd_loop, &g->timer);
	}
}

static void
dns_fwd_free(struct dns_fwd *f)
{
	struct dns_state *ds = f->ds;

	dns_fwd_close_fd(f);
	if (f->leader != NULL)
		f->leader->joined--;
	if (f->joined > 0)
		dns_fwd_release_joined(f);
	TAILQ_REMOVE(&ds->fwds, f, entry);
	ds->nfwd--;
	if (f->client_tcp) {
		struct dns_conn *c = f->s->proto_state;
		if (c) {
			c->pending--;
			if (c->paused && c->pending < DNS_TCP_PENDING_MAX / 2) {
				ev_timer_stop(capd_loop, &c->timer);
				ev_timer_set(&c->timer, 0., 0.5);
				ev_timer_start(capd_loop, &c->timer);
			}
		}
	} else if (f->s->proto_state == f) {
		f->s->proto_state = NULL;
	}
	buf_free(&f->in);
	free(f->q);
	free(f->trunc);
	free(f);
}

/* Sends a UDP reply to a client, from the address it wrote to when bound to a wildcard. */
static void
dns_udp_send(struct dns_state *ds, const uint8_t *p, size_t n, const struct sockaddr_storage *client,
             const struct sockaddr_storage *local)
{
	struct iovec iov = { .iov_base = (void *)p, .iov_len = n };
	struct msghdr mh = { .msg_name = (void *)client, .msg_namelen = addr_len((const struct sockaddr *)client),
	                     .msg_iov = &iov, .msg_iovlen = 1 };
	union {
		char v4[CMSG_SPACE(sizeof(struct in_pktinfo))];
		char v6[CMSG_SPACE(sizeof(struct in6_pktinfo))];
	} cbuf;

	memset(&cbuf, 0, sizeof cbuf);
	if (ds->pktinfo && local->ss_family == AF_INET && client->ss_family == AF_INET) {
		struct in_pktinfo pi = { .ipi_spec_dst = ((const struct sockaddr_in *)local)->sin_addr };
		mh.msg_control = cbuf.v4;
		mh.msg_controllen = sizeof cbuf.v4;
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = IPPROTO_IP;
		cm->cmsg_type = IP_PKTINFO;
		cm->cmsg_len = CMSG_LEN(sizeof pi);
		memcpy(CMSG_DATA(cm), &pi, sizeof pi);
	} else if (ds->pktinfo && local->ss_family == AF_INET6 && client->ss_family == AF_INET6) {
		struct in6_pktinfo pi = { .ipi6_addr = ((const struct sockaddr_in6 *)local)->sin6_addr };
		mh.msg_control = cbuf.v6;
		mh.msg_controllen = sizeof cbuf.v6;
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = IPPROTO_IPV6;
		cm->cmsg_type = IPV6_PKTINFO;
		cm->cmsg_len = CMSG_LEN(sizeof pi);
		memcpy(CMSG_DATA(cm), &pi, sizeof pi);
	}
	if (ds->ufd < 0 || sendmsg(ds->ufd, &mh, MSG_DONTWAIT) < 0)
		log_debug("%s: reply to %s lost: %s", ds->inst->name,
		          addr_format((const struct sockaddr *)client, (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN),
		          ds->ufd < 0 ? "socket closed" : strerror(errno));
}

/* The reply (already under the client's id) goes to the client; the query is done. */
static void
dns_fwd_deliver(struct dns_fwd *f, const uint8_t *p, size_t n, const char *reason)
{
	struct session *s = f->s;
	struct dns_state *ds = f->ds;

	if (f->client_tcp) {
		/* p may live in f's buffer, and the reply may close s (which frees s's queries) */
		uint8_t *copy = xmalloc(n);
		memcpy(copy, p, n);
		dns_fwd_free(f);
		dns_tcp_reply(s, copy, n);
		free(copy);
		return;
	}
	dns_udp_send(ds, p, n, &f->client, &f->local);
	session_data(s, DIR_DOWN, p, n);
	if (f->repeats > 0 || f->leader_sid != 0) {
		char joined[96] = "", repeats[96] = "", *why;

		if (f->leader_sid != 0)
			snprintf(joined, sizeof joined, "; asked upstream once, with session %llu's query",
			         (unsigned long long)f->leader_sid);
		if (f->repeats > 0)
			snprintf(repeats, sizeof repeats, "; the client asked %u more time%s meanwhile, not forwarded again",
			         f->repeats, f->repeats == 1 ? "" : "s");
		why = xasprintf("%s%s%s", reason, joined, repeats);
		dns_fwd_free(f);
		session_close(s, why);
		free(why);
		return;
	}
	dns_fwd_free(f);
	session_close(s, reason);
}

static void dns_fwd_fail(struct dns_fwd *f, const char *why);
static void dns_fwd_answer(struct dns_fwd *f, uint8_t *p, size_t n);

/* The next query waiting for f's answer, now on its own; NULL when none is left. */
static struct dns_fwd *
dns_fwd_next_joined(struct dns_fwd *f)
{
	struct dns_fwd *g;

	if (f->joined == 0)
		return NULL;
	TAILQ_FOREACH(g, &f->ds->fwds, entry)
		if (g->leader == f) {
			g->leader = NULL;
			f->joined--;
			g->tcp = f->tcp;  /* how the answer came, for its reason */
			return g;
		}
	return NULL;
}

/* f's final answer p goes to each query waiting for it too, under its id, spelling and size. */
static void
dns_fwd_answer_joined(struct dns_fwd *f, const uint8_t *p, size_t n)
{
	struct dns_fwd *g;

	while ((g = dns_fwd_next_joined(f)) != NULL) {
		uint8_t *copy = xmalloc(n);

		memcpy(copy, p, n);
		dns_fwd_answer(g, copy, n);
		free(copy);
	}
}

/* f failed: so do the queries waiting for it, with f's truncated answer when it has one. */
static void
dns_fwd_fail_joined(struct dns_fwd *f, const char *why)
{
	struct dns_fwd *g;

	while ((g = dns_fwd_next_joined(f)) != NULL) {
		if (f->trunc) {
			g->trunc = xmalloc(f->trunc_len);
			memcpy(g->trunc, f->trunc, f->trunc_len);
			g->trunc_len = f->trunc_len;
		}
		dns_fwd_fail(g, why);
	}
}

static void
dns_fwd_fail(struct dns_fwd *f, const char *why)
{
	char reason[DNS_WHY_MAX + HOST_MAX + 64];
	uint8_t *p;
	size_t n;

	dns_fwd_fail_joined(f, why);
	if (f->trunc) {
		/* TCP to the upstream failed: the truncated answer at least tells the client to retry */
		dns_msg_set_id(f->trunc, f->client_id);
		snprintf(reason, sizeof reason, "forwarded to %s: truncated (TCP failed: %s)", f->ds->up_str, why);
		p = f->trunc;
		n = f->trunc_len;
		f->trunc = NULL;
		if (!f->client_tcp && n > f->udp_max) {
			/* the upstream's truncated answer is itself larger than the client takes */
			uint8_t *t = dns_msg_truncate(f->q, f->qlen, p, n, f->udp_max, &n);
			free(p);
			if ((p = t) == NULL) {
				dns_fwd_fail(f, why);
				return;
			}
		}
		dns_fwd_deliver(f, p, n, reason);
		free(p);
		return;
	}
	snprintf(reason, sizeof reason, "SERVFAIL: %s", why);
	log_debug("%s: query %u: %s", f->ds->inst->name, f->client_id, reason);
	dns_msg_set_id(f->q, f->client_id);
	p = dns_msg_error(f->q, f->qlen, 2 /* SERVFAIL */, &n);
	dns_fwd_deliver(f, p, n, reason);
	free(p);
}

static void
dns_fwd_retry(struct dns_fwd *f, const char *why)
{
	dns_fwd_close_fd(f);
	/* a transfer the client has begun to get cannot start again: SERVFAIL tells it to give up */
	if (f->tries >= DNS_TRIES || f->msgs > 0) {
		dns_fwd_fail(f, why);
		return;
	}
	log_debug("%s: query %u: %s, trying again", f->ds->inst->name, f->client_id, why);
	dns_fwd_try(f);
}

static const char *const dns_rcodes[] = {
	"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
	"NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13", "RCODE14", "RCODE15",
};

/* A reply that belongs to f's query arrived from the upstream. */
static void
dns_fwd_answer(struct dns_fwd *f, uint8_t *p, size_t n)
{
	char reason[DNS_WHY_MAX + 2 * HOST_MAX + 96], via[HOST_MAX + 48] = "";
	uint8_t *chain = NULL;
	const char *rule = NULL;
	size_t clen = 0;

	dns_msg_keep_qname_case(f->q, f->qlen, p, n);
	if (!f->tcp && dns_msg_tc(p) && f->udp_max <= DNS_UDP_MIN && n <= f->udp_max) {
		/* truncated for a UDP client without EDNS: its query went up as it came, so the whole
		 * answer is larger than it takes over UDP, and a TCP query here would only end in this
		 * same truncated answer; the client asks again over TCP itself (the upstream's side of
		 * the exchange is not captured, so nothing is lost to the analyst) */
		dns_fwd_answer_joined(f, p, n);
		dns_msg_set_id(p, f->client_id);
		snprintf(reason, sizeof reason, "forwarded to %s: truncated (the client asks again over TCP)",
		         f->ds->up_str);
		dns_fwd_deliver(f, p, n, reason);
		return;
	}
	if (!f->tcp && dns_msg_tc(p)) {
		/* truncated: ask again over TCP, keeping this one for a UDP client whose size it fits
		 * (an EDNS client's may be larger than the upstream sends over UDP) */
		free(f->trunc);
		f->trunc = xmalloc(n);
		memcpy(f->trunc, p, n);
		f->trunc_len = n;
		dns_fwd_close_fd(f);
		f->tcp = true;
		f->tries = 0;
		dns_fwd_try(f);
		return;
	}
	dns_fwd_answer_joined(f, p, n);
	if (f->xfr.qtype == 0 &&
	    (chain = dns_msg_chain_answer(&((struct dns_cfg *)f->ds->inst->cfg)->rules, p, n, &rule, &clen)) != NULL) {
		/* an alias of a name a rule claims: the client is sent there too, not to the real address */
		p = chain;
		n = clen;
		snprintf(via, sizeof via, ", CNAME to a name rule %s answers", rule);
	}
	if (!f->client_tcp && n > f->udp_max) {
		/* the whole answer does not fit the client's UDP size: it gets a truncated one (the
		 * upstream's when that fits), and comes back over TCP. Not dns_fwd_fail: TCP worked,
		 * and the reason must not say otherwise */
		uint8_t *t;
		size_t tlen = 0;

		if (f->trunc && f->trunc_len <= f->udp_max) {
			t = f->trunc;
			tlen = f->trunc_len;
			f->trunc = NULL;
		} else if ((t = dns_msg_truncate(f->q, f->qlen, p, n, f->udp_max, &tlen)) == NULL) {
			free(chain);
			dns_fwd_fail(f, "cannot build a truncated answer");
			return;
		}
		snprintf(reason, sizeof reason, "forwarded to %s: truncated (the answer%s is %zu bytes, "
		         "the client takes %u over UDP)", f->ds->up_str, f->tcp ? " over TCP" : "", n, f->udp_max);
		dns_msg_set_id(t, f->client_id);
		dns_fwd_deliver(f, t, tlen, reason);
		free(t);
		free(chain);
		return;
	}
	dns_msg_set_id(p, f->client_id);
	snprintf(reason, sizeof reason, "forwarded to %s%s: %s%s", f->ds->up_str, f->tcp ? " over TCP" : "",
	         dns_rcodes[dns_msg_rcode(p)], via);
	dns_fwd_deliver(f, p, n, reason);
	free(chain);
}

static void
dns_fwd_udp_read(struct dns_fwd *f)
{
	uint8_t *b = f->ds->buf;

	for (;;) {
		ssize_t n = recv(f->fd, b, DNS_MAX_MSG, 0);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			char why[DNS_WHY_MAX];
			snprintf(why, sizeof why, "upstream %s: %s", f->ds->up_str, strerror(errno));
			dns_fwd_retry(f, why);
			return;
		}
		if (!dns_msg_reply_matches(f->q, f->qlen, b, (size_t)n)) {
			log_debug("%s: ignoring a stray reply from the upstream", f->ds->inst->name);
			continue;
		}
		dns_fwd_answer(f, b, (size_t)n);
		return;
	}
}

/*
 * Takes the whole replies in f->in. False when the upstream is not to be read
 * now: f is gone, or its transfer waits for the client to read.
 */
static bool
dns_fwd_tcp_frames(struct dns_fwd *f)
{
	struct session *s = f->s;

	while (buf_used(&f->in) >= 2) {
		uint8_t *h = buf_head(&f->in);
		size_t len = (size_t)(h[0] << 8 | h[1]);

		if (buf_used(&f->in) < len + 2)
			break;
		if (!dns_msg_reply_matches(f->q, f->qlen, h + 2, len) &&
		    !(f->msgs > 0 && dns_msg_xfr_more(f->q, h + 2, len))) {
			buf_consume(&f->in, len + 2);
			continue;
		}
		if (f->xfr.qtype != 0 && buf_used(&s->hs_out) + len > DNS_XFR_OUT_HIGH) {
			/* the message waits while the client's answers pile up: however many
			 * transfers share the connection, they stay below DNS_TCP_OUT_MAX by
			 * more than a message, so a client asking more meanwhile is not closed */
			ev_timer_stop(capd_loop, &f->timer);
			ev_io_stop(capd_loop, &f->io);
			ev_io_set(&f->wait, s->client.fd, EV_WRITE);
			ev_io_start(capd_loop, &f->wait);
			return false;
		}
		if (f->xfr.qtype == 0 || dns_msg_xfr_ends(&f->xfr, h + 2, len)) {
			dns_fwd_answer(f, h + 2, len);
			return false;
		}
		dns_msg_set_id(h + 2, f->client_id);
		dns_tcp_reply(s, h + 2, len);
		if (s->state == SESSION_CLOSED)
			return false;  /* and f with it */
		buf_consume(&f->in, len + 2);
		f->msgs++;
		ev_timer_stop(capd_loop, &f->timer);
		ev_timer_set(&f->timer, DNS_XFR_GAP, 0.);  /* a transfer takes as long as its messages keep coming */
		ev_timer_start(capd_loop, &f->timer);
		f->timer_set = ev_time();
	}
	return true;
}

/* The client's socket takes more: a held transfer goes on once half of what waited is out. */
static void
dns_fwd_wait_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct dns_fwd *f = w->data;

	(void)revents;
	if (buf_used(&f->s->hs_out) > DNS_XFR_OUT_HIGH / 2)
		return;
	ev_io_stop(loop, w);
	ev_timer_set(&f->timer, DNS_XFR_GAP, 0.);
	ev_timer_start(loop, &f->timer);
	f->timer_set = ev_time();
	if (dns_fwd_tcp_frames(f))
		ev_io_start(loop, &f->io);
}

static void
dns_fwd_tcp_io(struct dns_fwd *f, int revents)
{
	char why[DNS_WHY_MAX];

	if (!f->connected) {
		int err = 0;
		socklen_t len = sizeof err;
		if (getsockopt(f->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
			err = errno;
		if (err == EINPROGRESS)
			return;
		if (err != 0) {
			snprintf(why, sizeof why, "TCP connect to %s: %s", f->ds->up_str, strerror(err));
			dns_fwd_retry(f, why);
			return;
		}
		f->connected = true;
	}
	if (f->sent < f->qlen + 2) {
		uint8_t frame[DNS_MAX_MSG + 2];
		frame[0] = (uint8_t)(f->qlen >> 8);
		frame[1] = (uint8_t)f->qlen;
		memcpy(frame + 2, f->q, f->qlen);
		ssize_t n = send(f->fd, frame + f->sent, f->qlen + 2 - f->sent, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			snprintf(why, sizeof why, "TCP send to %s: %s", f->ds->up_str, strerror(errno));
			dns_fwd_retry(f, why);
			return;
		}
		f->sent += (size_t)n;
		if (f->sent == f->qlen + 2) {
			ev_io_stop(capd_loop, &f->io);
			ev_io_set(&f->io, f->fd, EV_READ);
			ev_io_start(capd_loop, &f->io);
		}
		return;
	}
	if (!(revents & EV_READ))
		return;
	for (;;) {
		ssize_t n = read(f->fd, buf_reserve(&f->in, 4096), 4096);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			snprintf(why, sizeof why, "TCP read from %s: %s", f->ds->up_str, strerror(errno));
			dns_fwd_retry(f, why);
			return;
		}
		if (n == 0) {
			snprintf(why, sizeof why, "%s closed the TCP connection %s", f->ds->up_str,
			         f->msgs ? "in the middle of a zone transfer" : "before answering");
			dns_fwd_retry(f, why);
			return;
		}
		buf_commit(&f->in, (size_t)n);
		if (!dns_fwd_tcp_frames(f))
			return;
	}
}

static void
dns_fwd_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct dns_fwd *f = w->data;

	(void)loop;
	if (f->tcp)
		dns_fwd_tcp_io(f, revents);
	else
		dns_fwd_udp_read(f);
}

/*
 * Whether a TCP upstream's timer ran out too soon to blame the upstream; if so
 * it runs again. The loop's clock stands still while a callback runs and while
 * capd does not run at all: a transfer read on for seconds in one callback
 * (the upstream keeping ahead of capd) set its timer seconds in the past, and
 * a capd held up past the timer found it run out with the upstream's messages
 * waiting unread. The clock and the socket are asked instead.
 */
static bool
dns_fwd_tcp_too_soon(struct dns_fwd *f, struct ev_loop *loop)
{
	double wait = f->msgs > 0 ? DNS_XFR_GAP : DNS_TRY_TIMEOUT;
	double left = f->timer_set + wait - ev_time();
	int unread = 0;

	if (!f->tcp || f->fd < 0 || !f->connected)
		return false;
	if (ioctl(f->fd, SIOCINQ, &unread) == 0 && unread > 0)
		left = wait;  /* the io watcher reads them next, in this pass */
	if (left <= 0)
		return false;
	ev_timer_set(&f->timer, left, 0.);
	ev_timer_start(loop, &f->timer);
	return true;
}

static void
dns_fwd_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dns_fwd *f = w->data;
	char why[DNS_WHY_MAX];

	(void)revents;
	if (f->tries == 0 && f->fd < 0) {  /* it waited for another query's answer, which is gone */
		dns_fwd_try(f);
		return;
	}
	if (dns_fwd_tcp_too_soon(f, loop))
		return;
	if (!f->ds->have_up)
		snprintf(why, sizeof why, "upstream %s has no address", f->ds->up_str);
	else
		snprintf(why, sizeof why, "upstream %s timed out%s", f->ds->up_str, f->tcp ? " over TCP" : "");
	/* UDP: ask again on the same socket, so that a slow upstream's answer to
	 * an earlier try is still taken (a fresh socket would drop it) */
	if (!f->tcp && f->fd >= 0 && f->tries < DNS_TRIES && send(f->fd, f->q, f->qlen, 0) >= 0) {
		log_debug("%s: query %u: %s, trying again", f->ds->inst->name, f->client_id, why);
		f->tries++;
		ev_timer_set(&f->timer, DNS_TRY_TIMEOUT, 0.);
		ev_timer_start(capd_loop, &f->timer);
		return;
	}
	dns_fwd_retry(f, why);
}

/*
 * An upstream that is one of capd's own instances (dns a asking b, b asking
 * a): -1 with why when the query came through that instance already, or
 * through CHAIN_MAX of them; else the socket is noted with the query's chain
 * so that the instance it asks knows (chain.h). Without it each lap made one
 * more query and socket until capd ran out of descriptors.
 */
static int
dns_fwd_chain(struct dns_fwd *f, const struct sockaddr *sa, char *why, size_t len)
{
	const struct chain *c = f->s->chain;
	struct instance *to = chain_instance_at(sa);

	if (to != NULL && chain_has(c, to)) {
		snprintf(why, len, "a loop of capd instances: upstream %s is instance %s's address, and this query "
		         "came through %s already", f->ds->up_str, to->name, to->name);
		return -1;
	}
	if (to != NULL && chain_len(c) >= CHAIN_MAX) {
		snprintf(why, len, "upstream %s is instance %s's address, and this query came through %d capd "
		         "instances already", f->ds->up_str, to->name, CHAIN_MAX);
		return -1;
	}
	f->chain_type = f->tcp ? SOCK_STREAM : SOCK_DGRAM;
	f->chain_port = to != NULL ? chain_note(f->fd, f->chain_type, c, f->ds->inst) : 0;
	return 0;
}

/* One attempt on a fresh socket (fresh source port) toward the upstream; a
 * UDP timeout asks again on the same one (dns_fwd_timer_cb). */
static void
dns_fwd_try(struct dns_fwd *f)
{
	struct dns_state *ds = f->ds;
	const struct sockaddr *sa = (const struct sockaddr *)&ds->up_addr;
	char why[DNS_WHY_MAX];
	int fd;

	f->tries++;
	ev_timer_set(&f->timer, DNS_TRY_TIMEOUT, 0.);
	ev_timer_start(capd_loop, &f->timer);
	f->timer_set = ev_time();
	if (!ds->have_up) {
		if (ds->up.host[0] == '\0') {
			ev_timer_stop(capd_loop, &f->timer);
			f->tries = DNS_TRIES;
			dns_fwd_fail(f, "no upstream (set upstream =)");
			return;
		}
		/* the resolver answers later (never from inside resolve_start): wait for it or the timer */
		if (ds->resolving == NULL)
			ds->resolving = resolve_start(ds->up.host, ds->up.port, dns_up_resolved_cb, ds);
		return;
	}
	fd = socket(sa->sa_family, (f->tcp ? SOCK_STREAM : SOCK_DGRAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(why, sizeof why, "socket: %s", strerror(errno));
		f->tries = DNS_TRIES;
		dns_fwd_retry(f, why);
		return;
	}
	f->fd = fd;
	if (chain_port_listened(addr_port(sa)) && dns_fwd_chain(f, sa, why, sizeof why) < 0) {
		f->tries = DNS_TRIES;
		dns_fwd_retry(f, why);
		return;
	}
	if (connect(fd, sa, addr_len(sa)) < 0 && errno != EINPROGRESS) {
		snprintf(why, sizeof why, "connect to %s: %s", ds->up_str, strerror(errno));
		dns_fwd_retry(f, why);
		return;
	}
	if (f->tcp) {
		ev_io_init(&f->io, dns_fwd_io_cb, fd, EV_WRITE);
	} else {
		if (send(fd, f->q, f->qlen, 0) < 0 && errno != EAGAIN) {
			snprintf(why, sizeof why, "send to %s: %s", ds->up_str, strerror(errno));
			dns_fwd_retry(f, why);
			return;
		}
		ev_io_init(&f->io, dns_fwd_io_cb, fd, EV_READ);
	}
	f->io.data = f;
	ev_io_start(capd_loop, &f->io);
}

/* The name in lower case, its type and class: equal for queries dns_msg_same_ask may find alike. */
static uint32_t
dns_fwd_qkey(const struct dns_question *q)
{
	uint32_t h = 2166136261u;  /* FNV-1a */

	for (const char *c = q->qname; *c; c++)
		h = (h ^ (uint8_t)tolower((unsigned char)*c)) * 16777619u;
	return (h ^ q->qtype) * 16777619u ^ q->qclass;
}

/*
 * A UDP client's query f that asks what another UDP query in flight asked
 * already (another client, or the same from a new port, as dig's retries
 * come) waits for that one's answer instead of going upstream again, as with
 * dnsmasq and unbound: true when it joined one.
 */
static bool
dns_fwd_join(struct dns_fwd *f, const struct dns_question *q)
{
	struct dns_fwd *g;

	f->qkey = dns_fwd_qkey(q);
	TAILQ_FOREACH(g, &f->ds->fwds, entry) {
		if (g == f || g->client_tcp || g->leader != NULL || g->qkey != f->qkey || g->msgs > 0 ||
		    !dns_msg_same_ask(g->q, g->qlen, f->q, f->qlen))
			continue;
		f->leader = g;
		f->leader_sid = g->s->id;
		g->joined++;
		log_debug("%s: query %u %s %s from %s waits for the answer to session %llu's", f->ds->inst->name,
		          q->id, q->qtype_str, q->qname,
		          addr_format((const struct sockaddr *)&f->client, (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN),
		          (unsigned long long)g->s->id);
		return true;
	}
	return false;
}

/* Sends query p upstream for session s (a UDP client's own, or a TCP client's connection). */
static void
dns_fwd_start(struct dns_state *ds, struct session *s, bool client_tcp, const uint8_t *p, size_t n,
              const struct dns_question *q, const struct sockaddr_storage *client,
              const struct sockaddr_storage *local)
{
	struct dns_fwd *f;

	dns_up_follow(ds);
	f = xcalloc(1, sizeof *f);
	f->ds = ds;
	f->s = s;
	f->fd = -1;
	f->client_tcp = client_tcp;
	f->tcp = client_tcp;
	f->client_id = q->id;
	f->udp_max = q->udp_max;
	if (client_tcp && dns_msg_is_xfr(q->qtype))
		dns_msg_xfr_init(&f->xfr, q->qtype, p, n);
	if (client)
		f->client = *client;
	if (local)
		f->local = *local;
	f->q = xmalloc(n);
	memcpy(f->q, p, n);
	f->qlen = n;
	dns_msg_set_id(f->q, (uint16_t)arc4random());  /* a fresh id per query: no clash between clients */
	ev_init(&f->timer, dns_fwd_timer_cb);
	f->timer.data = f;
	ev_init(&f->io, dns_fwd_io_cb);
	ev_init(&f->wait, dns_fwd_wait_cb);
	f->wait.data = f;
	TAILQ_INSERT_TAIL(&ds->fwds, f, entry);
	ds->nfwd++;
	if (client_tcp)
		((struct dns_conn *)s->proto_state)->pending++;
	else
		s->proto_state = f;
	if (ds->nfwd > DNS_MAX_PENDING) {
		f->tries = DNS_TRIES;
		dns_fwd_fail(f, "too many queries in flight");
		return;
	}
	if (!client_tcp && dns_fwd_join(f, q))
		return;
	dns_fwd_try(f);
}

/* ---- UDP clients ---- */

static void
dns_session_note(struct session *s, const struct dns_question *q)
{
	free(s->note);
	if (q->qname[0] || q->qtype_str[0])
		s->note = xasprintf("%s %s", q->qtype_str[0] ? q->qtype_str : "?", q->qname[0] ? q->qname : ".");
	else
		s->note = NULL;
}

/*
 * The query in flight that a UDP client's query p repeats: the same client
 * address and port, sent to the same address, with the same id and question.
 * Stub resolvers (glibc, musl) send it again from the same socket after a
 * second or more while the upstream is slow; forwarded again, it cost the
 * upstream a second query and gave the client two answers. As dnsmasq and
 * unbound, the repeat joins the query in flight, whose one answer goes back
 * when it comes. dig's retries come from a new port each: new queries, that
 * wait for the first one's answer all the same (dns_fwd_join).
 */
static struct dns_fwd *
dns_fwd_find_repeat(struct dns_state *ds, const uint8_t *p, size_t n, uint16_t id,
                    const struct sockaddr_storage *client, const struct sockaddr_storage *local)
{
	struct dns_fwd *f;

	TAILQ_FOREACH(f, &ds->fwds, entry) {
		if (f->client_tcp || f->client_id != id ||
		    !addr_same((const struct sockaddr *)&f->client, (const struct sockaddr *)client, true) ||
		    !addr_same((const struct sockaddr *)&f->local, (const struct sockaddr *)local, true))
			continue;
		if (dns_msg_same_question(f->q, f->qlen, p, n))
			return f;
	}
	return NULL;
}

/* A repeat of f's query came: the capture keeps it in f's session, as the client sent it. */
static void
dns_fwd_repeated(struct dns_fwd *f, const uint8_t *p, size_t n, const struct dns_question *q)
{
	f->repeats++;
	session_data(f->s, DIR_UP, p, n);
	log_debug("%s: query %u %s %s from %s again while upstream (session %llu): not forwarded again",
	          f->ds->inst->name, q->id, q->qtype_str, q->qname,
	          addr_format((const struct sockaddr *)&f->client, (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN),
	          (unsigned long long)f->s->id);
}

static void
dns_udp_query(struct dns_state *ds, const uint8_t *p, size_t n, const struct sockaddr_storage *client,
              const struct sockaddr_storage *local)
{
	struct dns_cfg *dc = ds->inst->cfg;
	struct dns_question q;
	struct session *s;
	struct dns_fwd *f;
	uint8_t *out = NULL;
	size_t outlen = 0;
	enum dns_verdict v;

	v = dns_msg_query(&dc->rules, p, n, false, &q, &out, &outlen);
	if (v == DNS_FORWARD && (f = dns_fwd_find_repeat(ds, p, n, q.id, client, local)) != NULL) {
		dns_fwd_repeated(f, p, n, &q);
		return;
	}
	s = session_new_datagram(ds->inst, "dns", (const struct sockaddr *)client, (const struct sockaddr *)local);
	session_opened(s);
	session_data(s, DIR_UP, p, n);
	dns_session_note(s, &q);
	/* capd's own query comes from this host: loopback, or the address it was sent to */
	if (addr_is_loopback((const struct sockaddr *)client) ||
	    addr_same((const struct sockaddr *)client, (const struct sockaddr *)local, false))
		s->chain = chain_find_udp((const struct sockaddr *)client);
	if (v == DNS_FORWARD && chain_has(s->chain, ds->inst)) {
		/* a loop the asking instance did not see (an address of this host
		 * that is none of the instances' listen addresses) ends here */
		free(out);
		out = dns_msg_error(p, n, 2 /* SERVFAIL */, &outlen);
		snprintf(q.why, sizeof q.why, "SERVFAIL: a loop of capd instances: this query came through %s already",
		         ds->inst->name);
		v = DNS_REPLY;
	}
	switch (v) {
	case DNS_DROP:
		log_debug("%s: %s from %s", ds->inst->name, q.why,
		          addr_format((const struct sockaddr *)client, (char[ADDR_STRLEN]){ 0 }, ADDR_STRLEN));
		session_close(s, q.why);
		break;
	case DNS_REPLY:
		dns_udp_send(ds, out, outlen, client, local);
		session_data(s, DIR_DOWN, out, outlen);
		session_close(s, q.why);
		break;
	case DNS_FORWARD:
		dns_fwd_start(ds, s, false, p, n, &q, client, local);
		break;
	}
	free(out);
}

/* The destination address of a datagram from its IP_PKTINFO / IPV6_PKTINFO. */
static void
dns_udp_local(struct dns_state *ds, struct msghdr *mh, struct sockaddr_storage *local)
{
	*local = ds->inst->listen;
	if (!ds->pktinfo)
		return;
	for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
		if (cm->cmsg_level == IPPROTO_IP && cm->cmsg_type == IP_PKTINFO && local->ss_family == AF_INET) {
			struct in_pktinfo pi;
			memcpy(&pi, CMSG_DATA(cm), sizeof pi);
			((struct sockaddr_in *)local)->sin_addr = pi.ipi_addr;
		} else if (cm->cmsg_level == IPPROTO_IPV6 && cm->cmsg_type == IPV6_PKTINFO &&
		           local->ss_family == AF_INET6) {
			struct in6_pktinfo pi;
			memcpy(&pi, CMSG_DATA(cm), sizeof pi);
			((struct sockaddr_in6 *)local)->sin6_addr = pi.ipi6_addr;
		}
	}
}

static void
dns_udp_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct dns_state *ds = w->data;

	(void)loop; (void)revents;
	for (int i = 0; i < DNS_UDP_BATCH && ds->ufd >= 0; i++) {
		struct sockaddr_storage client, local;
		char cbuf[CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo))];
		struct iovec iov = { .iov_base = ds->buf, .iov_len = sizeof ds->buf };
		struct msghdr mh = { .msg_name = &client, .msg_namelen = sizeof client, .msg_iov = &iov,
		                     .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
		ssize_t n;

		memset(&client, 0, sizeof client);
		n = recvmsg(ds->ufd, &mh, MSG_DONTWAIT);
		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				log_warn("%s: UDP receive", ds->inst->name);
			return;
		}
		if (mh.msg_flags & MSG_TRUNC)
			n = DNS_MAX_MSG;  /* larger than any DNS message: the parser refuses it */
		dns_udp_local(ds, &mh, &local);
		/* ds->buf is reused by forwarding: hand over a copy */
		uint8_t *p = xmalloc((size_t)n + 1);
		memcpy(p, ds->buf, (size_t)n);
		dns_udp_query(ds, p, (size_t)n, &client, &local);
		free(p);
	}
}

/* ---- TCP clients ---- */

static void
dns_conn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct dns_conn *c = w->data;
	struct session *s = c->s;

	(void)revents;
	if (c->paused && c->pending < DNS_TCP_PENDING_MAX / 2) {
		/* resumed from the timer, not from a reply callback: no re-entry into dns_input */
		c->paused = false;
		if (!s->client_eof)
			ev_io_start(loop, &s->client.rio);
		s->inst->proto->input(s);
		return;
	}
	if (c->pending > 0 || buf_used(&s->hs_out) > 0) {
		if (ev_now(loop) - c->last < DNS_TCP_IDLE * 3)
			return;
		session_close(s, "client stopped reading");
		return;
	}
	if (c->eof) {
		session_close(s, c->queries ? "client closed" : "client closed without a query");
		return;
	}
	if (ev_now(loop) - c->last >= DNS_TCP_IDLE)
		session_close(s, "idle");
}

static void
dns_accepted(struct session *s)
{
	struct dns_conn *c = xcalloc(1, sizeof *c);
	socklen_t len = sizeof s->target_addr;

	s->proto = "dns";
	if (getsockname(s->client.fd, (struct sockaddr *)&s->target_addr, &len) < 0)
		s->target_addr = s->inst->listen;
	s->have_target = true;
	c->s = s;
	c->last = capd_now();
	s->proto_state = c;
	ev_timer_init(&c->timer, dns_conn_timer_cb, 0.5, 0.5);
	c->timer.data = c;
	ev_timer_start(capd_loop, &c->timer);
	session_opened(s);
}

/* Queues a framed reply to a TCP client; may close s. */
static void
dns_tcp_reply(struct session *s, const uint8_t *p, size_t n)
{
	struct dns_conn *c = s->proto_state;
	uint8_t *frame = xmalloc(n + 2);

	if (c)
		c->last = capd_now();
	frame[0] = (uint8_t)(n >> 8);
	frame[1] = (uint8_t)n;
	memcpy(frame + 2, p, n);
	session_data(s, DIR_DOWN, frame, n + 2);
	session_send(s, frame, n + 2);
	free(frame);
	if (s->state != SESSION_CLOSED && c && c->eof && c->pending == 0 && buf_used(&s->hs_out) == 0)
		session_close(s, "client closed");
}

static void
dns_input(struct session *s)
{
	struct dns_conn *c = s->proto_state;
	struct dns_cfg *dc = s->inst->cfg;
	struct dns_state *ds = s->inst->proto_state;

	if (c->paused)
		return;  /* the frames wait in hs_in */
	while (buf_used(&s->hs_in) >= 2 && s->state != SESSION_CLOSED) {
		uint8_t *h = buf_head(&s->hs_in);
		size_t len = (size_t)(h[0] << 8 | h[1]);
		struct dns_question q;
		uint8_t *out = NULL, *p;
		size_t outlen = 0;
		enum dns_verdict v;

		if (len < DNS_HEADER_LEN) {
			session_close(s, "malformed: TCP frame shorter than a DNS header");
			return;
		}
		if (len > DNS_TCP_QUERY_MAX) {
			session_close(s, "malformed: oversized TCP frame");
			return;
		}
		if (buf_used(&s->hs_in) < len + 2)
			break;
		if (buf_used(&s->hs_out) > DNS_TCP_OUT_MAX) {
			session_close(s, "client does not read its answers");
			return;
		}
		if (c->pending >= DNS_TCP_PENDING_MAX) {
			/* back-pressure: stop reading until the upstream has answered some */
			c->paused = true;
			ev_io_stop(capd_loop, &s->client.rio);
			return;
		}
		p = xmalloc(len + 2);
		memcpy(p, h, len + 2);
		buf_consume(&s->hs_in, len + 2);
		c->queries++;
		c->last = capd_now();
		session_data(s, DIR_UP, p, len + 2);
		v = dns_msg_query(&dc->rules, p + 2, len, true, &q, &out, &outlen);
		free(s->note);
		s->note = xasprintf("%u %s, last %s %s: %s", c->queries, c->queries == 1 ? "query" : "queries",
		                    q.qtype_str[0] ? q.qtype_str : "?", q.qname[0] ? q.qname : ".", q.why);
		log_debug("%s: TCP query %u %s %s from session %llu: %s", s->inst->name, q.id, q.qtype_str, q.qname,
		          (unsigned long long)s->id, q.why);
		if (v == DNS_REPLY) {
			dns_tcp_reply(s, out, outlen);
		} else if (v == DNS_FORWARD) {
			if (ds)
				dns_fwd_start(ds, s, true, p + 2, len, &q, NULL, NULL);
			else {
				free(out);
				dns_msg_set_id(p + 2, q.id);
				out = dns_msg_error(p + 2, len, 2, &outlen);
				dns_tcp_reply(s, out, outlen);
			}
		}
		free(out);
		free(p);
	}
	if (s->state == SESSION_CLOSED)
		return;
	if (s->client_eof) {
		if (buf_used(&s->hs_in) > 0) {
			session_close(s, "malformed: truncated TCP frame");
			return;
		}
		if (!c->eof)
			session_shutdown_dir(s, DIR_UP);
		c->eof = true;
		if (c->pending == 0 && buf_used(&s->hs_out) == 0)
			session_close(s, c->queries ? "client closed" : "client closed without a query");
		/* else the timer closes once the answers are out */
	}
}

static void
dns_session_free(struct session *s)
{
	struct dns_state *ds = s->inst->proto_state;

	if (s->datagram) {
		struct dns_fwd *f = s->proto_state;
		if (f)
			dns_fwd_free(f);
		return;
	}
	struct dns_conn *c = s->proto_state;
	if (c == NULL)
		return;
	if (ds) {
		struct dns_fwd *f, *next;
		for (f = TAILQ_FIRST(&ds->fwds); f; f = next) {
			next = TAILQ_NEXT(f, entry);
			if (f->s == s)
				dns_fwd_free(f);
		}
	}
	ev_timer_stop(capd_loop, &c->timer);
	free(c);
	s->proto_state = NULL;
}

/* ---- start and stop ---- */

static void
dns_state_free(struct dns_state *ds)
{
	struct dns_fwd *f;

	if (ds == NULL)
		return;
	if (ds->ufd >= 0)
		ev_io_stop(capd_loop, &ds->uio);
	resolve_cancel(ds->resolving);
	ds->resolving = NULL;
	/*
	 * A reload that changes or removes the instance, or capd stopping: a
	 * client still waiting for the upstream gets SERVFAIL now, as unbound and
	 * BIND answer the work they drop, so that it asks again at once instead of
	 * timing out. The UDP socket closes after; a TCP client's connection closes
	 * with the instance's sessions, after its SERVFAIL went out (a bare close
	 * made dig +tcp say "communications error ... end of file", no answer).
	 * inst->proto_state is NULL already, so a reply that
	 * closes its session frees none of the queries this loop walks.
	 */
	while ((f = TAILQ_FIRST(&ds->fwds)) != NULL)
		dns_fwd_fail(f, "instance stopped");
	if (ds->ufd >= 0) {
		close(ds->ufd);
		ds->ufd = -1;
	}
	free(ds);
}

/*
 * A burst of UDP queries (a resolver behind capd, a scanner, DNS_MAX_PENDING
 * of them) waits in the kernel while capd is busy: the default buffer (about
 * 200 KB) holds 256, and the rest were dropped unseen, in the capture too.
 * As unbound's so-rcvbuf: forced past net.core.rmem_max while capd may (root,
 * before it drops privileges), else as large as rmem_max lets it be.
 */
static void
dns_udp_rcvbuf(struct dns_state *ds)
{
	int size = DNS_UDP_RCVBUF;

	if (setsockopt(ds->ufd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0 &&
	    setsockopt(ds->ufd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size) < 0)
		log_warn("%s: UDP receive buffer of %d bytes", ds->inst->name, size);
}

static int
dns_start(struct instance *inst, char **why)
{
	struct dns_cfg *dc = inst->cfg;
	struct dns_state *ds = xcalloc(1, sizeof *ds);
	const struct sockaddr *sa = (const struct sockaddr *)&inst->listen;
	socklen_t len;
	int one = 1;

	ds->inst = inst;
	ds->ufd = -1;
	TAILQ_INIT(&ds->fwds);
	if (dc->upstream_set) {
		ds->up = dc->upstream;
	} else {
		resolve_conf_note(&ds->conf, ev_now(capd_loop));  /* before reading: a change meanwhile is seen later */
		if (dns_resolv_conf(&ds->up, &inst->listen) < 0)
			log_warnx("%s: no nameserver in %s other than this instance, and no upstream set: "
			          "queries no rule answers get SERVFAIL", inst->name, RESOLVE_CONF);
	}
	dns_up_format(ds);
	if (ds->up.host[0] && addr_from_literal(ds->up.host, ds->up.port, &ds->up_addr, &len) == 0) {
		if (dns_is_self(&ds->up_addr, &inst->listen)) {
			*why = xasprintf("upstream %s is this instance's own address", ds->up_str);
			free(ds);
			return -1;
		}
		ds->have_up = true;
	}

	ds->ufd = socket(sa->sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (ds->ufd < 0) {
		*why = xasprintf("UDP socket: %s", strerror(errno));
		free(ds);
		return -1;
	}
	if (sa->sa_family == AF_INET6)
		setsockopt(ds->ufd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
	dns_udp_rcvbuf(ds);
	if (bind(ds->ufd, sa, inst->listen_len) < 0) {
		if (errno == EADDRINUSE)
			*why = xasprintf("UDP port %u is in use (%s)", addr_port(sa), inst->listen_str);
		else
			*why = xasprintf("cannot bind UDP %s: %s", inst->listen_str, strerror(errno));
		close(ds->ufd);
		free(ds);
		return -1;
	}
	if (addr_is_any(sa)) {
		ds->pktinfo = true;
		if (sa->sa_family == AF_INET)
			setsockopt(ds->ufd, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
		else
			setsockopt(ds->ufd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof one);
	}
	ev_io_init(&ds->uio, dns_udp_cb, ds->ufd, EV_READ);
	ds->uio.data = ds;
	ev_io_start(capd_loop, &ds->uio);
	inst->proto_state = ds;
	if (ds->up.host[0] && !ds->have_up)
		ds->resolving = resolve_start(ds->up.host, ds->up.port, dns_up_resolved_cb, ds);
	return 0;
}

static void
dns_stop(struct instance *inst)
{
	struct dns_state *ds = inst->proto_state;

	inst->proto_state = NULL;
	dns_state_free(ds);
}

const struct proto proto_dns = {
	.name = "dns",
	.keys = dns_keys,
	.listens = true,
	.hs_max = DNS_TCP_QUERY_MAX + 4,
	.configure = dns_configure,
	.start = dns_start,
	.stop = dns_stop,
	.accepted = dns_accepted,
	.input = dns_input,
	.session_free = dns_session_free,
	.free = dns_free,
	.describe = dns_describe,
};

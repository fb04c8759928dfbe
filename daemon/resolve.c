/*
 * c-ares on libev: c-ares tells us which sockets to watch (sock_state_cb);
 * one ev_io per socket and one timer drive ares_process_fd. Requests whose
 * session went away are cancelled by clearing their callback, since c-ares
 * cannot cancel a single query.
 *
 * A channel reads /etc/resolv.conf once, when it is made (c-ares 1.18 has no
 * ares_reinit). As glibc does at each call (since 2.26), a resolution that
 * starts a second or more after the last look stats the file, and a changed
 * one gets a new channel; the old one answers what was asked of it and is
 * destroyed after its last answer.
 */
#include "resolve.h"

#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "addr.h"
#include "capd.h"
#include "log.h"
#include "xmalloc.h"

#define RESOLVE_CONF_EVERY 1.0  /* seconds between looks at resolv.conf, at most one per resolution */

struct resolve_chan;

/* Owned by the c-ares callback: freed when c-ares answers, cancelled or not. */
struct resolve_req {
	resolve_cb cb;  /* NULL once cancelled */
	void *arg;
	uint16_t port;
	ev_timer later;    /* answers found at once go out on the next loop pass, never re-entrantly */
	struct ev_loop *loop; /* the asking thread's: a cancel may come from another (udp-relay) */
	struct resolve_chan *chan; /* the channel asked, which lives until it answers */
	int starting;      /* inside resolve_start: c-ares may answer synchronously from /etc/hosts */
	bool sorted;       /* resolve_start_sorted: getaddrinfo's order, not IPv4 first */
	int err;
	const char *why;
	int n;
	struct sockaddr_storage addrs[RESOLVE_MAX];
};

struct resolve_sock {
	ev_io io;          /* io.data: its channel */
	struct resolve_sock *next;
};

/*
 * A c-ares channel with the sockets it watches and its timer. Owned by its
 * thread: the current one (resolve_cur) until resolv.conf changes, then on
 * resolve_retired until its last query is answered (resolve_chan_settle
 * frees it), or until resolve_shutdown.
 */
struct resolve_chan {
	ares_channel ch;
	struct resolve_sock *socks;
	ev_timer timer;
	unsigned queries;  /* asked and not answered yet */
	bool retired;      /* resolv.conf changed after it was made */
	struct resolve_chan *next;  /* on resolve_retired */
};

/* one channel per event-loop thread (shard.h): answers come back on the
 * loop of the session that asked */
static _Thread_local struct resolve_chan *resolve_cur;
static _Thread_local struct resolve_chan *resolve_retired;
static _Thread_local struct resolve_conf_seen resolve_seen;  /* the file resolve_cur read */
static _Thread_local int resolve_ready;
/* the last change told at info level: every thread sees each change, one says so */
static atomic_ullong resolve_told;

static void resolve_chan_settle(struct resolve_chan *c);

static void
resolve_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct resolve_chan *c = w->data;

	(void)loop;
	ares_process_fd(c->ch, (revents & EV_READ) ? w->fd : ARES_SOCKET_BAD,
	                (revents & EV_WRITE) ? w->fd : ARES_SOCKET_BAD);
	resolve_chan_settle(c);
}

static void
resolve_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct resolve_chan *c = w->data;

	(void)loop; (void)revents;
	ares_process_fd(c->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
	resolve_chan_settle(c);
}

static void
resolve_arm_timer(struct resolve_chan *c)
{
	struct timeval tv, *tvp;

	ev_timer_stop(capd_loop, &c->timer);
	tvp = ares_timeout(c->ch, NULL, &tv);
	if (tvp) {
		ev_timer_set(&c->timer, (double)tvp->tv_sec + tvp->tv_usec / 1e6 + 0.001, 0.);
		ev_timer_start(capd_loop, &c->timer);
	}
}

static void
resolve_sock_state_cb(void *data, ares_socket_t fd, int readable, int writable)
{
	struct resolve_chan *c = data;
	struct resolve_sock **pp, *rs;

	for (pp = &c->socks; (rs = *pp) != NULL; pp = &rs->next)
		if (rs->io.fd == fd)
			break;
	if (!readable && !writable) {
		if (rs) {
			ev_io_stop(capd_loop, &rs->io);
			*pp = rs->next;
			free(rs);
		}
		return;
	}
	if (rs == NULL) {
		rs = xcalloc(1, sizeof *rs);
		ev_io_init(&rs->io, resolve_io_cb, fd, 0);
		rs->io.data = c;
		rs->next = c->socks;
		c->socks = rs;
	}
	ev_io_stop(capd_loop, &rs->io);
	ev_io_set(&rs->io, fd, (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0));
	ev_io_start(capd_loop, &rs->io);
}

/* A channel on what resolv.conf says now, or NULL with why. */
static struct resolve_chan *
resolve_chan_new(char **why)
{
	struct resolve_chan *c = xcalloc(1, sizeof *c);
	struct ares_options opts;
	int rc;

	memset(&opts, 0, sizeof opts);
	opts.sock_state_cb = resolve_sock_state_cb;
	opts.sock_state_cb_data = c;
	opts.timeout = 2000;
	opts.tries = 2;
	rc = ares_init_options(&c->ch, &opts, ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES);
	if (rc != ARES_SUCCESS) {
		*why = xasprintf("c-ares: %s", ares_strerror(rc));
		free(c);
		return NULL;
	}
	ev_timer_init(&c->timer, resolve_timer_cb, 0., 0.);
	c->timer.data = c;
	return c;
}

/* Never from inside one of c's callbacks: ares_destroy answers its queries (ARES_EDESTRUCTION). */
static void
resolve_chan_free(struct resolve_chan *c)
{
	ares_destroy(c->ch);  /* closes its sockets through sock_state_cb */
	ev_timer_stop(capd_loop, &c->timer);
	while (c->socks) {
		struct resolve_sock *rs = c->socks;
		c->socks = rs->next;
		ev_io_stop(capd_loop, &rs->io);
		free(rs);
	}
	free(c);
}

/* After c-ares ran for c (outside its callbacks): a retired channel done with its last query goes. */
static void
resolve_chan_settle(struct resolve_chan *c)
{
	struct resolve_chan **pp;

	if (!c->retired || c->queries > 0) {
		resolve_arm_timer(c);
		return;
	}
	for (pp = &resolve_retired; *pp != c; pp = &(*pp)->next)
		;
	*pp = c->next;
	resolve_chan_free(c);
	log_debug("resolver: the last answer of the nameservers before is in: their channel is closed");
}

/* "127.0.0.2, [fe80::1]:5353": the channel's nameservers, for the log. */
static void
resolve_chan_servers(struct resolve_chan *c, char *out, size_t size)
{
	struct ares_addr_port_node *servers = NULL;
	char a[INET6_ADDRSTRLEN];
	size_t len = 0;

	snprintf(out, size, "none");
	if (ares_get_servers_ports(c->ch, &servers) != ARES_SUCCESS)
		return;
	for (struct ares_addr_port_node *n = servers; n != NULL && len < size; n = n->next) {
		const char *sep = len ? ", " : "";
		int w;

		ares_inet_ntop(n->family, &n->addr, a, sizeof a);
		if (n->udp_port != 0 && n->udp_port != 53)
			w = snprintf(out + len, size - len, n->family == AF_INET6 ? "%s[%s]:%d" : "%s%s:%d", sep, a,
			             n->udp_port);
		else
			w = snprintf(out + len, size - len, "%s%s", sep, a);
		len += w > 0 ? (size_t)w : 0;
	}
	ares_free_data(servers);
}

static void
resolve_conf_stat(struct resolve_conf_seen *seen)
{
	struct stat st;

	seen->exists = stat(RESOLVE_CONF, &st) == 0;
	seen->dev = seen->exists ? st.st_dev : 0;
	seen->ino = seen->exists ? st.st_ino : 0;
	seen->size = seen->exists ? st.st_size : 0;
	seen->mtime = seen->exists ? st.st_mtim : (struct timespec){ 0 };
	seen->ctime = seen->exists ? st.st_ctim : (struct timespec){ 0 };
}

void
resolve_conf_note(struct resolve_conf_seen *seen, double now)
{
	seen->checked = now;
	resolve_conf_stat(seen);
}

bool
resolve_conf_changed(struct resolve_conf_seen *seen, double now)
{
	struct resolve_conf_seen was = *seen;

	/* a clock stepped back looks at once */
	if (now >= seen->checked && now - seen->checked < RESOLVE_CONF_EVERY)
		return false;
	resolve_conf_note(seen, now);
	return seen->exists != was.exists || seen->dev != was.dev || seen->ino != was.ino ||
	       seen->size != was.size || seen->mtime.tv_sec != was.mtime.tv_sec ||
	       seen->mtime.tv_nsec != was.mtime.tv_nsec || seen->ctime.tv_sec != was.ctime.tv_sec ||
	       seen->ctime.tv_nsec != was.ctime.tv_nsec;
}

int
resolve_init(char **why)
{
	int rc;

	if ((rc = ares_library_init(ARES_LIB_INIT_ALL)) != ARES_SUCCESS) {
		*why = xasprintf("c-ares: %s", ares_strerror(rc));
		return -1;
	}
	resolve_ready = 1;
	/* looked at before c-ares reads it: a change in between is seen next time */
	resolve_conf_note(&resolve_seen, ev_now(capd_loop));
	resolve_cur = resolve_chan_new(why);
	return resolve_cur != NULL ? 0 : -1;
}

void
resolve_shutdown(void)
{
	struct resolve_chan *c = resolve_cur;

	if (!resolve_ready)
		return;
	/* destroying calls pending callbacks with ARES_EDESTRUCTION: one asking again then hears so */
	resolve_cur = NULL;
	if (c != NULL)
		resolve_chan_free(c);
	while ((c = resolve_retired) != NULL) {
		resolve_retired = c->next;
		resolve_chan_free(c);
	}
	ares_library_cleanup();
	resolve_ready = 0;
}

/*
 * Every thread sees each change of the file and makes its own channel; the
 * first to do so says it at info level, the others at debug.
 */
static void
resolve_tell(void)
{
	unsigned long long key = (unsigned long long)resolve_seen.ino * 1000003u ^
	                         (unsigned long long)resolve_seen.size << 32 ^
	                         (unsigned long long)resolve_seen.mtime.tv_sec * 1000000007u ^
	                         (unsigned long long)resolve_seen.mtime.tv_nsec;
	char servers[256];

	resolve_chan_servers(resolve_cur, servers, sizeof servers);
	if (atomic_exchange(&resolve_told, key) != key)
		log_info("%s changed: names are asked of %s from now on", RESOLVE_CONF, servers);
	else
		log_debug("%s changed: names are asked of %s from now on", RESOLVE_CONF, servers);
}

/*
 * A resolution is starting: when resolv.conf changed, a new channel takes it
 * and those after it, and the old one is retired. It is settled (freed once
 * its queries are answered) on the next loop pass, never here: resolve_start
 * may run inside one of its callbacks.
 */
static void
resolve_refresh(void)
{
	struct resolve_chan *c, *old = resolve_cur;
	char *why = NULL;

	if (!resolve_ready || !resolve_conf_changed(&resolve_seen, ev_now(capd_loop)))
		return;
	if ((c = resolve_chan_new(&why)) == NULL) {
		log_warnx("%s changed, but names are still asked of its old nameservers: %s", RESOLVE_CONF, why);
		free(why);
		return;
	}
	resolve_cur = c;
	if (old != NULL) {
		old->retired = true;
		old->next = resolve_retired;
		resolve_retired = old;
		ev_timer_stop(capd_loop, &old->timer);
		ev_timer_set(&old->timer, 0., 0.);
		ev_timer_start(capd_loop, &old->timer);
	}
	resolve_tell();
}

static void
resolve_deliver(struct resolve_req *r)
{
	if (r->cb)
		r->cb(r->arg, r->err, r->why, r->addrs, r->n);
	free(r);
}

static void
resolve_later_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	resolve_deliver(w->data);
}

static void
resolve_ares_cb(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
	struct resolve_req *r = arg;

	(void)timeouts;
	r->chan->queries--;  /* a retired channel goes once c-ares is done with it (resolve_chan_settle) */
	r->n = 0;
	if (status == ARES_SUCCESS && res) {
		/* c-ares sorts them as getaddrinfo does (RFC 6724: ::1 before
		 * 127.0.0.1); for a connect, which tries each in turn, IPv4 first:
		 * lab servers mostly listen there, and a v6 miss costs a full connect */
		for (int pass = 0; pass < (r->sorted ? 1 : 2); pass++)
			for (struct ares_addrinfo_node *ai = res->nodes; ai && r->n < RESOLVE_MAX; ai = ai->ai_next) {
				if (!r->sorted && (pass == 0) != (ai->ai_family == AF_INET))
					continue;
				if (ai->ai_addrlen > sizeof r->addrs[0])
					continue;
				memset(&r->addrs[r->n], 0, sizeof r->addrs[0]);
				memcpy(&r->addrs[r->n], ai->ai_addr, ai->ai_addrlen);
				r->n++;
			}
	}
	if (res)
		ares_freeaddrinfo(res);
	if (r->n == 0) {
		r->err = status == ARES_ENOTFOUND || status == ARES_ENODATA ? ENOENT : EHOSTUNREACH;
		r->why = status == ARES_SUCCESS ? "no address" : ares_strerror(status);
	}
	if (r->starting) {
		ev_timer_start(r->loop, &r->later);
		return;
	}
	resolve_deliver(r);
}

static bool
resolve_chan_take_unread(struct resolve_chan *c)
{
	bool any = false;

	for (struct resolve_sock *rs = c ? c->socks : NULL; rs != NULL; rs = rs->next) {
		struct pollfd p = { .fd = rs->io.fd, .events = POLLIN };

		if ((rs->io.events & EV_READ) && poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
			ev_feed_event(capd_loop, &rs->io, EV_READ);
			any = true;
		}
	}
	return any;
}

bool
resolve_take_unread(void)
{
	bool any = resolve_chan_take_unread(resolve_cur);

	for (struct resolve_chan *c = resolve_retired; c != NULL; c = c->next)
		any |= resolve_chan_take_unread(c);
	return any;
}

/*
 * An IPv4 address in one of inet_aton's forms (127.1, 2130706433, 0x7f.1,
 * 0177.0.0.1), as glibc's getaddrinfo takes them, for clients that pass the
 * host on as typed (wget through an HTTP proxy, SOCKS clients that leave names
 * to the proxy); c-ares 1.18 takes only the dotted quad and sent the rest to
 * the DNS as names. Only digits, hex letters, x and dots: no
 * trailing junk that inet_aton would skip after a space, and a name with any
 * other letter (or ending in a dot) stays a name.
 */
static bool
resolve_numeric_v4(const char *host, uint16_t port, struct sockaddr_storage *ss)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)ss;

	if (host[0] == '\0' || host[strspn(host, "0123456789abcdefABCDEFxX.")] != '\0')
		return false;
	memset(ss, 0, sizeof *ss);
	if (inet_aton(host, &sin->sin_addr) == 0)
		return false;
	sin->sin_family = AF_INET;
	sin->sin_port = htons(port);
	return true;
}

/*
 * RFC 6761 6.3: "localhost" and every name below it (app.localhost,
 * A.B.LOCALHOST.) are the loopback, and a resolver must not ask the DNS for
 * them; curl, the browsers and systemd-resolved answer them themselves.
 * c-ares 1.18 sent foo.localhost (and "localhost.", which no hosts-file line
 * matches) to the nameserver: a query left the box, and the client got host
 * unreachable. A name with an empty label is no such name.
 */
static bool
resolve_is_localhost(const char *host)
{
	size_t n = strlen(host);

	if (n > 0 && host[n - 1] == '.')
		n--;
	if (n < 9 || strncasecmp(host + n - 9, "localhost", 9) != 0)
		return false;
	return n == 9 || (n > 10 && host[n - 10] == '.' && host[n - 11] != '.');
}

static void
resolve_add(struct resolve_req *r, int family, const void *addr, uint16_t port)
{
	struct sockaddr_storage *ss = &r->addrs[r->n];

	if (r->n >= RESOLVE_MAX)
		return;
	memset(ss, 0, sizeof *ss);
	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;
		sin->sin_family = AF_INET;
		sin->sin_port = htons(port);
		memcpy(&sin->sin_addr, addr, sizeof sin->sin_addr);
	} else {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(port);
		memcpy(&sin6->sin6_addr, addr, sizeof sin6->sin6_addr);
	}
	r->n++;
}

/* The hosts file's addresses for name, added to r's: the file alone, never the
 * DNS. IPv4 first, or for resolve_start_sorted IPv6 first, as getaddrinfo's
 * RFC 6724 order puts ::1 before 127.0.0.1. */
static void
resolve_hosts_file(struct resolve_req *r, const char *name, uint16_t port)
{
	const int families[] = { r->sorted ? AF_INET6 : AF_INET, r->sorted ? AF_INET : AF_INET6 };

	if (resolve_cur == NULL)
		return;
	for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
		struct hostent *he = NULL;

		if (ares_gethostbyname_file(resolve_cur->ch, name, families[i], &he) != ARES_SUCCESS || he == NULL)
			continue;
		if (he->h_addrtype == families[i])
			for (char **a = he->h_addr_list; *a != NULL; a++)
				resolve_add(r, he->h_addrtype, *a, port);
		ares_free_hostent(he);
	}
}

/*
 * A localhost name's addresses: the name's own hosts-file lines when it has
 * some (capctl hosts add app.localhost ...), else those of "localhost", else
 * 127.0.0.1 and ::1, as glibc and c-ares give "localhost" without a line.
 */
static void
resolve_localhost(struct resolve_req *r, const char *host, uint16_t port)
{
	char *name = xstrdup(host);
	size_t n = strlen(name);

	if (n > 0 && name[n - 1] == '.')
		name[n - 1] = '\0';
	resolve_hosts_file(r, name, port);
	if (r->n == 0 && strcasecmp(name, "localhost") != 0)
		resolve_hosts_file(r, "localhost", port);
	if (r->n == 0) {
		struct in_addr lo4 = { .s_addr = htonl(INADDR_LOOPBACK) };
		if (r->sorted)
			resolve_add(r, AF_INET6, &in6addr_loopback, port);
		resolve_add(r, AF_INET, &lo4, port);
		if (!r->sorted)
			resolve_add(r, AF_INET6, &in6addr_loopback, port);
	}
	free(name);
}

static struct resolve_req *
resolve_begin(const char *host, uint16_t port, bool sorted, resolve_cb cb, void *arg)
{
	struct resolve_req *r = xcalloc(1, sizeof *r);
	struct ares_addrinfo_hints hints;
	socklen_t len;
	char portstr[8];

	r->cb = cb;
	r->arg = arg;
	r->sorted = sorted;
	r->loop = capd_loop;
	ev_timer_init(&r->later, resolve_later_cb, 0., 0.);
	r->later.data = r;
	if (addr_from_literal(host, port, &r->addrs[0], &len) == 0 || resolve_numeric_v4(host, port, &r->addrs[0])) {
		r->n = 1;
		ev_timer_start(r->loop, &r->later);
		return r;
	}
	if (resolve_is_localhost(host)) {
		resolve_localhost(r, host, port);
		ev_timer_start(r->loop, &r->later);
		return r;
	}
	resolve_refresh();
	if (resolve_cur == NULL) {  /* c-ares failed on this thread (resolve_init logged it) */
		r->err = EHOSTUNREACH;
		r->why = "no resolver";
		ev_timer_start(r->loop, &r->later);
		return r;
	}
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = ARES_AI_NUMERICSERV;
	snprintf(portstr, sizeof portstr, "%u", port);
	r->chan = resolve_cur;
	r->chan->queries++;
	r->starting = 1;
	/* c-ares refuses service "0" (ARES_ESERVICE) where getaddrinfo takes it,
	 * and a SOCKS BIND by name names port 0 when the peer's port is unknown:
	 * no service gives the addresses with port 0 */
	ares_getaddrinfo(resolve_cur->ch, host, port ? portstr : NULL, &hints, resolve_ares_cb, r);
	r->starting = 0;
	resolve_arm_timer(resolve_cur);
	return r;
}

struct resolve_req *
resolve_start(const char *host, uint16_t port, resolve_cb cb, void *arg)
{
	return resolve_begin(host, port, false, cb, arg);
}

struct resolve_req *
resolve_start_sorted(const char *host, uint16_t port, resolve_cb cb, void *arg)
{
	return resolve_begin(host, port, true, cb, arg);
}

void
resolve_cancel(struct resolve_req *r)
{
	if (r == NULL)
		return;
	r->cb = NULL;
	if (ev_is_active(&r->later)) {  /* answered already, waiting for the next pass */
		ev_timer_stop(r->loop, &r->later);
		free(r);
	}
}

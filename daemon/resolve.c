/*
 * c-ares on libev: c-ares tells us which sockets to watch (sock_state_cb);
 * one ev_io per socket and one timer drive ares_process_fd. Requests whose
 * session went away are cancelled by clearing their callback, since c-ares
 * cannot cancel a single query.
 */
#include "resolve.h"

#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "addr.h"
#include "capd.h"
#include "log.h"
#include "xmalloc.h"

/* Owned by the c-ares callback: freed when c-ares answers, cancelled or not. */
struct resolve_req {
	resolve_cb cb;  /* NULL once cancelled */
	void *arg;
	uint16_t port;
	ev_timer later;    /* answers found at once go out on the next loop pass, never re-entrantly */
	struct ev_loop *loop; /* the asking thread's: a cancel may come from another (udp-relay) */
	int starting;      /* inside resolve_start: c-ares may answer synchronously from /etc/hosts */
	bool sorted;       /* resolve_start_sorted: getaddrinfo's order, not IPv4 first */
	int err;
	const char *why;
	int n;
	struct sockaddr_storage addrs[RESOLVE_MAX];
};

struct resolve_sock {
	ev_io io;
	struct resolve_sock *next;
};

/* one channel per event-loop thread (shard.h): answers come back on the
 * loop of the session that asked */
static _Thread_local ares_channel resolve_channel;
static _Thread_local struct resolve_sock *resolve_socks;
static _Thread_local ev_timer resolve_timer;
static _Thread_local int resolve_ready;

static void resolve_arm_timer(void);

static void
resolve_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	(void)loop;
	ares_process_fd(resolve_channel, (revents & EV_READ) ? w->fd : ARES_SOCKET_BAD,
	                (revents & EV_WRITE) ? w->fd : ARES_SOCKET_BAD);
	resolve_arm_timer();
}

static void
resolve_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	ares_process_fd(resolve_channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
	resolve_arm_timer();
}

static void
resolve_arm_timer(void)
{
	struct timeval tv, *tvp;

	ev_timer_stop(capd_loop, &resolve_timer);
	tvp = ares_timeout(resolve_channel, NULL, &tv);
	if (tvp) {
		ev_timer_set(&resolve_timer, (double)tvp->tv_sec + tvp->tv_usec / 1e6 + 0.001, 0.);
		ev_timer_start(capd_loop, &resolve_timer);
	}
}

static void
resolve_sock_state_cb(void *data, ares_socket_t fd, int readable, int writable)
{
	struct resolve_sock **pp, *rs;

	(void)data;
	for (pp = &resolve_socks; (rs = *pp) != NULL; pp = &rs->next)
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
		rs->next = resolve_socks;
		resolve_socks = rs;
	}
	ev_io_stop(capd_loop, &rs->io);
	ev_io_set(&rs->io, fd, (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0));
	ev_io_start(capd_loop, &rs->io);
}

int
resolve_init(char **why)
{
	struct ares_options opts;
	int rc;

	if ((rc = ares_library_init(ARES_LIB_INIT_ALL)) != ARES_SUCCESS) {
		*why = xasprintf("c-ares: %s", ares_strerror(rc));
		return -1;
	}
	memset(&opts, 0, sizeof opts);
	opts.sock_state_cb = resolve_sock_state_cb;
	opts.timeout = 2000;
	opts.tries = 2;
	rc = ares_init_options(&resolve_channel, &opts, ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES);
	if (rc != ARES_SUCCESS) {
		*why = xasprintf("c-ares: %s", ares_strerror(rc));
		return -1;
	}
	ev_timer_init(&resolve_timer, resolve_timer_cb, 0., 0.);
	resolve_ready = 1;
	return 0;
}

void
resolve_shutdown(void)
{
	if (!resolve_ready)
		return;
	ares_destroy(resolve_channel);  /* calls pending callbacks with ARES_EDESTRUCTION */
	ev_timer_stop(capd_loop, &resolve_timer);
	while (resolve_socks) {
		struct resolve_sock *rs = resolve_socks;
		resolve_socks = rs->next;
		ev_io_stop(capd_loop, &rs->io);
		free(rs);
	}
	ares_library_cleanup();
	resolve_ready = 0;
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

bool
resolve_take_unread(void)
{
	bool any = false;

	for (struct resolve_sock *rs = resolve_socks; rs != NULL; rs = rs->next) {
		struct pollfd p = { .fd = rs->io.fd, .events = POLLIN };

		if ((rs->io.events & EV_READ) && poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
			ev_feed_event(capd_loop, &rs->io, EV_READ);
			any = true;
		}
	}
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

	for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
		struct hostent *he = NULL;

		if (ares_gethostbyname_file(resolve_channel, name, families[i], &he) != ARES_SUCCESS || he == NULL)
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
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = ARES_AI_NUMERICSERV;
	snprintf(portstr, sizeof portstr, "%u", port);
	r->starting = 1;
	/* c-ares refuses service "0" (ARES_ESERVICE) where getaddrinfo takes it,
	 * and a SOCKS BIND by name names port 0 when the peer's port is unknown:
	 * no service gives the addresses with port 0 */
	ares_getaddrinfo(resolve_channel, host, port ? portstr : NULL, &hints, resolve_ares_cb, r);
	r->starting = 0;
	resolve_arm_timer();
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

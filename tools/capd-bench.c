/*
 * capd-bench: the load generator and sink behind `tools/dev bench`.
 * The same client drives capd and each peer, so only the proxy differs.
 *
 *   capd-bench sink PORT                       accept, read and discard (epoll); holds idle connections
 *   capd-bench bulk VIA PROXY TARGET SECONDS   one tunnel, send for SECONDS, print MB/s
 *   capd-bench conns VIA PROXY TARGET SECONDS CONCURRENCY [SNI]
 *                                              new connection + one GET + close, print conn/s p50 p99 (ms)
 *   capd-bench reqs VIA PROXY TARGET SECONDS CONCURRENCY KEEPALIVE
 *                                              HTTP/1.1 GETs of / on CONCURRENCY connections, on each either
 *                                              one request per connection (KEEPALIVE 0) or as many as the
 *                                              server allows (1); print req/s p50 p99 (ms), failures, connections
 *   capd-bench idle VIA PROXY TARGET COUNT     open COUNT tunnels, print "ready OK FAILED", hold until stdin closes
 *   capd-bench tlsget VIA PROXY TARGET SECONDS SNI PATH
 *                                              one TLS connection, GET PATH and read it for SECONDS, print MB/s
 *
 * VIA is direct (PROXY is a forwarder, a reverse proxy or the server), socks5, connect, or
 * http (reqs only: PROXY is an HTTP proxy, asked for http://TARGET/ in absolute form).
 * TARGET is IP:PORT.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum via { VIA_DIRECT, VIA_SOCKS5, VIA_CONNECT, VIA_HTTP };

static enum via via;
static struct sockaddr_in proxy, target;
static const char *sni;
static SSL_CTX *tls_ctx;
static double stop_at;
static atomic_long total_conns, total_fail;

static double
now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
parse_addr(const char *s, struct sockaddr_in *sin)
{
	char host[64];
	const char *colon = strrchr(s, ':');

	if (colon == NULL || (size_t)(colon - s) >= sizeof host) {
		fprintf(stderr, "capd-bench: bad address %s\n", s);
		exit(2);
	}
	memcpy(host, s, (size_t)(colon - s));
	host[colon - s] = '\0';
	memset(sin, 0, sizeof *sin);
	sin->sin_family = AF_INET;
	sin->sin_port = htons((uint16_t)atoi(colon + 1));
	if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) {
		fprintf(stderr, "capd-bench: bad address %s\n", s);
		exit(2);
	}
}

static int
read_full(int fd, void *p, size_t n)
{
	for (size_t off = 0; off < n;) {
		ssize_t r = read(fd, (char *)p + off, n - off);
		if (r <= 0)
			return -1;
		off += (size_t)r;
	}
	return 0;
}

static int
write_full(int fd, const void *p, size_t n)
{
	for (size_t off = 0; off < n;) {
		ssize_t r = write(fd, (const char *)p + off, n - off);
		if (r <= 0)
			return -1;
		off += (size_t)r;
	}
	return 0;
}

/*
 * Reads an HTTP reply head up to its blank line and not one byte further (the
 * tunnel's first bytes stay in the socket): peeks, then takes the head's
 * share. Two calls for a head that came in one segment, as a buffered client
 * such as curl spends; reading it a byte at a time cost this client ~40
 * read(2) calls, half its CPU per CONNECT connection, which capped both
 * proxies' connection rates at the client's. NUL-terminates; -1 on a short
 * connection or a head larger than cap - 1.
 */
static int
read_head(int fd, char *head, size_t cap)
{
	size_t got = 0;

	while (got < cap - 1) {
		ssize_t n = recv(fd, head + got, cap - 1 - got, MSG_PEEK);
		size_t take;

		if (n <= 0)
			return -1;
		for (take = 0; take < (size_t)n; take++)
			if (got + take >= 3 && !memcmp(head + got + take - 3, "\r\n\r\n", 4))
				break;
		bool end = take < (size_t)n;
		if (end)
			take++;  /* the head's last byte */
		if (read_full(fd, head + got, take) < 0)
			return -1;
		got += take;
		if (end) {
			head[got] = '\0';
			return 0;
		}
	}
	return -1;
}

/* Connects to the proxy and asks it for target; returns the tunnel fd or -1. */
static int
tunnel_open(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	if (fd < 0)
		return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(fd, (struct sockaddr *)&proxy, sizeof proxy) < 0)
		goto fail;
	if (via == VIA_SOCKS5) {
		uint8_t req[10] = { 5, 1, 0, 1 }, rep[10];
		if (write_full(fd, "\x05\x01\x00", 3) < 0 || read_full(fd, rep, 2) < 0 || rep[1] != 0)
			goto fail;
		memcpy(req + 4, &target.sin_addr, 4);
		memcpy(req + 8, &target.sin_port, 2);
		if (write_full(fd, req, 10) < 0 || read_full(fd, rep, 10) < 0 || rep[1] != 0)
			goto fail;
	} else if (via == VIA_CONNECT) {
		char req[128], ip[32], rep[1024];
		inet_ntop(AF_INET, &target.sin_addr, ip, sizeof ip);
		int n = snprintf(req, sizeof req, "CONNECT %s:%u HTTP/1.1\r\nHost: %s:%u\r\n\r\n", ip,
		                 ntohs(target.sin_port), ip, ntohs(target.sin_port));
		if (write_full(fd, req, (size_t)n) < 0)
			goto fail;
		if (read_head(fd, rep, sizeof rep) < 0 || strncmp(rep + 9, "200", 3) != 0)
			goto fail;
	}
	return fd;
fail:
	close(fd);
	return -1;
}

static int
cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

struct worker {
	pthread_t th;
	double *lat;
	size_t nlat, cap;
};

/* Keeps the first 12 bytes of a response ("HTTP/1.x NNN"). */
static size_t
status_add(char *head, size_t have, const char *p, size_t n)
{
	size_t take = have + n > 12 ? 12 - have : n;

	memcpy(head + have, p, take);
	return have + take;
}

/* New connection, one GET, read to the close; 0 when the answer was a 200. */
static int
one_request(void)
{
	static const char get[] = "GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
	char buf[16384], head[12];
	size_t have = 0;
	int fd = tunnel_open();

	if (fd < 0)
		return -1;
	if (tls_ctx) {
		SSL *ssl = SSL_new(tls_ctx);
		SSL_set_fd(ssl, fd);
		SSL_set_tlsext_host_name(ssl, sni);
		if (SSL_connect(ssl) == 1 && SSL_write(ssl, get, sizeof get - 1) > 0) {
			int r;
			while ((r = SSL_read(ssl, buf, sizeof buf)) > 0)
				have = status_add(head, have, buf, (size_t)r);
		}
		SSL_free(ssl);
	} else if (write_full(fd, get, sizeof get - 1) == 0) {
		ssize_t r;
		while ((r = read(fd, buf, sizeof buf)) > 0)
			have = status_add(head, have, buf, (size_t)r);
	}
	close(fd);
	return have == 12 && !memcmp(head + 8, " 200", 4) ? 0 : -1;
}

/* Records the latency of a request that started at t. */
static void
worker_lat(struct worker *w, double t)
{
	if (w->nlat == w->cap) {
		w->cap = w->cap ? w->cap * 2 : 4096;
		w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
	}
	w->lat[w->nlat++] = (now() - t) * 1000.0;
}

static void *
conns_worker(void *arg)
{
	struct worker *w = arg;

	while (now() < stop_at) {
		double t = now();
		if (one_request() < 0) {
			atomic_fetch_add(&total_fail, 1);
			continue;
		}
		worker_lat(w, t);
		atomic_fetch_add(&total_conns, 1);
	}
	return NULL;
}

/* Runs conc threads of fn for seconds; returns every latency, sorted (caller frees), in *n, and the time taken. */
static double *
run_workers(void *(*fn)(void *), double seconds, int conc, size_t *n, double *elapsed)
{
	struct worker *ws = calloc((size_t)conc, sizeof *ws);
	double t0 = now(), *all;
	size_t k = 0;

	*n = 0;
	stop_at = t0 + seconds;
	for (int i = 0; i < conc; i++)
		pthread_create(&ws[i].th, NULL, fn, &ws[i]);
	for (int i = 0; i < conc; i++) {
		pthread_join(ws[i].th, NULL);
		*n += ws[i].nlat;
	}
	*elapsed = now() - t0;
	all = malloc((*n ? *n : 1) * sizeof *all);
	for (int i = 0; i < conc; i++) {
		memcpy(all + k, ws[i].lat, ws[i].nlat * sizeof *all);
		k += ws[i].nlat;
		free(ws[i].lat);
	}
	free(ws);
	qsort(all, *n, sizeof *all, cmp_double);
	return all;
}

static int
cmd_conns(double seconds, int conc)
{
	size_t n;
	double elapsed, *all = run_workers(conns_worker, seconds, conc, &n, &elapsed);

	if (atomic_load(&total_fail) > 0)
		fprintf(stderr, "capd-bench: %ld of %zu connections failed (no connection, or no 200)\n",
		        atomic_load(&total_fail), n + (size_t)atomic_load(&total_fail));
	printf("{\"conns_per_s\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"failed\": %ld}\n", (double)n / elapsed,
	       n ? all[n / 2] : 0.0, n ? all[(size_t)((double)n * 0.99)] : 0.0, atomic_load(&total_fail));
	free(all);
	return 0;
}

/* ---- reqs: HTTP requests per second, persistent connections or not ---- */

enum fail { FAIL_NONE, FAIL_CONNECT, FAIL_STATUS, FAIL_CLOSED, FAIL_TIMEOUT, FAIL_FRAMING, FAIL_N };
static const char *const fail_names[FAIL_N] = { "", "connect", "status", "closed", "timeout", "framing" };
static atomic_long fails[FAIL_N], total_opened, total_retried;
static atomic_int bad_status;  /* the first status other than 200, for the report */
static int keepalive;
static char http_req[512];
static size_t http_req_len;

/* Reads one response to a GET: the head, then exactly Content-Length bytes
 * (or up to EOF when there is none). *keep says whether fd may carry the next
 * request; *nread counts what arrived, so a closed kept connection (nothing
 * read) can be told from a response cut short. */
static enum fail
http_response(int fd, bool *keep, size_t *nread)
{
	char buf[16384], *end = NULL, *line;
	size_t got = 0, body;
	long clen = -1;
	int minor = 0, status = 0;
	bool close = false, ka = false, chunked = false;

	*keep = false;
	*nread = 0;
	while (end == NULL) {
		if (got == sizeof buf - 1)
			return FAIL_FRAMING;
		ssize_t r = read(fd, buf + got, sizeof buf - 1 - got);
		if (r <= 0)
			return r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? FAIL_TIMEOUT : FAIL_CLOSED;
		got += (size_t)r;
		*nread = got;
		buf[got] = '\0';
		end = memmem(buf, got, "\r\n\r\n", 4);
	}
	if (sscanf(buf, "HTTP/1.%d %d", &minor, &status) != 2)
		return FAIL_FRAMING;
	if (status != 200) {
		int none = 0;
		atomic_compare_exchange_strong(&bad_status, &none, status);
		return FAIL_STATUS;
	}
	*end = '\0';
	for (line = strstr(buf, "\r\n"); line != NULL; line = strstr(line, "\r\n")) {
		line += 2;
		if (!strncasecmp(line, "Content-Length:", 15))
			clen = atol(line + 15);
		else if (!strncasecmp(line, "Transfer-Encoding:", 18))
			chunked = true;
		else if (!strncasecmp(line, "Connection:", 11)) {
			char *eol = strstr(line, "\r\n"), save = 0;
			if (eol)
				save = *eol, *eol = '\0';
			close = strcasestr(line, "close") != NULL;
			ka = strcasestr(line, "keep-alive") != NULL;
			if (eol)
				*eol = save;
		}
	}
	if (chunked)
		return FAIL_FRAMING;  /* the bench's backend sends Content-Length; chunked means something rewrote it */
	body = got - (size_t)(end + 4 - buf);
	if (clen < 0) {
		ssize_t r;
		while ((r = read(fd, buf, sizeof buf)) > 0)
			;
		return r < 0 ? FAIL_TIMEOUT : FAIL_NONE;
	}
	if (body > (size_t)clen)
		return FAIL_FRAMING;  /* more than one response to one request */
	for (size_t left = (size_t)clen - body; left > 0;) {
		ssize_t r = read(fd, buf, left < sizeof buf ? left : sizeof buf);
		if (r <= 0)
			return r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? FAIL_TIMEOUT : FAIL_CLOSED;
		left -= (size_t)r;
	}
	*keep = keepalive && !close && (minor == 1 || ka);
	return FAIL_NONE;
}

/* One request on *fd, opening a connection when there is none; *fd stays open
 * when the server keeps it. A kept connection found closed before the request
 * is replaced, and one closed before answering is reopened once, as browsers do. */
static enum fail
reqs_one(int *fd, unsigned *served)
{
	struct timeval tv = { .tv_sec = 10 };  /* a stalled request fails instead of ending the run */

	for (int attempt = 0;; attempt++) {
		enum fail f;
		size_t nread = 0;
		bool keep = false;

		char c;
		if (*fd >= 0 && recv(*fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0) {
			close(*fd);  /* closed while idle, without saying so (tinyproxy): what curl checks too */
			*fd = -1;
		}
		if (*fd < 0) {
			if ((*fd = tunnel_open()) < 0)
				return FAIL_CONNECT;
			setsockopt(*fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
			atomic_fetch_add(&total_opened, 1);
			*served = 0;
		}
		f = write_full(*fd, http_req, http_req_len) < 0 ? FAIL_CLOSED : http_response(*fd, &keep, &nread);
		if (f == FAIL_NONE && keep) {
			(*served)++;
			return f;
		}
		close(*fd);
		*fd = -1;
		if (f == FAIL_CLOSED && nread == 0 && *served > 0 && attempt == 0) {
			atomic_fetch_add(&total_retried, 1);
			continue;
		}
		return f;
	}
}

static void *
reqs_worker(void *arg)
{
	struct worker *w = arg;
	unsigned served = 0;
	int fd = -1;

	while (now() < stop_at) {
		double t = now();
		enum fail f = reqs_one(&fd, &served);
		if (f != FAIL_NONE) {
			atomic_fetch_add(&fails[f], 1);
			atomic_fetch_add(&total_fail, 1);
			continue;
		}
		worker_lat(w, t);
	}
	if (fd >= 0)
		close(fd);
	return NULL;
}

static int
cmd_reqs(double seconds, int conc)
{
	size_t n;
	double elapsed, *all;
	char ip[32], authority[48];

	inet_ntop(AF_INET, &target.sin_addr, ip, sizeof ip);
	snprintf(authority, sizeof authority, "%s:%u", ip, ntohs(target.sin_port));
	/* absolute form to an HTTP proxy, origin form to anything else */
	http_req_len = (size_t)snprintf(http_req, sizeof http_req, "GET %s%s/ HTTP/1.1\r\nHost: %s\r\n%s\r\n",
	                                via == VIA_HTTP ? "http://" : "", via == VIA_HTTP ? authority : "", authority,
	                                keepalive ? "" : "Connection: close\r\n");
	all = run_workers(reqs_worker, seconds, conc, &n, &elapsed);
	if (atomic_load(&total_fail) > 0) {
		fprintf(stderr, "capd-bench: %ld of %zu requests failed:", atomic_load(&total_fail),
		        n + (size_t)atomic_load(&total_fail));
		for (int f = 1; f < FAIL_N; f++)
			if (atomic_load(&fails[f]) > 0)
				fprintf(stderr, " %s %ld", fail_names[f], atomic_load(&fails[f]));
		if (atomic_load(&bad_status))
			fprintf(stderr, " (first status %d)", atomic_load(&bad_status));
		fprintf(stderr, "\n");
	}
	printf("{\"reqs_per_s\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"reqs\": %zu, \"failed\": %ld, "
	       "\"conns\": %ld, \"retried\": %ld}\n",
	       (double)n / elapsed, n ? all[n / 2] : 0.0, n ? all[(size_t)((double)n * 0.99)] : 0.0, n,
	       atomic_load(&total_fail), atomic_load(&total_opened), atomic_load(&total_retried));
	free(all);
	return 0;
}

static int
cmd_bulk(double seconds)
{
	static char buf[256 * 1024];
	int fd = tunnel_open();
	double t0;
	uint64_t sent = 0;

	if (fd < 0) {
		fprintf(stderr, "capd-bench: tunnel failed\n");
		return 1;
	}
	t0 = now();
	while (now() - t0 < seconds) {
		ssize_t w = write(fd, buf, sizeof buf);
		if (w <= 0) {
			fprintf(stderr, "capd-bench: write: %s\n", strerror(errno));
			return 1;
		}
		sent += (uint64_t)w;
	}
	shutdown(fd, SHUT_WR);
	while (read(fd, buf, sizeof buf) > 0)  /* the sink closes after our FIN: all bytes crossed */
		;
	double dt = now() - t0;
	printf("{\"mb_per_s\": %.1f}\n", (double)sent / 1e6 / dt);
	close(fd);
	return 0;
}

/* Bulk through TLS interception: the server sends (a large file), the proxy
 * decrypts, records and encrypts again; the client only reads. */
static int
cmd_tlsget(double seconds, const char *path)
{
	static char buf[256 * 1024];
	char req[512];
	int fd = tunnel_open(), n;
	SSL *ssl;
	uint64_t got = 0;
	double t0;

	if (fd < 0) {
		fprintf(stderr, "capd-bench: tunnel failed\n");
		return 1;
	}
	ssl = SSL_new(tls_ctx);
	SSL_set_fd(ssl, fd);
	SSL_set_tlsext_host_name(ssl, sni);
	n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, sni);
	if (SSL_connect(ssl) != 1 || SSL_write(ssl, req, n) != n) {
		fprintf(stderr, "capd-bench: TLS handshake or request failed\n");
		return 1;
	}
	t0 = now();
	while (now() - t0 < seconds) {
		int r = SSL_read(ssl, buf, sizeof buf);
		if (r <= 0)
			break;
		got += (uint64_t)r;
	}
	printf("{\"mb_per_s\": %.1f}\n", (double)got / 1e6 / (now() - t0));
	SSL_free(ssl);
	close(fd);
	return 0;
}

static int
cmd_idle(int count)
{
	int ok = 0, failed = 0;
	char c;

	for (int i = 0; i < count; i++) {
		int fd = tunnel_open();
		if (fd < 0)
			failed++;
		else
			ok++;
	}
	printf("ready %d %d\n", ok, failed);
	fflush(stdout);
	while (read(0, &c, 1) > 0)
		;
	return 0;
}

static int
cmd_sink(int port)
{
	static char buf[256 * 1024];
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1, ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN }, evs[256];

	inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(lfd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(lfd, 4096) < 0) {
		perror("capd-bench sink");
		return 1;
	}
	ev.data.fd = lfd;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	printf("listening\n");
	fflush(stdout);
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == lfd) {
				int c;
				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof buf);
			if (r == 0 || (r < 0 && errno != EAGAIN))
				close(fd);
		}
	}
}

static enum via
parse_via(const char *s)
{
	if (!strcmp(s, "direct"))
		return VIA_DIRECT;
	if (!strcmp(s, "socks5"))
		return VIA_SOCKS5;
	if (!strcmp(s, "connect"))
		return VIA_CONNECT;
	if (!strcmp(s, "http"))
		return VIA_HTTP;
	fprintf(stderr, "capd-bench: VIA is direct, socks5, connect or http\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	struct rlimit rl = { 1 << 20, 1 << 20 };

	if (setrlimit(RLIMIT_NOFILE, &rl) < 0 && getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	signal(SIGPIPE, SIG_IGN);
	if (argc == 3 && !strcmp(argv[1], "sink"))
		return cmd_sink(atoi(argv[2]));
	if (argc < 6) {
		fprintf(stderr, "usage: see the comment at the top of tools/capd-bench.c\n");
		return 2;
	}
	via = parse_via(argv[2]);
	parse_addr(argv[3], &proxy);
	parse_addr(argv[4], &target);
	if (!strcmp(argv[1], "bulk"))
		return cmd_bulk(atof(argv[5]));
	if (!strcmp(argv[1], "idle"))
		return cmd_idle(atoi(argv[5]));
	if (!strcmp(argv[1], "tlsget") && argc >= 8) {
		sni = argv[6];
		tls_ctx = SSL_CTX_new(TLS_client_method());
		SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
		return cmd_tlsget(atof(argv[5]), argv[7]);
	}
	if (!strcmp(argv[1], "conns") && argc >= 7) {
		if (argc >= 8) {
			sni = argv[7];
			tls_ctx = SSL_CTX_new(TLS_client_method());
			SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
			SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);  /* full handshakes */
		}
		return cmd_conns(atof(argv[5]), atoi(argv[6]));
	}
	if (!strcmp(argv[1], "reqs") && argc >= 8) {
		keepalive = atoi(argv[7]);
		return cmd_reqs(atof(argv[5]), atoi(argv[6]));
	}
	fprintf(stderr, "usage: see the comment at the top of tools/capd-bench.c\n");
	return 2;
}

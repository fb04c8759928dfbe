/*
 * The tracer behind `capctl trace`.
 *
 * A spawned command gets a seccomp filter (installed in the child after
 * PTRACE_SEIZE, before exec) that returns SECCOMP_RET_TRACE for the
 * network system calls and for read/write/readv/writev, and lets
 * everything else run untouched. The tracer sees a seccomp stop at entry;
 * read and write on a descriptor that is not a TCP/UDP socket are resumed
 * at once (one stop, no exit stop), everything it cares about is resumed
 * with PTRACE_SYSCALL to see the result at the syscall-exit stop, where the
 * bytes are copied out with process_vm_readv.
 *
 * --pid cannot give a running process a filter, so there every system call
 * stops twice (PTRACE_SYSCALL), and the same handlers run.
 *
 * Descriptor types are cached per thread group: fd -> socket inode, or
 * "not a socket". The cache forgets an fd at close/dup2/dup3/F_DUPFD/
 * close_range and the whole table at exec. Endpoints come from the connect()
 * and bind() addresses in tracee memory and from getsockname/getpeername on
 * a copy of the descriptor (pidfd_getfd), else from /proc/PID/net/{tcp,udp}[6]
 * looked up by socket inode. A socket ends when no traced process holds it
 * any more (checked in batches after closes of sockets, and after a process
 * exits).
 */
#include "trace-ptrace.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#include "addr.h"
#include "monotime.h"

#ifndef SYS_dup2
#define SYS_dup2 (-2)
#endif
#ifndef SYS_close_range
#define SYS_close_range (-3)
#endif
#ifndef SYS_preadv2
#define SYS_preadv2 (-4)
#endif
#ifndef SYS_pwritev2
#define SYS_pwritev2 (-5)
#endif
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup (-6)
#endif
#ifndef SYS_io_uring_enter
#define SYS_io_uring_enter (-7)
#endif

#if defined(__x86_64__)
#define TRACE_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define TRACE_AUDIT_ARCH AUDIT_ARCH_AARCH64
#elif defined(__i386__)
#define TRACE_AUDIT_ARCH AUDIT_ARCH_I386
#elif defined(__riscv) && __riscv_xlen == 64
#define TRACE_AUDIT_ARCH AUDIT_ARCH_RISCV64
#else
#error "capctl trace: unknown architecture for the seccomp filter"
#endif

/*
 * x86-64: read/write/readv/writev are not in the base filter. Each descriptor
 * number that holds a TCP/UDP socket gets a one-descriptor filter of its own,
 * installed by making the tracee call seccomp() (TSYNC: every thread) at the
 * syscall-exit stop where the socket appeared. File reads then never stop.
 * Elsewhere the base filter traces every read/write and the tracer skips
 * non-sockets.
 */
#ifndef TRACE_INJECT  /* -DTRACE_INJECT=0 tests the other way on x86-64 */
#if defined(__x86_64__)
#define TRACE_INJECT 1
#else
#define TRACE_INJECT 0
#endif
#endif
#define TRACE_MAX_FILTERS 400     /* per process; then one filter for all read/write instead */
#define TRACE_MAX_WATCH 65536     /* descriptor numbers that get a filter of their own */

#define TRACE_CHUNK (256 * 1024)  /* bytes per event: the RPC line limit is 1 MiB after base64 */
#define TRACE_MAX_IO (64u << 20)  /* bytes copied out of the tracee at once; a larger call goes in pieces */
#define TRACE_HASH 256
#define SWEEP_CLOSES 64           /* closes of sockets that make a sweep due at once ... */
#define SWEEP_DELAY 0.1           /* ... or this many seconds after the first */

#define I386_SOCKETCALL 102        /* i386 system call numbers: how a 32-bit program makes a socket */
#define I386_SOCKET 359
enum { TAG_FD = 1, TAG_NET = 2 };  /* SECCOMP_RET_DATA: does the call need an fd check */
enum { FD_UNKNOWN = 0, FD_OTHER, FD_SOCK };

/* One cached descriptor of a thread group. */
struct fdent {
	uint8_t state;
	uint64_t ino;  /* FD_SOCK: the socket's inode */
};

/* A thread group (process): its name and descriptor cache. Freed with its last thread. */
struct tgroup {
	struct tgroup *next;
	pid_t tgid;
	int threads;
	char comm[32];
	struct fdent *fds;
	int nfds;
	uint8_t *watched;               /* bitmap: descriptor numbers with a read/write filter */
	int nfilters;                   /* filters installed in the process (inherited ones too) */
	int own_filters;                /* seccomp filters it has of ours (and capctl's): more are its own */
	bool rw_all;                    /* a filter for every read/write is installed */
	uint64_t scratch;               /* a page we made it map for filter programs, 0 until then */
};

/* A traced thread and the system call it is in. */
struct ttask {
	struct ttask *next;
	pid_t tid;
	struct tgroup *g;
	bool want_exit;                 /* resumed with PTRACE_SYSCALL to see the result */
	long nr;
	uint64_t args[6];
	int oldstate;                   /* close/dup2: what the fd was */
	int64_t sf_off;                 /* sendfile: the file offset it started at, -1 for the file position */
	enum trace_dir sp_dir;          /* splice: which way the socket end moved bytes */
	uint64_t ino;                   /* the socket the call is on, as it was at entry */
	struct sockaddr_storage addr;   /* connect/bind/sendto address read at entry */
	bool have_addr;
	bool fds_in;                    /* recvmsg/recvmmsg on another socket may bring descriptors */
	bool peer_asked;                /* made a recvfrom with an address (entry_ask_peer) ... */
	uint64_t peer_regs[4];          /* ... its orig_rax, r10, r8, r9 as they were, put back at exit */
	int sfd;                        /* at exit: the descriptor of the socket the call is on */
	int pending_sig;                /* a signal that arrived while we made it call seccomp() */
	bool gone;                      /* died while we made it call seccomp(): gone_status says how */
	int gone_status;
};

/* A UDP peer of a socket: one flow (session) each. */
struct uflow {
	struct uflow *next;
	struct sockaddr_storage local;  /* the socket's, with the source the kernel routes to remote if it has none */
	struct sockaddr_storage remote;
	uint64_t id;
	bool server;                    /* the peer spoke first to an unconnected socket: it is the client */
	bool mirror;                    /* the other end is a traced flow already: not recorded twice */
};

/* One TCP or UDP socket, by inode. Freed when no traced process holds it. */
struct tsock {
	struct tsock *next;
	uint64_t ino;
	bool tcp;
	bool server;                    /* accepted: the remote end is the client */
	bool have_local, have_remote;
	struct sockaddr_storage local, remote;
	uint64_t id;                    /* TCP flow id */
	bool opened;                    /* TCP: OPEN sent (or found to be a mirror) */
	bool mirror;                    /* TCP: both ends are traced; the other end's flow records it */
	bool fin[2];                    /* TCP: SHUTDOWN sent per trace_dir */
	struct uflow *flows, *last;     /* UDP */
	pid_t pid;                      /* last process that used it, for CLOSE */
	char comm[32];
	bool mark;                      /* sweep: still held */
	bool closing;                   /* a descriptor of it was closed since the last sweep */
};

struct tracer {
	trace_event_fn fn;
	void *arg;
	pid_t main;
	bool attached;                  /* --pid: PTRACE_SYSCALL mode, detach at the end */
	int status;                     /* exit status to return */
	bool main_done;                 /* the command (t->main) has exited */
	int errpipe, gopipe;            /* spawn: exec failure report, and the go signal */
	char *argv0;
	struct ttask *tasks;
	struct tgroup *groups;
	struct tsock *socks[TRACE_HASH];
	uint64_t next_id;
	int stop_sig;                   /* a signal of the caller's stops that asks trace_run to act */
	unsigned unlooked;              /* events taken since trace_wait last looked for a signal */
	bool inject_warned;
	bool lost_warned;               /* told that some bytes are a gap in the capture */
	bool uring_warned;              /* told that a process uses io_uring */
	bool compat_warned;             /* told that a process makes sockets with 32-bit calls */
	bool accepting;                 /* fd_sock is asked about a socket accept just made */
	uint8_t listening[65536 / 8];   /* TCP ports with a listener, as of listening_at ... */
	double listening_at;            /* ... (0: never) in network namespace listening_ns */
	uint64_t listening_ns;
	unsigned nsocks;                /* sockets being followed */
	unsigned sweep_closes;          /* closes of a socket since the last sweep */
	double sweep_since;             /* when the first of them came */
	bool detaching;
	char main_comm[32];
};

/* ---- small helpers ---- */

static char *
trace_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *
trace_asprintf(const char *fmt, ...)
{
	va_list ap;
	char *s;

	va_start(ap, fmt);
	if (vasprintf(&s, fmt, ap) < 0)
		s = NULL;
	va_end(ap);
	return s;
}

static void *
trace_calloc(size_t n, size_t size)
{
	void *p = calloc(n, size);

	if (p == NULL) {
		fprintf(stderr, "capctl: out of memory\n");
		exit(1);
	}
	return p;
}

static int
yama_scope(void)
{
	FILE *f = fopen("/proc/sys/kernel/yama/ptrace_scope", "r");
	int v = -1;

	if (f) {
		if (fscanf(f, "%d", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

static char *
ptrace_why(const char *what, int err, bool attach)
{
	int scope = yama_scope();

	if (err == EPERM && scope >= (attach ? 1 : 2))  /* scope 1 lets us trace our own child */
		return trace_asprintf("ptrace not permitted: %s: %s (kernel.yama.ptrace_scope = %d%s)", what, strerror(err),
		                      scope,
		                      scope == 1 ? ": only descendants may be traced without CAP_SYS_PTRACE; "
		                                   "start the program under capctl trace instead, or lower the scope"
		                      : scope == 2 ? ": only CAP_SYS_PTRACE may trace"
		                                   : ": ptrace is disabled until reboot");
	if (err == EPERM && attach)
		return trace_asprintf("ptrace not permitted: %s: %s (another user's process, a setuid program, "
		                      "or ptrace forbidden by a security policy)", what, strerror(err));
	if (err == EPERM)
		return trace_asprintf("ptrace not permitted: %s: %s (forbidden by a security policy: a seccomp "
		                      "sandbox, AppArmor/SELinux, or a container)", what, strerror(err));
	return trace_asprintf("ptrace: %s: %s", what, strerror(err));
}

static void
trace_addr_unmap(struct sockaddr_storage *ss)
{
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
	struct sockaddr_in s4 = { .sin_family = AF_INET };

	if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
		return;
	s4.sin_port = s6->sin6_port;
	memcpy(&s4.sin_addr, &s6->sin6_addr.s6_addr[12], 4);
	memset(ss, 0, sizeof *ss);
	memcpy(ss, &s4, sizeof s4);
}

/* v4 beside a v6 end: the v6 end is a v4-mapped or unspecified address of a dual-stack socket */
static void
trace_addr_pair_fix(struct sockaddr_storage *local, struct sockaddr_storage *remote)
{
	trace_addr_unmap(local);
	trace_addr_unmap(remote);
	if (local->ss_family == AF_INET6 && remote->ss_family == AF_INET) {
		struct sockaddr_in s4 = { .sin_family = AF_INET, .sin_port = ((struct sockaddr_in6 *)local)->sin6_port };
		memset(local, 0, sizeof *local);
		memcpy(local, &s4, sizeof s4);
	}
}

static bool
trace_addr_unspec(const struct sockaddr_storage *ss)
{
	static const struct in6_addr any6 = IN6ADDR_ANY_INIT;

	if (ss->ss_family == AF_INET)
		return ((const struct sockaddr_in *)ss)->sin_addr.s_addr == htonl(INADDR_ANY);
	if (ss->ss_family == AF_INET6)
		return memcmp(&((const struct sockaddr_in6 *)ss)->sin6_addr, &any6, sizeof any6) == 0;
	return false;
}

static bool
trace_addr_same(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return false;
	if (a->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->ss_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
		return x->sin6_port == y->sin6_port && !memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr);
	}
	return false;
}

/*
 * A destination given as the unspecified address (curl http://0.0.0.0:8000/,
 * after a server that printed its wildcard listen address): the kernel sends
 * to the socket's own address when it is bound to one, else to the loopback
 * address, and that is the peer the bytes reach. remote is unmapped.
 */
static void
trace_addr_any_peer(struct sockaddr_storage *remote, const struct sockaddr_storage *local)
{
	struct sockaddr_storage l = *local;

	if (!trace_addr_unspec(remote))
		return;
	trace_addr_unmap(&l);
	if (remote->ss_family == AF_INET6)
		((struct sockaddr_in6 *)remote)->sin6_addr = in6addr_loopback;
	else if (l.ss_family == AF_INET && !trace_addr_unspec(&l))
		((struct sockaddr_in *)remote)->sin_addr = ((struct sockaddr_in *)&l)->sin_addr;
	else
		((struct sockaddr_in *)remote)->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
}

/* The source address the kernel would pick toward remote, for a socket bound to the wildcard. */
static void
trace_route_source(struct sockaddr_storage *local, const struct sockaddr_storage *remote)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof ss;
	int fd;

	if (!trace_addr_unspec(local) || (remote->ss_family != AF_INET && remote->ss_family != AF_INET6))
		return;
	if ((fd = socket(remote->ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0)
		return;
	if (connect(fd, (const struct sockaddr *)remote,
	            remote->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && ss.ss_family == remote->ss_family) {
		if (ss.ss_family == AF_INET)
			((struct sockaddr_in *)local)->sin_addr = ((struct sockaddr_in *)&ss)->sin_addr;
		else
			((struct sockaddr_in6 *)local)->sin6_addr = ((struct sockaddr_in6 *)&ss)->sin6_addr;
	}
	close(fd);
}

/* ---- tracee memory ---- */

/* Copies len bytes at addr in pid into out; falls back to /proc/PID/mem. Returns bytes copied. */
static size_t
mem_read(pid_t pid, uint64_t addr, void *out, size_t len)
{
	struct iovec l = { out, len }, r = { (void *)(uintptr_t)addr, len };
	ssize_t n;
	char path[64];
	int fd;

	if (len == 0)
		return 0;
	n = process_vm_readv(pid, &l, 1, &r, 1, 0);
	if (n >= 0 && (size_t)n == len)
		return len;
	snprintf(path, sizeof path, "/proc/%d/mem", (int)pid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return n > 0 ? (size_t)n : 0;
	n = pread(fd, out, len, (off_t)addr);
	close(fd);
	return n > 0 ? (size_t)n : 0;
}

static bool
mem_sockaddr(pid_t pid, uint64_t addr, uint64_t len, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	if (addr == 0 || len < sizeof(sa_family_t))
		return false;
	if (len > sizeof *ss)
		len = sizeof *ss;
	if (mem_read(pid, addr, ss, len) != len)
		return false;
	if (ss->ss_family == AF_INET && len >= sizeof(struct sockaddr_in))
		return true;
	if (ss->ss_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
		return true;
	return false;
}

/*
 * Gathers bytes skip .. skip + max (max at most TRACE_MAX_IO) of what an
 * iovec array in tracee memory points at into a new buffer (caller frees);
 * *got is how many were read.
 */
static uint8_t *
mem_gather(pid_t pid, uint64_t iov_addr, uint64_t iovcnt, size_t skip, size_t max, size_t *got)
{
	uint8_t *buf;
	size_t off = 0;

	*got = 0;
	if (iovcnt > 1024)
		iovcnt = 1024;
	buf = malloc(max ? max : 1);
	if (buf == NULL)
		return NULL;
	for (uint64_t i = 0; i < iovcnt && off < max; i++) {
		struct iovec v;
		if (mem_read(pid, iov_addr + i * sizeof v, &v, sizeof v) != sizeof v)
			break;
		if (v.iov_len <= skip) {
			skip -= v.iov_len;
			continue;
		}
		size_t want = v.iov_len - skip < max - off ? v.iov_len - skip : max - off;
		size_t n = mem_read(pid, (uint64_t)(uintptr_t)v.iov_base + skip, buf + off, want);
		skip = 0;
		off += n;
		if (n < want)
			break;
	}
	*got = off;
	return buf;
}

/* ---- /proc ---- */

static void
proc_comm(pid_t pid, char *out, size_t n)
{
	char path[64];
	FILE *f;

	snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
	out[0] = '\0';
	if ((f = fopen(path, "r")) != NULL) {
		if (fgets(out, (int)n, f) == NULL)
			out[0] = '\0';
		fclose(f);
	}
	out[strcspn(out, "\n")] = '\0';
	if (out[0] == '\0')
		snprintf(out, n, "?");
}

/* The number after "key:" on a line of the /proc file at path, or -1 when the file or line is missing. */
static long long
proc_field(const char *path, const char *key)
{
	char line[128];
	size_t klen = strlen(key);
	long long n = -1;
	FILE *f;

	if ((f = fopen(path, "r")) == NULL)
		return -1;
	while (fgets(line, sizeof line, f))
		if (strncmp(line, key, klen) == 0 && line[klen] == ':' && sscanf(line + klen + 1, "%lld", &n) == 1)
			break;
	fclose(f);
	return n;
}

static pid_t
proc_tgid(pid_t tid)
{
	char path[64];
	long long tgid;

	snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
	return (tgid = proc_field(path, "Tgid")) > 0 ? (pid_t)tgid : tid;
}

/* The process tracing tid (strace, gdb, another capctl trace), or 0 when none. */
static pid_t
proc_tracer(pid_t tid)
{
	char path[64];
	long long tracer;

	snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
	return (tracer = proc_field(path, "TracerPid")) > 0 ? (pid_t)tracer : 0;
}

/* How many seccomp filters tid runs under (0 for pid 0: ourselves), or -1 when unknown. */
static int
proc_seccomp_filters(pid_t tid)
{
	char path[64];

	if (tid == 0)
		snprintf(path, sizeof path, "/proc/self/status");
	else
		snprintf(path, sizeof path, "/proc/%d/status", (int)tid);
	return (int)proc_field(path, "Seccomp_filters");
}

/* The socket inode behind fd of tid, or 0 when it is not a socket (or gone). */
static uint64_t
proc_fd_ino(pid_t tid, int fd)
{
	char path[64], link[64];
	unsigned long long ino;
	ssize_t n;

	snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)tid, fd);
	if ((n = readlink(path, link, sizeof link - 1)) <= 0)
		return 0;
	link[n] = '\0';
	if (sscanf(link, "socket:[%llu]", &ino) != 1)
		return 0;
	return ino;
}

static void
proc_hex_addr(const char *hex, int family, unsigned port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	if (family == AF_INET) {
		struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
		s4->sin_family = AF_INET;
		s4->sin_port = htons((uint16_t)port);
		s4->sin_addr.s_addr = (uint32_t)strtoul(hex, NULL, 16);  /* the kernel prints the raw word */
	} else {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((uint16_t)port);
		for (int i = 0; i < 4; i++) {
			char w[9];
			memcpy(w, hex + 8 * i, 8);
			w[8] = '\0';
			uint32_t v = (uint32_t)strtoul(w, NULL, 16);
			memcpy(&s6->sin6_addr.s6_addr[4 * i], &v, 4);
		}
	}
}

/*
 * getsockname + getpeername for another process: finds the socket inode in
 * /proc/PID/net/{tcp,tcp6,udp,udp6}. *server (when asked for) guesses whether
 * a TCP socket was accepted (its local port is also listening). false when
 * not found.
 */
static bool
proc_net_lookup(pid_t pid, uint64_t ino, bool *tcp, struct sockaddr_storage *local,
                struct sockaddr_storage *remote, bool *server)
{
	static const struct { const char *file; int family; bool tcp; } tabs[] = {
		{ "tcp", AF_INET, true }, { "tcp6", AF_INET6, true }, { "udp", AF_INET, false }, { "udp6", AF_INET6, false },
	};
	char path[64], line[512], lhex[40], rhex[40];
	unsigned lport, rport, st;
	unsigned long long lino;
	bool found = false;

	if (server)
		*server = false;
	for (size_t t = 0; t < sizeof tabs / sizeof tabs[0] && !found; t++) {
		FILE *f;
		snprintf(path, sizeof path, "/proc/%d/net/%s", (int)pid, tabs[t].file);
		if ((f = fopen(path, "r")) == NULL)
			continue;
		while (fgets(line, sizeof line, f)) {
			if (sscanf(line, " %*u: %39[0-9A-Fa-f]:%X %39[0-9A-Fa-f]:%X %X %*X:%*X %*X:%*X %*X %*u %*u %llu",
			           lhex, &lport, rhex, &rport, &st, &lino) != 6)
				continue;
			if (lino != ino)
				continue;
			*tcp = tabs[t].tcp;
			proc_hex_addr(lhex, tabs[t].family, lport, local);
			proc_hex_addr(rhex, tabs[t].family, rport, remote);
			found = true;
			break;
		}
		fclose(f);
		if (found && tabs[t].tcp && server) {
			/* accepted sockets share their local port with a listener */
			unsigned myport = lport;
			for (size_t u = 0; u < 2 && !*server; u++) {
				snprintf(path, sizeof path, "/proc/%d/net/%s", (int)pid, tabs[u].file);
				if ((f = fopen(path, "r")) == NULL)
					continue;
				while (fgets(line, sizeof line, f))
					if (sscanf(line, " %*u: %39[0-9A-Fa-f]:%X %39[0-9A-Fa-f]:%X %X", lhex, &lport, rhex, &rport,
					           &st) == 5 && st == 0x0A && lport == myport) {
						*server = true;
						break;
					}
				fclose(f);
			}
		}
	}
	return found;
}

/*
 * getsockname + getpeername of descriptor fd of k's process, holding
 * socket ino, through a copy of it (pidfd_getfd, which its tracer may
 * use; the copy is closed at once). /proc/PID/net lists every socket of
 * the network namespace: a scan of it per connection made N connections
 * cost N^2, and a busy host's sockets slowed every traced connect.
 * 1 with the names (remote's port 0 when unconnected), 0 when fd is not a
 * TCP/UDP socket, -1 when this way is closed (old kernel, fd reused): scan.
 */
static int
proc_sock_names(struct ttask *k, int fd, uint64_t ino, bool *tcp, struct sockaddr_storage *l,
                struct sockaddr_storage *r)
{
	static bool unavailable;
	socklen_t ll = sizeof *l, rl = sizeof *r, tl = sizeof(int);
	int pfd, dfd, type, rc = -1;
	struct stat st;

	if (fd < 0 || unavailable)
		return -1;
	if ((pfd = (int)syscall(SYS_pidfd_open, k->g->tgid, 0)) < 0) {
		unavailable = errno == ENOSYS;
		return -1;
	}
	dfd = (int)syscall(SYS_pidfd_getfd, pfd, fd, 0);
	close(pfd);
	if (dfd < 0) {
		unavailable = errno == ENOSYS;
		return -1;
	}
	memset(l, 0, sizeof *l);
	memset(r, 0, sizeof *r);
	if (fstat(dfd, &st) == 0 && (uint64_t)st.st_ino == ino && S_ISSOCK(st.st_mode)) {
		rc = 0;
		if (getsockopt(dfd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0 && (type == SOCK_STREAM || type == SOCK_DGRAM) &&
		    getsockname(dfd, (struct sockaddr *)l, &ll) == 0 &&
		    (l->ss_family == AF_INET || l->ss_family == AF_INET6)) {
			if (getpeername(dfd, (struct sockaddr *)r, &rl) < 0) {
				memset(r, 0, sizeof *r);
				r->ss_family = l->ss_family;
			}
			*tcp = type == SOCK_STREAM;
			rc = 1;
		}
	}
	close(dfd);
	return rc;
}

/*
 * Has TCP port `port` a listener in tid's network namespace? Then a socket
 * met mid-life on that local port was accepted. The ports come from one
 * scan of /proc/TID/net/tcp[6], kept for a second: a scan per socket made
 * --pid of a process with N connections cost N^2 lines (3000: 85 s).
 */
static bool
proc_listening(struct tracer *t, pid_t tid, uint16_t port)
{
	static const char *const tabs[] = { "tcp", "tcp6" };
	char path[64], line[512], lhex[40], rhex[40];
	unsigned lport, rport, st;
	double now = mono_now();
	struct stat ns;

	snprintf(path, sizeof path, "/proc/%d/ns/net", (int)tid);
	if (stat(path, &ns) < 0)
		ns.st_ino = 0;
	if (t->listening_at == 0 || now - t->listening_at > 1.0 || (uint64_t)ns.st_ino != t->listening_ns) {
		memset(t->listening, 0, sizeof t->listening);
		for (size_t i = 0; i < 2; i++) {
			FILE *f;
			snprintf(path, sizeof path, "/proc/%d/net/%s", (int)tid, tabs[i]);
			if ((f = fopen(path, "r")) == NULL)
				continue;
			while (fgets(line, sizeof line, f))
				if (sscanf(line, " %*u: %39[0-9A-Fa-f]:%X %39[0-9A-Fa-f]:%X %X", lhex, &lport, rhex, &rport,
				           &st) == 5 && st == 0x0A && lport < 65536)
					t->listening[lport / 8] |= (uint8_t)(1u << (lport % 8));
			fclose(f);
		}
		t->listening_at = now;
		t->listening_ns = (uint64_t)ns.st_ino;
	}
	return (t->listening[port / 8] >> (port % 8)) & 1;
}

/* ---- tasks, groups, sockets ---- */

static struct ttask *
task_find(struct tracer *t, pid_t tid)
{
	for (struct ttask *k = t->tasks; k; k = k->next)
		if (k->tid == tid)
			return k;
	return NULL;
}

static struct tgroup *
group_get(struct tracer *t, pid_t tgid)
{
	struct tgroup *g;

	for (g = t->groups; g; g = g->next)
		if (g->tgid == tgid)
			return g;
	g = trace_calloc(1, sizeof *g);
	g->tgid = tgid;
	proc_comm(tgid, g->comm, sizeof g->comm);
	g->next = t->groups;
	t->groups = g;
	return g;
}

static void
group_forget_fds(struct tgroup *g)
{
	free(g->fds);
	g->fds = NULL;
	g->nfds = 0;
}

#if TRACE_INJECT
static bool
group_watching(struct tgroup *g, int fd)
{
	if (g->rw_all)
		return true;
	if (fd < 0 || fd >= TRACE_MAX_WATCH || g->watched == NULL)
		return false;
	return (g->watched[fd / 8] >> (fd % 8)) & 1;
}
#endif

static void
group_watch_mark(struct tgroup *g, int fd)
{
	if (fd < 0 || fd >= TRACE_MAX_WATCH)
		return;
	if (g->watched == NULL)
		g->watched = trace_calloc(TRACE_MAX_WATCH / 8, 1);
	g->watched[fd / 8] |= (uint8_t)(1u << (fd % 8));
	g->nfilters++;
}

/* A forked child has its parent's filters. */
static void
group_inherit(struct tgroup *child, const struct tgroup *parent)
{
	if (child == parent)
		return;
	child->rw_all |= parent->rw_all;
	if (child->scratch == 0)
		child->scratch = parent->scratch;  /* a fork copies the mapping */
	child->nfilters += parent->nfilters;
	if (child->own_filters < parent->own_filters)
		child->own_filters = parent->own_filters;
	if (parent->watched) {
		if (child->watched == NULL)
			child->watched = trace_calloc(TRACE_MAX_WATCH / 8, 1);
		for (int i = 0; i < TRACE_MAX_WATCH / 8; i++)
			child->watched[i] |= parent->watched[i];
	}
}

static struct ttask *
task_new(struct tracer *t, pid_t tid)
{
	struct ttask *k = trace_calloc(1, sizeof *k);

	k->tid = tid;
	k->nr = -1;
	k->g = group_get(t, proc_tgid(tid));
	k->g->threads++;
	k->next = t->tasks;
	t->tasks = k;
	return k;
}

static void
task_free(struct tracer *t, struct ttask *k)
{
	struct ttask **pp;

	for (pp = &t->tasks; *pp; pp = &(*pp)->next)
		if (*pp == k) {
			*pp = k->next;
			break;
		}
	if (--k->g->threads <= 0) {
		struct tgroup **gp;
		for (gp = &t->groups; *gp; gp = &(*gp)->next)
			if (*gp == k->g) {
				*gp = k->g->next;
				break;
			}
		group_forget_fds(k->g);
		free(k->g->watched);
		free(k->g);
	}
	free(k);
}

static struct fdent *
fd_slot(struct tgroup *g, int fd)
{
	if (fd < 0 || fd > (1 << 20))
		return NULL;
	if (fd >= g->nfds) {
		int n = g->nfds ? g->nfds : 64;
		while (n <= fd)
			n *= 2;
		struct fdent *v = realloc(g->fds, (size_t)n * sizeof *v);
		if (v == NULL)
			return NULL;
		memset(v + g->nfds, 0, (size_t)(n - g->nfds) * sizeof *v);
		g->fds = v;
		g->nfds = n;
	}
	return &g->fds[fd];
}

static struct tsock *
sock_find(struct tracer *t, uint64_t ino)
{
	for (struct tsock *s = t->socks[ino % TRACE_HASH]; s; s = s->next)
		if (s->ino == ino)
			return s;
	return NULL;
}

static struct tsock *
sock_new(struct tracer *t, uint64_t ino, bool tcp)
{
	struct tsock *s = trace_calloc(1, sizeof *s);

	s->ino = ino;
	s->tcp = tcp;
	s->id = ++t->next_id;
	s->next = t->socks[ino % TRACE_HASH];
	t->socks[ino % TRACE_HASH] = s;
	t->nsocks++;
	return s;
}

static void
sock_emit(struct tracer *t, struct ttask *k, struct tsock *s, enum trace_kind kind, uint64_t id, bool server,
          const struct sockaddr_storage *local, const struct sockaddr_storage *remote, enum trace_dir dir,
          const uint8_t *p, size_t n, const char *reason)
{
	struct trace_event ev = {
		.kind = kind, .sock = id, .tcp = s->tcp, .server = server,
		.local = (const struct sockaddr *)local, .remote = (const struct sockaddr *)remote,
		.dir = dir, .data = p, .len = n, .reason = reason,
		.pid = k ? k->g->tgid : s->pid, .comm = k ? k->g->comm : s->comm,
	};

	if (k) {
		s->pid = k->g->tgid;
		snprintf(s->comm, sizeof s->comm, "%s", k->g->comm);
	}
	t->fn(&ev, t->arg);
}

/* Fills in what is missing of the endpoints from /proc/PID/net. */
static void
sock_learn(struct tracer *t, struct ttask *k, struct tsock *s)
{
	struct sockaddr_storage l, r;
	bool tcp;

	(void)t;
	/* an unconnected UDP socket on the wildcard stays so: its source is chosen per peer (sock_udp_flow) */
	if (s->have_local && addr_port((const struct sockaddr *)&s->local) != 0 &&
	    (!s->tcp || (!trace_addr_unspec(&s->local) && s->have_remote)))
		return;
	int got = proc_sock_names(k, k->sfd, s->ino, &tcp, &l, &r);
	if (got == 0 || (got < 0 && !proc_net_lookup(k->tid, s->ino, &tcp, &l, &r, NULL)))
		return;
	s->tcp = tcp;
	if (!s->have_local || trace_addr_unspec(&s->local) || addr_port((const struct sockaddr *)&s->local) == 0) {
		s->local = l;
		s->have_local = true;
	}
	if (!s->have_remote && addr_port((const struct sockaddr *)&r) != 0) {
		s->remote = r;
		s->have_remote = true;
	}
}

/*
 * Is local<->remote the far end of a flow already recorded? Both ends of a
 * loopback connection inside the traced tree carry the same bytes; two
 * sessions with the same addresses would also be one muddled conversation
 * in the capture.
 */
static bool
sock_is_mirror(struct tracer *t, struct tsock *me, const struct sockaddr_storage *local,
               const struct sockaddr_storage *remote)
{
	for (int h = 0; h < TRACE_HASH; h++)
		for (struct tsock *o = t->socks[h]; o; o = o->next) {
			if (o == me || o->tcp != me->tcp)
				continue;
			if (o->tcp && o->opened && !o->mirror && trace_addr_same(&o->local, remote) &&
			    trace_addr_same(&o->remote, local))
				return true;
			if (!o->tcp)
				for (struct uflow *f = o->flows; f; f = f->next)
					if (!f->mirror && trace_addr_same(&f->local, remote) &&
					    trace_addr_same(&f->remote, local))
						return true;
		}
	return false;
}

/* TCP: sends OPEN once both endpoints are known. false: not recorded (yet, or as a mirror). */
static bool
sock_open_tcp(struct tracer *t, struct ttask *k, struct tsock *s)
{
	if (s->opened)
		return !s->mirror;
	sock_learn(t, k, s);
	if (!s->have_local || !s->have_remote)
		return false;
	trace_addr_pair_fix(&s->local, &s->remote);
	trace_route_source(&s->local, &s->remote);
	s->opened = true;
	if ((s->mirror = sock_is_mirror(t, s, &s->local, &s->remote)))
		return false;
	sock_emit(t, k, s, TRACE_EV_OPEN, s->id, s->server, &s->local, &s->remote, TRACE_SEND, NULL, 0, NULL);
	return true;
}

/* UDP: the flow for one peer (NULL peer: the connected one, else the last one used). */
static struct uflow *
sock_udp_flow(struct tracer *t, struct ttask *k, struct tsock *s, const struct sockaddr_storage *peer,
              enum trace_dir dir)
{
	struct sockaddr_storage r;
	struct uflow *f;

	if (peer == NULL && s->have_remote)
		peer = &s->remote;
	if (peer == NULL)
		return s->last;
	r = *peer;
	sock_learn(t, k, s);
	if (!s->have_local)
		return NULL;
	trace_addr_unmap(&r);
	trace_addr_any_peer(&r, &s->local);
	for (f = s->flows; f; f = f->next)
		if (trace_addr_same(&f->remote, &r))
			return s->last = f;
	f = trace_calloc(1, sizeof *f);
	f->remote = r;
	f->id = ++t->next_id;
	f->server = !s->have_remote && dir == TRACE_RECV;
	f->next = s->flows;
	s->flows = f;
	s->last = f;
	/* per peer: an unbound socket's source differs by route (127.0.0.1, ::1, a LAN address) */
	f->local = s->local;
	trace_addr_pair_fix(&f->local, &f->remote);
	trace_route_source(&f->local, &f->remote);
	if ((f->mirror = sock_is_mirror(t, s, &f->local, &f->remote)))
		return f;
	sock_emit(t, k, s, TRACE_EV_OPEN, f->id, f->server, &f->local, &f->remote, TRACE_SEND, NULL, 0, NULL);
	return f;
}

static void
sock_data(struct tracer *t, struct ttask *k, struct tsock *s, enum trace_dir dir,
          const struct sockaddr_storage *peer, const uint8_t *p, size_t n)
{
	if (s->tcp) {
		if (n == 0 || !sock_open_tcp(t, k, s))
			return;
		for (size_t off = 0; off < n; off += TRACE_CHUNK) {
			size_t c = n - off < TRACE_CHUNK ? n - off : TRACE_CHUNK;
			sock_emit(t, k, s, TRACE_EV_DATA, s->id, s->server, &s->local, &s->remote, dir, p + off, c,
			          NULL);
		}
		return;
	}
	struct uflow *f = sock_udp_flow(t, k, s, peer, dir);
	if (f == NULL || f->mirror)
		return;
	/* the most a datagram carries: 65535 less the UDP header, and for IPv4 its 20-byte header
	 * (remote is unmapped: ::ffff:a.b.c.d is IPv4 on the wire) */
	size_t max = f->remote.ss_family == AF_INET6 ? 65527 : 65507;
	sock_emit(t, k, s, TRACE_EV_DATA, f->id, f->server, &f->local, &f->remote, dir, p, n < max ? n : max, NULL);
}

/*
 * n bytes crossed the socket that the tracer could not copy (splice moves
 * them inside the kernel; the tracee's memory may be gone): capd counts them
 * and the capture shows a gap, never a stream that looks whole. Said once.
 */
static void
sock_lost(struct tracer *t, struct ttask *k, struct tsock *s, enum trace_dir dir, size_t n, const char *how)
{
	bool gap = s->tcp && n > 0 && sock_open_tcp(t, k, s);

	if (gap)
		sock_emit(t, k, s, TRACE_EV_LOST, s->id, s->server, &s->local, &s->remote, dir, NULL, n, NULL);
	if (!t->lost_warned && (gap || !s->tcp)) {
		fprintf(stderr, "capctl: process %d (%s) %s %zu bytes %s a %s socket with %s; %s\n", (int)k->g->tgid,
		        k->g->comm, dir == TRACE_SEND ? "sent" : "received", n, dir == TRACE_SEND ? "on" : "from",
		        s->tcp ? "TCP" : "UDP", how,
		        s->tcp ? "capd counts them, and the capture shows a gap where they went (and any more such)"
		               : "they are not recorded (nor any more such)");
		t->lost_warned = true;
	}
}

static void
sock_fin(struct tracer *t, struct ttask *k, struct tsock *s, enum trace_dir dir)
{
	if (!s->tcp || s->fin[dir] || !s->opened || s->mirror)
		return;
	s->fin[dir] = true;
	sock_emit(t, k, s, TRACE_EV_SHUTDOWN, s->id, s->server, &s->local, &s->remote, dir, NULL, 0, NULL);
}

static void
sock_free(struct tracer *t, struct tsock *s, const char *reason)
{
	struct tsock **pp;

	if (s->tcp && s->opened && !s->mirror)
		sock_emit(t, NULL, s, TRACE_EV_CLOSE, s->id, s->server, &s->local, &s->remote, TRACE_SEND, NULL, 0,
		          reason);
	while (s->flows) {
		struct uflow *f = s->flows;
		s->flows = f->next;
		if (!f->mirror)
			sock_emit(t, NULL, s, TRACE_EV_CLOSE, f->id, f->server, &f->local, &f->remote, TRACE_SEND, NULL,
			          0, reason);
		free(f);
	}
	for (pp = &t->socks[s->ino % TRACE_HASH]; *pp; pp = &(*pp)->next)
		if (*pp == s) {
			*pp = s->next;
			break;
		}
	t->nsocks--;
	free(s);
}

/* Ends every socket that no traced process holds any more. */
static void
sock_sweep(struct tracer *t, const char *reason)
{
	struct tgroup *g;
	bool any = false;

	t->sweep_closes = 0;
	for (int h = 0; h < TRACE_HASH; h++)
		for (struct tsock *s = t->socks[h]; s; s = s->next) {
			s->mark = false;
			any = true;
		}
	if (!any)
		return;
	for (g = t->groups; g; g = g->next) {
		char path[64];
		struct dirent *de;
		DIR *d;

		snprintf(path, sizeof path, "/proc/%d/fd", (int)g->tgid);
		if ((d = opendir(path)) == NULL)
			continue;
		while ((de = readdir(d)) != NULL) {
			char link[64], p2[400];
			unsigned long long ino;
			ssize_t n;
			struct tsock *s;

			if (de->d_name[0] == '.')
				continue;
			snprintf(p2, sizeof p2, "%s/%s", path, de->d_name);
			if ((n = readlink(p2, link, sizeof link - 1)) <= 0)
				continue;
			link[n] = '\0';
			if (sscanf(link, "socket:[%llu]", &ino) == 1 && (s = sock_find(t, ino)) != NULL)
				s->mark = true;
		}
		closedir(d);
	}
	for (int h = 0; h < TRACE_HASH; h++) {
		struct tsock *s = t->socks[h], *next;
		for (; s; s = next) {
			next = s->next;
			if (!s->mark)
				sock_free(t, s, s->closing ? "closed" : reason);  /* closed before the sweep came */
			else
				s->closing = false;
		}
	}
}

/*
 * A socket was closed (or dup2'd over) somewhere: it ends if that was its
 * last holder. A sweep reads every descriptor of every traced process, so
 * one per close made a program with N connections pay N^2 readlinks to
 * close them all (4000: 27 s, the program stalled); closes are swept in
 * batches instead, after SWEEP_CLOSES of them or SWEEP_DELAY after the
 * first (trace_wait wakes for it). A session's end is that much late.
 */
static void
sock_sweep_later(struct tracer *t)
{
	double now = mono_now();

	if (t->sweep_closes++ == 0)
		t->sweep_since = now;
	if (t->sweep_closes >= SWEEP_CLOSES || now - t->sweep_since >= SWEEP_DELAY)
		sock_sweep(t, "closed");
}

/*
 * The socket behind fd, from the cache or /proc. NULL when fd is not a
 * TCP/UDP socket. Sockets met for the first time (inherited, or from before
 * --pid attached) get their endpoints from /proc/PID/net.
 */
static struct tsock *
fd_sock(struct tracer *t, struct ttask *k, int fd)
{
	struct fdent *e = fd_slot(k->g, fd);
	struct tsock *s;
	uint64_t ino;

	if (e == NULL)
		return NULL;
	if (e->state == FD_OTHER)
		return NULL;
	if (e->state == FD_SOCK && (s = sock_find(t, e->ino)) != NULL)
		return s;
	e->state = FD_OTHER;
	if ((ino = proc_fd_ino(k->tid, fd)) == 0)
		return NULL;
	if ((s = sock_find(t, ino)) == NULL) {
		struct sockaddr_storage l, r;
		bool tcp, server = false;
		int got = proc_sock_names(k, fd, ino, &tcp, &l, &r);
		if (got == 0)
			return NULL;  /* a Unix, netlink ... socket */
		if (got < 0 && !proc_net_lookup(k->tid, ino, &tcp, &l, &r, t->accepting ? NULL : &server))
			return NULL;
		/* a TCP socket met mid-life whose local port has a listener was accepted */
		if (got > 0 && tcp && !t->accepting)
			server = proc_listening(t, k->tid, addr_port((struct sockaddr *)&l));
		s = sock_new(t, ino, tcp);
		s->server = server;
		s->local = l;
		s->have_local = true;
		if (addr_port((struct sockaddr *)&r) != 0) {
			s->remote = r;
			s->have_remote = true;
		}
	}
	e->state = FD_SOCK;
	e->ino = ino;
	return s;
}

/* A new descriptor that is a TCP/UDP socket (socket, accept). */
static struct tsock *
fd_new_sock(struct tracer *t, struct ttask *k, int fd, bool tcp)
{
	struct fdent *e = fd_slot(k->g, fd);
	uint64_t ino = proc_fd_ino(k->tid, fd);
	struct tsock *s;

	if (e == NULL || ino == 0)
		return NULL;
	if ((s = sock_find(t, ino)) == NULL)
		s = sock_new(t, ino, tcp);
	e->state = FD_SOCK;
	e->ino = ino;
	return s;
}

static void
fd_forget(struct ttask *k, int fd)
{
	struct fdent *e = fd_slot(k->g, fd);

	if (e)
		e->state = FD_UNKNOWN;
}

/* ---- the seccomp filter ---- */

static const struct { long nr; int tag; } trace_calls[] = {
#if !TRACE_INJECT
	{ SYS_read, TAG_FD }, { SYS_write, TAG_FD }, { SYS_readv, TAG_FD }, { SYS_writev, TAG_FD },
#if SYS_preadv2 >= 0
	{ SYS_preadv2, TAG_FD }, { SYS_pwritev2, TAG_FD },
#endif
#endif
	{ SYS_socket, TAG_NET }, { SYS_connect, TAG_NET }, { SYS_accept, TAG_NET }, { SYS_accept4, TAG_NET },
	{ SYS_bind, TAG_NET }, { SYS_sendto, TAG_NET }, { SYS_sendmsg, TAG_NET }, { SYS_sendmmsg, TAG_NET },
	{ SYS_recvfrom, TAG_NET }, { SYS_recvmsg, TAG_NET }, { SYS_recvmmsg, TAG_NET }, { SYS_shutdown, TAG_NET },
	{ SYS_close, TAG_NET }, { SYS_dup, TAG_NET }, { SYS_dup3, TAG_NET }, { SYS_sendfile, TAG_NET },
	{ SYS_splice, TAG_NET }, { SYS_pidfd_getfd, TAG_NET },
#if SYS_dup2 >= 0
	{ SYS_dup2, TAG_NET },
#endif
#if SYS_close_range >= 0
	{ SYS_close_range, TAG_NET },
#endif
#if SYS_io_uring_setup >= 0
	/* only to say that its bytes are not recorded: a ring is set up before any
	 * io_uring_enter, which then need not stop */
	{ SYS_io_uring_setup, TAG_NET },
#endif
#ifdef SYS_send
	{ SYS_send, TAG_NET },
#endif
#ifdef SYS_recv
	{ SYS_recv, TAG_NET },
#endif
};
#define NCALLS (sizeof trace_calls / sizeof trace_calls[0])

#if __BYTE_ORDER == __LITTLE_ENDIAN
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#else
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)
#endif

#define FILTER_SLOTS (2 * NCALLS + 24)

/* Builds the filter into prog (at least FILTER_SLOTS slots); returns its length. */
static unsigned short
filter_build(struct sock_filter *f)
{
	unsigned short n = 0;

	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
#ifdef __x86_64__
	/* 32-bit calls (int 0x80, a 32-bit program) pass untraced, but the socket they make stops
	 * once so that the tracer can say its bytes are not recorded (on_compat_call) */
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, TRACE_AUDIT_ARCH, 6, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_I386, 0, 4);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, I386_SOCKET, 1, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, I386_SOCKETCALL, 0, 1);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE | TAG_NET);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
#else
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, TRACE_AUDIT_ARCH, 1, 0);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);  /* 32-bit calls pass, untraced */
#endif
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
#ifdef __x86_64__
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000 /* __X32_SYSCALL_BIT */, 0, 1);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
#endif
	for (size_t i = 0; i < NCALLS; i++) {
		f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)trace_calls[i].nr, 0, 1);
		f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE | (uint32_t)trace_calls[i].tag);
	}
	/* fcntl only for F_DUPFD / F_DUPFD_CLOEXEC, which may reuse a cached descriptor number */
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_fcntl, 0, 4);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(1));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, F_DUPFD, 1, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, F_DUPFD_CLOEXEC, 0, 1);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE | TAG_NET);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	return n;
}

#define RW_FILTER_LEN 14

/*
 * read/write/readv/writev/preadv2/pwritev2 on descriptor fd (fd < 0: on any
 * descriptor) stop; nothing else. preadv2/pwritev2 with offset -1 work on a
 * socket as readv/writev do.
 */
static unsigned short
filter_build_rw(struct sock_filter *f, int fd)
{
	unsigned short n = 0;

	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, TRACE_AUDIT_ARCH, 1, 0);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_read, 5, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_write, 4, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_readv, 3, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_writev, 2, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)SYS_preadv2, 1, 0);
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)SYS_pwritev2, 0, 3);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(0));
	if (fd >= 0)
		f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)fd, 0, 1);
	else
		f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JA, 0, 0, 0);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE | TAG_FD);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	return n;
}

/* In the child: installs the filter (and one per inherited socket). 0 or an errno value. */
static int
filter_install(const int *sockfds, int nsockfds)
{
	struct sock_filter prog[FILTER_SLOTS];
	struct sock_fprog fp = { .len = filter_build(prog), .filter = prog };

	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fp) == 0)
		goto fds;
	if (errno != EACCES)
		return errno;
	/* without CAP_SYS_ADMIN a filter needs no_new_privs (a setuid program then runs unprivileged) */
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return errno;
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fp) != 0)
		return errno;
fds:
	for (int i = 0; i < nsockfds; i++) {
		struct sock_filter rw[RW_FILTER_LEN];
		struct sock_fprog rp = { .len = filter_build_rw(rw, sockfds[i]), .filter = rw };
		if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &rp) != 0)
			return errno;
	}
	return 0;
}

/* The TCP/UDP sockets among our descriptors: a spawned command inherits them. */
static int
inherited_sockets(int *out, int max)
{
	int n = 0;

	struct dirent *de;
	DIR *d;

	if (!TRACE_INJECT || (d = opendir("/proc/self/fd")) == NULL)
		return 0;
	while ((de = readdir(d)) != NULL && n < max) {
		int fd = atoi(de->d_name), dom = 0;
		socklen_t len = sizeof dom;
		if (de->d_name[0] != '.' && fd != dirfd(d) &&
		    getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &len) == 0 && (dom == AF_INET || dom == AF_INET6))
			out[n++] = fd;
	}
	closedir(d);
	return n;
}

int
trace_check(bool attach, char **why)
{
	int scope = yama_scope(), status;
	pid_t pid;

	if (scope == 3) {
		*why = trace_asprintf("ptrace not permitted: kernel.yama.ptrace_scope = 3 disables ptrace until reboot");
		return -1;
	}
	if (attach)
		return 0;
	/* try the real filter in a throwaway child: a kernel without seccomp, or a sandbox that forbids it */
	if ((pid = fork()) < 0) {
		*why = trace_asprintf("fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		struct sock_filter prog[FILTER_SLOTS];
		struct sock_fprog fp = { .len = filter_build(prog), .filter = prog };
		/* RET_TRACE without a tracer fails the call with ENOSYS, so only install, then leave */
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
			_exit(100 + (errno & 127) % 100);
		if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fp) < 0)
			_exit(errno == ENOSYS ? 3 : errno == EINVAL ? 4 : 5);
		_exit(0);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR) {
			*why = trace_asprintf("waitpid: %s", strerror(errno));
			return -1;
		}
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	*why = trace_asprintf("seccomp unavailable: the kernel refused a seccomp filter (%s); "
	                      "capctl trace needs CONFIG_SECCOMP_FILTER and a sandbox that allows seccomp(2)",
	                      !WIFEXITED(status) ? "the test child died"
	                      : WEXITSTATUS(status) == 3 ? "no seccomp system call"
	                      : WEXITSTATUS(status) == 4 ? "filters not supported"
	                                                 : "not permitted");
	return -1;
}

/* ---- starting ---- */

static const long trace_opts_base = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK |
                                    PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC | PTRACE_O_TRACESECCOMP;

static struct tracer *
tracer_new(trace_event_fn fn, void *arg)
{
	struct tracer *t = trace_calloc(1, sizeof *t);

	t->fn = fn;
	t->arg = arg;
	t->errpipe = t->gopipe = -1;
	return t;
}

struct tracer *
trace_spawn(char *const argv[], trace_event_fn fn, void *arg, char **why)
{
	struct tracer *t = tracer_new(fn, arg);
	int ep[2], gp[2], sockfds[64], nsockfds = inherited_sockets(sockfds, 64);
	pid_t pid;

	if (pipe2(ep, O_CLOEXEC) < 0 || pipe2(gp, O_CLOEXEC) < 0) {
		*why = trace_asprintf("pipe: %s", strerror(errno));
		free(t);
		return NULL;
	}
	if ((pid = fork()) < 0) {
		*why = trace_asprintf("fork: %s", strerror(errno));
		close(ep[0]); close(ep[1]); close(gp[0]); close(gp[1]);
		free(t);
		return NULL;
	}
	if (pid == 0) {
		char go;
		int err;

		close(ep[0]);
		close(gp[1]);
		/* wait until the tracer has seized us and capd has the instance */
		ssize_t r;
		do
			r = read(gp[0], &go, 1);
		while (r < 0 && errno == EINTR);
		if (r != 1 || go != 'g')
			_exit(127);  /* capctl gave up before the command started */
		close(gp[0]);
		if ((err = filter_install(sockfds, nsockfds)) != 0) {
			int msg[2] = { 1, err };
			ssize_t w = write(ep[1], msg, sizeof msg);
			(void)w;
			_exit(127);
		}
		execvp(argv[0], argv);
		int msg[2] = { 2, errno };
		ssize_t w = write(ep[1], msg, sizeof msg);
		(void)w;
		_exit(errno == ENOENT ? 127 : 126);
	}
	close(ep[1]);
	close(gp[0]);
	t->errpipe = ep[0];
	t->gopipe = gp[1];
	t->main = pid;
	t->argv0 = strdup(argv[0]);
	if (ptrace(PTRACE_SEIZE, pid, 0, trace_opts_base | PTRACE_O_EXITKILL) < 0) {
		*why = ptrace_why("cannot trace the command", errno, false);
		trace_abort(t);
		trace_free(t);
		return NULL;
	}
	task_new(t, pid);
	for (int i = 0; i < nsockfds; i++)
		group_watch_mark(t->tasks->g, sockfds[i]);
	/* capctl's own (a container's), the base filter, one per inherited socket */
	t->tasks->g->own_filters = proc_seccomp_filters(0) + 1 + nsockfds;
	{
		const char *b = strrchr(argv[0], '/');
		snprintf(t->main_comm, sizeof t->main_comm, "%s", b ? b + 1 : argv[0]);
		/* until exec, the child is a copy of capctl: name its group after the command */
		snprintf(t->tasks->g->comm, sizeof t->tasks->g->comm, "%.15s", t->main_comm);
	}
	return t;
}

int
trace_release(struct tracer *t, char **why)
{
	(void)why;
	if (t->gopipe < 0)
		return 0;
	if (write(t->gopipe, "g", 1) != 1) {
		*why = trace_asprintf("cannot start the command: %s", strerror(errno));
		return -1;
	}
	close(t->gopipe);
	t->gopipe = -1;
	return 0;
}

void
trace_abort(struct tracer *t)
{
	int st;

	if (t->main <= 0 || t->attached)
		return;
	if (t->gopipe >= 0) {
		close(t->gopipe);
		t->gopipe = -1;
	}
	kill(t->main, SIGKILL);
	while (waitpid(t->main, &st, __WALL) < 0 && errno == EINTR)
		;
	t->main = 0;
}

struct tracer *
trace_attach(pid_t pid, trace_event_fn fn, void *arg, char **why)
{
	struct tracer *t = tracer_new(fn, arg);
	char path[64];
	bool added = true;

	t->attached = true;
	t->main = pid;
	snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
	if (kill(pid, 0) < 0 && errno == ESRCH) {
		*why = trace_asprintf("no process %d", (int)pid);
		free(t);
		return NULL;
	}
	/* threads may be created while we attach: repeat until a pass adds none */
	while (added) {
		DIR *d = opendir(path);
		struct dirent *de;

		added = false;
		if (d == NULL) {
			*why = trace_asprintf("no process %d", (int)pid);
			trace_free(t);
			return NULL;
		}
		while ((de = readdir(d)) != NULL) {
			pid_t tid = (pid_t)atoi(de->d_name);
			if (tid <= 0 || task_find(t, tid))
				continue;
			if (ptrace(PTRACE_SEIZE, tid, 0, trace_opts_base) < 0) {
				if (errno == ESRCH)
					continue;
				int err = errno;
				pid_t tracer = err == EPERM ? proc_tracer(tid) : 0;
				char what[64], comm[32];
				snprintf(what, sizeof what, "cannot attach to process %d", (int)pid);
				if (tracer > 0) {
					/* a process has one tracer: Yama, owners and setuid are beside the point */
					proc_comm(tracer, comm, sizeof comm);
					*why = trace_asprintf("ptrace not permitted: %s: it is traced already, by process %d (%s)",
					                      what, (int)tracer, comm);
				} else {
					*why = ptrace_why(what, err, true);
				}
				closedir(d);
				t->detaching = true;
				for (struct ttask *k = t->tasks; k; k = k->next)
					ptrace(PTRACE_DETACH, k->tid, 0, 0);
				trace_free(t);
				return NULL;
			}
			ptrace(PTRACE_INTERRUPT, tid, 0, 0);
			task_new(t, tid);
			added = true;
		}
		closedir(d);
	}
	proc_comm(pid, t->main_comm, sizeof t->main_comm);
	return t;
}

pid_t
trace_pid(struct tracer *t)
{
	return t->main;
}

const char *
trace_comm(struct tracer *t)
{
	return t->main_comm;
}

/* One of the caller's stop signals came (trace_run). */
static void
trace_signal(struct tracer *t, int sig)
{
	/*
	 * Once the command has exited, its pid may be another process's, and
	 * the processes it left behind (a daemon) are all that keeps us
	 * running: trace_run passes the signal on to them.
	 */
	if (t->attached || t->main_done) {
		t->stop_sig = sig;
		return;
	}
	/* ^C from the terminal reached the command itself */
	if (sig != SIGINT && sig != SIGQUIT && t->main > 0)
		kill(t->main, sig);
}

void
trace_free(struct tracer *t)
{
	if (t == NULL)
		return;
	while (t->tasks)
		task_free(t, t->tasks);
	for (int h = 0; h < TRACE_HASH; h++)
		while (t->socks[h]) {
			struct tsock *s = t->socks[h];
			t->socks[h] = s->next;
			while (s->flows) {
				struct uflow *f = s->flows;
				s->flows = f->next;
				free(f);
			}
			free(s);
		}
	if (t->errpipe >= 0)
		close(t->errpipe);
	if (t->gopipe >= 0)
		close(t->gopipe);
	free(t->argv0);
	free(t);
}

/* ---- making the tracee install a filter ---- */

#if TRACE_INJECT
/*
 * Waits for the next stop of k alone; a signal that arrives meanwhile is kept
 * for later. 1 at a syscall stop, 0 when it died (k->gone), -1 otherwise.
 */
static int
inject_wait(struct ttask *k)
{
	for (;;) {
		int st;
		pid_t r = waitpid(k->tid, &st, __WALL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			k->gone = true;
			k->gone_status = st;
			return 0;
		}
		if (!WIFSTOPPED(st))
			continue;
		if (WSTOPSIG(st) == (SIGTRAP | 0x80))
			return 1;
		if ((st >> 16) == 0 && WSTOPSIG(st) != SIGTRAP && k->pending_sig == 0)
			k->pending_sig = WSTOPSIG(st);  /* delivered when we let it go */
		if (ptrace(PTRACE_SYSCALL, k->tid, 0, 0) < 0)
			return -1;
	}
}

/*
 * At a syscall-exit stop of k: makes it run the system call nr(a[0..5])
 * by stepping back onto its `syscall` instruction with new registers, then
 * puts the registers back. 0 with *ret, or -1.
 */
static int
inject_syscall(struct ttask *k, long nr, const uint64_t a[6], int64_t *ret)
{
	struct user_regs_struct saved, r;
	uint8_t insn[2];
	int rc = -1;

	if (ptrace(PTRACE_GETREGS, k->tid, 0, &saved) < 0)
		return -1;
	/* the stopped call left rip just after its `syscall` (0f 05) */
	if (mem_read(k->tid, saved.rip - 2, insn, 2) != 2 || insn[0] != 0x0f || insn[1] != 0x05)
		return -1;
	r = saved;
	r.rax = r.orig_rax = (unsigned long long)nr;
	r.rdi = a[0];
	r.rsi = a[1];
	r.rdx = a[2];
	r.r10 = a[3];
	r.r8 = a[4];
	r.r9 = a[5];
	r.rip = saved.rip - 2;
	if (ptrace(PTRACE_SETREGS, k->tid, 0, &r) < 0 || ptrace(PTRACE_SYSCALL, k->tid, 0, 0) < 0 ||
	    inject_wait(k) != 1 ||                                                      /* its entry */
	    ptrace(PTRACE_SYSCALL, k->tid, 0, 0) < 0 || inject_wait(k) != 1)            /* its exit */
		goto restore;
	if (ptrace(PTRACE_GETREGS, k->tid, 0, &r) == 0) {
		*ret = (int64_t)r.rax;
		rc = 0;
	}
restore:
	if (k->gone || ptrace(PTRACE_SETREGS, k->tid, 0, &saved) < 0)
		return -1;
	return rc;
}

/*
 * Makes k's process install prog for all its threads (seccomp TSYNC). The
 * program is written to a page of its own that the process is made to map
 * once (other memory could be in use by another thread). 0, or -1.
 */
static int
inject_filter(struct ttask *k, const struct sock_filter *prog, unsigned short len)
{
	struct tgroup *g = k->g;
	struct sock_fprog fp;
	uint8_t buf[sizeof fp + 64 * sizeof *prog];
	size_t need = sizeof fp + len * sizeof *prog;
	int64_t rv;

	if (need > sizeof buf)
		return -1;
	if (g->scratch == 0) {
		const uint64_t a[6] = { 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, (uint64_t)-1, 0 };
		if (inject_syscall(k, SYS_mmap, a, &rv) < 0 || (rv < 0 && rv > -4096))
			return -1;
		g->scratch = (uint64_t)rv;
	}
	fp.len = len;
	fp.filter = (struct sock_filter *)(uintptr_t)(g->scratch + sizeof fp);
	memcpy(buf, &fp, sizeof fp);
	memcpy(buf + sizeof fp, prog, len * sizeof *prog);
	struct iovec l = { buf, need }, rv2 = { (void *)(uintptr_t)g->scratch, need };
	if (process_vm_writev(k->tid, &l, 1, &rv2, 1, 0) != (ssize_t)need)
		return -1;
	const uint64_t a[6] = { SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, g->scratch, 0, 0, 0 };
	if (inject_syscall(k, SYS_seccomp, a, &rv) < 0)
		return -1;
	if (rv == -EACCES) {
		/* it gave up CAP_SYS_ADMIN (root that dropped to a user): filters then need no_new_privs */
		const uint64_t nnp[6] = { PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0 };
		int64_t rv_nnp;
		if (inject_syscall(k, SYS_prctl, nnp, &rv_nnp) < 0 || rv_nnp != 0 ||
		    inject_syscall(k, SYS_seccomp, a, &rv) < 0)
			return -1;
	}
	return rv == 0 ? 0 : -1;
}
#endif

/*
 * fd of k's process holds a TCP/UDP socket now: make sure its read/write
 * calls stop. k is at the syscall-exit stop that produced fd.
 */
static void
watch_fd(struct tracer *t, struct ttask *k, int fd)
{
#if TRACE_INJECT
	struct sock_filter prog[RW_FILTER_LEN];
	struct tgroup *g = k->g;
	bool all;

	if (t->attached || group_watching(g, fd))
		return;
	all = fd >= TRACE_MAX_WATCH || g->nfilters >= TRACE_MAX_FILTERS;
	if (inject_filter(k, prog, filter_build_rw(prog, all ? -1 : fd)) < 0) {
		if (!k->gone && !t->inject_warned) {
			fprintf(stderr, "capctl: cannot watch read/write on socket %d of process %d; bytes it moves with "
			        "read/write are not recorded\n", fd, (int)g->tgid);
			t->inject_warned = true;
		}
		return;
	}
	g->own_filters++;
	if (all)
		g->rw_all = true;
	else
		group_watch_mark(g, fd);
#else
	(void)t; (void)k; (void)fd;
#endif
}

/* ---- system call handlers ---- */

/*
 * Has the msghdr at addr (for recvmmsg, the first of the array) room for
 * control messages? Only then can the call bring descriptors.
 */
static bool
msg_wants_control(struct ttask *k, uint64_t addr)
{
	struct msghdr m;

	return mem_read(k->tid, addr, &m, sizeof m) == sizeof m && m.msg_control != NULL &&
	       m.msg_controllen >= CMSG_LEN(sizeof(int));
}

/*
 * io_uring moves bytes without a system call per transfer (none at all with
 * SQPOLL), so the tracer cannot see them: said once, when a traced process
 * sets up a ring (or, under --pid, submits to one it had).
 */
static void
entry_uring(struct tracer *t, struct ttask *k, long nr)
{
	if (t->uring_warned)
		return;
	fprintf(stderr, "capctl: process %d (%s) calls %s; bytes moved with io_uring are not recorded, so some may be "
	        "missing from the capture\n", (int)k->g->tgid, k->g->comm,
	        nr == SYS_io_uring_setup ? "io_uring_setup" : "io_uring_enter");
	t->uring_warned = true;
}

#if defined(__x86_64__)
#define PEER_SCRATCH 1024  /* bytes below the stack pointer where the sender's address lands */

/*
 * read(2), or recv(2) (recvfrom without an address), on an unconnected UDP
 * socket says nothing of who sent the datagram: crediting it to the peer
 * last used put a stranger's datagram in another flow. Such a call is made
 * a recvfrom with an address: the same call on a socket (a read of 0 bytes,
 * which takes no datagram, is left alone), whose address lands on the
 * tracee's stack well below its red zone, where nothing lives while it is
 * in the call (a signal handler runs after the exit stop, where the address
 * is read and the registers put back: peer_restore). false: left as it was.
 */
static bool
entry_ask_peer(struct ttask *k, long nr, const uint64_t *a)
{
	struct user_regs_struct r;
	uint32_t len = sizeof(struct sockaddr_storage);
	uint64_t lenp, addr;

	if (nr == SYS_read ? a[2] == 0 : nr != SYS_recvfrom || a[4] != 0 || (a[3] & MSG_ERRQUEUE))
		return false;
	/* a program with seccomp filters of its own (a sandbox) may allow read and not recvfrom,
	 * or recvfrom without an address only: the kernel runs them again on the changed call */
	if (proc_seccomp_filters(k->tid) != k->g->own_filters)
		return false;
	if (ptrace(PTRACE_GETREGS, k->tid, 0, &r) < 0)
		return false;
	lenp = (r.rsp - PEER_SCRATCH) & ~(uint64_t)15;
	addr = lenp + 16;
	struct iovec l = { &len, sizeof len }, rem = { (void *)(uintptr_t)lenp, sizeof len };
	if (process_vm_writev(k->tid, &l, 1, &rem, 1, 0) != (ssize_t)sizeof len)
		return false;  /* not mapped (a stack not grown that far): as before */
	k->peer_regs[0] = r.orig_rax;
	k->peer_regs[1] = r.r10;
	k->peer_regs[2] = r.r8;
	k->peer_regs[3] = r.r9;
	r.orig_rax = SYS_recvfrom;
	if (nr == SYS_read)
		r.r10 = 0;
	r.r8 = addr;
	r.r9 = lenp;
	if (ptrace(PTRACE_SETREGS, k->tid, 0, &r) < 0)
		return false;
	k->peer_asked = true;
	k->nr = SYS_recvfrom;
	k->args[3] = r.r10;
	k->args[4] = addr;
	k->args[5] = lenp;
	return true;
}

/*
 * At the exit stop of a call entry_ask_peer changed: the registers the
 * kernel keeps across a system call are the program's again, and so is the
 * call number, which a restarted call (interrupted by a signal) runs again.
 */
static void
peer_restore(struct ttask *k)
{
	struct user_regs_struct r;

	if (!k->peer_asked)
		return;
	k->peer_asked = false;
	if (ptrace(PTRACE_GETREGS, k->tid, 0, &r) < 0)
		return;
	r.orig_rax = k->peer_regs[0];
	r.r10 = k->peer_regs[1];
	r.r8 = k->peer_regs[2];
	r.r9 = k->peer_regs[3];
	ptrace(PTRACE_SETREGS, k->tid, 0, &r);
}
#else
static bool
entry_ask_peer(struct ttask *k, long nr, const uint64_t *a)
{
	(void)k; (void)nr; (void)a;
	return false;
}

static void
peer_restore(struct ttask *k)
{
	(void)k;
}
#endif

/*
 * A system call of another ABI than the tracer's (int 0x80 or a 32-bit
 * program on x86-64): its structures are not decoded, so the bytes of the
 * sockets it makes are not recorded. Said once, at the first socket made so.
 */
static void
on_compat_call(struct tracer *t, struct ttask *k, long nr)
{
#ifdef __x86_64__
	if (t->compat_warned || (nr != I386_SOCKET && nr != I386_SOCKETCALL))
		return;
	fprintf(stderr, "capctl: process %d (%s) makes 32-bit system calls on sockets; their bytes are not recorded, "
	        "so some may be missing from the capture\n", (int)k->g->tgid, k->g->comm);
	t->compat_warned = true;
#else
	(void)t; (void)k; (void)nr;
#endif
}

/* Entry (or seccomp) stop: decides whether the exit is worth a second stop. */
static void
on_entry(struct tracer *t, struct ttask *k, long nr, const uint64_t *a)
{
	k->nr = nr;
	memcpy(k->args, a, sizeof k->args);
	k->want_exit = false;
	k->have_addr = false;
	k->fds_in = false;
	k->oldstate = FD_UNKNOWN;
	k->ino = 0;

	if (nr == SYS_io_uring_setup || nr == SYS_io_uring_enter) {
		entry_uring(t, k, nr);
		return;
	}
	if (nr == SYS_read || nr == SYS_write || nr == SYS_readv || nr == SYS_writev || nr == SYS_preadv2 ||
	    nr == SYS_pwritev2 || nr == SYS_sendto || nr == SYS_sendmsg || nr == SYS_sendmmsg || nr == SYS_recvfrom ||
	    nr == SYS_recvmsg || nr == SYS_recvmmsg || nr == SYS_shutdown
#ifdef SYS_send
	    || nr == SYS_send
#endif
#ifdef SYS_recv
	    || nr == SYS_recv
#endif
	) {
		struct tsock *s = fd_sock(t, k, (int)a[0]);
		if (s != NULL) {
			k->want_exit = true;
			k->ino = s->ino;  /* another thread may close and reuse the number meanwhile */
			if (!s->tcp && !s->have_remote)
				entry_ask_peer(k, nr, a);
		} else if ((nr == SYS_recvmsg || nr == SYS_recvmmsg) && msg_wants_control(k, a[1])) {
			k->want_exit = k->fds_in = true;  /* a Unix socket passing descriptors (SCM_RIGHTS) */
		}
		if (nr == SYS_sendto && k->want_exit)
			k->have_addr = mem_sockaddr(k->tid, a[4], a[5], &k->addr);
		return;
	}
	if (nr == SYS_sendfile) {
		int64_t off;
		struct tsock *s = fd_sock(t, k, (int)a[0]);
		k->sf_off = -1;
		if (s == NULL)
			return;
		k->want_exit = true;
		k->ino = s->ino;
		if (a[2] != 0 && mem_read(k->tid, a[2], &off, sizeof off) == sizeof off)
			k->sf_off = off;
		return;
	}
	if (nr == SYS_splice) {
		/* one end is a pipe; the other may be a socket, its bytes never in the tracee's memory */
		struct tsock *s = fd_sock(t, k, (int)a[0]);
		k->sp_dir = TRACE_RECV;
		if (s == NULL && (s = fd_sock(t, k, (int)a[2])) != NULL)
			k->sp_dir = TRACE_SEND;
		if (s != NULL) {
			k->want_exit = true;
			k->ino = s->ino;
		}
		return;
	}
	if (nr == SYS_socket) {
		int type = (int)a[1] & 0xf;
		k->want_exit = (a[0] == AF_INET || a[0] == AF_INET6) && (type == SOCK_STREAM || type == SOCK_DGRAM);
		return;
	}
	if (nr == SYS_connect || nr == SYS_bind) {
		k->have_addr = mem_sockaddr(k->tid, a[1], a[2], &k->addr);
		k->want_exit = k->have_addr || (nr == SYS_connect && a[2] >= sizeof(sa_family_t));
		return;
	}
	if (nr == SYS_accept || nr == SYS_accept4 || nr == SYS_pidfd_getfd) {
		k->want_exit = true;
		return;
	}
	if (nr == SYS_close || nr == SYS_dup2 || nr == SYS_dup3 || nr == SYS_dup || nr == SYS_fcntl) {
		int fd = nr == SYS_close ? (int)a[0] : (nr == SYS_dup2 || nr == SYS_dup3) ? (int)a[1] : -1;
		if (nr == SYS_fcntl && a[1] != F_DUPFD && a[1] != F_DUPFD_CLOEXEC)
			return;
		if (fd >= 0) {
			struct fdent *e = fd_slot(k->g, fd);
			struct tsock *s;
			if (e) {
				k->oldstate = e->state;
				e->state = FD_UNKNOWN;
				if (k->oldstate == FD_SOCK && (s = sock_find(t, e->ino)) != NULL)
					s->closing = true;
			}
		}
		/* a number never used for I/O here may still hold a socket we know (a forked copy) */
		if (nr == SYS_close && k->oldstate == FD_UNKNOWN && t->nsocks > 0) {
			uint64_t ino = proc_fd_ino(k->tid, fd);
			struct tsock *s;
			if (ino && (s = sock_find(t, ino)) != NULL) {
				k->oldstate = FD_SOCK;
				s->closing = true;
			}
		}
		/* close of a non-socket needs nothing more; the others must forget the new number */
		k->want_exit = nr != SYS_close || k->oldstate == FD_SOCK;
		return;
	}
	if (nr == SYS_close_range) {
		group_forget_fds(k->g);
		k->want_exit = true;
		return;
	}
}

/* Reads the peer address a recvfrom/recvmsg wrote back. */
static bool
exit_peer(struct ttask *k, uint64_t addr, uint64_t lenp, struct sockaddr_storage *ss)
{
	uint32_t len = 0;

	if (addr == 0 || lenp == 0 || mem_read(k->tid, lenp, &len, sizeof len) != sizeof len)
		return false;
	return mem_sockaddr(k->tid, addr, len, ss);
}

/*
 * Reports the n bytes a call moved, from one buffer at addr or (vec) from
 * the iovec array at addr, TRACE_MAX_IO at a time: one blocking send of
 * 100 MiB is one call, and all of it crossed.
 */
static void
exit_bytes(struct tracer *t, struct ttask *k, struct tsock *s, enum trace_dir dir,
           const struct sockaddr_storage *peer, uint64_t addr, bool vec, uint64_t iovcnt, size_t n)
{
	size_t off = 0;

	do {  /* once for n = 0: an empty datagram is one too */
		size_t want = n - off < TRACE_MAX_IO ? n - off : TRACE_MAX_IO, got = 0;
		uint8_t *buf;

		if (vec)
			buf = mem_gather(k->tid, addr, iovcnt, off, want, &got);
		else if ((buf = malloc(want ? want : 1)) != NULL)
			got = mem_read(k->tid, addr + off, buf, want);
		if (buf == NULL)
			return;
		sock_data(t, k, s, dir, peer, buf, got);
		free(buf);
		if (got < want) {
			/* TCP: the memory went away under us (another thread unmapped it); a UDP
			 * datagram longer than the buffers of a recvmsg(MSG_TRUNC) ends here too */
			if (s->tcp)
				sock_lost(t, k, s, dir, n - off - got, "memory the tracer could not read");
			return;
		}
		off += got;
	} while (off < n);
}

static void
exit_msghdr(struct tracer *t, struct ttask *k, struct tsock *s, uint64_t msg_addr, size_t n, enum trace_dir dir)
{
	struct msghdr m;
	struct sockaddr_storage peer;
	bool have_peer = false;

	if (mem_read(k->tid, msg_addr, &m, sizeof m) != sizeof m)
		return;
	if (m.msg_name && m.msg_namelen > 0)
		have_peer = mem_sockaddr(k->tid, (uint64_t)(uintptr_t)m.msg_name, m.msg_namelen, &peer);
	if (dir == TRACE_SEND && s->tcp && have_peer && !s->have_remote) {
		s->remote = peer;  /* sendmsg with MSG_FASTOPEN */
		s->have_remote = true;
	}
	exit_bytes(t, k, s, dir, have_peer ? &peer : NULL, (uint64_t)(uintptr_t)m.msg_iov, true, m.msg_iovlen, n);
}

/* The file position of fd in tid, from /proc/TID/fdinfo; -1 when unknown. */
static int64_t
proc_fd_pos(pid_t tid, int fd)
{
	char path[64];

	snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", (int)tid, fd);
	return proc_field(path, "pos");
}

/* sendfile(socket, file): the bytes are the file's, read again through /proc/TID/fd. */
static void
exit_sendfile(struct tracer *t, struct ttask *k, struct tsock *s, int in_fd, size_t n)
{
	int64_t start = k->sf_off >= 0 ? k->sf_off : proc_fd_pos(k->tid, in_fd) - (int64_t)n;
	char path[64];
	uint8_t *buf;
	ssize_t got;
	int fd;

	if (start < 0)
		return;
	snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)k->tid, in_fd);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return;
	if ((buf = malloc(n < TRACE_MAX_IO ? n : TRACE_MAX_IO)) != NULL) {
		/* in pieces: a blocking sendfile of a whole large file is one call */
		for (size_t off = 0; off < n; off += (size_t)got) {
			size_t want = n - off < TRACE_MAX_IO ? n - off : TRACE_MAX_IO;
			if ((got = pread(fd, buf, want, (off_t)start + (off_t)off)) <= 0)
				break;
			sock_data(t, k, s, TRACE_SEND, NULL, buf, (size_t)got);
		}
		free(buf);
	}
	close(fd);
}

/*
 * Descriptors that arrived with SCM_RIGHTS in the n messages at addr (a
 * msghdr, or an mmsghdr array for n > 1): a TCP/UDP socket among them is
 * new to this process (a connection a master process accepted and handed
 * to a worker), and its read/write calls must stop like any other's.
 */
static void
exit_fds_in(struct tracer *t, struct ttask *k, uint64_t addr, size_t n)
{
	for (size_t i = 0; i < n && i < 1024 && !k->gone; i++) {
		struct mmsghdr mm;
		uint8_t ctl[4096];
		struct msghdr m = { 0 };
		size_t len;

		if (mem_read(k->tid, addr + i * sizeof mm, &mm, sizeof mm.msg_hdr) != sizeof mm.msg_hdr)
			return;
		len = mm.msg_hdr.msg_controllen < sizeof ctl ? mm.msg_hdr.msg_controllen : sizeof ctl;
		if (mm.msg_hdr.msg_control == NULL || len < CMSG_LEN(sizeof(int)) ||
		    mem_read(k->tid, (uint64_t)(uintptr_t)mm.msg_hdr.msg_control, ctl, len) != len)
			continue;
		m.msg_control = ctl;  /* the CMSG_ macros walk our copy */
		m.msg_controllen = len;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
				continue;
			size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t j = 0; j < nfd && !k->gone; j++) {
				int fd;
				memcpy(&fd, CMSG_DATA(c) + j * sizeof fd, sizeof fd);
				fd_forget(k, fd);
				if (fd_sock(t, k, fd) != NULL)
					watch_fd(t, k, fd);
			}
		}
	}
}

/*
 * Receive flags whose bytes did not cross from the peer: a peek is read
 * again later, and the error queue holds the socket's own sent data back
 * (a UDP datagram an ICMP error returned, a timestamped copy) or nothing
 * (a MSG_ZEROCOPY completion, which is no end of stream).
 */
#define TRACE_NOT_DATA (MSG_PEEK | MSG_ERRQUEUE)

static void
on_exit_call(struct tracer *t, struct ttask *k, int64_t rv, bool is_err)
{
	long nr = k->nr;
	const uint64_t *a = k->args;
	struct tsock *s;

	k->nr = -1;
	k->sfd = nr == SYS_accept || nr == SYS_accept4 || nr == SYS_socket ? (int)rv
	         : nr == SYS_splice && k->sp_dir == TRACE_SEND ? (int)a[2] : (int)a[0];
	if (nr == SYS_socket) {
		if (!is_err && rv >= 0 && (s = fd_new_sock(t, k, (int)rv, ((int)a[1] & 0xf) == SOCK_STREAM)) != NULL) {
			s->pid = k->g->tgid;
			watch_fd(t, k, (int)rv);
		}
		return;
	}
	if (nr == SYS_close || nr == SYS_close_range) {
		sock_sweep_later(t);
		return;
	}
	/* pidfd_getfd: a copy of another process's descriptor, as a socket received with SCM_RIGHTS */
	if (nr == SYS_dup || nr == SYS_dup2 || nr == SYS_dup3 || nr == SYS_fcntl || nr == SYS_pidfd_getfd) {
		if (!is_err && rv >= 0) {
			fd_forget(k, (int)rv);
			if (fd_sock(t, k, (int)rv) != NULL)  /* a socket under a new number */
				watch_fd(t, k, (int)rv);
		}
		if (k->oldstate == FD_SOCK)
			sock_sweep_later(t);
		return;
	}
	if (nr == SYS_accept || nr == SYS_accept4) {
		if (is_err || rv < 0)
			return;
		if (proc_fd_ino(k->tid, (int)rv) == 0)
			return;
		fd_forget(k, (int)rv);
		t->accepting = true;  /* no guess of its role needed */
		s = fd_sock(t, k, (int)rv);
		t->accepting = false;
		if (s == NULL || !s->tcp)
			return;
		watch_fd(t, k, (int)rv);
		if (k->gone)
			return;
		s->server = true;
		sock_open_tcp(t, k, s);
		return;
	}
	if (nr == SYS_connect || nr == SYS_bind) {
		if (is_err && !(nr == SYS_connect && rv == -EINPROGRESS))
			return;
		if ((s = fd_sock(t, k, (int)a[0])) == NULL) {
			/* a socket from before we looked: known now that it has an address */
			fd_forget(k, (int)a[0]);
			if ((s = fd_sock(t, k, (int)a[0])) == NULL)
				return;
		}
		if (nr == SYS_bind) {
			if (k->have_addr) {
				s->local = k->addr;
				s->have_local = true;
			}
			return;
		}
		if (!k->have_addr) {  /* AF_UNSPEC: a UDP socket dissolves its association */
			s->have_remote = false;
			return;
		}
		struct sockaddr_storage unbound = { 0 };
		s->remote = k->addr;
		trace_addr_unmap(&s->remote);
		trace_addr_any_peer(&s->remote, s->have_local ? &s->local : &unbound);
		s->have_remote = true;
		s->server = false;
		s->have_local = false;  /* the kernel picked it now */
		sock_learn(t, k, s);
		if (s->tcp && rv == 0)
			sock_open_tcp(t, k, s);
		return;
	}
	if (k->fds_in) {
		if (!is_err && rv >= 0)
			exit_fds_in(t, k, a[1], nr == SYS_recvmmsg ? (size_t)rv : 1);
		return;
	}
	if ((k->ino == 0 || (s = sock_find(t, k->ino)) == NULL) && (s = fd_sock(t, k, (int)a[0])) == NULL)
		return;
	if (nr == SYS_sendfile) {
		if (!is_err && rv > 0)
			exit_sendfile(t, k, s, (int)a[1], (size_t)rv);
		return;
	}
	if (nr == SYS_splice) {
		if (!is_err && rv > 0)
			sock_lost(t, k, s, k->sp_dir, (size_t)rv, "splice(2)");
		return;
	}
	if (nr == SYS_shutdown) {
		if (!is_err && (a[1] == SHUT_WR || a[1] == SHUT_RDWR))
			sock_fin(t, k, s, TRACE_SEND);
		return;
	}
	if (is_err || rv < 0)
		return;

	bool send = nr == SYS_write || nr == SYS_writev || nr == SYS_pwritev2 || nr == SYS_sendto || nr == SYS_sendmsg ||
	            nr == SYS_sendmmsg
#ifdef SYS_send
	            || nr == SYS_send
#endif
	    ;
	enum trace_dir dir = send ? TRACE_SEND : TRACE_RECV;
	size_t n = (size_t)rv;

	if (nr == SYS_read || nr == SYS_write || nr == SYS_sendto || nr == SYS_recvfrom
#ifdef SYS_send
	    || nr == SYS_send
#endif
#ifdef SYS_recv
	    || nr == SYS_recv
#endif
	) {
		struct sockaddr_storage peer;
		bool have_peer = false;
		bool is_msgcall = nr == SYS_sendto || nr == SYS_recvfrom;

		if (!send && is_msgcall && (a[3] & TRACE_NOT_DATA))
			return;
		if (n > a[2])
			n = a[2];  /* MSG_TRUNC: the datagram was longer than the buffer */
		if (!send && n == 0 && s->tcp) {
			if (a[2] > 0)
				sock_fin(t, k, s, TRACE_RECV);
			return;
		}
		if (!send && is_msgcall && s->tcp && (a[3] & MSG_TRUNC)) {
			sock_lost(t, k, s, dir, n, "MSG_TRUNC");  /* TCP: thrown away unread, the buffer untouched */
			return;
		}
		if (nr == SYS_sendto && k->have_addr) {
			peer = k->addr;
			have_peer = true;
			if (s->tcp && !s->have_remote) {
				s->remote = peer;
				s->have_remote = true;
			}
		} else if (nr == SYS_recvfrom) {
			have_peer = exit_peer(k, a[4], a[5], &peer);
		}
		exit_bytes(t, k, s, dir, have_peer ? &peer : NULL, a[1], false, 0, n);
		return;
	}
	if (nr == SYS_readv || nr == SYS_writev || nr == SYS_preadv2 || nr == SYS_pwritev2) {
		if (!send && n == 0 && s->tcp) {
			sock_fin(t, k, s, TRACE_RECV);
			return;
		}
		exit_bytes(t, k, s, dir, NULL, a[1], true, a[2], n);
		return;
	}
	if (nr == SYS_sendmsg || nr == SYS_recvmsg) {
		if (!send && (a[2] & TRACE_NOT_DATA))
			return;
		if (!send && n == 0 && s->tcp) {
			sock_fin(t, k, s, TRACE_RECV);
			return;
		}
		if (!send && s->tcp && (a[2] & MSG_TRUNC)) {
			sock_lost(t, k, s, dir, n, "MSG_TRUNC");
			return;
		}
		exit_msghdr(t, k, s, a[1], n, dir);
		return;
	}
	if (nr == SYS_sendmmsg || nr == SYS_recvmmsg) {
		if (!send && (a[3] & TRACE_NOT_DATA))
			return;
		for (size_t i = 0; i < n && i < 1024; i++) {
			struct mmsghdr mm;
			uint64_t at = a[1] + i * sizeof mm;
			if (mem_read(k->tid, at, &mm, sizeof mm) != sizeof mm)
				break;
			exit_msghdr(t, k, s, at, mm.msg_len, dir);
		}
		return;
	}
}

/* ---- the loop ---- */

static void
task_resume(struct tracer *t, struct ttask *k, int sig)
{
	int req = t->attached || k->want_exit ? PTRACE_SYSCALL : PTRACE_CONT;

	if (sig == 0 && k->pending_sig) {
		sig = k->pending_sig;
		k->pending_sig = 0;
	}
	ptrace(req, k->tid, 0, sig);
}

static void
on_syscall_stop(struct tracer *t, struct ttask *k)
{
	struct __ptrace_syscall_info si;

	memset(&si, 0, sizeof si);
	if (ptrace(PTRACE_GET_SYSCALL_INFO, k->tid, sizeof si, &si) <= 0) {
		k->want_exit = false;
		return;
	}
	if (si.op == PTRACE_SYSCALL_INFO_SECCOMP || si.op == PTRACE_SYSCALL_INFO_ENTRY) {
		if (si.arch != TRACE_AUDIT_ARCH) {
			on_compat_call(t, k, (long)(si.op == PTRACE_SYSCALL_INFO_SECCOMP ? si.seccomp.nr : si.entry.nr));
			k->want_exit = false;
			k->nr = -1;
			return;
		}
	}
	if (si.op == PTRACE_SYSCALL_INFO_SECCOMP) {
		on_entry(t, k, (long)si.seccomp.nr, si.seccomp.args);
	} else if (si.op == PTRACE_SYSCALL_INFO_ENTRY) {
		on_entry(t, k, (long)si.entry.nr, si.entry.args);
	} else if (si.op == PTRACE_SYSCALL_INFO_EXIT) {
		peer_restore(k);
		if (k->nr >= 0 && k->want_exit)
			on_exit_call(t, k, si.exit.rval, si.exit.is_error != 0);
		k->want_exit = false;
		k->nr = -1;
	}
}

static void
on_task_gone(struct tracer *t, struct ttask *k, int status)
{
	bool last = k->g->threads <= 1;

	if (k->tid == t->main) {
		t->main_done = true;
		if (WIFEXITED(status))
			t->status = WEXITSTATUS(status);
		else if (WIFSIGNALED(status))
			t->status = 128 + WTERMSIG(status);
	}
	task_free(t, k);
	if (last)
		sock_sweep(t, "process exited");
}

/*
 * The next event of a tracee: its pid and *status; 0 when there was none
 * before a signal or a second; -1 with ECHILD when no tracee is left.
 *
 * SIGCHLD and the caller's stop signals are blocked, and taken only here,
 * by sigtimedwait(), which looks for them and sleeps in one step: one that
 * comes just before waits, pending, and ends the sleep at once. (With a
 * handler that set a flag the loop read before a blocking waitpid(), a ^C
 * that came between the read and the call waited for a tracee's next stop;
 * after --pid of an idle process, for ever.) The kernel sends the tracer
 * SIGCHLD at each stop and exit of a tracee, one pending at a time, so
 * waitpid() is asked until it has nothing before each sleep; a leader with
 * exit signal 0 (a clone without one) may go with none at all, hence the
 * second. Tracees that always have a stop ready never let it sleep: it
 * looks for a signal every 64 events too, so a ^C is not kept waiting.
 */
static pid_t
trace_wait(struct tracer *t, int *status, const sigset_t *set)
{
	static const struct timespec patience = { .tv_sec = 1 }, now = { 0 };
	pid_t pid = waitpid(-1, status, __WALL | WNOHANG);
	int sig;

	if (pid == 0 || ++t->unlooked >= 64) {
		struct timespec wait = patience;
		if (pid == 0 && t->sweep_closes > 0) {  /* sleep no later than the sweep is due */
			double left = t->sweep_since + SWEEP_DELAY - mono_now();
			if (left <= 0) {
				sock_sweep(t, "closed");
				return 0;
			}
			wait = (struct timespec){ .tv_nsec = (long)(left * 1e9) };
		}
		t->unlooked = 0;
		sig = sigtimedwait(set, NULL, pid == 0 ? &wait : &now);
		if (sig > 0 && sig != SIGCHLD)
			trace_signal(t, sig);
	}
	return pid;
}

static void
begin_detach(struct tracer *t)
{
	t->detaching = true;
	for (struct ttask *k = t->tasks; k; k = k->next)
		ptrace(PTRACE_INTERRUPT, k->tid, 0, 0);
}

int
trace_run(struct tracer *t, const sigset_t *stops)
{
	struct sigaction dfl = { .sa_handler = SIG_DFL }, oldsa;
	sigset_t set = *stops, oldmask;
	int status;

	/* SIG_IGN, which a parent may leave us, would send no SIGCHLD and reap exits unseen */
	sigemptyset(&dfl.sa_mask);
	sigaction(SIGCHLD, &dfl, &oldsa);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_BLOCK, &set, &oldmask);
	while (t->tasks) {
		pid_t pid;
		struct ttask *k;

		if (t->attached && t->stop_sig && !t->detaching)
			begin_detach(t);
		if (!t->attached && t->stop_sig) {
			for (struct tgroup *g = t->groups; g; g = g->next)
				kill(g->tgid, t->stop_sig);
			t->stop_sig = 0;
		}
		if ((pid = trace_wait(t, &status, &set)) == 0)
			continue;
		if (pid < 0) {
			if (errno == EINTR)
				continue;
			break;  /* ECHILD: nothing left */
		}
		k = task_find(t, pid);
		if (WIFEXITED(status) || WIFSIGNALED(status)) {
			if (k)
				on_task_gone(t, k, status);
			continue;
		}
		if (!WIFSTOPPED(status))
			continue;
		if (k == NULL)
			k = task_new(t, pid);  /* a new child reported before its parent's fork event */
		int sig = WSTOPSIG(status), ev = status >> 16;
		if (t->detaching) {
			if (sig == (SIGTRAP | 0x80))
				peer_restore(k);  /* at the exit of a call we changed */
			ptrace(PTRACE_DETACH, pid, 0, (ev == 0 && sig != (SIGTRAP | 0x80) && sig != SIGTRAP) ? sig : 0);
			task_free(t, k);
			continue;
		}
		if (sig == (SIGTRAP | 0x80) || ev == PTRACE_EVENT_SECCOMP) {
			on_syscall_stop(t, k);
			if (k->gone)  /* it died while it installed a filter */
				on_task_gone(t, k, k->gone_status);
			else
				task_resume(t, k, 0);
		} else if (ev == PTRACE_EVENT_FORK || ev == PTRACE_EVENT_VFORK || ev == PTRACE_EVENT_CLONE) {
			unsigned long child = 0;
			if (ptrace(PTRACE_GETEVENTMSG, pid, 0, &child) == 0 && child > 0) {
				struct ttask *c = task_find(t, (pid_t)child);
				if (c == NULL)
					c = task_new(t, (pid_t)child);
				group_inherit(c->g, k->g);  /* its filters are the parent's */
			}
			task_resume(t, k, 0);
		} else if (ev == PTRACE_EVENT_EXEC) {
			unsigned long former = 0;
			/* a thread that execs takes over the thread group id; its old id is gone */
			if (ptrace(PTRACE_GETEVENTMSG, pid, 0, &former) == 0 && (pid_t)former != pid) {
				struct ttask *old = task_find(t, (pid_t)former);
				if (old)
					task_free(t, old);
			}
			if ((k = task_find(t, pid)) == NULL)
				k = task_new(t, pid);
			k->want_exit = false;
			k->nr = -1;
			group_forget_fds(k->g);
			k->g->scratch = 0;  /* the new program has none of the old mappings (its filters stay) */
			proc_comm(k->g->tgid, k->g->comm, sizeof k->g->comm);
			if (pid == t->main)
				snprintf(t->main_comm, sizeof t->main_comm, "%s", k->g->comm);
			sock_sweep(t, "closed at exec");
			task_resume(t, k, 0);
		} else if (ev == PTRACE_EVENT_STOP) {
			if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
				ptrace(PTRACE_LISTEN, pid, 0, 0);  /* a real group stop: stay stopped */
			else
				task_resume(t, k, 0);
		} else if (ev != 0) {
			task_resume(t, k, 0);
		} else {
			task_resume(t, k, sig == SIGTRAP ? 0 : sig);  /* signal delivery: pass it on */
		}
	}
	sigprocmask(SIG_SETMASK, &oldmask, NULL);
	sigaction(SIGCHLD, &oldsa, NULL);
	sock_sweep(t, t->detaching ? "trace detached" : "process exited");
	/* the exec never happened: say why */
	if (t->errpipe >= 0) {
		int msg[2];
		if (read(t->errpipe, msg, sizeof msg) == (ssize_t)sizeof msg) {
			if (msg[0] == 1)
				fprintf(stderr, "capctl: seccomp unavailable: cannot install the filter: %s\n", strerror(msg[1]));
			else
				fprintf(stderr, "capctl: cannot run %s: %s\n", t->argv0 ? t->argv0 : "command", strerror(msg[1]));
		}
	}
	return t->detaching && !t->main_done ? 0 : t->status;
}

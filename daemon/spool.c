/*
 * The capture spool: rotating pcapng files written by one writer thread.
 *
 * The event loops only append records to a queue: under a mutex a producer
 * only claims room (the writer, too, holds it just long enough to move
 * pointers), then copies its record outside it and marks it ready, so
 * producers on several threads copy side by side; a relay may instead read
 * into a claimed slot (spool_flow_reserve). The writer turns records into
 * synthetic packets (spool-synth.c), encodes pcapng blocks (pcapng.c) into
 * a userspace buffer (large payloads stay in the queue and are spliced in
 * by writev(2)) and writes whole blocks at least every half flush
 * interval; old files are freed by a reaper thread. A full queue drops data
 * records (the flow remembers the gap so sequence numbers stay right); a
 * failing disk drops encoded blocks, truncates the file back to its last
 * whole block and retries every second; a kill -9 mid-write is cleaned up by
 * the tail guard process. Either way the relay never waits for the disk.
 *
 * Threads: spool_start/stop/reconfigure run on the main loop thread; the
 * flow calls may run on any thread at once (they claim room under the queue
 * mutex, and a flow is used by one thread at a time); everything named
 * writer_* runs on the writer thread only. The writer is woken at most once
 * per sleep: the producer that wakes it clears q.waiting.
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "capd.h"
#include "log.h"
#include "monotime.h"
#include "pcapng.h"
#include "spool-follow.h"
#include "spool-synth.h"
#include "xmalloc.h"

/* Queued data records beyond this are dropped. At 1 GB/s it holds 0.13 s of
 * the writer falling behind (a page-cache stall, a descheduled thread): 32 MiB
 * dropped capture in 2 of 6 capture-on bulk runs here, 128 MiB in none. The
 * memory is taken in chunks only while bytes wait. */
#define QUEUE_MAX (128u << 20)
#define CHUNK_SIZE ((1u << 20) + 4096) /* queue memory comes in chunks this big: 4 records of 256 KiB */
#define CHUNK_SPARE 8             /* empty chunks kept for reuse: no mmap/munmap churn under load */
#define WAKE_BYTES (1u << 20)     /* data queued before the writer is woken early */
#define OUT_MAX (256u << 10)      /* bytes buffered between writes (also what a failed write loses) */
#define EXT_MIN 2048              /* payloads this big are written from the queue, not copied */
#define RETRY_SECS 1.0            /* after a write error */
#define RETRY_PROBE (64 * 1024)   /* bytes of room a retry on a full disk asks for (writer_retry_probe) */
#define SYNC_POLL_SECS 0.001      /* a sync mark behind a record being filled: the writer looks again this soon */
#define KEYLOG_KEEP (256u << 10)  /* recent key log lines repeated at the head of each file */
#define EPB_ROOM 192              /* an EPB's bytes beyond its payload and comment, at most (headers, options, a cut datagram's note) */
#define SYNTH_CTL_PKTS 4          /* packets of a flow's open, FIN or close, at most */
#define WRITER_NICE (-5)          /* writer_prioritize */

enum rec_type {
	REC_IFACE_ADD,    /* payload: name NUL description NUL */
	REC_IFACE_REMOVE,
	REC_OPEN,         /* payload: struct rec_open, then the comment */
	REC_DATA,         /* payload: stream bytes or one datagram */
	REC_FIN,
	REC_CLOSE,
	REC_PACKET,       /* payload: caplen bytes of a sniffed packet */
	REC_KEYLOG,       /* payload: one key log line, no newline */
	REC_SYNC,         /* capture.sync's mark: aux is its number (spool_sync) */
};

#define REC_SUMS 17 /* segments of a 1 MiB slot (relay.c, RELAY_BULK): payload sums the producer computed */

/* One queued record; the payload follows, the whole padded to 8 bytes. */
struct rec {
	uint8_t ready;         /* set last, with release order, once the producer has copied it all */
	uint8_t type;
	uint8_t dir;
	uint8_t flag;          /* REC_CLOSE: enum synth_end; REC_IFACE_ADD: tsnano; REC_DATA: sum[] is set */
	int32_t iface;
	uint32_t len;          /* the whole record */
	uint32_t n;            /* payload bytes */
	uint32_t aux;          /* REC_PACKET: origlen; REC_IFACE_ADD: linktype; REC_SYNC: its number */
	uint32_t aux2;         /* REC_IFACE_ADD: snaplen */
	uint64_t gap[2];       /* flow bytes dropped before this record, per direction;
	                        * REC_IFACE_ADD: gap[0] is the handle's use (liface.use) */
	struct timespec ts;
	struct spool_flow *flow;
	uint16_t sum[REC_SUMS]; /* REC_DATA from a slot: each segment's payload sum (synth_data_summed) */
};

struct rec_open {
	struct sockaddr_storage client, target;
	uint64_t session;
	int proto;
	bool inbound;  /* the target opened the connection (spool_flow_open_inbound) */
};

/*
 * A capture flow. The loop side belongs to the caller of spool_flow_*();
 * the writer side to the writer thread, which frees the whole struct when
 * it handles the flow's REC_CLOSE (or spool_flow_close() does, when the
 * spool is not running).
 */
struct spool_flow {
	uint64_t gap[2];       /* loop: bytes dropped and not yet told to the writer */
	unsigned gen;          /* loop: the spool run it belongs to */
	int proto;
	size_t mss;            /* TCP segment size of its synthetic packets (synth_mss) */
	_Alignas(64) struct synth_flow sf;  /* writer, on its own cache line */
	bool ready;            /* writer: sf is set up */
	int iface;
	char *comment;         /* writer: "capd session N ..." */
};

/* A piece of queue memory: records live in data[rpos, wpos). */
struct chunk {
	struct chunk *next;
	size_t size, rpos, wpos;
	uint8_t data[];
};

/* Shared between the loop and the writer, under q.mu. */
static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;      /* wakes the writer */
	pthread_cond_t done_cv; /* wakes spool_rotate() (the unit tests' wait) */
	struct chunk *head, *tail, *spare;
	unsigned nspare;
	size_t queued;          /* bytes of data records in the queue (bounded) */
	size_t backlog;         /* bytes of all records in the queue */
	bool waiting;           /* the writer sleeps on cv and nobody has woken it yet */
	bool stop;
	unsigned rotate_req, rotate_done;
	uint64_t rotate_size;
	double rotate_time, flush_interval;
	unsigned keep_files;
	char path[PATH_MAX];    /* current file, "" when none */
	int err;                /* with no current file: why, for spool_rotate() */
	int fail_err;           /* the writer is dropping capture for this errno; 0: writing */
} q = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.done_cv = PTHREAD_COND_INITIALIZER,
};

static atomic_bool running;
static atomic_uint gen = 1;
static atomic_bool dropping;     /* in a queue-full episode (logged once) */
static _Atomic uint64_t episode_base;  /* dropped packets when the episode began */
static _Atomic uint64_t st_bytes, st_packets, st_dropped_packets, st_dropped_bytes;
static atomic_uint st_files;
static atomic_uint sync_marks;   /* REC_SYNC queued and not yet reached by the writer */
static unsigned sync_seq;        /* the last mark's number (loop thread) */
static pthread_t writer_thread;
static char *spool_dir;

/* Writer-side view of an interface; kept after removal while its flows send (packets may outlive
 * removal), then taken by a new interface (writer_release_removed, spool_iface_new). */
struct wiface {
	bool known, removed;
	struct pcapng_idb idb;
	char *name, *desc, *filter;
	bool stats;            /* a sniffer's: an ISB closes each file it is in */
	uint64_t taken;        /* ... its packets taken from the queue so far, written or not */
	int fidx;              /* IDB index in the current file, -1 when not written there */
	uint64_t out_packets;  /* its packets in w.out (a failed write drops them) */
	int flows;             /* its flows opened and not closed yet (REC_OPEN, REC_CLOSE) */
	uint64_t use;          /* which interface of its handle this is (liface.use) */
};

/* The writer thread's state. */
static struct writer {
	int dirfd;
	int fd;                /* current file, -1 when none */
	char name[96];
	unsigned counter;      /* number of the next file */
	uint64_t good;         /* bytes of the file written, whole blocks only */
	uint64_t file_packets; /* packets put in the current file (written or buffered) */
	double opened;         /* monotonic time the file was opened */
	bool rotate_due;       /* rotate_size or rotate_time reached: a new file before the next packet */
	struct buf out;        /* encoded blocks not written yet */
	/*
	 * Payloads left in queue memory, to go into out at offset at: large
	 * packets reach the file by writev() without a copy. Valid only
	 * until the batch they came in is released, so the writer flushes
	 * before that.
	 */
	struct ext { size_t at; const void *p; size_t len; } *ext;
	size_t next, aext, ext_bytes;
	bool ext_ok;           /* packet data now points into the queue */
	struct iovec *iov;
	size_t aiov;
	uint64_t out_packets, out_payload;
	int *touched;          /* handles with packets in w.out (wiface.out_packets) */
	int ntouched, atouched;
	bool failing;          /* a write failed: drop until retry_at */
	bool episode;          /* failing since the last good write (logged once) */
	int err;               /* errno of the last failure */
	double retry_at;
	double probe_at;       /* writer_retry_probe again at this time (0: not) */
	uint64_t probe_end;    /* the file's space runs to here, past its end, after a probe (0: no probe) */
	uint64_t freed_mark;   /* writer_free_mark() before the last deletion for space (0: none pending) */
	bool freed_none;       /* ... which freed nothing so far (logged once) */
	struct wiface *ifaces;
	int nifaces;
	int *idbs;             /* handles in the current file's IDB order; -1: one given to a new interface since */
	int nidb, nidb_good, aidb;
	uint64_t isb_room;     /* bytes the ISBs closing the file will take (rotate_size keeps room) */
	struct buf keys;       /* recent key log lines, repeated at each new file */
	struct buf keys_new;   /* lines for the next DSB */
	bool keys_out;         /* a DSB is in the buffer not yet written */
	bool keys_owed;        /* ... it was lost, the file goes on: keys go out again */
	uint64_t sync_lost;    /* packets it dropped since the last sync mark (writer_sync) */
	char os[160];
	/* the record being turned into packets */
	const struct rec *cur;
	uint64_t session;
	/* settings copied under q.mu */
	uint64_t rotate_size;
	double rotate_time, flush_interval;
	unsigned keep_files;
	uint64_t fsize_max;    /* capd's file-size limit as of the last file opened; 0: none */
	bool folder_busy;      /* the spool path names another capd's folder (logged once) */
	dev_t home_dev;        /* the folder capd started with, which capd_lock_dir() holds */
	ino_t home_ino;
} w = { .dirfd = -1, .fd = -1 };

static void
spool_settings(const struct capd_settings *st)
{
	q.rotate_size = st->rotate_size;
	q.rotate_time = st->rotate_time > 0 ? st->rotate_time : 0;
	q.flush_interval = st->flush_interval > 0 ? st->flush_interval : 1.0;
	q.keep_files = st->keep_files;
}

/* ---- the queue (any thread) ---- */

static struct chunk *
chunk_get(size_t need)
{
	struct chunk *c;

	if (need <= CHUNK_SIZE && q.spare != NULL) {
		c = q.spare;
		q.spare = c->next;
		q.nspare--;
	} else {
		size_t size = need > CHUNK_SIZE ? need : CHUNK_SIZE;

		c = xmalloc(sizeof *c + size);
		c->size = size;
	}
	c->next = NULL;
	c->rpos = c->wpos = 0;
	return c;
}

/* Wakes the writer if it sleeps; once per sleep. (Called under q.mu.) */
static void
queue_wake(void)
{
	if (q.waiting) {
		q.waiting = false;
		pthread_cond_signal(&q.cv);
	}
}

/*
 * Claims len bytes of queue for a record; NULL when a data record finds
 * the queue at QUEUE_MAX (control records always go in, they are small and
 * their number is bounded by sessions and interfaces). The record's ready
 * byte is cleared under q.mu (chunks are reused): the writer reads nothing
 * from it until queue_publish(). *low: the queue is below half full (a drop
 * episode may end); *wake: this producer owes the writer its wake-up.
 * *stamp (unless NULL) gets the time, read under q.mu: the writer takes
 * records in the order they were claimed, so the packets it makes of them
 * keep their interface's time order even when sessions on several threads
 * queue side by side (stamped before the claim, a thread held up between the
 * two put its packet after a later one: 78 times in 140,000 packets of 16
 * sessions on 4 workers).
 */
static struct rec *
queue_claim(size_t len, bool data, bool *low, bool *wake, struct timespec *stamp)
{
	struct chunk *t;
	struct rec *dst;

	*wake = false;
	pthread_mutex_lock(&q.mu);
	if (data && q.queued + len > QUEUE_MAX) {
		pthread_mutex_unlock(&q.mu);
		return NULL;
	}
	if (stamp != NULL)
		clock_gettime(CLOCK_REALTIME, stamp);
	t = q.tail;
	if (t == NULL || t->size - t->wpos < len) {
		t = chunk_get(len);
		if (q.tail != NULL)
			q.tail->next = t;
		else
			q.head = t;
		q.tail = t;
	}
	dst = (struct rec *)(t->data + t->wpos);
	__atomic_store_n(&dst->ready, 0, __ATOMIC_RELAXED);
	t->wpos += len;
	if (data)
		q.queued += len;
	q.backlog += len;
	/*
	 * The writer is woken only for a backlog: one futex call per MiB
	 * instead of one per record. It polls every half flush interval for
	 * the rest, which is all the latency the flush interval allows.
	 * Claiming the wake here (q.waiting) and signalling once the record
	 * is ready keeps the writer from waking to a record it cannot read.
	 */
	if (q.waiting && q.backlog >= WAKE_BYTES) {
		q.waiting = false;
		*wake = true;
	}
	*low = q.queued < QUEUE_MAX / 2;
	pthread_mutex_unlock(&q.mu);
	return dst;
}

/* Fills in a claimed record's header, all but ready, which the writer may be reading. */
static void
queue_header(struct rec *dst, const struct rec *r)
{
	_Static_assert(offsetof(struct rec, ready) == 0, "ready comes first");
	memcpy((uint8_t *)dst + 1, (const uint8_t *)r + 1, sizeof *r - 1);
}

/* Hands a claimed record, filled in, to the writer. */
static void
queue_publish(struct rec *dst, bool wake)
{
	__atomic_store_n(&dst->ready, 1, __ATOMIC_RELEASE);
	if (wake)
		pthread_cond_signal(&q.cv);  /* the writer waits with q.mu released: no wake is lost */
}

/*
 * Appends a record with its payload (two pieces), copied outside q.mu, so
 * producers on several threads copy side by side. Returns -1 when refused
 * (queue full), 1 when the queue is below half full, else 0.
 */
static int
queue_put(struct rec *r, const void *p1, size_t n1, const void *p2, size_t n2, bool data)
{
	size_t len = (sizeof *r + n1 + n2 + 7) & ~(size_t)7;
	struct rec *dst;
	bool low, wake;

	r->len = (uint32_t)len;
	r->n = (uint32_t)(n1 + n2);
	r->ready = 0;
	/* a sniffed packet keeps the time libpcap gave it */
	if ((dst = queue_claim(len, data, &low, &wake, r->type == REC_PACKET ? NULL : &r->ts)) == NULL)
		return -1;
	queue_header(dst, r);
	if (n1 > 0)
		memcpy((uint8_t *)dst + sizeof *r, p1, n1);
	if (n2 > 0)
		memcpy((uint8_t *)dst + sizeof *r + n1, p2, n2);
	queue_publish(dst, wake);
	return low;
}

static void
rec_init(struct rec *r, int type, struct spool_flow *f)
{
	memset(r, 0, sizeof *r);
	r->type = (uint8_t)type;
	r->flow = f;
	/* r->ts: queue_claim's time, or a sniffed packet's own */
	if (f != NULL) {
		r->gap[0] = f->gap[0];
		r->gap[1] = f->gap[1];
	}
}

/*
 * After a record went in (put: what queue_put returned): the gaps it
 * carries are told, and a drop episode ends once the queue is down to half,
 * so a queue hovering at full logs once, not once per record.
 */
static void
flow_sent(struct spool_flow *f, int put)
{
	if (f != NULL)
		f->gap[0] = f->gap[1] = 0;
	if (put > 0 && atomic_load_explicit(&dropping, memory_order_relaxed) && atomic_exchange(&dropping, false)) {
		unsigned long long n = atomic_load(&st_dropped_packets) - episode_base;

		log_info("spool: capture queue has room again after dropping %llu packet%s", n, n == 1 ? "" : "s");
	}
}

static void
spool_drop(uint64_t packets, uint64_t bytes)
{
	if (!atomic_load_explicit(&dropping, memory_order_relaxed) && !atomic_exchange(&dropping, true)) {
		episode_base = atomic_load(&st_dropped_packets);
		log_warnx("spool: capture queue full (%u MiB), dropping capture until the writer catches up",
		          QUEUE_MAX >> 20);
	}
	atomic_fetch_add_explicit(&st_dropped_packets, packets, memory_order_relaxed);
	atomic_fetch_add_explicit(&st_dropped_bytes, bytes, memory_order_relaxed);
}

static bool
flow_live(const struct spool_flow *f)
{
	return f != NULL && atomic_load_explicit(&running, memory_order_relaxed) &&
	       f->gen == atomic_load_explicit(&gen, memory_order_relaxed);
}

/* ---- the files (writer thread) ---- */

static void spool_mkdirs(const char *path);

static bool
spool_name_parse(const char *name, unsigned *counter)
{
	size_t n = strlen(name);
	unsigned c;
	int end = 0;

	if (n < 13 || strncmp(name, "capd-", 5) != 0 || strcmp(name + n - 7, ".pcapng") != 0)
		return false;
	if (sscanf(name, "capd-%u-%n", &c, &end) != 1 || end == 0)
		return false;
	*counter = c;
	return true;
}

struct spool_file {
	unsigned counter;
	char name[256];
};

static int
spool_file_cmp(const void *a, const void *b)
{
	const struct spool_file *x = a, *y = b;

	return x->counter < y->counter ? -1 : x->counter > y->counter;
}

/* Our files in the folder, oldest first; the caller frees. */
static struct spool_file *
spool_list(int dirfd, size_t *np)
{
	struct spool_file *v = NULL;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *d;
	int fd = dup(dirfd);

	*np = 0;
	if (fd < 0)
		return NULL;
	if ((d = fdopendir(fd)) == NULL) {
		close(fd);
		return NULL;
	}
	rewinddir(d);
	while ((de = readdir(d)) != NULL) {
		unsigned c;

		if (!spool_name_parse(de->d_name, &c) || strlen(de->d_name) >= sizeof v->name)
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			v = xrealloc(v, cap * sizeof *v);
		}
		v[n].counter = c;
		strcpy(v[n].name, de->d_name);
		n++;
	}
	closedir(d);
	if (n > 0)
		qsort(v, n, sizeof *v, spool_file_cmp);
	*np = n;
	return v;
}

/*
 * The reaper: a thread that closes the last descriptor of deleted files.
 * Unlinking a file whose pages are cached frees them all right there, 30 ms
 * for 256 MiB here, long enough for the queue to fill at a few hundred MB/s
 * and capture to be dropped at every rotation. The writer opens the old
 * file, unlinks its name and hands the descriptor over; the freeing
 * happens at the reaper's close().
 */
static int reap_fd = -1;         /* write end of the reaper's pipe; -1: no reaper, delete in place */
static pthread_t reap_thread;

/*
 * SCHED_BATCH for the writer and the reaper: a session thread wakes them
 * (a MiB queued, a file to free), and a woken normal thread may preempt the
 * one that woke it while the other core sits idle. A bulk tunnel with
 * capture left 12-18 % of two cores idle that way; as batch threads, which
 * never preempt on wake-up, 8-13 %, and the tunnel moved 4-13 % more. Over
 * time a batch thread still gets its weight's share (nice -5 for the
 * writer), so the capture keeps up. Lowering the policy needs no privilege.
 */
static void
thread_batch(const char *who)
{
	struct sched_param sp = { .sched_priority = 0 };
	int err = pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);

	if (err != 0)
		log_debug("spool: %s stays a normal thread (%s)", who, strerror(err));
}

static void *
reaper_main(void *arg)
{
	int rfd = (int)(intptr_t)arg, fd;
	ssize_t r;

	pthread_setname_np(pthread_self(), "capd-reaper");
	thread_batch("reaper");
	while ((r = read(rfd, &fd, sizeof fd)) == (ssize_t)sizeof fd || (r < 0 && errno == EINTR))
		if (r > 0)
			close(fd);
	close(rfd);
	return NULL;
}

static void
reaper_start(void)
{
	int p[2];

	if (pipe2(p, O_CLOEXEC) < 0)
		return;
	if (pthread_create(&reap_thread, NULL, reaper_main, (void *)(intptr_t)p[0]) != 0) {
		close(p[0]);
		close(p[1]);
		return;
	}
	fcntl(p[1], F_SETFL, O_NONBLOCK);  /* a full pipe: the writer closes in place */
	reap_fd = p[1];
}

/* After the writer has stopped: the reaper closes what it was handed, then ends. */
static void
reaper_stop(void)
{
	if (reap_fd < 0)
		return;
	close(reap_fd);
	reap_fd = -1;
	pthread_join(reap_thread, NULL);
}

/* Deletes the oldest files until keep are left (SIZE_MAX: none) and counts what is left. */
static void
writer_trim(size_t keep)
{
	size_t n, i = 0;
	struct spool_file *v = spool_list(w.dirfd, &n);

	for (; n - i > keep; i++) {
		int fd = -1;

		/* failing writes (a full disk?) want the space now: the caller creates a file next */
		if (reap_fd >= 0 && !w.episode)
			fd = openat(w.dirfd, v[i].name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
		if (unlinkat(w.dirfd, v[i].name, 0) < 0 && errno != ENOENT)
			log_warn("spool: delete %s/%s", spool_dir, v[i].name);
		if (fd >= 0 && write(reap_fd, &fd, sizeof fd) != (ssize_t)sizeof fd)
			close(fd);
	}
	atomic_store(&st_files, (unsigned)(n - i));
	free(v);
}

/* The current file for capture status; NULL: none, for the reason in w.err. */
static void
writer_set_path(const char *name)
{
	pthread_mutex_lock(&q.mu);
	if (name != NULL)
		snprintf(q.path, sizeof q.path, "%s/%s", spool_dir, name);
	else
		q.path[0] = '\0';
	q.err = name != NULL ? 0 : w.err;
	pthread_mutex_unlock(&q.mu);
}

static void
writer_count_drop(uint64_t packets, uint64_t bytes)
{
	atomic_fetch_add_explicit(&st_dropped_packets, packets, memory_order_relaxed);
	atomic_fetch_add_explicit(&st_dropped_bytes, bytes, memory_order_relaxed);
	w.sync_lost += packets;
}

static void spool_iface_drop(int iface, uint64_t packets);

/* The buffered packets are lost: each interface's share is counted too. */
static void
writer_count_drop_out(void)
{
	writer_count_drop(w.out_packets, w.out_payload);
	for (int i = 0; i < w.ntouched; i++)
		spool_iface_drop(w.touched[i], w.ifaces[w.touched[i]].out_packets);
}

/* For capture status: why the writer drops capture now (0: it writes). Not per write: at failures and recovery. */
static void
writer_set_failing(int err)
{
	pthread_mutex_lock(&q.mu);
	q.fail_err = err;
	pthread_mutex_unlock(&q.mu);
}

static void
writer_fail(const char *what, int err)
{
	if (!w.episode) {
		log_warnx("spool: %s %s/%s: %s; dropping capture, retrying every second", what, spool_dir,
		          w.name[0] ? w.name : "(none)", strerror(err));
		w.episode = true;
	}
	w.err = err;
	w.failing = true;
	w.retry_at = mono_now() + RETRY_SECS;
	writer_set_failing(err);
}

/*
 * The tail guard: a small helper process that outlives a kill -9. A write
 * interrupted by SIGKILL stops at a page boundary and would leave half a
 * block at the end of the file, which readers report as cut short. Before
 * each write the writer notes where the file's last whole block ends and
 * where the write will end, in a page shared with the guard (no syscall,
 * no wake-up: the guard sleeps in read() on a pipe nobody writes); when
 * capd is gone (the pipe reads EOF, so no thread of it can still be
 * writing) and the file stopped in between, the guard cuts it back to the
 * whole block. spool_start() repairs the same at the next start if the
 * guard was killed too. The pipe carries one message: when capd gives up
 * root, the guard becomes its user too (spool_guard_user).
 */
struct guard_msg {
	uint64_t from, to;   /* the write in flight: [from, to) */
	char name[96];       /* the file, in the spool folder */
};

/* The page shared with the guard. A note is written to the slot not in use, then published. */
struct guard_shared {
	_Atomic unsigned cur;      /* 0: no note yet; else 1 + the slot holding the last note */
	struct guard_msg slot[2];  /* a writer killed mid-note leaves the previous one whole */
};

/* 32-bit ABIs keep 16-bit ids in the plain calls; their 32-bit ones end in 32. */
#ifdef SYS_setresuid32
#define GUARD_SYS_SETGROUPS SYS_setgroups32
#define GUARD_SYS_SETRESGID SYS_setresgid32
#define GUARD_SYS_SETRESUID SYS_setresuid32
#else
#define GUARD_SYS_SETGROUPS SYS_setgroups
#define GUARD_SYS_SETRESGID SYS_setresgid
#define GUARD_SYS_SETRESUID SYS_setresuid
#endif

/* The one message on the guard's pipe: the user capd switches to. */
struct guard_user {
	uid_t uid;
	gid_t gid;
};

static int guard_fd = -1;   /* write end of the pipe (one guard_user at most); -1 without a guard */
static pid_t guard_pid = -1;
static struct guard_shared *guard_shm;  /* MAP_SHARED with the guard; NULL without one */

/* The guard process: only async-signal-safe calls, it is a fork of a threaded program. */
static void __attribute__((noreturn))
guard_main(int rfd, int dirfd)
{
	struct guard_user u;
	struct guard_msg m;
	struct stat sb;
	unsigned cur;
	ssize_t r;
	int fd;

	/* Nothing of capd's but these two: no listener or socket stays open because of us. */
	if (dup2(rfd, 3) < 0 || dup2(dirfd, 4) < 0)
		_exit(1);
	close_range(5, ~0u, 0);
	/* Only EOF ends it: a terminal's ^C or a SIGTERM to the group is capd's business. */
	signal(SIGINT, SIG_IGN);
	signal(SIGTERM, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	/*
	 * Raw system calls for the switch: this process is the fork of a
	 * threaded one, and glibc's setresuid would signal threads it no
	 * longer has. A switch that fails leaves no guard running as root.
	 */
	while ((r = read(3, &u, sizeof u)) != 0) {
		if (r == (ssize_t)sizeof u) {
			if (syscall(GUARD_SYS_SETGROUPS, 1, &u.gid) < 0 ||
			    syscall(GUARD_SYS_SETRESGID, u.gid, u.gid, u.gid) < 0 ||
			    syscall(GUARD_SYS_SETRESUID, u.uid, u.uid, u.uid) < 0)
				_exit(1);
		} else if (r < 0 && errno != EINTR) {
			break;
		}
	}
	/* capd is gone: its last note is whole and no longer changes */
	cur = atomic_load_explicit(&guard_shm->cur, memory_order_acquire);
	if (cur == 1 || cur == 2)
		m = guard_shm->slot[cur - 1];
	/*
	 * The note comes from a writer that may have given up root when the
	 * guard did not (capd not switching users, or the guard started by
	 * a root capd that stays root): the guard only ever cuts a
	 * capd-*.pcapng that sits directly in the spool folder, is a regular
	 * file, not a link of either kind, so a subverted writer cannot point
	 * it anywhere else.
	 */
	size_t len = cur == 1 || cur == 2 ? strnlen(m.name, sizeof m.name) : 0;
	if (len > 12 && len < sizeof m.name && memchr(m.name, '/', len) == NULL &&
	    strncmp(m.name, "capd-", 5) == 0 && strcmp(m.name + len - 7, ".pcapng") == 0 &&
	    (fd = openat(4, m.name, O_WRONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)) >= 0) {
		if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_nlink == 1 &&
		    (uint64_t)sb.st_size > m.from && (uint64_t)sb.st_size != m.to)
			(void)!ftruncate(fd, (off_t)m.from);
		close(fd);
	}
	_exit(0);
}

static void
guard_start(int dirfd)
{
	int p[2];

	guard_shm = mmap(NULL, sizeof *guard_shm, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (guard_shm == MAP_FAILED) {
		log_warn("spool: shared page for the tail guard");
		guard_shm = NULL;
		return;
	}
	if (pipe2(p, O_CLOEXEC) < 0) {
		log_warn("spool: pipe for the tail guard");
		goto fail;
	}
	guard_pid = fork();
	if (guard_pid < 0) {
		log_warn("spool: fork the tail guard");
		close(p[0]);
		close(p[1]);
		goto fail;
	}
	if (guard_pid == 0)
		guard_main(p[0], dirfd);
	close(p[0]);
	guard_fd = p[1];
	return;
fail:
	munmap(guard_shm, sizeof *guard_shm);
	guard_shm = NULL;
}

static void
guard_stop(void)
{
	if (guard_fd >= 0)
		close(guard_fd);  /* EOF: the guard checks the last write (complete) and exits */
	guard_fd = -1;
	if (guard_pid > 0)
		waitpid(guard_pid, NULL, 0);
	guard_pid = -1;
	if (guard_shm != NULL)
		munmap(guard_shm, sizeof *guard_shm);
	guard_shm = NULL;
}

void
spool_guard_user(uid_t uid, gid_t gid)
{
	struct guard_user u = { .uid = uid, .gid = gid };

	if (guard_fd >= 0 && write(guard_fd, &u, sizeof u) != (ssize_t)sizeof u)
		log_warn("spool: the tail guard stays root");
}

/* Tells the guard about the write about to start. Writer thread. */
static void
guard_note(uint64_t from, uint64_t to)
{
	struct guard_msg *m;
	unsigned next;

	if (guard_shm == NULL)
		return;
	next = atomic_load_explicit(&guard_shm->cur, memory_order_relaxed) == 1 ? 2 : 1;
	m = &guard_shm->slot[next - 1];
	m->from = from;
	m->to = to;
	memcpy(m->name, w.name, sizeof m->name < sizeof w.name ? sizeof m->name : sizeof w.name);
	m->name[sizeof m->name - 1] = '\0';
	atomic_store_explicit(&guard_shm->cur, next, memory_order_release);
}

static size_t
writer_pending(void)
{
	return buf_used(&w.out) + w.ext_bytes;
}

static void
writer_out_reset(void)
{
	buf_reset(&w.out);
	w.keys_out = false;
	w.next = 0;
	w.ext_bytes = 0;
	w.out_packets = w.out_payload = 0;
	for (int i = 0; i < w.ntouched; i++)
		w.ifaces[w.touched[i]].out_packets = 0;
	w.ntouched = 0;
}

/*
 * Appends all of iov (the file is O_APPEND), however the kernel splits it;
 * -1 and errno on failure, *done the bytes that went in before it.
 */
static int
write_all(int fd, struct iovec *iov, size_t n, uint64_t *done)
{
	*done = 0;
	while (n > 0) {
		ssize_t r = writev(fd, iov, n > IOV_MAX ? IOV_MAX : (int)n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r == 0)
				errno = ENOSPC;
			return -1;
		}
		*done += (uint64_t)r;
		for (; n > 0 && (size_t)r >= iov->iov_len; iov++, n--)
			r -= (ssize_t)iov->iov_len;
		if (n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + r;
			iov->iov_len -= (size_t)r;
		}
	}
	return 0;
}

/* The pending output as iovecs: out's bytes with the queue payloads spliced in. */
static size_t
writer_iov(void)
{
	const uint8_t *base = buf_head(&w.out);
	size_t n = 0, at = 0;

	if (w.aiov < 2 * w.next + 1) {
		w.aiov = 2 * w.next + 1;
		w.iov = xrealloc(w.iov, w.aiov * sizeof *w.iov);
	}
	for (size_t i = 0; i < w.next; i++) {
		if (w.ext[i].at > at)
			w.iov[n++] = (struct iovec){ (void *)(base + at), w.ext[i].at - at };
		w.iov[n++] = (struct iovec){ (void *)w.ext[i].p, w.ext[i].len };
		at = w.ext[i].at;
	}
	if (buf_used(&w.out) > at)
		w.iov[n++] = (struct iovec){ (void *)(base + at), buf_used(&w.out) - at };
	return n;
}

/*
 * A failed write put done bytes of it at the file's end: cut them off. At
 * the end, not at w.good: a file someone cut short since we last looked is
 * smaller than w.good, and cutting there would grow it by a hole of zeros
 * (writer_check_unlinked deals with that file).
 */
static void
writer_cut_partial(uint64_t done)
{
	struct stat sb;

	if (done == 0)
		return;
	if (fstat(w.fd, &sb) < 0 || (uint64_t)sb.st_size < done ||
	    ftruncate(w.fd, sb.st_size - (off_t)done) < 0)
		log_warn("spool: truncate %s/%s", spool_dir, w.name);
}

/*
 * Writes the buffered blocks. On any error the file is cut back to its last
 * whole block and the buffer is counted as dropped.
 */
static void
writer_flush(void)
{
	size_t len = writer_pending(), n;
	uint64_t done;

	if (len == 0)
		return;
	if (w.fd < 0 || w.failing) {
		writer_count_drop_out();
		goto reset;
	}
	n = writer_iov();  /* before w.iov is read: it may grow */
	guard_note(w.good, w.good + len);
	if (write_all(w.fd, w.iov, n, &done) < 0) {
		int err = errno;

		writer_cut_partial(done);
		writer_count_drop_out();
		/*
		 * IDBs in the lost buffer are owed again; every EPB that
		 * used them was lost too, so writing them anew when next
		 * needed keeps the file's interface indexes consistent.
		 */
		for (int i = 0; i < w.nifaces; i++)
			if (w.ifaces[i].fidx >= w.nidb_good)
				w.ifaces[i].fidx = -1;
		w.nidb = w.nidb_good;
		w.isb_room = 0;
		for (int i = 0; i < w.nidb; i++)
			w.isb_room += w.idbs[i] >= 0 && w.ifaces[w.idbs[i]].stats ? PCAPNG_ISB_LEN : 0;
		/*
		 * So are the key lines of a DSB in it: the sessions they
		 * decrypt go on in this file once the writer retries.
		 */
		w.keys_owed |= w.keys_out;
		writer_fail("write", err);
		if (w.good == 0) {
			/* Not even the header made it: leave no unreadable file behind. */
			unlinkat(w.dirfd, w.name, 0);
			close(w.fd);
			w.fd = -1;
			w.counter--;  /* the number is free again: names stay dense */
			w.name[0] = '\0';
			writer_set_path(NULL);
		}
		goto reset;
	}
	if (w.episode) {
		log_info("spool: capture resumes in %s/%s", spool_dir, w.name);
		writer_set_failing(0);
	}
	w.episode = false;
	w.freed_mark = 0;
	w.good += len;
	w.nidb_good = w.nidb;
	atomic_fetch_add_explicit(&st_bytes, len, memory_order_relaxed);
	atomic_fetch_add_explicit(&st_packets, w.out_packets, memory_order_relaxed);
reset:
	writer_out_reset();
}

static void
writer_idb(int h)
{
	struct wiface *fi = &w.ifaces[h];

	pcapng_idb(&w.out, &fi->idb);
	if (fi->stats)
		w.isb_room += PCAPNG_ISB_LEN;
	fi->fidx = w.nidb;
	if (w.nidb == w.aidb) {
		w.aidb = w.aidb ? w.aidb * 2 : 16;
		w.idbs = xrealloc(w.idbs, (size_t)w.aidb * sizeof *w.idbs);
	}
	w.idbs[w.nidb++] = h;
}

static void
writer_keys_dsb(struct buf *k)
{
	if (buf_used(k) > 0) {
		pcapng_dsb(&w.out, PCAPNG_SECRETS_TLS, buf_head(k), buf_used(k));
		w.keys_out = true;
	}
}

static uint64_t writer_rotate_limit(uint64_t size);
static bool writer_check_folder(void);

/*
 * capd's file-size limit (ulimit -f, systemd's LimitFSIZE=), read at each
 * new file, as prlimit may change it while capd runs: files rotate before
 * it rather than fail their writes at it.
 */
static void
writer_fsize_limit(void)
{
	struct rlimit rl;
	uint64_t max = 0;

	if (getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
		max = (uint64_t)rl.rlim_cur;
	if (max > 0 && max != w.fsize_max)
		log_notice("spool: capd's file-size limit is %llu bytes (ulimit -f): capture files rotate "
		           "before it", (unsigned long long)max);
	w.fsize_max = max;
	w.rotate_size = writer_rotate_limit(w.rotate_size);
}

static void spool_iface_release(int h, uint64_t use);

/*
 * A new file: the removed interfaces whose flows are all closed are in no
 * file the writer still writes, and no record names them any more; their
 * handles may go to new interfaces (spool_iface_new). Without this every
 * instance ever added kept its slot in each table indexed by handle.
 */
static void
writer_release_removed(void)
{
	for (int i = 0; i < w.nifaces; i++)
		if (w.ifaces[i].known && w.ifaces[i].removed && w.ifaces[i].flows == 0)
			spool_iface_release(i, w.ifaces[i].use);
}

/*
 * A removed proxy's handle whose last flow closed may go to a new interface
 * at once: the file keeps its IDB under its index, which the new one does
 * not take. A sniffer's waits for the next file, whose end has an ISB of
 * its counts (writer_isbs).
 */
static void
writer_release_early(int h)
{
	struct wiface *fi = &w.ifaces[h];

	if (fi->known && fi->removed && fi->flows == 0 && !fi->stats)
		spool_iface_release(h, fi->use);
}

/* Opens the next file and writes its head: SHB, the IDBs of every live interface, recent keys. */
static int
writer_open(char **why)
{
	time_t now = time(NULL);
	struct tm tm;

	gmtime_r(&now, &tm);
	/*
	 * The rotation this makes is done, whether a file comes of it or
	 * not: one that cannot be made is writer_retry's, once a second.
	 * (Left due, every packet tried again, listing the folder each time.)
	 */
	w.rotate_due = false;
	/* Not in, nor trimming, a folder moved away since the last tick. */
	writer_check_folder();
	/* Room for the new file first: on a full disk that is what lets it start. */
	if (w.keep_files > 0)
		writer_trim(w.keep_files - 1);
	for (int tries = 0; tries < 100; tries++) {
		snprintf(w.name, sizeof w.name, "capd-%05u-%04d%02d%02dT%02d%02d%02dZ.pcapng", w.counter,
		         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
		w.counter++;
		/* read: writer_check_unlinked; append: a cut by another program shows in the size */
		w.fd = openat(w.dirfd, w.name, O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
		if (w.fd >= 0 || errno != EEXIST)
			break;
	}
	if (w.fd < 0) {
		int err = errno;

		if (why != NULL)
			*why = xasprintf("spool: create %s/%s: %s", spool_dir, w.name, strerror(err));
		writer_fail("create", err);
		w.counter--;
		w.name[0] = '\0';
		writer_set_path(NULL);  /* the last file is closed: status must not name it */
		return -1;
	}
	writer_fsize_limit();
	w.good = 0;
	w.probe_end = 0;
	w.file_packets = 0;
	w.opened = mono_now();
	w.nidb = w.nidb_good = 0;
	w.isb_room = 0;
	w.failing = false;
	for (int i = 0; i < w.nifaces; i++)
		w.ifaces[i].fidx = -1;
	writer_release_removed();
	writer_out_reset();
	pcapng_shb(&w.out, NULL, w.os, "capd " CAPD_VERSION);
	for (int i = 0; i < w.nifaces; i++)
		if (w.ifaces[i].known && !w.ifaces[i].removed)
			writer_idb(i);
	writer_keys_dsb(&w.keys);
	w.keys_owed = false;  /* a new file: its head has them */
	/* The head goes out now: no reader ever finds an empty file. */
	writer_flush();
	if (w.fd < 0) {
		if (why != NULL)
			*why = xasprintf("spool: write %s: %s", spool_dir, strerror(w.err));
		return -1;
	}
	writer_set_path(w.name);
	writer_trim(SIZE_MAX);
	spool_follow_rotated(spool_dir, w.name);  /* the capture.rotate event */
	return 0;
}

/*
 * No truncate here, nor space allocated ahead to give back with one: on XFS
 * a close after a truncate starts writeback of the whole file (its guard
 * against empty files after a crash), so at every rotation the writer sent
 * rotate_size bytes to the disk and, at 1.5 GB/s of capture, dropped two
 * thirds of it. On ext4, allocating ahead measured no faster.
 */
static void writer_isbs(void);
static void writer_probe_release(void);
static bool writer_check_size(const struct stat *sb);

static void
writer_close(void)
{
	if (w.fd >= 0 && !w.failing)
		writer_isbs();
	writer_flush();
	if (w.fd >= 0) {
		struct stat sb;

		/* a change since the last tick's look would stay in the file for good */
		if (fstat(w.fd, &sb) == 0 && sb.st_nlink > 0)
			writer_check_size(&sb);
		writer_probe_release();
		close(w.fd);
	}
	w.fd = -1;
}

static void
writer_rotate(void)
{
	writer_close();
	writer_open(NULL);
}

/*
 * Where the readable part of a capture file of size bytes ends: the end of
 * its last whole block, walking from its Section Header, and before any
 * packet or statistics block naming an interface not described yet (a cut
 * that took an IDB away leaves packets Wireshark refuses). 0: not even a
 * head. Two reads per block: for a start after a crash and a file cut by
 * hand, never per write.
 */
static uint64_t
spool_whole_end(int fd, uint64_t size)
{
	uint64_t off = 0;
	uint32_t nidb = 0;

	while (off + 12 <= size) {
		uint32_t hdr[3], trail;

		if (pread(fd, hdr, sizeof hdr, (off_t)off) != (ssize_t)sizeof hdr)
			break;
		if ((off == 0) != (hdr[0] == PCAPNG_BT_SHB))
			break;
		if (hdr[1] < 12 || hdr[1] % 4 != 0 || off + hdr[1] > size)
			break;
		if ((hdr[0] == PCAPNG_BT_EPB || hdr[0] == PCAPNG_BT_ISB) && (hdr[1] < 16 || hdr[2] >= nidb))
			break;
		if (pread(fd, &trail, 4, (off_t)(off + hdr[1] - 4)) != 4 || trail != hdr[1])
			break;
		nidb += hdr[0] == PCAPNG_BT_IDB;
		off += hdr[1];
	}
	return off;
}

/*
 * Someone cut the current file (: > FILE, truncate -s N, to free space) or
 * grew it (truncate -s +1M, an append). The file is O_APPEND, so writes
 * since went to its new end and the size tells: it is not what we wrote.
 * Cuts the file back to its last whole block before the change, which
 * drops what was written after it too (with no head, or after half a block,
 * or behind zeros). True when the file was changed.
 */
static bool
writer_check_size(const struct stat *sb)
{
	uint64_t keep;

	if ((uint64_t)sb->st_size == w.good)
		return false;
	keep = spool_whole_end(w.fd, (uint64_t)sb->st_size);
	log_notice("spool: %s/%s was %s by another program; keeping its first %llu bytes", spool_dir, w.name,
	           (uint64_t)sb->st_size < w.good ? "cut short" : "grown", (unsigned long long)keep);
	if (keep < (uint64_t)sb->st_size && ftruncate(w.fd, (off_t)keep) < 0)
		log_warn("spool: truncate %s/%s", spool_dir, w.name);
	return true;
}

/*
 * The current file was deleted (rm in the spool) or changed by another
 * program (writer_check_size): start a new one rather than write to
 * nothing, or on behind the change.
 */
static void
writer_check_unlinked(void)
{
	struct stat sb;

	if (w.fd < 0 || fstat(w.fd, &sb) < 0)
		return;
	if (sb.st_nlink == 0)
		log_notice("spool: %s/%s was deleted; starting a new file", spool_dir, w.name);
	else if (!writer_check_size(&sb))
		return;
	close(w.fd);
	w.fd = -1;
	writer_out_reset();
	writer_open(NULL);
}

/*
 * The spool path no longer names the folder we hold. Someone deleted it
 * (rm -rf SPOOL): our descriptor names the deleted folder, where no file
 * can be made, so capture would stay off until a restart even once the
 * folder is back. Or moved it (mv SPOOL case-42, to keep what it holds):
 * we would write on in the moved folder, and rotation would delete the very
 * files kept that way. Make the folder again, as spool_start() does, and
 * write there; true when the folder changed. (The tail guard keeps the old
 * one; spool_repair() at the next start covers what it no longer can.)
 */
static bool
writer_check_folder(void)
{
	struct stat held, now;
	int fd;

	if (fstat(w.dirfd, &held) < 0)
		return false;
	if (stat(spool_dir, &now) == 0) {
		if (held.st_dev == now.st_dev && held.st_ino == now.st_ino)
			return false;
	} else if (errno != ENOENT && errno != ENOTDIR) {
		return false;  /* cannot tell (a parent capd may not search): go on where we are */
	}
	spool_mkdirs(spool_dir);
	if ((fd = open(spool_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		return false;  /* writer_open() fails and says why; we look again at the next retry */
	/*
	 * Another capd may have made the folder at the path its own since
	 * (capd_lock_dir): two in one folder delete each other's files. Ours
	 * is held, as its was, with a lock of its own, until capd ends; the
	 * one we started with (moved back) is locked by us already.
	 */
	if (fstat(fd, &now) < 0) {
		close(fd);
		return false;
	}
	if ((now.st_dev != w.home_dev || now.st_ino != w.home_ino) && flock(fd, LOCK_EX | LOCK_NB) < 0 &&
	    errno == EWOULDBLOCK) {
		if (!w.folder_busy)
			log_warnx("spool: %s is another capd's folder now; not writing there", spool_dir);
		w.folder_busy = true;
		close(fd);
		return false;
	}
	w.folder_busy = false;
	if (held.st_nlink == 0)
		log_notice("spool: the folder %s was deleted; writing to a new one", spool_dir);
	else
		log_notice("spool: the folder %s was moved or replaced; capture goes on in a new one, the old "
		           "one is left as it is", spool_dir);
	close(w.dirfd);
	w.dirfd = fd;
	return true;
}

/* At each tick: a spool folder moved away keeps the file written so far, closed whole; the next is in the new one. */
static void
writer_check_moved(void)
{
	if (w.fd < 0 || !writer_check_folder())
		return;
	writer_close();
	writer_open(NULL);
}

/*
 * 1 + the bytes free on the spool's file system (f_bfree: grows with each
 * block freed, whoever may use it); 0 when it cannot tell.
 */
static uint64_t
writer_free_mark(void)
{
	struct statvfs sv;

	return fstatvfs(w.dirfd, &sv) == 0 ? (uint64_t)sv.f_bfree * sv.f_frsize + 1 : 0;
}

/*
 * A file deleted for space frees none while another program holds it open
 * (tshark, a copy, a backup): deleting the next one a second later would
 * empty the whole ring for nothing. So after a deletion the writer waits
 * until space shows up (the reader closes the file) and lets the writes try
 * it, before it deletes another.
 */
static bool
writer_may_delete(void)
{
	if (w.freed_mark == 0)
		return true;
	if (writer_free_mark() > w.freed_mark) {
		w.freed_mark = 0;  /* it freed space: the writes try it first */
		w.freed_none = false;
		return false;
	}
	if (!w.freed_none)
		log_warnx("spool: the disk is still full: the capture file deleted last is open in another "
		          "program; deleting no more until it is closed");
	w.freed_none = true;
	return false;
}

/*
 * A full disk the ring itself filled (keep_files x rotate_size is more than
 * it holds) would never free space, as only rotation deletes: give up the
 * oldest file, never the one being written, and keep the newest capture.
 * The files are counted now: the count of the last trim still holds files
 * moved or deleted by hand since, and trimming to one fewer than that
 * deleted nothing. A current file deleted by hand is no reason: closing
 * it (writer_check_unlinked) frees its space.
 */
static void
writer_free_oldest(void)
{
	struct spool_file *v;
	struct stat sb;
	size_t n;

	if (w.fd >= 0 && fstat(w.fd, &sb) == 0 && sb.st_nlink == 0)
		return;
	v = spool_list(w.dirfd, &n);
	if (n > 1 && (w.fd < 0 || strcmp(v[0].name, w.name) != 0) && writer_may_delete()) {
		log_warnx("spool: the disk is full: deleting the oldest capture file, %s", v[0].name);
		w.freed_mark = writer_free_mark();  /* 0 (cannot tell): the next retry may delete again */
		w.freed_none = false;
		writer_trim(n - 1);
	}
	free(v);
}

static bool
writer_fsize_limited(void)
{
	struct rlimit rl;

	return getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY;
}

/* A write error that a retry in the same file may see go away, and writer_retry_probe can tell gone. */
static bool
writer_err_transient(int err)
{
	return err == ENOSPC || err == EDQUOT || err == EROFS || err == EIO;
}

/*
 * After a full disk or quota, a retry that goes on in the same file writes
 * nothing until the next packet, so status would say "failing" long after
 * space was freed. Ask the file system for room for the next writes too:
 * allocated past the end (the size stays, readers see nothing), where they
 * go. Granted, capture is no longer failing. Refused, the disk is asked
 * again a second later until a write or a probe succeeds; packets meanwhile
 * are tried as before (a smaller write may still fit). Not supported
 * (EOPNOTSUPP), the next write tells. A file system remounted read-only
 * refuses the allocation (EROFS) as it does writes, and so does one shut
 * down after an I/O error (EIO): the same probe tells when they take
 * writes again. (A disk failing underneath a working file system shows no
 * error to write(2) at all: capd writes through the page cache.) What the
 * writes do not use is given back when the file closes (writer_close).
 */
static void
writer_retry_probe(void)
{
	w.probe_at = 0;
	if (w.fd < 0 || !w.episode || w.failing || !writer_err_transient(w.err))
		return;
	if (fallocate(w.fd, FALLOC_FL_KEEP_SIZE, (off_t)w.good, RETRY_PROBE) == 0) {
		if (w.err == ENOSPC || w.err == EDQUOT)
			log_info("spool: space again in %s; capture resumes in %s", spool_dir, w.name);
		else
			log_info("spool: %s takes writes again; capture resumes in %s", spool_dir, w.name);
		w.probe_end = w.good + RETRY_PROBE;
		w.episode = false;
		w.freed_mark = 0;
		writer_set_failing(0);
	} else if (writer_err_transient(errno)) {
		w.probe_at = mono_now() + RETRY_SECS;
	}
}

/*
 * The room a probe asked for and the writes did not use stays allocated past
 * the end of a closed file, unseen by ls, until the ring deletes the file.
 * Punched out rather than cut with a truncate: see writer_close.
 */
static void
writer_probe_release(void)
{
	if (w.probe_end > w.good &&
	    fallocate(w.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)w.good,
	              (off_t)(w.probe_end - w.good)) < 0 && errno != EOPNOTSUPP)
		log_warn("spool: give back the room past the end of %s/%s", spool_dir, w.name);
	w.probe_end = 0;
}

/* After a failure: a new file if there is none, else the same file again. */
static void
writer_retry(void)
{
	/*
	 * A file at the file-size limit (ulimit -f, LimitFSIZE=) takes no
	 * more while the limit holds, however long we wait: go on in a new
	 * one (a lifted limit lets it go on). Closed while still failing, so
	 * no ISB is tried at its end.
	 */
	if (w.err == EFBIG && w.fd >= 0 && writer_fsize_limited())
		writer_close();
	w.failing = false;
	if (w.err == ENOSPC || w.err == EDQUOT)
		writer_free_oldest();
	/* Deleting the file frees no space while we hold it open: move on to a new one. */
	writer_check_unlinked();
	if (w.fd < 0)
		writer_open(NULL);
	else
		writer_retry_probe();
}

/* The IDB index of handle h in the current file, writing the IDB when first needed. */
static int
writer_iface(int h)
{
	if (h < 0 || h >= w.nifaces || !w.ifaces[h].known)
		return -1;
	if (w.ifaces[h].fidx < 0)
		writer_idb(h);
	return w.ifaces[h].fidx;
}

/* Past KEYLOG_KEEP, keeps the newest half of k's key lines, cut at a line boundary. */
static void
writer_keys_trim(struct buf *k)
{
	const uint8_t *p = buf_head(k);
	size_t cut;
	const uint8_t *nl;

	if (buf_used(k) <= KEYLOG_KEEP)
		return;
	cut = buf_used(k) - KEYLOG_KEEP / 2;
	nl = memchr(p + cut, '\n', buf_used(k) - cut);
	buf_consume(k, nl ? (size_t)(nl - p) + 1 : buf_used(k));
}

/* Pending key lines go out before the packets they decrypt. */
static void
writer_keys_flush(void)
{
	if (w.keys_owed) {
		/* A DSB went with a write that failed: the recent lines again, the new ones with them. */
		w.keys_owed = false;
		buf_append(&w.keys, buf_head(&w.keys_new), buf_used(&w.keys_new));
		buf_reset(&w.keys_new);
		writer_keys_trim(&w.keys);
		writer_keys_dsb(&w.keys);
		return;
	}
	if (buf_used(&w.keys_new) == 0)
		return;
	writer_keys_dsb(&w.keys_new);
	buf_append(&w.keys, buf_head(&w.keys_new), buf_used(&w.keys_new));
	buf_reset(&w.keys_new);
	writer_keys_trim(&w.keys);
}

static bool
writer_dropping(void)
{
	return w.fd < 0 || w.failing;
}

/* Checksums may be left out only of packets nobody will see: the disk is
 * failing, no rotation (which opens a new file) comes before them, and no
 * live follower takes them. */
static bool
writer_nocsum(void)
{
	return writer_dropping() && !w.rotate_due && !spool_follow_wanted();
}

/* One packet into the buffer, as an EPB of the record's interface. */
static void
writer_packet(int iface, const struct timespec *ts, const void *hdr, size_t hdrlen, const void *data,
              size_t datalen, uint32_t origlen, uint32_t flags, const char *comment)
{
	struct pcapng_epb e;
	int fidx;

	if (w.rotate_due)
		writer_rotate();
	if (spool_follow_wanted())  /* live followers get it even when the disk does not */
		spool_follow_packet(iface, iface >= 0 && iface < w.nifaces && w.ifaces[iface].known ? &w.ifaces[iface].idb : NULL,
		                    ts, hdr, hdrlen, data, datalen, origlen, flags, comment);
	if (writer_dropping()) {
		writer_count_drop(1, datalen + hdrlen);
		spool_iface_drop(iface, 1);
		return;
	}
	writer_keys_flush();
	if ((fidx = writer_iface(iface)) < 0) {
		writer_count_drop(1, datalen + hdrlen);
		return;
	}
	e = (struct pcapng_epb){
		.iface = (uint32_t)fidx,
		.ts = pcapng_ts(ts, w.ifaces[iface].idb.tsnano),
		.hdr = hdr,
		.hdrlen = hdrlen,
		.data = data,
		.datalen = datalen,
		.origlen = origlen,
		.flags = flags,
		.comment = comment,
	};
	if (w.ext_ok && datalen >= EXT_MIN) {
		size_t split;

		e.datalen = datalen;
		pcapng_epb_nodata(&w.out, &e, &split);
		if (w.next == w.aext) {
			w.aext = w.aext ? w.aext * 2 : 64;
			w.ext = xrealloc(w.ext, w.aext * sizeof *w.ext);
		}
		/* Offsets, not pointers: out may move as it grows. */
		w.ext[w.next++] = (struct ext){ buf_used(&w.out) - (pcapng_epb_len(&e) - datalen) + split, data,
		                                datalen };
		w.ext_bytes += datalen;
	} else {
		pcapng_epb(&w.out, &e);
	}
	w.out_packets++;
	w.out_payload += datalen;
	w.file_packets++;
	if (w.ifaces[iface].out_packets++ == 0) {
		if (w.ntouched == w.atouched) {
			w.atouched = w.atouched ? w.atouched * 2 : 16;
			w.touched = xrealloc(w.touched, (size_t)w.atouched * sizeof *w.touched);
		}
		w.touched[w.ntouched++] = iface;
	}
	if (writer_pending() >= OUT_MAX)
		writer_flush();
}

static void
writer_emit_cb(void *arg, const struct synth_pkt *pkt)
{
	struct spool_flow *f = arg;
	const char *comment = f->comment;
	char cut[512];

	if (pkt->truncated_from) {
		snprintf(cut, sizeof cut, "%s (datagram of %zu bytes cut to %zu)", f->comment,
		         pkt->truncated_from, pkt->truncated_to);
		comment = cut;
	}
	/* Seen from the client: what it sends goes out, what it gets comes in. */
	writer_packet(f->iface, &w.cur->ts, pkt->hdr, pkt->hdrlen, pkt->data, pkt->datalen, 0,
	              pkt->dir == SYNTH_UP ? PCAPNG_EPB_OUTBOUND : PCAPNG_EPB_INBOUND, comment);
}

static void
writer_iface_add(const struct rec *r)
{
	const char *name = (const char *)(r + 1);
	const char *desc = name + strlen(name) + 1;
	const char *filter = desc + strlen(desc) + 1;  /* spool_queue_iface: name, description, filter */
	struct wiface *fi;
	int h = r->iface;

	if (h >= w.nifaces) {
		int n = h + 16;

		w.ifaces = xrealloc(w.ifaces, (size_t)n * sizeof *w.ifaces);
		memset(w.ifaces + w.nifaces, 0, (size_t)(n - w.nifaces) * sizeof *w.ifaces);
		for (int i = w.nifaces; i < n; i++)
			w.ifaces[i].fidx = -1;
		w.nifaces = n;
	}
	fi = &w.ifaces[h];
	if (fi->known) {  /* a removed interface's handle, given to a new one (spool_iface_new) */
		if (fi->fidx >= 0)
			w.idbs[fi->fidx] = -1;  /* that IDB in the file is no longer this handle's */
		free(fi->name);
		free(fi->desc);
		free(fi->filter);
		*fi = (struct wiface){ .fidx = -1 };
		spool_follow_iface_reused(h);
	}
	fi->known = true;
	fi->use = r->gap[0];
	fi->name = xstrdup(name);
	fi->desc = xstrdup(desc);
	fi->filter = xstrdup(filter);
	fi->stats = (r->flag & 2) != 0;
	fi->idb = (struct pcapng_idb){
		.linktype = (uint16_t)r->aux,
		.snaplen = r->aux2,
		.name = fi->name,
		.description = *fi->desc ? fi->desc : NULL,
		.filter = *fi->filter ? fi->filter : NULL,
		.tsnano = (r->flag & 1) != 0,
	};
	/* pcapng allows IDBs anywhere in a section: announce it in the current file now. */
	if (!writer_dropping())
		writer_iface(h);
}

static void
writer_flow_open(const struct rec *r)
{
	struct spool_flow *f = r->flow;
	struct rec_open o;
	const char *extra = (const char *)(r + 1) + sizeof o;
	size_t nextra = r->n - sizeof o;
	uint32_t isn;

	memcpy(&o, r + 1, sizeof o);
	f->iface = r->iface;
	if (f->iface >= 0 && f->iface < w.nifaces)
		w.ifaces[f->iface].flows++;
	f->comment = nextra > 0 ? xasprintf("capd session %llu %.*s", (unsigned long long)o.session,
	                                    (int)nextra, extra)
	                        : xasprintf("capd session %llu", (unsigned long long)o.session);
	/* Distinct, reproducible initial sequence numbers per session. */
	isn = (uint32_t)(o.session * 2654435761u);
	if (synth_flow_init(&f->sf, o.proto, (struct sockaddr *)&o.client, (struct sockaddr *)&o.target, isn,
	                    ~isn, writer_emit_cb, f) < 0)
		return;
	f->ready = true;
	f->sf.nocsum = writer_nocsum();
	f->sf.inbound = o.inbound;
	synth_open(&f->sf);
}

/* The segment size the writer's synth flow uses: the producer sums by the same. */
static size_t
writer_flow_mss(const struct spool_flow *f)
{
	return f->sf.family == AF_INET ? SYNTH_MSS4 : SYNTH_MSS6;
}

static void
writer_flow_gaps(struct spool_flow *f, const struct rec *r)
{
	if (r->gap[0])
		synth_gap(&f->sf, SYNTH_UP, r->gap[0]);
	if (r->gap[1])
		synth_gap(&f->sf, SYNTH_DOWN, r->gap[1]);
	f->sf.nocsum = writer_nocsum();
}

static void
writer_flow_free(struct spool_flow *f)
{
	free(f->comment);
	free(f);
}

/*
 * Rotation by size before a record that would take the file past
 * rotate_size: one record holds up to a MiB of a bulk read (RELAY_BULK),
 * and files came out up to that much over. The record goes whole into the
 * next file rather than being split at a packet: its packets share one
 * timestamp, and mergecap, merging the ring's files by time, shuffled the
 * packets on either side of the cut. The estimate errs high: the key
 * lines waiting for a block, and for the control records as many packets
 * as a close makes.
 */
static void
writer_size_check(const struct rec *r)
{
	const struct spool_flow *f = r->flow;
	uint64_t add;
	size_t per;

	if (w.rotate_size == 0 || w.fd < 0 || w.file_packets == 0 || w.rotate_due)
		return;
	switch (r->type) {
	case REC_PACKET:
		add = r->n + EPB_ROOM;
		break;
	case REC_OPEN:  /* its comment is not made yet: "capd session N " and the record's text */
		add = SYNTH_CTL_PKTS * (EPB_ROOM + 34 + (r->n - sizeof(struct rec_open)));
		break;
	case REC_DATA:
	case REC_FIN:
	case REC_CLOSE:
		if (!f->ready)
			return;
		per = EPB_ROOM + strlen(f->comment);
		add = r->type == REC_DATA ? r->n + synth_count(f->proto, f->mss, r->n) * per : SYNTH_CTL_PKTS * per;
		break;
	default:
		return;
	}
	if (buf_used(&w.keys_new) > 0 || w.keys_owed)  /* the Decryption Secrets Block before the first packet */
		add += 24 + buf_used(&w.keys_new) + (w.keys_owed ? buf_used(&w.keys) : 0);
	if (w.good + writer_pending() + add + w.isb_room > w.rotate_size)
		w.rotate_due = true;
}

/*
 * capture.sync's mark: every record queued before it has been handled, so
 * what is buffered goes to the file now, with the key lines still waiting
 * for a packet (a DSB ahead of packets that come later is as good as one
 * right before them). The answer tells of packets lost since the last
 * mark (a disk that failed and came back) and of a disk failing now.
 */
static void
writer_sync(unsigned seq)
{
	struct frec_sync m = { .seq = seq };

	if (!writer_dropping())
		writer_keys_flush();
	writer_flush();
	writer_check_unlinked();  /* what the caller reads next is a file that opens */
	m.lost = w.sync_lost;
	m.failing = writer_dropping();
	m.err = m.failing || m.lost > 0 ? (w.err ? w.err : EIO) : 0;
	w.sync_lost = 0;
	atomic_fetch_sub(&sync_marks, 1);
	spool_follow_synced(&m);
}

static void
writer_record(const struct rec *r)
{
	const uint8_t *p = (const uint8_t *)(r + 1);
	struct spool_flow *f = r->flow;

	w.cur = r;
	writer_size_check(r);
	switch (r->type) {
	case REC_IFACE_ADD:
		writer_iface_add(r);
		break;
	case REC_IFACE_REMOVE:
		if (r->iface >= 0 && r->iface < w.nifaces) {
			w.ifaces[r->iface].removed = true;
			writer_release_early(r->iface);
		}
		break;
	case REC_OPEN:
		writer_flow_open(r);
		break;
	case REC_DATA:
		if (!f->ready)
			break;
		writer_flow_gaps(f, r);
		synth_data_summed(&f->sf, r->dir, p, r->n, r->flag && f->mss == writer_flow_mss(f) ? r->sum : NULL);
		break;
	case REC_FIN:
		if (!f->ready)
			break;
		writer_flow_gaps(f, r);
		synth_fin(&f->sf, r->dir);
		break;
	case REC_CLOSE:
		if (f->ready) {
			writer_flow_gaps(f, r);
			synth_close(&f->sf, (enum synth_end)r->flag);
		}
		if (f->iface >= 0 && f->iface < w.nifaces && --w.ifaces[f->iface].flows == 0)
			writer_release_early(f->iface);
		writer_flow_free(f);
		break;
	case REC_PACKET:
		writer_packet(r->iface, &r->ts, NULL, 0, p, r->n, r->aux, 0, NULL);
		/* after: a rotation it started closed the last file without it */
		if (r->iface >= 0 && r->iface < w.nifaces)
			w.ifaces[r->iface].taken++;
		break;
	case REC_KEYLOG:
		if (spool_follow_wanted())  /* ahead of the packets it decrypts, as in the file */
			spool_follow_keylog(p, r->n);
		buf_append(&w.keys_new, p, r->n);
		buf_append(&w.keys_new, "\n", 1);
		/*
		 * Lines wait here for the next packet that is written: while
		 * the disk fails or no file can be made, that is every TLS
		 * session's keys until it can. The packets of those sessions
		 * are dropped, and keys without their handshake decrypt
		 * nothing: keep as many as a new file's head repeats.
		 */
		writer_keys_trim(&w.keys_new);
		break;
	case REC_SYNC:
		writer_sync(r->aux);
		break;
	}
	w.cur = NULL;
	/* Rotating only when the next packet comes leaves no file without packets. */
	if (w.rotate_size > 0 && w.fd >= 0 && w.good + writer_pending() >= w.rotate_size)
		w.rotate_due = true;
}

/* rotate_size within the file-size limit: a file past it would fail its writes. */
static uint64_t
writer_rotate_limit(uint64_t size)
{
	return w.fsize_max > 0 && (size == 0 || size > w.fsize_max) ? w.fsize_max : size;
}

static void
writer_settings(void)
{
	w.rotate_size = q.rotate_size;
	/* a file passing the file-size limit would fail its writes: rotate before it */
	w.rotate_size = writer_rotate_limit(w.rotate_size);
	w.rotate_time = q.rotate_time;
	w.flush_interval = q.flush_interval;
	w.keep_files = q.keep_files;
}

/* Next time the writer must look up without being woken (called under q.mu). */
static double
writer_deadline(double next_tick)
{
	double d = next_tick;

	if (w.failing && w.retry_at < d)
		d = w.retry_at;
	if (w.probe_at > 0 && w.probe_at < d)
		d = w.probe_at;
	if (w.rotate_time > 0 && w.fd >= 0 && !w.rotate_due && w.opened + w.rotate_time < d)
		d = w.opened + w.rotate_time;
	return d;
}

static void
writer_wait(double until)
{
	struct timespec ts;

	ts.tv_sec = (time_t)until;
	ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	q.waiting = true;
	pthread_cond_timedwait(&q.cv, &q.mu, &ts);
	q.waiting = false;
}

/*
 * Takes the next run of records off the queue: the unread part of the head
 * chunk. The records stay where they are while the writer reads them without
 * the lock; producers only ever write beyond wpos, or into records they
 * claimed and have not made ready yet, where the writer stops. *busy: the
 * first record is not ready, so nothing is taken. (Called under q.mu.)
 */
static struct chunk *
writer_take(size_t *start, size_t *end, bool *busy)
{
	struct chunk *h;

	*busy = false;
	while ((h = q.head) != NULL && h->rpos == h->wpos && h != q.tail) {
		q.head = h->next;
		free(h);
	}
	if (h == NULL || h->rpos == h->wpos)
		return NULL;
	if (!__atomic_load_n(&((const struct rec *)(h->data + h->rpos))->ready, __ATOMIC_ACQUIRE)) {
		*busy = true;
		return NULL;
	}
	*start = h->rpos;
	*end = h->wpos;
	return h;
}

/* Gives back what writer_take() handed out. (Called under q.mu.) */
static struct chunk *
writer_release(struct chunk *h, size_t end, size_t data)
{
	q.backlog -= end - h->rpos;
	h->rpos = end;
	q.queued -= data;
	if (h->rpos != h->wpos)
		return NULL;
	if (h == q.tail) {
		h->rpos = h->wpos = 0;  /* reuse in place */
		return NULL;
	}
	q.head = h->next;
	if (h->size == CHUNK_SIZE && q.nspare < CHUNK_SPARE) {
		h->next = q.spare;
		q.spare = h;
		q.nspare++;
		return NULL;
	}
	return h;  /* freed by the caller, outside the lock */
}

/*
 * The writer runs ahead of the session threads: at nice -5 it takes the CPU
 * it needs before they do, so on busy cores the relay slows down instead of
 * the capture falling behind and being dropped. The disk can still make it
 * fall behind; the relay still never waits. Raising a priority needs
 * CAP_SYS_NICE, which capd holds while it starts as root outside systemd, or
 * an RLIMIT_NICE that allows it (capd.service: LimitNICE=-5, since its
 * bounding set leaves CAP_SYS_NICE out); otherwise the writer stays at capd's
 * own. It gets that share as a batch thread
 * (thread_batch), not by preempting the relay each time a relay wakes it.
 */
static void
writer_prioritize(void)
{
	thread_batch("writer");
	if (setpriority(PRIO_PROCESS, (id_t)gettid(), WRITER_NICE) < 0)
		log_debug("spool: writer stays at capd's priority (%s)", strerror(errno));
}

static void *
writer_main(void *arg)
{
	double next_tick = mono_now() + q.flush_interval / 2;
	unsigned keep = w.keep_files;  /* what the ring was last trimmed to */

	(void)arg;
	pthread_setname_np(pthread_self(), "capd-spool");  /* top -H, /proc/PID/task/N/comm */
	writer_prioritize();
	for (;;) {
		struct chunk *h, *old;
		size_t start = 0, end = 0, data = 0;
		unsigned rot;
		bool stop, busy;
		double now, until;

		pthread_mutex_lock(&q.mu);
		for (;;) {
			writer_settings();
			h = writer_take(&start, &end, &busy);
			if (h != NULL || q.stop || q.rotate_req != q.rotate_done)
				break;
			/*
			 * Records below WAKE_BYTES do not signal: the tick picks them
			 * up. Nor does a record made ready (busy): the next producer
			 * to pass WAKE_BYTES wakes us, or the tick.
			 */
			until = writer_deadline(next_tick);
			if (until <= mono_now())
				break;
			/*
			 * A sync mark may sit behind a record being filled: look
			 * again in a moment rather than at the tick, so capture.sync
			 * answers in milliseconds.
			 */
			if (busy && atomic_load(&sync_marks) > 0 && mono_now() + SYNC_POLL_SECS < until)
				until = mono_now() + SYNC_POLL_SECS;
			writer_wait(until);
		}
		rot = q.rotate_req;
		stop = q.stop;
		pthread_mutex_unlock(&q.mu);

		/* A reload that lowers keep_files frees the disk now, not at the next rotation. */
		if (w.keep_files != keep) {
			if (w.keep_files < keep && w.fd >= 0)
				writer_trim(w.keep_files);
			keep = w.keep_files;
		}

		w.ext_ok = true;
		for (size_t off = start; h != NULL && off < end;) {
			const struct rec *r = (const struct rec *)(h->data + off);

			if (off > start && !__atomic_load_n(&r->ready, __ATOMIC_ACQUIRE)) {
				/* a producer is still filling it: the rest waits for the next round */
				end = off;
				break;
			}
			writer_record(r);
			if (r->type == REC_DATA || r->type == REC_PACKET)
				data += r->len;
			off += r->len;
		}
		w.ext_ok = false;
		/* Payloads still referenced in the queue go out before it is given back. */
		if (w.next > 0)
			writer_flush();

		now = mono_now();
		if (rot != q.rotate_done) {  /* only the writer changes rotate_done */
			writer_rotate();
			pthread_mutex_lock(&q.mu);
			q.rotate_done = rot;
			pthread_cond_broadcast(&q.done_cv);
			pthread_mutex_unlock(&q.mu);
		}
		if (w.rotate_time > 0 && w.fd >= 0 && !w.rotate_due && now >= w.opened + w.rotate_time) {
			/* Like rotate_size, the new file waits for a packet: no files without any. */
			if (w.file_packets > 0)
				w.rotate_due = true;
			else
				w.opened = now;
		}
		if (w.failing && now >= w.retry_at)
			writer_retry();
		else if (w.probe_at > 0 && now >= w.probe_at)
			writer_retry_probe();
		if (now >= next_tick) {
			writer_flush();
			writer_check_moved();
			writer_check_unlinked();
			next_tick = now + w.flush_interval / 2;
		}

		old = NULL;
		pthread_mutex_lock(&q.mu);
		if (h != NULL)
			old = writer_release(h, end, data);
		if (stop && h == NULL && !busy) {
			pthread_mutex_unlock(&q.mu);
			break;
		}
		pthread_mutex_unlock(&q.mu);
		free(old);
		if (stop && busy)
			sched_yield();  /* a last record being filled: microseconds */
	}
	writer_close();
	return NULL;
}

/* ---- start and stop (loop thread) ---- */

/*
 * A crash (kill -9 in the middle of a write) can leave half a block at the
 * end of the newest file: cut it back to its last whole block so every
 * file in the spool reads cleanly.
 */
static void
spool_repair(int dirfd, const char *name)
{
	uint64_t off = 0, size;
	struct stat sb;
	int fd = openat(dirfd, name, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return;
	if (fstat(fd, &sb) < 0) {
		close(fd);
		return;
	}
	size = (uint64_t)sb.st_size;
	off = spool_whole_end(fd, size);
	if (off == 0) {
		log_notice("spool: removing unreadable %s/%s", spool_dir, name);
		unlinkat(dirfd, name, 0);
	} else if (off < size) {
		log_notice("spool: cutting %s/%s back to its last whole block (%llu of %llu bytes)", spool_dir,
		           name, (unsigned long long)off, (unsigned long long)size);
		if (ftruncate(fd, (off_t)off) < 0)
			log_warn("spool: truncate %s/%s", spool_dir, name);
	}
	close(fd);
}

/* Interfaces as registered, kept by the loop so a restarted writer learns them again. */
struct liface {
	char *name, *desc, *filter;  /* filter: "" for none */
	int linktype;
	unsigned snaplen;
	bool tsnano, removed;
	bool reusable;         /* removed, and the writer is done with it: a new one may take the handle */
	uint64_t use;          /* counts the interfaces that had the handle */
	int followers;         /* capture follow --instance of it (spool_iface_hold) */
	uint64_t dropped;      /* packets the writer lost (a failing disk, no file) */
	bool sniffer;          /* its files end in an ISB (writer_isbs), with: */
	uint64_t kernel_drop, queue_drop;  /* ... what it last told (spool_iface_stats) */
};

static pthread_mutex_t reg_mu = PTHREAD_MUTEX_INITIALIZER;
static struct liface *lifaces;
static int nlifaces;
/* Interfaces made per name since capd started (the #N of spool_iface_desc). */
static struct iface_count { char *name; int n; } *iface_counts;
static int niface_counts;

/* Writer thread: handle h of a removed interface (its use-th) is free to take again. */
static void
spool_iface_release(int h, uint64_t use)
{
	pthread_mutex_lock(&reg_mu);
	/* the loop may have given it to a new one already, whose records the writer has yet to see */
	if (h < nlifaces && lifaces[h].removed && lifaces[h].use == use)
		lifaces[h].reusable = true;
	pthread_mutex_unlock(&reg_mu);
}

/* Writer thread: packets of handle iface it could not write. */
static void
spool_iface_drop(int iface, uint64_t packets)
{
	pthread_mutex_lock(&reg_mu);
	if (iface >= 0 && iface < nlifaces)
		lifaces[iface].dropped += packets;
	pthread_mutex_unlock(&reg_mu);
}

uint64_t
spool_iface_dropped(int iface)
{
	uint64_t n = 0;

	pthread_mutex_lock(&reg_mu);
	if (iface >= 0 && iface < nlifaces)
		n = lifaces[iface].dropped;
	pthread_mutex_unlock(&reg_mu);
	return n;
}

/*
 * Writer thread, closing a file: an ISB for each sniffer's interface in it,
 * as dumpcap ends its files (Wireshark shows the drops in the capture file's
 * properties). Received: the packets the writer took of it so far, and those
 * the queue refused; the kernel's and the queue's drops as the sniffer last
 * told them (within a second or so).
 */
static void
writer_isbs(void)
{
	struct timespec now;

	clock_gettime(CLOCK_REALTIME, &now);
	pthread_mutex_lock(&reg_mu);
	for (int i = 0; i < w.nidb; i++) {
		int h = w.idbs[i];
		struct wiface *fi = h >= 0 ? &w.ifaces[h] : NULL;
		struct liface *li = h >= 0 && h < nlifaces ? &lifaces[h] : NULL;

		if (fi == NULL || !fi->stats || li == NULL)
			continue;
		pcapng_isb(&w.out, &(struct pcapng_isb){
			.iface = (uint32_t)i,
			.ts = pcapng_ts(&now, fi->idb.tsnano),
			.ifrecv = fi->taken + li->queue_drop,
			.ifdrop = li->kernel_drop,
			.osdrop = li->queue_drop + li->dropped,
		});
	}
	pthread_mutex_unlock(&reg_mu);
}

static void
spool_queue_iface(int h)
{
	struct liface *li = &lifaces[h];
	size_t nd = strlen(li->desc) + 1, nf = strlen(li->filter) + 1;
	char *tail = xmalloc(nd + nf);  /* the description and the filter, one piece */
	struct rec r;

	memcpy(tail, li->desc, nd);
	memcpy(tail + nd, li->filter, nf);
	rec_init(&r, REC_IFACE_ADD, NULL);
	r.iface = h;
	r.aux = (uint32_t)li->linktype;
	r.aux2 = li->snaplen;
	r.gap[0] = li->use;
	r.flag = (uint8_t)((li->tsnano ? 1 : 0) | (li->sniffer ? 2 : 0));
	queue_put(&r, li->name, strlen(li->name) + 1, tail, nd + nf, false);
	free(tail);
}

static void
spool_mkdirs(const char *path)
{
	char *p = xstrdup(path);

	for (char *s = p + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		mkdir(p, 0750);
		*s = '/';
	}
	mkdir(p, 0750);
	free(p);
}

int
spool_start(const struct capd_settings *st, char **why)
{
	char first[sizeof w.name] = "";
	pthread_condattr_t ca;
	struct spool_file *v;
	struct stat sb;
	struct utsname u;
	size_t n;
	int err;

	if (atomic_load(&running)) {
		*why = xstrdup("spool: already running");
		return -1;
	}
	if (st->spool == NULL || *st->spool == '\0') {
		*why = xstrdup("spool: no spool folder set");
		return -1;
	}
	spool_dir = xstrdup(st->spool);
	spool_mkdirs(spool_dir);
	if ((w.dirfd = open(spool_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		*why = xasprintf("spool: %s: %s", spool_dir, strerror(errno));
		goto fail;
	}
	if (fstat(w.dirfd, &sb) == 0) {
		w.home_dev = sb.st_dev;
		w.home_ino = sb.st_ino;
	}
	/* Numbers continue from the files already there, so names keep sorting by time. */
	v = spool_list(w.dirfd, &n);
	w.counter = n > 0 ? v[n - 1].counter + 1 : 1;
	if (n > 0)
		spool_repair(w.dirfd, v[n - 1].name);
	free(v);
	if (uname(&u) == 0)
		snprintf(w.os, sizeof w.os, "%s %s", u.sysname, u.release);

	pthread_mutex_lock(&q.mu);
	spool_settings(st);
	writer_settings();
	q.stop = false;
	q.path[0] = '\0';
	q.fail_err = 0;
	pthread_mutex_unlock(&q.mu);

	if (writer_open(why) == 0) {
		memcpy(first, w.name, sizeof first);  /* before the writer runs: it may move on at once */
	} else {
		err = w.err;
		/* A full disk is no reason not to proxy; a folder we may not write to is. */
		if (err == EACCES || err == EPERM || err == EROFS || err == ENOENT || err == ENOTDIR)
			goto fail;
		log_warnx("%s; capture resumes when it can write", *why);
		free(*why);
		*why = NULL;
	}
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&q.cv, &ca);
	pthread_cond_destroy(&q.done_cv);
	pthread_cond_init(&q.done_cv, &ca);
	pthread_condattr_destroy(&ca);

	pthread_mutex_lock(&reg_mu);
	for (int h = 0; h < nlifaces; h++)
		if (!lifaces[h].removed)
			spool_queue_iface(h);
		else
			lifaces[h].reusable = true;  /* in no file of this writer, and its flows send nothing */
	pthread_mutex_unlock(&reg_mu);

	guard_start(w.dirfd);
	reaper_start();
	if ((err = pthread_create(&writer_thread, NULL, writer_main, NULL)) != 0) {
		*why = xasprintf("spool: writer thread: %s", strerror(err));
		writer_close();
		reaper_stop();
		guard_stop();
		goto fail;
	}
	atomic_store(&running, true);
	if (first[0] != '\0')  /* else the warning above said why not */
		log_info("spool: writing to %s/%s", spool_dir, first);
	return 0;
fail:
	if (w.dirfd >= 0)
		close(w.dirfd);
	w.dirfd = -1;
	free(spool_dir);
	spool_dir = NULL;
	return -1;
}

void
spool_reconfigure(const struct capd_settings *st)
{
	if (!atomic_load(&running))
		return;
	if (st->spool != NULL && strcmp(st->spool, spool_dir) != 0)
		log_notice("spool folder changes only at restart");
	pthread_mutex_lock(&q.mu);
	spool_settings(st);
	queue_wake();
	pthread_mutex_unlock(&q.mu);
}

void
spool_stop(void)
{
	struct chunk *c;

	if (!atomic_load(&running))
		return;
	atomic_store(&running, false);
	atomic_fetch_add(&gen, 1);  /* flows still open belong to this run only */
	pthread_mutex_lock(&q.mu);
	q.stop = true;
	queue_wake();
	pthread_mutex_unlock(&q.mu);
	pthread_join(writer_thread, NULL);
	reaper_stop();
	guard_stop();

	pthread_mutex_lock(&q.mu);
	while ((c = q.head) != NULL) {
		q.head = c->next;
		free(c);
	}
	while ((c = q.spare) != NULL) {
		q.spare = c->next;
		free(c);
	}
	q.tail = NULL;
	q.nspare = 0;
	q.queued = 0;
	q.path[0] = '\0';
	q.fail_err = 0;
	pthread_mutex_unlock(&q.mu);
	pthread_cond_destroy(&q.cv);

	for (int i = 0; i < w.nifaces; i++) {
		free(w.ifaces[i].name);
		free(w.ifaces[i].desc);
		free(w.ifaces[i].filter);
	}
	free(w.ifaces);
	free(w.idbs);
	free(w.touched);
	w.ifaces = NULL;
	w.idbs = NULL;
	w.touched = NULL;
	w.ntouched = w.atouched = 0;
	w.nifaces = w.nidb = w.nidb_good = w.aidb = 0;
	buf_free(&w.out);
	free(w.ext);
	free(w.iov);
	w.ext = NULL;
	w.iov = NULL;
	w.aext = w.aiov = 0;
	buf_free(&w.keys);
	buf_free(&w.keys_new);
	close(w.dirfd);
	w.dirfd = -1;
	w.name[0] = '\0';
	free(spool_dir);
	spool_dir = NULL;
}

/* ---- the producers' API (loop thread) ---- */

/*
 * The description of the nth interface of this run named name. An instance
 * removed and added again under its name may land in the file that holds the
 * old one's packets; two IDBs alike in name and description would leave an
 * analyst no way to tell whose packets are whose. The name stays the
 * instance's (filters on frame.interface_name, capture follow --instance);
 * the description of the second and later says so and when. Caller frees.
 */
static char *
spool_iface_desc(const char *name, const char *description, int nth)
{
	char when[32];
	struct tm tm;
	time_t now;

	if (nth < 2)
		return xstrdup(description);
	now = time(NULL);
	gmtime_r(&now, &tm);
	strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
	if (*description == '\0')
		return xasprintf("%s #%d, added %s", name, nth, when);
	return xasprintf("%s (%s #%d, added %s)", description, name, nth, when);
}

/* Under reg_mu: how many interfaces named name were made, this one too. */
static int
spool_iface_count(const char *name)
{
	int i;

	for (i = 0; i < niface_counts; i++)
		if (strcmp(iface_counts[i].name, name) == 0)
			return ++iface_counts[i].n;
	iface_counts = xrealloc(iface_counts, (size_t)(i + 1) * sizeof *iface_counts);
	iface_counts[i] = (struct iface_count){ xstrdup(name), 1 };
	niface_counts++;
	return 1;
}

/* Under reg_mu: a handle for a new interface, a released one when there is one. */
static int
spool_iface_slot(void)
{
	for (int h = 0; h < nlifaces; h++)
		if (lifaces[h].reusable && lifaces[h].followers == 0) {
			free(lifaces[h].name);
			free(lifaces[h].desc);
			free(lifaces[h].filter);
			return h;
		}
	lifaces = xrealloc(lifaces, (size_t)(nlifaces + 1) * sizeof *lifaces);
	lifaces[nlifaces].use = 0;
	lifaces[nlifaces].followers = 0;
	return nlifaces++;
}

static int
spool_iface_new(const char *name, const char *description, int linktype, unsigned snaplen, bool tsnano,
                const char *filter, bool sniffer)
{
	struct liface *li;
	int h, nth;

	if (name == NULL)
		name = "";
	pthread_mutex_lock(&reg_mu);
	/* counted since start, not from the table: a removed one's IDB may be in the current file */
	nth = spool_iface_count(name);
	h = spool_iface_slot();
	li = &lifaces[h];
	li->name = xstrdup(name);
	li->desc = spool_iface_desc(name, description ? description : "", nth);
	li->filter = xstrdup(filter ? filter : "");
	li->sniffer = sniffer;
	li->kernel_drop = li->queue_drop = 0;
	li->linktype = linktype;
	li->snaplen = snaplen;
	li->tsnano = tsnano;
	li->removed = false;
	li->reusable = false;
	li->use++;
	li->dropped = 0;
	if (atomic_load(&running))
		spool_queue_iface(h);
	pthread_mutex_unlock(&reg_mu);
	return h;
}

int
spool_iface_add(const char *name, const char *description, int linktype, unsigned snaplen, bool tsnano)
{
	return spool_iface_new(name, description, linktype, snaplen, tsnano, NULL, false);
}

int
spool_iface_add_sniffer(const char *name, const char *description, int linktype, unsigned snaplen,
                        bool tsnano, const char *filter)
{
	return spool_iface_new(name, description, linktype, snaplen, tsnano, filter, true);
}

void
spool_iface_hold(int iface, int delta)
{
	pthread_mutex_lock(&reg_mu);
	if (iface >= 0 && iface < nlifaces)
		lifaces[iface].followers += delta;
	pthread_mutex_unlock(&reg_mu);
}

void
spool_iface_stats(int iface, uint64_t kernel_drop, uint64_t queue_drop)
{
	pthread_mutex_lock(&reg_mu);
	if (iface >= 0 && iface < nlifaces) {
		lifaces[iface].kernel_drop = kernel_drop;
		lifaces[iface].queue_drop = queue_drop;
	}
	pthread_mutex_unlock(&reg_mu);
}

void
spool_iface_remove(int iface)
{
	struct rec r;

	pthread_mutex_lock(&reg_mu);
	if (iface >= 0 && iface < nlifaces && !lifaces[iface].removed) {
		lifaces[iface].removed = true;
		if (atomic_load(&running)) {
			rec_init(&r, REC_IFACE_REMOVE, NULL);
			r.iface = iface;
			queue_put(&r, NULL, 0, NULL, 0, false);
		}
	}
	pthread_mutex_unlock(&reg_mu);
}

static size_t
sockaddr_size(const struct sockaddr *sa)
{
	return sa->sa_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
}

static struct spool_flow *
spool_flow_open_as(int iface, uint64_t session_id, int proto, const struct sockaddr *client,
                   const struct sockaddr *target, const char *comment, bool inbound)
{
	struct rec_open o;
	struct spool_flow *f;
	struct rec r;
	size_t size = (sizeof *f + 63) & ~(size_t)63;

	if (!atomic_load_explicit(&running, memory_order_relaxed) || client == NULL || target == NULL)
		return NULL;
	if ((client->sa_family != AF_INET && client->sa_family != AF_INET6) ||
	    (target->sa_family != AF_INET && target->sa_family != AF_INET6) ||
	    (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return NULL;
	/* The writer's half is written from another thread: keep it off the loop's cache line. */
	if ((f = aligned_alloc(64, size)) == NULL)
		fatal("aligned_alloc");
	memset(f, 0, size);
	f->gen = atomic_load(&gen);
	f->proto = proto;
	f->mss = synth_mss(client, target);
	memset(&o, 0, sizeof o);
	memcpy(&o.client, client, sockaddr_size(client));
	memcpy(&o.target, target, sockaddr_size(target));
	o.session = session_id;
	o.proto = proto;
	o.inbound = inbound;
	rec_init(&r, REC_OPEN, f);
	r.iface = iface;
	queue_put(&r, &o, sizeof o, comment, comment ? strlen(comment) : 0, false);
	return f;
}

struct spool_flow *
spool_flow_open(int iface, uint64_t session_id, int proto, const struct sockaddr *client,
                const struct sockaddr *target, const char *comment)
{
	return spool_flow_open_as(iface, session_id, proto, client, target, comment, false);
}

struct spool_flow *
spool_flow_open_inbound(int iface, uint64_t session_id, const struct sockaddr *client,
                        const struct sockaddr *target, const char *comment)
{
	return spool_flow_open_as(iface, session_id, IPPROTO_TCP, client, target, comment, true);
}

void
spool_flow_data(struct spool_flow *f, enum dir d, const void *p, size_t n)
{
	struct rec r;
	int put;

	if ((n == 0 && f->proto == IPPROTO_TCP) || !flow_live(f))
		return;  /* an empty datagram is a packet; an empty TCP read is nothing */
	rec_init(&r, REC_DATA, f);
	r.dir = (uint8_t)d;
	if (n > QUEUE_MAX || (put = queue_put(&r, p, n, NULL, 0, true)) < 0) {
		if (f->proto == IPPROTO_TCP)
			f->gap[d] += n;
		spool_drop(synth_count(f->proto, f->mss, n), n);
		return;
	}
	flow_sent(f, put);
}

void *
spool_flow_reserve(struct spool_flow *f, enum dir d, size_t n, struct spool_slot *slot)
{
	struct rec r, *dst;
	size_t len = (sizeof r + n + 7) & ~(size_t)7;
	bool low, wake;

	if (n == 0 || n > QUEUE_MAX || !flow_live(f) || f->proto != IPPROTO_TCP)
		return NULL;
	rec_init(&r, REC_DATA, f);
	r.dir = (uint8_t)d;
	r.len = (uint32_t)len;
	r.n = 0;
	if ((dst = queue_claim(len, true, &low, &wake, &r.ts)) == NULL)
		return NULL;
	queue_header(dst, &r);
	flow_sent(f, low);
	slot->rec = dst;
	slot->cap = n;
	slot->wake = wake;
	return dst + 1;
}

void
spool_flow_commit(struct spool_slot *slot, size_t n)
{
	struct rec *dst = slot->rec;

	if (n > slot->cap)
		fatalx("spool: %zu bytes committed to a slot of %zu", n, slot->cap);
	dst->n = (uint32_t)n;  /* the record keeps its length: the rest is padding */
	/* summed here, where recv() has just left the bytes in this core's cache */
	if (n > 0 && (n + dst->flow->mss - 1) / dst->flow->mss <= REC_SUMS) {
		const uint8_t *p = (const uint8_t *)(dst + 1);

		for (size_t i = 0, off = 0; off < n; i++, off += dst->flow->mss)
			dst->sum[i] = synth_sum(p + off, n - off < dst->flow->mss ? n - off : dst->flow->mss);
		dst->flag = 1;
	}
	queue_publish(dst, slot->wake);
	slot->rec = NULL;
}

void
spool_flow_lost(struct spool_flow *f, enum dir d, size_t n)
{
	if (f != NULL && f->proto == IPPROTO_TCP && flow_live(f))
		f->gap[d] += n;  /* told to the writer with the flow's next record, its close at the latest */
}

void
spool_flow_fin(struct spool_flow *f, enum dir d)
{
	struct rec r;

	if (!flow_live(f))
		return;
	rec_init(&r, REC_FIN, f);
	r.dir = (uint8_t)d;
	flow_sent(f, queue_put(&r, NULL, 0, NULL, 0, false));
}

void
spool_flow_close(struct spool_flow *f, enum synth_end how)
{
	struct rec r;

	if (f == NULL)
		return;
	if (!flow_live(f)) {
		writer_flow_free(f);  /* the writer of its run is gone */
		return;
	}
	rec_init(&r, REC_CLOSE, f);
	r.flag = (uint8_t)how;
	queue_put(&r, NULL, 0, NULL, 0, false);  /* the writer frees f */
}

bool
spool_packet(int iface, const struct timespec *ts, const void *p, size_t caplen, size_t origlen)
{
	struct rec r;
	int put;

	if (!atomic_load_explicit(&running, memory_order_relaxed))
		return true;  /* capture is off, not dropping */
	rec_init(&r, REC_PACKET, NULL);
	r.ts = *ts;
	r.iface = iface;
	r.aux = (uint32_t)(origlen > UINT32_MAX ? UINT32_MAX : origlen);
	if (caplen > QUEUE_MAX || (put = queue_put(&r, p, caplen, NULL, 0, true)) < 0) {
		spool_drop(1, caplen);
		return false;
	}
	flow_sent(NULL, put);
	return true;
}

void
spool_keylog(const char *line)
{
	struct rec r;
	size_t n = strlen(line);

	if (!atomic_load(&running))
		return;
	while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		n--;
	rec_init(&r, REC_KEYLOG, NULL);
	queue_put(&r, line, n, NULL, 0, false);
}

unsigned
spool_sync(void)
{
	struct rec r;

	if (!atomic_load(&running))
		return 0;
	if (++sync_seq == 0)
		sync_seq = 1;  /* 0 says capture is off */
	atomic_fetch_add(&sync_marks, 1);
	rec_init(&r, REC_SYNC, NULL);
	r.aux = sync_seq;
	queue_put(&r, NULL, 0, NULL, 0, false);
	/* control records wake nobody (queue_claim): this one is waited for */
	pthread_mutex_lock(&q.mu);
	queue_wake();
	pthread_mutex_unlock(&q.mu);
	return sync_seq;
}

/*
 * The files in the folder now: the writer's count dates from its last
 * trim, and files deleted by hand since would still be counted. -1 when
 * the folder cannot be read.
 */
static long
spool_count_files(void)
{
	struct spool_file *v;
	size_t n;
	int fd;

	if (!atomic_load(&running) || (fd = open(spool_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		return -1;
	v = spool_list(fd, &n);
	free(v);
	close(fd);
	return (long)n;
}

json_t *
spool_status(void)
{
	char path[PATH_MAX];
	long files = spool_count_files();
	int fail_err;
	json_t *o;

	pthread_mutex_lock(&q.mu);
	memcpy(path, q.path, sizeof path);
	fail_err = q.fail_err;
	pthread_mutex_unlock(&q.mu);
	o = json_pack("{s:s,s:I,s:I,s:I,s:I,s:I}", "file", path,
	              "files", (json_int_t)(files >= 0 ? files : (long)atomic_load(&st_files)),
	              "bytes", (json_int_t)atomic_load(&st_bytes),
	              "packets", (json_int_t)atomic_load(&st_packets),
	              "dropped_packets", (json_int_t)atomic_load(&st_dropped_packets),
	              "dropped_bytes", (json_int_t)atomic_load(&st_dropped_bytes));
	/* as an instance's "error": only while it holds, so a script tests for the key */
	if (fail_err != 0 && atomic_load(&running))
		json_object_set_new(o, "error", json_string(strerror(fail_err)));
	return o;
}

unsigned
spool_rotate_request(void)
{
	unsigned want;

	if (!atomic_load(&running))
		return 0;
	pthread_mutex_lock(&q.mu);
	if ((want = ++q.rotate_req) == 0)
		want = ++q.rotate_req;  /* 0 says "not running" */
	queue_wake();
	pthread_mutex_unlock(&q.mu);
	return want;
}

/* Under q.mu: 1 when the writer has made request want's file, 0 while it has not got to it, -1 when it made none. */
static int
spool_rotated_locked(unsigned want, char **why)
{
	if ((int)(q.rotate_done - want) < 0)
		return 0;
	if (q.path[0] == '\0') {
		/* the old file is closed and no new one could be made: capture is being dropped */
		*why = xasprintf("cannot start a new capture file: %s; capd tries again every second",
		                 strerror(q.err ? q.err : EIO));
		return -1;
	}
	return 1;
}

int
spool_rotated(unsigned want, char **why)
{
	int r;

	pthread_mutex_lock(&q.mu);
	r = spool_rotated_locked(want, why);
	pthread_mutex_unlock(&q.mu);
	return r;
}

int
spool_rotate(char **why)
{
	struct timespec ts;
	unsigned want;
	int r;

	if ((want = spool_rotate_request()) == 0) {
		*why = xstrdup("capture is not running");
		return -1;
	}
	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += ROTATE_WAIT_SECS;
	pthread_mutex_lock(&q.mu);
	while ((r = spool_rotated_locked(want, why)) == 0)
		if (pthread_cond_timedwait(&q.done_cv, &q.mu, &ts) == ETIMEDOUT)
			break;
	pthread_mutex_unlock(&q.mu);
	if (r == 0)
		*why = xasprintf("capd's writer has not started the new capture file within %d s "
		                 "(a slow or hung disk?); it will when it can", ROTATE_WAIT_SECS);
	return r > 0 ? 0 : -1;
}

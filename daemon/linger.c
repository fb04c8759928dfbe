/* Lingering close (linger.h): one small object per socket, per loop thread. */
#include "linger.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/queue.h>
#include <unistd.h>

#include "spool.h"
#include "xmalloc.h"

struct linger_sock {
	LIST_ENTRY(linger_sock) entry;
	struct ev_loop *loop;
	ev_io io;
	ev_timer timer;
	int fd;
	struct spool_flow *flow;  /* a refusal's capture, or NULL (linger_start_flow) */
	bool data;                /* what is read goes to flow too */
};

/* a thread's lingerers: on its own loop only */
static _Thread_local LIST_HEAD(, linger_sock) linger_list;

static void
linger_end(struct linger_sock *l, enum synth_end how)
{
	if (l->flow != NULL)
		spool_flow_close(l->flow, how);
	/* unreferenced watchers are referenced again before they stop (libev's rule) */
	ev_ref(l->loop);
	ev_io_stop(l->loop, &l->io);
	ev_ref(l->loop);
	ev_timer_stop(l->loop, &l->timer);
	close(l->fd);
	LIST_REMOVE(l, entry);
	free(l);
}

static void
linger_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct linger_sock *l = w->data;
	char junk[16384];
	ssize_t n;

	(void)loop; (void)revents;
	for (int i = 0; i < 64; i++) {
		n = read(l->fd, junk, sizeof junk);
		if (n > 0) {
			if (l->flow != NULL && l->data)
				spool_flow_data(l->flow, DIR_UP, junk, (size_t)n);
			continue;
		}
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (n == 0 && l->flow != NULL)
			spool_flow_fin(l->flow, DIR_UP);
		/* the client closed (or reset): the close now is quiet */
		linger_end(l, n == 0 ? SYNTH_END_FIN : SYNTH_END_RST_CLIENT);
		return;
	}
}

static void
linger_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	linger_end(w->data, SYNTH_END_NONE);
}

void
linger_start(struct ev_loop *loop, int fd)
{
	linger_start_flow(loop, fd, NULL, false);
}

void
linger_start_flow(struct ev_loop *loop, int fd, struct spool_flow *flow, bool data)
{
	struct linger_sock *l = xcalloc(1, sizeof *l);

	l->loop = loop;
	l->fd = fd;
	l->flow = flow;
	l->data = data;
	ev_io_init(&l->io, linger_read_cb, fd, EV_READ);
	ev_timer_init(&l->timer, linger_timer_cb, LINGER_SECS, 0.);
	l->io.data = l->timer.data = l;
	ev_io_start(loop, &l->io);
	ev_unref(loop);
	ev_timer_start(loop, &l->timer);
	ev_unref(loop);
	LIST_INSERT_HEAD(&linger_list, l, entry);
}

void
linger_stop_all(void)
{
	while (!LIST_EMPTY(&linger_list))
		linger_end(LIST_FIRST(&linger_list), SYNTH_END_NONE);
}

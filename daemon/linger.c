/* Lingering close (linger.h): one small object per socket, per loop thread. */
#include "linger.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/queue.h>
#include <unistd.h>

#include "xmalloc.h"

struct linger {
	LIST_ENTRY(linger) entry;
	struct ev_loop *loop;
	ev_io io;
	ev_timer timer;
	int fd;
};

/* a thread's lingerers: on its own loop only */
static _Thread_local LIST_HEAD(, linger) linger_list;

static void
linger_end(struct linger *l)
{
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
	struct linger *l = w->data;
	char junk[16384];
	ssize_t n;

	(void)loop; (void)revents;
	for (int i = 0; i < 64; i++) {
		n = read(l->fd, junk, sizeof junk);
		if (n > 0)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		linger_end(l);  /* the client closed (or reset): the close now is quiet */
		return;
	}
}

static void
linger_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)loop; (void)revents;
	linger_end(w->data);
}

void
linger_start(struct ev_loop *loop, int fd)
{
	struct linger *l = xcalloc(1, sizeof *l);

	l->loop = loop;
	l->fd = fd;
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
		linger_end(LIST_FIRST(&linger_list));
}

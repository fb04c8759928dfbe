/* capctl output: aligned tables, JSON, human sizes and ages, and the watch on stdout's reader. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "capctl.h"
#include "values.h"
#include "xmalloc.h"

struct table {
	int ncols, nrows, cap;
	char **cells;  /* row-major, headers first */
};

struct table *
table_new(const char *const *headers, int ncols)
{
	struct table *t = xcalloc(1, sizeof *t);

	t->ncols = ncols;
	t->cap = 16;
	t->cells = xcalloc((size_t)(t->cap * ncols), sizeof *t->cells);
	for (int i = 0; i < ncols; i++)
		t->cells[i] = xstrdup(headers[i]);
	t->nrows = 1;
	return t;
}

void
table_add(struct table *t, ...)
{
	va_list ap;

	if (t->nrows == t->cap) {
		t->cap *= 2;
		t->cells = xrealloc(t->cells, (size_t)(t->cap * t->ncols) * sizeof *t->cells);
	}
	va_start(ap, t);
	for (int i = 0; i < t->ncols; i++) {
		const char *s = va_arg(ap, const char *);
		t->cells[t->nrows * t->ncols + i] = xstrdup(s ? s : "");
	}
	va_end(ap);
	t->nrows++;
}

/* The columns a cell takes on a terminal: its characters, not its bytes (capd's
 * strings are UTF-8, and a name or a traced command line may hold "é"). */
static int
table_width(const char *s)
{
	int n = 0;

	for (; *s != '\0'; s++)
		if (((unsigned char)*s & 0xc0) != 0x80)  /* not a continuation byte */
			n++;
	return n;
}

void
table_print(struct table *t)
{
	int *w = xcalloc((size_t)t->ncols, sizeof *w);

	for (int r = 0; r < t->nrows; r++)
		for (int c = 0; c < t->ncols; c++) {
			int len = table_width(t->cells[r * t->ncols + c]);
			if (len > w[c])
				w[c] = len;
		}
	for (int r = 0; r < t->nrows; r++) {
		for (int c = 0; c < t->ncols; c++) {
			const char *cell = t->cells[r * t->ncols + c];
			if (c == t->ncols - 1)
				printf("%s", cell);
			else
				printf("%s%*s", cell, w[c] - table_width(cell) + 2, "");
		}
		printf("\n");
	}
	free(w);
}

void
table_free(struct table *t)
{
	if (t == NULL)
		return;
	for (int i = 0; i < t->nrows * t->ncols; i++)
		free(t->cells[i]);
	free(t->cells);
	free(t);
}

void
output_json(const json_t *v)
{
	json_dumpf(v, stdout, JSON_INDENT(2) | JSON_ENCODE_ANY);
	printf("\n");
}

const char *
output_size(json_t *v, char *buf, size_t n)
{
	return value_human_size(json_is_integer(v) ? (uint64_t)json_integer_value(v) : 0, buf, n);
}

const char *
output_age(const char *rfc3339, char *buf, size_t n)
{
	struct tm tm = { 0 };
	time_t then, now = time(NULL);
	long d;

	if (rfc3339 == NULL || strptime(rfc3339, "%Y-%m-%dT%H:%M:%S", &tm) == NULL) {
		snprintf(buf, n, "-");
		return buf;
	}
	then = timegm(&tm);
	d = (long)(now - then);
	if (d < 0)
		d = 0;
	if (d < 120)
		snprintf(buf, n, "%lds", d);
	else if (d < 7200)
		snprintf(buf, n, "%ldm", d / 60);
	else if (d < 172800)
		snprintf(buf, n, "%ldh", d / 3600);
	else
		snprintf(buf, n, "%ldd", d / 86400);
	return buf;
}

/*
 * Watches stdout while capctl waits for capd: a pipe whose reader went away
 * reports POLLERR at once, so `| head -1` ends a follow or a tail without
 * waiting for the next packet or event to fail with EPIPE, which on a quiet
 * capd never comes.
 */
static void *
output_watch_cb(void *arg)
{
	struct pollfd pfd = { .fd = STDOUT_FILENO, .events = 0 };

	(void)arg;
	for (;;) {
		if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
			return NULL;
		if (pfd.revents & (POLLERR | POLLHUP))
			_exit(CTL_OK);
		if (pfd.revents & POLLNVAL)
			return NULL;
	}
}

void
output_watch_reader(void)
{
	pthread_t t;

	if (pthread_create(&t, NULL, output_watch_cb, NULL) == 0)
		pthread_detach(t);
}

/* Cleaning a path without changing the file it names; see path.h. */
#include "path.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "buf.h"
#include "xmalloc.h"

/* The path built so far is a struct buf (off 0): "" is the root, else
 * "/a/b" (no trailing slash), with a NUL kept past its end for lstat(2). */
static const char *
path_str(const struct buf *b)
{
	return (const char *)b->data;
}

static void
path_buf_add(struct buf *b, const char *comp, size_t n)
{
	uint8_t *w = buf_reserve(b, n + 2);

	w[0] = '/';
	memcpy(w + 1, comp, n);
	w[n + 1] = '\0';
	buf_commit(b, n + 1);
}

static void
path_buf_pop(struct buf *b)
{
	while (b->len > 0 && b->data[--b->len] != '/')
		;
	b->data[b->len] = '\0';
}

static void path_buf_walk(struct buf *b, const char *p);

/* A ".." after what has been built: "a/.." is the folder above a only when
 * a is a folder the kernel would walk into and back out of. */
static void
path_buf_up(struct buf *b)
{
	struct stat st;
	char *real;

	if (b->len == 0)  /* "/.." is "/" */
		return;
	if (b->len >= 3 && !strcmp(path_str(b) + b->len - 3, "/..")) {  /* a ".." kept before */
		path_buf_add(b, "..", 2);
		return;
	}
	if (lstat(path_str(b), &st) < 0 || !(S_ISDIR(st.st_mode) || S_ISLNK(st.st_mode))) {
		/* missing (or a file): the kernel fails this walk, and so must the cleaned path */
		path_buf_add(b, "..", 2);
		return;
	}
	if (S_ISLNK(st.st_mode)) {
		/* link/.. is the folder above where the link points, not the one holding it */
		if ((real = realpath(path_str(b), NULL)) == NULL || real[0] != '/' ||
		    (stat(real, &st) == 0 && !S_ISDIR(st.st_mode))) {
			free(real);
			path_buf_add(b, "..", 2);
			return;
		}
		/* realpath's "/" is the buffer's "" */
		b->len = 0;
		if (strcmp(real, "/"))
			path_buf_walk(b, real);
		free(real);
	}
	path_buf_pop(b);
}

/* Appends the components of p, cleaned as they come. */
static void
path_buf_walk(struct buf *b, const char *p)
{
	while (*p != '\0') {
		size_t n = strcspn(p, "/");

		if (n == 2 && p[0] == '.' && p[1] == '.')
			path_buf_up(b);
		else if (n > 0 && !(n == 1 && p[0] == '.'))
			path_buf_add(b, p, n);
		p += n;
		p += strspn(p, "/");
	}
}

char *
path_clean(const char *base, const char *path)
{
	struct buf b = { 0 };
	size_t n = strlen(path);

	if (path[0] != '/' && (base == NULL || base[0] != '/'))
		return base == NULL ? xstrdup(path) : xasprintf("%s/%s", base, path);
	*buf_reserve(&b, 1) = '\0';
	if (path[0] != '/')
		path_buf_walk(&b, base);
	path_buf_walk(&b, path);
	if (b.len == 0 || (n > 0 && path[n - 1] == '/'))
		path_buf_add(&b, "", 0);
	return (char *)b.data;  /* the caller owns the storage, NUL-terminated */
}

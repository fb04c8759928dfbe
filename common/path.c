/* Cleaning a path without changing the file it names; see path.h. */
#include "path.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "xmalloc.h"

/* The path built so far: "" is the root, else "/a/b" (no trailing slash). */
struct path_buf {
	char *s;    /* owned; always NUL-terminated at len */
	size_t len;
	size_t cap;
};

static void
path_buf_add(struct path_buf *b, const char *comp, size_t n)
{
	if (b->len + n + 2 > b->cap) {
		b->cap = (b->len + n + 2) * 2;
		b->s = xrealloc(b->s, b->cap);
	}
	b->s[b->len++] = '/';
	memcpy(b->s + b->len, comp, n);
	b->len += n;
	b->s[b->len] = '\0';
}

static void
path_buf_pop(struct path_buf *b)
{
	while (b->len > 0 && b->s[--b->len] != '/')
		;
	b->s[b->len] = '\0';
}

/* A ".." after what has been built: "a/.." is the folder above a only when
 * a is a folder the kernel would walk into and back out of. */
static void
path_buf_up(struct path_buf *b)
{
	struct stat st;
	char *real;

	if (b->len == 0)  /* "/.." is "/" */
		return;
	if (b->len >= 3 && !strcmp(b->s + b->len - 3, "/..")) {  /* a ".." kept before */
		path_buf_add(b, "..", 2);
		return;
	}
	if (lstat(b->s, &st) < 0 || !(S_ISDIR(st.st_mode) || S_ISLNK(st.st_mode))) {
		/* missing (or a file): the kernel fails this walk, and so must the cleaned path */
		path_buf_add(b, "..", 2);
		return;
	}
	if (S_ISLNK(st.st_mode)) {
		/* link/.. is the folder above where the link points, not the one holding it */
		if ((real = realpath(b->s, NULL)) == NULL || real[0] != '/' ||
		    (stat(real, &st) == 0 && !S_ISDIR(st.st_mode))) {
			free(real);
			path_buf_add(b, "..", 2);
			return;
		}
		free(b->s);
		b->len = strlen(real);
		b->cap = b->len + 1;
		b->s = real;
		if (b->len == 1)  /* realpath's "/" is the buffer's "" */
			b->s[b->len = 0] = '\0';
	}
	path_buf_pop(b);
}

/* Appends the components of p, cleaned as they come. */
static void
path_buf_walk(struct path_buf *b, const char *p)
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
	struct path_buf b;
	size_t n = strlen(path);

	if (path[0] != '/' && (base == NULL || base[0] != '/'))
		return base == NULL ? xstrdup(path) : xasprintf("%s/%s", base, path);
	b.cap = (path[0] == '/' ? 0 : strlen(base)) + n + 2;
	b.s = xmalloc(b.cap);
	b.len = 0;
	b.s[0] = '\0';
	if (path[0] != '/')
		path_buf_walk(&b, base);
	path_buf_walk(&b, path);
	if (b.len == 0 || (n > 0 && path[n - 1] == '/'))
		path_buf_add(&b, "", 0);
	return b.s;
}

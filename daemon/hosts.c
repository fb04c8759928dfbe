/*
 * The hosts-file block editor and its file writer. capd's entries live
 * between HOSTS_BEGIN and HOSTS_END; every byte outside that block is kept
 * as it was. hosts_block_* are pure (text in, text out); hosts_file_update
 * does the safe replacement. The daemon's operations are in rpc-hosts.c.
 */
#include "hosts.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "buf.h"
#include "xmalloc.h"

#define HOSTS_FILE_MAX (16 * 1024 * 1024)  /* a larger hosts file is refused, not loaded */
#define HOSTS_LOCK_TRIES 20                /* 20 x 5 ms for another writer's flock: the loop waits 100 ms at most */

/* ---- the entry set ---- */

void
hosts_set_free(struct hosts_set *set)
{
	free(set->v);
	set->v = NULL;
	set->n = 0;
}

void
hosts_set_put(struct hosts_set *set, const char *name, const char *addr)
{
	for (size_t i = 0; i < set->n; i++)
		if (strcasecmp(set->v[i].name, name) == 0) {
			snprintf(set->v[i].addr, sizeof set->v[i].addr, "%s", addr);
			return;
		}
	set->v = xrealloc(set->v, (set->n + 1) * sizeof *set->v);
	snprintf(set->v[set->n].name, sizeof set->v[set->n].name, "%s", name);
	snprintf(set->v[set->n].addr, sizeof set->v[set->n].addr, "%s", addr);
	set->n++;
}

bool
hosts_set_del(struct hosts_set *set, const char *name)
{
	for (size_t i = 0; i < set->n; i++)
		if (strcasecmp(set->v[i].name, name) == 0) {
			memmove(&set->v[i], &set->v[i + 1], (set->n - i - 1) * sizeof set->v[0]);
			set->n--;
			return true;
		}
	return false;
}

int
hosts_entry_check(const char *name, const char *addr, char norm[HOSTS_ADDR_MAX], char **why)
{
	char a[HOSTS_ADDR_MAX + 2];
	unsigned char bin[16];
	size_t len;

	if (name == NULL || !hostname_valid(name) || name[strlen(name) - 1] == '.' || addr_is_ip_literal(name)) {
		*why = xasprintf("'%s' is not a valid host name", name ? name : "");
		return -1;
	}
	if (addr == NULL || (len = strlen(addr)) == 0 || len > HOSTS_ADDR_MAX) {
		*why = xasprintf("'%s' is not an IP address", addr ? addr : "");
		return -1;
	}
	if (addr[0] == '[' && addr[len - 1] == ']') {
		memcpy(a, addr + 1, len - 2);
		a[len - 2] = '\0';
	} else {
		memcpy(a, addr, len + 1);
	}
	if (inet_pton(AF_INET, a, bin) == 1)
		inet_ntop(AF_INET, bin, norm, HOSTS_ADDR_MAX);
	else if (inet_pton(AF_INET6, a, bin) == 1)
		inet_ntop(AF_INET6, bin, norm, HOSTS_ADDR_MAX);
	else {
		*why = xasprintf("'%s' is not an IP address", addr);
		return -1;
	}
	return 0;
}

/* ---- the block ---- */

/* One line of text: [start, start+len) without its newline; next is where the following line starts. */
struct hosts_line {
	const char *start;
	size_t len, next;
};

static bool
hosts_next_line(const char *text, size_t tlen, size_t off, struct hosts_line *l)
{
	const char *nl;

	if (off >= tlen)
		return false;
	l->start = text + off;
	nl = memchr(l->start, '\n', tlen - off);
	l->len = nl ? (size_t)(nl - l->start) : tlen - off;
	l->next = off + l->len + (nl ? 1 : 0);
	return true;
}

/* The line without trailing blanks and CR equals s. */
static bool
hosts_line_is(const struct hosts_line *l, const char *s)
{
	size_t n = l->len, slen = strlen(s);

	while (n > 0 && (l->start[n - 1] == ' ' || l->start[n - 1] == '\t' || l->start[n - 1] == '\r'))
		n--;
	return n == slen && memcmp(l->start, s, n) == 0;
}

static bool
hosts_line_begins_block(const struct hosts_line *l)
{
	static const char tag[] = "# BEGIN capd";
	size_t t = sizeof tag - 1;

	if (l->len < t || memcmp(l->start, tag, t) != 0)
		return false;
	return l->len == t || l->start[t] == ':' || l->start[t] == ' ' || l->start[t] == '\t' || l->start[t] == '\r';
}

/* Adds the entries of one block line ("ADDR NAME [NAME...]", comments skipped). */
static void
hosts_parse_entry(const struct hosts_line *l, struct hosts_set *set)
{
	char line[1024], *save = NULL, *addr, *name, norm[HOSTS_ADDR_MAX], *why = NULL;
	size_t n = l->len < sizeof line - 1 ? l->len : sizeof line - 1;

	memcpy(line, l->start, n);
	line[n] = '\0';
	if ((name = strchr(line, '#')) != NULL)
		*name = '\0';
	if ((addr = strtok_r(line, " \t\r", &save)) == NULL)
		return;
	while ((name = strtok_r(NULL, " \t\r", &save)) != NULL) {
		if (hosts_entry_check(name, addr, norm, &why) == 0)
			hosts_set_put(set, name, norm);
		free(why);
		why = NULL;
	}
}

int
hosts_block_parse(const char *text, size_t len, struct hosts_set *set, char **why)
{
	struct hosts_line l;
	size_t off = 0;
	bool in = false, found = false;

	hosts_set_free(set);
	while (hosts_next_line(text, len, off, &l)) {
		off = l.next;
		if (!in && hosts_line_begins_block(&l)) {
			in = found = true;
		} else if (in && hosts_line_is(&l, HOSTS_END)) {
			in = false;
		} else if (in) {
			hosts_parse_entry(&l, set);
		}
	}
	if (in) {
		*why = xasprintf("the hosts file has a '# BEGIN capd' line without '%s': fix it by hand", HOSTS_END);
		hosts_set_free(set);
		return -1;
	}
	return found ? 1 : 0;
}

static void
hosts_block_write(struct buf *b, const struct hosts_set *set)
{
	if (set->n == 0)
		return;
	buf_printf(b, "%s\n", HOSTS_BEGIN);
	for (size_t i = 0; i < set->n; i++)
		buf_printf(b, "%s\t%s\n", set->v[i].addr, set->v[i].name);
	buf_printf(b, "%s\n", HOSTS_END);
}

char *
hosts_block_apply(const char *text, size_t len, const struct hosts_set *set, size_t *outlen, char **why)
{
	struct buf b = { 0 };
	struct hosts_line l;
	size_t off = 0;
	bool in = false, written = false;
	char *out;

	while (hosts_next_line(text, len, off, &l)) {
		off = l.next;
		if (!in && hosts_line_begins_block(&l)) {
			in = true;
			if (!written)
				hosts_block_write(&b, set);  /* the first block takes the entries, later ones go */
			written = true;
		} else if (in) {
			if (hosts_line_is(&l, HOSTS_END))
				in = false;
		} else {
			buf_append(&b, l.start, l.next - (size_t)(l.start - text));
		}
	}
	if (in) {
		*why = xasprintf("the hosts file has a '# BEGIN capd' line without '%s': fix it by hand", HOSTS_END);
		buf_free(&b);
		return NULL;
	}
	if (!written && set->n > 0) {
		if (len > 0 && text[len - 1] != '\n')
			buf_append(&b, "\n", 1);  /* the last line gets the newline it lacked */
		hosts_block_write(&b, set);
	}
	*outlen = buf_used(&b);
	out = xmalloc(*outlen + 1);
	if (*outlen)
		memcpy(out, buf_head(&b), *outlen);
	out[*outlen] = '\0';
	buf_free(&b);
	return out;
}

/* ---- the file ---- */

static char *
hosts_read_fd(int fd, size_t *len, char **why, const char *path)
{
	struct buf b = { 0 };
	char *out;

	for (;;) {
		ssize_t n = read(fd, buf_reserve(&b, 65536), 65536);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			*why = xasprintf("cannot read %s: %s", path, strerror(errno));
			buf_free(&b);
			return NULL;
		}
		if (n == 0)
			break;
		buf_commit(&b, (size_t)n);
		if (buf_used(&b) > HOSTS_FILE_MAX) {
			*why = xasprintf("%s is larger than %d MiB", path, HOSTS_FILE_MAX >> 20);
			buf_free(&b);
			return NULL;
		}
	}
	*len = buf_used(&b);
	out = xmalloc(*len + 1);
	if (*len)
		memcpy(out, buf_head(&b), *len);
	out[*len] = '\0';
	buf_free(&b);
	return out;
}

char *
hosts_file_read(const char *path, size_t *len, char **why)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	char *text;

	if (fd < 0) {
		int e = errno;
		*why = xasprintf("cannot open %s: %s", path, strerror(e));
		errno = e;
		return NULL;
	}
	text = hosts_read_fd(fd, len, why, path);
	close(fd);
	return text;
}

static int
hosts_write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void
hosts_fsync_dir(const char *path)
{
	char *copy = xstrdup(path);
	int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
	free(copy);
}

/* A temp file beside path with text, mode and owner of st (when st_valid), fsync'd. Its path, or NULL. */
static char *
hosts_temp_write(const char *path, const char *text, size_t len, const struct stat *st, bool st_valid, int *err)
{
	char *copy = xstrdup(path), *copy2 = xstrdup(path);
	char *tmp = xasprintf("%s/.%s.capd-XXXXXX", dirname(copy), basename(copy2));
	int fd;

	free(copy);
	free(copy2);
	if ((fd = mkostemp(tmp, O_CLOEXEC)) < 0) {
		*err = errno;
		free(tmp);
		return NULL;
	}
	if (hosts_write_all(fd, text, len) < 0 || fchmod(fd, st_valid ? st->st_mode & 07777 : 0644) < 0 ||
	    (st_valid && (st->st_uid != geteuid() || st->st_gid != getegid()) && fchown(fd, st->st_uid, st->st_gid) < 0) ||
	    fsync(fd) < 0) {
		*err = errno;
		close(fd);
		unlink(tmp);
		free(tmp);
		return NULL;
	}
	if (close(fd) < 0) {
		*err = errno;
		unlink(tmp);
		free(tmp);
		return NULL;
	}
	return tmp;
}

/* Saves the old text before an in-place rewrite: beside the file, else in backup_dir. */
static int
hosts_backup(const char *path, const char *backup_dir, const char *text, size_t len, const struct stat *st, char **why)
{
	const char *where[2] = { NULL, NULL };
	char *bpath[2];
	int err = 0;

	bpath[0] = xasprintf("%s.capd-backup", path);
	bpath[1] = backup_dir ? xasprintf("%s/hosts.capd-backup", backup_dir) : NULL;
	for (int i = 0; i < 2; i++) {
		char *tmp;
		if (bpath[i] == NULL)
			continue;
		if ((tmp = hosts_temp_write(bpath[i], text, len, st, true, &err)) == NULL)
			continue;
		if (rename(tmp, bpath[i]) == 0) {
			where[0] = bpath[i];
			free(tmp);
			break;
		}
		err = errno;
		unlink(tmp);
		free(tmp);
	}
	if (where[0] == NULL)
		*why = xasprintf("cannot save a backup of %s before rewriting it in place: %s", path, strerror(err));
	free(bpath[0]);
	free(bpath[1]);
	return where[0] ? 0 : -1;
}

/* The in-place path for a file rename cannot replace: flock, re-read, back up, rewrite, truncate. */
static int
hosts_update_in_place(const char *path, const char *backup_dir, hosts_edit_fn fn, void *arg, char **why)
{
	struct stat st;
	char *cur = NULL, *next = NULL;
	size_t len = 0, nlen = 0;
	int fd, rv = -1, tries = 0;

	if ((fd = open(path, O_RDWR | O_CLOEXEC)) < 0) {
		*why = xasprintf("cannot open %s for writing: %s", path, strerror(errno));
		return -1;
	}
	while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if ((errno != EWOULDBLOCK && errno != EINTR) || ++tries >= HOSTS_LOCK_TRIES) {
			*why = xasprintf("cannot lock %s: %s", path, strerror(errno));
			close(fd);
			return -1;
		}
		nanosleep(&(struct timespec){ .tv_nsec = 5 * 1000 * 1000 }, NULL);
	}
	if (fstat(fd, &st) < 0) {
		*why = xasprintf("cannot stat %s: %s", path, strerror(errno));
		goto out;
	}
	if ((cur = hosts_read_fd(fd, &len, why, path)) == NULL)
		goto out;
	if ((next = fn(cur, len, &nlen, arg, why)) == NULL)
		goto out;
	if (nlen == len && memcmp(cur, next, len) == 0) {
		rv = 0;
		goto out;
	}
	if (hosts_backup(path, backup_dir, cur, len, &st, why) < 0)
		goto out;
	if (lseek(fd, 0, SEEK_SET) < 0 || hosts_write_all(fd, next, nlen) < 0 || ftruncate(fd, (off_t)nlen) < 0 ||
	    fsync(fd) < 0) {
		*why = xasprintf("cannot rewrite %s in place: %s (its old text is in the backup)", path, strerror(errno));
		goto out;
	}
	rv = 0;
out:
	flock(fd, LOCK_UN);
	close(fd);
	free(cur);
	free(next);
	return rv;
}

int
hosts_file_update(const char *path, const char *backup_dir, hosts_edit_fn fn, void *arg, char **why)
{
	char real[PATH_MAX], *cur, *next = NULL, *tmp = NULL;
	size_t len = 0, nlen = 0;
	struct stat st;
	bool st_valid;
	int err = 0;

	/* a symlinked hosts file is edited where it points */
	if (realpath(path, real) == NULL) {
		if (errno != ENOENT) {
			*why = xasprintf("cannot resolve %s: %s", path, strerror(errno));
			return -1;
		}
		snprintf(real, sizeof real, "%s", path);
	}
	st_valid = stat(real, &st) == 0;
	if ((cur = hosts_file_read(real, &len, why)) == NULL) {
		if (errno != ENOENT)
			return -1;
		free(*why);
		*why = NULL;
		cur = xstrdup("");
		len = 0;
	}
	if ((next = fn(cur, len, &nlen, arg, why)) == NULL) {
		free(cur);
		return -1;
	}
	if (nlen == len && memcmp(cur, next, len) == 0) {
		free(cur);
		free(next);
		return 0;  /* nothing changes: the file is not touched */
	}
	free(cur);
	tmp = hosts_temp_write(real, next, nlen, &st, st_valid, &err);
	free(next);
	if (tmp != NULL) {
		if (rename(tmp, real) == 0) {
			free(tmp);
			hosts_fsync_dir(real);
			return 0;
		}
		err = errno;
		unlink(tmp);
		free(tmp);
		if (err != EBUSY && err != EXDEV) {
			*why = xasprintf("cannot replace %s: %s", real, strerror(err));
			return -1;
		}
	} else if (err != EACCES && err != EROFS && err != EPERM) {
		*why = xasprintf("cannot write a temp file beside %s: %s", real, strerror(err));
		return -1;
	}
	if (!st_valid) {
		*why = xasprintf("cannot create %s: %s", real, strerror(err));
		return -1;
	}
	/* a bind mount (EBUSY, EXDEV) or a folder we cannot write: rewrite the file itself */
	return hosts_update_in_place(real, backup_dir, fn, arg, why);
}

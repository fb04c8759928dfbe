/*
 * The hosts-file block editor and its file writer. capd's entries live
 * between HOSTS_BEGIN and HOSTS_END; every byte outside that block is kept
 * as it was. hosts_block_* are pure (text in, text out); hosts_file_update
 * does the safe replacement. The daemon's operations are in rpc-hosts.c.
 */
#include "hosts.h"

#include <arpa/inet.h>
#include <ctype.h>
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
#define HOSTS_EDIT_TRIES 20                /* edits redone because another program wrote the file meanwhile */
#define HOSTS_LINK_MAX 40                  /* symlinks followed to a file not made yet, as SYMLOOP_MAX */

/* ---- the entry set ---- */

void
hosts_set_free(struct hosts_set *set)
{
	free(set->v);
	set->v = NULL;
	set->n = 0;
}

int
hosts_addr_family(const char *addr)
{
	return strchr(addr, ':') != NULL ? AF_INET6 : AF_INET;
}

void
hosts_set_put(struct hosts_set *set, const char *name, const char *addr)
{
	int fam = hosts_addr_family(addr);
	size_t i, k, first = set->n, last = set->n;

	for (i = 0; i < set->n; i++) {
		if (strcasecmp(set->v[i].name, name) != 0)
			continue;
		last = i;
		if (first == set->n && hosts_addr_family(set->v[i].addr) == fam)
			first = i;
	}
	if (first < set->n) {
		/* the name's first line of that family takes the address, its other lines of that family go */
		snprintf(set->v[first].addr, sizeof set->v[first].addr, "%s", addr);
		for (k = i = first + 1; i < set->n; i++)
			if (strcasecmp(set->v[i].name, name) != 0 || hosts_addr_family(set->v[i].addr) != fam)
				set->v[k++] = set->v[i];
		set->n = k;
		return;
	}
	if (last == set->n) {
		hosts_set_keep(set, name, addr);
		return;
	}
	/* a line of the other family only: the new one goes right after the name's last line,
	 * spelt as that line has it (as a replaced line keeps its spelling) */
	set->v = xrealloc(set->v, (set->n + 1) * sizeof *set->v);
	memmove(set->v + last + 2, set->v + last + 1, (set->n - last - 1) * sizeof *set->v);
	set->v[last + 1] = set->v[last];
	snprintf(set->v[last + 1].addr, sizeof set->v[last + 1].addr, "%s", addr);
	set->n++;
}

void
hosts_set_keep(struct hosts_set *set, const char *name, const char *addr)
{
	for (size_t i = 0; i < set->n; i++)
		if (strcasecmp(set->v[i].name, name) == 0 && strcmp(set->v[i].addr, addr) == 0)
			return;
	set->v = xrealloc(set->v, (set->n + 1) * sizeof *set->v);
	snprintf(set->v[set->n].name, sizeof set->v[set->n].name, "%s", name);
	snprintf(set->v[set->n].addr, sizeof set->v[set->n].addr, "%s", addr);
	set->n++;
}

bool
hosts_set_del(struct hosts_set *set, const char *name)
{
	size_t k = 0;

	for (size_t i = 0; i < set->n; i++)
		if (strcasecmp(set->v[i].name, name) != 0)
			set->v[k++] = set->v[i];
	if (k == set->n)
		return false;
	set->n = k;
	return true;
}

int
hosts_entry_check(const char *name, const char *addr, char norm[HOSTS_ADDR_MAX], char **why)
{
	char a[HOSTS_ADDR_MAX + 2];
	unsigned char bin[16];
	size_t len;
	struct in_addr v4;

	if (name == NULL || !hostname_valid(name) || name[strlen(name) - 1] == '.' || addr_is_ip_literal(name)) {
		*why = xasprintf("'%s' is not a valid host name%s", name ? name : "",
		                 name ? hostname_idn_hint(name) : "");
		return -1;
	}
	if (inet_aton(name, &v4) != 0) {
		/* "1.2.3", "123", "0x7f.1": getaddrinfo takes these as addresses and never reads the file */
		inet_ntop(AF_INET, &v4, a, sizeof a);
		*why = xasprintf("'%s' is not a valid host name: resolvers read it as the address %s", name, a);
		return -1;
	}
	if (addr == NULL || (len = strlen(addr)) == 0 || len > HOSTS_ADDR_MAX + 1) {  /* 45 bytes in brackets */
		*why = xasprintf("'%s' is not an IP address", addr ? addr : "");
		return -1;
	}
	if (addr[0] == '[' && addr[len - 1] == ']') {
		memcpy(a, addr + 1, len - 2);
		a[len - 2] = '\0';
	} else {
		memcpy(a, addr, len + 1);
	}
	if (inet_pton(AF_INET, a, bin) == 1) {
		if (addr[0] == '[') {
			/* brackets are for IPv6 (RFC 3986 IP-literal), as in listen and upstream */
			*why = xasprintf("'%s' is not an IP address: brackets are for IPv6 (write %s)", addr, a);
			return -1;
		}
		inet_ntop(AF_INET, bin, norm, HOSTS_ADDR_MAX);
	} else if (inet_pton(AF_INET6, a, bin) == 1)
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
	/* the whole line, however long: a name cut at a fixed size would be taken for another */
	char *line = xmalloc(l->len + 1), *save = NULL, *addr, *name, norm[HOSTS_ADDR_MAX], *why = NULL;

	memcpy(line, l->start, l->len);
	line[l->len] = '\0';
	if ((name = strchr(line, '#')) != NULL)
		*name = '\0';
	if ((addr = strtok_r(line, " \t\r", &save)) == NULL) {
		free(line);
		return;
	}
	while ((name = strtok_r(NULL, " \t\r", &save)) != NULL) {
		if (hosts_entry_check(name, addr, norm, &why) == 0)
			hosts_set_keep(set, name, norm);  /* a name's every line: an IPv4 and an IPv6 one */
		free(why);
		why = NULL;
	}
	free(line);
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

/* Where capd's block begins (its first marker line), or len when there is none. */
static size_t
hosts_block_start(const char *text, size_t len)
{
	struct hosts_line l;
	size_t off = 0;

	while (hosts_next_line(text, len, off, &l)) {
		if (hosts_line_begins_block(&l))
			return off;
		off = l.next;
	}
	return len;
}

size_t
hosts_shadow(const char *text, size_t len, const char *name, char addr[HOSTS_ADDR_MAX])
{
	size_t nlen = strlen(name), end = hosts_block_start(text, len);
	int c0 = tolower((unsigned char)name[0]);

	/* a search for the name first: an ad-blocking hosts file has 100000s of lines to parse */
	for (size_t i = 0; nlen > 0 && i + nlen <= end; i++) {
		struct hosts_set set = { 0 };
		struct hosts_line l;
		size_t start = i, lines = 1;

		if (tolower((unsigned char)text[i]) != c0 || strncasecmp(text + i, name, nlen) != 0)
			continue;
		while (start > 0 && text[start - 1] != '\n')
			start--;
		if (!hosts_next_line(text, len, start, &l))
			break;  /* cannot happen: start <= i < len */
		hosts_parse_entry(&l, &set);
		for (size_t k = 0; k < set.n; k++)
			if (strcasecmp(set.v[k].name, name) == 0) {
				snprintf(addr, HOSTS_ADDR_MAX, "%s", set.v[k].addr);
				hosts_set_free(&set);
				for (const char *p = text; (p = memchr(p, '\n', (size_t)(text + start - p))) != NULL; p++)
					lines++;
				return lines;
			}
		hosts_set_free(&set);
		i = l.next - 1;  /* the rest of this line maps other names */
	}
	return 0;
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
	if (text == NULL)
		errno = EIO;  /* never ENOENT: the file is there, it cannot be read */
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
	/* XXXXXX is mkostemp(3)'s template, replaced by it with a unique suffix */
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

/* Takes fd's flock, waiting a little for another writer's. 0, or -1 with *why. */
static int
hosts_lock(int fd, const char *path, char **why)
{
	int tries = 0;

	while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if ((errno != EWOULDBLOCK && errno != EINTR) || ++tries >= HOSTS_LOCK_TRIES) {
			*why = xasprintf("cannot lock %s: %s", path, strerror(errno));
			return -1;
		}
		nanosleep(&(struct timespec){ .tv_nsec = 5 * 1000 * 1000 }, NULL);
	}
	return 0;
}

/* The in-place path for a file rename cannot replace: flock, re-read, back up, rewrite, truncate. */
static int
hosts_update_in_place(const char *path, const char *backup_dir, hosts_edit_fn fn, void *arg, char **why)
{
	struct stat st;
	char *cur = NULL, *next = NULL;
	size_t len = 0, nlen = 0;
	int fd, rv = -1;

	if ((fd = open(path, O_RDWR | O_CLOEXEC)) < 0) {
		*why = xasprintf("cannot open %s for writing: %s", path, strerror(errno));
		return -1;
	}
	if (hosts_lock(fd, path, why) < 0) {
		close(fd);
		return -1;
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

bool
hosts_stat_same(const struct stat *a, const struct stat *b)
{
	return a->st_ino == b->st_ino && a->st_dev == b->st_dev && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* The file as one edit read it. Owned by hosts_replace; hosts_snap_close releases it. */
struct hosts_snap {
	int fd;          /* the file, flock'd for the edit; -1 when it does not exist */
	struct stat st;  /* fstat'd just before text was read */
	char *text;
	size_t len;
};

static void
hosts_snap_close(struct hosts_snap *s)
{
	if (s->fd >= 0) {
		flock(s->fd, LOCK_UN);
		close(s->fd);
		s->fd = -1;
	}
	free(s->text);
	s->text = NULL;
}

enum hosts_step {
	HOSTS_STEP_DONE,      /* replaced, or nothing to change */
	HOSTS_STEP_FAILED,    /* *why says why */
	HOSTS_STEP_CHANGED,   /* another program wrote the file during the edit: edit its new text */
	HOSTS_STEP_IN_PLACE,  /* rename cannot replace it: rewrite it in place */
};

/* Reads the whole file through s->fd into s->text, and its fstat from just before: 0, 1 when it
 * grew meanwhile, -1 with *why. */
static int
hosts_snap_read(struct hosts_snap *s, const char *path, char **why)
{
	free(s->text);
	s->text = NULL;
	if (fstat(s->fd, &s->st) < 0) {
		*why = xasprintf("cannot stat %s: %s", path, strerror(errno));
		return -1;
	}
	if (lseek(s->fd, 0, SEEK_SET) < 0) {
		*why = xasprintf("cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	if ((s->text = hosts_read_fd(s->fd, &s->len, why, path)) == NULL)
		return -1;
	return (off_t)s->len == s->st.st_size ? 0 : 1;
}

/* Opens, locks and reads path (a missing file reads as empty). */
static enum hosts_step
hosts_snap_take(const char *path, struct hosts_snap *s, char **why)
{
	int rv = -1;

	memset(s, 0, sizeof *s);
	if ((s->fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		if (errno != ENOENT) {
			*why = xasprintf("cannot open %s: %s", path, strerror(errno));
			return HOSTS_STEP_FAILED;
		}
		s->text = xstrdup("");
		return HOSTS_STEP_DONE;
	}
	if (hosts_lock(s->fd, path, why) < 0 || (rv = hosts_snap_read(s, path, why)) != 0) {
		hosts_snap_close(s);
		return rv > 0 ? HOSTS_STEP_CHANGED : HOSTS_STEP_FAILED;
	}
	return HOSTS_STEP_DONE;
}

/*
 * Whether now only adds lines at the end of the text s read: then the edit of the old
 * text plus those lines is the edit of the new one. A tail naming capd's block is not
 * that simple, and goes through the whole edit again.
 */
static bool
hosts_only_appended(const struct hosts_snap *s, const char *now, size_t nlen)
{
	if (nlen <= s->len || memcmp(now, s->text, s->len) != 0)
		return false;
	if (s->len > 0 && s->text[s->len - 1] != '\n')
		return false;  /* the tail would continue a line our edit may have ended */
	return memmem(now + s->len, nlen - s->len, "# BEGIN capd", 12) == NULL &&
	       memmem(now + s->len, nlen - s->len, HOSTS_END, strlen(HOSTS_END)) == NULL;
}

static int
hosts_append_file(const char *path, const char *p, size_t n)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC), rv;

	if (fd < 0)
		return -1;
	rv = hosts_write_all(fd, p, n);
	if (close(fd) < 0)
		rv = -1;
	return rv;
}

/*
 * The check just before the rename: whether path is still the text s read (DONE), or
 * another program wrote it meanwhile (CHANGED: it does not take our lock). Lines it only
 * appended are appended to our temp file too, and the check repeats: a writer that appends
 * more often than an fsync takes would otherwise make every whole edit start again. Those
 * lines are not fsync'd, as their writer did not fsync them either. The text is compared
 * as well as the stat, since mtime has the kernel's coarse tick and a same-size rewrite
 * within one tick has the same stat.
 */
static enum hosts_step
hosts_catch_up(const char *path, struct hosts_snap *s, const char *tmp)
{
	struct hosts_snap now = { .fd = s->fd };
	struct stat st;
	char *why = NULL;

	if (s->fd < 0)
		return stat(path, &st) == 0 || errno != ENOENT ? HOSTS_STEP_CHANGED : HOSTS_STEP_DONE;
	for (int i = 0; i < HOSTS_EDIT_TRIES; i++) {
		int rv = hosts_snap_read(&now, path, &why);
		if (rv < 0)
			break;
		if (rv > 0)
			continue;  /* it grew while we read it: read again */
		if (now.len == s->len && memcmp(now.text, s->text, now.len) == 0) {
			if (stat(path, &st) < 0 || st.st_ino != s->st.st_ino || st.st_dev != s->st.st_dev)
				break;  /* replaced by another file */
			if (hosts_stat_same(&st, &now.st)) {
				free(now.text);
				return HOSTS_STEP_DONE;
			}
			continue;  /* written to since we read it: look again */
		}
		if (!hosts_only_appended(s, now.text, now.len) ||
		    hosts_append_file(tmp, now.text + s->len, now.len - s->len) < 0)
			break;
		free(s->text);
		s->text = now.text;
		s->len = now.len;
		s->st = now.st;
		now.text = NULL;
	}
	free(why);
	free(now.text);
	return HOSTS_STEP_CHANGED;
}

/* Why a temp file or a rename failed, unless the in-place rewrite can do instead. */
static enum hosts_step
hosts_replace_failed(const char *path, const struct hosts_snap *s, const char *what, int err, bool in_place,
                     char **why)
{
	if (!in_place) {
		*why = xasprintf("%s %s: %s", what, path, strerror(err));
		return HOSTS_STEP_FAILED;
	}
	if (s->fd < 0) {
		*why = xasprintf("cannot create %s: %s", path, strerror(err));
		return HOSTS_STEP_FAILED;
	}
	return HOSTS_STEP_IN_PLACE;
}

/*
 * Renames tmp over path. When the edit found no file there was no file to lock,
 * so another writer (a second capd) may have made it since the last look, and a
 * rename would drop what it wrote: path is then made only while it is still
 * missing (RENAME_NOREPLACE), and EEXIST says to edit its text. A file system
 * without RENAME_NOREPLACE gets the plain rename, and the window back.
 */
static int
hosts_rename(const char *tmp, const char *path, bool create)
{
	if (create) {
		if (renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) == 0)
			return 0;
		if (errno != EINVAL && errno != ENOSYS)
			return -1;
	}
	return rename(tmp, path);
}

/* One try at the atomic replacement, under the file's lock. */
static enum hosts_step
hosts_replace(const char *path, hosts_edit_fn fn, void *arg, char **why)
{
	struct hosts_snap s;
	enum hosts_step step;
	char *next, *tmp;
	size_t nlen = 0;
	int err = 0;

	if ((step = hosts_snap_take(path, &s, why)) != HOSTS_STEP_DONE)
		return step;
	if ((next = fn(s.text, s.len, &nlen, arg, why)) == NULL) {
		hosts_snap_close(&s);
		return HOSTS_STEP_FAILED;
	}
	if (nlen == s.len && memcmp(s.text, next, nlen) == 0) {
		free(next);
		hosts_snap_close(&s);
		return HOSTS_STEP_DONE;  /* nothing changes: the file is not touched */
	}
	tmp = hosts_temp_write(path, next, nlen, &s.st, s.fd >= 0, &err);
	free(next);
	if (tmp == NULL) {
		step = hosts_replace_failed(path, &s, "cannot write a temp file beside", err,
		                            err == EACCES || err == EROFS || err == EPERM, why);
	} else if ((step = hosts_catch_up(path, &s, tmp)) != HOSTS_STEP_DONE) {
		unlink(tmp);
	} else if (hosts_rename(tmp, path, s.fd < 0) < 0) {
		err = errno;
		if (err == EEXIST)
			step = HOSTS_STEP_CHANGED;  /* made meanwhile by another program: edit its text */
		else
			step = hosts_replace_failed(path, &s, "cannot replace", err, err == EBUSY || err == EXDEV, why);
		unlink(tmp);
	} else {
		/* a writer that does not take the lock and wrote between the check and the
		 * rename wrote into the old file: that window is narrowed, not closed */
		hosts_fsync_dir(path);
	}
	free(tmp);
	hosts_snap_close(&s);
	return step;
}

/*
 * Where an edit of path goes: a symlinked hosts file is edited where it points. A link
 * whose file does not exist yet (realpath: ENOENT) is followed by hand, so that the
 * file is created where it points rather than the link replaced by a regular file.
 */
static int
hosts_resolve(const char *path, char real[PATH_MAX], char **why)
{
	char cur[PATH_MAX], link[PATH_MAX];

	snprintf(cur, sizeof cur, "%s", path);
	for (int i = 0; i < HOSTS_LINK_MAX; i++) {
		ssize_t n;

		if (realpath(cur, real) != NULL)
			return 0;
		if (errno != ENOENT) {
			*why = xasprintf("cannot resolve %s: %s", path, strerror(errno));
			return -1;
		}
		if ((n = readlink(cur, link, sizeof link - 1)) < 0) {
			snprintf(real, PATH_MAX, "%s", cur);  /* no link: the file is missing, and made here */
			return 0;
		}
		link[n] = '\0';
		if (link[0] == '/') {
			snprintf(cur, sizeof cur, "%s", link);
		} else {
			char *copy = xstrdup(cur);
			int len = snprintf(cur, sizeof cur, "%s/%s", dirname(copy), link);
			free(copy);
			if (len < 0 || (size_t)len >= sizeof cur)
				break;
		}
	}
	*why = xasprintf("cannot resolve %s: %s", path, strerror(ELOOP));
	return -1;
}

int
hosts_file_update(const char *path, const char *backup_dir, hosts_edit_fn fn, void *arg, char **why)
{
	char real[PATH_MAX];

	if (hosts_resolve(path, real, why) < 0)
		return -1;
	for (int i = 0; i < HOSTS_EDIT_TRIES; i++) {
		switch (hosts_replace(real, fn, arg, why)) {
		case HOSTS_STEP_DONE:
			return 0;
		case HOSTS_STEP_FAILED:
			return -1;
		case HOSTS_STEP_IN_PLACE:
			/* a bind mount (EBUSY, EXDEV) or a folder we cannot write: rewrite the file itself */
			return hosts_update_in_place(real, backup_dir, fn, arg, why);
		case HOSTS_STEP_CHANGED:
			break;  /* renaming now would lose what the other program wrote: edit its text */
		}
	}
	*why = xasprintf("%s kept changing while capd edited it (%d tries); nothing was written", real,
	                 HOSTS_EDIT_TRIES);
	return -1;
}

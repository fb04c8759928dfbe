/*
 * Proxy users; see users.h. The file is read once when the instance is
 * configured (also by `capd -t` and every reload, which restarts the
 * instance when the file changed), so a bad line fails the config with its
 * file and line instead of failing a client later.
 */
#include "users.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xmalloc.h"

struct user {
	char *name;  /* "name\0pass": one allocation per user */
	char *pass;  /* points into name */
};

/* Owned by the instance config that loaded it; users_free() releases it. */
struct users {
	struct user *v;
	size_t n, cap;
};

static int
users_add(struct users *u, const char *name, size_t nlen, const char *pass, size_t plen)
{
	char *m;

	if (nlen == 0 || nlen > USERS_FIELD_MAX || plen > USERS_FIELD_MAX)
		return -1;
	if (memchr(name, '\0', nlen) || memchr(pass, '\0', plen))
		return -1;
	if (u->n == u->cap) {
		u->cap = u->cap ? u->cap * 2 : 8;
		u->v = xrealloc(u->v, u->cap * sizeof *u->v);
	}
	m = xmalloc(nlen + plen + 2);
	memcpy(m, name, nlen);
	m[nlen] = '\0';
	memcpy(m + nlen + 1, pass, plen);
	m[nlen + 1 + plen] = '\0';
	/* a later entry for the same name replaces the earlier one */
	for (size_t i = 0; i < u->n; i++)
		if (strcmp(u->v[i].name, m) == 0) {
			free(u->v[i].name);
			u->v[i].name = m;
			u->v[i].pass = m + nlen + 1;
			return 0;
		}
	u->v[u->n].name = m;
	u->v[u->n].pass = m + nlen + 1;
	u->n++;
	return 0;
}

/* A relative users path is relative to the config file that names it. */
static char *
users_path(struct params *p, const char *path)
{
	const char *slash;

	if (path[0] == '/' || p->file == NULL || (slash = strrchr(p->file, '/')) == NULL)
		return xstrdup(path);
	return xasprintf("%.*s/%s", (int)(slash - p->file), p->file, path);
}

static int
users_read(struct users *u, struct params *p, const char *path)
{
	char *full = users_path(p, path), *data, *line, *end;
	size_t n;
	int lineno = 0, rv = 0;

	if (params_file_read(p, full, &data, &n) < 0) {
		params_fail(p, "users", "cannot read users file %s: %s", full, strerror(errno));
		free(full);
		return -1;
	}
	for (line = data; line < data + n; line = end + 1) {
		char *s = line, *colon;
		size_t len;

		lineno++;
		/* by the newline, not strlen: a NUL in a line is refused below, as a name or password */
		end = memchr(line, '\n', (size_t)(data + n - line));
		if (end == NULL)
			end = data + n;  /* the last line, without its newline: data[n] is the NUL */
		*end = '\0';
		len = (size_t)(end - line);
		while (len > 0 && line[len - 1] == '\r')
			line[--len] = '\0';
		while (*s == ' ' || *s == '\t')
			s++;
		if (*s == '\0' || *s == '#' || *s == ';')
			continue;
		colon = strchr(s, ':');
		if (colon == NULL ||
		    users_add(u, s, (size_t)(colon - s), colon + 1, (size_t)(line + len - (colon + 1))) < 0) {
			params_fail(p, "users", "%s:%d: expected name:password (name 1 to 255 bytes, password up to 255)",
			            full, lineno);
			rv = -1;
			break;
		}
	}
	params_file_free(data, n);
	free(full);
	return rv;
}

struct users *
users_load(struct params *p)
{
	const char *file = params_str(p, "users", NULL);
	json_t *auth = params_list(p, "auth"), *e;
	struct users *u;
	size_t i;

	if (p->why || (file == NULL && (auth == NULL || json_array_size(auth) == 0)))
		return NULL;
	u = xcalloc(1, sizeof *u);
	if (file && users_read(u, p, file) < 0)
		goto fail;
	json_array_foreach(auth, i, e) {
		const char *s = json_string_value(e), *colon = strchr(s, ':');

		/* the message goes to the log and the journal (a refused reload)
		 * and to any capctl user: it names the user, never the password,
		 * and not a value without ':', which may well be one */
		if (colon == NULL) {
			params_fail_at(p, "auth", i, "bad auth (no ':', so not shown): expected user:password "
			               "(user 1 to %d bytes, password up to %d)", USERS_FIELD_MAX, USERS_FIELD_MAX);
			goto fail;
		}
		if (users_add(u, s, (size_t)(colon - s), colon + 1, strlen(colon + 1)) < 0) {
			params_fail_at(p, "auth", i, "bad auth for user '%.*s': expected user:password "
			               "(user 1 to %d bytes, password up to %d)", (int)(colon - s), s, USERS_FIELD_MAX,
			               USERS_FIELD_MAX);
			goto fail;
		}
	}
	return u;
fail:
	users_free(u);
	return NULL;
}

void
users_free(struct users *u)
{
	if (u == NULL)
		return;
	for (size_t i = 0; i < u->n; i++) {
		/* wipe passwords before giving the memory back */
		memset(u->v[i].name, 0, strlen(u->v[i].name) + 1 + strlen(u->v[i].pass));
		free(u->v[i].name);
	}
	free(u->v);
	free(u);
}

static const struct user *
users_find(const struct users *u, const char *name)
{
	if (u == NULL)
		return NULL;
	for (size_t i = 0; i < u->n; i++)
		if (strcmp(u->v[i].name, name) == 0)
			return &u->v[i];
	return NULL;
}

bool
users_exists(const struct users *u, const char *name)
{
	return users_find(u, name) != NULL;
}

/* Compares without an early exit, so the time does not tell how much matched. */
static bool
users_equal(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	unsigned char d = la != lb;

	for (size_t i = 0; i < lb; i++)
		d |= (unsigned char)(a[i < la ? i : 0] ^ b[i]);
	return d == 0;
}

bool
users_check(const struct users *u, const char *name, const char *pass)
{
	const struct user *e = users_find(u, name);

	if (e == NULL) {
		users_equal(pass, pass);  /* similar work for unknown names */
		return false;
	}
	return users_equal(e->pass, pass);
}

size_t
users_count(const struct users *u)
{
	return u ? u->n : 0;
}

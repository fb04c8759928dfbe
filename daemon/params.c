/* Instance parameter access with error messages that name the key; see params.h. */
#include "params.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "buf.h"
#include "log.h"
#include "values.h"
#include "xmalloc.h"

/* Larger is no users or certificate file but a mistake (/dev/zero): refused, not read forever. */
#define PARAMS_FILE_MAX (64u << 20)

static const char *const params_common_keys[] = {
	"type", "name", "listen", "expose", "capture", "idle_timeout", "connect_timeout", NULL,
};

bool params_warn_checks;

/* The line of key's index-th value in the file, else the section's. */
static int
params_line(struct params *p, const char *key, size_t index)
{
	json_t *l;

	if (key == NULL || p->lines == NULL)
		return p->section_line;
	l = json_object_get(p->lines, key);
	if (json_is_array(l))  /* a repeated key: the line of that value */
		l = json_array_get(l, index < json_array_size(l) ? index : 0);
	return json_is_integer(l) ? (int)json_integer_value(l) : p->section_line;
}

static int
params_vfail(struct params *p, const char *key, size_t index, const char *fmt, va_list ap)
{
	char *msg;
	int line = params_line(p, key, index);

	if (p->why)
		return -1;
	if (vasprintf(&msg, fmt, ap) < 0)
		abort();
	if (p->file)
		p->why = xasprintf("%s:%d: %s", p->file, line, msg);
	else
		p->why = xstrdup(msg);
	free(msg);
	return -1;
}

int
params_fail(struct params *p, const char *key, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = params_vfail(p, key, 0, fmt, ap);
	va_end(ap);
	return rc;
}

int
params_fail_at(struct params *p, const char *key, size_t index, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = params_vfail(p, key, index, fmt, ap);
	va_end(ap);
	return rc;
}

static void
params_vwarn(struct params *p, const char *name, const char *key, const char *fmt, va_list ap)
{
	char *msg;

	if (vasprintf(&msg, fmt, ap) < 0)
		abort();
	if (p->file != NULL)
		log_warnx("%s:%d: warning: %s", p->file, params_line(p, key, 0), msg);
	else
		log_warnx("%s: %s", name, msg);
	free(msg);
}

void
params_warn(struct params *p, const char *name, const char *key, const char *fmt, ...)
{
	va_list ap;

	if (p->file != NULL && !params_warn_checks)
		return;
	va_start(ap, fmt);
	params_vwarn(p, name, key, fmt, ap);
	va_end(ap);
}

void
params_warn_check(struct params *p, const char *key, const char *fmt, ...)
{
	va_list ap;

	if (p->file == NULL || !params_warn_checks)
		return;
	va_start(ap, fmt);
	params_vwarn(p, NULL, key, fmt, ap);
	va_end(ap);
}

/* The value as text whatever its JSON type; NULL when absent. */
static const char *
params_text(struct params *p, const char *key, char *tmp, size_t n)
{
	json_t *v = json_object_get(p->obj, key);

	if (v == NULL || json_is_null(v))
		return NULL;
	if (json_is_string(v))
		return json_string_value(v);
	if (json_is_true(v))
		return "yes";
	if (json_is_false(v))
		return "no";
	if (json_is_integer(v)) {
		snprintf(tmp, n, "%lld", (long long)json_integer_value(v));
		return tmp;
	}
	if (json_is_real(v)) {
		snprintf(tmp, n, "%g", json_real_value(v));
		return tmp;
	}
	if (json_is_array(v) && json_array_size(v) > 0) {
		params_fail(p, key, "'%s' may be given only once", key);
		return NULL;
	}
	params_fail(p, key, "'%s' has a value of the wrong type", key);
	return NULL;
}

const char *
params_str(struct params *p, const char *key, const char *def)
{
	char tmp[64];
	json_t *v = json_object_get(p->obj, key);

	if (v && json_is_string(v))
		return json_string_value(v);
	if (json_is_array(v) && json_array_size(v) > 0) {  /* as params_text says it */
		params_fail(p, key, "'%s' may be given only once", key);
		return def;
	}
	if (json_is_array(v) || json_is_object(v)) {  /* given no times at all, or a map */
		params_fail(p, key, "'%s' has a value of the wrong type", key);
		return def;
	}
	if (v && !json_is_null(v)) {
		/* numbers given to a string key: store their text form so the pointer stays valid */
		const char *t = params_text(p, key, tmp, sizeof tmp);
		if (t == NULL)
			return def;
		json_object_set_new(p->obj, key, json_string(t));
		return json_string_value(json_object_get(p->obj, key));
	}
	return def;
}

const char *
params_csv(struct params *p, const char *key, const char *def)
{
	json_t *v = json_object_get(p->obj, key), *e;
	struct buf b = { 0 };
	size_t i;

	if (v == NULL || !json_is_array(v))
		return params_str(p, key, def);
	json_array_foreach(v, i, e) {
		if (json_is_string(e))
			buf_printf(&b, "%s%s", i ? "," : "", json_string_value(e));
		else if (json_is_integer(e))
			buf_printf(&b, "%s%lld", i ? "," : "", (long long)json_integer_value(e));
		else {
			buf_free(&b);
			params_fail(p, key, "'%s' must be a list of strings or numbers", key);
			return def;
		}
	}
	/* stored back so the pointer lives as long as the parameters */
	json_object_set_new(p->obj, key, json_stringn(buf_used(&b) ? (const char *)buf_head(&b) : "", buf_used(&b)));
	buf_free(&b);
	return json_string_value(json_object_get(p->obj, key));
}

int
params_bool(struct params *p, const char *key, bool def, bool *out)
{
	char tmp[64];
	const char *t = params_text(p, key, tmp, sizeof tmp);

	*out = def;
	if (t == NULL)
		return p->why ? -1 : 0;
	if (value_bool(t, out) < 0)
		return params_fail(p, key, "bad value for '%s': '%s' (expected yes or no)", key, t);
	return 0;
}

int
params_size(struct params *p, const char *key, uint64_t def, uint64_t *out)
{
	char tmp[64];
	const char *t = params_text(p, key, tmp, sizeof tmp);

	*out = def;
	if (t == NULL)
		return p->why ? -1 : 0;
	if (value_size(t, out) < 0)
		return params_fail(p, key, "bad size for '%s': '%s' (bytes, or with K, M, G)", key, t);
	return 0;
}

int
params_duration(struct params *p, const char *key, double def, double *out)
{
	char tmp[64];
	const char *t = params_text(p, key, tmp, sizeof tmp);

	*out = def;
	if (t == NULL)
		return p->why ? -1 : 0;
	if (value_duration(t, out) < 0)
		return params_fail(p, key, "bad duration for '%s': '%s' (seconds, or with ms, s, m, h)", key, t);
	if (*out > VALUE_DURATION_MAX)
		return params_fail(p, key, "duration for '%s' out of range: '%s' (" VALUE_DURATION_MAX_TEXT ")", key, t);
	return 0;
}

int
params_uint(struct params *p, const char *key, uint64_t def, uint64_t max, uint64_t *out)
{
	char tmp[64];
	const char *t = params_text(p, key, tmp, sizeof tmp);

	*out = def;
	if (t == NULL)
		return p->why ? -1 : 0;
	if (value_uint(t, max, out) < 0)
		return params_fail(p, key, "bad number for '%s': '%s' (0 to %llu)", key, t, (unsigned long long)max);
	return 0;
}

json_t *
params_list(struct params *p, const char *key)
{
	json_t *v = json_object_get(p->obj, key);

	if (v == NULL || json_is_null(v))
		return NULL;
	if (json_is_string(v)) {
		json_t *a = json_array();
		json_array_append(a, v);
		json_object_set_new(p->obj, key, a);
		return a;
	}
	if (!json_is_array(v)) {
		params_fail(p, key, "'%s' must be a list of strings", key);
		return NULL;
	}
	size_t i;
	json_t *e;
	json_array_foreach(v, i, e) {
		if (!json_is_string(e)) {
			params_fail(p, key, "'%s' must be a list of strings", key);
			return NULL;
		}
	}
	return v;
}

static bool
key_in(const char *key, const char *const *list)
{
	for (; list && *list; list++)
		if (strcmp(key, *list) == 0)
			return true;
	return false;
}

int
params_check_keys(struct params *p, const char *const *allowed)
{
	const char *key;
	json_t *v;

	json_object_foreach(p->obj, key, v) {
		if (!key_in(key, params_common_keys) && !key_in(key, allowed))
			return params_fail(p, key, "unknown key '%s' for a %s instance", key,
			                   params_str(p, "type", "?"));
	}
	return 0;
}

/* The SHA-256 of what was read, under its path in p->files. */
static void
params_file_print(struct params *p, const char *path, const char *data, size_t len)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned mdlen = 0;
	char hex[2 * EVP_MAX_MD_SIZE + 1];

	if (p->files == NULL)
		return;
	if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1)
		fatalx("SHA-256 failed");
	for (unsigned i = 0; i < mdlen; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
	json_object_set_new(p->files, path, json_string(hex));
}

int
params_file_read(struct params *p, const char *path, char **data, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t n = 0, cap = 4096;
	char *b;
	ssize_t r;

	if (fd < 0)
		return -1;
	b = xmalloc(cap + 1);
	for (;;) {
		if (n == cap) {
			if (cap >= PARAMS_FILE_MAX) {
				errno = EFBIG;
				goto fail;
			}
			/* grown by hand, not xrealloc: the old copy is wiped before it goes */
			char *bigger = xmalloc(2 * cap + 1);
			memcpy(bigger, b, n);
			params_file_free(b, n);
			b = bigger;
			cap *= 2;
		}
		r = read(fd, b + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)  /* a folder opens, then fails here (EISDIR) */
			goto fail;
		if (r == 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	b[n] = '\0';
	params_file_print(p, path, b, n);
	*data = b;
	*len = n;
	return 0;
fail: {
		int e = errno;
		close(fd);
		params_file_free(b, n);
		errno = e;
		return -1;
	}
}

void
params_file_free(char *data, size_t len)
{
	if (data == NULL)
		return;
	explicit_bzero(data, len);
	free(data);
}

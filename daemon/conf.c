/*
 * Config loading with libinih. inih does not report line numbers, so the
 * reader callback counts lines itself: the handler is always called for the
 * line read last. Relative paths are taken relative to the config file.
 */
#include "conf.h"

#include <errno.h>
#include <grp.h>
#include <ini.h>
#include <libgen.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include "addr.h"
#include "instance.h"
#include "log.h"
#include "path.h"
#include "values.h"
#include "xmalloc.h"

/* Keys of instance sections that may repeat: each adds one more rule. */
static const char *const conf_rule_keys[] = { "auth", "route", "answer", NULL };

/* Keys holding paths, made absolute against the config file's folder. */
static const char *const conf_path_keys[] = { "users", "tls_client_cert", NULL };

struct conf_parse {
	struct conf *c;
	const char *name;
	const char *base;    /* folder of the config file */
	int line;            /* line the reader returned last */
	char *why;           /* first error */
	char section[256];   /* current section */
	json_t *inst;        /* current instance entry, borrowed from c->instances */
	json_t *seen_capd;   /* keys set in [capd] */
	int in_capd;
	bool had_key;        /* a key was read in this section: an indented line continues it */
	bool cont;           /* the line the reader returned last continues the value above */
	/* reader state for in-memory text */
	const char *text;
	size_t pos;
	FILE *fp;
};

static void
conf_fail(struct conf_parse *cp, const char *fmt, ...)
{
	va_list ap;
	char msg[1024];

	if (cp->why)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	cp->why = xasprintf("%s:%d: %s", cp->name, cp->line, msg);
}

void
conf_settings_defaults(struct capd_settings *st)
{
	memset(st, 0, sizeof *st);
	st->control = xstrdup("/run/capd/capd.sock");
	st->spool = xstrdup("/var/lib/capd/spool");
	st->rotate_size = 64ULL * 1024 * 1024;
	st->keep_files = 32;
	st->flush_interval = 1.0;
	st->state_dir = xstrdup("/var/lib/capd");
	st->log_level = LOG_LVL_INFO;
	st->hosts_file = xstrdup("/etc/hosts");
	st->hosts_restore = true;
	st->tail_backlog = 64 * 1024;
}

void
conf_settings_free(struct capd_settings *st)
{
	free(st->control);
	free(st->control_group);
	free(st->spool);
	free(st->state_dir);
	free(st->user);
	free(st->hosts_file);
	free(st->ca_cert);
	free(st->ca_key);
	free(st->keylog_file);
	memset(st, 0, sizeof *st);
}

/* NULL (and the error set) for an empty value: made relative it would name
 * the config file's own folder, and "spool =" would spool there. The path is
 * cleaned (path_clean) where it opens the same file: capd's ready line,
 * capctl status and the logs showed "/srv/conf/../build/capd.sock". */
static char *
conf_path(struct conf_parse *cp, const char *key, const char *v)
{
	if (v[0] == '\0') {
		conf_fail(cp, "'%s' needs a path", key);
		return NULL;
	}
	return path_clean(cp->base, v);
}

/* A folder's path without trailing slashes ("/" stays), so the paths made
 * from it (capture status's file, the logs) have no "//" in them. */
static char *
conf_dir(struct conf_parse *cp, const char *key, const char *v)
{
	char *path = conf_path(cp, key, v);
	size_t n = path != NULL ? strlen(path) : 0;

	while (n > 1 && path[n - 1] == '/')
		path[--n] = '\0';
	return path;
}

static void
conf_set_str(char **slot, char *v)
{
	if (v == NULL)  /* the value was refused */
		return;
	free(*slot);
	*slot = v;
}

static void
conf_capd_key(struct conf_parse *cp, const char *key, const char *v)
{
	struct capd_settings *st = &cp->c->settings;
	uint64_t u;
	double d;
	bool b;

	if (json_object_get(cp->seen_capd, key)) {
		conf_fail(cp, "'%s' is set twice in [capd]", key);
		return;
	}
	json_object_set_new(cp->seen_capd, key, json_true());
	json_object_set_new(cp->c->capd_lines, key, json_integer(cp->line));
	/* as for an instance's values: capd shows these in JSON (daemon.status,
	 * capture status), which cannot hold them otherwise */
	json_t *text = json_string(v);
	if (text == NULL) {
		conf_fail(cp, "value of '%s' is not valid UTF-8", key);
		return;
	}
	json_decref(text);
	if (!strcmp(key, "control")) {
		struct sockaddr_un sun;
		char *path = conf_path(cp, key, v);
		/* what the bind at start would refuse, capd -t and a reload refuse too, with the line */
		if (path != NULL && strlen(path) >= sizeof sun.sun_path) {
			conf_fail(cp, "'control' is too long for a Unix socket path (%zu bytes, at most %zu)",
			          strlen(path), sizeof sun.sun_path - 1);
			free(path);
			path = NULL;
		}
		conf_set_str(&st->control, path);
	} else if (!strcmp(key, "control_group"))
		conf_set_str(&st->control_group, xstrdup(v));
	else if (!strcmp(key, "spool"))
		conf_set_str(&st->spool, conf_dir(cp, key, v));
	else if (!strcmp(key, "state_dir"))
		conf_set_str(&st->state_dir, conf_dir(cp, key, v));
	else if (!strcmp(key, "user"))
		conf_set_str(&st->user, xstrdup(v));
	else if (!strcmp(key, "hosts_file"))
		conf_set_str(&st->hosts_file, conf_path(cp, key, v));
	else if (!strcmp(key, "ca_cert"))
		conf_set_str(&st->ca_cert, conf_path(cp, key, v));
	else if (!strcmp(key, "ca_key"))
		conf_set_str(&st->ca_key, conf_path(cp, key, v));
	else if (!strcmp(key, "keylog_file"))
		conf_set_str(&st->keylog_file, conf_path(cp, key, v));
	else if (!strcmp(key, "rotate_size")) {
		if (value_size(v, &st->rotate_size) < 0)
			conf_fail(cp, "bad size for 'rotate_size': '%s' (bytes, or with K, M, G)", v);
	} else if (!strcmp(key, "tail_backlog")) {
		if (value_size(v, &st->tail_backlog) < 0)
			conf_fail(cp, "bad size for 'tail_backlog': '%s' (bytes, or with K, M, G)", v);
	} else if (!strcmp(key, "rotate_time")) {
		if (value_duration(v, &d) < 0)
			conf_fail(cp, "bad duration for 'rotate_time': '%s' (seconds, or with ms, s, m, h)", v);
		else if (d > VALUE_DURATION_MAX)
			conf_fail(cp, "duration for 'rotate_time' out of range: '%s' (" VALUE_DURATION_MAX_TEXT ")", v);
		else
			st->rotate_time = d;
	} else if (!strcmp(key, "flush_interval")) {
		if (value_duration(v, &d) < 0 || d <= 0)
			conf_fail(cp, "bad duration for 'flush_interval': '%s' (more than 0: seconds, or with ms, s, m, h)", v);
		else if (d > VALUE_DURATION_MAX)
			conf_fail(cp, "duration for 'flush_interval' out of range: '%s' (" VALUE_DURATION_MAX_TEXT ")", v);
		else
			st->flush_interval = d;
	} else if (!strcmp(key, "keep_files")) {
		if (value_uint(v, 1000000, &u) < 0 || u < 1)
			conf_fail(cp, "bad number for 'keep_files': '%s' (1 to 1000000)", v);
		else
			st->keep_files = (unsigned)u;
	} else if (!strcmp(key, "log_level")) {
		int lvl = log_level_parse(v);
		if (lvl < 0)
			conf_fail(cp, "bad log_level '%s' (error, warning, notice, info or debug)", v);
		else
			st->log_level = lvl;
	} else if (!strcmp(key, "workers")) {
		if (!strcmp(v, "auto"))
			st->workers = 0;
		else if (value_uint(v, 64, &u) < 0 || u < 1)
			conf_fail(cp, "bad value for 'workers': '%s' (auto, or 1 to 64)", v);
		else
			st->workers = (unsigned)u;
	} else if (!strcmp(key, "hosts_restore")) {
		if (value_bool(v, &b) < 0)
			conf_fail(cp, "bad value for 'hosts_restore': '%s' (expected yes or no)", v);
		else
			st->hosts_restore = b;
	} else {
		conf_fail(cp, "unknown key '%s' in [capd]", key);
	}
}

static bool
conf_in(const char *key, const char *const *list)
{
	for (; *list; list++)
		if (!strcmp(key, *list))
			return true;
	return false;
}

static void
conf_instance_key(struct conf_parse *cp, const char *key, const char *v)
{
	json_t *params = json_object_get(cp->inst, "params");
	json_t *lines = json_object_get(cp->inst, "lines");
	json_t *old = json_object_get(params, key);
	json_t *val;

	if (!strcmp(key, "type") || !strcmp(key, "name")) {
		conf_fail(cp, "'%s' comes from the section header [TYPE NAME]", key);
		return;
	}
	if (conf_in(key, conf_path_keys)) {
		char *path = conf_path(cp, key, v);
		if (path == NULL)
			return;
		val = json_string(path);
		free(path);
	} else {
		val = json_string(v);
	}
	if (val == NULL) {
		conf_fail(cp, "value of '%s' is not valid UTF-8", key);
		return;
	}
	if (conf_in(key, conf_rule_keys)) {
		if (old == NULL)
			json_object_set_new(params, key, json_array());
		json_array_append_new(json_object_get(params, key), val);
		/* one line per value: an error names the entry it is about (params_fail_at) */
		if (json_object_get(lines, key) == NULL)
			json_object_set_new(lines, key, json_array());
		json_array_append_new(json_object_get(lines, key), json_integer(cp->line));
		return;
	}
	if (old) {
		json_decref(val);
		conf_fail(cp, "'%s' is set twice in [%s]", key, cp->section);
		return;
	}
	json_object_set_new(params, key, val);
	json_object_set_new(lines, key, json_integer(cp->line));
}

/*
 * An indented line continues the value of the key above (inih passes it as
 * another value of that key): joined with a space, for a long filter or list.
 * An indented "key = value" is a mistake, not a value.
 */
static void
conf_continue(struct conf_parse *cp, const char *key, const char *more)
{
	json_t *params = json_object_get(cp->inst, "params");
	json_t *v = params ? json_object_get(params, key) : NULL;
	size_t w = strspn(more, "abcdefghijklmnopqrstuvwxyz_");
	const char *after = more + w + strspn(more + w, " \t");

	if (w > 0 && after[0] == '=' && after[1] != '=') {
		conf_fail(cp, "indented '%.*s = ...' would continue the value of '%s' (keys start at the line's beginning)",
		          (int)w, more, key);
		return;
	}
	if (cp->in_capd || v == NULL) {
		conf_fail(cp, "'%s' takes its value on one line (an indented line continues a value)", key);
		return;
	}
	if (json_is_array(v))  /* a rule key: the line continues its last rule */
		v = json_array_get(v, json_array_size(v) - 1);
	/* inih keeps an inline comment on a continued line: cut it as on a key's line */
	size_t n = strlen(more);
	for (size_t i = 1; i < n; i++)
		if (more[i] == ';' && (more[i - 1] == ' ' || more[i - 1] == '\t')) {
			n = i;
			break;
		}
	while (n > 0 && (more[n - 1] == ' ' || more[n - 1] == '\t'))
		n--;
	char *joined = xasprintf("%s %.*s", json_string_value(v), (int)n, more);
	if (json_string_set(v, joined) < 0)
		conf_fail(cp, "value of '%s' is not valid UTF-8", key);
	free(joined);
}

static void
conf_new_section(struct conf_parse *cp, const char *section)
{
	char type[64], name[200], extra;
	size_t i;
	json_t *e;

	snprintf(cp->section, sizeof cp->section, "%s", section);
	cp->inst = NULL;
	cp->in_capd = 0;
	if (!strcmp(section, "capd")) {
		if (json_object_get(cp->seen_capd, "[capd]")) {
			conf_fail(cp, "[capd] appears twice");
			return;
		}
		json_object_set_new(cp->seen_capd, "[capd]", json_true());
		cp->in_capd = 1;
		return;
	}
	if (sscanf(section, "%63s %199s %c", type, name, &extra) != 2) {
		conf_fail(cp, "section [%s] should be [capd] or [TYPE NAME]", section);
		return;
	}
	if (proto_find(type) == NULL) {
		conf_fail(cp, "unknown instance type '%s' in [%s]", type, section);
		return;
	}
	json_array_foreach(cp->c->instances, i, e) {
		json_t *p = json_object_get(e, "params");
		if (!strcmp(json_string_value(json_object_get(p, "name")), name)) {
			conf_fail(cp, "instance name '%s' is used twice (first at line %d)", name,
			          (int)json_integer_value(json_object_get(e, "line")));
			return;
		}
	}
	cp->inst = json_pack("{s:{s:s,s:s}, s:{}, s:i}", "params", "type", type, "name", name, "lines", "line",
	                     cp->line);
	if (cp->inst == NULL) {
		/* json_pack refuses a name that is not UTF-8: the instance and its keys went unseen */
		conf_fail(cp, "the instance name in a [%s ...] section is not valid UTF-8", type);
		return;
	}
	json_array_append_new(cp->c->instances, cp->inst);
}

/*
 * "spool = "/srv/capd"" (quoted as in a shell or a systemd unit): inih keeps
 * the quotes, and the spool went to a folder named "/srv/capd" (quotes and
 * all) inside the config's folder; no value of capd starts and ends with one.
 */
static bool
conf_quoted(const char *v)
{
	size_t n = strlen(v);

	return n >= 2 && (v[0] == '"' || v[0] == '\'') && v[n - 1] == v[0];
}

static int
conf_handler(void *user, const char *section, const char *key, const char *value)
{
	struct conf_parse *cp = user;

	(void)section;  /* the reader started it (conf_reader_header): inih truncates long names */
	if (cp->why)
		return 0;
	if (key == NULL)  /* INI_CALL_HANDLER_ON_NEW_SECTION builds pass section starts */
		return 1;
	if (cp->section[0] == '\0') {
		conf_fail(cp, "'%s' is outside any section", key);
		return 0;
	}
	if (cp->cont)
		conf_continue(cp, key, value);
	else if (conf_quoted(value))
		conf_fail(cp, "the value of '%s' is in quotes, which capd would keep as part of it: write %s = %.*s",
		          key, key, (int)strlen(value) - 2, value + 1);
	else if (cp->in_capd)
		conf_capd_key(cp, key, value);
	else
		conf_instance_key(cp, key, value);
	cp->had_key = true;
	return cp->why == NULL;
}

/* A "[section]" line, as inih will see it: the section starts here, so that
 * one without keys is checked too, with its own line number. */
static void
conf_reader_header(struct conf_parse *cp, const char *t)
{
	const char *end = strchr(t, ']');
	char name[sizeof cp->section];

	if (end == NULL) {
		/* inih would report it only after the keys below had gone to the section above */
		conf_fail(cp, "section header without its ']'");
		return;
	}
	/* inih drops what follows the ']': "[socks main] listen = 1080" lost its key */
	const char *after = end + 1 + strspn(end + 1, " \t\r\n");
	if (*after != '\0' && *after != ';' && *after != '#') {
		conf_fail(cp, "text after the section header's ']': '%.*s' (a key goes on a line of its own)",
		          (int)strcspn(after, "\r\n"), after);
		return;
	}
	snprintf(name, sizeof name, "%.*s", (int)(end - t - 1), t + 1);
	cp->had_key = false;
	conf_new_section(cp, name);
}

/*
 * "listen: 1080": inih splits a line at its first '=' or ':' (fixed when
 * it is built, Debian's included), so a YAML habit was taken quietly while
 * capd.conf.5 has key = value alone; as nginx or haproxy refuse a file in
 * another's syntax, capd names the line and the form it takes. A line whose
 * "key" has a blank in it ("to 127.0.0.1:80", its '=' forgotten) is left to
 * the handler, which names it as an unknown key.
 */
static void
conf_reader_key(struct conf_parse *cp, const char *t)
{
	size_t n = strcspn(t, "=:"), k = n, vn;
	const char *v;

	if (t[n] != ':')
		return;
	while (k > 0 && (t[k - 1] == ' ' || t[k - 1] == '\t'))
		k--;
	if (k == 0 || memchr(t, ' ', k) != NULL || memchr(t, '\t', k) != NULL)
		return;
	v = t + n + 1 + strspn(t + n + 1, " \t");
	vn = strcspn(v, "\r\n");
	while (vn > 0 && (v[vn - 1] == ' ' || v[vn - 1] == '\t'))
		vn--;
	conf_fail(cp, "a ':' after '%.*s': write %.*s = %.*s (key = value, not key: value)", (int)k, t, (int)k, t,
	          (int)vn, v);
}

/* The reader's checks of one line (inih's own grammar decides the rest). */
static void
conf_reader_line(struct conf_parse *cp, char *str, int num, bool more)
{
	size_t len = strlen(str);
	const char *t = str;

	/* inih reads lines into num bytes: a longer one would come back in pieces */
	if (len == (size_t)num - 1 && str[len - 1] != '\n' && more) {
		conf_fail(cp, "line longer than %d characters (a long value may go on on indented lines)", num - 2);
		return;
	}
	/* inih skips a UTF-8 byte order mark (editors on Windows write one): so must we */
	if (cp->line == 1 && !strncmp(t, "\xEF\xBB\xBF", 3))
		t += 3;
	while (*t == ' ' || *t == '\t')
		t++;
	/* inih cuts a " ; note" after a value but keeps a " # note" in it (a spool
	 * folder named "sp # note"): '#' after a blank starts a comment as ';' does */
	for (char *h = str + 1; (h = strchr(h, '#')) != NULL; h++)
		if (h[-1] == ' ' || h[-1] == '\t') {
			h[0] = '\n';
			h[1] = '\0';
			break;
		}
	cp->cont = false;
	if (*t == '\0' || *t == '\n' || *t == '\r' || *t == ';' || *t == '#')
		return;
	if (t > str && cp->had_key) {  /* inih: an indented line after a key continues its value */
		cp->cont = true;
		return;
	}
	if (*t == '[')
		conf_reader_header(cp, t);
	else
		conf_reader_key(cp, t);
}

static char *
conf_reader(char *str, int num, void *stream)
{
	struct conf_parse *cp = stream;

	if (cp->fp) {
		if (fgets(str, num, cp->fp) == NULL) {
			/* a folder opens and reads as an error, not as an empty file of defaults */
			if (ferror(cp->fp) && cp->why == NULL)
				cp->why = xasprintf("%s: %s", cp->name, strerror(errno));
			return NULL;
		}
	} else {
		size_t i = 0;
		if (cp->text[cp->pos] == '\0')
			return NULL;
		while (cp->text[cp->pos] && i + 1 < (size_t)num) {
			char ch = cp->text[cp->pos++];
			str[i++] = ch;
			if (ch == '\n')
				break;
		}
		str[i] = '\0';
	}
	/* a line of the longest length ending in CRLF fills the buffer up to its CR:
	 * its LF, read next, would be taken for a line of its own */
	size_t len = strlen(str);
	if (len == (size_t)num - 1 && str[len - 1] == '\r') {
		if (cp->fp) {
			int ch = getc(cp->fp);
			if (ch == '\n')
				str[len - 1] = '\n';
			else if (ch != EOF)
				ungetc(ch, cp->fp);
		} else if (cp->text[cp->pos] == '\n') {
			cp->pos++;
			str[len - 1] = '\n';
		}
	}
	cp->line++;
	bool more = cp->fp ? !feof(cp->fp) && (ungetc(getc(cp->fp), cp->fp) != EOF) : cp->text[cp->pos] != '\0';
	conf_reader_line(cp, str, num, more);
	return cp->why ? NULL : str;
}

/*
 * Two sections on one listen address: each section is good alone, but the
 * second cannot bind at start (or at a reload), so capd -t must say so too.
 * A wildcard address takes the port on every address of its family (IPv6
 * listeners are IPv6 only).
 */
static int
conf_check_listens(struct conf_parse *cp)
{
	size_t n = json_array_size(cp->c->instances), i, j;
	struct sockaddr_storage *ss = xcalloc(n ? n : 1, sizeof *ss);
	json_t *e;
	int rc = 0;

	json_array_foreach(cp->c->instances, i, e) {
		const char *listen = json_string_value(json_object_get(json_object_get(e, "params"), "listen"));
		socklen_t len;
		char *err = NULL;

		/* no listen (sniff, trace): the family stays AF_UNSPEC and matches nothing */
		if (listen == NULL || addr_parse_listen(listen, &ss[i], &len, &err) < 0) {
			free(err);
			continue;
		}
		for (j = 0; j < i; j++) {
			const struct sockaddr *a = (struct sockaddr *)&ss[i], *b = (struct sockaddr *)&ss[j];
			if (a->sa_family != b->sa_family || addr_port(a) != addr_port(b) ||
			    !(addr_same(a, b, false) || addr_is_any(a) || addr_is_any(b)))
				continue;
			json_t *other = json_array_get(cp->c->instances, j);
			json_t *op = json_object_get(other, "params");
			cp->line = (int)json_integer_value(json_object_get(json_object_get(e, "lines"), "listen"));
			conf_fail(cp, "listen = %s: the port is taken by [%s %s] (line %d)", listen,
			          json_string_value(json_object_get(op, "type")), json_string_value(json_object_get(op, "name")),
			          (int)json_integer_value(json_object_get(json_object_get(other, "lines"), "listen")));
			rc = -1;
			goto out;
		}
	}
out:
	free(ss);
	return rc;
}

static struct conf *
conf_parse_with(struct conf_parse *cp, char **why)
{
	struct conf *c = cp->c;
	int rc;
	size_t i;
	json_t *e;

	cp->seen_capd = json_object();
	rc = ini_parse_stream(conf_reader, cp, conf_handler, cp);
	c->empty = json_object_get(cp->seen_capd, "[capd]") == NULL && json_array_size(c->instances) == 0;
	json_decref(cp->seen_capd);
	if (cp->why == NULL && rc > 0)
		cp->why = xasprintf("%s:%d: syntax error (expected [section], key = value, or a ; comment)", cp->name, rc);
	if (cp->why == NULL && rc < 0)
		cp->why = xasprintf("%s: cannot read", cp->name);
	if (cp->why == NULL) {
		json_array_foreach(c->instances, i, e) {
			json_t *files = NULL;

			if (instance_check(json_object_get(e, "params"), cp->name, json_object_get(e, "lines"),
			                   (int)json_integer_value(json_object_get(e, "line")), &files, &cp->why) < 0)
				break;
			/* what a reload compares with the running instance's (instance_file_changed) */
			json_object_set_new(e, "files", files);
		}
	}
	if (cp->why == NULL)
		conf_check_listens(cp);
	if (cp->why) {
		*why = cp->why;
		conf_free(c);
		return NULL;
	}
	return c;
}

static struct conf *
conf_new(const char *name)
{
	struct conf *c = xcalloc(1, sizeof *c);

	c->file = xstrdup(name);
	conf_settings_defaults(&c->settings);
	c->instances = json_array();
	c->capd_lines = json_object();
	return c;
}

struct conf *
conf_load(const char *path, char **why)
{
	struct conf_parse cp = { 0 };
	char *dir = xstrdup(path);
	struct conf *c;

	cp.fp = fopen(path, "r");
	if (cp.fp == NULL) {
		*why = xasprintf("%s: %s", path, strerror(errno));
		free(dir);
		return NULL;
	}
	cp.c = conf_new(path);
	cp.name = path;
	/* relative paths in the file are relative to the file's own folder, made absolute */
	char *real = realpath(path, NULL);
	if (real) {
		free(dir);
		dir = real;
	}
	cp.base = dirname(dir);
	c = conf_parse_with(&cp, why);
	fclose(cp.fp);
	free(dir);
	return c;
}

struct conf *
conf_load_string(const char *text, const char *name, const char *base_dir, char **why)
{
	struct conf_parse cp = { 0 };

	cp.text = text;
	cp.c = conf_new(name);
	cp.name = name;
	cp.base = base_dir;
	return conf_parse_with(&cp, why);
}

void
conf_free(struct conf *c)
{
	if (c == NULL)
		return;
	conf_settings_free(&c->settings);
	json_decref(c->instances);
	json_decref(c->capd_lines);
	free(c->file);
	free(c);
}

/* Whether a reload's value of a start-up setting differs from the one in force. */
static bool
conf_changed(const char *next, const char *cur)
{
	return strcmp(next ? next : "", cur ? cur : "") != 0;
}

int
conf_check(const struct conf *c, const struct capd_settings *running, char **why)
{
	const struct capd_settings *st = &c->settings;
	int line;

	/*
	 * An empty file is most likely one being written: an editor that
	 * truncates it before it writes it, read in between by a reload (or a
	 * restart), would remove every config instance and reset the [capd]
	 * settings. Refused alike at start, by capd -t and on reload, so that
	 * `systemctl reload` (capd -t first) fails when capd would refuse.
	 */
	if (c->empty) {
		*why = xasprintf("%s: the file has no section (empty, or being written?); "
		                 "capd needs [capd] or an instance section", c->file);
		return -1;
	}
	/*
	 * capd -t (as root, as systemctl reload runs it) refuses a user or group
	 * that does not exist, so a reload does too: it said "reloaded" with a
	 * warning, and the next start failed. As privdrop() decides, only root
	 * switches user; a reload runs after the switch, so it checks a changed
	 * user whatever its own uid.
	 */
	if (st->user && (running ? conf_changed(st->user, running->user) : geteuid() == 0) &&
	    getpwnam(st->user) == NULL) {
		line = (int)json_integer_value(json_object_get(c->capd_lines, "user"));
		*why = xasprintf("%s:%d: user = %s: no such user", c->file, line, st->user);
		return -1;
	}
	if (st->control_group && (running == NULL || conf_changed(st->control_group, running->control_group)) &&
	    getgrnam(st->control_group) == NULL) {
		line = (int)json_integer_value(json_object_get(c->capd_lines, "control_group"));
		*why = xasprintf("%s:%d: control_group = %s: no such group", c->file, line, st->control_group);
		return -1;
	}
	return 0;
}

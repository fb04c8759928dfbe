/*
 * capctl tail session ID [--hex|--text|--raw] [--dir c2s|s2c] [--backlog SIZE]
 * capctl tail events
 *
 * Follows a session live (its backlog first) until it ends, or the daemon's
 * event stream until interrupted. --hex prints each chunk as `hexdump -C`
 * prints that stretch of its direction's stream (offsets count per
 * direction); --text escapes what is not printable; the default picks one of
 * the two per chunk; --raw writes one direction's bytes unchanged.
 */
#include <errno.h>
#include <langinfo.h>
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base64.h"
#include "capctl.h"
#include "values.h"

enum tail_fmt { FMT_AUTO, FMT_HEX, FMT_TEXT, FMT_RAW };

/* What one `tail session` run prints and where each direction has got to. */
struct tail_out {
	enum tail_fmt fmt;
	int dir;                 /* -1 both, else 0 c2s / 1 s2c */
	bool json;
	bool colour;
	uint64_t next[2];        /* stream offset expected next, per direction */
	uint64_t cr_end[2];      /* just past a carriage return that ended the last text chunk, else 0 */
	bool utf8;               /* the locale's character set is UTF-8: its characters print as they are */
	uint8_t held[2][4];      /* the start of a UTF-8 character that the last text chunk of d ended in */
	size_t nheld[2];
	uint64_t held_end[2];    /* ... the stream offset just past it */
	bool ended;
	int rc;                  /* set when writing failed */
};

static const char *const tail_dirs[2] = { "c2s", "s2c" };
/* Wireshark's Follow Stream: client red, server blue */
static const char *const tail_colours[2] = { "\033[31m", "\033[34m" };
#define COLOUR_OFF "\033[0m"

static bool
tail_want_colour(void)
{
	const char *nc = getenv("NO_COLOR");

	return isatty(STDOUT_FILENO) && (nc == NULL || *nc == '\0');
}

/* Ends the run quietly when the reader went away, loudly on other errors. */
static void
tail_check_stdout(struct tail_out *t)
{
	if (fflush(stdout) == 0 && !ferror(stdout))
		return;
	if (errno != EPIPE)
		fprintf(stderr, "capctl: cannot write: %s\n", strerror(errno));
	t->rc = errno == EPIPE ? CTL_OK : CTL_FAIL;
	t->ended = true;
	clearerr(stdout);  /* said once: main's check of stdout has nothing more to tell */
}

static void
tail_line_start(struct tail_out *t, int d)
{
	if (t->colour)
		fputs(tail_colours[d], stdout);
}

static void
tail_line_end(struct tail_out *t)
{
	if (t->colour)
		fputs(COLOUR_OFF, stdout);
	putchar('\n');
}

/* One stretch of a stream in the exact layout of `hexdump -C`, offsets from base. */
static void
tail_hex(struct tail_out *t, int d, uint64_t base, const uint8_t *p, size_t n)
{
	const uint8_t *prev = NULL;
	bool star = false;

	for (size_t i = 0; i < n; i += 16) {
		size_t k = n - i < 16 ? n - i : 16;

		/* identical full lines collapse into one "*" */
		if (k == 16 && prev != NULL && memcmp(prev, p + i, 16) == 0) {
			if (!star) {
				tail_line_start(t, d);
				putchar('*');
				tail_line_end(t);
				star = true;
			}
			continue;
		}
		star = false;
		prev = k == 16 ? p + i : NULL;
		tail_line_start(t, d);
		printf("%08llx  ", (unsigned long long)(base + i));
		for (size_t j = 0; j < 16; j++) {
			if (j < k)
				printf("%02x ", p[i + j]);
			else
				fputs("   ", stdout);
			if (j == 7)
				putchar(' ');
		}
		fputs(" |", stdout);
		for (size_t j = 0; j < k; j++)
			putchar(p[i + j] >= 0x20 && p[i + j] < 0x7f ? p[i + j] : '.');
		putchar('|');
		tail_line_end(t);
	}
	tail_line_start(t, d);
	printf("%08llx", (unsigned long long)(base + n));
	tail_line_end(t);
}

/*
 * The length of the printable UTF-8 character at p (n bytes left), 0 when p
 * starts none (the bytes are escaped), -1 when p holds the start of one that
 * goes on past n. C1 controls (some terminals act on them) and the controls
 * that reorder a line (a line could show other than what was sent) are not
 * printable here.
 */
static int
tail_utf8(const uint8_t *p, size_t n)
{
	static const uint32_t least[5] = { 0, 0, 0x80, 0x800, 0x10000 };  /* shorter forms are not UTF-8 */
	uint32_t cp;
	int len;

	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		len = 2, cp = p[0] & 0x1fu;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		len = 3, cp = p[0] & 0x0fu;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		len = 4, cp = p[0] & 0x07u;
	else
		return 0;
	for (int i = 1; i < len; i++) {
		if ((size_t)i >= n)
			return -1;
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (p[i] & 0x3fu);
	}
	if (cp < least[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff) || cp < 0xa0 ||
	    (cp >= 0x200e && cp <= 0x200f) || (cp >= 0x2028 && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069))
		return 0;
	return len;
}

static bool
tail_is_text(const struct tail_out *t, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		int k;
		if ((p[i] >= 0x20 && p[i] < 0x7f) || p[i] == '\n' || p[i] == '\r' || p[i] == '\t')
			continue;
		if (p[i] < 0x80 || !t->utf8 || (k = tail_utf8(p + i, n - i)) == 0)
			return false;
		if (k < 0)  /* the rest of the character comes with the next chunk */
			return true;
		i += (size_t)k - 1;
	}
	return true;
}

/*
 * Printable ASCII as it is, UTF-8 too in a UTF-8 locale; a line feed (with
 * the carriage return before it) ends a line; tab stays; everything else is
 * escaped C-style. With hold, a UTF-8 character cut off by the end of p is
 * not shown: the bytes shown are returned, the rest wait for the next chunk.
 */
static size_t
tail_text(struct tail_out *t, int d, const uint8_t *p, size_t n, bool hold)
{
	bool open = false;
	size_t i;

	for (i = 0; i < n; i++) {
		uint8_t c = p[i];
		int k = c >= 0x80 && t->utf8 ? tail_utf8(p + i, n - i) : 0;

		if (k < 0 && hold)
			break;
		if (!open) {
			tail_line_start(t, d);
			open = true;
		}
		if (c == '\n' || (c == '\r' && i + 1 < n && p[i + 1] == '\n')) {
			if (c == '\r')
				i++;
			tail_line_end(t);
			open = false;
		} else if (c == '\\') {
			fputs("\\\\", stdout);
		} else if ((c >= 0x20 && c < 0x7f) || c == '\t') {
			putchar(c);
		} else if (k > 0) {
			fwrite(p + i, 1, (size_t)k, stdout);
			i += (size_t)k - 1;
		} else if (c == '\r') {
			fputs("\\r", stdout);
		} else if (c == 0) {
			fputs("\\0", stdout);
		} else {
			printf("\\x%02x", c);
		}
	}
	if (open)
		tail_line_end(t);
	return i;
}

/* The start of a character that a chunk of d ended in, when its rest will not
 * follow (a gap, a hex chunk, the end): shown escaped, on a line of its own. */
static void
tail_held_out(struct tail_out *t, int d)
{
	size_t n = t->nheld[d];

	t->nheld[d] = 0;
	if (n > 0)
		tail_text(t, d, t->held[d], n, false);
}

/* A notice about the stream itself, "[... s2c N bytes dropped ...]": fmt
 * takes the direction ("%s", with its space) and n. It names the direction
 * as a chunk's header line does, not by colour alone: without a terminal the
 * drop of one told at a session's end could have been either. --raw shows
 * one direction and puts it on stderr without. */
static void
tail_notice(struct tail_out *t, int d, const char *fmt, unsigned long long n)
{
	char dir[8];

	if (t->fmt == FMT_RAW) {
		fputs("capctl: ", stderr);
		fprintf(stderr, fmt, "", n);
		fputc('\n', stderr);
		return;
	}
	snprintf(dir, sizeof dir, "%s ", tail_dirs[d]);
	tail_line_start(t, d);
	printf(fmt, dir, n);
	tail_line_end(t);
}

static void
tail_on_data(struct tail_out *t, json_t *p)
{
	const char *dirs = json_string_value(json_object_get(p, "dir"));
	const char *b64 = json_string_value(json_object_get(p, "data"));
	const char *when = json_string_value(json_object_get(p, "time"));
	json_t *offv = json_object_get(p, "offset");
	uint64_t dropped = (uint64_t)json_integer_value(json_object_get(p, "dropped"));
	int d = dirs && !strcmp(dirs, "s2c") ? 1 : 0;
	size_t blen = b64 ? strlen(b64) : 0;
	uint8_t *data;
	long n;

	if (t->dir >= 0 && d != t->dir)
		return;
	if (t->json) {
		json_dumpf(p, stdout, JSON_COMPACT);
		putchar('\n');
		return;
	}
	/* room before the bytes for a character the last chunk began */
	uint8_t *buf = malloc(sizeof t->held[0] + blen / 4 * 3 + 1);
	if (buf == NULL || (n = base64_decode(buf + sizeof t->held[0], b64 ? b64 : "", blen)) < 0) {
		fprintf(stderr, "capctl: capd sent data that is not base64\n");
		free(buf);
		return;
	}
	data = buf + sizeof t->held[0];
	uint64_t off = json_is_integer(offv) ? (uint64_t)json_integer_value(offv) : t->next[d] + dropped;
	if (t->nheld[d] > 0 && (dropped > 0 || off != t->held_end[d]))
		tail_held_out(t, d);
	if (dropped > 0) {
		tail_notice(t, d, "[... %s%llu bytes dropped ...]", (unsigned long long)dropped);
		t->next[d] += dropped;
	}
	if (off > t->next[d])  /* bytes carried before what the backlog kept */
		tail_notice(t, d, "[... %s%llu bytes before the backlog ...]", (unsigned long long)(off - t->next[d]));
	t->next[d] = off + (uint64_t)n;
	if (n == 0) {
		free(buf);
		return;
	}
	/* the chunk's bytes after the start of a character the last one held back */
	uint8_t *all = data - t->nheld[d];
	size_t alln = t->nheld[d] + (size_t)n;
	memcpy(all, t->held[d], t->nheld[d]);
	switch (t->fmt) {
	case FMT_RAW:
		fwrite(data, 1, (size_t)n, stdout);
		break;
	case FMT_AUTO:
	case FMT_HEX:
	case FMT_TEXT:
		if (t->fmt == FMT_HEX || (t->fmt == FMT_AUTO && !tail_is_text(t, all, alln))) {
			tail_held_out(t, d);
			tail_line_start(t, d);
			printf("[%s %s %ld bytes]", when ? when : "-", tail_dirs[d], n);
			tail_line_end(t);
			tail_hex(t, d, off, data, (size_t)n);
			t->cr_end[d] = 0;
		} else {
			tail_line_start(t, d);
			printf("[%s %s %ld bytes]", when ? when : "-", tail_dirs[d], n);
			tail_line_end(t);
			/* a read that fell between CR and LF: the line the pair
			 * ends was ended with the chunk before, not again here */
			size_t lf = t->cr_end[d] == off && data[0] == '\n';
			size_t shown = lf + tail_text(t, d, all + lf, alln - lf, true);

			t->nheld[d] = alln - shown;
			memcpy(t->held[d], all + shown, t->nheld[d]);
			t->held_end[d] = off + (uint64_t)n;
			t->cr_end[d] = data[n - 1] == '\r' ? off + (uint64_t)n : 0;
		}
		break;
	}
	free(buf);
}

/* Hands each notification to cb until it says the stream ended; closes c. */
static int
tail_follow(struct client *c, void (*cb)(json_t *m, void *arg), struct tail_out *t)
{
	while (!t->ended) {
		json_t *m = client_next(c);
		if (m == NULL) {
			client_close(c);
			return CTL_FAIL;
		}
		if (json_object_get(m, "id") == NULL)
			cb(m, t);
		json_decref(m);
	}
	client_close(c);
	return t->rc;
}

static void
tail_on_note(json_t *m, void *arg)
{
	struct tail_out *t = arg;
	const char *method = json_string_value(json_object_get(m, "method"));
	json_t *p = json_object_get(m, "params");

	if (method == NULL || t->ended)
		return;
	if (!strcmp(method, "session.data")) {
		tail_on_data(t, p);
	} else if (!strcmp(method, "session.end")) {
		t->ended = true;
		tail_held_out(t, 0);
		tail_held_out(t, 1);
		if (t->json) {
			json_dumpf(p, stdout, JSON_COMPACT);
			putchar('\n');
		} else if (t->fmt != FMT_RAW) {
			char up[16], down[16];
			printf("[session %lld ended: %s, up %s, down %s]\n", (long long)json_integer_value(json_object_get(p, "id")),
			       json_string_value(json_object_get(p, "reason")),
			       output_size(json_object_get(p, "bytes_up"), up, sizeof up),
			       output_size(json_object_get(p, "bytes_down"), down, sizeof down));
		}
	}
	tail_check_stdout(t);
}

static int
tail_session(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const usage = "usage: capctl tail session ID [--hex|--text|--raw] [--dir c2s|s2c] [--backlog SIZE]";
	struct tail_out t = { .fmt = FMT_AUTO, .dir = -1, .json = o->json };
	json_t *params = json_object(), *r = NULL;
	const char *idarg = NULL;
	struct client *c;
	uint64_t id, v;
	long rid;
	int rc;

	for (int k = 2; k < argc; k++) {
		const char *a = argv[k];
		/* one format, one direction, one backlog: a second was taken over the first silently */
		const char *twice = NULL;
		if ((!strcmp(a, "--hex") || !strcmp(a, "--text") || !strcmp(a, "--raw")) && t.fmt != FMT_AUTO)
			twice = "give one of --hex, --text and --raw";
		else if ((!strcmp(a, "--dir") || !strncmp(a, "--dir=", 6)) && t.dir >= 0)
			twice = "--dir given twice";
		else if ((!strcmp(a, "--backlog") || !strncmp(a, "--backlog=", 10)) && json_object_get(params, "backlog"))
			twice = "--backlog given twice";
		if (twice != NULL) {
			json_decref(params);
			return usage_error("%s", twice);
		}
		if (!strcmp(a, "--hex")) {
			t.fmt = FMT_HEX;
		} else if (!strcmp(a, "--text")) {
			t.fmt = FMT_TEXT;
		} else if (!strcmp(a, "--raw")) {
			t.fmt = FMT_RAW;
		} else if ((!strcmp(a, "--dir") || !strcmp(a, "--backlog")) && k + 1 >= argc) {
			json_decref(params);
			return ctl_needs_value(a);
		} else if (!strcmp(a, "--dir") || !strncmp(a, "--dir=", 6)) {
			const char *w = a[5] == '=' ? a + 6 : argv[++k];
			if (!strcmp(w, "c2s") || !strcmp(w, "up"))
				t.dir = 0;
			else if (!strcmp(w, "s2c") || !strcmp(w, "down"))
				t.dir = 1;
			else {
				json_decref(params);
				return usage_error("--dir takes c2s or s2c, not '%s'", w);
			}
		} else if (!strcmp(a, "--backlog") || !strncmp(a, "--backlog=", 10)) {
			const char *w = a[9] == '=' ? a + 10 : argv[++k];
			if (value_size(w, &v) < 0 || v > INT64_MAX) {
				json_decref(params);
				return usage_error("--backlog takes a size (bytes, or with K, M, G), not '%s'", w);
			}
			json_object_set_new(params, "backlog", json_integer((json_int_t)v));
		} else if (idarg == NULL && a[0] != '-') {
			idarg = a;
		} else {
			json_decref(params);
			return usage_extra(usage, a);
		}
	}
	if (idarg == NULL) {
		json_decref(params);
		return usage_wrong(usage, "tail session needs a session id");
	}
	if (value_uint(idarg, INT64_MAX, &id) < 0 || id == 0) {
		json_decref(params);
		return usage_error("tail: '%s' is not a session id", idarg);
	}
	if (t.fmt == FMT_RAW && t.dir < 0) {
		json_decref(params);
		return usage_error("--raw writes one direction: add --dir c2s or --dir s2c");
	}
	t.colour = t.fmt != FMT_RAW && !t.json && tail_want_colour();
	/* UTF-8 text prints as it is where the terminal takes it, as less(1) does */
	t.utf8 = setlocale(LC_CTYPE, "") != NULL && !strcmp(nl_langinfo(CODESET), "UTF-8");
	json_object_set_new(params, "id", json_integer((json_int_t)id));
	if (t.dir >= 0)  /* capd sends only that direction: the other cannot crowd it out */
		json_object_set_new(params, "dir", json_string(tail_dirs[t.dir]));

	signal(SIGPIPE, SIG_IGN);
	output_watch_reader();
	if ((c = client_open(o)) == NULL) {
		json_decref(params);
		return CTL_FAIL;
	}
	if ((rid = client_send(c, "session.tail", params)) < 0) {
		client_close(c);
		return CTL_FAIL;
	}
	if ((rc = client_wait(c, rid, &r, tail_on_note, &t)) != CTL_OK) {
		client_close(c);
		return rc;
	}
	if (!t.json && t.fmt != FMT_RAW) {
		printf("[session %llu %s %s %s -> %s]\n", (unsigned long long)id,
		       json_string_value(json_object_get(r, "instance")), json_string_value(json_object_get(r, "proto")),
		       json_string_value(json_object_get(r, "client")), json_string_value(json_object_get(r, "target")));
		tail_check_stdout(&t);
	}
	json_decref(r);
	return tail_follow(c, tail_on_note, &t);
}

/* One human line per event: time, event, then what it is about. */
static void
tail_event_line(json_t *e)
{
	const char *ev = json_string_value(json_object_get(e, "event"));
	const char *tm = json_string_value(json_object_get(e, "time"));
	char up[16], down[16];

	/* a field not known (NULL) or not known yet (""): a blank would shift the columns */
#define S(k) (json_string_value(json_object_get(e, k)) && *json_string_value(json_object_get(e, k)) ? \
	      json_string_value(json_object_get(e, k)) : "-")
	if (ev == NULL)
		return;
	printf("%s %s ", tm ? tm : "-", ev);
	if (!strncmp(ev, "session.", 8)) {
		printf("%lld %s %s %s -> %s", (long long)json_integer_value(json_object_get(e, "id")), S("instance"), S("proto"),
		       S("client"), S("target"));
		if (!strcmp(ev, "session.close"))
			printf(" up %s down %s: %s", output_size(json_object_get(e, "bytes_up"), up, sizeof up),
			       output_size(json_object_get(e, "bytes_down"), down, sizeof down), S("reason"));
	} else if (!strncmp(ev, "instance.", 9)) {
		printf("%s %s %s", S("name"), S("type"), S("listen"));
		if (json_object_get(e, "error"))
			printf(": %s", S("error"));
	} else if (!strcmp(ev, "capture.rotate")) {
		printf("%s", S("file"));
	} else {
		/* anything newer: the fields as they come */
		const char *k;
		json_t *v;
		bool first = true;
		json_object_foreach(e, k, v) {
			if (!strcmp(k, "event") || !strcmp(k, "time"))
				continue;
			char *s = json_is_string(v) ? NULL : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
			printf("%s%s=%s", first ? "" : " ", k, s ? s : json_string_value(v));
			free(s);
			first = false;
		}
	}
#undef S
	putchar('\n');
}

static void
tail_on_event(json_t *m, void *arg)
{
	struct tail_out *t = arg;
	const char *method = json_string_value(json_object_get(m, "method"));
	json_t *p = json_object_get(m, "params");

	if (method == NULL)
		return;
	if (!strcmp(method, "event")) {
		if (t->json) {
			json_dumpf(p, stdout, JSON_COMPACT);
			putchar('\n');
		} else {
			tail_event_line(p);
		}
	} else if (!strcmp(method, "events.dropped")) {
		/* on stderr with --json, so stdout stays one event object per line */
		fprintf(t->json ? stderr : stdout, "[... %lld events dropped ...]\n",
		        (long long)json_integer_value(json_object_get(p, "dropped")));
	}
	tail_check_stdout(t);
}

static int
tail_events(struct ctl_opts *o, int argc, char **argv)
{
	struct tail_out t = { .json = o->json };
	struct client *c;
	long rid;
	int rc;

	if (argc != 2)
		return usage_extra("usage: capctl tail events [--json]", argv[2]);
	signal(SIGPIPE, SIG_IGN);
	output_watch_reader();  /* `| grep -m1 ...` ends it on a quiet capd too */
	if ((c = client_open(o)) == NULL)
		return CTL_FAIL;
	if ((rid = client_send(c, "events.subscribe", NULL)) < 0) {
		client_close(c);
		return CTL_FAIL;
	}
	if ((rc = client_wait(c, rid, NULL, tail_on_event, &t)) != CTL_OK) {
		client_close(c);
		return rc;
	}
	return tail_follow(c, tail_on_event, &t);
}

static int
tail_exec(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const what[] = { "session", "events" };
	int w;

	static const char *const usage =
		"usage: capctl tail session ID [--hex|--text|--raw] [--dir c2s|s2c] [--backlog SIZE] | tail events [--json]";

	if (argc < 2)
		return usage_wrong(usage, "tail needs session or events");
	if ((w = word_match(argv[1], what, 2)) < 0)
		return usage_error("%s tail command '%s' (session or events)", w == -2 ? "ambiguous" : "unknown", argv[1]);
	return w == 0 ? tail_session(o, argc, argv) : tail_events(o, argc, argv);
}

const struct cmd cmd_tail = { "tail", "session ID [--hex|--text|--raw] [--dir c2s|s2c] [--backlog SIZE] | events",
	                      tail_exec };

/*
 * capctl: the user's side. A thin client: each command builds params from
 * argv, calls one JSON-RPC method on capd, and prints a table or JSON.
 */
#ifndef CAPCTL_H
#define CAPCTL_H

#include <jansson.h>
#include <stdbool.h>

enum { CTL_OK = 0, CTL_FAIL = 1, CTL_USAGE = 2 };

struct ctl_opts {
	const char *socket;  /* -s, CAPD_SOCKET, or /run/capd/capd.sock */
	bool json;           /* --json anywhere before "--" */
	double timeout;      /* --timeout: seconds client_call waits for capd, 0 = for ever */
};

/* One entry of the command table; one file per command (cmd-*.c). */
struct cmd {
	const char *name;
	const char *usage;   /* the words after the command name */
	int (*exec)(struct ctl_opts *o, int argc, char **argv);  /* argv[0] is the command word */
};

/* A connection to capd. Owned by the caller; client_close() frees it. */
struct client;

struct client *client_open(const struct ctl_opts *o);  /* prints "cannot reach capd at PATH: ..." on failure */
void client_close(struct client *c);
/* Sends a request; returns its id. params is stolen. */
long client_send(struct client *c, const char *method, json_t *params);
/* Next message from capd (reply or notification), of any size. Caller owns.
 * NULL at EOF or on an error, which it has printed ("capctl: capd closed the connection"). */
json_t *client_next(struct client *c);
/* Calls method and waits for its reply, at most o->timeout seconds (when set). On error prints
 * "capctl: message" and returns CTL_FAIL.
 * *result is set (caller owns) on success. params is stolen. */
int client_call(const struct ctl_opts *o, const char *method, json_t *params, json_t **result);
/* Waits for the reply to id on an open client, passing notifications to cb (may be NULL). */
int client_wait(struct client *c, long id, json_t **result, void (*cb)(json_t *note, void *arg), void *arg);

/* Output helpers (output.c). */
struct table;
struct table *table_new(const char *const *headers, int ncols);
void table_add(struct table *t, ...);  /* ncols strings */
void table_print(struct table *t);
void table_free(struct table *t);
void output_json(const json_t *v);      /* pretty JSON + newline on stdout */
/* Exits 0 as soon as the reader of stdout (a pipe) goes away, from a thread of its own. */
void output_watch_reader(void);
const char *output_size(json_t *v, char *buf, size_t n);  /* integer -> "1.2M" */
const char *output_age(const char *rfc3339, char *buf, size_t n);  /* "3s", "5m", "2h" */
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));  /* prints, returns CTL_USAGE */
/* A bad call: the usage line, then "capctl: " and what was wrong as the last line (as
 * `capctl add` does), on stderr; returns CTL_USAGE. */
int usage_wrong(const char *usage, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* usage_wrong for a word the command does not take: "unknown option --x" or
 * "unexpected argument 'x'". */
int usage_extra(const char *usage, const char *arg);
/* "capctl: OPT needs a value" for an option that came last without its value; returns CTL_USAGE. */
int ctl_needs_value(const char *opt);

/* s as a JSON string (caller owns); NULL after "capctl: WHAT: the value is not UTF-8 text"
 * (exit CTL_USAGE) when it is not UTF-8. */
json_t *ctl_string(const char *what, const char *s);
/* An instance name as a JSON string, as ctl_string; an empty one is refused the same way. */
json_t *ctl_name(const char *what, const char *s);
/* The name of a new instance, as ctl_name; one capd would refuse (value_name_ok) is refused too. */
json_t *ctl_new_name(const char *what, const char *s);
/* argv[*k] as `--instance NAME` or `--instance=NAME` into params' "instance" (*k moves
 * past its value): CTL_OK, CTL_USAGE after saying why, or -1 when argv[*k] is another word. */
int ctl_instance_opt(int argc, char **argv, int *k, json_t *params);

/* Prefix matching of words: exact first, then a unique prefix. -1 when none, -2 ambiguous. */
int word_match(const char *word, const char *const *words, int n);

extern const struct cmd cmd_add, cmd_capture, cmd_kill, cmd_list, cmd_reload, cmd_remove, cmd_sessions,
	cmd_status;
extern const struct cmd cmd_tail;
/* capctl capture follow (cmd-follow.c), reached through cmd_capture. */
int capture_follow(struct ctl_opts *o, int argc, char **argv);
extern const struct cmd cmd_trace;
extern const struct cmd cmd_hosts;
extern const struct cmd cmd_ca;

#endif

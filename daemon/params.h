/*
 * Instance parameters: the JSON object that both a config section and
 * instance.add produce. Values may be strings (from INI or capctl) or typed
 * JSON; the getters accept both. Errors name the key and, for config
 * sections, the file and line.
 */
#ifndef CAPD_PARAMS_H
#define CAPD_PARAMS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct params {
	json_t *obj;       /* borrowed: {"type","name","listen",...} */
	const char *file;  /* config file, or NULL for RPC */
	json_t *lines;     /* borrowed {"key": line}, {"key": [line, ...]} for a repeated key, or NULL */
	int section_line;
	char *why;         /* first error, "file:line: message"; owned here */
	json_t *files;     /* borrowed, or NULL: {path: SHA-256} of the files read (params_file_read) */
};

/* Records an error for key (NULL: the section) unless one is already set; returns -1. */
int params_fail(struct params *p, const char *key, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* params_fail about the index-th value of a repeated key (params_list): its own line. */
int params_fail_at(struct params *p, const char *key, size_t index, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/*
 * A warning about key of instance name: logged when the instance is made
 * (no file), and by `capd -t` (params_warn_checks) with the file and line,
 * so that the check says what start-up will; the checks of a file at
 * start-up and reload keep quiet, as the instance made next says it.
 */
void params_warn(struct params *p, const char *name, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/*
 * A warning that the instance gives itself once it is up (a listener beyond
 * loopback, an open proxy): said here by `capd -t` alone, with the file and
 * line, so that a normal start says it once, when it is true.
 */
void params_warn_check(struct params *p, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
extern bool params_warn_checks;  /* set by capd -t */
const char *params_str(struct params *p, const char *key, const char *def);
/* A comma-separated value, also taken as a JSON array of strings and numbers (joined). */
const char *params_csv(struct params *p, const char *key, const char *def);
int params_bool(struct params *p, const char *key, bool def, bool *out);
int params_size(struct params *p, const char *key, uint64_t def, uint64_t *out);
int params_duration(struct params *p, const char *key, double def, double *out);
int params_uint(struct params *p, const char *key, uint64_t def, uint64_t max, uint64_t *out);
/* Repeated keys: an array of strings (a lone string counts as one). Borrowed. */
json_t *params_list(struct params *p, const char *key);
/*
 * The whole file at path, which a key names (users, tls_client_cert): 0 with
 * *data (NUL-terminated; free it with params_file_free, as it may hold
 * passwords or keys) and *len, or -1 with errno. What was read is
 * fingerprinted in p->files: a reload compares the fingerprints to restart
 * an instance whose file changed while its key did not.
 */
int params_file_read(struct params *p, const char *path, char **data, size_t *len);
void params_file_free(char *data, size_t len);
/* Fails on any key not in the NULL-terminated list (plus the keys every instance takes). */
int params_check_keys(struct params *p, const char *const *allowed);

#endif

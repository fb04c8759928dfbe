/*
 * The config file: INI with one [capd] section and one [TYPE NAME] section
 * per instance. Each instance section becomes the same parameter object
 * that instance.add takes. Errors are "file:line: message".
 */
#ifndef CAPD_CONF_H
#define CAPD_CONF_H

#include <jansson.h>
#include <stdbool.h>

#include "capd.h"

/* Owned by the caller of conf_load; conf_free() frees it. */
struct conf {
	char *file;
	struct capd_settings settings;
	json_t *instances;  /* [{"params":{...}, "lines":{key:line or [line, ...]}, "line":N,
	                     *   "files":{path:SHA-256} (instance_check)}] in file order */
	json_t *capd_lines; /* {key: line} of the [capd] keys set */
	bool empty;         /* no section at all (nothing, blanks, comments): conf_check refuses it */
};

/* Parses and validates the whole file (instances included) without opening anything. */
struct conf *conf_load(const char *path, char **why);
/* Parses from memory; name is used in messages (tests and fuzzing). */
struct conf *conf_load_string(const char *text, const char *name, const char *base_dir, char **why);
void conf_free(struct conf *c);
/* What a loaded file must pass besides its syntax, the same for start-up,
 * capd -t and a reload: it has a section, and the user to switch to (as
 * root) and the control group exist. A reload passes the settings in force
 * (running; NULL at start and for capd -t): it keeps user and control_group
 * as they were, and looks them up only when the file changed them, so that
 * the serving loop waits on the user database only then. */
int conf_check(const struct conf *c, const struct capd_settings *running, char **why);
/* Defaults for [capd], with paths under base. */
void conf_settings_defaults(struct capd_settings *st);
void conf_settings_free(struct capd_settings *st);

#endif

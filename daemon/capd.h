/*
 * Daemon-wide state: the event loop and the running configuration.
 * Owned by capd.c; everything else borrows.
 */
#ifndef CAPD_CAPD_H
#define CAPD_CAPD_H

#include <ev.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"  /* CAPD_VERSION: meson.build's project version */
#include "shard.h"

/* The [capd] section. Owned by the conf that parsed it; conf_free() frees it. */
struct capd_settings {
	char *control;        /* control socket path */
	char *control_group;  /* group owning the control socket, or NULL */
	char *spool;          /* spool folder */
	uint64_t rotate_size; /* bytes; 0 = no size rotation */
	double rotate_time;   /* seconds; 0 = off */
	unsigned keep_files;
	double flush_interval;
	char *state_dir;      /* session id counter, CA; defaults to spool */
	char *user;           /* drop privileges to this user, or NULL */
	int log_level;
	char *hosts_file;
	bool hosts_restore;
	char *ca_cert, *ca_key, *keylog_file;
	uint64_t tail_backlog;
	unsigned workers;     /* event loop threads; 0 = one per CPU (read at start only) */
};

extern struct capd_settings *capd_settings;  /* the one in force */
extern const char *capd_config_path;

/*
 * Re-reads the config and applies the difference: -1 and *why when it does
 * not parse (nothing changed). Otherwise 0, and done (if any) runs once its
 * new instances have started, maybe before this returns, with their errors
 * or NULL (borrowed).
 */
/* summary: {"restart_only": [key...], "added": n, "removed": n, "changed": n} */
typedef void capd_reloaded_fn(void *arg, const char *errs, json_t *summary);
int capd_reload(capd_reloaded_fn *done, void *arg, char **why);
/* Seconds since the epoch, with the loop's cached time. */
static inline double capd_now(void) { return ev_now(capd_loop); }

#endif

/*
 * Privilege drop: capd starts as root, binds and opens what its config asks
 * for, then becomes `user =` (default `capd` when that user exists) keeping
 * only the capabilities that instances added later still need.
 */
#ifndef CAPD_PRIVDROP_H
#define CAPD_PRIVDROP_H

struct capd_settings;

/*
 * Drops root for st->user (or "capd" when it exists and st->user is unset).
 * Gives the spool and state folders to the user first. Keeps, in the
 * permitted, effective and bounding sets: CAP_NET_BIND_SERVICE (ports below
 * 1024) and CAP_NET_RAW (sniffers); and CAP_DAC_OVERRIDE with CAP_CHOWN only
 * when the user could not rewrite the hosts file itself (capctl hosts).
 * Does nothing when capd does not run as root, or when the user is root.
 * Returns 0, or -1 with *why (caller frees): an unknown user, a failed switch.
 */
int privdrop(const struct capd_settings *st, char **why);

#endif

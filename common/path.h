/*
 * Paths as capd shows them: a config's "control = ../build/capd.sock" made
 * absolute against the config file's folder reads /srv/build/capd.sock, not
 * /srv/conf/../build/capd.sock, and still names the file the kernel would open.
 */
#ifndef CAPD_PATH_H
#define CAPD_PATH_H

/*
 * path made absolute against base (an absolute folder, as realpath(3) gives
 * it) unless it is absolute already, without "." components, repeated or
 * trailing slashes (one trailing slash is kept: it asks for a folder).
 * "name/.." is removed only where name is a folder that is not a symlink;
 * after a symlink the path up to it is resolved (realpath) first, and where
 * that prefix does not exist (or is not a folder) the ".." stays, as the
 * kernel would walk it. No other symlink is resolved: the file keeps the
 * name the user gave it. A relative path with no absolute base comes back
 * joined as it was. Caller owns the result.
 */
char *path_clean(const char *base, const char *path);

#endif

/*
 * Proxy users: name and password pairs from a users file (`users = FILE`,
 * lines `name:password`, `#` comments) and from repeated `auth = name:pass`
 * keys. Shared by the SOCKS5 (RFC 1929) and HTTP (Basic) proxies.
 */
#ifndef CAPD_USERS_H
#define CAPD_USERS_H

#include <stdbool.h>
#include <stddef.h>

#include "params.h"
#include "values.h"

#define USERS_FIELD_MAX VALUE_AUTH_FIELD_MAX  /* RFC 1929 limits names and passwords to 255 bytes */

struct users;

/* Reads `users` and `auth` from p. NULL when neither is given, or on an
 * error (then recorded with params_fail: check p->why). Caller owns the result. */
struct users *users_load(struct params *p);
void users_free(struct users *u);
/* True when name exists and pass matches (compared in constant time). u NULL: false. */
bool users_check(const struct users *u, const char *name, const char *pass);
bool users_exists(const struct users *u, const char *name);
size_t users_count(const struct users *u);

#endif

/*
 * Config and command-line values: sizes (bytes or K/M/G, powers of 1024),
 * durations (seconds or ms/s/m/h), booleans (yes|no|true|false|1|0).
 */
#ifndef CAPD_VALUES_H
#define CAPD_VALUES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

int value_size(const char *s, uint64_t *out);
/* Duration in seconds; "0" means off where the key allows it. */
int value_duration(const char *s, double *out);
int value_bool(const char *s, bool *out);
int value_uint(const char *s, uint64_t max, uint64_t *out);
/* Human-readable byte count: 1023, 1.2K, 8.4M. */
char *value_human_size(uint64_t n, char *out, size_t len);

#endif

/*
 * Config and command-line values: sizes (bytes or K/M/G, powers of 1024),
 * durations (seconds or ms/s/m/h), booleans (yes|no|true|false|1|0).
 */
#ifndef CAPD_VALUES_H
#define CAPD_VALUES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Bounds of instance parameters that capd enforces and capctl checks first (exit 2). */
#define VALUE_AUTH_FIELD_MAX 255           /* RFC 1929: a user name or a password, bytes */
#define VALUE_SNAPLEN_MAX 262144u          /* sniff snaplen: libpcap's own default and ceiling */
/* sniff buffer_size: libpcap 1.10's TPACKET_V3 ring is made of 256 KiB blocks,
 * so 1 MiB is 4 of them (dumpcap -B takes 1 MiB at least); pcap_set_buffer_size
 * takes an int, and no capture needs more than 1 GiB */
#define VALUE_SNIFF_BUFFER_MIN (1u << 20)
#define VALUE_SNIFF_BUFFER_MAX (1u << 30)
#define VALUE_HEADER_SIZE_MIN 1024u        /* max_header_size */
#define VALUE_HEADER_SIZE_MAX (64u * 1024) /* max_header_size: a head fits the relay's buffer */
#define VALUE_TTL_MAX 2147483647u          /* dns ttl: RFC 2181 8 */
#define VALUE_NAME_MAX 64                  /* an instance name, bytes */

int value_size(const char *s, uint64_t *out);
/* Duration in seconds; "0" means off where the key allows it. */
int value_duration(const char *s, double *out);
/* The longest duration capd takes (10 years, 87600h): past it the spool
 * writer's deadline overflowed time_t and its thread spun (flush_interval =
 * 1e300), and no timeout needs more. Checked by the callers, which say so. */
#define VALUE_DURATION_MAX (87600.0 * 3600.0)
#define VALUE_DURATION_MAX_TEXT "at most 87600h"
int value_bool(const char *s, bool *out);
int value_uint(const char *s, uint64_t max, uint64_t *out);
/* An instance name as instance.c takes it: 1 to VALUE_NAME_MAX bytes, no
 * spaces, quotes, slashes, backslashes or control characters. */
bool value_name_ok(const char *s);
/* Human-readable byte count: 1023, 1.2K, 8.4M. */
char *value_human_size(uint64_t n, char *out, size_t len);

#endif

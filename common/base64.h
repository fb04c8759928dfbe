/*
 * Base64 (RFC 4648, with padding) for payloads carried in JSON-RPC
 * notifications: capd encodes, capctl decodes.
 */
#ifndef CAPD_BASE64_H
#define CAPD_BASE64_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/* Encoded length of n bytes, without a terminating NUL. */
static inline size_t base64_len(size_t n) { return (n + 2) / 3 * 4; }
/* Writes base64_len(n) characters to out (no NUL). */
void base64_encode(char *out, const void *p, size_t n);
/* A JSON string holding p encoded; caller owns. */
json_t *base64_json(const void *p, size_t n);
/* Decodes n characters into out (room for n / 4 * 3 bytes); -1 on bad input, else the byte count. */
long base64_decode(uint8_t *out, const char *in, size_t n);

#endif

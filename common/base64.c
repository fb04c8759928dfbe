/* Base64 encoding and decoding; see base64.h. */
#include "base64.h"

#include <stdbool.h>
#include <stdlib.h>

#include "xmalloc.h"

static const char base64_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void
base64_encode(char *out, const void *p, size_t n)
{
	const uint8_t *s = p;
	size_t i;

	for (i = 0; i + 3 <= n; i += 3) {
		uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
		*out++ = base64_chars[v >> 18];
		*out++ = base64_chars[(v >> 12) & 63];
		*out++ = base64_chars[(v >> 6) & 63];
		*out++ = base64_chars[v & 63];
	}
	if (i < n) {
		uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
		*out++ = base64_chars[v >> 18];
		*out++ = base64_chars[(v >> 12) & 63];
		*out++ = i + 1 < n ? base64_chars[(v >> 6) & 63] : '=';
		*out++ = '=';
	}
}

json_t *
base64_json(const void *p, size_t n)
{
	size_t len = base64_len(n);
	char *s = xmalloc(len + 1);
	json_t *j;

	base64_encode(s, p, n);
	s[len] = '\0';
	j = json_stringn_nocheck(s, len);
	free(s);
	return j;
}

static int
base64_value(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

long
base64_decode(uint8_t *out, const char *in, size_t n)
{
	uint8_t *o = out;

	if (n % 4 != 0)
		return -1;
	for (size_t i = 0; i < n; i += 4) {
		int a = base64_value(in[i]), b = base64_value(in[i + 1]);
		int c = in[i + 2] == '=' ? 0 : base64_value(in[i + 2]);
		int d = in[i + 3] == '=' ? 0 : base64_value(in[i + 3]);
		bool last = i + 4 == n;

		if (a < 0 || b < 0 || c < 0 || d < 0)
			return -1;
		if (!last && (in[i + 2] == '=' || in[i + 3] == '='))
			return -1;
		if (in[i + 2] == '=' && in[i + 3] != '=')
			return -1;
		uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d;
		*o++ = (uint8_t)(v >> 16);
		if (in[i + 2] != '=')
			*o++ = (uint8_t)(v >> 8);
		if (in[i + 3] != '=')
			*o++ = (uint8_t)v;
	}
	return (long)(o - out);
}

/* JSON-RPC line framing and message builders; see rpc.h. */
#include "rpc.h"

#include <stdlib.h>
#include <string.h>

#include "xmalloc.h"

void
rpc_framer_init(struct rpc_framer *f, size_t max)
{
	memset(f, 0, sizeof *f);
	f->max = max ? max : RPC_MAX_LINE;
}

void
rpc_framer_free(struct rpc_framer *f)
{
	buf_free(&f->in);
}

enum rpc_frame
rpc_framer_next(struct rpc_framer *f, char **line, size_t *len)
{
	for (;;) {
		size_t used = buf_used(&f->in);
		uint8_t *head = buf_head(&f->in);
		uint8_t *nl = NULL;

		if (f->scanned < used)
			nl = memchr(head + f->scanned, '\n', used - f->scanned);
		if (nl == NULL) {
			f->scanned = used;
			if (used > f->max) {
				/* drop what we have and keep skipping until the newline */
				buf_reset(&f->in);
				f->scanned = 0;
				if (!f->skipping) {
					f->skipping = 1;
					return RPC_FRAME_TOO_LONG;
				}
			}
			return RPC_FRAME_NONE;
		}
		size_t n = (size_t)(nl - head);
		f->scanned = 0;
		if (f->skipping) {
			f->skipping = 0;
			buf_consume(&f->in, n + 1);
			continue;
		}
		if (n > f->max) {
			buf_consume(&f->in, n + 1);
			return RPC_FRAME_TOO_LONG;
		}
		*nl = '\0';
		*line = (char *)head;
		*len = n;
		if (n > 0 && head[n - 1] == '\r')
			head[--(*len)] = '\0';
		buf_consume(&f->in, n + 1);  /* data stays in place until the next append */
		/* blank lines are keep-alives, spaces and tabs alone too ("  \r\n"
		 * from a terminal): JSON's own whitespace, no request */
		if (strspn(*line, " \t\r") == *len)
			continue;
		return RPC_FRAME_LINE;
	}
}

json_t *
rpc_request(const char *method, json_t *params, json_int_t id)
{
	json_t *m = json_pack("{s:s, s:s, s:I}", "jsonrpc", "2.0", "method", method, "id", id);
	if (params)
		json_object_set_new(m, "params", params);
	return m;
}

json_t *
rpc_result(json_t *id, json_t *result)
{
	json_t *m = json_pack("{s:s, s:O, s:o}", "jsonrpc", "2.0", "id", id ? id : json_null(), "result",
	                      result ? result : json_null());
	return m;
}

/* The bytes of one UTF-8 character at p, or 0 when p starts none (a lead
 * byte alone, a character cut short). json_string() has the last word. */
static size_t
rpc_utf8_len(const unsigned char *p)
{
	size_t n;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2;
	else if ((p[0] & 0xf0) == 0xe0)
		n = 3;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		n = 4;
	else
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((p[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/*
 * msg as a JSON string, whatever its bytes (caller owns). A message that
 * is not UTF-8 (a name cut inside a character by "%.200s") made
 * json_pack() fail, and the reply went out as an empty line, which a
 * client skips as a keep-alive while it waits for ever: its stray bytes
 * become '?'.
 */
static json_t *
rpc_text(const char *msg)
{
	json_t *s = json_string(msg);
	char *copy;

	if (s != NULL)
		return s;
	copy = xstrdup(msg);
	for (size_t i = 0, n; copy[i] != '\0'; i += n)
		if ((n = rpc_utf8_len((unsigned char *)copy + i)) == 0) {
			copy[i] = '?';
			n = 1;
		}
	s = json_string(copy);
	free(copy);
	return s != NULL ? s : json_string("(a message that is not UTF-8)");
}

json_t *
rpc_error(json_t *id, int code, const char *msg)
{
	return json_pack("{s:s, s:O, s:{s:i, s:o}}", "jsonrpc", "2.0", "id", id ? id : json_null(), "error",
	                 "code", code, "message", rpc_text(msg));
}

json_t *
rpc_notification(const char *method, json_t *params)
{
	return json_pack("{s:s, s:s, s:o}", "jsonrpc", "2.0", "method", method, "params", params);
}

static int
rpc_dump_cb(const char *p, size_t n, void *arg)
{
	buf_append(arg, p, n);
	return 0;
}

void
rpc_encode(struct buf *out, const json_t *msg)
{
	json_dump_callback(msg, rpc_dump_cb, out, JSON_COMPACT);
	buf_append(out, "\n", 1);
}

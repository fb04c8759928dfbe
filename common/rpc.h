/*
 * JSON-RPC 2.0 framing over a stream: one JSON text per line.
 * Shared by capd's control server and capctl.
 */
#ifndef CAPD_RPC_H
#define CAPD_RPC_H

#include <jansson.h>
#include <stddef.h>

#include "buf.h"

#define RPC_MAX_LINE (1024 * 1024)  /* a request over 1 MiB is refused */

enum rpc_errcode {
	RPC_E_PARSE = -32700,
	RPC_E_INVALID = -32600,
	RPC_E_NO_METHOD = -32601,
	RPC_E_PARAMS = -32602,
	RPC_E_INTERNAL = -32603,
	RPC_E_FAILED = -32000,     /* the daemon refused: message says why */
	RPC_E_NOT_FOUND = -32001,  /* no such session / instance */
	RPC_E_TOO_LARGE = -32002,
};

enum rpc_frame {
	RPC_FRAME_NONE,     /* need more bytes */
	RPC_FRAME_LINE,     /* *line and *len hold one line without its newline */
	RPC_FRAME_TOO_LONG, /* a line passed RPC_MAX_LINE: its bytes up to the next newline are skipped */
};

/*
 * Frames lines out of an input buffer. state tracks a line being skipped
 * because it was too long. The returned line stays valid until the next call
 * that changes the buffer; rpc_frame_done() consumes it.
 */
struct rpc_framer {
	struct buf in;
	size_t max;      /* RPC_MAX_LINE unless a test sets it lower */
	int skipping;    /* dropping the rest of an oversized line */
	size_t scanned;  /* bytes already checked for a newline */
};

void rpc_framer_init(struct rpc_framer *f, size_t max);
void rpc_framer_free(struct rpc_framer *f);
enum rpc_frame rpc_framer_next(struct rpc_framer *f, char **line, size_t *len);

/* Builders; each returns a new reference the caller owns. */
json_t *rpc_request(const char *method, json_t *params /* stolen, may be NULL */, json_int_t id);
json_t *rpc_result(json_t *id /* borrowed */, json_t *result /* stolen */);
json_t *rpc_error(json_t *id /* borrowed, may be NULL */, int code, const char *msg);
json_t *rpc_notification(const char *method, json_t *params /* stolen */);
/* Encodes msg as one line ending in '\n' appended to out. */
void rpc_encode(struct buf *out, const json_t *msg);

#endif

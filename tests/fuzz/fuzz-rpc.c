/* Fuzzes JSON-RPC line framing and message decoding as the control server does it. */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "rpc.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct rpc_framer f;
	char *line;
	size_t len;
	enum rpc_frame fr;

	rpc_framer_init(&f, 4096);
	/* feed in two pieces to exercise partial lines */
	buf_append(&f.in, data, size / 2);
	while ((fr = rpc_framer_next(&f, &line, &len)) != RPC_FRAME_NONE)
		if (fr == RPC_FRAME_LINE)
			json_decref(json_loadb(line, len, JSON_REJECT_DUPLICATES, NULL));
	buf_append(&f.in, data + size / 2, size - size / 2);
	while ((fr = rpc_framer_next(&f, &line, &len)) != RPC_FRAME_NONE)
		if (fr == RPC_FRAME_LINE)
			json_decref(json_loadb(line, len, JSON_REJECT_DUPLICATES, NULL));
	rpc_framer_free(&f);
	return 0;
}

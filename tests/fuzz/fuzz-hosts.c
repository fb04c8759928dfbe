/*
 * Fuzzes the hosts-file block editor: parse capd's block, apply a set, and
 * check the promises: the result parses back to exactly the set, and with an
 * empty set applying twice changes nothing more (the text outside the block
 * is kept).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hosts.h"

/* Compiled in here, not taken from the daemon library, so libFuzzer's coverage sees it. */
#include "hosts.c"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct hosts_set set = { 0 }, back = { 0 }, none = { 0 };
	char *why = NULL, *out, *out2, *out3;
	size_t len, len2, len3;
	int found;

	found = hosts_block_parse((const char *)data, size, &set, &why);
	free(why);
	why = NULL;
	hosts_set_put(&set, "fuzz.test", "127.0.0.1");
	out = hosts_block_apply((const char *)data, size, &set, &len, &why);
	if ((out == NULL) != (found < 0))
		abort();
	free(why);
	why = NULL;
	if (out) {
		if (hosts_block_parse(out, len, &back, &why) != 1 || back.n != set.n)
			abort();
		for (size_t i = 0; i < set.n; i++)
			if (strcmp(back.v[i].name, set.v[i].name) || strcmp(back.v[i].addr, set.v[i].addr))
				abort();
		/* removing the block, twice, is stable */
		out2 = hosts_block_apply(out, len, &none, &len2, &why);
		if (out2 == NULL)
			abort();
		out3 = hosts_block_apply(out2, len2, &none, &len3, &why);
		if (out3 == NULL || len3 != len2 || memcmp(out2, out3, len2) != 0)
			abort();
		if (hosts_block_parse(out2, len2, &back, &why) != 0)
			abort();
		free(out2);
		free(out3);
	}
	free(out);
	hosts_set_free(&set);
	hosts_set_free(&back);
	return 0;
}

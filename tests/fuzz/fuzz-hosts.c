/*
 * Fuzzes the hosts-file block editor: parse capd's block, apply a set, and
 * check the promises: the result parses back to exactly the set, and with an
 * empty set applying twice changes nothing more (the text outside the block
 * is kept). Also the look for a name already mapped outside the block (as
 * hosts.add warns of it), for the names the input's block holds and one of
 * its own, and the check of one entry, the input cut at its first '='.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hosts.h"

/* Compiled in here, not taken from the daemon library, so libFuzzer's coverage sees it. */
#include "hosts.c"

/* name mapped outside the block: its line number, within the text, and an address the check takes. */
static void
fuzz_shadow(const char *text, size_t size, const char *name)
{
	char addr[HOSTS_ADDR_MAX], norm[HOSTS_ADDR_MAX], *why = NULL;
	size_t line = hosts_shadow(text, size, name, addr), lines = 1;

	if (line == 0)
		return;
	for (size_t i = 0; i < size; i++)
		lines += text[i] == '\n';
	if (line > lines || hosts_entry_check(name, addr, norm, &why) != 0 || strcmp(norm, addr) != 0)
		abort();
}

/* The input as hosts.add's name=addr. */
static void
fuzz_entry(const uint8_t *data, size_t size)
{
	const uint8_t *eq = memchr(data, '=', size);
	char *name, *addr, norm[HOSTS_ADDR_MAX], *why = NULL;

	if (eq == NULL)
		return;
	name = strndup((const char *)data, (size_t)(eq - data));
	addr = strndup((const char *)eq + 1, size - (size_t)(eq - data) - 1);
	if (hosts_entry_check(name, addr, norm, &why) == 0) {
		if (why != NULL || memchr(norm, '\0', sizeof norm) == NULL)
			abort();
	} else if (why == NULL) {
		abort();
	}
	free(why);
	free(name);
	free(addr);
}

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
	for (size_t i = 0; i < set.n; i++)
		fuzz_shadow((const char *)data, size, set.v[i].name);
	fuzz_shadow((const char *)data, size, "fuzz.test");
	fuzz_entry(data, size);
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

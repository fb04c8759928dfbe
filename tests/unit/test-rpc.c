/* Unit tests for common/rpc.c: line framing (partial lines, several per read, oversize). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "rpc.h"

static void
feed(struct rpc_framer *f, const char *s)
{
	buf_append(&f->in, s, strlen(s));
}

static void
test_partial(void **state)
{
	struct rpc_framer f;
	char *line;
	size_t len;

	(void)state;
	rpc_framer_init(&f, 0);
	feed(&f, "{\"a\":");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_NONE);
	feed(&f, "1}\n");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "{\"a\":1}");
	assert_int_equal(len, 7);
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_NONE);
	rpc_framer_free(&f);
}

static void
test_several(void **state)
{
	struct rpc_framer f;
	char *line;
	size_t len;

	(void)state;
	rpc_framer_init(&f, 0);
	feed(&f, "one\r\ntwo\n\nthree\nfo");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "one");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "two");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "three");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_NONE);
	feed(&f, "ur\n");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "four");
	rpc_framer_free(&f);
}

static void
test_oversize(void **state)
{
	struct rpc_framer f;
	char *line, big[100];
	size_t len;

	(void)state;
	rpc_framer_init(&f, 16);
	memset(big, 'x', sizeof big - 1);
	big[sizeof big - 1] = '\0';
	feed(&f, big);
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_TOO_LONG);
	feed(&f, big);
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_NONE);  /* still skipping, reported once */
	feed(&f, "tail\nok\n");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "ok");
	/* an oversized line that arrives whole is refused too */
	feed(&f, big);
	feed(&f, "\nfine\n");
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_TOO_LONG);
	assert_int_equal(rpc_framer_next(&f, &line, &len), RPC_FRAME_LINE);
	assert_string_equal(line, "fine");
	rpc_framer_free(&f);
}

static void
test_builders(void **state)
{
	struct buf out = { 0 };
	json_t *id = json_integer(7);
	json_t *m = rpc_error(id, RPC_E_NO_METHOD, "unknown method 'x'");

	(void)state;
	rpc_encode(&out, m);
	buf_append(&out, "", 1);
	assert_string_equal((char *)buf_head(&out),
	                    "{\"jsonrpc\":\"2.0\",\"id\":7,\"error\":{\"code\":-32601,\"message\":\"unknown method 'x'\"}}\n");
	json_decref(m);
	json_decref(id);
	buf_free(&out);
}

/* A message cut inside a UTF-8 character still makes a reply, its stray bytes '?'. */
static void
test_error_not_utf8(void **state)
{
	struct buf out = { 0 };
	json_t *m = rpc_error(NULL, RPC_E_NO_METHOD, "unknown method 'a\xc3\xa9\xc3' \xff!");

	(void)state;
	assert_non_null(m);
	rpc_encode(&out, m);
	buf_append(&out, "", 1);
	assert_string_equal((char *)buf_head(&out), "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32601,"
	                                            "\"message\":\"unknown method 'a\xc3\xa9?' ?!\"}}\n");
	json_decref(m);
	buf_free(&out);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_partial),
		cmocka_unit_test(test_several),
		cmocka_unit_test(test_oversize),
		cmocka_unit_test(test_builders),
		cmocka_unit_test(test_error_not_utf8),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

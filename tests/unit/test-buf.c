/* Unit tests for common/buf.c: a buffer that never grew, as = {0}, memset and calloc make it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "buf.h"

/* Its head is NULL + 0 no more (UBSan: "applying zero offset to null pointer"), and
 * it is a pointer memcpy may take with a length of 0, which NULL is not. */
static void
test_zeroed_head(void **state)
{
	struct buf z = { 0 }, m;
	uint8_t out[1] = { 7 };

	(void)state;
	memset(&m, 0, sizeof m);
	assert_int_equal(buf_used(&z), 0);
	assert_int_equal(buf_used(&m), 0);
	assert_non_null(buf_head(&z));
	assert_non_null(buf_head(&m));
	memcpy(out, buf_head(&z), buf_used(&z));
	assert_int_equal(out[0], 7);
	/* nothing asked for, nothing grown: the same kind of pointer */
	assert_non_null(buf_reserve(&z, 0));
	assert_null(z.data);
	buf_consume(&z, 0);
	assert_non_null(buf_head(&z));
	buf_free(&z);
	buf_free(&z);
}

/* Grown, emptied and freed: the head follows the storage, and after buf_free
 * the buffer is as a zeroed one is. */
static void
test_grown_then_freed(void **state)
{
	struct buf b = { 0 };

	(void)state;
	buf_append(&b, "abc", 3);
	assert_ptr_equal(buf_head(&b), b.data);
	assert_memory_equal(buf_head(&b), "abc", 3);
	buf_consume(&b, 1);
	assert_int_equal(buf_used(&b), 2);
	assert_memory_equal(buf_head(&b), "bc", 2);
	buf_consume(&b, 2);
	assert_int_equal(buf_used(&b), 0);
	assert_ptr_equal(buf_head(&b), b.data);
	buf_free(&b);
	assert_int_equal(buf_used(&b), 0);
	assert_non_null(buf_head(&b));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_zeroed_head),
		cmocka_unit_test(test_grown_then_freed),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

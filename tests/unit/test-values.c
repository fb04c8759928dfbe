/* Unit tests for common/values.c: sizes, durations, booleans. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "values.h"

static void
test_size(void **state)
{
	uint64_t v;

	(void)state;
	assert_int_equal(value_size("100", &v), 0);
	assert_int_equal(v, 100);
	assert_int_equal(value_size("64M", &v), 0);
	assert_int_equal(v, 64ULL << 20);
	assert_int_equal(value_size("2k", &v), 0);
	assert_int_equal(v, 2048);
	assert_int_equal(value_size("1G", &v), 0);
	assert_int_equal(v, 1ULL << 30);
	assert_int_equal(value_size("1T", &v), -1);
	assert_int_equal(value_size("-1", &v), -1);
	assert_int_equal(value_size("M", &v), -1);
	assert_int_equal(value_size("99999999999999999999G", &v), -1);
}

static void
test_duration(void **state)
{
	double d;

	(void)state;
	assert_int_equal(value_duration("10", &d), 0);
	assert_true(d == 10.0);
	assert_int_equal(value_duration("500ms", &d), 0);
	assert_true(d == 0.5);
	assert_int_equal(value_duration("2m", &d), 0);
	assert_true(d == 120.0);
	assert_int_equal(value_duration("1h", &d), 0);
	assert_true(d == 3600.0);
	assert_int_equal(value_duration("1d", &d), -1);
	assert_int_equal(value_duration("x", &d), -1);
	/* finite as read, infinite once its unit is applied: json_real() would refuse it */
	assert_int_equal(value_duration("1e308h", &d), -1);
	assert_int_equal(value_duration("1e307m", &d), -1);
	assert_int_equal(value_duration("1e400", &d), -1);
	assert_int_equal(value_duration("1e300h", &d), 0);
}

static void
test_name(void **state)
{
	(void)state;
	assert_true(value_name_ok("socks-1080"));
	assert_true(value_name_ok("\xc3\xbc"));
	assert_true(value_name_ok("nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn"));  /* 64 */
	assert_false(value_name_ok("nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn"));
	assert_false(value_name_ok(""));
	assert_false(value_name_ok("a b"));
	assert_false(value_name_ok("a/b"));
	assert_false(value_name_ok("a\\b"));
	assert_false(value_name_ok("a'b"));
	assert_false(value_name_ok("a\"b"));
	assert_false(value_name_ok("a\tb"));
	assert_false(value_name_ok("a\x7f"));
}

static void
test_bool(void **state)
{
	bool b;

	(void)state;
	const char *yes[] = { "yes", "true", "1", "YES" }, *no[] = { "no", "false", "0" };
	for (size_t i = 0; i < 4; i++) {
		assert_int_equal(value_bool(yes[i], &b), 0);
		assert_true(b);
	}
	for (size_t i = 0; i < 3; i++) {
		assert_int_equal(value_bool(no[i], &b), 0);
		assert_false(b);
	}
	assert_int_equal(value_bool("maybe", &b), -1);
}

static void
test_human(void **state)
{
	char buf[16];

	(void)state;
	assert_string_equal(value_human_size(1023, buf, sizeof buf), "1023");
	assert_string_equal(value_human_size(1258291, buf, sizeof buf), "1.2M");
	assert_string_equal(value_human_size(8808038, buf, sizeof buf), "8.4M");
	assert_string_equal(value_human_size(50ULL << 20, buf, sizeof buf), "50M");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_size),
		cmocka_unit_test(test_duration),
		cmocka_unit_test(test_name),
		cmocka_unit_test(test_bool),
		cmocka_unit_test(test_human),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

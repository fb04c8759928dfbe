/* Unit tests for common/base64.c: RFC 4648 vectors, round trips, bad input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "base64.h"

static const struct {
	const char *plain, *enc;
} vectors[] = {
	{ "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
	{ "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
};

static void
test_vectors(void **state)
{
	char out[64];
	uint8_t dec[64];

	(void)state;
	for (size_t i = 0; i < sizeof vectors / sizeof vectors[0]; i++) {
		size_t n = strlen(vectors[i].plain);
		assert_int_equal(base64_len(n), strlen(vectors[i].enc));
		base64_encode(out, vectors[i].plain, n);
		assert_memory_equal(out, vectors[i].enc, base64_len(n));
		assert_int_equal(base64_decode(dec, vectors[i].enc, strlen(vectors[i].enc)), (long)n);
		assert_memory_equal(dec, vectors[i].plain, n);
	}
}

static void
test_round_trip(void **state)
{
	uint8_t in[1000], dec[1000];
	char *enc = malloc(base64_len(sizeof in));

	(void)state;
	for (size_t i = 0; i < sizeof in; i++)
		in[i] = (uint8_t)(i * 37 + 11);
	for (size_t n = 0; n <= sizeof in; n += 7) {
		base64_encode(enc, in, n);
		assert_int_equal(base64_decode(dec, enc, base64_len(n)), (long)n);
		assert_memory_equal(dec, in, n);
	}
	free(enc);
}

static void
test_json(void **state)
{
	json_t *j = base64_json("\0\xff", 2);

	(void)state;
	assert_string_equal(json_string_value(j), "AP8=");
	json_decref(j);
}

static void
test_bad(void **state)
{
	uint8_t dec[16];

	(void)state;
	assert_int_equal(base64_decode(dec, "Zg=", 3), -1);       /* not a multiple of 4 */
	assert_int_equal(base64_decode(dec, "Z!==", 4), -1);      /* not in the alphabet */
	assert_int_equal(base64_decode(dec, "Zg==Zm8=", 8), -1);  /* padding in the middle */
	assert_int_equal(base64_decode(dec, "Zm=v", 4), -1);      /* data after padding */
	/* the groups before the last go through the table: each bad character is seen there too */
	assert_int_equal(base64_decode(dec, "Zm9v!m9vYmFy", 12), -1);
	assert_int_equal(base64_decode(dec, "Zm9vYm\x80yYmFy", 12), -1);
	assert_int_equal(base64_decode(dec, "Zm9vYmF\0YmFy", 12), -1);
	assert_int_equal(base64_decode(dec, "Zm9vYmFyYmFy", 12), 9);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_vectors),
		cmocka_unit_test(test_round_trip),
		cmocka_unit_test(test_json),
		cmocka_unit_test(test_bad),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

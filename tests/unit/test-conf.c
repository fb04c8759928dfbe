/* Unit tests for daemon/conf.c: good configs and every error path, with file:line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "conf.h"

/* capd.c's globals, which the daemon library expects */
struct capd_settings *capd_settings;
const char *capd_config_path;
double capd_started;
int capd_reload(capd_reloaded_fn *done, void *arg, char **why) { (void)done; (void)arg; (void)why; return 0; }

static struct conf *
load(const char *text, char **why)
{
	*why = NULL;
	return conf_load_string(text, "test.conf", "/etc/capd", why);
}

static void
test_good(void **state)
{
	char *why;
	struct conf *c = load("; comment\n[capd]\ncontrol = run/capd.sock\nspool = /tmp/spool\nrotate_size = 1M\n"
	                      "keep_files = 3\nrotate_time = 10m\nlog_level = debug\n\n"
	                      "[forward game]\nlisten = 127.0.0.1:4444\nto = www.example.com:1234\n"
	                      "[forward six]\nlisten = [::1]:4445\nto = [::1]:80\nidle_timeout = 5m\n", &why);

	(void)state;
	assert_null(why);
	assert_non_null(c);
	assert_string_equal(c->settings.control, "/etc/capd/run/capd.sock");
	assert_string_equal(c->settings.spool, "/tmp/spool");
	assert_int_equal(c->settings.rotate_size, 1 << 20);
	assert_int_equal(c->settings.keep_files, 3);
	assert_true(c->settings.rotate_time == 600.0);
	assert_int_equal(json_array_size(c->instances), 2);
	json_t *p = json_object_get(json_array_get(c->instances, 0), "params");
	assert_string_equal(json_string_value(json_object_get(p, "type")), "forward");
	assert_string_equal(json_string_value(json_object_get(p, "name")), "game");
	assert_string_equal(json_string_value(json_object_get(p, "to")), "www.example.com:1234");
	conf_free(c);
}

struct bad_case {
	const char *text;
	const char *want;  /* prefix of the error */
};

static void
test_errors(void **state)
{
	static const struct bad_case cases[] = {
		{ "[capd]\nbogus = 1\n", "test.conf:2: unknown key 'bogus'" },
		{ "[capd]\nkeep_files = 3\nspool = /x\xff\n", "test.conf:3: value of 'spool' is not valid UTF-8" },
		{ "[capd]\nrotate_size = lots\n", "test.conf:2: bad size" },
		{ "[capd]\nkeep_files = 0\n", "test.conf:2: bad number" },
		{ "[capd]\nlog_level = loud\n", "test.conf:2: bad log_level" },
		{ "[capd]\nspool = a\nspool = b\n", "test.conf:3: 'spool' is set twice" },
		{ "[forward a]\nlisten = 1\nto = x:1\n[forward a]\nlisten = 2\nto = x:1\n",
		  "test.conf:4: instance name 'a' is used twice (first at line 1)" },
		{ "[telnet a]\nlisten = 1\n", "test.conf:1: unknown instance type 'telnet'" },
		{ "[forward]\nlisten = 1\n", "test.conf:1: section [forward] should be" },
		{ "[forward a]\nlisten = 1\nto = nowhere\n", "test.conf:3: bad address 'nowhere'" },
		{ "[forward a]\nlisten = 1\nto = x:1\ncolour = red\n", "test.conf:4: unknown key 'colour'" },
		{ "[forward a]\nlisten = 1\nto = x:1\nto = y:2\n", "test.conf:4: 'to' is set twice" },
		{ "[forward a]\nlisten = 10.1.2.3:80\nto = x:1\n", "test.conf:2: 10.1.2.3:80 is not a loopback" },
		{ "[forward a]\nlisten = 1\nto = x:1\nidle_timeout = soon\n", "test.conf:4: bad duration" },
		{ "[forward a]\nlisten = 1\nto = x:1\nudp = perhaps\n", "test.conf:4: bad value for 'udp'" },
		{ "[forward a]\nlisten = nowhere:1\nto = x:1\n", "test.conf:2: listen address" },
		{ "[forward a]\nlisten = 1\n", "test.conf:1: a forward instance needs 'to" },
		{ "[capd]\nthis line is wrong\n", "test.conf:2: syntax error" },
	};
	(void)state;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		char *why;
		struct conf *c = load(cases[i].text, &why);
		assert_null(c);
		assert_non_null(why);
		if (strncmp(why, cases[i].want, strlen(cases[i].want)) != 0)
			fail_msg("case %zu: got '%s', want '%s...'", i, why, cases[i].want);
		free(why);
	}
}

static void
test_expose(void **state)
{
	char *why;
	struct conf *c = load("[forward a]\nlisten = 0.0.0.0:4444\nexpose = yes\nto = x:1\n", &why);

	(void)state;
	assert_non_null(c);
	conf_free(c);
}

/* A file with no section (an editor's truncation) is marked; conf_check refuses it. */
static void
test_empty(void **state)
{
	static const struct {
		const char *text;
		bool empty;
	} cases[] = {
		{ "", true },
		{ "\n\n", true },
		{ "; a comment\n# another\n", true },
		{ "[capd]\n", false },
		{ "[forward a]\nlisten = 4444\nto = x:1\n", false },
	};
	char *why;

	(void)state;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		struct conf *c = load(cases[i].text, &why);
		assert_non_null(c);
		if (c->empty != cases[i].empty)
			fail_msg("case %zu: empty is %d", i, c->empty);
		conf_free(c);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_good),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_expose),
		cmocka_unit_test(test_empty),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

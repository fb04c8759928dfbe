/* Unit tests for common/path.c: a path made absolute and cleaned names the
 * same file, with the ".." after a symlink (or a missing folder) respected. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "path.h"
#include "xmalloc.h"

/* A scratch tree, removed after each test:
 *   T/conf/  T/x/file  T/real/sub/
 *   T/conf/link -> ../real/sub   T/conf/flink -> ../x/file   T/conf/dangling -> nowhere */
struct tree {
	char top[256];  /* short, so that the paths made from it fit PATH_MAX */
};

static void
tree_path(const struct tree *t, const char *rel, char out[PATH_MAX])
{
	snprintf(out, PATH_MAX, "%s/%s", t->top, rel);
}

static int
tree_setup(void **state)
{
	struct tree *t = xcalloc(1, sizeof *t);
	char tmpl[] = "/tmp/test-path-XXXXXX", p[PATH_MAX], *real;
	FILE *f;

	assert_non_null(mkdtemp(tmpl));
	/* the base capd passes is realpath's: /tmp itself may be a link */
	assert_non_null(real = realpath(tmpl, NULL));
	assert_true(strlen(real) < sizeof t->top);
	snprintf(t->top, sizeof t->top, "%s", real);
	free(real);
	const char *dirs[] = { "conf", "x", "real", "real/sub" };
	for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
		tree_path(t, dirs[i], p);
		assert_int_equal(mkdir(p, 0700), 0);
	}
	tree_path(t, "x/file", p);
	assert_non_null(f = fopen(p, "w"));
	fclose(f);
	tree_path(t, "conf/link", p);
	assert_int_equal(symlink("../real/sub", p), 0);
	tree_path(t, "conf/flink", p);
	assert_int_equal(symlink("../x/file", p), 0);
	tree_path(t, "conf/dangling", p);
	assert_int_equal(symlink("nowhere", p), 0);
	*state = t;
	return 0;
}

static int
tree_teardown(void **state)
{
	struct tree *t = *state;
	const char *files[] = { "conf/link", "conf/flink", "conf/dangling", "x/file", "real/sub", "real", "x", "conf", "" };
	char p[PATH_MAX];

	for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
		tree_path(t, files[i], p);
		remove(p);
	}
	free(t);
	return 0;
}

/* path_clean(T/conf, path) is T/want ("%s" in want stands for T) */
static void
check(const struct tree *t, const char *path, const char *want)
{
	char base[PATH_MAX], expect[PATH_MAX];
	char *got;

	tree_path(t, "conf", base);
	snprintf(expect, sizeof expect, want, t->top);
	got = path_clean(base, path);
	assert_string_equal(got, expect);
	free(got);
}

static void
check_abs(const char *base, const char *path, const char *want)
{
	char *got = path_clean(base, path);

	assert_string_equal(got, want);
	free(got);
}

static void
test_absolute_lexical(void **state)
{
	(void)state;
	/* no "..": nothing is looked up, the base is not used */
	check_abs("/etc/capd", "/a/./b//c", "/a/b/c");
	check_abs(NULL, "/a/./b//c", "/a/b/c");
	check_abs(NULL, "/", "/");
	check_abs(NULL, "//", "/");
	check_abs(NULL, "/.", "/");
	check_abs(NULL, "/..", "/");
	check_abs(NULL, "/../a", "/a");
	check_abs(NULL, "/a/b/", "/a/b/");     /* a trailing slash asks for a folder: kept */
	check_abs(NULL, "/a/b//./", "/a/b/");
	check_abs(NULL, "/a/.../b", "/a/.../b"); /* "..." is a name */
	check_abs(NULL, "/a/..b/c", "/a/..b/c");
}

static void
test_relative_join(void **state)
{
	(void)state;
	check_abs("/etc/capd", "run/capd.sock", "/etc/capd/run/capd.sock");
	check_abs("/etc/capd", "./run/./capd.sock", "/etc/capd/run/capd.sock");
	check_abs("/etc/capd/", "run//capd.sock", "/etc/capd/run/capd.sock");
	check_abs("/", "capd.sock", "/capd.sock");
	check_abs("/etc/capd", "", "/etc/capd");
	check_abs("/etc/capd", ".", "/etc/capd");
	check_abs("/etc/capd", "spool/", "/etc/capd/spool/");
	/* no absolute base: joined as it was (conf_load_string's callers) */
	check_abs(NULL, "run/../capd.sock", "run/../capd.sock");
	check_abs("conf", "../capd.sock", "conf/../capd.sock");
}

static void
test_dotdot_real_folders(void **state)
{
	struct tree *t = *state;

	check(t, "../x/capd.sock", "%s/x/capd.sock");  /* conf/capd-dev.conf's control */
	check(t, "..", "%s");
	check(t, "../x/../real/sub/..", "%s/real");
	check(t, "../../../../../../../../../../../../..", "/");
	/* an absolute path whose folders exist is cleaned the same way */
	char p[PATH_MAX];
	snprintf(p, sizeof p, "%s/conf/../x/./file", t->top);
	check(t, p, "%s/x/file");
}

static void
test_dotdot_missing(void **state)
{
	struct tree *t = *state;

	/* open("conf/missing/../f") fails: so must the cleaned path */
	check(t, "missing/../f", "%s/conf/missing/../f");
	check(t, "missing/../../f", "%s/conf/missing/../../f");
	check(t, "missing/./../x", "%s/conf/missing/../x");
	/* a file is not a folder: ENOTDIR, kept */
	check(t, "../x/file/../y", "%s/x/file/../y");
}

static void
test_dotdot_symlink(void **state)
{
	struct tree *t = *state;

	/* conf/link/.. is real/ (where the link points), not conf/ */
	check(t, "link/../f", "%s/real/f");
	check(t, "link/../sub/../../x", "%s/x");
	check(t, "link/f", "%s/conf/link/f");     /* no "..": the link keeps its name */
	check(t, "link", "%s/conf/link");
	check(t, "flink", "%s/conf/flink");      /* the file is named as the user named it */
	/* a link to a file, a dangling link: the walk fails, the ".." stays */
	check(t, "flink/../y", "%s/conf/flink/../y");
	check(t, "dangling/../y", "%s/conf/dangling/../y");
	/* a folder under the link: removed lexically (it is no link), then the link resolved */
	char p[PATH_MAX];
	tree_path(t, "real/sub/d", p);
	assert_int_equal(mkdir(p, 0700), 0);
	check(t, "link/d/../f", "%s/conf/link/f");
	check(t, "link/d/../../f", "%s/real/f");
	rmdir(p);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_absolute_lexical),
		cmocka_unit_test(test_relative_join),
		cmocka_unit_test_setup_teardown(test_dotdot_real_folders, tree_setup, tree_teardown),
		cmocka_unit_test_setup_teardown(test_dotdot_missing, tree_setup, tree_teardown),
		cmocka_unit_test_setup_teardown(test_dotdot_symlink, tree_setup, tree_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

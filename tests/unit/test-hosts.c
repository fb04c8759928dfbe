/* Unit tests for daemon/hosts.c: the entry set, the block editor, entry checks, the file writer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <sys/stat.h>
#include <unistd.h>

#include "hosts.h"

static char *
apply(const char *text, const struct hosts_set *set)
{
	char *why = NULL, *out;
	size_t len;

	out = hosts_block_apply(text, strlen(text), set, &len, &why);
	assert_non_null(out);
	assert_int_equal(strlen(out), len);
	return out;
}

static void
test_set(void **state)
{
	struct hosts_set s = { 0 };

	(void)state;
	hosts_set_put(&s, "a.test", "127.0.0.1");
	hosts_set_put(&s, "b.test", "::1");
	hosts_set_put(&s, "A.TEST", "10.0.0.1");  /* same name: replaced in place */
	assert_int_equal(s.n, 2);
	assert_string_equal(s.v[0].addr, "10.0.0.1");
	assert_true(hosts_set_del(&s, "a.test"));
	assert_false(hosts_set_del(&s, "a.test"));
	assert_int_equal(s.n, 1);
	assert_string_equal(s.v[0].name, "b.test");
	/* a name's several lines (an IPv4 and an IPv6 one) are all kept, each once */
	hosts_set_keep(&s, "w.test", "10.0.0.5");
	hosts_set_keep(&s, "c.test", "10.0.0.6");
	hosts_set_keep(&s, "W.test", "fd00::5");
	hosts_set_keep(&s, "w.test", "10.0.0.5");
	assert_int_equal(s.n, 4);
	assert_string_equal(s.v[3].addr, "fd00::5");
	/* put points the name at one address of its family: the first entry of that family
	 * takes it, the others of that family go, the other family's stay */
	hosts_set_keep(&s, "w.test", "10.0.0.7");
	hosts_set_put(&s, "w.test", "10.0.0.9");
	assert_int_equal(s.n, 4);
	assert_string_equal(s.v[1].addr, "10.0.0.9");
	assert_string_equal(s.v[2].name, "c.test");
	assert_string_equal(s.v[3].addr, "fd00::5");
	hosts_set_put(&s, "w.test", "fd00::9");
	assert_int_equal(s.n, 4);
	assert_string_equal(s.v[1].addr, "10.0.0.9");
	assert_string_equal(s.v[3].addr, "fd00::9");
	/* a family the name has no line of: right after its last line */
	hosts_set_put(&s, "C.Test", "::6");
	assert_int_equal(s.n, 5);
	assert_string_equal(s.v[2].addr, "10.0.0.6");
	assert_string_equal(s.v[3].name, "c.test");  /* spelt as the name's line is */
	assert_string_equal(s.v[3].addr, "::6");
	assert_string_equal(s.v[4].addr, "fd00::9");
	assert_true(hosts_set_del(&s, "w.test"));  /* all of them */
	assert_int_equal(s.n, 3);
	assert_string_equal(s.v[1].name, "c.test");
	hosts_set_free(&s);
	hosts_set_free(&s);
}

static void
test_check(void **state)
{
	char norm[HOSTS_ADDR_MAX], *why = NULL;
	const char *bad_names[] = { "", "bad_name!", "*.x.test", "a..b", "-a.test", "x.test.", "1.2.3.4", "a b",
	                            "1.2.3", "123", "0x7f.1" };  /* resolvers read these as addresses */
	const char *bad_addrs[] = { "", "1.2.3", "256.1.1.1", "::g", "host.test", "1.2.3.4:80", "fe80::1%lo" };

	(void)state;
	assert_int_equal(hosts_entry_check("www.example.com", "127.0.0.1", norm, &why), 0);
	assert_string_equal(norm, "127.0.0.1");
	assert_int_equal(hosts_entry_check("v6.test", "[0:0::1]", norm, &why), 0);
	assert_string_equal(norm, "::1");
	for (size_t i = 0; i < sizeof bad_names / sizeof bad_names[0]; i++) {
		why = NULL;
		assert_int_equal(hosts_entry_check(bad_names[i], "127.0.0.1", norm, &why), -1);
		assert_non_null(why);
		free(why);
	}
	for (size_t i = 0; i < sizeof bad_addrs / sizeof bad_addrs[0]; i++) {
		why = NULL;
		assert_int_equal(hosts_entry_check("ok.test", bad_addrs[i], norm, &why), -1);
		assert_non_null(why);
		free(why);
	}
}

static void
test_block(void **state)
{
	const char *orig = "127.0.0.1\tlocalhost\r\n# a comment   \n\n::1 localhost ip6-localhost";
	struct hosts_set s = { 0 }, back = { 0 };
	char *t1, *t2, *t3, *why = NULL;

	(void)state;
	/* nothing to add, no block: unchanged */
	t1 = apply(orig, &s);
	assert_string_equal(t1, orig);
	free(t1);

	hosts_set_put(&s, "www.example.com", "127.0.0.1");
	hosts_set_put(&s, "v6.test", "::1");
	t1 = apply(orig, &s);
	/* the old text is a prefix (plus the newline the last line lacked) */
	assert_memory_equal(t1, orig, strlen(orig));
	assert_string_equal(t1 + strlen(orig), "\n" HOSTS_BEGIN "\n127.0.0.1\twww.example.com\n::1\tv6.test\n" HOSTS_END "\n");
	assert_int_equal(hosts_block_parse(t1, strlen(t1), &back, &why), 1);
	assert_int_equal(back.n, 2);
	assert_string_equal(back.v[1].name, "v6.test");

	/* lines after the block stay where they are */
	char *withtail = malloc(strlen(t1) + 32);
	sprintf(withtail, "%s10.1.1.1 after.test\n", t1);
	hosts_set_del(&s, "v6.test");
	t2 = apply(withtail, &s);
	assert_non_null(strstr(t2, "127.0.0.1\twww.example.com\n" HOSTS_END "\n10.1.1.1 after.test\n"));
	assert_null(strstr(t2, "v6.test"));

	/* empty set: the block goes, everything else is as it was */
	hosts_set_free(&s);
	t3 = apply(t2, &s);
	char *want = malloc(strlen(orig) + 64);
	sprintf(want, "%s\n10.1.1.1 after.test\n", orig);
	assert_string_equal(t3, want);
	assert_int_equal(hosts_block_parse(t3, strlen(t3), &back, &why), 0);
	assert_int_equal(back.n, 0);
	free(want);
	free(withtail);
	free(t1);
	free(t2);
	free(t3);
	hosts_set_free(&back);
}

static void
test_block_odd(void **state)
{
	struct hosts_set s = { 0 };
	char *why = NULL, *out;
	size_t len;

	(void)state;
	/* hand-edited block content: junk ignored, several names per line taken */
	const char *t = "1.1.1.1 a\n# BEGIN capd\n10.0.0.1 x.test y.test # note\nnot-an-address z.test\n\n# END capd\n";
	assert_int_equal(hosts_block_parse(t, strlen(t), &s, &why), 1);
	assert_int_equal(s.n, 2);
	assert_string_equal(s.v[1].name, "y.test");
	/* two blocks: the first takes the entries, the second goes */
	const char *two = "# BEGIN capd\n1.1.1.1 a.test\n# END capd\nmid\n# BEGIN capd\n2.2.2.2 b.test\n# END capd\nend\n";
	assert_int_equal(hosts_block_parse(two, strlen(two), &s, &why), 1);
	assert_int_equal(s.n, 2);
	out = hosts_block_apply(two, strlen(two), &s, &len, &why);
	assert_string_equal(out, HOSTS_BEGIN "\n1.1.1.1\ta.test\n2.2.2.2\tb.test\n" HOSTS_END "\nmid\nend\n");
	free(out);
	/* a begin without an end: refused, nothing guessed */
	const char *open = "a\n# BEGIN capd\n1.1.1.1 a.test\n";
	assert_int_equal(hosts_block_parse(open, strlen(open), &s, &why), -1);
	assert_non_null(why);
	free(why);
	why = NULL;
	assert_null(hosts_block_apply(open, strlen(open), &s, &len, &why));
	assert_non_null(why);
	free(why);
	why = NULL;
	/* an empty file gets just the block; "# BEGIN capdx" is not ours */
	hosts_set_put(&s, "n.test", "127.0.0.1");
	out = hosts_block_apply("", 0, &s, &len, &why);
	assert_string_equal(out, HOSTS_BEGIN "\n127.0.0.1\tn.test\n" HOSTS_END "\n");
	free(out);
	const char *notours = "# BEGIN capdx\n";
	assert_int_equal(hosts_block_parse(notours, strlen(notours), &s, &why), 0);
	hosts_set_free(&s);
}

struct add_arg {
	const char *name;
};

static char *
add_cb(const char *cur, size_t len, size_t *outlen, void *arg, char **why)
{
	struct add_arg *a = arg;
	struct hosts_set s = { 0 };
	char *out;

	if (hosts_block_parse(cur, len, &s, why) < 0)
		return NULL;
	if (a->name)
		hosts_set_put(&s, a->name, "127.0.0.1");
	else
		hosts_set_free(&s);
	out = hosts_block_apply(cur, len, &s, outlen, why);
	hosts_set_free(&s);
	return out;
}

static void
test_file(void **state)
{
	char dir[] = "/tmp/capd-test-hosts-XXXXXX", path[256], *why = NULL, *text;
	struct add_arg a = { "file.test" };
	struct stat st;
	size_t len;
	FILE *f;

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/hosts", dir);
	f = fopen(path, "w");
	fputs("127.0.0.1 localhost\n", f);
	fclose(f);
	chmod(path, 0604);
	assert_int_equal(hosts_file_update(path, NULL, add_cb, &a, &why), 0);
	text = hosts_file_read(path, &len, &why);
	assert_non_null(text);
	assert_non_null(strstr(text, "127.0.0.1 localhost\n" HOSTS_BEGIN "\n127.0.0.1\tfile.test\n"));
	free(text);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0604);  /* the mode survives the rename */
	a.name = NULL;
	assert_int_equal(hosts_file_update(path, NULL, add_cb, &a, &why), 0);
	text = hosts_file_read(path, &len, &why);
	assert_string_equal(text, "127.0.0.1 localhost\n");
	free(text);
	/* a missing file is created */
	snprintf(path, sizeof path, "%s/new", dir);
	a.name = "new.test";
	assert_int_equal(hosts_file_update(path, NULL, add_cb, &a, &why), 0);
	assert_int_equal(stat(path, &st), 0);
	unlink(path);
	snprintf(path, sizeof path, "%s/hosts", dir);
	unlink(path);
	rmdir(dir);
}

/* Regression: an entry a line before capd's block shadows was added without a word. */
static void
test_shadow(void **state)
{
	const char *t = "127.0.0.1 localhost\n# 10.0.0.9 www.example.com\n192.0.2.80 WWW.Example.com www # pinned\n";
	const char *after = HOSTS_BEGIN "\n127.0.0.1\tx.test\n" HOSTS_END "\n10.0.0.1 x.test\n";
	char addr[HOSTS_ADDR_MAX] = "";

	(void)state;
	assert_int_equal(hosts_shadow(t, strlen(t), "www.example.com", addr), 3);
	assert_string_equal(addr, "192.0.2.80");
	assert_int_equal(hosts_shadow(t, strlen(t), "www", addr), 3);
	assert_int_equal(hosts_shadow(t, strlen(t), "example.com", addr), 0);  /* a name, not a suffix */
	assert_int_equal(hosts_shadow(after, strlen(after), "x.test", addr), 0);  /* in and after the block */
	assert_int_equal(hosts_shadow("", 0, "x.test", addr), 0);
	/* the name inside a longer one first, then itself on the same line */
	assert_int_equal(hosts_shadow("10.0.0.2 axtest x.test\n", 23, "x.test", addr), 1);
	assert_string_equal(addr, "10.0.0.2");
	assert_int_equal(hosts_shadow("10.0.0.2 x.tester\n", 18, "x.test", addr), 0);
}

/* An edit during which another program writes the file: a line appended, or its first line rewritten. */
struct racer_arg {
	struct add_arg add;
	const char *path;
	int calls, races;  /* races: how many of the first calls write the file */
	bool rewrite;      /* overwrite the first address in place (same size, maybe the same mtime tick) */
};

static char *
racer_cb(const char *cur, size_t len, size_t *outlen, void *arg, char **why)
{
	struct racer_arg *r = arg;

	if (r->calls++ < r->races) {
		FILE *f = fopen(r->path, r->rewrite ? "r+" : "a");
		assert_non_null(f);
		if (r->rewrite)
			fprintf(f, "127.0.0.%d", r->calls % 9 + 1);
		else
			fputs("10.9.9.9 racer.test\n", f);
		fclose(f);
	}
	return add_cb(cur, len, outlen, &r->add, why);
}

static void
write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

static void
assert_file(const char *path, const char *want)
{
	char *why = NULL, *text;
	size_t len;

	text = hosts_file_read(path, &len, &why);
	assert_non_null(text);
	assert_string_equal(text, want);
	free(text);
}

/* Regression: lines another program wrote while capd edited the file were lost by the rename. */
static void
test_file_changed_meanwhile(void **state)
{
	char dir[] = "/tmp/capd-test-hosts-XXXXXX", path[256], *why = NULL;
	struct racer_arg r;

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/hosts", dir);

	/* a line appended: it goes at the end of capd's copy too, without a second edit */
	write_file(path, "127.0.0.1 localhost\n");
	r = (struct racer_arg){ .add = { "mine.test" }, .path = path, .races = 1 };
	assert_int_equal(hosts_file_update(path, NULL, racer_cb, &r, &why), 0);
	assert_int_equal(r.calls, 1);
	assert_file(path, "127.0.0.1 localhost\n" HOSTS_BEGIN "\n127.0.0.1\tmine.test\n" HOSTS_END "\n"
	                  "10.9.9.9 racer.test\n");

	/* appended to a last line without its newline: the edit is made again on the new text */
	write_file(path, "127.0.0.1 localhost");
	r = (struct racer_arg){ .add = { "mine.test" }, .path = path, .races = 1 };
	assert_int_equal(hosts_file_update(path, NULL, racer_cb, &r, &why), 0);
	assert_int_equal(r.calls, 2);
	assert_file(path, "127.0.0.1 localhost10.9.9.9 racer.test\n" HOSTS_BEGIN "\n127.0.0.1\tmine.test\n" HOSTS_END
	                  "\n");

	/* a rewrite of the same size, likely within one mtime tick: the edit is made again */
	write_file(path, "127.0.0.1 localhost\n");
	r = (struct racer_arg){ .add = { "mine.test" }, .path = path, .races = 1, .rewrite = true };
	assert_int_equal(hosts_file_update(path, NULL, racer_cb, &r, &why), 0);
	assert_int_equal(r.calls, 2);
	assert_file(path, "127.0.0.2 localhost\n" HOSTS_BEGIN "\n127.0.0.1\tmine.test\n" HOSTS_END "\n");

	/* a file that never holds still: an error, nothing written, no temp file left behind */
	write_file(path, "127.0.0.1 localhost\n");
	r = (struct racer_arg){ .add = { "mine.test" }, .path = path, .races = 1000, .rewrite = true };
	assert_int_equal(hosts_file_update(path, NULL, racer_cb, &r, &why), -1);
	assert_non_null(strstr(why, "kept changing"));
	free(why);
	why = NULL;
	assert_int_equal(r.calls, 20);
	assert_file(path, "127.0.0.3 localhost\n");  /* the racer's last write */
	assert_int_equal(unlink(path), 0);
	assert_int_equal(rmdir(dir), 0);  /* fails with ENOTEMPTY when a temp file was left */
}

/*
 * Another writer making the hosts file in the moment between capd's last look
 * and its rename (a second capd editing a file that did not exist: there was
 * no file to lock). The linker sends hosts.c's rename and renameat2 here
 * (tests/meson.build); when race_path is set, the first one toward it writes
 * race_text there before doing its work.
 */
static const char *race_path, *race_text;

int __real_rename(const char *from, const char *to);
int __real_renameat2(int fromfd, const char *from, int tofd, const char *to, unsigned flags);

static void
race_now(const char *to)
{
	if (race_path && strcmp(to, race_path) == 0) {
		race_path = NULL;
		write_file(to, race_text);
	}
}

int
__wrap_rename(const char *from, const char *to)
{
	race_now(to);
	return __real_rename(from, to);
}

int
__wrap_renameat2(int fromfd, const char *from, int tofd, const char *to, unsigned flags)
{
	race_now(to);
	return __real_renameat2(fromfd, from, tofd, to, flags);
}

/* Regression: a file made by another writer while capd made it too was replaced by capd's,
 * losing its lines; it is now edited again with them. */
static void
test_file_made_meanwhile(void **state)
{
	char dir[] = "/tmp/capd-test-hosts-XXXXXX", path[256], *why = NULL;
	struct add_arg a = { "mine.test" };

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof path, "%s/hosts", dir);
	race_path = path;
	race_text = HOSTS_BEGIN "\n127.0.0.1\ttheirs.test\n" HOSTS_END "\n";
	assert_int_equal(hosts_file_update(path, NULL, add_cb, &a, &why), 0);
	assert_null(race_path);  /* the other writer came */
	assert_file(path, HOSTS_BEGIN "\n127.0.0.1\ttheirs.test\n127.0.0.1\tmine.test\n" HOSTS_END "\n");
	assert_int_equal(unlink(path), 0);
	assert_int_equal(rmdir(dir), 0);  /* no temp file left behind */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_set),
		cmocka_unit_test(test_check),
		cmocka_unit_test(test_block),
		cmocka_unit_test(test_block_odd),
		cmocka_unit_test(test_shadow),
		cmocka_unit_test(test_file),
		cmocka_unit_test(test_file_changed_meanwhile),
		cmocka_unit_test(test_file_made_meanwhile),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for daemon/socks-parse.c: every message fed whole and one byte
 * short (MORE, nothing consumed), the errors with the reply they ask for,
 * and the encoders byte for byte. Also daemon/users.c's file and auth keys.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "socks-parse.h"
#include "users.h"

/* Every proper prefix of a message must answer MORE and consume nothing. */
#define PREFIXES_N(fn, p, n, out)                                        \
	for (size_t i_ = 0; i_ < (n); i_++) {                            \
		size_t u_ = 12345;                                       \
		assert_int_equal(fn(p, i_, &u_, out), PARSE_MORE);       \
		assert_int_equal(u_, 12345);                             \
	}
#define PREFIXES(fn, p, out) PREFIXES_N(fn, p, sizeof p, out)

static void
test_greeting(void **state)
{
	struct socks_greeting g;
	size_t used;
	const uint8_t both[] = { 5, 2, 0, 2, 0xaa };
	const uint8_t none[] = { 5, 1, 0 };
	const uint8_t gss[] = { 5, 1, 1 };

	(void)state;
	assert_int_equal(socks_parse_greeting(both, sizeof both, &used, &g), PARSE_OK);
	assert_int_equal(used, 4);
	assert_true(g.none);
	assert_true(g.userpass);
	PREFIXES(socks_parse_greeting, none, &g);
	assert_int_equal(socks_parse_greeting(none, sizeof none, &used, &g), PARSE_OK);
	assert_true(g.none);
	assert_false(g.userpass);
	assert_int_equal(socks_parse_greeting(gss, sizeof gss, &used, &g), PARSE_OK);
	assert_false(g.none || g.userpass);
	assert_int_equal(socks_parse_greeting((const uint8_t *)"\x04\x01", 2, &used, &g), PARSE_ERR);
	assert_int_equal(socks_parse_greeting((const uint8_t *)"\x05\x00", 2, &used, &g), PARSE_ERR);
	assert_int_equal(socks_parse_greeting((const uint8_t *)"G", 1, &used, &g), PARSE_ERR);
}

static void
test_auth(void **state)
{
	struct socks_auth a;
	size_t used;
	const uint8_t ok[] = { 1, 3, 'b', 'o', 'b', 4, 'p', 'a', 's', 's', 'X' };
	const uint8_t empty[] = { 1, 1, 'u', 0 };
	const uint8_t nul[] = { 1, 2, 'a', 0, 1, 'p' };

	(void)state;
	PREFIXES_N(socks_parse_auth, ok, sizeof ok - 1, &a);
	assert_int_equal(socks_parse_auth(ok, sizeof ok, &used, &a), PARSE_OK);
	assert_int_equal(used, 10);
	assert_string_equal(a.user, "bob");
	assert_string_equal(a.pass, "pass");
	assert_int_equal(socks_parse_auth(empty, sizeof empty, &used, &a), PARSE_OK);
	assert_string_equal(a.pass, "");
	assert_int_equal(socks_parse_auth(nul, sizeof nul, &used, &a), PARSE_ERR);
	assert_int_equal(socks_parse_auth((const uint8_t *)"\x05", 1, &used, &a), PARSE_ERR);
}

static void
test_request5(void **state)
{
	struct socks_req r;
	size_t used;
	const uint8_t v4[] = { 5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90 };
	const uint8_t v6[] = { 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80 };
	const uint8_t name[] = { 5, 1, 0, 3, 11, 'e', 'x', 'a', 'm', 'p', 'l', 'e', '.', 'c', 'o', 'm', 1, 0xbb };
	const uint8_t udp[] = { 5, 3, 0, 1, 0, 0, 0, 0, 0, 0 };
	const uint8_t badatyp[] = { 5, 1, 0, 9, 1, 2, 3, 4 };
	const uint8_t badname[] = { 5, 1, 0, 3, 3, 'a', ' ', 'b', 0, 80 };
	const uint8_t emptyname[] = { 5, 1, 0, 3, 0, 0, 80 };
	const uint8_t cmd9[] = { 5, 9, 0, 1, 1, 2, 3, 4, 0, 1 };

	(void)state;
	PREFIXES(socks_parse_request, v4, &r);
	assert_int_equal(socks_parse_request(v4, sizeof v4, &used, &r), PARSE_OK);
	assert_int_equal(used, sizeof v4);
	assert_int_equal(r.cmd, SOCKS_CMD_CONNECT);
	assert_int_equal(r.atyp, SOCKS_ATYP_IPV4);
	assert_string_equal(r.host, "127.0.0.1");
	assert_int_equal(r.port, 8080);
	assert_int_equal(r.addr.ss_family, AF_INET);
	assert_int_equal(ntohs(((struct sockaddr_in *)&r.addr)->sin_port), 8080);

	PREFIXES(socks_parse_request, v6, &r);
	assert_int_equal(socks_parse_request(v6, sizeof v6, &used, &r), PARSE_OK);
	assert_string_equal(r.host, "::1");
	assert_int_equal(r.port, 80);
	assert_int_equal(r.addr.ss_family, AF_INET6);

	PREFIXES(socks_parse_request, name, &r);
	assert_int_equal(socks_parse_request(name, sizeof name, &used, &r), PARSE_OK);
	assert_int_equal(r.atyp, SOCKS_ATYP_NAME);
	assert_string_equal(r.host, "example.com");
	assert_int_equal(r.port, 443);

	assert_int_equal(socks_parse_request(udp, sizeof udp, &used, &r), PARSE_OK);
	assert_int_equal(r.cmd, SOCKS_CMD_UDP);
	assert_int_equal(socks_parse_request(cmd9, sizeof cmd9, &used, &r), PARSE_OK);
	assert_int_equal(r.cmd, 9);

	assert_int_equal(socks_parse_request(badatyp, sizeof badatyp, &used, &r), PARSE_ERR);
	assert_int_equal(r.rep, SOCKS_REP_ATYP);
	assert_int_equal(socks_parse_request(badname, sizeof badname, &used, &r), PARSE_ERR);
	assert_int_equal(r.rep, SOCKS_REP_HOST_UNREACH);
	assert_int_equal(socks_parse_request(emptyname, sizeof emptyname, &used, &r), PARSE_ERR);
	assert_int_equal(socks_parse_request((const uint8_t *)"\x04\x01\x00\x01", 4, &used, &r), PARSE_ERR);
}

static void
test_request4(void **state)
{
	struct socks_req r;
	size_t used;
	const uint8_t v4[] = { 4, 1, 0, 80, 10, 1, 2, 3, 'j', 'o', 'e', 0 };
	const uint8_t v4a[] = { 4, 1, 1, 0xbb, 0, 0, 0, 9, 0, 'w', 'w', 'w', '.', 'x', 0, 'Z' };
	uint8_t longuser[8 + 300];

	(void)state;
	PREFIXES(socks_parse_v4, v4, &r);
	assert_int_equal(socks_parse_v4(v4, sizeof v4, &used, &r), PARSE_OK);
	assert_int_equal(used, sizeof v4);
	assert_false(r.v4a);
	assert_string_equal(r.host, "10.1.2.3");
	assert_string_equal(r.user, "joe");
	assert_int_equal(r.port, 80);
	PREFIXES_N(socks_parse_v4, v4a, sizeof v4a - 1, &r);
	assert_int_equal(socks_parse_v4(v4a, sizeof v4a, &used, &r), PARSE_OK);
	assert_int_equal(used, sizeof v4a - 1);
	assert_true(r.v4a);
	assert_string_equal(r.host, "www.x");
	assert_string_equal(r.user, "");
	assert_int_equal(r.port, 443);
	memset(longuser, 'u', sizeof longuser);
	memcpy(longuser, v4, 8);
	assert_int_equal(socks_parse_v4(longuser, sizeof longuser, &used, &r), PARSE_ERR);
	assert_int_equal(r.rep, SOCKS4_REJECTED);
	assert_int_equal(socks_parse_v4((const uint8_t *)"\x05", 1, &used, &r), PARSE_ERR);
}

static void
test_udp(void **state)
{
	struct socks_req r;
	size_t used;
	const uint8_t d[] = { 0, 0, 0, 1, 127, 0, 0, 1, 0, 53, 'h', 'i' };
	const uint8_t frag[] = { 0, 0, 1, 1, 127, 0, 0, 1, 0, 53, 'h', 'i' };
	const uint8_t shortd[] = { 0, 0, 0, 1, 127, 0 };

	(void)state;
	assert_int_equal(socks_parse_udp(d, sizeof d, &used, &r), PARSE_OK);
	assert_int_equal(used, 10);
	assert_int_equal(r.frag, 0);
	assert_int_equal(r.port, 53);
	assert_int_equal(socks_parse_udp(frag, sizeof frag, &used, &r), PARSE_OK);
	assert_int_equal(r.frag, 1);
	assert_int_equal(socks_parse_udp(shortd, sizeof shortd, &used, &r), PARSE_ERR);
}

static void
test_encode(void **state)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(1080) };
	struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6, .sin6_port = htons(443) };
	uint8_t out[SOCKS5_REPLY_MAX];
	const uint8_t want4[] = { 5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38 };
	const uint8_t want_v4[] = { 0, 0x5a, 0x04, 0x38, 127, 0, 0, 1 };
	struct socks_req r;
	size_t used;

	(void)state;
	inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
	inet_pton(AF_INET6, "::1", &sin6.sin6_addr);
	assert_int_equal(socks_reply5(out, 0, (struct sockaddr *)&sin), sizeof want4);
	assert_memory_equal(out, want4, sizeof want4);
	assert_int_equal(socks_reply5(out, 5, NULL), 10);
	assert_int_equal(out[1], 5);
	assert_int_equal(socks_reply5(out, 0, (struct sockaddr *)&sin6), 22);
	assert_int_equal(out[3], 4);
	assert_int_equal(out[19], 1);
	assert_int_equal(out[20], 1);
	assert_int_equal(out[21], 0xbb);
	assert_int_equal(socks_reply4(out, SOCKS4_GRANTED, (struct sockaddr *)&sin), 8);
	assert_memory_equal(out, want_v4, 8);
	/* a UDP header the parser reads back */
	assert_int_equal(socks_udp_header(out, (struct sockaddr *)&sin6), socks_udp_header_len((struct sockaddr *)&sin6));
	assert_int_equal(socks_parse_udp(out, 22, &used, &r), PARSE_OK);
	assert_string_equal(r.host, "::1");
	assert_int_equal(r.port, 443);
}

static void
test_users(void **state)
{
	char path[] = "/tmp/test-users-XXXXXX";
	int fd = mkstemp(path);
	const char *text = "# comment\n\nalice:secret\n  bob:pa:ss\r\n; other comment\n";
	json_t *obj;
	struct params p = { 0 };
	struct users *u;

	(void)state;
	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
	obj = json_pack("{s:s, s:[s, s]}", "users", path, "auth", "carol:c", "alice:override");
	p.obj = obj;
	u = users_load(&p);
	assert_null(p.why);
	assert_non_null(u);
	assert_int_equal(users_count(u), 3);
	assert_true(users_check(u, "alice", "override"));
	assert_false(users_check(u, "alice", "secret"));
	assert_true(users_check(u, "bob", "pa:ss"));
	assert_true(users_check(u, "carol", "c"));
	assert_false(users_check(u, "carol", "cc"));
	assert_false(users_check(u, "carol", ""));
	assert_false(users_check(u, "dave", "c"));
	assert_true(users_exists(u, "bob"));
	users_free(u);
	json_decref(obj);

	/* none configured */
	obj = json_pack("{s:s}", "type", "socks");
	p = (struct params){ .obj = obj };
	assert_null(users_load(&p));
	assert_null(p.why);
	json_decref(obj);

	/* a bad line names the file and line */
	fd = open(path, O_WRONLY | O_TRUNC);
	assert_int_equal(write(fd, "ok:1\nnocolon\n", 13), 13);
	close(fd);
	obj = json_pack("{s:s}", "users", path);
	p = (struct params){ .obj = obj };
	assert_null(users_load(&p));
	assert_non_null(p.why);
	assert_non_null(strstr(p.why, ":2:"));
	free(p.why);
	json_decref(obj);

	obj = json_pack("{s:s}", "auth", "nopass");
	p = (struct params){ .obj = obj };
	assert_null(users_load(&p));
	assert_non_null(p.why);
	free(p.why);
	json_decref(obj);
	unlink(path);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_greeting),
		cmocka_unit_test(test_auth),
		cmocka_unit_test(test_request5),
		cmocka_unit_test(test_request4),
		cmocka_unit_test(test_udp),
		cmocka_unit_test(test_encode),
		cmocka_unit_test(test_users),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for common/addr.c: endpoint parsing, formatting, name matching. */
#include <net/if.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "addr.h"

static void
test_hostport(void **state)
{
	struct hostport hp;
	char *why = NULL;

	(void)state;
	assert_int_equal(hostport_parse("example.com:443", &hp, &why), 0);
	assert_string_equal(hp.host, "example.com");
	assert_int_equal(hp.port, 443);
	assert_int_equal(hostport_parse("[::1]:8080", &hp, &why), 0);
	assert_string_equal(hp.host, "::1");
	assert_int_equal(hp.port, 8080);
	assert_int_equal(hostport_parse("127.0.0.1:1", &hp, &why), 0);
	/* a port alone is 127.0.0.1:port, as DESIGN.md's contract says of every address */
	assert_int_equal(hostport_parse("8080", &hp, &why), 0);
	assert_string_equal(hp.host, "127.0.0.1");
	assert_int_equal(hp.port, 8080);
	const char *bad[] = { "0", "65536", "example.com", "example.com:0", "example.com:65536", "::1:80", "[::1]80",
	                      ":80", "bad_host!:80", "[zz]:80", "host:port" };
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		why = NULL;
		assert_int_equal(hostport_parse(bad[i], &hp, &why), -1);
		assert_non_null(why);
		free(why);
	}
	/* a URL is named as one, not as an IPv6 address without brackets */
	why = NULL;
	assert_int_equal(hostport_parse("https://127.0.0.1:443", &hp, &why), -1);
	assert_non_null(strstr(why, "not a URL"));
	free(why);
}

static void
test_hostport_opt(void **state)
{
	struct hostport hp;
	char *why = NULL;

	(void)state;
	const struct { const char *in, *host; unsigned port; } ok[] = {
		{ "1.1.1.1", "1.1.1.1", 53 }, { "dns.example", "dns.example", 53 }, { "::1", "::1", 53 },
		{ "1.1.1.1:5353", "1.1.1.1", 5353 }, { "[::1]:5353", "::1", 5353 }, { "dns.example:54", "dns.example", 54 },
		{ "[::1]", "::1", 53 }, { "5353", "127.0.0.1", 5353 },
	};
	for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
		assert_int_equal(hostport_parse_opt(ok[i].in, 53, &hp, &why), 0);
		assert_string_equal(hp.host, ok[i].host);
		assert_int_equal(hp.port, ok[i].port);
	}
	const char *bad[] = { "", "bad_host!", "1.1.1.1:0", "[::1", "[1.1.1.1]", "[]", "host:port", "::1:53x", "256.1.1.1", "1.2.3:53" };
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		why = NULL;
		assert_int_equal(hostport_parse_opt(bad[i], 53, &hp, &why), -1);
		assert_non_null(why);
		free(why);
	}
}

static void
test_listen(void **state)
{
	struct sockaddr_storage ss;
	socklen_t len;
	char *why = NULL, out[ADDR_STRLEN];

	(void)state;
	assert_int_equal(addr_parse_listen("1080", &ss, &len, &why), 0);
	assert_string_equal(addr_format((struct sockaddr *)&ss, out, sizeof out), "127.0.0.1:1080");
	assert_true(addr_is_loopback((struct sockaddr *)&ss));
	assert_int_equal(addr_parse_listen("[::1]:53", &ss, &len, &why), 0);
	assert_string_equal(addr_format((struct sockaddr *)&ss, out, sizeof out), "[::1]:53");
	assert_true(addr_is_loopback((struct sockaddr *)&ss));
	assert_int_equal(addr_parse_listen("0.0.0.0:80", &ss, &len, &why), 0);
	assert_false(addr_is_loopback((struct sockaddr *)&ss));
	assert_int_equal(addr_parse_listen("www.example.com:80", &ss, &len, &why), -1);
	free(why);
	/* "*" (what capctl add --bind '*' sends) is every IPv4 address */
	assert_int_equal(addr_parse_listen("*:1080", &ss, &len, &why), 0);
	assert_string_equal(addr_format((struct sockaddr *)&ss, out, sizeof out), "0.0.0.0:1080");
	why = NULL;
	assert_int_equal(addr_parse_listen("*:0", &ss, &len, &why), -1);
	free(why);
	why = NULL;
	assert_int_equal(addr_parse_listen("70000", &ss, &len, &why), -1);
	assert_non_null(strstr(why, "expected 1-65535"));
	free(why);
}

static void
test_names(void **state)
{
	(void)state;
	assert_true(hostname_valid("www.example.com"));
	assert_true(hostname_valid("a-b.c"));
	assert_false(hostname_valid("-a.com"));
	assert_false(hostname_valid("a..com"));
	assert_false(hostname_valid("a b"));
	assert_false(hostname_valid(""));
	assert_true(hostname_match("*.example.test", "a.example.test"));
	assert_true(hostname_match("*.example.test", "a.b.example.test"));
	assert_false(hostname_match("*.example.test", "example.test"));
	assert_false(hostname_match("*.example.test", "badexample.test"));
	assert_true(hostname_match("*", "anything"));
	assert_true(hostname_match("WWW.Example.com", "www.example.com."));
	assert_false(hostname_match("www.example.com", "www.example.co"));
}

static void
test_same(void **state)
{
	struct sockaddr_storage a, b, c;
	socklen_t len;

	(void)state;
	assert_int_equal(addr_from_literal("127.0.0.1", 40000, &a, &len), 0);
	assert_int_equal(addr_from_literal("127.0.0.1", 40000, &b, &len), 0);
	assert_int_equal(addr_from_literal("::1", 40000, &c, &len), 0);
	assert_true(addr_same((struct sockaddr *)&a, (struct sockaddr *)&b, true));
	assert_false(addr_same((struct sockaddr *)&a, (struct sockaddr *)&c, true));
	addr_set_port((struct sockaddr *)&b, 40001);
	assert_int_equal(addr_port((struct sockaddr *)&b), 40001);
	assert_false(addr_same((struct sockaddr *)&a, (struct sockaddr *)&b, true));
	assert_true(addr_same((struct sockaddr *)&a, (struct sockaddr *)&b, false));
	assert_int_equal(addr_from_literal("127.0.0.2", 40000, &b, &len), 0);
	assert_false(addr_same((struct sockaddr *)&a, (struct sockaddr *)&b, true));
	assert_int_equal(addr_from_literal("::1", 40000, &b, &len), 0);
	assert_true(addr_same((struct sockaddr *)&c, (struct sockaddr *)&b, true));
	addr_set_port((struct sockaddr *)&b, 1);
	assert_false(addr_same((struct sockaddr *)&c, (struct sockaddr *)&b, true));
}

/* a connect or sendto to dst would land on a socket bound to bound */
static bool
reaches(const char *dst, uint16_t dport, const char *bound, uint16_t bport)
{
	struct sockaddr_storage d, b;
	socklen_t len;

	assert_int_equal(addr_from_literal(dst, dport, &d, &len), 0);
	assert_int_equal(addr_from_literal(bound, bport, &b, &len), 0);
	return addr_reaches((struct sockaddr *)&d, (struct sockaddr *)&b);
}

static void
test_reaches(void **state)
{
	(void)state;
	assert_true(reaches("127.0.0.1", 5000, "127.0.0.1", 5000));
	assert_false(reaches("127.0.0.1", 5001, "127.0.0.1", 5000));
	assert_false(reaches("127.0.0.2", 5000, "127.0.0.1", 5000));
	/* the kernel sends 0.0.0.0 and :: to loopback */
	assert_true(reaches("0.0.0.0", 5000, "127.0.0.1", 5000));
	assert_true(reaches("::", 5000, "::1", 5000));
	assert_false(reaches("0.0.0.0", 5000, "127.0.0.2", 5000));
	/* a wildcard listener takes any loopback address */
	assert_true(reaches("127.0.0.9", 5000, "0.0.0.0", 5000));
	assert_true(reaches("0.0.0.0", 5000, "0.0.0.0", 5000));
	assert_true(reaches("::1", 5000, "::", 5000));
	/* IPv4-mapped goes out as IPv4; a V6ONLY listener does not take IPv4 */
	assert_true(reaches("::ffff:127.0.0.1", 5000, "127.0.0.1", 5000));
	assert_true(reaches("::ffff:0.0.0.0", 5000, "127.0.0.1", 5000));
	assert_false(reaches("127.0.0.1", 5000, "::", 5000));
	assert_false(reaches("::1", 5000, "0.0.0.0", 5000));
}

/* A link-local address with its zone, as resolv.conf and ip(8) write it. */
static void
test_zone(void **state)
{
	struct sockaddr_storage ss;
	socklen_t len;
	struct hostport hp;
	char *why = NULL, out[ADDR_STRLEN];

	(void)state;
	assert_int_equal(addr_from_literal("fe80::53%lo", 53, &ss, &len), 0);
	assert_int_equal(ss.ss_family, AF_INET6);
	assert_int_equal(((struct sockaddr_in6 *)&ss)->sin6_scope_id, if_nametoindex("lo"));
	assert_string_equal(addr_format((struct sockaddr *)&ss, out, sizeof out), "[fe80::53%lo]:53");
	assert_int_equal(addr_from_literal("fe80::53%no-such-if", 53, &ss, &len), -1);
	assert_int_equal(addr_from_literal("10.0.0.1%lo", 53, &ss, &len), -1);
	assert_int_equal(hostport_parse("[fe80::53%lo]:53", &hp, &why), 0);
	assert_string_equal(hp.host, "fe80::53%lo");
	assert_int_equal(hostport_parse_opt("[fe80::53%lo]", 53, &hp, &why), 0);
	assert_int_equal(hp.port, 53);
	assert_int_equal(hostport_parse("[fe80::53%no-such-if]:53", &hp, &why), -1);
	free(why);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_hostport),
		cmocka_unit_test(test_hostport_opt),
		cmocka_unit_test(test_listen),
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_same),
		cmocka_unit_test(test_reaches),
		cmocka_unit_test(test_zone),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

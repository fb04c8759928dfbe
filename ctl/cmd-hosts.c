/*
 * capctl hosts add NAME [ADDR] | remove NAME | list | clear: capd's entries
 * in the hosts file (RPC hosts.*). Names and addresses are checked here
 * first, so a typo is a usage error (exit 2) and never reaches the file.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "addr.h"
#include "capctl.h"

static const char *const hosts_words[] = { "add", "remove", "list", "clear" };
enum { HOSTS_ADD, HOSTS_REMOVE, HOSTS_LIST, HOSTS_CLEAR };

#define HOSTS_USAGE "usage: capctl hosts add NAME [ADDR] | remove NAME | list | clear"

/* A hosts sub-command given too few words (need: what it lacks) or too many. */
static int
hosts_usage(int argc, char **argv, int max, const char *need)
{
	if (argc > max)
		return usage_extra(HOSTS_USAGE, argv[max]);
	return usage_wrong(HOSTS_USAGE, "%s", need);
}

/*
 * The name to send: arg without its one trailing dot ("www.example.test." is the
 * same name, as in a dns answer rule; the hosts file holds it without), or NULL
 * after saying why arg is no host name.
 */
static const char *
hosts_name(const char *verb, const char *arg, char buf[HOST_MAX + 1])
{
	const char *name = arg;
	size_t len = strlen(arg);

	if (len > 1 && len <= HOST_MAX && arg[len - 1] == '.') {
		memcpy(buf, arg, len - 1);
		buf[len - 1] = '\0';
		name = buf;
		len--;
	}
	if (hostname_valid(name) && name[len - 1] != '.' && !addr_is_ip_literal(name))
		return name;
	usage_error("hosts %s: '%s' is not a valid host name%s", verb, arg, hostname_idn_hint(arg));
	return NULL;
}

/* An IPv4 or IPv6 address; brackets only around an IPv6 one (RFC 3986 IP-literal). */
static bool
hosts_addr_ok(const char *addr)
{
	unsigned char bin[16];
	char a[64];
	size_t len = strlen(addr);

	if (len >= 2 && len < sizeof a && addr[0] == '[' && addr[len - 1] == ']') {
		memcpy(a, addr + 1, len - 2);
		a[len - 2] = '\0';
		return inet_pton(AF_INET6, a, bin) == 1;
	}
	return inet_pton(AF_INET, addr, bin) == 1 || inet_pton(AF_INET6, addr, bin) == 1;
}

static int
hosts_print_list(json_t *r)
{
	static const char *const hdr[] = { "NAME", "ADDR" };
	struct table *t = table_new(hdr, 2);
	json_t *e;
	size_t i;

	json_array_foreach(r, i, e)
		table_add(t, json_string_value(json_object_get(e, "name")), json_string_value(json_object_get(e, "addr")));
	table_print(t);
	table_free(t);
	return CTL_OK;
}

static int
hosts_exec(struct ctl_opts *o, int argc, char **argv)
{
	json_t *r = NULL;
	int k, rc;
	long long n;

	if (argc < 2)
		return hosts_usage(argc, argv, 2, "hosts needs add, remove, list or clear");
	k = word_match(argv[1], hosts_words, 4);
	if (k < 0) {
		usage_error("%s hosts command '%s' (add, remove, list or clear)", k == -2 ? "ambiguous" : "unknown",
		            argv[1]);
		return CTL_USAGE;
	}
	switch (k) {
	case HOSTS_ADD: {
		const char *addr = argc == 4 ? argv[3] : "127.0.0.1", *name;
		char buf[HOST_MAX + 1];
		struct in_addr v4;
		json_t *shadow;
		if (argc != 3 && argc != 4)
			return hosts_usage(argc, argv, 4, "hosts add needs a name");
		if ((name = hosts_name("add", argv[2], buf)) == NULL)
			return CTL_USAGE;
		if (inet_aton(name, &v4) != 0) {
			/* "1.2.3", "123": resolvers take it as an address and never read the hosts file */
			char a[INET_ADDRSTRLEN];
			inet_ntop(AF_INET, &v4, a, sizeof a);
			return usage_error("hosts add: '%s' is not a valid host name: resolvers read it as the address %s",
			                   name, a);
		}
		if (!hosts_addr_ok(addr))
			return usage_error("hosts add: '%s' is not an IP address%s", addr,
			                   addr[0] == '[' ? " (brackets are for IPv6 only)" : "");
		rc = client_call(o, "hosts.add", json_pack("{s:s, s:s}", "name", name, "addr", addr), &r);
		if (rc != CTL_OK)
			return rc;
		if (o->json) {
			output_json(r);
		} else {
			const char *now = json_string_value(json_object_get(r, "addr"));
			const char *was = json_string_value(json_object_get(r, "previous"));
			json_t *kept = json_object_get(r, "kept"), *a;
			size_t i;

			printf("%s -> %s", name, now);
			if (was != NULL && !json_is_true(json_object_get(r, "already")))
				printf(" (was %s)", was);
			/* the name's line of the other family stays, and still takes clients that prefer it */
			json_array_foreach(kept, i, a)
				printf("%s%s", i == 0 ? ", keeps " : ", ", json_string_value(a));
			if (json_array_size(kept) > 0)
				printf(" for IPv%c", strchr(now, ':') ? '4' : '6');
			putchar('\n');
			if (json_is_true(json_object_get(r, "already")))
				fprintf(stderr, "capctl: %s pointed at %s already; nothing changed\n", name, now);
		}
		if (!o->json && (shadow = json_object_get(r, "shadowed")) != NULL)
			fprintf(stderr, "capctl: warning: line %lld of %s maps %s to %s before capd's block, "
			        "and resolvers take that one\n", (long long)json_integer_value(json_object_get(shadow, "line")),
			        json_string_value(json_object_get(r, "file")), json_string_value(json_object_get(r, "name")),
			        json_string_value(json_object_get(shadow, "addr")));
		break;
	}
	case HOSTS_REMOVE: {
		char buf[HOST_MAX + 1];
		const char *name;
		if (argc != 3)
			return hosts_usage(argc, argv, 3, "hosts remove needs a name");
		if ((name = hosts_name("remove", argv[2], buf)) == NULL)
			return CTL_USAGE;
		if ((rc = client_call(o, "hosts.remove", json_pack("{s:s}", "name", name), &r)) != CTL_OK)
			return rc;
		if (o->json)
			output_json(r);
		else
			printf("removed %s\n", name);
		break;
	}
	case HOSTS_LIST:
		if (argc != 2)
			return hosts_usage(argc, argv, 2, "");
		if ((rc = client_call(o, "hosts.list", NULL, &r)) != CTL_OK)
			return rc;
		if (o->json)
			output_json(r);
		else
			hosts_print_list(r);
		break;
	case HOSTS_CLEAR:
		if (argc != 2)
			return hosts_usage(argc, argv, 2, "");
		if ((rc = client_call(o, "hosts.clear", NULL, &r)) != CTL_OK)
			return rc;
		n = (long long)json_integer_value(json_object_get(r, "removed"));
		if (o->json)
			output_json(r);
		else
			printf("removed %lld %s\n", n, n == 1 ? "entry" : "entries");
		break;
	}
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_hosts = { "hosts", "add NAME [ADDR] | remove NAME | list | clear", hosts_exec };

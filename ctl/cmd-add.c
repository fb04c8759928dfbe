/*
 * capctl add TYPE --port P [--bind A] [--name N] [type options]:
 * options map one to one onto instance parameters (the config keys).
 */
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "addr.h"
#include "capctl.h"
#include "path.h"
#include "values.h"
#include "xmalloc.h"

enum opt_kind {
	OPT_FLAG,    /* --udp: key = yes */
	OPT_VALUE,   /* --to X */
	OPT_REPEAT,  /* --auth X, may repeat: a list */
};

enum opt_check {
	CHK_NONE, CHK_HOSTPORT, CHK_UPSTREAM, CHK_SIZE, CHK_DURATION, CHK_UINT,
	CHK_TIMEOUT, /* a duration more than 0 */
	CHK_ROUTE,   /* PATTERN[/PATH]=HOST:PORT */
	CHK_ANSWER,  /* PATTERN=ADDRESS */
	CHK_PATH,    /* a file capd opens: sent absolute */
	CHK_PATH_DIR, /* a file or a folder capd reads: sent absolute */
	CHK_AUTH,    /* USER:PASSWORD */
	CHK_NAME,    /* a new instance's name: as capd takes it (value_name_ok) */
	CHK_CAPTURE, /* plain or both */
	CHK_IFACE,   /* an interface name, as sniff.c takes it */
	CHK_PORTS,   /* connect ports: PORT,PORT... or * alone, as proto-http.c takes them */
	CHK_LIST,    /* words split at commas and blanks: at least one (capd checks each) */
};

struct add_opt {
	const char *type;   /* NULL: every type */
	const char *opt;    /* "--to" */
	const char *key;    /* "to" */
	enum opt_kind kind;
	enum opt_check check;  /* what capctl can reject itself (exit 2) */
	const char *value;  /* OPT_FLAG: the value set */
};

static const char *const add_types[] = { "forward", "socks", "http", "reverse", "dns", "sniff" };
#define NTYPES ((int)(sizeof add_types / sizeof add_types[0]))
#define TLS_TYPES "forward socks http reverse"
#define TLS_PASS_TYPES "forward socks http"  /* a reverse proxy ends the client's TLS itself */
#define LISTEN_TYPES "forward socks http reverse dns"

static const struct add_opt add_opts[] = {
	{ NULL, "--name", "name", OPT_VALUE, CHK_NAME, NULL },
	{ NULL, "--no-capture", "capture", OPT_FLAG, CHK_NONE, "no" },
	{ LISTEN_TYPES, "--expose", "expose", OPT_FLAG, CHK_NONE, "yes" },
	{ LISTEN_TYPES, "--idle-timeout", "idle_timeout", OPT_VALUE, CHK_DURATION, NULL },
	{ LISTEN_TYPES, "--connect-timeout", "connect_timeout", OPT_VALUE, CHK_DURATION, NULL },
	{ "forward", "--to", "to", OPT_VALUE, CHK_HOSTPORT, NULL },
	{ "forward", "--udp", "udp", OPT_FLAG, CHK_NONE, "yes" },
	{ "socks http", "--auth", "auth", OPT_REPEAT, CHK_AUTH, NULL },
	{ "socks http", "--users", "users", OPT_VALUE, CHK_PATH, NULL },
	{ "socks", "--socks4", "socks4", OPT_FLAG, CHK_NONE, "yes" },
	{ "socks", "--handshake-timeout", "handshake_timeout", OPT_VALUE, CHK_DURATION, NULL },
	{ "http", "--connect-ports", "connect_ports", OPT_VALUE, CHK_PORTS, NULL },
	{ "http reverse", "--max-header-size", "max_header_size", OPT_VALUE, CHK_SIZE, NULL },
	{ "http reverse", "--header-timeout", "header_timeout", OPT_VALUE, CHK_DURATION, NULL },
	{ "http reverse", "--response-timeout", "response_timeout", OPT_VALUE, CHK_DURATION, NULL },
	{ "reverse", "--route", "route", OPT_REPEAT, CHK_ROUTE, NULL },
	{ "reverse", "--default", "default", OPT_VALUE, CHK_HOSTPORT, NULL },
	{ "dns", "--answer", "answer", OPT_REPEAT, CHK_ANSWER, NULL },
	{ "dns", "--upstream", "upstream", OPT_VALUE, CHK_UPSTREAM, NULL },
	{ "dns", "--ttl", "ttl", OPT_VALUE, CHK_UINT, NULL },
	{ "sniff", "--interface", "interface", OPT_VALUE, CHK_IFACE, NULL },
	{ "sniff", "--filter", "filter", OPT_VALUE, CHK_NONE, NULL },
	{ "sniff", "--promisc", "promisc", OPT_FLAG, CHK_NONE, "yes" },
	{ "sniff", "--snaplen", "snaplen", OPT_VALUE, CHK_UINT, NULL },
	{ "sniff", "--buffer-size", "buffer_size", OPT_VALUE, CHK_SIZE, NULL },
	{ TLS_TYPES, "--tls", "tls", OPT_FLAG, CHK_NONE, "yes" },
	{ TLS_TYPES, "--tls-auto", "tls", OPT_FLAG, CHK_NONE, "auto" },
	{ TLS_TYPES, "--no-tls-verify", "tls_verify", OPT_FLAG, CHK_NONE, "no" },
	{ TLS_TYPES, "--tls-capture", "tls_capture", OPT_VALUE, CHK_CAPTURE, NULL },
	{ TLS_PASS_TYPES, "--tls-passthrough", "tls_passthrough", OPT_VALUE, CHK_LIST, NULL },
	{ TLS_PASS_TYPES, "--no-tls-auto-passthrough", "tls_auto_passthrough", OPT_FLAG, CHK_NONE, "no" },
	{ TLS_TYPES, "--tls-timeout", "tls_timeout", OPT_VALUE, CHK_TIMEOUT, NULL },
	{ TLS_TYPES, "--tls-client-cert", "tls_client_cert", OPT_VALUE, CHK_PATH_DIR, NULL },
};

/* The range capd takes of a CHK_UINT or CHK_SIZE value: outside it, capctl's usage error. */
static const struct add_range {
	const char *key;
	uint64_t min, max;
	const char *text;
} add_ranges[] = {
	{ "ttl", 0, VALUE_TTL_MAX, "0 to 2147483647" },
	{ "snaplen", 0, VALUE_SNAPLEN_MAX, "0 to 262144" },  /* 0 is the ceiling too */
	{ "buffer_size", VALUE_SNIFF_BUFFER_MIN, VALUE_SNIFF_BUFFER_MAX, "1M to 1G" },
	{ "max_header_size", VALUE_HEADER_SIZE_MIN, VALUE_HEADER_SIZE_MAX, "1K to 64K" },
};

static const struct add_range *
add_range_of(const struct add_opt *ao)
{
	for (size_t i = 0; i < sizeof add_ranges / sizeof add_ranges[0]; i++)
		if (!strcmp(add_ranges[i].key, ao->key))
			return &add_ranges[i];
	return NULL;
}

static bool
opt_for_type(const struct add_opt *ao, const char *type)
{
	const char *p;
	size_t len = strlen(type);

	if (ao->type == NULL)
		return true;
	for (p = ao->type; (p = strstr(p, type)) != NULL; p += len)
		if ((p == ao->type || p[-1] == ' ') && (p[len] == '\0' || p[len] == ' '))
			return true;
	return false;
}

/* The flag of type that set key to value (--tls for tls = yes). */
static const char *
add_flag_opt(const char *type, const char *key, const char *value)
{
	for (size_t k = 0; k < sizeof add_opts / sizeof add_opts[0]; k++)
		if (add_opts[k].kind == OPT_FLAG && opt_for_type(&add_opts[k], type) &&
		    !strcmp(add_opts[k].key, key) && !strcmp(add_opts[k].value, value))
			return add_opts[k].opt;
	return "another option";
}

/* What an option's value looks like in the usage line, in capctl(1)'s words. */
static const char *
add_metavar(const struct add_opt *ao)
{
	switch (ao->check) {
	case CHK_HOSTPORT: return "HOST:PORT";
	case CHK_UPSTREAM: return "HOST[:PORT]";
	case CHK_SIZE: return "SIZE";
	case CHK_DURATION:
	case CHK_TIMEOUT: return "T";
	case CHK_UINT: return "N";
	case CHK_ROUTE: return "PATTERN[/PATH]=HOST:PORT";
	case CHK_ANSWER: return "PATTERN=ADDR";
	case CHK_PATH: return "FILE";
	case CHK_PATH_DIR: return "PATH";
	case CHK_AUTH: return "USER:PASS";
	case CHK_NAME: return "NAME";
	case CHK_CAPTURE: return "plain|both";
	case CHK_IFACE: return "IFACE";
	case CHK_PORTS: return "PORT[,PORT...]";
	case CHK_LIST: return "PATTERN[,PATTERN...]";
	case CHK_NONE: break;
	}
	return "EXPR";  /* --filter, the one value capctl leaves to capd */
}

/* An option the type cannot do without, checked in add_exec: shown unbracketed. */
static bool
add_required(const struct add_opt *ao, const char *type)
{
	return (!strcmp(type, "forward") && !strcmp(ao->key, "to")) ||
	       (!strcmp(type, "sniff") && !strcmp(ao->key, "interface"));
}

/* To stdout for --help, to stderr after a mistake. */
static void
add_usage(FILE *f, const char *type)
{
	fprintf(f, "usage: capctl add %s %s[--name NAME]", type,
	        strcmp(type, "sniff") ? "--port PORT [--bind ADDR] " : "");
	for (size_t i = 0; i < sizeof add_opts / sizeof add_opts[0]; i++) {
		const struct add_opt *ao = &add_opts[i];
		bool req;

		if (ao->type == NULL || !strcmp(ao->type, LISTEN_TYPES) || !opt_for_type(ao, type))
			continue;
		req = add_required(ao, type);
		fprintf(f, " %s%s%s%s%s%s", req ? "" : "[", ao->opt, ao->kind == OPT_FLAG ? "" : " ",
		        ao->kind == OPT_FLAG ? "" : add_metavar(ao), ao->kind == OPT_REPEAT ? " ..." : "",
		        req ? "" : "]");
	}
	fprintf(f, " %s[--no-capture]\n", strcmp(type, "sniff") ? "[--expose] [--idle-timeout T] [--connect-timeout T] " : "");
}

static void
add_usage_types(FILE *f)
{
	fprintf(f, "usage: capctl add TYPE [options]   (TYPE: forward socks http reverse dns sniff;"
	           " capctl add TYPE --help)\n");
}

/* An IPv4 or IPv6 address, IPv6 maybe in brackets, copied to out without them; -1 when s is none. */
static int
add_ip_literal(const char *s, char *out, size_t n)
{
	size_t len = strlen(s);

	if (len > 2 && s[0] == '[' && s[len - 1] == ']') {
		s++;
		len -= 2;
	}
	if (len >= n)
		return -1;
	memcpy(out, s, len);
	out[len] = '\0';
	return addr_is_ip_literal(out) ? 0 : -1;
}

/* capd opens the file itself, from its own working directory ("/" under
 * systemd): a relative path must become the file the user meant, here.
 * Made absolute and cleaned as a config file's paths are (path_clean), not
 * resolved: instance.list and reload show the name the user gave, a link's
 * included, and a link moved to a renewed file is followed. */
static int
add_path(const struct add_opt *ao, const char *v, json_t **out)
{
	struct stat st;
	char *cwd = NULL, *full;

	if (stat(v, &st) < 0) {
		/* capd may read where the user cannot look: an absolute path is its to try */
		if (errno != EACCES || v[0] != '/')
			return usage_error("%s: %s: %s", ao->opt, v, strerror(errno));
	} else if (S_ISDIR(st.st_mode) && ao->check != CHK_PATH_DIR) {
		return usage_error("%s: %s is a folder, not a file", ao->opt, v);
	}
	if (v[0] != '/' && (cwd = getcwd(NULL, 0)) == NULL)
		return usage_error("%s: %s: %s", ao->opt, v, strerror(errno));
	full = path_clean(cwd, v);
	free(cwd);
	*out = ctl_string(ao->opt, full);
	free(full);
	return *out == NULL ? CTL_USAGE : 0;
}

/* --route PATTERN[/PATH]=HOST:PORT and --answer PATTERN=ADDRESS: the address after
 * the last '=', as capd splits them (an address has none, a route's path may).
 * The pattern and path are left to capd. */
static int
add_rule(const struct add_opt *ao, const char *v)
{
	const char *eq = strrchr(v, '=');
	struct hostport hp;
	char ip[ADDR_STRLEN], *why = NULL;
	int rc;

	if (eq == NULL || eq == v)
		return usage_error("%s: bad rule '%s': expected PATTERN=%s", ao->opt, v,
		                   ao->check == CHK_ROUTE ? "HOST:PORT" : "ADDRESS");
	/* an answer's address goes into a DNS record, where a zone has no place */
	if (ao->check == CHK_ANSWER) {
		if (add_ip_literal(eq + 1, ip, sizeof ip) < 0 || strchr(ip, '%') != NULL)
			return usage_error("%s: bad address '%s' in '%s' (an IPv4 or IPv6 address)", ao->opt, eq + 1, v);
		if (eq[1] == '[' && strchr(ip, ':') == NULL)  /* as capd: brackets are for IPv6 */
			return usage_error("%s: bad address '%s' in '%s' (brackets are for an IPv6 address)", ao->opt,
			                   eq + 1, v);
		return 0;
	}
	if (hostport_parse(eq + 1, &hp, &why) < 0) {
		rc = usage_error("%s: %s", ao->opt, why);
		free(why);
		return rc;
	}
	return 0;
}

/* The separators capd splits a list value at (proto-http.c, tls.c). */
#define ADD_LIST_SEP ", \t"
#define ADD_PORTS_SEP ", "           /* proto-http.c's, for connect_ports: no tab */
#define ADD_CONNECT_PORTS_MAX 64      /* http-proxy.h's connect_ports[] */

/*
 * A list value given empty ('', or only separators) is a mistake: an empty
 * --tls-passthrough would be taken as no name at all, and an empty
 * --connect-ports is capd's to refuse. --connect-ports is checked whole,
 * as proto-http.c reads it; the words of other lists are left to capd.
 */
static int
add_list(const struct add_opt *ao, const char *v)
{
	char *copy, *tok, *save = NULL;
	size_t n = 0;
	int rc = 0;

	if (v[strspn(v, ADD_LIST_SEP)] == '\0')
		return usage_error("%s: the list is empty", ao->opt);
	if (ao->check != CHK_PORTS)
		return 0;
	copy = xstrdup(v);
	for (tok = strtok_r(copy, ADD_PORTS_SEP, &save); tok && rc == 0; tok = strtok_r(NULL, ADD_PORTS_SEP, &save)) {
		uint64_t port;

		if (!strcmp(tok, "*")) {
			if (strcmp(v, "*") != 0)
				rc = usage_error("%s: '*' means every port: give it alone, not in a list", ao->opt);
		} else if (value_uint(tok, 65535, &port) < 0 || port == 0) {
			rc = usage_error("%s: bad port '%s' (1 to 65535, or * alone)", ao->opt, tok);
		} else if (++n > ADD_CONNECT_PORTS_MAX) {
			rc = usage_error("%s: more than %d ports (* is every port)", ao->opt, ADD_CONNECT_PORTS_MAX);
		}
	}
	free(copy);
	return rc;
}

/* What capctl can reject itself (exit 2); on success *out is the value to send. */
static int
add_check(const struct add_opt *ao, const char *v, json_t **out)
{
	const struct add_range *r = add_range_of(ao);
	struct hostport hp;
	char *why = NULL;
	uint64_t u;
	double d;

	switch (ao->check) {
	case CHK_HOSTPORT:
	case CHK_UPSTREAM:  /* a resolver's port may be left out: 53 */
		if ((ao->check == CHK_UPSTREAM ? hostport_parse_opt(v, 53, &hp, &why) : hostport_parse(v, &hp, &why)) < 0) {
			int rc = usage_error("%s: %s", ao->opt, why);
			free(why);
			return rc;
		}
		return 0;
	case CHK_SIZE:
		if (value_size(v, &u) < 0)
			return usage_error("%s: bad size '%s'", ao->opt, v);
		if (r != NULL && (u < r->min || u > r->max))
			return usage_error("%s: size '%s' out of range (%s)", ao->opt, v, r->text);
		return 0;
	case CHK_DURATION:
	case CHK_TIMEOUT:
		if (value_duration(v, &d) < 0)
			return usage_error("%s: bad duration '%s'", ao->opt, v);
		if (d > VALUE_DURATION_MAX)
			return usage_error("%s: duration '%s' out of range (" VALUE_DURATION_MAX_TEXT ")", ao->opt, v);
		if (ao->check == CHK_TIMEOUT && d <= 0)
			return usage_error("%s: duration '%s' out of range (more than 0)", ao->opt, v);
		return 0;
	case CHK_UINT:
		if (value_uint(v, r != NULL ? r->max : UINT64_MAX, &u) < 0 || (r != NULL && u < r->min))
			return usage_error("%s: bad number '%s' (%s)", ao->opt, v, r != NULL ? r->text : "0 or more");
		return 0;
	case CHK_ROUTE:
	case CHK_ANSWER:
		return add_rule(ao, v);
	case CHK_PATH:
	case CHK_PATH_DIR:
		return add_path(ao, v, out);
	case CHK_NAME:
		return (*out = ctl_new_name(ao->opt, v)) == NULL ? CTL_USAGE : 0;
	case CHK_CAPTURE:
		return strcmp(v, "plain") && strcmp(v, "both") ? usage_error("%s: bad value '%s' (plain or both)", ao->opt, v)
		                                               : 0;
	case CHK_IFACE:  /* capd says whether there is one of that name */
		if (*v == '\0' || strlen(v) >= IFNAMSIZ || strpbrk(v, " \t/") != NULL)
			return usage_error("%s: bad interface name '%s'", ao->opt, v);
		return 0;
	case CHK_AUTH:  /* as capd's users.c: the name ends at the first ':' */
		/* named by its user alone, as capd does: the rest is a password, and
		 * a value without ':' may well be one (a terminal log, a CI's output) */
		if (strchr(v, ':') == NULL)
			return usage_error("%s: bad value (no ':', so not shown): expected user:password", ao->opt);
		if (v[0] == ':')
			return usage_error("%s: the user name is empty: expected user:password (RFC 1929 allows 1 to %d "
			                   "bytes)", ao->opt, VALUE_AUTH_FIELD_MAX);
		if (strcspn(v, ":") > VALUE_AUTH_FIELD_MAX)
			return usage_error("%s: the user name is %zu bytes: RFC 1929 allows 1 to %d", ao->opt,
			                   strcspn(v, ":"), VALUE_AUTH_FIELD_MAX);
		if (strlen(strchr(v, ':') + 1) > VALUE_AUTH_FIELD_MAX)
			return usage_error("%s: the password is %zu bytes: RFC 1929 allows up to %d", ao->opt,
			                   strlen(strchr(v, ':') + 1), VALUE_AUTH_FIELD_MAX);
		return 0;
	case CHK_PORTS:
	case CHK_LIST:
		return add_list(ao, v);
	case CHK_NONE:
		break;
	}
	return 0;
}

static int
add_value(const struct add_opt *ao, const char *v, json_t **out)
{
	int rc;

	*out = NULL;
	if ((rc = add_check(ao, v, out)) != 0)
		return rc;
	if (*out == NULL && (*out = ctl_string(ao->opt, v)) == NULL)
		return CTL_USAGE;
	return 0;
}

/* --port and --bind into capd's listen address. capd listens on IP addresses
 * only (its listen also takes "*" and "localhost"), so a name or a typo is a
 * malformed value capctl refuses itself. */
static int
add_listen(json_t *params, const char *type, const char *port, const char *bind)
{
	char ip[ADDR_STRLEN], listen[ADDR_STRLEN + 8], *why = NULL;
	struct sockaddr_storage ss;
	socklen_t sslen;
	uint64_t p;

	if (port == NULL) {
		add_usage(stderr, type);
		return usage_error("add %s needs --port", type);
	}
	if (value_uint(port, 65535, &p) < 0 || p == 0)
		return usage_error("--port: bad port '%s' (1 to 65535)", port);
	if (bind == NULL)
		bind = "127.0.0.1";
	if (!strcmp(bind, "*") || !strcmp(bind, "localhost"))
		snprintf(ip, sizeof ip, "%s", bind);
	else if (add_ip_literal(bind, ip, sizeof ip) < 0)
		return usage_error("--bind: bad address '%s' (an IPv4 or IPv6 address)", bind);
	if (strchr(ip, ':'))
		snprintf(listen, sizeof listen, "[%s]:%u", ip, (unsigned)p);
	else
		snprintf(listen, sizeof listen, "%s:%u", ip, (unsigned)p);
	if (addr_parse_listen(listen, &ss, &sslen, &why) < 0) {
		int rc = usage_error("--bind: %s", why);  /* the rules capd reads it by (an IPv4-mapped address) */
		free(why);
		return rc;
	}
	/* beyond loopback only when asked for, as capd's instance.c has it */
	if (json_object_get(params, "expose") == NULL && !addr_is_loopback((struct sockaddr *)&ss))
		return usage_error("--bind: %s is not a loopback address: add --expose to listen there", bind);
	json_object_set_new(params, "listen", json_string(listen));
	return 0;
}

static int
add_exec(struct ctl_opts *o, int argc, char **argv)
{
	const char *type, *port = NULL, *bind = NULL;
	json_t *params, *result = NULL;
	int t, rc;

	if (argc >= 2 && !strcmp(argv[1], "--help")) {
		add_usage_types(stdout);
		return CTL_OK;
	}
	if (argc < 2) {
		add_usage_types(stderr);
		return usage_error("add needs an instance type");
	}
	t = word_match(argv[1], add_types, NTYPES);
	if (t < 0)  /* "s" is socks or sniff: say so rather than that there is no such type */
		return usage_error("%s instance type '%s' (forward, socks, http, reverse, dns or sniff)",
		                   t == -2 ? "ambiguous" : "unknown", argv[1]);
	type = add_types[t];
	params = json_pack("{s:s}", "type", type);
	for (int i = 2; i < argc; i++) {
		const char *arg = argv[i], *val = NULL;
		char optbuf[64];
		const char *eq = strchr(arg, '=');
		json_t *jv;

		if (!strcmp(arg, "--help")) {
			json_decref(params);
			add_usage(stdout, type);
			return CTL_OK;
		}
		/* --opt=value is the same as --opt value */
		if (eq && arg[0] == '-' && (size_t)(eq - arg) < sizeof optbuf) {
			memcpy(optbuf, arg, (size_t)(eq - arg));
			optbuf[eq - arg] = '\0';
			val = eq + 1;
			arg = optbuf;
		}
		if (!strcmp(arg, "--port") || !strcmp(arg, "--bind")) {
			if (val == NULL && i + 1 >= argc)
				goto missing;
			if (val == NULL)
				val = argv[++i];
			if ((!strcmp(arg, "--port") ? port : bind) != NULL) {
				json_decref(params);
				return usage_error("%s given twice", arg);
			}
			if (!strcmp(arg, "--port"))
				port = val;
			else
				bind = val;
			continue;
		}
		const struct add_opt *ao = NULL;
		for (size_t k = 0; k < sizeof add_opts / sizeof add_opts[0]; k++)
			if (!strcmp(add_opts[k].opt, arg) && opt_for_type(&add_opts[k], type)) {
				ao = &add_opts[k];
				break;
			}
		if (ao == NULL) {
			const char *of = NULL;
			for (size_t k = 0; k < sizeof add_opts / sizeof add_opts[0] && of == NULL; k++)
				if (!strcmp(add_opts[k].opt, arg))
					of = add_opts[k].type;  /* an option of other types: say whose */
			json_decref(params);
			add_usage(stderr, type);
			if (of != NULL) {
				char types[64] = "";
				for (const char *w = of; *w; w += strcspn(w, " "), w += strspn(w, " "))
					snprintf(types + strlen(types), sizeof types - strlen(types), "%s%.*s", types[0] ? ", " : "",
					         (int)strcspn(w, " "), w);
				return usage_error("unknown option %s for add %s (an option of %s)", arg, type, types);
			}
			return usage_error("unknown option %s for add %s", arg, type);
		}
		if (ao->kind == OPT_FLAG) {
			if (val) {
				json_decref(params);
				return usage_error("%s takes no value", ao->opt);
			}
			/* --tls then --tls-auto: the last one silently won */
			const char *was = json_string_value(json_object_get(params, ao->key));
			if (was != NULL && strcmp(was, ao->value) != 0) {
				const char *other = add_flag_opt(type, ao->key, was);  /* before was is freed */
				json_decref(params);
				return usage_error("%s conflicts with %s given before it", ao->opt, other);
			}
			json_object_set_new(params, ao->key, json_string(ao->value));
			continue;
		}
		if (val == NULL) {
			if (i + 1 >= argc)
				goto missing;
			val = argv[++i];
		}
		if ((rc = add_value(ao, val, &jv)) != 0) {
			json_decref(params);
			return rc;
		}
		if (ao->kind == OPT_REPEAT) {
			json_t *list = json_object_get(params, ao->key);
			if (list == NULL)
				json_object_set_new(params, ao->key, list = json_array());
			json_array_append_new(list, jv);
		} else {
			if (json_object_get(params, ao->key)) {
				json_decref(jv);
				json_decref(params);
				return usage_error("%s given twice", ao->opt);
			}
			json_object_set_new(params, ao->key, jv);
		}
		continue;
missing:
		json_decref(params);
		return ctl_needs_value(arg);
	}

	if (strcmp(type, "sniff") != 0) {
		if ((rc = add_listen(params, type, port, bind)) != 0) {
			json_decref(params);
			return rc;
		}
	} else if (port || bind) {
		json_decref(params);
		return usage_error("a sniffer has no --port or --bind");
	}
	if (json_object_get(params, "tls") == NULL)  /* the other tls_ keys mean nothing without it (capd refuses them) */
		for (size_t k = 0; k < sizeof add_opts / sizeof add_opts[0]; k++)
			if (!strncmp(add_opts[k].key, "tls_", 4) && json_object_get(params, add_opts[k].key)) {
				json_decref(params);
				return usage_error("%s needs --tls or --tls-auto", add_opts[k].opt);
			}
	if (!strcmp(type, "forward") && json_object_get(params, "to") == NULL) {
		json_decref(params);
		add_usage(stderr, type);
		return usage_error("add forward needs --to HOST:PORT");
	}
	if (!strcmp(type, "reverse") && json_object_get(params, "route") == NULL &&
	    json_object_get(params, "default") == NULL) {  /* capd's proto-reverse.c refuses that too */
		json_decref(params);
		add_usage(stderr, type);
		return usage_error("add reverse needs --route PATTERN=HOST:PORT or --default HOST:PORT");
	}
	if (!strcmp(type, "sniff") && json_object_get(params, "interface") == NULL) {
		json_decref(params);
		add_usage(stderr, type);
		return usage_error("add sniff needs --interface IFACE");
	}

	bool promisc = json_object_get(params, "promisc") != NULL;  /* client_call takes params */
	if ((rc = client_call(o, "instance.add", params, &result)) != CTL_OK)
		return rc;
	if (promisc && json_is_false(json_object_get(result, "promisc")))
		/* as tcpdump: the capture runs, without what was asked (libpcap cannot on `any`) */
		fprintf(stderr, "capctl: warning: promiscuous mode is not supported on interface %s: "
		        "capturing without it\n", json_string_value(json_object_get(result, "interface")));
	if (o->json)
		output_json(result);
	else
		printf("added %s (%s on %s)\n", json_string_value(json_object_get(result, "name")), type,
		       json_string_value(json_object_get(result, "listen")));
	json_decref(result);
	return CTL_OK;
}

const struct cmd cmd_add = {
	"add", "TYPE --port PORT [--bind ADDR] [--name NAME] [options]   (capctl add TYPE --help)", add_exec,
};

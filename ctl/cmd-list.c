/* capctl list: the instances, as a table or JSON. */
#include <stdio.h>
#include <string.h>

#include "capctl.h"
#include "values.h"

#define LIST_TLS_TIMEOUT 20.0  /* tls_timeout's default (capd.conf.5): not shown */
#define LIST_CONNECT_TIMEOUT 10.0  /* connect_timeout's default: not shown either */
#define LIST_SNIFF_BUFFER (32u << 20)  /* a sniffer's buffer_size default: not shown */
#define LIST_RESPONSE_TIMEOUT 60.0 /* response_timeout's default (http, reverse): not shown */

/* TLS interception with its settings that are not the default, and the
 * hosts passed through because clients rejected capd's certificate. */
static void
list_tls_info(json_t *inst, char *info, size_t n)
{
	const char *tls = json_string_value(json_object_get(inst, "tls"));
	const char *cap = json_string_value(json_object_get(inst, "tls_capture"));
	json_t *auto_pt = json_object_get(inst, "tls_passthrough_auto"), *h;
	json_t *pt = json_object_get(inst, "tls_passthrough");
	json_t *tmo = json_object_get(inst, "tls_timeout");
	const char *cc = json_string_value(json_object_get(inst, "tls_client_cert"));
	const char *pt0 = json_string_value(json_array_get(pt, 0));
	size_t len = strlen(info), i, npt = json_array_size(pt);

	if (tls == NULL || !strcmp(tls, "no"))
		return;
	snprintf(info + len, n - len, "%stls %s", len ? ", " : "", tls);
	len = strlen(info);
	if (json_is_false(json_object_get(inst, "tls_verify")))
		len += (size_t)snprintf(info + len, n - len, ", verify no");
	if (len < n && cap != NULL && strcmp(cap, "plain") != 0)
		len += (size_t)snprintf(info + len, n - len, ", capture %s", cap);
	if (len < n && npt == 1 && pt0 != NULL && !strcmp(pt0, "*"))
		len += (size_t)snprintf(info + len, n - len, ", passthrough *");
	else if (len < n && npt > 0)
		len += (size_t)snprintf(info + len, n - len, ", passthrough %zu %s", npt, npt == 1 ? "name" : "names");
	if (len < n && json_is_false(json_object_get(inst, "tls_auto_passthrough")))
		len += (size_t)snprintf(info + len, n - len, ", auto passthrough no");
	if (len < n && json_is_number(tmo) && json_number_value(tmo) != LIST_TLS_TIMEOUT)
		len += (size_t)snprintf(info + len, n - len, ", timeout %gs", json_number_value(tmo));
	if (len < n && cc != NULL)
		snprintf(info + len, n - len, ", client cert %s", cc);
	json_array_foreach(auto_pt, i, h) {
		len = strlen(info);
		snprintf(info + len, n - len, "%s%s", i ? " " : ", passthrough (clients rejected the certificate): ",
		         json_string_value(h));
	}
}

/* Appends the strings of a JSON list, comma-separated. */
static void
list_join(json_t *a, char *out, size_t n)
{
	size_t i, len = strlen(out);
	json_t *e;

	json_array_foreach(a, i, e) {
		char num[24];
		const char *v = json_string_value(e);
		if (v == NULL && json_is_integer(e)) {
			snprintf(num, sizeof num, "%lld", (long long)json_integer_value(e));
			v = num;
		}
		if (v == NULL || len + 2 >= n)
			continue;
		len += (size_t)snprintf(out + len, n - len, "%s%s", i ? "," : "", v);
		if (len >= n)
			len = n - 1;
	}
}

/* "label a,b" for a list that has anything; an empty one says nothing (a
 * reverse instance with a default alone, a dns instance without answers). */
static void
list_named(json_t *a, const char *label, char *out, size_t n)
{
	if (json_array_size(a) == 0)
		return;
	snprintf(out, n, "%s", label);
	list_join(a, out, n);
}

/* The keys every listening instance takes, and an http or reverse one's
 * response_timeout, where not the default: capctl add --no-capture,
 * --idle-timeout and --connect-timeout showed nowhere in the list. */
static void
list_common_info(json_t *inst, char *info, size_t n)
{
	json_t *idle = json_object_get(inst, "idle_timeout"), *conn = json_object_get(inst, "connect_timeout");
	json_t *resp = json_object_get(inst, "response_timeout");
	size_t len = strlen(info);

	if (json_is_false(json_object_get(inst, "capture")) && len < n)
		len += (size_t)snprintf(info + len, n - len, "%sno capture", len ? ", " : "");
	if (json_is_number(idle) && json_number_value(idle) > 0 && len < n)
		len += (size_t)snprintf(info + len, n - len, "%sidle timeout %gs", len ? ", " : "",
		                        json_number_value(idle));
	if (json_is_number(conn) && json_number_value(conn) != LIST_CONNECT_TIMEOUT && len < n) {
		if (json_number_value(conn) == 0)
			len += (size_t)snprintf(info + len, n - len, "%sconnect timeout none", len ? ", " : "");
		else
			len += (size_t)snprintf(info + len, n - len, "%sconnect timeout %gs", len ? ", " : "",
			                        json_number_value(conn));
	}
	if (json_is_number(resp) && json_number_value(resp) != LIST_RESPONSE_TIMEOUT && len < n) {
		if (json_number_value(resp) == 0)
			snprintf(info + len, n - len, "%sresponse timeout none", len ? ", " : "");
		else
			snprintf(info + len, n - len, "%sresponse timeout %gs", len ? ", " : "", json_number_value(resp));
	}
}

/*
 * A sniffer's settings where not the default: snap length, promiscuous mode,
 * kernel buffer (in the unit it was likely given in, 2M or 512K, as capd.conf
 * takes it back), and last its filter, which tells apart two sniffers on one
 * interface and may be long.
 */
static void
list_sniff_info(json_t *inst, char *info, size_t n)
{
	json_t *snap = json_object_get(inst, "snaplen"), *b = json_object_get(inst, "buffer_size");
	unsigned long long v = (unsigned long long)json_integer_value(b);
	const char *filter = json_string_value(json_object_get(inst, "filter"));
	size_t len = strlen(info);

	if (json_is_integer(snap) && json_integer_value(snap) != VALUE_SNAPLEN_MAX && len < n)
		len += (size_t)snprintf(info + len, n - len, ", snaplen %lld", (long long)json_integer_value(snap));
	if (json_is_true(json_object_get(inst, "promisc")) && len < n)
		len += (size_t)snprintf(info + len, n - len, ", promisc");
	if (json_is_integer(b) && v != LIST_SNIFF_BUFFER && len < n) {
		if (v % (1u << 20) == 0)
			len += (size_t)snprintf(info + len, n - len, ", buffer %lluM", v >> 20);
		else if (v % 1024 == 0)
			len += (size_t)snprintf(info + len, n - len, ", buffer %lluK", v >> 10);
		else
			len += (size_t)snprintf(info + len, n - len, ", buffer %llu", v);
	}
	if (filter != NULL && len < n)
		snprintf(info + len, n - len, ", filter %s", filter);
}

/* The INFO column: what tells instances of each type apart at a glance. */
static void
list_info(json_t *inst, const char *err, const char *to, char *info, size_t n)
{
	const char *def = json_string_value(json_object_get(inst, "default"));
	const char *up = json_string_value(json_object_get(inst, "upstream"));
	size_t len;

	info[0] = '\0';
	if (err) {
		snprintf(info, n, "error: %s", err);
		return;
	}
	if (to)
		snprintf(info, n, "to %s", to);
	else if (json_object_get(inst, "packets")) {
		long long ifdrop = (long long)json_integer_value(json_object_get(inst, "dropped_interface"));
		snprintf(info, n, "packets %lld, dropped kernel %lld, spool %lld",
		         (long long)json_integer_value(json_object_get(inst, "packets")),
		         (long long)json_integer_value(json_object_get(inst, "dropped_kernel")),
		         (long long)json_integer_value(json_object_get(inst, "dropped_spool")));
		if (ifdrop > 0)  /* the device's own, apart as dumpcap says them */
			snprintf(info + strlen(info), n - strlen(info), ", interface %lld", ifdrop);
		list_sniff_info(inst, info, n);
	}
	else if (json_is_array(json_object_get(inst, "routes"))) {
		list_named(json_object_get(inst, "routes"), "routes ", info, n);
		if (def)
			snprintf(info + strlen(info), n - strlen(info), "%sdefault %s", info[0] ? ", " : "", def);
	} else if (json_is_array(json_object_get(inst, "answer"))) {
		list_named(json_object_get(inst, "answer"), "answers ", info, n);
		if (up)
			snprintf(info + strlen(info), n - strlen(info), "%supstream %s", info[0] ? ", " : "", up);
	} else if (json_is_array(json_object_get(inst, "connect_ports"))) {
		snprintf(info, n, "connect ports ");
		list_join(json_object_get(inst, "connect_ports"), info, n);
	} else if (json_is_string(json_object_get(inst, "connect_ports"))) {
		/* connect_ports = *: the instance object says "*" rather than a list */
		snprintf(info, n, "connect ports %s", json_string_value(json_object_get(inst, "connect_ports")));
	} else if (json_is_string(json_object_get(inst, "command"))) {
		snprintf(info, n, "pid %lld", (long long)json_integer_value(json_object_get(inst, "pid")));
	}
	len = strlen(info);
	if (json_is_true(json_object_get(inst, "auth")) && len < n)
		snprintf(info + len, n - len, "%sauth", len ? ", " : "");
	list_common_info(inst, info, n);
	/* the TLS mode follows, from list_tls_info */
}

static int
list_exec(struct ctl_opts *o, int argc, char **argv)
{
	static const char *const hdr[] = { "NAME", "TYPE", "LISTEN", "STATE", "SESSIONS", "UP", "DOWN", "INFO" };
	json_t *r = NULL, *inst;
	size_t i;
	int rc;

	if (argc != 1)
		return usage_extra("usage: capctl list", argv[1]);
	if ((rc = client_call(o, "instance.list", NULL, &r)) != CTL_OK)
		return rc;
	if (o->json) {
		output_json(r);
		json_decref(r);
		return CTL_OK;
	}
	struct table *t = table_new(hdr, 8);
	json_array_foreach(r, i, inst) {
		char n[24], up[16], down[16], info[512];
		const char *err = json_string_value(json_object_get(inst, "error"));
		const char *to = json_string_value(json_object_get(inst, "to"));
		snprintf(n, sizeof n, "%lld", (long long)json_integer_value(json_object_get(inst, "sessions")));
		list_info(inst, err, to, info, sizeof info);
		list_tls_info(inst, info, sizeof info);
		table_add(t, json_string_value(json_object_get(inst, "name")), json_string_value(json_object_get(inst, "type")),
		          json_string_value(json_object_get(inst, "listen")), json_string_value(json_object_get(inst, "state")), n,
		          output_size(json_object_get(inst, "bytes_up"), up, sizeof up),
		          output_size(json_object_get(inst, "bytes_down"), down, sizeof down), info);
	}
	table_print(t);
	table_free(t);
	json_decref(r);
	return CTL_OK;
}

const struct cmd cmd_list = { "list", "", list_exec };

/*
 * trace: the sessions of one `capctl trace`. capctl runs the application
 * under ptrace and streams what its sockets carried over its control
 * connection; this file turns those events into sessions without sockets
 * of their own (TCP as the synthetic conversation, UDP as datagrams).
 * The instance is created by trace.start and lives exactly as long as the
 * control connection that created it.
 *
 * RPC:
 *   trace.start {command, pid, name?, capture?}  -> the instance object
 *   trace.event {sock, kind: "open", proto: "tcp"|"udp", role: "client"|"server",
 *                local, remote, pid, comm}
 *               {sock, kind: "data", dir: "send"|"recv", data: base64, pid}
 *               {sock, kind: "lost", dir: "send"|"recv", len, pid}
 *               {sock, kind: "shutdown", dir: "send"|"recv", pid}
 *               {sock, kind: "close", reason?, pid}
 * `send` is the application's; a client socket sends up (client to server),
 * an accepted one sends down.
 */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base64.h"
#include "control.h"
#include "instance.h"
#include "log.h"
#include "rpc.h"
#include "session.h"
#include "spool.h"
#include "xmalloc.h"

#define TRACE_BUCKETS 64

/* One traced socket (or UDP peer): its session, or NULL once that ended. Owned by trace_state. */
struct trace_flow {
	struct trace_flow *next;
	uint64_t sock;
	struct session *s;
	bool server;
};

/* Runtime state of a trace instance (inst->proto_state); freed by trace_stop. */
struct trace_state {
	struct trace_state *next;      /* trace_states */
	struct instance *inst;
	struct ctl_conn *conn;         /* the capctl that feeds it; NULL once it closed */
	struct trace_flow *flows[TRACE_BUCKETS];
};

/* Parsed parameters (inst->cfg); freed by trace_free. */
struct trace_cfg {
	char *command;
	long long pid;
};

static struct trace_state *trace_states;
static struct ctl_conn *trace_starting;  /* set while trace.start creates the instance */

static const char *const trace_keys[] = { "command", "pid", NULL };

/*
 * The command as capctl list's LISTEN column shows it: cut to fit, between
 * UTF-8 characters, since JSON cannot hold half of one ("listen" went
 * missing from capctl list when the cut fell inside an é).
 */
static void
trace_listen_str(struct instance *inst, const char *command)
{
	size_t n;

	snprintf(inst->listen_str, sizeof inst->listen_str, "%s", command);
	n = strlen(inst->listen_str);
	while (n > 0 && ((unsigned char)command[n] & 0xc0) == 0x80)
		n--;
	inst->listen_str[n] = '\0';
}

static int
trace_configure(struct instance *inst, struct params *p)
{
	struct trace_cfg *tc = xcalloc(1, sizeof *tc);
	json_t *pid = json_object_get(p->obj, "pid");
	const char *command = params_str(p, "command", NULL);

	inst->cfg = tc;
	if (trace_starting == NULL)
		return params_fail(p, NULL, "trace instances are made by `capctl trace`, not by the config or capctl add");
	if (command == NULL || *command == '\0')
		return params_fail(p, NULL, "a trace instance needs 'command'");
	if (!json_is_integer(pid) || json_integer_value(pid) <= 0)
		return params_fail(p, "pid", "a trace instance needs the traced 'pid'");
	tc->command = xstrdup(command);
	tc->pid = (long long)json_integer_value(pid);
	trace_listen_str(inst, command);
	return 0;
}

static int
trace_start(struct instance *inst, char **why)
{
	struct trace_cfg *tc = inst->cfg;
	struct trace_state *ts = xcalloc(1, sizeof *ts);

	(void)why;
	ts->inst = inst;
	ts->conn = trace_starting;
	ts->next = trace_states;
	trace_states = ts;
	inst->proto_state = ts;
	if (inst->capture) {
		char *desc = xasprintf("capd trace of pid %lld: %s", tc->pid, tc->command);
		inst->spool_iface = spool_iface_add(inst->name, desc, 101 /* LINKTYPE_RAW */, 65535, false);
		free(desc);
	}
	return 0;
}

static void trace_conn_closed_cb(void *arg);

static void
trace_stop(struct instance *inst)
{
	struct trace_state *ts = inst->proto_state, **pp;

	if (ts == NULL)
		return;
	for (pp = &trace_states; *pp; pp = &(*pp)->next)
		if (*pp == ts) {
			*pp = ts->next;
			break;
		}
	if (ts->conn)
		ctl_conn_on_close_cancel(ts->conn, trace_conn_closed_cb, ts);
	/* instance_remove closes the sessions next, with its reason; they must not point at freed flows */
	for (int b = 0; b < TRACE_BUCKETS; b++)
		for (struct trace_flow *f = ts->flows[b]; f; f = f->next)
			if (f->s)
				f->s->proto_state = NULL;
	for (int b = 0; b < TRACE_BUCKETS; b++)
		while (ts->flows[b]) {
			struct trace_flow *f = ts->flows[b];
			ts->flows[b] = f->next;
			free(f);
		}
	free(ts);
	inst->proto_state = NULL;
}

static void
trace_session_free(struct session *s)
{
	struct trace_flow *f = s->proto_state;

	if (f)
		f->s = NULL;  /* killed from capctl: later events for the socket are dropped */
}

static void
trace_free(struct instance *inst)
{
	struct trace_cfg *tc = inst->cfg;

	if (tc)
		free(tc->command);
	free(tc);
}

static void
trace_describe(struct instance *inst, json_t *o)
{
	struct trace_cfg *tc = inst->cfg;

	json_object_set_new(o, "command", json_string(tc->command));
	json_object_set_new(o, "pid", json_integer((json_int_t)tc->pid));
}

const struct proto proto_trace = {
	.name = "trace",
	.keys = trace_keys,
	.listens = false,
	.configure = trace_configure,
	.start = trace_start,
	.stop = trace_stop,
	.session_free = trace_session_free,
	.free = trace_free,
	.describe = trace_describe,
};

/* ---- RPC ---- */

/* capctl went away: the traced program ended or capctl was killed. */
static void
trace_conn_closed_cb(void *arg)
{
	struct trace_state *ts = arg;

	ts->conn = NULL;  /* the connection is calling us: do not cancel on it */
	instance_remove(ts->inst, "trace ended");
}

static struct trace_state *
trace_state_of(struct ctl_conn *c)
{
	for (struct trace_state *ts = trace_states; ts; ts = ts->next)
		if (ts->conn == c)
			return ts;
	return NULL;
}

static json_t *
rpc_trace_start(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	json_t *pid = json_object_get(params, "pid"), *p;
	const char *command = json_string_value(json_object_get(params, "command"));
	const char *name = json_string_value(json_object_get(params, "name"));
	struct trace_state *ts;
	struct instance *inst;
	char *why = NULL;

	if (!json_is_integer(pid) || json_integer_value(pid) <= 0 || command == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "trace.start needs \"command\" and \"pid\"");
	if ((ts = trace_state_of(c)) != NULL)
		return rpc_fail(err, RPC_E_FAILED, "this connection traces into %s already", ts->inst->name);
	p = json_object();
	json_object_set_new(p, "type", json_string("trace"));
	json_object_set(p, "command", json_object_get(params, "command"));
	json_object_set(p, "pid", pid);
	if (name)
		json_object_set_new(p, "name", json_string(name));
	else
		json_object_set_new(p, "name", json_sprintf("trace-%lld", (long long)json_integer_value(pid)));
	if (json_object_get(params, "capture"))
		json_object_set(p, "capture", json_object_get(params, "capture"));
	trace_starting = c;
	inst = instance_add(p, false, &why);
	trace_starting = NULL;
	json_decref(p);
	if (inst == NULL) {
		json_t *r = rpc_fail(err, RPC_E_FAILED, "%s", why);
		free(why);
		return r;
	}
	ctl_conn_on_close(c, trace_conn_closed_cb, inst->proto_state);
	return instance_json(inst);
}

static struct trace_flow *
trace_flow_find(struct trace_state *ts, uint64_t sock)
{
	for (struct trace_flow *f = ts->flows[sock % TRACE_BUCKETS]; f; f = f->next)
		if (f->sock == sock)
			return f;
	return NULL;
}

static json_t *
trace_event_open(struct trace_state *ts, uint64_t sock, json_t *params, struct rpc_err *err)
{
	struct instance *inst = ts->inst;
	const char *proto = json_string_value(json_object_get(params, "proto"));
	const char *role = json_string_value(json_object_get(params, "role"));
	const char *local = json_string_value(json_object_get(params, "local"));
	const char *remote = json_string_value(json_object_get(params, "remote"));
	const char *comm = json_string_value(json_object_get(params, "comm"));
	json_int_t pid = json_integer_value(json_object_get(params, "pid"));
	struct sockaddr_storage l, r;
	socklen_t len;
	struct trace_flow *f;
	struct session *s;
	char *why = NULL, comment[200];
	bool tcp, server, capture;

	if (proto == NULL || (strcmp(proto, "tcp") && strcmp(proto, "udp")) || local == NULL || remote == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "trace.event open needs proto, local and remote");
	if (addr_parse_listen(local, &l, &len, &why) < 0 || addr_parse_listen(remote, &r, &len, &why) < 0) {
		json_t *res = rpc_fail(err, RPC_E_PARAMS, "trace.event: %s", why);
		free(why);
		return res;
	}
	if (l.ss_family != r.ss_family)
		return rpc_fail(err, RPC_E_PARAMS, "trace.event: %s and %s are not of one address family", local, remote);
	if (trace_flow_find(ts, sock))
		return rpc_fail(err, RPC_E_FAILED, "socket %llu is open already", (unsigned long long)sock);
	tcp = !strcmp(proto, "tcp");
	server = role && !strcmp(role, "server");
	/* the session runs from client to server: for an accepted socket the peer is the client */
	s = session_new_datagram(inst, tcp ? "tcp" : "udp", (struct sockaddr *)(server ? &r : &l),
	                         (struct sockaddr *)(server ? &l : &r));
	s->datagram = !tcp;
	s->note = xasprintf("%s[%lld]", comm ? comm : "?", (long long)pid);
	f = xcalloc(1, sizeof *f);
	f->sock = sock;
	f->s = s;
	f->server = server;
	f->next = ts->flows[sock % TRACE_BUCKETS];
	ts->flows[sock % TRACE_BUCKETS] = f;
	s->proto_state = f;
	/* open the capture flow here so its comment names the process, not just the instance */
	capture = inst->capture;
	inst->capture = false;
	session_opened(s);
	inst->capture = capture;
	if (capture && inst->spool_iface >= 0) {
		snprintf(comment, sizeof comment, "trace/%s %s[%lld]", inst->name, comm ? comm : "?", (long long)pid);
		s->flow = spool_flow_open(inst->spool_iface, s->id, tcp ? IPPROTO_TCP : IPPROTO_UDP,
		                          (struct sockaddr *)&s->client_addr, (struct sockaddr *)&s->target_addr, comment);
	}
	return json_pack("{s:I}", "session", (json_int_t)s->id);
}

static json_t *
rpc_trace_event(struct ctl_conn *c, json_t *params, struct rpc_err *err)
{
	struct trace_state *ts = trace_state_of(c);
	json_t *jsock = json_object_get(params, "sock");
	const char *kind = json_string_value(json_object_get(params, "kind"));
	const char *dirs = json_string_value(json_object_get(params, "dir"));
	struct trace_flow *f;
	uint64_t sock;
	enum dir d;

	if (ts == NULL)
		return rpc_fail(err, RPC_E_FAILED, "no trace on this connection (call trace.start first)");
	if (!json_is_integer(jsock) || kind == NULL)
		return rpc_fail(err, RPC_E_PARAMS, "trace.event needs \"sock\" and \"kind\"");
	sock = (uint64_t)json_integer_value(jsock);
	if (!strcmp(kind, "open"))
		return trace_event_open(ts, sock, params, err);
	if ((f = trace_flow_find(ts, sock)) == NULL)
		return rpc_fail(err, RPC_E_NOT_FOUND, "no traced socket %llu", (unsigned long long)sock);
	if (f->s == NULL)
		return json_object();  /* its session was killed: drop quietly */
	/* the application's send is client-to-server unless it accepted the connection */
	d = (dirs && !strcmp(dirs, "recv")) != f->server ? DIR_DOWN : DIR_UP;
	if (!strcmp(kind, "data")) {
		const char *b64 = json_string_value(json_object_get(params, "data"));
		size_t len = json_string_length(json_object_get(params, "data"));
		uint8_t *p;
		long n;
		if (dirs == NULL || b64 == NULL)
			return rpc_fail(err, RPC_E_PARAMS, "trace.event data needs \"dir\" and \"data\"");
		p = xmalloc(len / 4 * 3 + 1);
		if ((n = base64_decode(p, b64, len)) < 0) {
			free(p);
			return rpc_fail(err, RPC_E_PARAMS, "trace.event: data is not base64");
		}
		session_data(f->s, d, p, (size_t)n);
		free(p);
		return json_object();
	}
	if (!strcmp(kind, "lost")) {
		json_t *jlen = json_object_get(params, "len");
		if (dirs == NULL || !json_is_integer(jlen) || json_integer_value(jlen) <= 0)
			return rpc_fail(err, RPC_E_PARAMS, "trace.event lost needs \"dir\" and a positive \"len\"");
		/* counted as crossed (they did), a gap in the capture */
		session_bytes(f->s, d, (size_t)json_integer_value(jlen));
		if (f->s->flow)
			spool_flow_lost(f->s->flow, d, (size_t)json_integer_value(jlen));
		return json_object();
	}
	if (!strcmp(kind, "shutdown")) {
		if (dirs == NULL)
			return rpc_fail(err, RPC_E_PARAMS, "trace.event shutdown needs \"dir\"");
		session_shutdown_dir(f->s, d);
		return json_object();
	}
	if (!strcmp(kind, "close")) {
		const char *reason = json_string_value(json_object_get(params, "reason"));
		struct trace_flow **pp;
		session_close(f->s, reason ? reason : "closed");  /* trace_session_free clears f->s */
		for (pp = &ts->flows[sock % TRACE_BUCKETS]; *pp; pp = &(*pp)->next)
			if (*pp == f) {
				*pp = f->next;
				break;
			}
		free(f);
		return json_object();
	}
	return rpc_fail(err, RPC_E_PARAMS, "unknown trace.event kind '%s'", kind);
}

const struct rpc_method rpc_trace_methods[] = {
	{ "trace.start", rpc_trace_start, NULL },
	{ "trace.event", rpc_trace_event, NULL },
	{ NULL, NULL, NULL },
};

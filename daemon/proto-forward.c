/*
 * forward: every connection to `listen` is relayed to the fixed `to`.
 * No handshake: connect upstream at once, then hand both sockets to the relay.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "capd.h"
#include "instance.h"
#include "log.h"
#include "relay.h"
#include "session.h"
#include "tls.h"
#include "udp-relay.h"
#include "xmalloc.h"

/* the most a client's first bytes are read ahead of a pending upstream connect */
#define FORWARD_EARLY 4096

/* Owned by the instance; freed by forward_free. */
struct forward_cfg {
	struct hostport to;
	bool udp;
	struct tls_cfg *tls;  /* tls* keys; tls_cfg_free'd with the instance */
};

static const char *const forward_keys[] = {
	"to", "udp", "tls", "tls_verify", "tls_capture", "tls_passthrough", "tls_auto_passthrough", "tls_timeout",
	"tls_client_cert", NULL,
};

/* The session ends before a relay: its connect failed, or the client closed or
 * reset while it was pending. The capture has what the client sent (maybe
 * nothing) and the close, toward the listening address, as a refusal's. Not
 * with tls = yes: what capd read is a TLS hello, and capd's answer its alert. */
static void
forward_hs_ended(struct session *s)
{
	if (s->tls == NULL)
		session_refused_heard(s, buf_head(&s->hs_in), buf_used(&s->hs_in));
}

static int
forward_configure(struct instance *inst, struct params *p)
{
	struct forward_cfg *fc = xcalloc(1, sizeof *fc);
	const char *to = params_str(p, "to", NULL);
	char *why = NULL;

	inst->cfg = fc;
	if (to == NULL)
		return params_fail(p, NULL, "a forward instance needs 'to = host:port'");
	if (hostport_parse(to, &fc->to, &why) < 0) {
		params_fail(p, "to", "%s", why);
		free(why);
		return -1;
	}
	if (params_bool(p, "udp", false, &fc->udp) < 0)
		return -1;
	return tls_configure(inst, p, &fc->tls);
}

/*
 * The client while the upstream connect is pending: a reset ends the session
 * at once ("client reset", as in the relay) instead of a connect that runs on
 * to connect_timeout, or succeeds, for nobody. What the client sends first is
 * read into hs_in, which relay_start hands to the relay (captured there as
 * any read), so that the watcher still sees a reset behind it; past
 * FORWARD_EARLY bytes the client waits for the relay (back-pressure). A FIN
 * is kept (client_eof): a client may send and half-close before the server
 * is there.
 */
static void
forward_client_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct session *s = w->data;
	uint8_t tmp[FORWARD_EARLY];
	size_t room = FORWARD_EARLY - buf_used(&s->hs_in);
	ssize_t n = recv(s->client.fd, tmp, room, 0);

	(void)revents;
	if (n > 0) {
		buf_append(&s->hs_in, tmp, (size_t)n);
		if ((size_t)n == room)
			ev_io_stop(loop, w);
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n < 0) {
		session_reset_by_client(s, errno == ECONNRESET ? "client reset" : "client error while connecting");
		return;
	}
	s->client_eof = true;
	ev_io_stop(loop, w);
}

static void
forward_accepted(struct session *s)
{
	struct forward_cfg *fc = s->inst->cfg;

	/* tls = yes: the ClientHello first, the server only for a client served */
	if (tls_hello_first(s, fc->tls, fc->to.host, fc->to.port))
		return;
	session_connect(s, fc->to.host, fc->to.port);
	/* a connect that finished inside connect(2) (loopback) is relayed in
	 * this loop pass: only a pending one (or a name lookup) watches the
	 * client; relay_start takes the watcher over on the same fd */
	if (s->state == SESSION_HANDSHAKE && !s->up_established) {
		ev_set_cb(&s->client.rio, forward_client_cb);
		ev_io_start(capd_loop, &s->client.rio);
	}
}

static inline struct forward_cfg *
fc_of(struct session *s)
{
	return s->inst->cfg;
}

static void
forward_connected(struct session *s, int err)
{
	ev_io_stop(capd_loop, &s->client.rio);  /* forward_client_cb's, if it still runs */
	if (s->tls) {
		tls_connected(s, err);  /* after the ClientHello (tls_hello_first) */
		return;
	}
	if (err != 0) {
		/* the client sees its connection closed: a forwarder has no error reply */
		session_close(s, s->why_connect ? s->why_connect : "connect failed");
		return;
	}
	tls_intercept_start(s, fc_of(s)->tls, NULL);  /* relay_start() unless tls = yes|auto */
}

/* udp = yes: the datagram relay on the same address and port */
static int
forward_start(struct instance *inst, char **why)
{
	struct forward_cfg *fc = inst->cfg;

	if (fc->udp && (inst->proto_state = udp_relay_start(inst, (struct sockaddr *)&inst->listen, false, &fc->to,
	                                                    false, why)) == NULL)
		return -1;
	return 0;
}

static void
forward_stop(struct instance *inst)
{
	udp_relay_stop(inst->proto_state);
	inst->proto_state = NULL;
}

static void
forward_session_free(struct session *s)
{
	if (s->datagram)
		udp_relay_session_free(s);
}

static bool
forward_idle(struct session *s)
{
	return s->datagram && udp_relay_session_idle(s);
}

static void
forward_free(struct instance *inst)
{
	struct forward_cfg *fc = inst->cfg;

	if (fc)
		tls_cfg_free(fc->tls);
	free(inst->cfg);
}

static void
forward_describe(struct instance *inst, json_t *o)
{
	struct forward_cfg *fc = inst->cfg;
	char to[HOST_MAX + 16];

	if (strchr(fc->to.host, ':'))
		snprintf(to, sizeof to, "[%s]:%u", fc->to.host, fc->to.port);
	else
		snprintf(to, sizeof to, "%s:%u", fc->to.host, fc->to.port);
	json_object_set_new(o, "to", json_string(to));
	json_object_set_new(o, "udp", json_boolean(fc->udp));
	tls_describe(fc->tls, o);
}

const struct proto proto_forward = {
	.name = "forward",
	.keys = forward_keys,
	.listens = true,
	.sharded = true,
	.configure = forward_configure,
	.accepted = forward_accepted,
	.connected = forward_connected,
	.hs_ended = forward_hs_ended,
	.start = forward_start,
	.stop = forward_stop,
	.session_free = forward_session_free,
	.idle = forward_idle,
	.free = forward_free,
	.describe = forward_describe,
};

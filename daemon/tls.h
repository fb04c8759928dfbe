/*
 * TLS interception: the per-instance `tls*` options, the handshakes that run
 * between a proxy's own handshake and the relay, and the two I/O helpers the
 * relay calls for a side that speaks TLS.
 *
 * Wiring a proxy type (forward does exactly this):
 *
 *     struct xxx_cfg { ...; struct tls_cfg *tls; };
 *     configure:  if (tls_configure(inst, p, &cfg->tls) < 0) return -1;
 *     connected:  tls_intercept_start(s, cfg->tls, NULL);  (instead of relay_start)
 *     describe:   tls_describe(cfg->tls, obj);
 *     free:       tls_cfg_free(cfg->tls);
 *
 * and list "tls", "tls_verify", "tls_capture", "tls_passthrough",
 * "tls_auto_passthrough", "tls_timeout", "tls_client_cert" in the type's keys. tls_intercept_start() has
 * relay_start()'s contract (both sockets connected, hs_in leftovers are the
 * client's next bytes, hs_out is flushed to the client first) and ends in
 * relay_start() itself, or closes the session with a reason.
 */
#ifndef CAPD_TLS_H
#define CAPD_TLS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "params.h"
#include "spool-synth.h"

struct instance;
struct session;
struct capd_settings;

enum tls_mode { TLS_NO, TLS_AUTO, TLS_YES };

struct tls_host;  /* a host whose clients rejected the forged certificate */
struct tls_ident; /* a client certificate and its key (tls_client_cert) */

/* An instance's TLS options and its auto-passthrough memory.
 * Owned by the instance's protocol config; tls_cfg_free() frees it. */
struct tls_cfg {
	enum tls_mode mode;
	bool verify;              /* tls_verify: check the upstream against the system store */
	bool capture_both;        /* tls_capture = both: ciphertext legs + key log too */
	bool auto_passthrough;    /* tls_auto_passthrough */
	double timeout;           /* tls_timeout: both handshakes together, seconds */
	bool transparent;         /* forward: the client reached capd's address as the server's */
	bool forges;              /* some client may get a forged certificate: needs the CA */
	char **passthrough;       /* host or *.suffix patterns, NULL-terminated */
	struct tls_host *hosts;   /* rejection counts; passthrough at TLS_REJECT_LIMIT */
	char *client_cert;        /* tls_client_cert as given (a file or a folder), or NULL */
	bool client_cert_dir;     /* it is a folder: NAME.pem by the server's name */
	struct tls_ident *idents; /* what it holds, read at configure time */
	size_t nidents;
};

#define TLS_REJECT_LIMIT 2

/* Parses the tls* keys of p into *out (always set, also on error; TLS_NO when absent). */
int tls_configure(struct instance *inst, struct params *p, struct tls_cfg **out);
void tls_cfg_free(struct tls_cfg *cfg);
/* Adds "tls", "tls_capture", "tls_passthrough_auto" (hosts now passed through) ... */
void tls_describe(const struct tls_cfg *cfg, json_t *obj);

/* Given the client's first plaintext read of an intercepted session, once
 * (the bytes stay the relay's: it looks, it does not take). */
typedef void (*tls_first_fn)(struct session *s, const uint8_t *p, size_t n);

/*
 * Both of s's sockets are connected: with cfg NULL or tls = no this is
 * relay_start(s). Otherwise peek at the client's first bytes (auto: anything
 * but a ClientHello is relayed as is), read the SNI and ALPN offer, connect
 * upstream with TLS, forge the certificate, finish the client's handshake,
 * then relay the plaintext. Passthrough hosts are relayed untouched. first,
 * when not NULL, sees the client's first plaintext read (a note of what was
 * asked inside the tunnel), and nothing after it.
 */
void tls_intercept_start(struct session *s, struct tls_cfg *cfg, tls_first_fn first);

/*
 * For a forwarder (its client speaks first, no reply precedes TLS): call
 * from accepted instead of session_connect(host, port). With tls = yes it
 * reads the ClientHello before the server is connected, so a client capd
 * refuses (not TLS, a TLS version it does not take) never costs the server
 * a connection; for the rest it calls session_connect itself, and
 * proto->connected then calls tls_connected(s, err) (s->tls is set) instead
 * of tls_intercept_start. false (nothing done: connect as usual) for
 * tls = no, and for auto, where a server may speak first. host is borrowed
 * until the connect starts.
 */
bool tls_hello_first(struct session *s, struct tls_cfg *cfg, const char *host, uint16_t port);
void tls_connected(struct session *s, int err);

/*
 * For a proxy that must read the client's plaintext before it knows the
 * upstream (reverse --tls): call tls_accept_start() from accepted. It
 * terminates the client's TLS with a certificate forged from the SNI (else the
 * address the client reached), offering HTTP/1.1 by ALPN; tls = auto leaves
 * non-TLS clients alone. Then the session's handshake reads (hs_in) and
 * session_send() carry plaintext as usual. Once connected, call
 * tls_relay_start() instead of relay_start(): TLS toward the upstream (SNI:
 * the client's; hostname check: the route's name, else the SNI), then
 * relay_start() with s->filter as set. Upstream failures close the session
 * with the reason. tls_passthrough does not apply (no upstream to pass to yet).
 */
void tls_accept_start(struct session *s, struct tls_cfg *cfg);
void tls_relay_start(struct session *s);
/* A client socket with TLS that goes on in session to (it took the fd, on
 * the same loop thread): to's client side speaks that TLS from now on, as
 * after tls_accept_start's handshake, and from's client side is plain
 * again (no I/O). Nothing for a client without TLS. */
void tls_client_move(struct session *from, struct session *to);
/* The server name the client's TLS asked for (lower case, no trailing dot),
 * or NULL: no TLS toward the client, or no usable SNI in its hello. */
const char *tls_client_sni(const struct session *s);

/* Daemon start/stop: OpenSSL contexts; a user's ca_cert/ca_key are loaded (and
 * checked) here, a CA that does not exist yet is created on first need. */
int tls_start(const struct capd_settings *st, char **why);
void tls_stop(void);
/* A reload: the key log file is closed, and opened again (keylog_file as it
 * now is, if set) at the next key line. */
void tls_keylog_reopen(void);
/* A reload: the system's trusted certificates (tls_verify) are read again if
 * their files changed since they were loaded. Main thread, shards paused. */
void tls_trust_reload(void);
/* After the config's instances started, before privileges drop: makes the CA
 * now when one of them intercepts (its files may need root to write). */
void tls_prepare(void);
/* Loads or creates the CA of capd_settings and makes the context toward
 * clients. It never makes the leaf keys (RSA 2048 takes up to a second, and
 * the caller may hold capd_lock): -1 when tls_ca_keys_ensure has not made
 * them. Only instance_prepare and tls_prepare make them, outside the lock. */
int tls_ca_ensure(char **why);
/* tls_ca_ensure while the shards run: under capd_lock. */
int tls_ca_ensure_shared(char **why);
/* An instance that intercepts is ready to: its CA is loaded (or made) and
 * the leaf keys are made. For instance_finish; -1 and *why when not. */
int tls_instance_ready(char **why);
/* The CA alone, without the leaf keys or the server context: for ca.export,
 * which runs with the shards paused (the keys would stall every session). */
int tls_ca_ensure_cert(char **why);

/* ---- for the relay: a side that speaks TLS (struct side's tls is set) ---- */

struct tls_side;

/* Like recv(): >0 plaintext bytes, 0 at close_notify or EOF (an EOF without
 * close_notify is noted on the session), -1 with errno
 * (EAGAIN: try when the fd is ready again; EPROTO: TLS error, see tls_side_why). */
ssize_t tls_side_read(struct tls_side *t, void *p, size_t n);
/* Like send(): writes as much of p as the socket takes now. */
ssize_t tls_side_write(struct tls_side *t, const void *p, size_t n);
/* close_notify, then FIN; only the FIN when the other side ended without
 * close_notify (its peer sees the same unclean end it would have seen). */
void tls_side_shutdown(struct tls_side *t);
/* Plaintext (or an EOF/error) is waiting inside the TLS layer, not in the socket. */
bool tls_side_pending(const struct tls_side *t);
const char *tls_side_why(const struct tls_side *t);
/* The session's whole close reason for the error of this side, or NULL (then
 * "<side> TLS error: tls_side_why", or the errno's): a TLS 1.3 server's late
 * refusal of capd's missing client certificate. */
const char *tls_side_fail(const struct tls_side *t);
/* A read waited for writability or a write for readability (and clears it). */
bool tls_side_crossed(struct tls_side *t);
/* The relay's close reason, with "(tls passthrough: why)" for passed-through sessions. */
const char *tls_close_reason(struct session *s, const char *reason);
/* session_end() calls this for a session that ends in its handshake, before
 * the protocol's hs_ended: with tls_capture = plain, a client TLS handshake
 * that never finished (the client's alert, bytes that are not TLS, a
 * timeout, capd's alert for an upstream that failed) goes in the capture as
 * a refusal does (session_refused_heard): what capd read from the client and
 * what it sent, in their order. */
void tls_hs_ended(struct session *s);
/* session_end() calls this before relay_stop(): how the session ends, which
 * the ciphertext legs of tls_capture = both show too. */
void tls_session_ending(struct session *s, enum synth_end how);
/* Whether s's client leg is being captured (tls_capture = both, since the
 * relay started): that flow, between the client and capd's address, holds a
 * refusal already, which the keys decrypt. */
bool tls_client_leg_captured(const struct session *s);
/* relay_stop() calls this: frees the session's TLS state (no I/O). */
void tls_session_free(struct session *s);

#endif

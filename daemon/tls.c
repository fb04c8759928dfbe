/*
 * TLS interception between a proxy's handshake and the relay.
 *
 * tls_intercept_start() takes a session whose two sockets are connected and
 * runs, without blocking:
 *
 *   flush                  the proxy's reply (SOCKS, 200 Established) goes first
 *   peek (tls = auto)      first client byte 0x16? else relay as is
 *   client hello           SSL_accept until the ClientHello callback, which
 *                          notes the SNI and ALPN offer and pauses the accept
 *                          (passthrough hosts: replay the bytes read, relay)
 *   upstream               SSL_connect with that SNI and ALPN offer, verified
 *                          against the system store when tls_verify = yes
 *   client finish          the forged certificate (subject and SANs of the
 *                          real one; an RSA twin too for a client that may
 *                          not take ECDSA, OpenSSL picks) and the server's
 *                          ALPN choice; resume the accept; then relay_start()
 *                          with both SSLs set
 *
 * Upstream failures answer the client with a handshake_failure alert (the
 * server's own no_application_protocol or unrecognized_name as it is). While
 * relaying, a side's close_notify is passed on as close_notify and a bare
 * EOF (no close_notify: maybe a truncation) as a bare FIN. Every
 * socket I/O of an SSL goes through one small BIO of ours: it serves bytes
 * the proxy already read (hs_in) first, keeps a copy of the ClientHello for
 * passthrough, and with tls_capture = both feeds the ciphertext to two more
 * capture flows (kept in order in memory until the plaintext flow exists, so
 * the session's first stream in the file is the plaintext one).
 *
 * tls_accept_start()/tls_relay_start() split the same steps for reverse:
 * the client's handshake first (certificate from the SNI), the proxy's own
 * plaintext handshake through it, then the upstream's TLS and the relay.
 * tls_client_move() hands that client side on to the session its connection
 * moves to (http_handoff), which then starts at tls_relay_start().
 */
#include "tls.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <linux/sockios.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "capd.h"
#include "instance.h"
#include "log.h"
#include "relay.h"
#include "session.h"
#include "spool.h"
#include "tls-ca.h"
#include "tls-hello.h"
#include "xmalloc.h"

#define TLS_HOSTS_MAX 1024      /* hosts remembered for auto-passthrough, per instance */
#define TLS_RESUME_SLOTS 1024   /* upstream sessions kept for resumption */
#define TLS_RESUME_KEY 680      /* "client identity|verify|sni|target name|address" */
#define TLS_VERDICT_WAIT 2.0    /* seconds a TLS 1.3 server that asked for a certificate may stay silent */
#define TLS_KEEP_MAX (64 * 1024) /* bytes of a client's handshake kept for its capture (tls_capture = plain) */
#define TLS_KEEP_FIRST 8192     /* what most take (a ClientHello, capd's flight with its chain, the client's reply) */

enum tls_state {
	TLS_ST_FLUSH, TLS_ST_PEEK, TLS_ST_HELLO, TLS_ST_CONNECT, TLS_ST_UPSTREAM, TLS_ST_VERDICT, TLS_ST_FINISH,
	TLS_ST_ACCEPTED, TLS_ST_OPEN, TLS_ST_PASS
};
enum tls_leg { TLS_LEG_CLIENT, TLS_LEG_UPSTREAM };

/* A host whose clients rejected the forged certificate; owned by its tls_cfg. */
struct tls_host {
	struct tls_host *next;
	unsigned rejects;
	char name[];
};

/* A client certificate capd shows the server (tls_client_cert); owned by its tls_cfg. */
struct tls_ident {
	char *name;             /* the folder form: the server name of NAME.pem (lower case); NULL for a file */
	char *path;             /* the file it came from */
	X509 *cert;
	EVP_PKEY *key;
	STACK_OF(X509) *chain;  /* the certificates after the first */
	char id[17];            /* hex of its SHA-256 fingerprint's start: scopes resumption */
};

/* One TLS side of a session; embedded in its tls_session. */
struct tls_side {
	struct tls_session *ts;
	struct side *sd;        /* the session's socket side */
	SSL *ssl;
	enum tls_leg leg;
	enum dir rdir;          /* direction of the bytes read from this side */
	struct buf prefix;      /* bytes the proxy already read from the socket: served first */
	struct buf replay;      /* what was read while tee is set (the ClientHello) */
	bool tee;
	bool sock_eof;          /* the socket gave EOF */
	bool eof;               /* SSL_read saw close_notify or EOF, not yet reported */
	bool close_notify;      /* the peer's close_notify arrived */
	bool unclean;           /* the end was a bare EOF, no close_notify: pass on a bare FIN */
	int err;                /* errno to report once the bytes before it are taken */
	bool crossed;           /* a read wanted writability or a write readability */
	bool more;              /* records of the same write follow: send them with MSG_MORE */
	char why[320];          /* the TLS error behind EPROTO; with whole, the close reason */
	bool whole;             /* why is the session's whole close reason (tls_side_fail) */
};

/* Interception state of one session: s->tls, freed by tls_session_free via relay_stop. */
struct tls_session {
	struct session *s;
	struct tls_cfg *cfg;        /* borrowed from the instance */
	enum tls_state st;
	struct tls_side c, u;
	ev_timer timer;
	char sni[256];
	char host[HOST_MAX + 8];    /* what passthrough matches: SNI, else the target's name or IP */
	uint8_t alpn_offer[256];    /* the client's ALPN list (wire format, no length prefix) */
	size_t alpn_offer_len;
	uint8_t alpn_sel[256];      /* the server's choice */
	size_t alpn_sel_len;
	bool want_rsa;              /* the client may not take ECDSA: offer the RSA certificate too */
	double timer_due;           /* when the timer runs out by the clock (ev_time) */
	int excused;                /* times it ran out late, capd held up, and ran again */
	bool cert_asked;            /* the server asked for a client certificate (capd has none to give) */
	const struct tls_ident *ident;  /* the client certificate for this server (tls_client_cert), or NULL */
	bool ident_sent;            /* the server asked for it and capd presented it */
	bool resume_ident_sent;     /* so did the handshake of the session offered for resumption */
	bool resume_cert_asked;     /* so did the handshake of the session offered for resumption */
	bool ticket;                /* the server sent a session ticket (tls_new_session_cb) */
	ev_timer verdict;           /* TLS_ST_VERDICT: how long the server may stay silent */
	double verdict_since;       /* when the upstream handshake was done (ev_now) */
	bool verdict_open;          /* silence was taken for consent (or a certificate sent): nothing came from the server since */
	unsigned hello_version;     /* the newest TLS version the client offers */
	char *fail;                 /* why the handshake cannot go on (mostly the upstream's failure); the client gets an alert */
	int fail_alert;             /* that alert: 0 for handshake_failure */
	char *no_ca;                /* why nothing can be forged (tls_begin); NULL when it can */
	char resume_key[TLS_RESUME_KEY];
	bool capture;               /* tls_capture = both and the instance captures */
	bool keep;                  /* tls_capture = plain and the instance captures: the client
	                             * leg's handshake is kept in log (TLS_KEEP_MAX at most) until
	                             * it is done, for a failed one's capture (tls_hs_ended) */
	bool raw_open;              /* the ciphertext flows exist: bytes go straight to them */
	enum synth_end end;         /* how the session ended: the legs end the same way */
	struct buf log;             /* ciphertext in order until then: leg, dir, len32, bytes */
	struct spool_flow *raw[2];  /* per tls_leg */
	bool accept_only;           /* tls_accept_start: the upstream comes later (tls_relay_start) */
	const char *connect_host;   /* tls_hello_first: connect here once the hello is in (the instance's) */
	uint16_t connect_port;
	const char *pass;           /* TLS_ST_PASS: why the bytes pass untouched (static text) */
	bool summed_up;             /* the note has its version, SNI and ALPN (tls_session_summary) */
	tls_first_fn first_read;    /* takes the client's first plaintext read, then is cleared; or NULL */
	void (*hs_rcb)(struct ev_loop *, ev_io *, int);  /* the session's handshake callbacks, restored after */
	void (*hs_wcb)(struct ev_loop *, ev_io *, int);
};

/* An upstream TLS session kept for resumption. */
struct tls_resume {
	char key[TLS_RESUME_KEY];
	SSL_SESSION *sess;
	bool cert_asked;        /* its handshake asked for a client certificate */
	bool ident_sent;        /* capd presented its tls_client_cert in it */
};

static SSL_CTX *tls_srv_ctx, *tls_cli_verify, *tls_cli_noverify;
static SSL_CTX *tls_srv_bare;  /* tls_bare_ctx: made at the first session that cannot intercept */
static BIO_METHOD *tls_bio_meth;
static struct tls_resume tls_resume[TLS_RESUME_SLOTS];
static int tls_keylog_fd = -1;
static bool tls_keylog_on;    /* the contexts have the key log callback */
static unsigned tls_cfgs_on;  /* configs that forge (tls_cfg.forges), for tls_prepare */
static char *tls_keylog_path;
static unsigned long tls_keylog_lost;  /* lines that could not be written since the last that could */

static void tls_io_cb(struct ev_loop *loop, ev_io *w, int revents);
static void tls_session_note(struct session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tls_session_summary(struct tls_session *ts, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tls_client_step(struct tls_session *ts);
static void tls_upstream_begin(struct tls_session *ts);
static void tls_connect(struct tls_session *ts);
static void tls_upstream_step(struct tls_session *ts);
static void tls_upstream_failed(struct tls_session *ts, const char *why);
static void tls_upstream_verdict(struct tls_session *ts);
static void tls_accept_hello(struct tls_session *ts);
static void tls_accepted(struct tls_session *ts);
static void tls_connect_failed(struct tls_session *ts, const char *why);

/* ---- configuration ---- */

static int
tls_pattern_ok(const char *p)
{
	if (!strcmp(p, "*"))
		return 1;
	if (!strncmp(p, "*.", 2))
		return hostname_valid(p + 2);
	return hostname_valid(p) || addr_is_ip_literal(p);
}

/*
 * A tls_passthrough entry or a host as they are compared: an IP address (an
 * IPv6 one also in brackets, as a URL writes it) in inet_ntop's spelling,
 * which the target's address is written in ("0:0::1" is "::1"), an
 * IPv4-mapped one as the IPv4 address a connect to it reaches; anything
 * else as it is.
 */
static void
tls_pattern_canon(const char *w, char *out, size_t n)
{
	struct sockaddr_storage ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
	size_t wl = strlen(w);
	socklen_t len;

	snprintf(out, n, "%s", w);
	if (wl > 2 && wl - 2 < n && w[0] == '[' && w[wl - 1] == ']') {
		memcpy(out, w + 1, wl - 2);
		out[wl - 2] = '\0';
		if (addr_from_literal(out, 1, &ss, &len) < 0 || ss.ss_family != AF_INET6) {
			snprintf(out, n, "%s", w);  /* no IPv6 address: refused as it is */
			return;
		}
	}
	if (strchr(out, '%') != NULL || addr_from_literal(out, 1, &ss, &len) < 0)
		return;  /* a name, or a zoned address, kept as written */
	if (ss.ss_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
		struct sockaddr_in v4 = { .sin_family = AF_INET };
		memcpy(&v4.sin_addr, &sin6->sin6_addr.s6_addr[12], 4);
		memcpy(&ss, &v4, sizeof v4);
	}
	addr_format_ip((struct sockaddr *)&ss, out, n);
}

/* ---- tls_client_cert: the client certificates capd shows servers ---- */

/* A PEM password callback: capd has no passphrase to give, so an encrypted
 * key fails at once (OpenSSL's default would ask on the terminal). */
static int
tls_ident_nopass_cb(char *buf, int size, int rwflag, void *u)
{
	(void)buf; (void)size; (void)rwflag;
	*(bool *)u = true;
	return -1;
}

static void
tls_ident_free(struct tls_ident *id)
{
	free(id->name);
	free(id->path);
	X509_free(id->cert);
	EVP_PKEY_free(id->key);
	sk_X509_pop_free(id->chain, X509_free);
}

/*
 * Reads path: the certificate first, then the chain, and the private key,
 * unencrypted, anywhere in the file (mitmproxy's client_certs file). 0, or
 * -1 with the reason in why.
 */
static int
tls_ident_read(struct tls_ident *id, struct params *p, const char *path, char *why, size_t n)
{
	char *data;
	size_t len;
	BIO *b;
	X509 *x;
	bool asked = false;
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned mdlen = 0;

	memset(id, 0, sizeof *id);
	/* read whole, fingerprinted (params_file_read): a reload restarts the
	 * instance when the file changed, as when its key did */
	if (params_file_read(p, path, &data, &len) < 0) {
		snprintf(why, n, "cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	b = BIO_new_mem_buf(data, (int)len);
	if (b == NULL)
		fatalx("BIO_new_mem_buf failed");
	id->path = xstrdup(path);
	id->chain = sk_X509_new_null();
	while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
		if (id->cert == NULL)
			id->cert = x;
		else if (id->chain == NULL || !sk_X509_push(id->chain, x))
			X509_free(x);
	}
	ERR_clear_error();  /* the end of the file */
	if (id->cert == NULL) {
		snprintf(why, n, "%s holds no PEM certificate", path);
		goto fail;
	}
	(void)BIO_reset(b);
	id->key = PEM_read_bio_PrivateKey(b, NULL, tls_ident_nopass_cb, &asked);
	ERR_clear_error();
	if (id->key == NULL) {
		if (asked)
			snprintf(why, n, "the private key in %s is encrypted (capd takes an unencrypted key)", path);
		else
			snprintf(why, n, "%s holds no PEM private key (the certificate's key goes in the same file)", path);
		goto fail;
	}
	if (X509_check_private_key(id->cert, id->key) != 1) {
		ERR_clear_error();
		snprintf(why, n, "the private key in %s does not match its (first) certificate", path);
		goto fail;
	}
	if (X509_digest(id->cert, EVP_sha256(), md, &mdlen) != 1 || mdlen < 8) {
		ERR_clear_error();
		snprintf(why, n, "cannot take the fingerprint of the certificate in %s", path);
		goto fail;
	}
	for (unsigned i = 0; i < 8; i++)
		snprintf(id->id + 2 * i, 3, "%02x", md[i]);
	BIO_free(b);
	params_file_free(data, len);
	return 0;
fail:
	BIO_free(b);
	params_file_free(data, len);
	tls_ident_free(id);
	memset(id, 0, sizeof *id);
	return -1;
}

static int
tls_ident_cmp(const void *a, const void *b)
{
	return strcmp(((const struct tls_ident *)a)->name, ((const struct tls_ident *)b)->name);
}

/* The folder form: every NAME.pem in it, NAME the server's name. */
static int
tls_idents_dir(struct tls_cfg *cfg, struct params *p, const char *dir, char *why, size_t n)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	size_t cap = 0;

	if (d == NULL) {
		snprintf(why, n, "cannot read the folder %s: %s", dir, strerror(errno));
		return -1;
	}
	while ((e = readdir(d)) != NULL) {
		size_t len = strlen(e->d_name);
		struct tls_ident id;
		char *path;

		if (e->d_name[0] == '.' || len <= 4 || strcmp(e->d_name + len - 4, ".pem") != 0)
			continue;
		path = xasprintf("%s/%s", dir, e->d_name);
		if (tls_ident_read(&id, p, path, why, n) < 0) {
			free(path);
			closedir(d);
			return -1;
		}
		free(path);
		id.name = xstrndup(e->d_name, len - 4);
		for (char *c = id.name; *c; c++)
			*c = (char)tolower((unsigned char)*c);
		if (cfg->nidents == cap) {
			cap = cap ? 2 * cap : 8;
			cfg->idents = xrealloc(cfg->idents, cap * sizeof *cfg->idents);
		}
		cfg->idents[cfg->nidents++] = id;
	}
	closedir(d);
	if (cfg->nidents > 1)
		qsort(cfg->idents, cfg->nidents, sizeof *cfg->idents, tls_ident_cmp);
	for (size_t i = 1; i < cfg->nidents; i++)
		if (!strcmp(cfg->idents[i - 1].name, cfg->idents[i].name)) {
			snprintf(why, n, "%s and %s name the same server", cfg->idents[i - 1].path,
			         cfg->idents[i].path);
			return -1;
		}
	return 0;
}

/* tls_client_cert: read (and checked) now, so that `capd -t` and a reload
 * refuse a bad file, and no session reads a file. */
static int
tls_client_cert_load(struct tls_cfg *cfg, struct params *p)
{
	const char *path = params_str(p, "tls_client_cert", NULL);
	struct stat st;
	char why[PATH_MAX + 200];

	if (path == NULL)
		return p->why ? -1 : 0;
	cfg->client_cert = xstrdup(path);
	if (stat(path, &st) < 0)
		return params_fail(p, "tls_client_cert", "tls_client_cert: cannot read %s: %s", path, strerror(errno));
	cfg->client_cert_dir = S_ISDIR(st.st_mode);
	if (cfg->client_cert_dir) {
		if (tls_idents_dir(cfg, p, path, why, sizeof why) < 0)
			return params_fail(p, "tls_client_cert", "tls_client_cert: %s", why);
		return 0;
	}
	cfg->idents = xcalloc(1, sizeof *cfg->idents);
	if (tls_ident_read(&cfg->idents[0], p, path, why, sizeof why) < 0)
		return params_fail(p, "tls_client_cert", "tls_client_cert: %s", why);
	cfg->nidents = 1;
	return 0;
}

/* The client certificate for the server name (NULL: none): the file's for
 * every server, or the folder's NAME.pem, as mitmproxy picks them. */
static const struct tls_ident *
tls_ident_for(const struct tls_cfg *cfg, const char *name)
{
	struct tls_ident key;
	char low[HOST_MAX + 1];

	if (!cfg->client_cert_dir)
		return cfg->nidents ? &cfg->idents[0] : NULL;
	if (name == NULL || !name[0] || cfg->nidents == 0)
		return NULL;
	snprintf(low, sizeof low, "%s", name);
	for (char *c = low; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	key.name = low;
	return bsearch(&key, cfg->idents, cfg->nidents, sizeof *cfg->idents, tls_ident_cmp);
}

int
tls_configure(struct instance *inst, struct params *p, struct tls_cfg **out)
{
	struct tls_cfg *cfg = xcalloc(1, sizeof *cfg);
	const char *mode = params_str(p, "tls", "no");
	const char *cap = params_str(p, "tls_capture", "plain");
	json_t *pt;
	size_t n = 0;

	*out = cfg;
	/* a forwarder's client connects to capd itself; a proxy's names the target */
	cfg->transparent = inst && inst->proto && !strcmp(inst->proto->name, "forward");
	if (mode == NULL || cap == NULL)
		return -1;
	if (!strcmp(mode, "auto"))
		cfg->mode = TLS_AUTO;
	else if (!strcmp(mode, "yes") || !strcmp(mode, "true") || !strcmp(mode, "1"))
		cfg->mode = TLS_YES;
	else if (!strcmp(mode, "no") || !strcmp(mode, "false") || !strcmp(mode, "0"))
		cfg->mode = TLS_NO;
	else
		return params_fail(p, "tls", "'tls' must be yes, no or auto, not '%s'", mode);
	if (cfg->mode == TLS_NO) {
		/* what only interception reads: taken silently, it would seem to work */
		static const char *const only_tls[] = {
			"tls_verify", "tls_capture", "tls_passthrough", "tls_auto_passthrough", "tls_timeout",
			"tls_client_cert",
		};
		for (size_t i = 0; i < sizeof only_tls / sizeof *only_tls; i++) {
			json_t *v = json_object_get(p->obj, only_tls[i]);
			if (v != NULL && !json_is_null(v))
				return params_fail(p, only_tls[i], "'%s' applies only with tls = yes or auto", only_tls[i]);
		}
	}
	if (inst && inst->proto && !strcmp(inst->proto->name, "reverse")) {
		/* reverse ends the client's TLS itself, before it knows an upstream:
		 * there is nothing to pass through, and taken silently they would seem to work */
		static const char *const no_pass[] = { "tls_passthrough", "tls_auto_passthrough" };
		for (size_t i = 0; i < sizeof no_pass / sizeof *no_pass; i++) {
			json_t *v = json_object_get(p->obj, no_pass[i]);
			if (v != NULL && !json_is_null(v))
				return params_fail(p, no_pass[i],
				                   "'%s' does not apply to reverse (it ends the client's TLS itself)",
				                   no_pass[i]);
		}
	}
	if (!strcmp(cap, "plain"))
		cfg->capture_both = false;
	else if (!strcmp(cap, "both"))
		cfg->capture_both = true;
	else
		return params_fail(p, "tls_capture", "'tls_capture' must be plain or both, not '%s'", cap);
	if (params_bool(p, "tls_verify", true, &cfg->verify) < 0 ||
	    params_bool(p, "tls_auto_passthrough", true, &cfg->auto_passthrough) < 0 ||
	    params_duration(p, "tls_timeout", 20, &cfg->timeout) < 0)
		return -1;
	if (cfg->timeout <= 0)
		return params_fail(p, "tls_timeout", "'tls_timeout' must be more than 0");
	if (cfg->mode != TLS_NO && tls_client_cert_load(cfg, p) < 0)
		return -1;
	cfg->passthrough = xcalloc(1, sizeof *cfg->passthrough);
	if ((pt = params_list(p, "tls_passthrough")) != NULL) {
		size_t i;
		json_t *e;
		json_array_foreach(pt, i, e) {
			char *copy = xstrdup(json_string_value(e)), *save = NULL;
			for (char *w = strtok_r(copy, ", \t", &save); w; w = strtok_r(NULL, ", \t", &save)) {
				char canon[HOST_MAX + 1];

				tls_pattern_canon(w, canon, sizeof canon);
				if (!tls_pattern_ok(canon)) {
					params_fail(p, "tls_passthrough", "bad tls_passthrough entry '%s' (host, *.suffix or *)", w);
					free(copy);
					return -1;
				}
				/* "host." is "host", as in the SNI it is matched against (tls_hello_parse) */
				if (canon[strlen(canon) - 1] == '.')
					canon[strlen(canon) - 1] = '\0';
				cfg->passthrough = xrealloc(cfg->passthrough, (n + 2) * sizeof *cfg->passthrough);
				cfg->passthrough[n++] = xstrdup(canon);
				cfg->passthrough[n] = NULL;
			}
			free(copy);
		}
	} else if (p->why) {
		return -1;
	}
	/* every name passed through (reverse, which has no passthrough, was
	 * refused above): nothing is forged, the CA is never needed */
	cfg->forges = cfg->mode != TLS_NO;
	for (size_t i = 0; cfg->forges && cfg->passthrough[i]; i++)
		if (!strcmp(cfg->passthrough[i], "*"))
			cfg->forges = false;
	if (cfg->forges) {
		tls_cfgs_on++;
		if (inst)
			inst->intercepts = true;
	}
	return 0;
}

void
tls_cfg_free(struct tls_cfg *cfg)
{
	if (cfg == NULL)
		return;
	if (cfg->forges)
		tls_cfgs_on--;
	for (size_t i = 0; cfg->passthrough && cfg->passthrough[i]; i++)
		free(cfg->passthrough[i]);
	free(cfg->passthrough);
	while (cfg->hosts) {
		struct tls_host *h = cfg->hosts;
		cfg->hosts = h->next;
		free(h);
	}
	for (size_t i = 0; i < cfg->nidents; i++)
		tls_ident_free(&cfg->idents[i]);
	free(cfg->idents);
	free(cfg->client_cert);
	free(cfg);
}

void
tls_describe(const struct tls_cfg *cfg, json_t *o)
{
	static const char *const modes[] = { [TLS_NO] = "no", [TLS_AUTO] = "auto", [TLS_YES] = "yes" };
	json_t *a;

	if (cfg == NULL)
		return;
	json_object_set_new(o, "tls", json_string(modes[cfg->mode]));
	if (cfg->mode == TLS_NO)
		return;
	json_object_set_new(o, "tls_verify", json_boolean(cfg->verify));
	json_object_set_new(o, "tls_capture", json_string(cfg->capture_both ? "both" : "plain"));
	a = json_array();
	for (size_t i = 0; cfg->passthrough[i]; i++)
		json_array_append_new(a, json_string(cfg->passthrough[i]));
	json_object_set_new(o, "tls_passthrough", a);
	json_object_set_new(o, "tls_auto_passthrough", json_boolean(cfg->auto_passthrough));
	json_object_set_new(o, "tls_timeout", json_real(cfg->timeout));
	if (cfg->client_cert)
		json_object_set_new(o, "tls_client_cert", json_string(cfg->client_cert));
	a = json_array();
	/* rejects are counted either way; only with auto_passthrough do they pass through */
	for (const struct tls_host *h = cfg->hosts; h && cfg->auto_passthrough; h = h->next)
		if (h->rejects >= TLS_REJECT_LIMIT)
			json_array_append_new(a, json_string(h->name));
	json_object_set_new(o, "tls_passthrough_auto", a);
}

static struct tls_host *
tls_host_find(const struct tls_cfg *cfg, const char *name)
{
	for (struct tls_host *h = cfg->hosts; h; h = h->next)
		if (!strcasecmp(h->name, name))
			return h;
	return NULL;
}

/* Why host is passed through untouched, or NULL to intercept it. */
static const char *
tls_passthrough_why(const struct tls_cfg *cfg, const char *host)
{
	struct tls_host *h;
	char ip[HOST_MAX + 1];

	tls_pattern_canon(host, ip, sizeof ip);  /* an address as the entries spell it */
	for (size_t i = 0; cfg->passthrough[i]; i++)
		if (!strcmp(cfg->passthrough[i], "*") ||
		    (*host != '\0' && (hostname_match(cfg->passthrough[i], host) || !strcasecmp(cfg->passthrough[i], ip))))
			return "tls passthrough: the host is listed in tls_passthrough";
	if (*host == '\0')
		return NULL;
	if (cfg->auto_passthrough && (h = tls_host_find(cfg, host)) && h->rejects >= TLS_REJECT_LIMIT)
		return "tls passthrough: clients rejected the forged certificate for this host twice";
	return NULL;
}

static void
tls_host_rejected(struct tls_session *ts)
{
	struct tls_cfg *cfg = ts->cfg;
	struct tls_host *h;
	unsigned n = 0;

	/* reverse (accept-only) never passes a host through: counting it would
	 * announce and list a passthrough that does not happen */
	if (ts->host[0] == '\0' || ts->accept_only)
		return;
	capd_lock();  /* the instance's host list is shared by its shards */
	if ((h = tls_host_find(cfg, ts->host)) == NULL) {
		for (h = cfg->hosts; h; h = h->next)
			n++;
		if (n >= TLS_HOSTS_MAX) {
			capd_unlock();
			return;
		}
		h = xcalloc(1, sizeof *h + strlen(ts->host) + 1);
		strcpy(h->name, ts->host);
		h->next = cfg->hosts;
		cfg->hosts = h;
	}
	if (++h->rejects == TLS_REJECT_LIMIT && cfg->auto_passthrough)
		log_notice("%s: clients rejected the forged certificate for %s %u times; passing it through from now on",
		           ts->s->inst->name, ts->host, h->rejects);
	capd_unlock();
}

/* ---- the key log ---- */

static void tls_keylog_write(const SSL *ssl, const char *line);

/* The key log file and its descriptor are shared by the shards (shard.h). */
static void
tls_keylog_cb(const SSL *ssl, const char *line)
{
	capd_lock();
	tls_keylog_write(ssl, line);
	capd_unlock();
}

/*
 * A short write (a full disk, a file size limit) left part of a line: the
 * next line would be glued to it, and a reader (Wireshark) would lose both.
 * Cut the part off again when it is still the file's end, so that a line is
 * in whole or not at all; else (someone appended after it, or the file
 * cannot be truncated: a pipe) end it, so that only this line is torn.
 */
static void
tls_keylog_untear(ssize_t part)
{
	struct stat sb;
	off_t end = lseek(tls_keylog_fd, 0, SEEK_CUR);

	if (end >= part && fstat(tls_keylog_fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_size == end &&
	    ftruncate(tls_keylog_fd, end - part) == 0)
		return;
	if (write(tls_keylog_fd, "\n", 1) != 1)
		log_debug("keylog_file: a torn line stays unended");
}

static void
tls_keylog_write(const SSL *ssl, const char *line)
{
	struct tls_session *ts = SSL_get_app_data(ssl);
	const char *path = capd_settings ? capd_settings->keylog_file : NULL;

	if (ts && ts->capture)
		spool_keylog(line);
	if (path == NULL)
		return;
	if (tls_keylog_path == NULL || strcmp(tls_keylog_path, path) != 0) {
		if (tls_keylog_fd >= 0)
			close(tls_keylog_fd);
		free(tls_keylog_path);
		tls_keylog_path = xstrdup(path);
		tls_keylog_lost = 0;
		tls_keylog_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
		if (tls_keylog_fd < 0)
			log_warn("cannot open keylog_file %s", path);
	}
	if (tls_keylog_fd >= 0) {
		size_t n = strlen(line);
		char *l = xmalloc(n + 1);
		ssize_t w;

		memcpy(l, line, n);
		l[n] = '\n';
		/* one write per line: O_APPEND keeps lines whole */
		w = write(tls_keylog_fd, l, n + 1);
		free(l);
		if (w > 0 && w < (ssize_t)(n + 1))
			tls_keylog_untear(w);
		/* a full disk fails every line, some ten a session: say it once, and
		 * how much was lost once lines go in again */
		if (w == (ssize_t)(n + 1) && tls_keylog_lost > 0) {
			log_notice("keylog_file %s is written again; %lu key lines were lost", path, tls_keylog_lost);
			tls_keylog_lost = 0;
		} else if (w < 0 && tls_keylog_lost++ == 0) {
			log_warn("cannot write keylog_file %s (key lines are lost until it can be written)", path);
		} else if (w >= 0 && w != (ssize_t)(n + 1) && tls_keylog_lost++ == 0) {
			log_warnx("cannot write keylog_file %s: a short write (key lines are lost until it can be written)",
			          path);
		}
	}
}

void
tls_keylog_reopen(void)
{
	capd_lock();
	if (tls_keylog_fd >= 0)
		close(tls_keylog_fd);
	tls_keylog_fd = -1;
	if (tls_keylog_lost > 0)
		log_notice("keylog_file %s: %lu key lines were lost", tls_keylog_path, tls_keylog_lost);
	free(tls_keylog_path);
	tls_keylog_path = NULL;
	tls_keylog_lost = 0;
	capd_unlock();
}

/* OpenSSL formats key log lines only for a context with a callback: install it
 * once a session needs the lines (and keep it: the callback checks per session). */
static void
tls_keylog_want(const struct tls_session *ts)
{
	if (tls_keylog_on || (!ts->capture && (capd_settings == NULL || capd_settings->keylog_file == NULL)))
		return;
	tls_keylog_on = true;
	SSL_CTX_set_keylog_callback(tls_cli_verify, tls_keylog_cb);
	SSL_CTX_set_keylog_callback(tls_cli_noverify, tls_keylog_cb);
	if (tls_srv_ctx)
		SSL_CTX_set_keylog_callback(tls_srv_ctx, tls_keylog_cb);
}

/* ---- ciphertext capture (tls_capture = both, and a failed handshake's) ---- */

/* Whether the BIO hands its bytes to tls_cap: capture, or keep while the
 * client's handshake runs. */
static inline bool
tls_tapped(const struct tls_session *ts)
{
	return ts->capture || ts->keep;
}

/* One record of log: leg, dir, len32, bytes. */
static void
tls_log_put(struct buf *log, enum tls_leg leg, enum dir d, const void *p, size_t n)
{
	uint8_t hdr[6] = { (uint8_t)leg, (uint8_t)d };
	uint32_t len = (uint32_t)n;

	memcpy(hdr + 2, &len, 4);
	buf_append(log, hdr, sizeof hdr);
	buf_append(log, p, n);
}

static void
tls_cap(struct tls_session *ts, enum tls_leg leg, enum dir d, const void *p, size_t n)
{
	if (ts->raw_open) {
		if (ts->raw[leg])
			spool_flow_data(ts->raw[leg], d, p, n);
		return;
	}
	if (!ts->capture) {
		/* keep: the client leg only, and a handshake that outgrows the
		 * bound is kept no further (a gap would misplace what follows) */
		if (leg != TLS_LEG_CLIENT)
			return;
		if (buf_used(&ts->log) + 6 + n > TLS_KEEP_MAX) {
			ts->keep = false;
			buf_free(&ts->log);
			return;
		}
		/* a whole handshake in one allocation, not five doublings from 256 */
		if (ts->log.cap == 0)
			buf_reserve(&ts->log, TLS_KEEP_FIRST);
	}
	tls_log_put(&ts->log, leg, d, p, n);
}

/* A client that failed in its ClientHello (or never spoke TLS): what it sent
 * is only in the replay, and it came before any alert capd answered with, so
 * it goes at the head of log. */
static void
tls_log_replay_first(struct tls_session *ts)
{
	struct buf log = { 0 };

	if (!ts->c.tee || buf_used(&ts->c.replay) == 0)
		return;
	tls_log_put(&log, TLS_LEG_CLIENT, DIR_UP, buf_head(&ts->c.replay), buf_used(&ts->c.replay));
	buf_append(&log, buf_head(&ts->log), buf_used(&ts->log));
	buf_free(&ts->log);
	ts->log = log;
}

/* Hands each piece of log to fn, in order, and frees log. */
static void
tls_log_drain(struct buf *log, void (*fn)(void *arg, enum tls_leg leg, enum dir d, const uint8_t *p, size_t n),
              void *arg)
{
	const uint8_t *p = buf_head(log);
	size_t left = buf_used(log);

	while (left >= 6) {
		uint32_t n;
		memcpy(&n, p + 2, 4);
		if (n > left - 6)
			break;
		fn(arg, (enum tls_leg)p[0], (enum dir)p[1], p + 6, n);
		p += 6 + n;
		left -= 6 + n;
	}
	buf_free(log);
}

static void
tls_raw_write(void *arg, enum tls_leg leg, enum dir d, const uint8_t *p, size_t n)
{
	struct tls_session *ts = arg;

	if (ts->raw[leg])
		spool_flow_data(ts->raw[leg], d, p, n);
}

/* Opens the two ciphertext flows (client leg: client -> the address it reached;
 * upstream leg: capd's address -> the target) and writes what was kept. */
static void
tls_raw_open(struct tls_session *ts)
{
	struct session *s = ts->s;
	struct sockaddr_storage local;
	socklen_t len;
	char comment[160];

	if (!ts->capture || ts->raw_open)
		return;
	ts->raw_open = true;
	len = sizeof local;
	/* a client connection moved here (tls_client_move) brought its leg's flow */
	if (ts->raw[TLS_LEG_CLIENT] == NULL && s->client.fd >= 0 &&
	    getsockname(s->client.fd, (struct sockaddr *)&local, &len) == 0) {
		snprintf(comment, sizeof comment, "%s/%s tls client leg", s->inst->proto->name, s->inst->name);
		ts->raw[TLS_LEG_CLIENT] = spool_flow_open(s->inst->spool_iface, s->id, IPPROTO_TCP,
		                                          (struct sockaddr *)&s->client_addr, (struct sockaddr *)&local,
		                                          comment);
	}
	len = sizeof local;
	if (s->upstream.fd >= 0 && s->have_target &&
	    getsockname(s->upstream.fd, (struct sockaddr *)&local, &len) == 0) {
		snprintf(comment, sizeof comment, "%s/%s tls upstream leg", s->inst->proto->name, s->inst->name);
		/* On loopback the kernel may give capd's upstream socket the client's own
		 * port: the leg would have the plaintext flow's addresses and Wireshark
		 * would read the two as one stream. Shift the port shown, and say so. */
		if (addr_same((struct sockaddr *)&local, (struct sockaddr *)&s->client_addr, true)) {
			uint16_t real = addr_port((struct sockaddr *)&local);
			uint16_t shown = real == 65535 ? 65534 : real + 1;

			addr_set_port((struct sockaddr *)&local, shown);
			snprintf(comment, sizeof comment, "%s/%s tls upstream leg (local port %u shown as %u: the client's port)",
			         s->inst->proto->name, s->inst->name, real, shown);
		}
		ts->raw[TLS_LEG_UPSTREAM] = spool_flow_open(s->inst->spool_iface, s->id, IPPROTO_TCP,
		                                            (struct sockaddr *)&local, (struct sockaddr *)&s->target_addr,
		                                            comment);
	}
	tls_log_drain(&ts->log, tls_raw_write, ts);
}

/* What the session's TLS captures besides its plaintext: both legs'
 * ciphertext (tls_capture = both), or else the client's handshake, kept
 * until it is done and put in the capture only if it fails (tls_hs_ended). */
static void
tls_capture_init(struct tls_session *ts)
{
	struct instance *inst = ts->s->inst;
	bool on = inst->capture && inst->spool_iface >= 0;

	ts->capture = on && ts->cfg->capture_both;
	ts->keep = on && !ts->cfg->capture_both;
}

/* The client's handshake is done: what keep held is no capture's. */
static void
tls_keep_drop(struct tls_session *ts)
{
	if (!ts->keep)
		return;
	ts->keep = false;
	buf_free(&ts->log);
}

static void
tls_refused_write(void *arg, enum tls_leg leg, enum dir d, const uint8_t *p, size_t n)
{
	(void)leg;  /* keep holds the client leg alone */
	if (d == DIR_UP)
		session_refused_heard(arg, p, n);
	else
		session_refused_said(arg, p, n);
}

void
tls_hs_ended(struct session *s)
{
	struct tls_session *ts = s->tls;

	if (ts == NULL || !ts->keep)
		return;
	ts->keep = false;
	tls_log_replay_first(ts);
	tls_log_drain(&ts->log, tls_refused_write, s);
	/* the client's FIN that OpenSSL read: the refusal's close shows it first */
	if (s->refused != NULL && ts->c.sock_eof)
		s->client_eof = true;
}

/* ---- our BIO: the session's socket, with prefix, tee and capture ---- */

static int
tls_bio_read(BIO *b, char *out, int outl)
{
	struct tls_side *t = BIO_get_data(b);
	ssize_t n;

	BIO_clear_retry_flags(b);
	if (outl <= 0)
		return 0;
	if (t->tee && buf_used(&t->prefix) == 0) {
		/* a passthrough replays all of it through the relay's one buffer */
		size_t room = buf_used(&t->replay) < RELAY_BUF ? RELAY_BUF - buf_used(&t->replay) : 0;
		if (room == 0) {
			errno = EMSGSIZE;
			return -1;
		}
		if ((size_t)outl > room)
			outl = (int)room;
	}
	if (buf_used(&t->prefix) > 0) {
		n = (ssize_t)buf_used(&t->prefix) < outl ? (ssize_t)buf_used(&t->prefix) : outl;
		memcpy(out, buf_head(&t->prefix), (size_t)n);
		buf_consume(&t->prefix, (size_t)n);
		if (buf_used(&t->prefix) == 0)
			buf_free(&t->prefix);
	} else {
		n = recv(t->sd->fd, out, (size_t)outl, 0);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				BIO_set_retry_read(b);
			return -1;
		}
		if (n == 0) {
			t->sock_eof = true;
			return 0;
		}
	}
	if (t->tee)
		buf_append(&t->replay, out, (size_t)n);
	else if (tls_tapped(t->ts))
		tls_cap(t->ts, t->leg, t->rdir, out, (size_t)n);
	return (int)n;
}

static int
tls_bio_write(BIO *b, const char *in, int inl)
{
	struct tls_side *t = BIO_get_data(b);
	ssize_t n;

	BIO_clear_retry_flags(b);
	n = send(t->sd->fd, in, (size_t)inl, MSG_NOSIGNAL | (t->more ? MSG_MORE : 0));
	if (n < 0) {
		if (errno == EAGAIN || errno == EINTR)
			BIO_set_retry_write(b);
		return -1;
	}
	if (tls_tapped(t->ts) && n > 0)
		tls_cap(t->ts, t->leg, t->rdir == DIR_UP ? DIR_DOWN : DIR_UP, in, (size_t)n);
	return (int)n;
}

static long
tls_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	struct tls_side *t = BIO_get_data(b);

	(void)num; (void)ptr;
	switch (cmd) {
	case BIO_CTRL_EOF:
		return t && t->sock_eof && buf_used(&t->prefix) == 0;
	case BIO_CTRL_FLUSH:
		return 1;
	default:
		return 0;
	}
}

static int
tls_bio_create(BIO *b)
{
	BIO_set_init(b, 1);
	return 1;
}

/* ---- contexts ---- */

static int
tls_client_hello_cb(SSL *ssl, int *al, void *arg);
static int
tls_alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
            unsigned int inlen, void *arg);
static int tls_servername_cb(SSL *ssl, int *al, void *arg);

/* Notes a peer's close_notify: a bare EOF reads the same as one otherwise (below). */
static void
tls_info_cb(const SSL *ssl, int where, int ret)
{
	BIO *b;
	struct tls_side *t;

	if ((where & SSL_CB_READ_ALERT) && (ret & 0xff) == SSL_AD_CLOSE_NOTIFY && (b = SSL_get_rbio(ssl)) != NULL &&
	    (t = BIO_get_data(b)) != NULL)
		t->close_notify = true;
}

static void
tls_ctx_common(SSL_CTX *ctx)
{
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	/*
	 * Without SSL_OP_IGNORE_UNEXPECTED_EOF an EOF with no close_notify is a
	 * fatal error: OpenSSL sends the peer a decode_error alert and the SSL
	 * writes no more, so a half-closed peer would lose the other direction.
	 * With it the EOF reads as a close_notify would; tls_info_cb tells the
	 * two apart, and the unclean end is passed on as a bare FIN.
	 */
	SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
	/*
	 * A client's renegotiation is refused (no_renegotiation), as nginx and
	 * sslsplit do: it only costs capd. A TLS 1.2 server's (a rekey of a
	 * long connection, IIS asking for a client certificate on one path) is
	 * followed, secure renegotiation only, as curl and browsers do: refused,
	 * it ended the session as "upstream TLS error: sslv3 alert handshake
	 * failure".
	 */
	if (SSL_CTX_get_ssl_method(ctx) == TLS_server_method())
		SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_info_callback(ctx, tls_info_cb);
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
	                      SSL_MODE_RELEASE_BUFFERS);
	/* AES-128-GCM first on both legs, the order of Mozilla's intermediate
	 * profile and Go's crypto/tls: with AES-NI it is half again as fast as
	 * OpenSSL's default first pick, AES-256-GCM, and the plaintext the
	 * analyst reads is the same. The set of suites is OpenSSL's default. */
	SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
	SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM+AES128:ALL:!COMPLEMENTOFDEFAULT:!eNULL");
	SSL_CTX_set_read_ahead(ctx, 1);
	/* read ahead up to the relay's buffer: fewer recv() calls for bulk */
	SSL_CTX_set_default_read_buffer_len(ctx, RELAY_BUF + SSL3_RT_MAX_ENCRYPTED_OVERHEAD);
}

static unsigned
tls_resume_slot(const char *key)
{
	unsigned h = 2166136261u;

	for (const char *p = key; *p; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	return h % TLS_RESUME_SLOTS;
}

/* A new upstream session (TLS 1.3 tickets arrive after the handshake). */
static int
tls_new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	struct tls_session *ts = SSL_get_app_data(ssl);
	struct tls_resume *r;

	SSL_SESSION *copy;

	if (ts)
		ts->ticket = true;  /* the server took the handshake (tls_upstream_verdict) */
	if (ts == NULL || ts->resume_key[0] == '\0' || !SSL_SESSION_is_resumable(sess))
		return 0;
	/* a copy: OpenSSL marks the connection's own session unusable when that
	 * connection ends without close_notify, which says nothing about the ticket */
	if ((copy = SSL_SESSION_dup(sess)) == NULL)
		return 0;
	capd_lock();  /* the slots are shared by the shards */
	r = &tls_resume[tls_resume_slot(ts->resume_key)];
	SSL_SESSION_free(r->sess);
	snprintf(r->key, sizeof r->key, "%s", ts->resume_key);
	r->sess = copy;
	r->cert_asked = ts->cert_asked || (SSL_session_reused(ssl) && ts->resume_cert_asked);
	r->ident_sent = ts->ident_sent || (SSL_session_reused(ssl) && ts->resume_ident_sent);
	capd_unlock();
	return 0;
}

/*
 * The server asks for a client certificate: the session's tls_client_cert,
 * set on this connection alone (the context is every instance's). OpenSSL
 * then sends it when the server's signature algorithms take its key; else,
 * or without one, it calls tls_client_cert_cb.
 */
static int
tls_cert_cb(SSL *ssl, void *arg)
{
	struct tls_session *ts = SSL_get_app_data(ssl);
	const struct tls_ident *id = ts ? ts->ident : NULL;

	(void)arg;
	if (id == NULL || ts->ident_sent)
		return 1;
	/* the chain as given, not built from the context's store */
	if (SSL_use_cert_and_key(ssl, id->cert, id->key, id->chain, 1) != 1) {
		ERR_clear_error();
		return 1;  /* none sent: the server decides, tls_client_cert_cb notes it */
	}
	ts->ident_sent = true;
	return 1;
}

/* The server asks for a client certificate: capd has none (the client's stays
 * with the client), but the user should learn why the server then refuses. */
static int
tls_client_cert_cb(SSL *ssl, X509 **x, EVP_PKEY **k)
{
	struct tls_session *ts = SSL_get_app_data(ssl);

	(void)x; (void)k;
	if (ts)
		ts->cert_asked = true;
	return 0;
}

static pthread_once_t tls_trust_once = PTHREAD_ONCE_INIT;
static char *tls_trust_loaded;  /* tls_trust_stamp of the files loaded; NULL: none yet */

/* One path's identity for tls_trust_stamp: device, inode, size, mtime. */
static void
tls_trust_stamp_path(struct buf *b, const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0)
		buf_printf(b, "%s:-;", path);
	else
		buf_printf(b, "%s:%ju:%ju:%jd:%jd.%ld;", path, (uintmax_t)st.st_dev, (uintmax_t)st.st_ino,
		           (intmax_t)st.st_size, (intmax_t)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
}

/*
 * What OpenSSL's default verify paths are now: the bundle (SSL_CERT_FILE or
 * the built-in cert.pem) and each hashed folder (SSL_CERT_DIR, a list, or
 * the built-in certs), by identity. update-ca-certificates writes a new
 * bundle and adds links to the folder, so either changes the stamp.
 */
static char *
tls_trust_stamp(void)
{
	const char *file = getenv(X509_get_default_cert_file_env());
	const char *dirs = getenv(X509_get_default_cert_dir_env());
	struct buf b = { 0 };

	tls_trust_stamp_path(&b, file ? file : X509_get_default_cert_file());
	char *list = xstrdup(dirs ? dirs : X509_get_default_cert_dir()), *save = NULL;
	for (char *d = strtok_r(list, ":", &save); d; d = strtok_r(NULL, ":", &save))
		tls_trust_stamp_path(&b, d);
	free(list);
	buf_append(&b, "", 1);
	char *stamp = xstrdup((const char *)buf_head(&b));
	buf_free(&b);
	return stamp;
}

/*
 * The system's trusted certificates into the verifying context, once. Parsing
 * the bundle (some 140 certificates) is most of what a TLS-less capd's start
 * took (a fifth of a second under the sanitizers), and a capd that
 * intercepts nothing never needs it. The first session that verifies pays it,
 * before any session uses the context (pthread_once: the sessions' threads).
 * The stamp is taken first: a file changed while loading is loaded again at
 * the next reload rather than missed.
 */
static void
tls_trust_load(void)
{
	tls_trust_loaded = tls_trust_stamp();
	if (SSL_CTX_set_default_verify_paths(tls_cli_verify) != 1)
		log_warnx("cannot load the system's trusted certificates; tls_verify will refuse every server");
}

/*
 * A reload reads the system's trusted certificates afresh when their files
 * changed since they were loaded (a lab CA added by update-ca-certificates,
 * or one removed), as nginx reads proxy_ssl_trusted_certificate again. An
 * unchanged store is kept: loading the bundle takes some 15 ms. The shards
 * are paused, so no handshake is inside a verification: the context takes
 * the new store, and the old one goes with it. Sessions resumed skip the
 * verification, so the kept ones go too: the next handshake is a full one.
 */
void
tls_trust_reload(void)
{
	char *now;
	X509_STORE *store;

	if (tls_trust_loaded == NULL)
		return;  /* not loaded yet: the first verifying session reads the files as they are then */
	now = tls_trust_stamp();
	if (!strcmp(now, tls_trust_loaded)) {
		free(now);
		return;
	}
	if ((store = X509_STORE_new()) == NULL || X509_STORE_set_default_paths(store) != 1) {
		X509_STORE_free(store);
		ERR_clear_error();
		free(now);
		log_warnx("the system's trusted certificates changed, but cannot be loaded again: "
		          "tls_verify keeps those loaded before");
		return;
	}
	free(tls_trust_loaded);
	tls_trust_loaded = now;
	SSL_CTX_set_cert_store(tls_cli_verify, store);  /* frees the old one */
	for (int i = 0; i < TLS_RESUME_SLOTS; i++) {
		SSL_SESSION_free(tls_resume[i].sess);
		tls_resume[i].sess = NULL;
	}
	log_notice("the system's trusted certificates changed on disk: tls_verify now uses the %d loaded afresh",
	           sk_X509_OBJECT_num(X509_STORE_get0_objects(store)));
}

static SSL_CTX *
tls_client_ctx(bool verify, char **why)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());

	if (ctx == NULL) {
		*why = xstrdup("cannot make a TLS client context");
		return NULL;
	}
	tls_ctx_common(ctx);
	/* a server without RFC 5746 (old appliances, embedded web servers) is
	 * reached, as browsers reach it: the attack the check guards against
	 * needs a renegotiation, which capd never does (SSL_OP_NO_RENEGOTIATION) */
	SSL_CTX_set_options(ctx, SSL_OP_LEGACY_SERVER_CONNECT);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(ctx, tls_new_session_cb);
	SSL_CTX_set_client_cert_cb(ctx, tls_client_cert_cb);
	SSL_CTX_set_cert_cb(ctx, tls_cert_cb, NULL);
	if (verify) {
		/* the system's trusted certificates are read at the first verifying
		 * session (tls_trust_load): a capd that intercepts nothing never reads them */
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	} else {
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
		/*
		 * Nothing about the server is checked, so OpenSSL's security level
		 * (Debian's 2: RSA and DH keys of 2048 bits, no SHA-1 signatures,
		 * TLS 1.2 or later) only kept capd from old devices and lab
		 * servers, which mitmproxy and sslsplit reach when told not to
		 * verify. A modern server still picks what it picked before.
		 */
		SSL_CTX_set_security_level(ctx, 0);
		SSL_CTX_set_min_proto_version(ctx, TLS1_VERSION);
	}
	return ctx;
}

/* The context toward clients needs the leaf key, so it waits for the CA. */
static int
tls_server_ctx(char **why)
{
	SSL_CTX *ctx;

	if (tls_srv_ctx)
		return 0;
	if ((ctx = SSL_CTX_new(TLS_server_method())) == NULL) {
		*why = xstrdup("cannot make a TLS server context");
		return -1;
	}
	tls_ctx_common(ctx);
	/* one slot per key type: each connection gets the certificates, and
	 * OpenSSL serves the one the client's suites and signature algorithms take */
	if (SSL_CTX_use_PrivateKey(ctx, tls_ca_leaf_key()) != 1 ||
	    SSL_CTX_use_PrivateKey(ctx, tls_ca_leaf_key_rsa()) != 1) {
		*why = xstrdup("cannot use the leaf keys");
		SSL_CTX_free(ctx);
		return -1;
	}
	/* our order, except that a client that puts ChaCha20 first (no AES in
	 * hardware, as on many phones) gets it; ECDSA suites before all others,
	 * so a TLS 1.2 client that offers one keeps the ECDSA certificate */
	SSL_CTX_set_cipher_list(ctx, "ECDHE+ECDSA+AESGCM+AES128:aECDSA:"
	                             "ECDHE+AESGCM+AES128:ALL:!COMPLEMENTOFDEFAULT:!eNULL");
	SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA);
	/* DHE-RSA suites (clients without ECDHE) need the RFC 7919 groups */
	SSL_CTX_set_dh_auto(ctx, 1);
	SSL_CTX_set_client_hello_cb(ctx, tls_client_hello_cb, NULL);
	SSL_CTX_set_tlsext_servername_callback(ctx, tls_servername_cb);
	SSL_CTX_set_alpn_select_cb(ctx, tls_alpn_cb, NULL);
	SSL_CTX_set_num_tickets(ctx, 1);
	SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"capd", 4);
	if (tls_keylog_on)
		SSL_CTX_set_keylog_callback(ctx, tls_keylog_cb);
	tls_srv_ctx = ctx;
	return 0;
}

/* A context toward clients without certificates (under capd_lock): it
 * serves only to answer a ClientHello with the alert of ts->fail. */
static SSL_CTX *
tls_bare_ctx(void)
{
	if (tls_srv_bare == NULL && (tls_srv_bare = SSL_CTX_new(TLS_server_method())) != NULL) {
		tls_ctx_common(tls_srv_bare);
		SSL_CTX_set_client_hello_cb(tls_srv_bare, tls_client_hello_cb, NULL);
	}
	return tls_srv_bare;
}

/* capd_settings' CA paths, the defaults filled in. */
static struct capd_settings *
tls_ca_paths(void)
{
	struct capd_settings *st = capd_settings;

	if (st->ca_cert == NULL)
		st->ca_cert = xasprintf("%s/ca.pem", st->state_dir);
	if (st->ca_key == NULL)
		st->ca_key = xasprintf("%s/ca.key", st->state_dir);
	return st;
}

int
tls_ca_ensure(char **why)
{
	struct capd_settings *st = tls_ca_paths();

	if (tls_ca_load_cert(st->ca_cert, st->ca_key, why) < 0)
		return -1;
	/* never made here: the caller may hold capd_lock (instance_prepare makes them) */
	if (!tls_ca_keys_ready()) {
		*why = xstrdup("the TLS leaf keys could not be made (OpenSSL failed; see the log)");
		return -1;
	}
	return tls_server_ctx(why);
}

int
tls_ca_ensure_cert(char **why)
{
	struct capd_settings *st = tls_ca_paths();

	return tls_ca_load_cert(st->ca_cert, st->ca_key, why);
}

int
tls_ca_ensure_shared(char **why)
{
	int rc;

	capd_lock();  /* the CA and the context toward clients are made once, for every shard */
	rc = tls_ca_ensure(why);
	capd_unlock();
	return rc;
}

int
tls_instance_ready(char **why)
{
	char *e = NULL;

	if (tls_ca_ensure_shared(&e) < 0) {
		*why = xasprintf("cannot intercept TLS: %s", e);
		free(e);
		return -1;
	}
	return 0;
}

int
tls_start(const struct capd_settings *st, char **why)
{
	tls_bio_meth = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "capd session");
	if (tls_bio_meth == NULL) {
		*why = xstrdup("cannot make the TLS socket BIO");
		return -1;
	}
	BIO_meth_set_read(tls_bio_meth, tls_bio_read);
	BIO_meth_set_write(tls_bio_meth, tls_bio_write);
	BIO_meth_set_ctrl(tls_bio_meth, tls_bio_ctrl);
	BIO_meth_set_create(tls_bio_meth, tls_bio_create);
	if ((tls_cli_verify = tls_client_ctx(true, why)) == NULL ||
	    (tls_cli_noverify = tls_client_ctx(false, why)) == NULL)
		return -1;
	/* a CA already on disk is loaded now, so a broken one fails the start
	 * (and its files are read before privileges drop); the CA alone: the
	 * leaf keys (0.2-0.6 s) wait for an instance that intercepts */
	char *cert = st->ca_cert ? xstrdup(st->ca_cert) : xasprintf("%s/ca.pem", st->state_dir);
	char *key = st->ca_key ? xstrdup(st->ca_key) : xasprintf("%s/ca.key", st->state_dir);
	bool exists = access(cert, F_OK) == 0 || access(key, F_OK) == 0;
	free(cert);
	free(key);
	if (exists) {
		char *e = NULL;
		if (tls_ca_ensure_cert(&e) < 0) {
			*why = xasprintf("TLS: %s", e);
			free(e);
			return -1;
		}
	}
	return 0;
}

void
tls_prepare(void)
{
	char *why = NULL;

	if (tls_cfgs_on == 0 || tls_ca_loaded())
		return;
	(void)tls_ca_keys_ensure();  /* no shard runs yet: no session waits for them */
	if (tls_ca_ensure(&why) < 0) {
		log_warnx("TLS interception will fail: %s", why);
		free(why);
	}
}

void
tls_stop(void)
{
	for (int i = 0; i < TLS_RESUME_SLOTS; i++) {
		SSL_SESSION_free(tls_resume[i].sess);
		tls_resume[i].sess = NULL;
	}
	SSL_CTX_free(tls_srv_ctx);
	SSL_CTX_free(tls_srv_bare);
	tls_srv_bare = NULL;
	SSL_CTX_free(tls_cli_verify);
	SSL_CTX_free(tls_cli_noverify);
	tls_srv_ctx = tls_cli_verify = tls_cli_noverify = NULL;
	free(tls_trust_loaded);
	tls_trust_loaded = NULL;
	tls_keylog_on = false;
	BIO_meth_free(tls_bio_meth);
	tls_bio_meth = NULL;
	tls_ca_free();
	if (tls_keylog_fd >= 0)
		close(tls_keylog_fd);
	tls_keylog_fd = -1;
	free(tls_keylog_path);
	tls_keylog_path = NULL;
	tls_keylog_lost = 0;
}

/* ---- the session's TLS state ---- */

static const char *
tls_err_text(char *b, size_t n, const char *fallback)
{
	unsigned long e = ERR_peek_last_error();
	const char *r;

	if (e == 0) {
		snprintf(b, n, "%s", fallback);
		return b;
	}
	r = ERR_reason_error_string(e);
	if (r)
		snprintf(b, n, "%s", r);
	else
		ERR_error_string_n(e, b, n);
	ERR_clear_error();
	return b;
}

static int
tls_side_init(struct tls_session *ts, struct tls_side *t, struct side *sd, SSL_CTX *ctx, enum tls_leg leg)
{
	BIO *b;

	t->ts = ts;
	t->sd = sd;
	t->leg = leg;
	t->rdir = leg == TLS_LEG_CLIENT ? DIR_UP : DIR_DOWN;
	if ((t->ssl = SSL_new(ctx)) == NULL || (b = BIO_new(tls_bio_meth)) == NULL)
		return -1;
	BIO_set_data(b, t);
	SSL_set_bio(t->ssl, b, b);
	SSL_set_app_data(t->ssl, ts);
	return 0;
}

static void
tls_side_clear(struct tls_side *t)
{
	SSL_free(t->ssl);
	t->ssl = NULL;
	buf_free(&t->prefix);
	buf_free(&t->replay);
}

/*
 * reverse: the client's TLS was up, but the session ends before the
 * upstream's handshake did (it failed, the connect or the route did): the
 * close line names the client's TLS all the same, as for every other
 * intercepted session (tls_done notes both sides).
 */
static void
tls_note_client(struct tls_session *ts)
{
	const unsigned char *a;
	unsigned alen;

	if (!ts->accept_only || ts->s->client.tls == NULL || ts->c.ssl == NULL || ts->summed_up)
		return;
	SSL_get0_alpn_selected(ts->c.ssl, &a, &alen);
	tls_session_summary(ts, "tls %s sni=%s%s%.*s", SSL_get_version(ts->c.ssl), ts->sni[0] ? ts->sni : "-",
	                    alen ? " alpn=" : "", (int)alen, (const char *)a);
}

void
tls_session_ending(struct session *s, enum synth_end how)
{
	/*
	 * A reset session reset capd's sockets too: the client leg is the
	 * client's own connection, and it ends as the plaintext flow does (the
	 * client's RST, or capd's); the upstream leg shows the same end rather
	 * than a clean FIN exchange that never happened.
	 */
	if (s->tls == NULL)
		return;
	s->tls->end = how;
	tls_note_client(s->tls);
}

/* tls_capture = both: a handshake that failed still shows in the capture. */
static void
tls_raw_failed(struct tls_session *ts)
{
	if (!ts->capture || ts->raw_open)
		return;
	tls_log_replay_first(ts);
	if (buf_used(&ts->log) > 0)
		tls_raw_open(ts);
}

bool
tls_client_leg_captured(const struct session *s)
{
	return s->tls != NULL && s->tls->raw_open && s->tls->raw[TLS_LEG_CLIENT] != NULL;
}

void
tls_session_free(struct session *s)
{
	struct tls_session *ts = s->tls;

	if (ts == NULL)
		return;
	tls_raw_failed(ts);
	ev_timer_stop(capd_loop, &ts->timer);
	ev_timer_stop(capd_loop, &ts->verdict);
	s->client.tls = s->upstream.tls = NULL;
	s->tls = NULL;
	tls_side_clear(&ts->c);
	tls_side_clear(&ts->u);
	for (int i = 0; i < 2; i++)
		if (ts->raw[i])
			spool_flow_close(ts->raw[i], ts->end);
	buf_free(&ts->log);
	free(ts->fail);
	free(ts->no_ca);
	free(ts);
}

/* n (taken) joins the TLS part of s's note (session.h): at its end, or
 * at its start (first) */
static void
tls_note_add(struct session *s, char *n, bool first)
{
	char *both;

	if (s->note == NULL) {
		s->note_tls = 1;
		s->note = n;
		return;
	}
	if (s->note_tls == 0 || s->note_tls - 1 > strlen(s->note)) {
		s->note_tls = 1 + strlen(s->note) + 2;
		first = false;
	}
	if (first) {
		int at = (int)(s->note_tls - 1);
		both = xasprintf("%.*s%s; %s", at, s->note, n, s->note + at);
	} else {
		both = xasprintf("%s; %s", s->note, n);
	}
	free(n);
	free(s->note);
	s->note = both;
}

static void
tls_session_note(struct session *s, const char *fmt, ...)
{
	va_list ap;
	char *n;

	va_start(ap, fmt);
	if (vasprintf(&n, fmt, ap) < 0)
		n = NULL;
	va_end(ap);
	if (n != NULL)
		tls_note_add(s, n, false);
}

/* The TLS part's opening: version, SNI, ALPN. A client whose first read
 * brought the end of its TLS has that noted already: it goes after. */
static void
tls_session_summary(struct tls_session *ts, const char *fmt, ...)
{
	va_list ap;
	char *n;

	va_start(ap, fmt);
	if (vasprintf(&n, fmt, ap) < 0)
		n = NULL;
	va_end(ap);
	if (n == NULL)
		return;
	tls_note_add(ts->s, n, true);
	ts->summed_up = true;
}

/*
 * A client handshake that failed ends as a refusal does (session.h): capd's
 * alert (OpenSSL sent it already), capd's FIN, and the socket lingers, read
 * until the client closes. Closed at once, a socket with bytes unread (the
 * rest of the client's flight, early data, whatever followed its alert)
 * resets, and the reset throws the alert away; and the client's FIN, which
 * comes after capd's, was never seen. The capture's flow goes with the
 * socket: the refusal's (tls_hs_ended), or with tls_capture = both the client
 * leg, the same conversation (one copy). Only a failure pays for this.
 */
static void
tls_fail_linger(struct tls_session *ts)
{
	struct session *s = ts->s;

	switch (ts->st) {
	case TLS_ST_HELLO:
	case TLS_ST_FINISH:
	case TLS_ST_CONNECT:
	case TLS_ST_UPSTREAM:
	case TLS_ST_VERDICT:
		break;
	default:
		return;  /* no TLS spoken to the client yet, or it is done */
	}
	if (ts->pass || s->state != SESSION_HANDSHAKE || s->client.fd < 0 || buf_used(&s->hs_out) > 0)
		return;
	tls_hs_ended(s);
	tls_raw_failed(ts);
	if (s->refused == NULL && ts->raw[TLS_LEG_CLIENT] != NULL) {
		s->refused = ts->raw[TLS_LEG_CLIENT];
		ts->raw[TLS_LEG_CLIENT] = NULL;
		if (ts->c.sock_eof)
			s->client_eof = true;
	}
	shutdown(s->client.fd, SHUT_WR);
	session_linger_client(s);
}

/* Closes with why; s is gone for the caller. */
static void
tls_fail(struct tls_session *ts, const char *why)
{
	/* why may live in ts (ts->fail), which the close frees before it logs */
	char *copy = xstrdup(why);

	tls_fail_linger(ts);
	session_close(ts->s, copy);
	free(copy);
}

/* Watch only what the last SSL call asked for on this side. */
static void
tls_arm(struct side *sd, int want)
{
	if (want == SSL_ERROR_WANT_READ) {
		ev_io_stop(capd_loop, &sd->wio);
		ev_io_start(capd_loop, &sd->rio);
	} else {
		ev_io_stop(capd_loop, &sd->rio);
		ev_io_start(capd_loop, &sd->wio);
	}
}

static void
tls_stop_watchers(struct session *s)
{
	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	ev_io_stop(capd_loop, &s->upstream.rio);
	ev_io_stop(capd_loop, &s->upstream.wio);
}

/* accept-only: the session's own handshake watchers take the client back. */
static void
tls_restore_hs(struct tls_session *ts)
{
	struct session *s = ts->s;

	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	ev_set_cb(&s->client.rio, ts->hs_rcb);
	ev_set_cb(&s->client.wio, ts->hs_wcb);
}

/* Not TLS after all, or a passthrough host: relay the bytes as they are. */
static void
tls_plain(struct tls_session *ts, const char *note)
{
	struct session *s = ts->s;

	if (buf_used(&ts->c.replay) > 0) {
		/* the ClientHello (and whatever else came) goes upstream as read */
		struct buf rest = s->hs_in;
		memset(&s->hs_in, 0, sizeof s->hs_in);
		buf_append(&s->hs_in, buf_head(&ts->c.replay), buf_used(&ts->c.replay));
		buf_append(&s->hs_in, buf_head(&ts->c.prefix), buf_used(&ts->c.prefix));
		buf_append(&s->hs_in, buf_head(&rest), buf_used(&rest));
		buf_free(&rest);
	} else if (buf_used(&ts->c.prefix) > 0) {
		buf_append(&s->hs_in, buf_head(&ts->c.prefix), buf_used(&ts->c.prefix));
	}
	ts->capture = ts->keep = false;
	buf_free(&ts->log);
	if (note && !ts->accept_only) {
		/* only the reason stays, for the session's close line */
		ev_timer_stop(capd_loop, &ts->timer);
		tls_side_clear(&ts->c);
		tls_side_clear(&ts->u);
		ts->pass = note;
		ts->st = TLS_ST_PASS;
		tls_session_note(s, "%s", note);
		tls_stop_watchers(s);
		relay_start(s);
		return;
	}
	if (ts->accept_only) {
		/* not TLS: the proxy reads its plaintext handshake as usual */
		tls_restore_hs(ts);
		tls_session_free(s);
		ev_io_start(capd_loop, &s->client.rio);
		if (buf_used(&s->hs_in) > 0)  /* tls_peek took the first bytes */
			ev_feed_event(capd_loop, &s->client.rio, EV_READ);
		return;
	}
	tls_session_free(s);
	if (note)
		tls_session_note(s, "%s", note);
	tls_stop_watchers(s);
	relay_start(s);
}

/*
 * Where a timed-out upstream handshake stood, for the log: a server that
 * never answered (capd waits to read, nothing unread) and a wake-up capd
 * missed (bytes wait unread) look alike to the client.
 */
static void
tls_upstream_stuck_log(struct tls_session *ts)
{
	struct side *sd = &ts->s->upstream;
	int unread = -1, unsent = -1;

	if (sd->fd >= 0) {
		ioctl(sd->fd, SIOCINQ, &unread);
		ioctl(sd->fd, SIOCOUTQ, &unsent);
	}
	log_info("session %llu: upstream handshake timed out at '%s', capd waiting to %s, "
	         "%d bytes unread, %d unsent or unacknowledged",
	         (unsigned long long)ts->s->id, ts->u.ssl ? SSL_state_string_long(ts->u.ssl) : "-",
	         ev_is_active(&sd->wio) ? "write" : ev_is_active(&sd->rio) ? "read" : "(no watcher)",
	         unread, unsent);
}

/*
 * Whether the TLS timer ran out on capd rather than on a peer; if so it runs
 * again. The loop's clock stands still while capd is not scheduled (held up
 * under load, SIGSTOP), and after such a pause libev runs the expired timer
 * first, or the watchers first in the same pass: a peer's bytes may wait
 * unread, the upstream's connect be up, or capd have only just sent the peer
 * what it waits on. A timer that ran out TLS_LATE or more late by the clock
 * found capd held up: the peers get their time again, TLS_EXCUSES times at
 * most (a loop always that slow still ends a handshake that never comes).
 * Asked only when the timer runs out.
 */
#define TLS_LATE 0.2
#define TLS_EXCUSES 3

static bool
tls_timer_too_soon(struct tls_session *ts, struct ev_loop *loop)
{
	struct session *s = ts->s;
	double again = ts->st == TLS_ST_PEEK ? s->inst->idle_timeout : ts->cfg->timeout;

	if (ts->excused >= TLS_EXCUSES || again <= 0)
		return false;
	if (!session_peer_moved(s, loop) && ev_time() - ts->timer_due < TLS_LATE)
		return false;
	ts->excused++;
	ev_timer_set(&ts->timer, again, 0.);
	ev_timer_start(loop, &ts->timer);
	ts->timer_due = ev_time() + again;
	return true;
}

static void
tls_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;
	struct tls_session *ts = s->tls;

	(void)revents;
	if (ts == NULL)
		return;
	if (tls_timer_too_soon(ts, loop))
		return;
	if (ts->st == TLS_ST_UPSTREAM || ts->st == TLS_ST_VERDICT) {
		tls_upstream_stuck_log(ts);
		tls_upstream_failed(ts, "upstream handshake failed: timed out");
	}
	else if (ts->st == TLS_ST_CONNECT)
		tls_connect_failed(ts, "connect timed out");
	else if (ts->st == TLS_ST_PEEK)
		tls_fail(ts, "idle timeout");
	else
		tls_fail(ts, "client TLS handshake timed out");
}

/* ---- the client side ---- */

static const char *
tls_version_name(unsigned v, char *b, size_t n)
{
	switch (v) {
	case SSL3_VERSION: return "SSL 3.0";
	case TLS1_VERSION: return "TLS 1.0";
	case TLS1_1_VERSION: return "TLS 1.1";
	default: snprintf(b, n, "version 0x%04x", v); return b;
	}
}

/* Gives the client's SSL the forged certificates and the CA's chain (taken
 * with them, under the lock: tls_ca_chain_ref) and drops the caller's
 * references; ts->fail when there are none. */
static void
tls_use_forged(struct tls_session *ts, X509 *x, X509 *rsa, STACK_OF(X509) *chain, char *why)
{
	if (x == NULL) {
		sk_X509_pop_free(chain, X509_free);
		ts->fail = why;
		return;
	}
	/* each use makes that key's slot current, and set1_chain fills the current slot */
	if (SSL_use_certificate(ts->c.ssl, x) != 1 || (chain && SSL_set1_chain(ts->c.ssl, chain) != 1) ||
	    (rsa && (SSL_use_certificate(ts->c.ssl, rsa) != 1 || (chain && SSL_set1_chain(ts->c.ssl, chain) != 1)))) {
		ERR_clear_error();
		ts->fail = xstrdup("cannot use the forged certificate");
	}
	X509_free(x);
	X509_free(rsa);
	sk_X509_pop_free(chain, X509_free);
}

/*
 * A client may resume only a session of the same instance and SNI: the
 * context toward clients is one for every name, and OpenSSL resumed a
 * session whose certificate was forged for www.a with a hello for www.b
 * (RFC 6066 3: the server MUST NOT; it does a full handshake). The session
 * ID context, which OpenSSL checks before it resumes, is made of the two.
 * Without SNI (an IP target, Java for a name without a dot) the target the
 * client asked for stands for it: the session of one server was resumed
 * toward another, whose certificate the client never saw.
 */
static void
tls_resume_scope(struct tls_session *ts, SSL *ssl)
{
	struct session *s = ts->s;
	unsigned char id[EVP_MAX_MD_SIZE];
	unsigned n = 0;
	char ip[ADDR_STRLEN];
	const char *to = ts->sni;

	if (!to[0] && s->target_name[0])
		to = s->target_name;
	else if (!to[0] && s->have_target)
		to = addr_format((struct sockaddr *)&s->target_addr, ip, sizeof ip);
	char *scope = xasprintf("%s%c%s", s->inst->name, '\0', to);
	size_t len = strlen(s->inst->name) + 1 + strlen(to);

	if (EVP_Digest(scope, len, id, &n, EVP_sha256(), NULL) != 1 ||
	    SSL_set_session_id_context(ssl, id, n < SSL_MAX_SID_CTX_LENGTH ? n : SSL_MAX_SID_CTX_LENGTH) != 1)
		ERR_clear_error();  /* the context's own ("capd") stays */
	free(scope);
}

static int
tls_client_hello_cb(SSL *ssl, int *al, void *arg)
{
	struct tls_session *ts = SSL_get_app_data(ssl);

	(void)arg;
	if (ts == NULL)
		return SSL_CLIENT_HELLO_SUCCESS;
	if (ts->st == TLS_ST_HELLO) {
		struct tls_hello h = { 0 };

		tls_hello_parse(&h, ssl);
		memcpy(ts->sni, h.sni, sizeof ts->sni);
		memcpy(ts->alpn_offer, h.alpn_offer, sizeof ts->alpn_offer);
		ts->alpn_offer_len = h.alpn_offer_len;
		ts->want_rsa = h.want_rsa;
		ts->hello_version = h.hello_version;
		tls_resume_scope(ts, ssl);
		return SSL_CLIENT_HELLO_RETRY;  /* the accept waits for the upstream */
	}
	if (ts->fail && ts->fail_alert == TLS13_AD_CERTIFICATE_REQUIRED)
		return SSL_CLIENT_HELLO_SUCCESS;  /* tls_servername_cb, once TLS 1.3 is chosen */
	if (ts->fail) {
		*al = ts->fail_alert ? ts->fail_alert : SSL_AD_HANDSHAKE_FAILURE;
		return SSL_CLIENT_HELLO_ERROR;
	}
	return SSL_CLIENT_HELLO_SUCCESS;
}

/*
 * An alert that only TLS 1.3 has (the server's certificate_required,
 * tls_upstream_verdict) would leave the hello callback as handshake_failure:
 * OpenSSL maps it so before the version is chosen. The server name callback
 * comes after, and sends it as is.
 */
static int
tls_servername_cb(SSL *ssl, int *al, void *arg)
{
	struct tls_session *ts = SSL_get_app_data(ssl);

	(void)arg;
	if (ts == NULL || ts->fail == NULL || ts->fail_alert != TLS13_AD_CERTIFICATE_REQUIRED)
		return SSL_TLSEXT_ERR_OK;
	*al = ts->fail_alert;
	return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static int
tls_alpn_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
            unsigned int inlen, void *arg)
{
	struct tls_session *ts = SSL_get_app_data(ssl);

	(void)arg;
	if (ts == NULL || ts->alpn_sel_len == 0)
		return SSL_TLSEXT_ERR_NOACK;
	for (unsigned i = 0; i < inlen;) {
		unsigned n = in[i];
		if (i + 1 + n > inlen)
			break;
		if (n == ts->alpn_sel_len && !memcmp(in + i + 1, ts->alpn_sel, n)) {
			*out = in + i + 1;
			*outlen = (unsigned char)n;
			return SSL_TLSEXT_ERR_OK;
		}
		i += 1 + n;
	}
	return SSL_TLSEXT_ERR_NOACK;
}

/* A failed client handshake: a reason a person understands. */
static void
tls_client_failed(struct tls_session *ts, int e, int saved_errno)
{
	unsigned long err = ERR_peek_last_error();
	int reason = ERR_GET_LIB(err) == ERR_LIB_SSL ? ERR_GET_REASON(err) : 0;
	const char *what = NULL;
	char why[400], text[200];

	if (ts->fail) {
		/* the alert went out; the upstream side said why */
		ERR_clear_error();
		tls_fail(ts, ts->fail);
		return;
	}
	switch (reason) {
	case SSL_R_TLSV1_ALERT_UNKNOWN_CA: what = "unknown CA"; break;
	case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE: what = "bad certificate"; break;
	case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN: what = "certificate unknown"; break;
	case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE: what = "unsupported certificate"; break;
	case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED: what = "certificate expired"; break;
	case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED: what = "certificate revoked"; break;
	case SSL_R_TLSV1_ALERT_DECRYPT_ERROR: what = "decrypt error"; break;
	default: break;
	}
	if (what) {
		char when[100];
		const char *ca;

		ERR_clear_error();
		capd_lock();  /* the CA is shared by the shards */
		ca = tls_ca_invalid(when, sizeof when);
		capd_unlock();
		/* the forged certificate is in its time unless the CA is not (tls_ca_leaf_validity) */
		snprintf(why, sizeof why, "client rejected the forged certificate (%s%s%s)", what,
		         ca ? "; capd's CA " : "", ca ? ca : "");
		tls_host_rejected(ts);
		tls_fail(ts, why);
		return;
	}
	switch (reason) {
	case SSL_R_WRONG_VERSION_NUMBER:
	case SSL_R_HTTP_REQUEST:
	case SSL_R_HTTPS_PROXY_REQUEST:
	case SSL_R_UNKNOWN_PROTOCOL:
	case SSL_R_PACKET_LENGTH_TOO_LONG:
	case SSL_R_RECORD_LENGTH_MISMATCH:
	case SSL_R_UNEXPECTED_MESSAGE:
		ERR_clear_error();
		tls_fail(ts, "protocol mismatch: the client did not start a TLS handshake");
		return;
	case SSL_R_UNSUPPORTED_PROTOCOL:
	case SSL_R_NO_PROTOCOLS_AVAILABLE:
	case SSL_R_NO_SHARED_CIPHER:
	case SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
	case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
		snprintf(why, sizeof why, "protocol mismatch: no TLS version or cipher in common with the client (%s)",
		         tls_err_text(text, sizeof text, "?"));
		tls_fail(ts, why);
		return;
	default:
		break;
	}
	if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN || (err == 0 && e == SSL_ERROR_SSL)) {
		ERR_clear_error();
		if (saved_errno == EMSGSIZE)
			snprintf(why, sizeof why, "client sent more than 64 KiB before its ClientHello was complete");
		else if (saved_errno && saved_errno != EPIPE && saved_errno != ECONNRESET)
			snprintf(why, sizeof why, "client error during the TLS handshake: %s", strerror(saved_errno));
		else if (ts->st == TLS_ST_HELLO)
			snprintf(why, sizeof why, "client closed before finishing its ClientHello");
		else if (SSL_session_reused(ts->c.ssl))
			/* a resumption sends no certificate: ServerHello to Finished */
			snprintf(why, sizeof why, "client closed during a resumed TLS handshake, after capd's Finished");
		else
			snprintf(why, sizeof why, "client closed during the TLS handshake, after capd's certificate");
		tls_fail(ts, why);
		return;
	}
	snprintf(why, sizeof why, "client TLS handshake failed: %s", tls_err_text(text, sizeof text, "unknown error"));
	tls_fail(ts, why);
}

static void
tls_done(struct tls_session *ts)
{
	struct session *s = ts->s;
	const unsigned char *a;
	unsigned alen;

	ev_timer_stop(capd_loop, &ts->timer);
	tls_keep_drop(ts);
	if (ts->accept_only && ts->st == TLS_ST_FINISH) {
		tls_accepted(ts);
		return;
	}
	ts->st = TLS_ST_OPEN;
	s->client.tls = &ts->c;
	s->upstream.tls = &ts->u;
	SSL_get0_alpn_selected(ts->c.ssl, &a, &alen);
	/* a resumption asks for no certificate, but the server keeps that it
	 * got none (nginx's 400 "No required SSL certificate was sent") */
	/* the version is the client's; the server's when it differs (nginx
	 * before 1.23.4 speaks TLS 1.2 unless told otherwise) */
	bool other = SSL_version(ts->u.ssl) != SSL_version(ts->c.ssl);
	/* a resumed session keeps the identity its handshake presented */
	bool sent = ts->ident && (ts->ident_sent || (SSL_session_reused(ts->u.ssl) && ts->resume_ident_sent));
	const char *cc = sent ? strrchr(ts->ident->path, '/') : NULL;
	tls_session_summary(ts, "tls %s sni=%s%s%.*s%s%s%s%s%s%s", SSL_get_version(ts->c.ssl),
	                    ts->sni[0] ? ts->sni : "-", alen ? " alpn=" : "", (int)alen, (const char *)a,
	                    other ? " upstream=" : "", other ? SSL_get_version(ts->u.ssl) : "",
	                    SSL_session_reused(ts->u.ssl) ? " upstream-resumed" : "",
	                    sent ? " client-cert=" : "", sent ? (cc ? cc + 1 : ts->ident->path) : "",
	                    ts->cert_asked ? "; the server asked for a client certificate, capd sent none" :
	                    SSL_session_reused(ts->u.ssl) && ts->resume_cert_asked ?
	                    "; the server asked for a client certificate in the handshake this one resumes, "
	                    "capd sent none" : "");
	tls_stop_watchers(s);
	/* idle tunnels should hold no OpenSSL buffers (it refuses while bytes wait) */
	SSL_free_buffers(ts->c.ssl);
	SSL_free_buffers(ts->u.ssl);
	relay_start(s);
	/* the plaintext flow exists now; the ciphertext ones follow it in the file */
	if (s->state == SESSION_OPEN && s->tls == ts)
		tls_raw_open(ts);
}

static void
tls_client_step(struct tls_session *ts)
{
	struct tls_side *t = &ts->c;
	int r, e, saved;

	ERR_clear_error();
	r = SSL_do_handshake(t->ssl);
	saved = errno;
	if (r == 1) {
		if (ts->fail) {
			tls_fail(ts, ts->fail);
			return;
		}
		tls_done(ts);
		return;
	}
	e = SSL_get_error(t->ssl, r);
	switch (e) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		tls_arm(t->sd, e);
		return;
	case SSL_ERROR_WANT_CLIENT_HELLO_CB:
		break;
	default:
		tls_client_failed(ts, e, e == SSL_ERROR_SYSCALL ? saved : 0);
		return;
	}

	/* the ClientHello is in: pass through, or go upstream */
	struct session *s = ts->s;
	const char *pt;
	char ip[ADDR_STRLEN];

	ev_io_stop(capd_loop, &t->sd->rio);
	ev_io_stop(capd_loop, &t->sd->wio);
	if (ts->sni[0])
		snprintf(ts->host, sizeof ts->host, "%s", ts->sni);
	else if (s->target_name[0]) {
		snprintf(ts->host, sizeof ts->host, "%s", s->target_name);
		char *colon = strrchr(ts->host, ':');
		if (colon)
			*colon = '\0';
	} else if (s->have_target) {
		snprintf(ts->host, sizeof ts->host, "%s", addr_format_ip((struct sockaddr *)&s->target_addr, ip, sizeof ip));
	}
	capd_lock();
	pt = ts->accept_only ? NULL : tls_passthrough_why(ts->cfg, ts->host);
	capd_unlock();
	if (pt != NULL && ts->connect_host) {
		ts->pass = pt;  /* relayed once connected (tls_connected) */
		tls_connect(ts);
		return;
	}
	if (pt != NULL) {
		tls_plain(ts, pt);
		return;
	}
	t->tee = false;
	if (tls_tapped(ts))
		tls_cap(ts, TLS_LEG_CLIENT, DIR_UP, buf_head(&t->replay), buf_used(&t->replay));
	buf_free(&t->replay);
	if (ts->hello_version != 0 && ts->hello_version < TLS1_2_VERSION) {
		/* OpenSSL would refuse it only in the version negotiation that
		 * follows this callback, after capd's whole TLS handshake with the
		 * server, done for nothing; a passthrough name was let go above */
		char v[32];
		ts->fail = xasprintf("protocol mismatch: the client offers %s at most, capd takes TLS 1.2 or later",
		                     tls_version_name(ts->hello_version, v, sizeof v));
		ts->fail_alert = SSL_AD_PROTOCOL_VERSION;
		ts->st = TLS_ST_FINISH;
		tls_client_step(ts);
		return;
	}
	if (ts->no_ca != NULL || !ts->cfg->forges) {
		ts->fail = xstrdup(ts->no_ca ? ts->no_ca : "cannot intercept TLS: nothing to forge with");
		ts->fail_alert = SSL_AD_INTERNAL_ERROR;
		ts->st = TLS_ST_FINISH;
		tls_client_step(ts);
		return;
	}
	if (ts->accept_only) {
		tls_accept_hello(ts);
		return;
	}
	if (!ts->sni[0] && !s->have_target) {
		ts->fail = xstrdup("no SNI and no IP");
		ts->st = TLS_ST_FINISH;
		tls_client_step(ts);
		return;
	}
	if (ts->connect_host) {
		tls_connect(ts);
		return;
	}
	/* a client that gives up on a slow server must not be held until
	 * tls_timeout and then blamed on the server: tls_client_left */
	ev_io_start(capd_loop, &t->sd->rio);
	tls_upstream_begin(ts);
}

/* tls_hello_first: the client is to be served, so the server is needed now. */
static void
tls_connect(struct tls_session *ts)
{
	const char *host = ts->connect_host;

	ts->connect_host = NULL;
	ts->st = TLS_ST_CONNECT;
	ev_io_start(capd_loop, &ts->c.sd->rio);  /* tls_client_left */
	session_connect(ts->s, host, ts->connect_port);
}

/*
 * The client's socket while capd waits for the server's handshake. The client
 * waits for capd's ServerHello, so what it can say now is mostly that it left;
 * bytes (TLS 1.3 early data, which capd refuses anyway) are left for the
 * handshake to read, and the watch ends so that they do not wake the loop.
 */
static void
tls_client_left(struct tls_session *ts)
{
	char why[200];
	uint8_t b;
	ssize_t n = recv(ts->c.sd->fd, &b, 1, MSG_PEEK);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n > 0) {
		ev_io_stop(capd_loop, &ts->c.sd->rio);
		return;
	}
	if (n == 0)
		ts->s->client_eof = true;  /* the failed handshake's capture shows the client's FIN (tls_hs_ended) */
	if (n == 0 || errno == ECONNRESET)
		snprintf(why, sizeof why, "client closed during the TLS handshake, while capd waited for the server");
	else
		snprintf(why, sizeof why, "client error during the TLS handshake: %s", strerror(errno));
	tls_fail(ts, why);
}

/* TLS toward the upstream, with the client's SNI and ALPN offer. */
static void
tls_upstream_begin(struct tls_session *ts)
{
	struct session *s = ts->s;
	struct tls_side *u = &ts->u;
	SSL_SESSION *resume = NULL;
	char ip[ADDR_STRLEN];

	ts->st = TLS_ST_UPSTREAM;
	if (ts->cfg->verify)
		pthread_once(&tls_trust_once, tls_trust_load);
	if (tls_side_init(ts, u, &s->upstream, ts->cfg->verify ? tls_cli_verify : tls_cli_noverify,
	                  TLS_LEG_UPSTREAM) < 0) {
		tls_fail(ts, "cannot start the upstream TLS handshake (out of memory?)");
		return;
	}
	SSL_set_connect_state(u->ssl);
	if (ts->sni[0])
		SSL_set_tlsext_host_name(u->ssl, ts->sni);
	else if (ts->accept_only && s->target_name[0]) {
		/* reverse, no SNI from the client: the route's name (never an IP
		 * literal: session_connect keeps none), the one the certificate is
		 * verified against below, as nginx's proxy_ssl_server_name on */
		char host[sizeof s->target_name], *colon;
		snprintf(host, sizeof host, "%s", s->target_name);
		if ((colon = strrchr(host, ':')) != NULL)
			*colon = '\0';
		SSL_set_tlsext_host_name(u->ssl, host);
	} else if (!ts->accept_only && ts->host[0] && !addr_is_ip_literal(ts->host))
		/* no SNI, but the client named the server to the proxy (or the
		 * forwarder's `to` does): the name it is verified against is the one
		 * to ask for, as a client that connects itself would (a server with
		 * names of several sites otherwise shows its default certificate) */
		SSL_set_tlsext_host_name(u->ssl, ts->host);
	if (ts->accept_only) {
		/* the client already settled on HTTP/1.1 with capd */
		static const unsigned char h1[] = "\x08http/1.1";
		SSL_set_alpn_protos(u->ssl, h1, sizeof h1 - 1);
	} else if (ts->alpn_offer_len &&
	           SSL_set_alpn_protos(u->ssl, ts->alpn_offer, (unsigned)ts->alpn_offer_len) != 0) {
		ERR_clear_error();
	}
	if (ts->cfg->verify) {
		if (ts->accept_only && s->target_name[0]) {
			/* a route by name: the upstream's certificate is for that name,
			 * or for the client's SNI, which went to the server (a server
			 * of several sites, a CDN, answers with the SNI's certificate) */
			char host[sizeof s->target_name], *colon;
			snprintf(host, sizeof host, "%s", s->target_name);
			if ((colon = strrchr(host, ':')) != NULL)
				*colon = '\0';
			SSL_set1_host(u->ssl, host);
			if (ts->sni[0] && !addr_is_ip_literal(ts->sni))
				SSL_add1_host(u->ssl, ts->sni);
		} else if (ts->sni[0] && addr_is_ip_literal(ts->sni))
			X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(u->ssl), ts->sni);
		else if (ts->sni[0])
			SSL_set1_host(u->ssl, ts->sni);
		else if (ts->host[0] && !addr_is_ip_literal(ts->host))
			SSL_set1_host(u->ssl, ts->host);
		else if (s->have_target)
			X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(u->ssl),
			                              addr_format_ip((struct sockaddr *)&s->target_addr, ip, sizeof ip));
	}
	if (ts->cfg->nidents) {
		/* the name the SNI carries, else the address: mitmproxy's choice */
		const char *name = SSL_get_servername(u->ssl, TLSEXT_NAMETYPE_host_name);
		if (name == NULL && s->have_target)
			name = addr_format_ip((struct sockaddr *)&s->target_addr, ip, sizeof ip);
		ts->ident = tls_ident_for(ts->cfg, name);
	}
	/* what the verification checked is part of the key: a resumed session
	 * skips it; so is the client identity, which a resumed session keeps
	 * (one made with an instance's certificate never serves another's, or none) */
	snprintf(ts->resume_key, sizeof ts->resume_key, "%s|%d|%s|%s|%s", ts->ident ? ts->ident->id : "-",
	         ts->cfg->verify, ts->sni, s->target_name,
	         s->have_target ? addr_format((struct sockaddr *)&s->target_addr, ip, sizeof ip) : "-");
	capd_lock();
	struct tls_resume *rs = &tls_resume[tls_resume_slot(ts->resume_key)];
	/* a copy again: a resumed TLS 1.2 session is the connection's own, and
	 * OpenSSL marks it unusable when the connection ends without close_notify
	 * (curl --http2, browsers), which made every other handshake a full one */
	if (rs->sess && !strcmp(rs->key, ts->resume_key) && SSL_SESSION_is_resumable(rs->sess)) {
		resume = SSL_SESSION_dup(rs->sess);
		ts->resume_cert_asked = rs->cert_asked;
		ts->resume_ident_sent = rs->ident_sent;
	}
	capd_unlock();
	if (resume && SSL_set_session(u->ssl, resume) != 1)  /* takes its own reference */
		ERR_clear_error();
	SSL_SESSION_free(resume);
	tls_upstream_step(ts);
}

/* ---- the upstream side ---- */

static void
tls_upstream_done(struct tls_session *ts)
{
	struct session *s = ts->s;
	X509 *peer = SSL_get1_peer_certificate(ts->u.ssl), *forged, *rsa = NULL;
	STACK_OF(X509) *chain;
	const unsigned char *a;
	unsigned alen;
	char *why = NULL;
	struct sockaddr_storage local;
	socklen_t len = sizeof local;
	const struct sockaddr *ip = NULL;
	const char *name = ts->sni;

	ev_io_stop(capd_loop, &s->upstream.rio);
	ev_io_stop(capd_loop, &s->upstream.wio);
	if (ts->accept_only) {
		X509_free(peer);
		tls_done(ts);
		return;
	}
	/* the address the client believes is the server's, for a certificate that
	 * names nothing and a client that sent no SNI: a forwarder's own address
	 * (the client reached it), else the target the client asked the proxy for */
	if (ts->cfg->transparent && getsockname(s->client.fd, (struct sockaddr *)&local, &len) == 0)
		ip = (struct sockaddr *)&local;
	else if (s->have_target) {
		ip = (struct sockaddr *)&s->target_addr;
		/* one that named it (CONNECT vm:443, SOCKS by name) checks that name,
		 * not the address capd resolved it to: the name sent upstream as SNI
		 * (tls_connect), the one Java sends no SNI for when it has no dot */
		if (!ts->sni[0] && ts->host[0] && ts->host[0] != '[' && !addr_is_ip_literal(ts->host))
			name = ts->host;
	}
	capd_lock();  /* the certificate cache is shared by the shards; a reload may change the CA */
	forged = tls_ca_forge(peer, name, ip, ts->want_rsa ? &rsa : NULL, &why);
	chain = tls_ca_chain_ref();
	capd_unlock();
	X509_free(peer);
	tls_use_forged(ts, forged, rsa, chain, why);
	SSL_get0_alpn_selected(ts->u.ssl, &a, &alen);
	if (alen > 0 && alen <= sizeof ts->alpn_sel) {
		memcpy(ts->alpn_sel, a, alen);
		ts->alpn_sel_len = alen;
	}
	ts->st = TLS_ST_FINISH;
	tls_client_step(ts);
}

/* The upstream handshake failed (or timed out): the client learns it by an alert. */
static void
tls_upstream_failed(struct tls_session *ts, const char *why)
{
	ev_io_stop(capd_loop, &ts->u.sd->rio);
	ev_io_stop(capd_loop, &ts->u.sd->wio);
	if (ts->accept_only) {
		/* the client's handshake is long done and its request waits: no alert
		 * to give, but the proxy answers it as for a failed connect (reverse:
		 * 502 with why) rather than closing (curl: "Empty reply from server") */
		ev_timer_stop(capd_loop, &ts->timer);
		ts->st = TLS_ST_ACCEPTED;
		free(ts->s->why_connect);
		ts->s->why_connect = xstrdup(why);
		ts->s->inst->proto->connected(ts->s, EPROTO);
		return;
	}
	/* the client gets a handshake_failure alert (or ts->fail_alert), then the session closes with why */
	ts->fail = xstrdup(why);
	ts->st = TLS_ST_FINISH;
	tls_client_step(ts);
}

/*
 * tls_verify = yes keeps OpenSSL's security level (Debian's 2) toward the
 * server; tls_verify = no reaches below it (tls_client_ctx). Which failures
 * that may explain, said so that the user learns the way out: NULL for any
 * other. A bare handshake_failure alert may be a server that wants a
 * cipher or signature below the level (SHA-1) as well as anything else.
 */
static const char *
tls_weak_hint(long vr, unsigned long err)
{
	static const char below[] = "the server is below OpenSSL's security level; tls_verify = no reaches it";

	if (vr == X509_V_ERR_EE_KEY_TOO_SMALL || vr == X509_V_ERR_CA_KEY_TOO_SMALL || vr == X509_V_ERR_CA_MD_TOO_WEAK)
		return below;
	if (ERR_GET_LIB(err) != ERR_LIB_SSL)
		return NULL;
	switch (ERR_GET_REASON(err)) {
	case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
	case SSL_R_UNSUPPORTED_PROTOCOL:
		return "the server takes neither TLS 1.2 nor 1.3; tls_verify = no also offers TLS 1.0 and 1.1";
	case SSL_R_DH_KEY_TOO_SMALL:
	case SSL_R_EE_KEY_TOO_SMALL:
	case SSL_R_CA_KEY_TOO_SMALL:
	case SSL_R_CA_MD_TOO_WEAK:
	case SSL_R_LEGACY_SIGALG_DISALLOWED_OR_UNSUPPORTED:
	case SSL_R_WRONG_SIGNATURE_TYPE:
		return below;
	case SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE:
	case SSL_R_TLSV1_ALERT_INSUFFICIENT_SECURITY:
		return "tls_verify = no also offers SHA-1 signatures and ciphers below OpenSSL's security level";
	default:
		return NULL;
	}
}

/*
 * The server's first bytes are no TLS record: a plaintext port (HTTP's
 * "HTTP/1.1 400", SSH's banner). OpenSSL names only the record layer's
 * symptom ("wrong version number"); mitmproxy says "the remote server does
 * not speak TLS", which is what the user needs to hear.
 */
static bool
tls_upstream_plain(unsigned long err)
{
	if (ERR_GET_LIB(err) != ERR_LIB_SSL)
		return false;
	switch (ERR_GET_REASON(err)) {
	case SSL_R_WRONG_VERSION_NUMBER:
	case SSL_R_PACKET_LENGTH_TOO_LONG:
	case SSL_R_RECORD_LENGTH_MISMATCH:
	case SSL_R_UNKNOWN_PROTOCOL:
		return true;
	default:
		return false;
	}
}

static void
tls_verdict_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct session *s = w->data;

	(void)loop; (void)revents;
	if (s->tls && s->tls->st == TLS_ST_VERDICT) {
		s->tls->verdict_open = true;  /* until the server's first word: tls_side_late_verdict */
		tls_upstream_done(s->tls);  /* silence: the server took it, as before */
	}
}

/*
 * TLS 1.3 lets capd finish its handshake with the server before the server
 * has checked capd's (empty) Certificate: a server that requires one
 * refuses only then, by an alert, and the client, whose handshake with capd
 * had finished too, saw its request reset ("upstream reset"). So when the
 * server asked for a certificate, its word is waited for before the client's
 * handshake goes on: a session ticket, which servers send at once when they
 * take the handshake (OpenSSL, nginx, Go, Python), or bytes, and the session
 * goes on; the alert, which the client gets as the server sent it (a TLS
 * 1.3 client; others a handshake_failure), or an end, and it closes with the
 * reason. A server silent for TLS_VERDICT_WAIT took it (one that refuses
 * later: tls_side_late_verdict).
 */
static void
tls_verdict_start(struct tls_session *ts)
{
	ts->st = TLS_ST_VERDICT;
	ts->verdict_since = ev_now(capd_loop);
	ev_timer_init(&ts->verdict, tls_verdict_cb, TLS_VERDICT_WAIT, 0.);
	ts->verdict.data = ts->s;
	ev_timer_start(capd_loop, &ts->verdict);
	tls_upstream_verdict(ts);
}

static void
tls_upstream_verdict(struct tls_session *ts)
{
	struct tls_side *u = &ts->u;
	char b, why[400], text[200];
	int r, e, saved;

	ERR_clear_error();
	r = SSL_peek(u->ssl, &b, 1);  /* bytes stay for the relay */
	saved = errno;
	e = r > 0 ? SSL_ERROR_NONE : SSL_get_error(u->ssl, r);
	if (r > 0 || ts->ticket || e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		if (r > 0 || ts->ticket) {
			ev_timer_stop(capd_loop, &ts->verdict);
			tls_upstream_done(ts);
		} else {
			tls_arm(u->sd, e);
		}
		return;
	}
	ev_timer_stop(capd_loop, &ts->verdict);
	if (e == SSL_ERROR_SSL) {
		unsigned long err = ERR_peek_last_error();
		int alert = ERR_GET_LIB(err) == ERR_LIB_SSL ? ERR_GET_REASON(err) - SSL_AD_REASON_OFFSET : -1;
		/* a TLS 1.2 client knows no certificate_required */
		bool tls13_only = alert == TLS13_AD_CERTIFICATE_REQUIRED;
		if (alert > 0 && alert < 256 && (!tls13_only || ts->hello_version >= TLS1_3_VERSION))
			ts->fail_alert = alert;
		tls_err_text(text, sizeof text, "unknown error");
	} else {
		ERR_clear_error();
		snprintf(text, sizeof text, "%s", saved && saved != EAGAIN && e == SSL_ERROR_SYSCALL ? strerror(saved) :
		         "the server closed the connection");
	}
	snprintf(why, sizeof why,
	         "upstream handshake failed: the server asked for a client certificate, capd has none (%s)", text);
	tls_upstream_failed(ts, why);
}

static void
tls_upstream_step(struct tls_session *ts)
{
	struct tls_side *u = &ts->u;
	int r, e, saved;
	char why[400], text[200];

	ERR_clear_error();
	r = SSL_do_handshake(u->ssl);
	saved = errno;
	if (r == 1 && ts->cert_asked && SSL_version(u->ssl) >= TLS1_3_VERSION) {
		tls_verdict_start(ts);
		return;
	}
	if (r == 1) {
		if (ts->ident_sent && SSL_version(u->ssl) >= TLS1_3_VERSION) {
			/* nothing to wait for (the server usually takes what it asked
			 * for), but a refusal, which comes after the handshake, is named
			 * as one: tls_side_late_verdict */
			ts->verdict_since = ev_now(capd_loop);
			ts->verdict_open = true;
		}
		tls_upstream_done(ts);
		return;
	}
	e = SSL_get_error(u->ssl, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
		tls_arm(u->sd, e);
		return;
	}
	long vr = SSL_get_verify_result(u->ssl);
	bool verify_failed = ts->cfg->verify && vr != X509_V_OK;
	/* a certificate that did not verify is the cause, whatever error followed it */
	const char *weak = ts->cfg->verify ? tls_weak_hint(vr, verify_failed ? 0 : ERR_peek_last_error()) : NULL;
	if (verify_failed) {
		ERR_clear_error();
		snprintf(why, sizeof why, "upstream certificate did not verify: %s%s%s%s",
		         X509_verify_cert_error_string(vr), weak ? " (" : "", weak ? weak : "", weak ? ")" : "");
	} else if (weak && !ts->cert_asked) {
		snprintf(why, sizeof why, "upstream handshake failed: %s (%s)",
		         tls_err_text(text, sizeof text, "unknown error"), weak);
	} else if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) {
		ERR_clear_error();
		snprintf(why, sizeof why, "upstream handshake failed: %s",
		         saved && saved != EAGAIN ? strerror(saved) : "the server closed the connection");
	} else if (ts->cert_asked) {
		/* most servers answer a missing certificate with a bare handshake_failure */
		snprintf(why, sizeof why,
		         "upstream handshake failed: the server asked for a client certificate, capd has none (%s)",
		         tls_err_text(text, sizeof text, "unknown error"));
	} else {
		/* the server's refusal of what capd passed on from the client's
		 * hello (its ALPN list, its SNI) goes back to the client as the
		 * server's alert, as it would without capd: a client may act on it */
		unsigned long err = ERR_peek_last_error();
		int alert = ERR_GET_LIB(err) == ERR_LIB_SSL ? ERR_GET_REASON(err) - SSL_AD_REASON_OFFSET : -1;
		if (alert == SSL_AD_NO_APPLICATION_PROTOCOL || (alert == SSL_AD_UNRECOGNIZED_NAME && ts->sni[0]))
			ts->fail_alert = alert;
		bool plain = tls_upstream_plain(err);
		snprintf(why, sizeof why, "upstream handshake failed: %s%s%s%s%s",
		         tls_err_text(text, sizeof text, "unknown error"),
		         plain ? " (the server does not speak TLS on this port)" : "",
		         ts->ident_sent ? " (capd sent the client certificate from " : "",
		         ts->ident_sent ? ts->ident->path : "", ts->ident_sent ? ")" : "");
	}
	tls_upstream_failed(ts, why);
}

/* ---- start ---- */

static void
tls_begin(struct tls_session *ts)
{
	struct session *s = ts->s;
	char *why = NULL;
	SSL_CTX *ctx;

	ev_io_stop(capd_loop, &s->upstream.rio);
	ts->st = TLS_ST_HELLO;
	if (ts->cfg->forges && tls_ca_ensure_shared(&why) == 0) {
		ctx = tls_srv_ctx;
	} else {
		/* nothing to forge with: a config that passes every name through
		 * (it needs no CA), or a CA that cannot be made (instance_finish
		 * refuses such an instance, so this is rare). The hello is read
		 * all the same, from a context without certificates: a name passed
		 * through is relayed, any other gets an internal_error alert
		 * (tls_client_step), not a bare EOF */
		if (why)
			ts->no_ca = xasprintf("cannot intercept TLS: %s", why);
		else if (ts->cfg->forges)
			ts->no_ca = xstrdup("cannot intercept TLS");
		free(why);
		capd_lock();
		ctx = tls_bare_ctx();
		capd_unlock();
		if (ctx == NULL) {
			tls_fail(ts, ts->no_ca ? ts->no_ca : "cannot start the client TLS handshake (out of memory?)");
			return;
		}
	}
	if (tls_side_init(ts, &ts->c, &s->client, ctx, TLS_LEG_CLIENT) < 0) {
		tls_fail(ts, "cannot start the client TLS handshake (out of memory?)");
		return;
	}
	SSL_set_accept_state(ts->c.ssl);
	/* what the proxy read past its own handshake is the start of the ClientHello */
	ts->c.prefix = s->hs_in;
	memset(&s->hs_in, 0, sizeof s->hs_in);
	ts->c.tee = true;
	tls_client_step(ts);
}

static void
tls_peek(struct tls_session *ts)
{
	struct session *s = ts->s;
	uint8_t b[3];
	size_t have = buf_used(&s->hs_in) < sizeof b ? buf_used(&s->hs_in) : sizeof b;
	ssize_t n;
	int hello;

	if (have > 0)  /* an empty buf has no storage: memcpy from NULL is undefined even for 0 bytes */
		memcpy(b, buf_head(&s->hs_in), have);
	hello = have > 0 ? tls_peek_is_hello(b, have) : -1;
	if (hello < 0) {
		/* bytes the proxy read are the first; the socket's follow them.
		 * A peek of fewer than three that may be a hello takes them: a
		 * level-triggered watch would wake again and again for them */
		n = recv(s->client.fd, b + have, sizeof b - have, have > 0 ? 0 : MSG_PEEK);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				ev_io_start(capd_loop, &s->client.rio);
				/* a server that speaks first (SMTP, SSH) is not TLS either */
				if (!ts->accept_only)
					ev_io_start(capd_loop, &s->upstream.rio);
				return;
			}
			tls_plain(ts, NULL);  /* the relay reports the error */
			return;
		}
		if (n == 0) {
			tls_plain(ts, NULL);
			return;
		}
		if (have > 0)
			buf_append(&s->hs_in, b + have, (size_t)n);
		have += (size_t)n;
		hello = tls_peek_is_hello(b, have);
		if (hello < 0) {
			if (buf_used(&s->hs_in) == 0 && (n = recv(s->client.fd, b, have, 0)) > 0)
				buf_append(&s->hs_in, b, (size_t)n);
			ev_io_start(capd_loop, &s->client.rio);
			return;
		}
	}
	ev_io_stop(capd_loop, &s->client.rio);
	if (!hello) {
		tls_plain(ts, NULL);
		return;
	}
	ev_timer_stop(capd_loop, &ts->timer);
	ev_timer_set(&ts->timer, ts->cfg->timeout, 0.);
	ev_timer_start(capd_loop, &ts->timer);
	ts->timer_due = ev_time() + ev_timer_remaining(capd_loop, &ts->timer);
	tls_begin(ts);
}

/* The proxy's reply (SOCKS, CONNECT) reaches the client before any TLS. */
static void
tls_flush(struct tls_session *ts)
{
	struct session *s = ts->s;

	while (buf_used(&s->hs_out) > 0) {
		ssize_t n = send(s->client.fd, buf_head(&s->hs_out), buf_used(&s->hs_out), MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR) {
				ev_io_start(capd_loop, &s->client.wio);
				return;
			}
			tls_fail(ts, "client went away during the handshake");
			return;
		}
		buf_consume(&s->hs_out, (size_t)n);
	}
	buf_free(&s->hs_out);
	ev_io_stop(capd_loop, &s->client.wio);
	if (ts->cfg->mode == TLS_AUTO) {
		/* no handshake has begun: a client that is not TLS may wait as long
		 * as it could without capd, idle_timeout (reverse: its own deadline);
		 * the TLS timer starts with the first 0x16 */
		ev_timer_stop(capd_loop, &ts->timer);
		if (!ts->accept_only && s->inst->idle_timeout > 0) {
			ev_timer_set(&ts->timer, s->inst->idle_timeout, 0.);
			ev_timer_start(capd_loop, &ts->timer);
			ts->timer_due = ev_time() + ev_timer_remaining(capd_loop, &ts->timer);
		}
		ts->st = TLS_ST_PEEK;
		tls_peek(ts);
	} else {
		tls_begin(ts);
	}
}

static void
tls_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct session *s = w->data;
	struct tls_session *ts = s->tls;

	(void)loop; (void)revents;
	if (ts == NULL)
		return;
	switch (ts->st) {
	case TLS_ST_FLUSH:
		tls_flush(ts);
		break;
	case TLS_ST_PEEK:
		if (w == &s->upstream.rio)
			tls_plain(ts, NULL);
		else
			tls_peek(ts);
		break;
	case TLS_ST_HELLO:
	case TLS_ST_FINISH:
		tls_client_step(ts);
		break;
	case TLS_ST_UPSTREAM:
		if (w == &s->client.rio)
			tls_client_left(ts);
		else
			tls_upstream_step(ts);
		break;
	case TLS_ST_VERDICT:
		if (w == &s->client.rio)
			tls_client_left(ts);
		else
			tls_upstream_verdict(ts);
		break;
	case TLS_ST_CONNECT:
		if (w == &s->client.rio)
			tls_client_left(ts);
		break;
	case TLS_ST_ACCEPTED:
	case TLS_ST_OPEN:
	case TLS_ST_PASS:
		break;
	}
}

/* tls_intercept_start, and tls_hello_first with host (else NULL): connect
 * there once the hello is in. The hello may be waiting already, and read
 * (and acted on) before this returns. */
static void
tls_start_session(struct session *s, struct tls_cfg *cfg, const char *host, uint16_t port, tls_first_fn first)
{
	struct tls_session *ts;

	ts = xcalloc(1, sizeof *ts);
	ts->s = s;
	ts->cfg = cfg;
	ts->first_read = first;
	ts->connect_host = host;
	ts->connect_port = port;
	tls_capture_init(ts);
	s->tls = ts;
	tls_keylog_want(ts);
	session_set_deadline(s, 0);  /* our own timer covers the TLS handshakes */
	tls_stop_watchers(s);
	ev_io_init(&s->client.rio, tls_io_cb, s->client.fd, EV_READ);
	ev_io_init(&s->client.wio, tls_io_cb, s->client.fd, EV_WRITE);
	ev_io_init(&s->upstream.rio, tls_io_cb, s->upstream.fd, EV_READ);
	ev_io_init(&s->upstream.wio, tls_io_cb, s->upstream.fd, EV_WRITE);
	s->client.rio.data = s->client.wio.data = s->upstream.rio.data = s->upstream.wio.data = s;
	ev_timer_init(&ts->timer, tls_timeout_cb, ts->cfg->timeout, 0.);
	ts->timer.data = s;
	ev_timer_start(capd_loop, &ts->timer);
	ts->timer_due = ev_time() + ev_timer_remaining(capd_loop, &ts->timer);
	ts->st = TLS_ST_FLUSH;
	tls_flush(ts);
}

void
tls_intercept_start(struct session *s, struct tls_cfg *cfg, tls_first_fn first)
{
	if (cfg == NULL || cfg->mode == TLS_NO || tls_bio_meth == NULL) {
		relay_start(s);
		return;
	}
	tls_start_session(s, cfg, NULL, 0, first);
}

bool
tls_hello_first(struct session *s, struct tls_cfg *cfg, const char *host, uint16_t port)
{
	struct sockaddr_storage lit;
	socklen_t len;

	/* with auto a server may speak first (SMTP, SSH): it must be there to */
	if (cfg == NULL || cfg->mode != TLS_YES || tls_bio_meth == NULL)
		return false;
	/* the target as session_connect will set it, for the passthrough match
	 * (ts->host), the forged certificate and the close line */
	if (addr_from_literal(host, port, &lit, &len) == 0) {
		memcpy(&s->target_addr, &lit, len);
		s->have_target = true;
	} else {
		snprintf(s->target_name, sizeof s->target_name, "%s:%u", host, port);
	}
	tls_start_session(s, cfg, host, port, NULL);
	return true;
}

/* The connect after the hello failed: the client, whose hello waits, gets an
 * alert (a passed-through one none: capd does not speak TLS to it). */
static void
tls_connect_failed(struct tls_session *ts, const char *why)
{
	if (ts->pass) {
		tls_fail(ts, why);
		return;
	}
	ev_io_stop(capd_loop, &ts->c.sd->rio);
	ts->fail = xstrdup(why);
	ts->st = TLS_ST_FINISH;
	tls_client_step(ts);
}

void
tls_connected(struct session *s, int err)
{
	struct tls_session *ts = s->tls;

	if (err != 0) {
		tls_connect_failed(ts, s->why_connect ? s->why_connect : "connect failed");
		return;
	}
	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_init(&s->upstream.rio, tls_io_cb, s->upstream.fd, EV_READ);
	ev_io_init(&s->upstream.wio, tls_io_cb, s->upstream.fd, EV_WRITE);
	s->upstream.rio.data = s->upstream.wio.data = s;
	if (ts->pass) {
		tls_plain(ts, ts->pass);
		return;
	}
	ev_io_start(capd_loop, &s->client.rio);  /* tls_client_left */
	tls_upstream_begin(ts);
}

/* ---- the relay's helpers ---- */

/*
 * A server silent for TLS_VERDICT_WAIT after asking for a certificate was
 * taken to consent (tls_verdict_cb); one that only weighed it longer (an
 * OCSP or LDAP look-up of the certificate, a slow link) refuses now, when
 * the client's handshake is long done: no alert can reach the client any
 * more (OpenSSL sends none but its own), so the close reason at least says
 * what happened instead of "upstream TLS error" or "upstream reset".
 * Whether it applies: the server's first word is this error, within
 * tls_timeout of its handshake.
 */
static void
tls_side_late_verdict(struct tls_side *t, const char *what)
{
	struct tls_session *ts = t->ts;
	double late = ev_now(capd_loop) - ts->verdict_since;

	if (t->leg != TLS_LEG_UPSTREAM || !ts->verdict_open || ts->ticket)
		return;
	ts->verdict_open = false;
	/* later than a whole handshake may take, it is something else (a reset
	 * of a connection left idle) */
	if (late > ts->cfg->timeout)
		return;
	if (ts->ident_sent) {
		/* the file is in the note (client-cert=) */
		snprintf(t->why, sizeof t->why, "upstream refused capd's client certificate (%s after %.1f s)", what,
		         late);
		t->whole = true;
		return;
	}
	/* the session history keeps 159 bytes of a reason: the rest goes in the note */
	snprintf(t->why, sizeof t->why, "upstream handshake failed: the server asked for a client certificate, "
	         "capd has none (%s after %.1f s)", what, late);
	t->whole = true;
	tls_session_note(ts->s, "the server refused after capd had taken %.0f s of silence for consent and %s",
	                 TLS_VERDICT_WAIT, ts->accept_only ? "sent the request" : "finished the client's handshake");
}

static void
tls_side_error(struct tls_side *t, int e, int saved)
{
	char text[160];

	if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && saved == 0 && ERR_peek_error() == 0)) {
		t->eof = true;
		return;
	}
	if (e == SSL_ERROR_SYSCALL && saved != 0) {
		ERR_clear_error();
		t->err = saved;
		if (saved == ECONNRESET)
			tls_side_late_verdict(t, "it reset the connection");
		return;
	}
	tls_err_text(text, sizeof text, "unknown error");
	snprintf(t->why, sizeof t->why, "%s", text);
	t->err = EPROTO;
	tls_side_late_verdict(t, text);
}

/* Once: the client's first plaintext to the session's first_read. */
static void __attribute__((noinline))
tls_first_read(struct tls_session *ts, const void *p, size_t n)
{
	tls_first_fn fn = ts->first_read;

	ts->first_read = NULL;
	fn(ts->s, p, n);
}

ssize_t
tls_side_read(struct tls_side *t, void *p, size_t n)
{
	size_t got = 0;

	if (t->err) {
		errno = t->err;
		return -1;
	}
	if (t->eof)
		return 0;
	while (got < n) {
		int want = n - got > INT_MAX ? INT_MAX : (int)(n - got);
		int r, e, saved;

		ERR_clear_error();
		r = SSL_read(t->ssl, (char *)p + got, want);
		if (r > 0) {
			if (t->leg == TLS_LEG_UPSTREAM)
				t->ts->verdict_open = false;  /* the server spoke: it took the handshake */
			got += (size_t)r;
			continue;
		}
		saved = errno;
		e = SSL_get_error(t->ssl, r);
		if (e == SSL_ERROR_WANT_READ)
			break;
		if (e == SSL_ERROR_WANT_WRITE) {
			t->crossed = true;
			ev_io_start(capd_loop, &t->sd->wio);
			break;
		}
		tls_side_error(t, e, saved);
		if (t->eof && !t->close_notify) {
			/* a truncation attack, or a peer that never says goodbye: either
			 * way the other side must not take the end for a complete one */
			t->unclean = true;
			tls_session_note(t->ts->s, "%s ended without close_notify",
			                 t->leg == TLS_LEG_CLIENT ? "client" : "upstream");
		}
		if (t->eof && t->ts->raw_open && t->ts->raw[t->leg])
			spool_flow_fin(t->ts->raw[t->leg], t->rdir);
		break;
	}
	if (__builtin_expect(t->ts->first_read != NULL, 0) && got > 0 && t->leg == TLS_LEG_CLIENT)
		tls_first_read(t->ts, p, got);
	if (got > 0)
		return (ssize_t)got;
	if (t->eof)
		return 0;
	if (t->err) {
		errno = t->err;
		return -1;
	}
	errno = EAGAIN;
	return -1;
}

ssize_t
tls_side_write(struct tls_side *t, const void *p, size_t n)
{
	size_t put = 0;

	while (put < n) {
		int want = n - put > INT_MAX ? INT_MAX : (int)(n - put);
		int r, e, saved;

		ERR_clear_error();
		/*
		 * SSL_write makes one record (16 KiB at most) per call and our BIO
		 * sends it at once. Corking all but the last record of a write lets
		 * TCP send them as a few full segments instead of a push, a segment
		 * and a wake-up of the reader per record: on loopback that is most
		 * of the cost of a send. The last record, or one that waits
		 * (EAGAIN), is pushed as before; a cork left by the BIO is undone by
		 * the next push or the peer's ACKs.
		 */
		t->more = n - put > SSL3_RT_MAX_PLAIN_LENGTH;
		r = SSL_write(t->ssl, (const char *)p + put, want);
		t->more = false;
		if (r > 0) {
			put += (size_t)r;
			continue;
		}
		saved = errno;
		e = SSL_get_error(t->ssl, r);
		if (e == SSL_ERROR_WANT_WRITE)
			break;
		if (e == SSL_ERROR_WANT_READ) {
			t->crossed = true;
			ev_io_start(capd_loop, &t->sd->rio);
			break;
		}
		if (put > 0)
			break;  /* the error shows on the next call */
		if (e == SSL_ERROR_SYSCALL && saved != 0) {
			ERR_clear_error();
			errno = saved;
			return -1;
		}
		tls_side_error(t, e, saved);
		if (t->err == 0)
			t->err = EPIPE;  /* writing after the peer's close_notify */
		errno = t->err;
		return -1;
	}
	if (put > 0)
		return (ssize_t)put;
	errno = EAGAIN;
	return -1;
}

void
tls_side_shutdown(struct tls_side *t)
{
	struct tls_session *ts = t->ts;
	const struct tls_side *src = t == &ts->c ? &ts->u : &ts->c;

	/* what ended without close_notify ends here without one too: its peer
	 * sees what it would have seen without capd between */
	if (!src->unclean) {
		ERR_clear_error();
		SSL_shutdown(t->ssl);
		ERR_clear_error();
	}
	if (t->ts->raw_open && t->ts->raw[t->leg])
		spool_flow_fin(t->ts->raw[t->leg], t->rdir == DIR_UP ? DIR_DOWN : DIR_UP);
}

bool
tls_side_pending(const struct tls_side *t)
{
	return t->eof || t->err || buf_used(&t->prefix) > 0 || SSL_has_pending(t->ssl);
}

const char *
tls_side_fail(const struct tls_side *t)
{
	return t->whole ? t->why : NULL;
}

const char *
tls_side_why(const struct tls_side *t)
{
	return t->why[0] ? t->why : "TLS error";
}

bool
tls_side_crossed(struct tls_side *t)
{
	bool c = t->crossed;

	t->crossed = false;
	return c;
}

/* ---- terminating the client's TLS first (reverse) ---- */

/* Whether the client's ALPN list holds proto. */
static bool
tls_alpn_offered(const struct tls_session *ts, const char *proto)
{
	size_t n = strlen(proto);

	for (size_t i = 0; i < ts->alpn_offer_len; i += 1 + ts->alpn_offer[i])
		if (ts->alpn_offer[i] == n && i + 1 + n <= ts->alpn_offer_len && !memcmp(ts->alpn_offer + i + 1, proto, n))
			return true;
	return false;
}

/*
 * accept-only (reverse, which speaks HTTP/1.x): the client gets http/1.1, else
 * http/1.0, as nginx answers them. A client whose ALPN list has neither (h2
 * only, as gRPC) gets no_application_protocol (RFC 7301 3.2 SHALL), as from
 * nginx, instead of a handshake without ALPN that ends in a 505 it cannot read.
 */
static void
tls_accept_alpn(struct tls_session *ts)
{
	static const char *const served[] = { "http/1.1", "http/1.0" };
	char list[200] = "";
	size_t len = 0;

	for (size_t k = 0; k < sizeof served / sizeof *served; k++) {
		if (tls_alpn_offered(ts, served[k])) {
			ts->alpn_sel_len = strlen(served[k]);
			memcpy(ts->alpn_sel, served[k], ts->alpn_sel_len);
			return;
		}
	}
	if (ts->alpn_offer_len == 0 || ts->fail)
		return;
	for (size_t i = 0; i < ts->alpn_offer_len; i += 1 + ts->alpn_offer[i]) {
		size_t n = ts->alpn_offer[i];
		if (i + 1 + n > ts->alpn_offer_len || len + 2 + n + 7 > sizeof list) {  /* room for ", ..." */
			memcpy(list + len, len ? ", ..." : "...", len ? 6 : 4);
			break;
		}
		if (len) {
			list[len++] = ',';
			list[len++] = ' ';
		}
		for (size_t j = 0; j < n; j++) {
			unsigned char c = ts->alpn_offer[i + 1 + j];
			list[len++] = c > 0x20 && c < 0x7f ? (char)c : '?';
		}
		list[len] = '\0';
	}
	ts->fail = xasprintf("protocol mismatch: the client's ALPN offers %s, capd serves HTTP/1.1 here", list);
	ts->fail_alert = SSL_AD_NO_APPLICATION_PROTOCOL;
}

/* accept-only: the certificate comes from the SNI (else the address the
 * client reached), and the client gets HTTP/1.1 when it offers it. */
static void
tls_accept_hello(struct tls_session *ts)
{
	struct session *s = ts->s;
	struct sockaddr_storage local;
	socklen_t len = sizeof local;
	bool have_local = getsockname(s->client.fd, (struct sockaddr *)&local, &len) == 0;
	char *why = NULL;
	X509 *x, *rsa = NULL;
	STACK_OF(X509) *chain;

	capd_lock();
	x = tls_ca_forge(NULL, ts->sni[0] ? ts->sni : NULL, have_local ? (struct sockaddr *)&local : NULL,
	                 ts->want_rsa ? &rsa : NULL, &why);
	chain = tls_ca_chain_ref();
	capd_unlock();
	tls_use_forged(ts, x, rsa, chain, why);
	tls_accept_alpn(ts);
	ts->st = TLS_ST_FINISH;
	tls_client_step(ts);
}

/* The client's TLS is up: the proxy reads its (plaintext) handshake now. */
static void
tls_accepted(struct tls_session *ts)
{
	struct session *s = ts->s;

	ts->st = TLS_ST_ACCEPTED;
	s->client.tls = &ts->c;
	tls_restore_hs(ts);
	ev_io_start(capd_loop, &s->client.rio);
	/* a request may already wait inside OpenSSL, right behind the Finished */
	ev_feed_event(capd_loop, &s->client.rio, EV_READ);
}

void
tls_accept_start(struct session *s, struct tls_cfg *cfg)
{
	struct tls_session *ts;

	if (cfg == NULL || cfg->mode == TLS_NO || tls_bio_meth == NULL)
		return;
	ts = xcalloc(1, sizeof *ts);
	ts->s = s;
	ts->cfg = cfg;
	ts->accept_only = true;
	tls_capture_init(ts);
	s->tls = ts;
	tls_keylog_want(ts);
	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	ts->hs_rcb = ev_cb(&s->client.rio);
	ts->hs_wcb = ev_cb(&s->client.wio);
	ev_set_cb(&s->client.rio, tls_io_cb);
	ev_set_cb(&s->client.wio, tls_io_cb);
	s->client.rio.data = s->client.wio.data = s;
	ev_timer_init(&ts->timer, tls_timeout_cb, ts->cfg->timeout, 0.);
	ts->timer.data = s;
	ev_timer_start(capd_loop, &ts->timer);
	ts->timer_due = ev_time() + ev_timer_remaining(capd_loop, &ts->timer);
	ts->st = TLS_ST_FLUSH;
	tls_flush(ts);
}

void
tls_relay_start(struct session *s)
{
	struct tls_session *ts = s->tls;

	if (ts == NULL || !ts->accept_only || ts->st != TLS_ST_ACCEPTED) {
		relay_start(s);
		return;
	}
	ev_io_stop(capd_loop, &s->client.rio);
	ev_io_stop(capd_loop, &s->client.wio);
	ev_io_init(&s->upstream.rio, tls_io_cb, s->upstream.fd, EV_READ);
	ev_io_init(&s->upstream.wio, tls_io_cb, s->upstream.fd, EV_WRITE);
	s->upstream.rio.data = s->upstream.wio.data = s;
	ev_timer_set(&ts->timer, ts->cfg->timeout, 0.);
	ev_timer_start(capd_loop, &ts->timer);
	ts->timer_due = ev_time() + ev_timer_remaining(capd_loop, &ts->timer);
	tls_upstream_begin(ts);
}

/*
 * The client connection's TLS goes on in another session (http_handoff),
 * on the same loop thread: the SSL object with all it holds (records read
 * ahead, plaintext not yet taken, a pending close_notify), the BIO's
 * leftovers, the handshake's SNI and ALPN, and the ciphertext flow of the
 * client leg (tls_capture = both), which stays one flow for the one
 * connection, so the key log still decrypts all of it. from keeps its
 * upstream side, which ends with it.
 */
void
tls_client_move(struct session *from, struct session *to)
{
	struct tls_session *old = from->tls, *ts;

	if (old == NULL || from->client.tls != &old->c || to->tls != NULL)
		return;
	tls_raw_open(old);  /* the ciphertext kept so far goes to its flows first */
	ts = xcalloc(1, sizeof *ts);
	ts->s = to;
	ts->cfg = old->cfg;
	ts->accept_only = true;
	ts->st = TLS_ST_ACCEPTED;
	ts->capture = old->capture;
	memcpy(ts->sni, old->sni, sizeof ts->sni);
	memcpy(ts->alpn_offer, old->alpn_offer, sizeof ts->alpn_offer);
	ts->alpn_offer_len = old->alpn_offer_len;
	memcpy(ts->alpn_sel, old->alpn_sel, sizeof ts->alpn_sel);
	ts->alpn_sel_len = old->alpn_sel_len;
	ts->want_rsa = old->want_rsa;
	ts->hello_version = old->hello_version;
	ts->raw[TLS_LEG_CLIENT] = old->raw[TLS_LEG_CLIENT];
	old->raw[TLS_LEG_CLIENT] = NULL;
	ts->c = old->c;
	memset(&old->c, 0, sizeof old->c);
	ts->c.ts = ts;
	ts->c.sd = &to->client;
	BIO_set_data(SSL_get_rbio(ts->c.ssl), &ts->c);
	SSL_set_app_data(ts->c.ssl, ts);
	ev_init(&ts->timer, tls_timeout_cb);  /* tls_relay_start sets and starts it */
	ts->timer.data = to;
	from->client.tls = NULL;
	to->client.tls = &ts->c;
	to->tls = ts;
}

const char *
tls_client_sni(const struct session *s)
{
	return s->tls != NULL && s->client.tls != NULL && s->tls->sni[0] ? s->tls->sni : NULL;
}

const char *
tls_close_reason(struct session *s, const char *reason)
{
	static _Thread_local char b[300];

	if (s->tls == NULL || s->tls->pass == NULL)
		return reason;
	snprintf(b, sizeof b, "%s (%s)", reason, s->tls->pass);
	return b;
}

/*
 * Instances: the proxies and sniffers the user starts. An instance has a
 * protocol (a struct proto table), parsed parameters, and usually a TCP
 * listener whose accepted connections become sessions.
 */
#ifndef CAPD_INSTANCE_H
#define CAPD_INSTANCE_H

#include <ev.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/socket.h>

#include "addr.h"
#include "params.h"

struct instance;
struct session;

/*
 * What a protocol module plugs into the daemon. Only configure is required.
 * A proto-*.c file parses its handshake and picks the upstream; it hands the
 * two connected sockets to the relay and never moves payload bytes itself.
 */
struct proto {
	const char *name;          /* the type word: "forward", "socks" ... */
	const char *const *keys;   /* type-specific config keys, NULL-terminated */
	bool listens;              /* binds `listen` for TCP (sniff and trace do not) */
	bool sharded;              /* its TCP sessions may run on any shard (shard.h): a listener on each */
	size_t hs_max;             /* handshake byte budget for hs_in; 0 = 4 KiB */
	/* params -> inst->cfg. Also run by `capd -t`, so it must not bind or open anything. */
	int (*configure)(struct instance *inst, struct params *p);
	/* Optional: the part of starting that may wait (libpcap resolving a filter's
	 * host names). Once the daemon serves it runs on a thread of its own, on an
	 * instance nobody else sees yet, and must not touch a loop. -1 with *why. */
	int (*prepare)(struct instance *inst, char **why);
	/* After the listener is bound: extra sockets, pcap handles. -1 with *why. */
	int (*start)(struct instance *inst, char **why);
	void (*stop)(struct instance *inst);
	/* A client connection became session s (state handshake). */
	void (*accepted)(struct session *s);
	/* Handshake bytes arrived in s->hs_in (or the client closed: s->client_eof). */
	void (*input)(struct session *s);
	/* session_connect() finished: err 0, or an errno value (s->why_connect says more). */
	void (*connected)(struct session *s, int err);
	/* Optional: s ends in its handshake with no reply of capd's captured (a
	 * timeout, the client's close or reset, a handshake too large, a failed
	 * connect): puts what capd read, in its turns, into the refusal's capture
	 * (session_refused_heard), whose close session_end writes. Not called when
	 * the instance does not capture. */
	void (*hs_ended)(struct session *s);
	void (*session_free)(struct session *s);  /* frees s->proto_state */
	void (*free)(struct instance *inst);       /* frees inst->cfg */
	/* Adds type-specific fields to the instance object. */
	void (*describe)(struct instance *inst, json_t *obj);
	/* Optional: idle_timeout struck open session s. True when the module ends
	 * it its own way (http: 504 to a request still waiting for its response),
	 * or keeps it and re-arms s->timer (socks: its UDP association is not
	 * idle; a UDP relay's session: a datagram waits unread). */
	bool (*idle)(struct session *s);
	/* Optional, with live_keys: a reload that changes only those keys hands
	 * their new values over from fresh (configured, never started) instead
	 * of restarting the instance, so its open sessions go on. */
	const char *const *live_keys;
	void (*update)(struct instance *inst, struct instance *fresh);
};

enum instance_state { INSTANCE_RUNNING, INSTANCE_FAILED, INSTANCE_STOPPED };

/* One shard's watch on its instance's listening socket (all shards watch the same one). */
struct listener {
	struct instance *inst;
	struct shard *shard;
	int fd;
	ev_io io;
	ev_timer pause;               /* accept backs off a second on EMFILE */
};

/* Owned by the registry in instance.c; instance_remove() frees it. */
struct instance {
	TAILQ_ENTRY(instance) entry;
	char *name;
	uint64_t serial;             /* never reused in this run (chain.h) */
	const struct proto *proto;
	json_t *params;              /* canonical parameters, owned: reload diffs these */
	bool from_config;            /* reload may change it; capctl-added ones it leaves */
	void *cfg;                   /* protocol's parsed config, freed by proto->free */
	json_t *files;               /* owned: {path: SHA-256} of the files cfg was read from (params_file_read) */

	struct sockaddr_storage listen;
	socklen_t listen_len;
	char listen_str[ADDR_STRLEN]; /* or the interface / command for sniff and trace */
	struct listener *lis;         /* TCP listeners, one per shard for a sharded proto; NULL if none */
	unsigned nlis;

	bool capture, expose;
	bool intercepts;              /* TLS that may forge (tls_cfg.forges): its prepare step makes the CA's leaf keys */
	double idle_timeout, connect_timeout;

	enum instance_state state;
	bool never_started;           /* listed failed as it could not start: it listens on nothing */
	char *error;                  /* why it failed, or NULL */
	unsigned open_sessions;        /* under capd_lock (shard.h) */
	_Atomic uint64_t bytes_up, bytes_down;  /* every shard's sessions add to them */
	int spool_iface;              /* its pcapng interface, -1 when not capturing */
	void *proto_state;            /* runtime state of start/stop (sockets, pcap) */
};

TAILQ_HEAD(instance_list, instance);
extern struct instance_list instances;

const struct proto *proto_find(const char *type);
/* A reload's new params for inst that differ only in its proto's live_keys
 * are applied in place: true. False when the instance must restart. */
bool instance_update(struct instance *inst, json_t *params);
/* Validates params (a config section or instance.add) without starting anything.
 * files, unless NULL, gets what the check read ({path: SHA-256}, caller owns). */
int instance_check(json_t *params, const char *file, json_t *lines, int section_line, json_t **files, char **why);
/* The first file in files (instance_check's) whose content differs from what inst
 * was configured from, or that one of them read and the other did not; NULL when none. */
const char *instance_file_changed(const struct instance *inst, json_t *files);
/* Creates and starts an instance; params is borrowed (copied). Its prepare step runs inline. */
struct instance *instance_add(json_t *params, bool from_config, char **why);
/*
 * The same for a daemon that serves: a prepare step runs on a helper thread
 * and done is called on the main loop with the shards paused (maybe before
 * this returns) with the instance, or NULL and why (done owns neither).
 */
typedef void instance_added_fn(void *arg, struct instance *inst, const char *why);
void instance_add_async(json_t *params, bool from_config, instance_added_fn *done, void *arg);
/* At stop: ends the jobs whose prepare is over (their instances are refused
 * once instance_stop_accepting ran) and joins their threads; true when some
 * prepare still runs (a lookup may take the resolver's timeout), which capd
 * does not wait for. Main thread. */
bool instance_jobs_stop(void);
void instance_remove(struct instance *inst, const char *reason);
struct instance *instance_find(const char *name);
bool instance_was_removed(const char *name);  /* a name an instance had, removed since capd started */
/* Marks a running instance failed (interface went down...) and emits an event. */
void instance_fail(struct instance *inst, const char *why);
json_t *instance_json(struct instance *inst);  /* caller owns */
void instance_remove_all(void);
/* Stop accepting everywhere (shutdown); sessions continue, no instance starts. */
void instance_stop_accepting(void);

#endif

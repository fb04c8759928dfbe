/*
 * Live watching: per-session backlog and subscribers (session.tail), and
 * the daemon's event stream (events.subscribe).
 */
#ifndef CAPD_TAIL_H
#define CAPD_TAIL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "session.h"

struct ctl_conn;

/* A chunk crossed session s in direction d. */
void tail_data(struct session *s, enum dir d, const void *p, size_t n);
/* Whether d's next bytes may bypass the tail (the relay splices them): no
 * subscriber, and the backlog ring has reached tail_backlog, so nothing but
 * its content would be lost. False before the session's first byte. */
bool tail_can_skip(struct session *s, enum dir d);
/* n bytes of d passed unseen: offsets advance, the backlog held so far is dropped. */
void tail_skip(struct session *s, enum dir d, size_t n);
/* The session ended: subscribers get the end notice; frees s->tail. */
void tail_session_end(struct session *s);

/*
 * session.tail: c gets up to backlog bytes per direction of what s carried
 * (UINT64_MAX: all that is kept), then every chunk live, then "session.end".
 * The backlog goes out after the method's reply, in pieces as c's output
 * drains, whatever its size. dir: -1 both directions, else only that
 * one (DIR_UP, DIR_DOWN). -1 and *why (owned) when c holds too many
 * subscriptions already.
 */
int tail_subscribe(struct session *s, struct ctl_conn *c, uint64_t backlog, int dir, char **why);

/* True when someone listens for events: saves building objects nobody reads. */
bool events_active(void);
/* Emits an event ("session.open", ...) to subscribers; obj is stolen and gets "event" and "time". */
void events_emit(const char *event, json_t *obj);
/* events.subscribe: c gets an "event" notification per event until it hangs up; once per connection. */
int events_subscribe(struct ctl_conn *c, char **why);

#endif

/*
 * Live watching: per-session backlog and subscribers (session.tail), and
 * the daemon's event stream (events.subscribe).
 */
#ifndef CAPD_TAIL_H
#define CAPD_TAIL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "session.h"

/* A chunk crossed session s in direction d. */
void tail_data(struct session *s, enum dir d, const void *p, size_t n);
/* The session ended: subscribers get the end notice; frees s->tail. */
void tail_session_end(struct session *s);

/* True when someone listens for events: saves building objects nobody reads. */
bool events_active(void);
/* Emits an event ("session.open", ...) to subscribers; obj is stolen and gets "event" and "time". */
void events_emit(const char *event, json_t *obj);

#endif

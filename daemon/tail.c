/* Placeholder for live watching: tail subscribers and the event stream. */
#include "tail.h"

void tail_data(struct session *s, enum dir d, const void *p, size_t n) { (void)s; (void)d; (void)p; (void)n; }
void tail_session_end(struct session *s) { (void)s; }
void events_emit(const char *event, json_t *obj) { (void)event; json_decref(obj); }
bool events_active(void) { return false; }

/* Placeholder spool: accepts every record and writes nothing (replaced by the real writer). */
#include "spool.h"

#include <stdlib.h>

#include "capd.h"

struct spool_flow { int unused; };

int spool_start(const struct capd_settings *st, char **why) { (void)st; (void)why; return 0; }
void spool_reconfigure(const struct capd_settings *st) { (void)st; }
void spool_stop(void) {}
int spool_iface_add(const char *name, const char *description, int linktype, unsigned snaplen, bool tsnano)
{ (void)name; (void)description; (void)linktype; (void)snaplen; (void)tsnano; return 0; }
void spool_iface_remove(int iface) { (void)iface; }
struct spool_flow *spool_flow_open(int iface, uint64_t session_id, int proto, const struct sockaddr *client,
                                   const struct sockaddr *target, const char *comment)
{ (void)iface; (void)session_id; (void)proto; (void)client; (void)target; (void)comment; return calloc(1, sizeof(struct spool_flow)); }
void spool_flow_data(struct spool_flow *f, enum dir d, const void *p, size_t n) { (void)f; (void)d; (void)p; (void)n; }
void spool_flow_fin(struct spool_flow *f, enum dir d) { (void)f; (void)d; }
void spool_flow_close(struct spool_flow *f, bool reset) { (void)reset; free(f); }
void spool_packet(int iface, const struct timespec *ts, const void *p, size_t caplen, size_t origlen)
{ (void)iface; (void)ts; (void)p; (void)caplen; (void)origlen; }
void spool_keylog(const char *line) { (void)line; }
json_t *spool_status(void) { return json_pack("{s:s,s:i,s:i,s:i,s:i,s:i}", "file", "", "files", 0, "bytes", 0, "packets", 0, "dropped_packets", 0, "dropped_bytes", 0); }
int spool_rotate(char **why) { (void)why; return 0; }

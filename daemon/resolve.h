/*
 * Asynchronous name resolution with c-ares on the event loop; never a
 * blocking getaddrinfo. Honours /etc/hosts and /etc/resolv.conf.
 */
#ifndef CAPD_RESOLVE_H
#define CAPD_RESOLVE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#define RESOLVE_MAX 8

struct resolve_req;

/* err 0 with n >= 1 addresses, or err != 0 with why (borrowed for the call). */
typedef void (*resolve_cb)(void *arg, int err, const char *why, const struct sockaddr_storage *addrs, int n);

int resolve_init(char **why);
void resolve_shutdown(void);
/* Calls cb once, possibly later; literals answer at once. The IPv4
 * addresses come first, for a connect that tries each in turn. */
struct resolve_req *resolve_start(const char *host, uint16_t port, resolve_cb cb, void *arg);
/* The same in getaddrinfo's order (RFC 6724: ::1 before 127.0.0.1), for a
 * datagram, which goes to the first address alone. */
struct resolve_req *resolve_start_sorted(const char *host, uint16_t port, resolve_cb cb, void *arg);
/* The callback will not be called. */
void resolve_cancel(struct resolve_req *r);
/*
 * Whether an answer waits unread in one of this thread's resolver sockets;
 * each such socket is read later in this loop pass. The loop's clock stands
 * still while capd is not scheduled (held up under load, SIGSTOP), and after
 * such a pause libev runs an expired timer before the read: a deadline asks
 * this before it says a name did not resolve in time. Any name's answer
 * counts: the channel is the thread's.
 */
bool resolve_take_unread(void);

#endif

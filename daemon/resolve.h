/*
 * Asynchronous name resolution with c-ares on the event loop; never a
 * blocking getaddrinfo. Honours /etc/hosts and /etc/resolv.conf, whose
 * changes it follows as glibc does.
 */
#ifndef CAPD_RESOLVE_H
#define CAPD_RESOLVE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#define RESOLVE_MAX 8
#define RESOLVE_CONF "/etc/resolv.conf"

/*
 * resolv.conf as last looked at. glibc (2.26 on) reads the file again when
 * its inode, size or times change, and so does capd: the resolver here, and a
 * dns instance that takes its upstream from it.
 */
struct resolve_conf_seen {
	double checked;        /* loop time of the last look */
	bool exists;
	dev_t dev;
	ino_t ino;
	off_t size;
	struct timespec mtime, ctime;
};

struct resolve_req;

/* err 0 with n >= 1 addresses, or err != 0 with why (borrowed for the call). */
typedef void (*resolve_cb)(void *arg, int err, const char *why, const struct sockaddr_storage *addrs, int n);

int resolve_init(char **why);
void resolve_shutdown(void);
/* seen := the file as it is, at loop time now; before reading it. */
void resolve_conf_note(struct resolve_conf_seen *seen, double now);
/* Whether the file changed since seen, which then says how it is now. Looks
 * (one stat) only when a second has passed since the last look: call it as
 * often as wanted. */
bool resolve_conf_changed(struct resolve_conf_seen *seen, double now);
/* Calls cb once, possibly later; literals answer at once. The IPv4
 * addresses come first, for a connect that tries each in turn. A name may
 * find resolv.conf changed: it and those after it go to the new nameservers. */
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

/*
 * The tracer behind `capctl trace`: runs a command (or attaches to a
 * process) under ptrace, stops it only on network system calls (a seccomp
 * filter for a spawned command, every system call for --pid), copies the
 * bytes that crossed each TCP/UDP socket out of the tracee, and reports
 * them as socket events through a callback. Knows nothing about capd.
 */
#ifndef CAPCTL_TRACE_PTRACE_H
#define CAPCTL_TRACE_PTRACE_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

enum trace_kind {
	TRACE_EV_OPEN,      /* a socket (or a UDP peer of one) is first seen with both endpoints */
	TRACE_EV_DATA,      /* bytes sent or received by the application */
	TRACE_EV_LOST,      /* len bytes crossed that the tracer could not copy (splice): a gap */
	TRACE_EV_SHUTDOWN,  /* FIN in one direction: shutdown(2), or a read that returned 0 */
	TRACE_EV_CLOSE,     /* the last traced descriptor of the socket went away */
};

enum trace_dir { TRACE_SEND, TRACE_RECV };  /* from the application's point of view */

/* One event; everything in it is borrowed for the duration of the callback. */
struct trace_event {
	enum trace_kind kind;
	uint64_t sock;                      /* flow id: one per TCP socket, one per UDP socket and peer */
	bool tcp;
	bool server;                        /* the application accepted this connection */
	const struct sockaddr *local, *remote;
	enum trace_dir dir;                 /* DATA, LOST, SHUTDOWN */
	const uint8_t *data;                /* DATA */
	size_t len;                         /* DATA, LOST */
	pid_t pid;                          /* the process that made the call */
	const char *comm;                   /* its name */
	const char *reason;                 /* CLOSE */
};

typedef void (*trace_event_fn)(const struct trace_event *ev, void *arg);

/* Owned by the caller of trace_spawn/trace_attach; trace_free() releases it. */
struct tracer;

/* Checks that seccomp filters and ptrace are usable here; -1 with *why (caller frees). */
int trace_check(bool attach, char **why);

/*
 * Forks the command, stopped before exec under ptrace with the seccomp
 * filter not yet installed. The child's stdio are untouched. -1 with *why.
 */
struct tracer *trace_spawn(char *const argv[], trace_event_fn fn, void *arg, char **why);
/* Lets a spawned command go on to exec. -1 with *why ("cannot run X: ..."). */
int trace_release(struct tracer *t, char **why);
/* Attaches to every thread of a running process. -1 with *why. */
struct tracer *trace_attach(pid_t pid, trace_event_fn fn, void *arg, char **why);

pid_t trace_pid(struct tracer *t);
/* The process name of the main tracee ("curl"). */
const char *trace_comm(struct tracer *t);

/*
 * Runs until every tracee has exited (or, after attaching, until a stop
 * signal asked to detach). Returns the exit status to pass on: the
 * command's code, or 128 + signal when it was killed.
 *
 * stops: signals the caller has blocked, for trace_run to take as they
 * come (none is lost). A spawned command gets each but INT and QUIT
 * (those reached it from the terminal); once it has exited, the processes
 * it left behind get any of them; an attached process is detached.
 */
int trace_run(struct tracer *t, const sigset_t *stops);
/* Kills a spawned command that was never released. */
void trace_abort(struct tracer *t);
void trace_free(struct tracer *t);

#endif

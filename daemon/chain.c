/*
 * Chains of capd instances (chain.h): the set of listened ports, and the
 * notes that pass a chain from capd's upstream socket to the session that
 * accepts it. A note is keyed by the upstream socket's local port, which
 * chain_note binds before the connect (a port bound so is that socket's
 * alone), so the accepting shard finds it whichever thread runs first.
 */
#include "chain.h"

#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "addr.h"
#include "instance.h"
#include "xmalloc.h"

#define CHAIN_BUCKETS 256

/* A noted upstream socket, owned by the table until taken or forgotten. */
struct chain_note {
	struct chain_note *next;
	uint16_t port;
	bool udp;
	struct chain c;  /* the accepting session's: the sender's chain and the sender */
};

static uint64_t chain_ports[65536 / 64];  /* written with the shards paused */
static pthread_mutex_t chain_lock = PTHREAD_MUTEX_INITIALIZER;
static struct chain_note *chain_notes[CHAIN_BUCKETS];  /* under chain_lock */
static _Atomic unsigned chain_nnotes[2];  /* TCP, UDP */

void
chain_ports_update(void)
{
	struct instance *inst;

	memset(chain_ports, 0, sizeof chain_ports);
	TAILQ_FOREACH(inst, &instances, entry) {
		uint16_t port = addr_port((struct sockaddr *)&inst->listen);
		if (inst->proto->listens && !inst->never_started)  /* its port may be another program's */
			chain_ports[port / 64] |= 1ULL << (port % 64);
	}
}

bool
chain_port_listened(uint16_t port)
{
	return chain_ports[port / 64] & (1ULL << (port % 64));
}

struct instance *
chain_instance_at(const struct sockaddr *sa)
{
	struct instance *inst;

	/* only what never changes while the instance is listed: a worker may ask */
	TAILQ_FOREACH(inst, &instances, entry)
		if (inst->proto->listens && !inst->never_started && addr_reaches(sa, (struct sockaddr *)&inst->listen))
			return inst;
	return NULL;
}

bool
chain_has(const struct chain *c, const struct instance *inst)
{
	for (unsigned i = 0; c && i < c->n; i++)
		if (c->serial[i] == inst->serial)
			return true;
	return false;
}

unsigned
chain_len(const struct chain *c)
{
	return c ? c->n : 0;
}

uint16_t
chain_note(int fd, int type, const struct chain *c, const struct instance *from)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof ss;
	struct chain_note *n;
	uint16_t port;

	if (chain_len(c) >= CHAIN_MAX)
		return 0;
	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		return 0;
	/* the family's any address, port 0: the kernel picks a port for this socket alone */
	if (ss.ss_family == AF_INET)
		((struct sockaddr_in *)&ss)->sin_addr.s_addr = htonl(INADDR_ANY);
	else
		((struct sockaddr_in6 *)&ss)->sin6_addr = in6addr_any;
	addr_set_port((struct sockaddr *)&ss, 0);
	if (bind(fd, (struct sockaddr *)&ss, addr_len((struct sockaddr *)&ss)) < 0)
		return 0;
	len = sizeof ss;
	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0 || (port = addr_port((struct sockaddr *)&ss)) == 0)
		return 0;
	n = xcalloc(1, sizeof *n);
	n->port = port;
	n->udp = type == SOCK_DGRAM;
	if (c)
		n->c = *c;
	n->c.serial[n->c.n++] = from->serial;
	pthread_mutex_lock(&chain_lock);
	n->next = chain_notes[port % CHAIN_BUCKETS];
	chain_notes[port % CHAIN_BUCKETS] = n;
	atomic_fetch_add(&chain_nnotes[n->udp], 1);
	pthread_mutex_unlock(&chain_lock);
	return port;
}

/* Where the note of port is linked, or where it would be (*p NULL). Under chain_lock. */
static struct chain_note **
chain_at(uint16_t port, bool udp)
{
	struct chain_note **p = &chain_notes[port % CHAIN_BUCKETS];

	while (*p && ((*p)->port != port || (*p)->udp != udp))
		p = &(*p)->next;
	return p;
}

/* The note of port, unlinked (caller frees), or NULL. Under chain_lock. */
static struct chain_note *
chain_unlink(uint16_t port, bool udp)
{
	struct chain_note **p = chain_at(port, udp), *n = *p;

	if (n) {
		*p = n->next;
		atomic_fetch_sub(&chain_nnotes[udp], 1);
	}
	return n;
}

void
chain_forget(uint16_t port, int type)
{
	if (port == 0)
		return;
	pthread_mutex_lock(&chain_lock);
	free(chain_unlink(port, type == SOCK_DGRAM));
	pthread_mutex_unlock(&chain_lock);
}

struct chain *
chain_take(const struct sockaddr *peer)
{
	struct chain_note *n;
	struct chain *c = NULL;

	/* the note is made before the connect starts, so before this accept */
	if (atomic_load(&chain_nnotes[0]) == 0)
		return NULL;
	pthread_mutex_lock(&chain_lock);
	n = chain_unlink(addr_port(peer), false);
	pthread_mutex_unlock(&chain_lock);
	if (n) {
		c = xmalloc(sizeof *c);
		*c = n->c;
		free(n);
	}
	return c;
}

struct chain *
chain_find_udp(const struct sockaddr *peer)
{
	struct chain_note *n;
	struct chain *c = NULL;

	if (atomic_load(&chain_nnotes[1]) == 0)
		return NULL;
	pthread_mutex_lock(&chain_lock);
	if ((n = *chain_at(addr_port(peer), true)) != NULL) {
		c = xmalloc(sizeof *c);
		*c = n->c;
	}
	pthread_mutex_unlock(&chain_lock);
	return c;
}

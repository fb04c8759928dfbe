/* Unit tests for daemon/spool-follow.c, the writer's half of capture follow:
 * its bounded queue, and the losses it counts per interface. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "spool-follow.h"

static int wakes;

static void
wake(void)
{
	wakes++;
}

/* The queued records of type EPB, per interface handle (into n[0..2)). */
static void
count_epbs(const struct buf *b, unsigned *n)
{
	for (size_t off = 0; off + sizeof(struct frec) <= buf_used(b);) {
		struct frec r;

		memcpy(&r, buf_head(b) + off, sizeof r);
		if (r.type == FREC_EPB && r.iface >= 0 && r.iface < 2)
			n[r.iface]++;
		off += sizeof r + r.len;
	}
}

/* A full queue loses packets for the followers only, counted per interface:
 * a follower of one instance is not told of another's losses. */
static void
test_losses_per_interface(void **state)
{
	static uint8_t payload[65000];
	struct pcapng_idb idb = { .linktype = 101, .name = "x", .description = "x" };
	struct timespec ts = { 1, 0 };
	struct spool_follow_lost lost = { 0 };
	struct buf b;
	unsigned queued[2] = { 0, 0 };
	const unsigned sent0 = 700, sent1 = 3;  /* 700 x 65 KB: past the queue's 32 MiB */

	(void)state;
	spool_follow_start(wake);
	spool_follow_count(1);
	assert_true(spool_follow_wanted());
	for (unsigned i = 0; i < sent0; i++)
		spool_follow_packet(0, &idb, &ts, NULL, 0, payload, sizeof payload, sizeof payload, 0, NULL);
	for (unsigned i = 0; i < sent1; i++)
		spool_follow_packet(1, &idb, &ts, NULL, 0, payload, 10, 10, 0, NULL);
	spool_follow_take(&b, &lost);
	count_epbs(&b, queued);
	assert_true(queued[0] > 400 && queued[0] < sent0);
	assert_int_equal(queued[1], 0);
	assert_true(lost.len >= 2);
	assert_int_equal(lost.n[0], sent0 - queued[0]);
	assert_int_equal(lost.n[1], sent1);
	assert_true(wakes > 0);
	buf_free(&b);

	/* taken: the queue is empty and its counts start again; lost only grows */
	spool_follow_packet(1, &idb, &ts, NULL, 0, payload, 10, 10, 0, NULL);
	spool_follow_take(&b, &lost);
	queued[0] = queued[1] = 0;
	count_epbs(&b, queued);
	assert_int_equal(queued[1], 1);
	assert_int_equal(lost.n[1], sent1);
	buf_free(&b);
	free(lost.n);
	spool_follow_count(-1);
	assert_false(spool_follow_wanted());
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_losses_per_interface),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

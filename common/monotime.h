/*
 * The monotonic clock in seconds, for deadlines and intervals that a change
 * of the wall clock must not move (capctl's --timeout, the spool writer's
 * rotation and retries, the control group cache).
 */
#ifndef CAPD_MONOTIME_H
#define CAPD_MONOTIME_H

#include <time.h>

static inline double
mono_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif

/*
 * Logging: one line per call on stderr. Under systemd (JOURNAL_STREAM set)
 * each line starts with its syslog priority so journalctl keeps the level.
 */
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *log_prog = "capd";
static int log_level = LOG_LVL_INFO;
static int log_journal;

void
log_init(const char *prog, int level)
{
	log_prog = prog;
	log_level = level;
	log_journal = getenv("JOURNAL_STREAM") != NULL;
}

void
log_set_level(int level)
{
	log_level = level;
}

int
log_get_level(void)
{
	return log_level;
}

int
log_level_parse(const char *s)
{
	static const char *const names[] = {
		[LOG_LVL_ERROR] = "error", [LOG_LVL_WARNING] = "warning",
		[LOG_LVL_NOTICE] = "notice", [LOG_LVL_INFO] = "info",
		[LOG_LVL_DEBUG] = "debug",
	};
	for (int i = LOG_LVL_ERROR; i <= LOG_LVL_DEBUG; i++)
		if (strcmp(s, names[i]) == 0)
			return i;
	return -1;
}

static void
log_vemit(int pri, const char *fmt, va_list ap, const char *err)
{
	char line[2048];
	int n;

	if (pri > log_level)
		return;
	n = vsnprintf(line, sizeof line, fmt, ap);
	if (n < 0)
		return;
	if (log_journal)
		fprintf(stderr, "<%d>%s%s%s\n", pri, line, err ? ": " : "", err ? err : "");
	else
		fprintf(stderr, "%s: %s%s%s\n", log_prog, line, err ? ": " : "", err ? err : "");
}

#define LOG_FN(fn, pri, with_errno)                                   \
	void fn(const char *fmt, ...)                                     \
	{                                                                 \
		int saved = errno;                                            \
		va_list ap;                                                   \
		va_start(ap, fmt);                                            \
		log_vemit(pri, fmt, ap, with_errno ? strerror(saved) : NULL); \
		va_end(ap);                                                   \
		errno = saved;                                                \
	}

LOG_FN(log_warn, LOG_LVL_WARNING, 1)
LOG_FN(log_warnx, LOG_LVL_WARNING, 0)
LOG_FN(log_error, LOG_LVL_ERROR, 0)
LOG_FN(log_notice, LOG_LVL_NOTICE, 0)
LOG_FN(log_info, LOG_LVL_INFO, 0)
LOG_FN(log_debug, LOG_LVL_DEBUG, 0)

void
fatal(const char *fmt, ...)
{
	int saved = errno;
	va_list ap;

	va_start(ap, fmt);
	log_vemit(LOG_LVL_ERROR, fmt, ap, strerror(saved));
	va_end(ap);
	abort();
}

void
fatalx(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vemit(LOG_LVL_ERROR, fmt, ap, NULL);
	va_end(ap);
	abort();
}

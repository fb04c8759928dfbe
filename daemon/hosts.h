/*
 * Hosts-file redirection: capd's entries live in one marked block of the
 * hosts file, and capd never changes a line outside it. The block editor
 * (hosts_block_*) is pure and unit-tested; hosts_file_* do the atomic write
 * (temp file beside, fsync, rename, same mode and owner) with the in-place
 * fallback for bind-mounted files; hosts_add/remove/... are what the RPC
 * methods call.
 */
#ifndef CAPD_HOSTS_H
#define CAPD_HOSTS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>

#include "addr.h"

#define HOSTS_BEGIN "# BEGIN capd: entries managed by capd (capctl hosts); do not edit"
#define HOSTS_END "# END capd"
#define HOSTS_ADDR_MAX 46  /* INET6_ADDRSTRLEN */

struct hosts_entry {
	char name[HOST_MAX + 1];
	char addr[HOSTS_ADDR_MAX];
};

/*
 * A set of entries in insertion order: a name (case-insensitive) may have several, as the
 * lines of a hosts file may (an IPv4 and an IPv6 address; resolvers use every line), each
 * name and address once. Owner frees with hosts_set_free.
 */
struct hosts_set {
	struct hosts_entry *v;
	size_t n;
};

void hosts_set_free(struct hosts_set *set);
/* AF_INET or AF_INET6: the family of a normalised address (hosts_entry_check's norm). */
int hosts_addr_family(const char *addr);
/*
 * Points name at addr for addr's family: its first entry of that family takes addr, its
 * others of that family go, and its entries of the other family stay (an IPv4 and an IPv6
 * line for one name). With none of that family, the entry goes after the name's last line,
 * or at the end when it has none.
 */
void hosts_set_put(struct hosts_set *set, const char *name, const char *addr);
/* Adds the entry name addr unless it is there: name's other entries stay. */
void hosts_set_keep(struct hosts_set *set, const char *name, const char *addr);
/* Removes all of name's entries; false when there was none. */
bool hosts_set_del(struct hosts_set *set, const char *name);

/*
 * Reads capd's block out of text into *set (emptied first). Returns 1 when
 * the block is there, 0 when not, -1 with *why (caller frees) when it is
 * damaged (a begin marker without its end).
 */
int hosts_block_parse(const char *text, size_t len, struct hosts_set *set, char **why);
/*
 * The new file text: text with capd's block holding set (the block goes away
 * when set is empty; it is appended at the end when there was none). Lines
 * outside the block are kept byte for byte. NULL with *why on a damaged block.
 * Caller frees; *outlen is its length.
 */
char *hosts_block_apply(const char *text, size_t len, const struct hosts_set *set, size_t *outlen, char **why);

/*
 * The first line before capd's block (anywhere when there is none yet: the block
 * goes at the end) that maps name: its number from 1, with its address in addr;
 * 0 when no line does. Resolvers read the file from the top and take the first
 * line naming a host (gethostbyname; getaddrinfo's first address), so such a line
 * wins over capd's entry.
 */
size_t hosts_shadow(const char *text, size_t len, const char *name, char addr[HOSTS_ADDR_MAX]);

/* Checks a name and an address for an entry: 0, or -1 with *why (caller frees). *norm gets the canonical address. */
int hosts_entry_check(const char *name, const char *addr, char norm[HOSTS_ADDR_MAX], char **why);

/* Whole-file helpers. hosts_file_read: malloc'd text (NUL-terminated) or NULL with *why,
 * errno ENOENT when the file does not exist. */
char *hosts_file_read(const char *path, size_t *len, char **why);
/*
 * Computes a file's new text from its current one: malloc'd text and *outlen, or NULL with
 * *why. Returning a copy of cur (same bytes) means nothing to write.
 */
typedef char *(*hosts_edit_fn)(const char *cur, size_t len, size_t *outlen, void *arg, char **why);
/* Whether two stats are one file, unchanged: inode, size, mtime to the nanosecond. */
bool hosts_stat_same(const struct stat *a, const struct stat *b);
/*
 * Reads path (a missing file reads as empty) under its flock, computes the new text with fn,
 * and replaces the file atomically: a temp file beside it, fsync, rename, keeping mode and
 * owner. Another program may write the file meanwhile (it does not take the lock): lines it
 * appended go at the end of the temp file too; after any other change the temp file is
 * dropped and fn runs again on the new text, a bounded number of times, so fn may run more
 * than once per call. When rename cannot replace the file because it is a mount point
 * (EBUSY, EXDEV; containers bind-mount /etc/hosts), or no temp file can be made beside it,
 * the file is rewritten in place under flock, after a backup of the old text to
 * PATH.capd-backup (or backup_dir/hosts.capd-backup), with fn run again on the text read
 * under the lock. 0, or -1 with *why.
 */
int hosts_file_update(const char *path, const char *backup_dir, hosts_edit_fn fn, void *arg, char **why);

/* The daemon's operations on capd_settings->hosts_file. */
int hosts_add(const char *name, const char *addr, json_t **result, char **why);
int hosts_remove(const char *name, char **why);
json_t *hosts_list(char **why);  /* caller owns */
int hosts_clear(size_t *removed, char **why);
/* At a clean stop: removes capd's block when hosts_restore is set. */
void hosts_restore(void);

#endif

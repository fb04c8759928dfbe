/*
 * Privilege drop with the raw capability syscalls (libcap is not a
 * dependency): keep capabilities across setuid with PR_SET_KEEPCAPS, shrink
 * the bounding set while CAP_SETPCAP is still there, switch group and user,
 * then capset the few capabilities capd keeps into permitted and effective.
 *
 * Credentials are per thread in the kernel. glibc's setresuid/setgroups
 * apply to every thread; the spool writer thread (started earlier) loses
 * all its capabilities at that moment because only the main thread asked
 * to keep them, which is what it should have anyway.
 */
#include "privdrop.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "capd.h"
#include "control.h"
#include "log.h"
#include "spool.h"
#include "xmalloc.h"

#define PRIVDROP_DEFAULT_USER "capd"
#define PRIVDROP_NGROUPS 256

/* What the user may do to a file it does not own: owner, group or other write bit. */
static bool
privdrop_may_write(const struct stat *sb, uid_t uid, const gid_t *groups, int ngroups)
{
	if (sb->st_uid == uid)
		return (sb->st_mode & S_IWUSR) != 0;
	for (int i = 0; i < ngroups; i++)
		if (groups[i] == sb->st_gid)
			return (sb->st_mode & S_IWGRP) != 0;
	return (sb->st_mode & S_IWOTH) != 0;
}

/*
 * capctl hosts writes a temp file beside the hosts file and renames it over,
 * keeping owner and mode. The user can do that alone only when it may write
 * both the file and its folder, and already owns the file.
 */
static bool
privdrop_hosts_needs_root(const char *path, uid_t uid, const gid_t *groups, int ngroups)
{
	struct stat sb, db;
	char *dir, *slash;
	bool need;

	if (path == NULL || *path == '\0')
		return false;  /* nothing to manage */
	bool missing = stat(path, &sb) < 0;
	dir = xstrdup(path);
	slash = strrchr(dir, '/');
	if (slash == dir)
		dir[1] = '\0';
	else if (slash)
		*slash = '\0';
	else
		strcpy(dir, ".");
	/* a file not there yet is created in its folder: the folder decides */
	need = stat(dir, &db) < 0 || !privdrop_may_write(&db, uid, groups, ngroups) ||
	       (!missing && (sb.st_uid != uid || !privdrop_may_write(&sb, uid, groups, ngroups)));
	free(dir);
	return need;
}

/*
 * A folder capd writes, opened without following a symbolic link unless root
 * owns the link: an administrator's link to a bigger disk is followed, one the
 * user could have put in a folder of its own (toward /etc) is not.
 */
static int
privdrop_open_dir(const char *path)
{
	struct stat ls;
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	/* a link with O_NOFOLLOW | O_DIRECTORY fails as "not a directory" */
	if (fd >= 0 || (errno != ELOOP && errno != ENOTDIR) || lstat(path, &ls) < 0 || !S_ISLNK(ls.st_mode))
		return fd;
	if (ls.st_uid == 0)
		return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	errno = ELOOP;
	return -1;
}

/* Gives a folder capd writes, and what lies directly in it, to the user. */
static void
privdrop_chown_dir(const char *path, uid_t uid, gid_t gid)
{
	DIR *d;
	struct dirent *e;
	int dfd;

	if (path == NULL)
		return;
	if ((dfd = privdrop_open_dir(path)) < 0) {
		/* the user could not write there: capture would fail at its first file */
		if (errno != ENOENT)
			log_warnx("cannot give %s to uid %u: %s%s", path, (unsigned)uid, strerror(errno),
			          errno == ELOOP ? " (a symbolic link root does not own is not followed)" : "");
		return;
	}
	/* a group other than root's was chosen by the administrator (analysts who
	 * may read the spool, with the setgid bit giving it to each new file): kept */
	struct stat ds;
	gid_t dgid = fstat(dfd, &ds) == 0 && ds.st_gid != 0 ? (gid_t)-1 : gid;
	if (fchown(dfd, uid, dgid) < 0)
		log_warn("cannot give %s to uid %u", path, (unsigned)uid);
	if ((d = fdopendir(dfd)) == NULL) {
		close(dfd);
		return;
	}
	while ((e = readdir(d)) != NULL) {
		struct stat sb;

		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (fstatat(dfd, e->d_name, &sb, AT_SYMLINK_NOFOLLOW) < 0)
			continue;
		/* files and the folders capd makes (spool inside state_dir); never through a link */
		if ((S_ISREG(sb.st_mode) || S_ISDIR(sb.st_mode)) && sb.st_uid == 0)
			fchownat(dfd, e->d_name, uid, sb.st_gid != 0 ? (gid_t)-1 : gid, AT_SYMLINK_NOFOLLOW);
	}
	closedir(d);
}

static int
privdrop_capset(uint64_t keep)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

	memset(data, 0, sizeof data);
	for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++) {
		data[i].permitted = (uint32_t)(keep >> (32 * i));
		data[i].effective = data[i].permitted;
	}
	return (int)syscall(SYS_capset, &hdr, data);
}

/* Removes from the bounding set every capability not in keep (needs CAP_SETPCAP). */
static int
privdrop_bounding(uint64_t keep)
{
	for (int cap = 0; cap < 64; cap++) {
		int rc = prctl(PR_CAPBSET_READ, cap, 0, 0, 0);

		if (rc < 0)
			break;  /* past the kernel's last capability */
		if (rc == 1 && !(keep & (1ULL << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
			return -1;
	}
	return 0;
}

static void
privdrop_describe(uint64_t keep, char *out, size_t n)
{
	static const struct { int cap; const char *name; } names[] = {
		{ CAP_CHOWN, "CAP_CHOWN" }, { CAP_DAC_OVERRIDE, "CAP_DAC_OVERRIDE" },
		{ CAP_NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE" }, { CAP_NET_RAW, "CAP_NET_RAW" },
	};
	size_t len = 0;

	out[0] = '\0';
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (keep & (1ULL << names[i].cap))
			len += (size_t)snprintf(out + len, len < n ? n - len : 0, "%s%s", len ? " " : "", names[i].name);
}

int
privdrop(const struct capd_settings *st, char **why)
{
	const char *name = st->user;
	struct passwd *pw;
	gid_t groups[PRIVDROP_NGROUPS];
	int ngroups = PRIVDROP_NGROUPS;
	uint64_t keep = (1ULL << CAP_NET_BIND_SERVICE) | (1ULL << CAP_NET_RAW);
	char caps[128], uname[256];
	uid_t uid;
	gid_t gid;

	if (geteuid() != 0) {
		if (name && strcmp(name, PRIVDROP_DEFAULT_USER) != 0) {
			struct passwd *me = getpwuid(geteuid());
			if (me == NULL || strcmp(me->pw_name, name) != 0)
				log_notice("not running as root: user = %s ignored", name);
		}
		return 0;
	}
	if (name == NULL) {
		if ((pw = getpwnam(PRIVDROP_DEFAULT_USER)) == NULL) {
			log_notice("running as root: there is no user '%s' to switch to (set user =)", PRIVDROP_DEFAULT_USER);
			return 0;
		}
	} else if ((pw = getpwnam(name)) == NULL) {
		*why = xasprintf("user = %s: no such user", name);
		return -1;
	}
	if (pw->pw_uid == 0) {
		log_notice("running as root (user = %s)", pw->pw_name);
		return 0;
	}
	uid = pw->pw_uid;
	gid = pw->pw_gid;
	snprintf(uname, sizeof uname, "%s", pw->pw_name);
	name = uname;
	if (getgrouplist(name, gid, groups, &ngroups) < 0)
		ngroups = 0;
	if (privdrop_hosts_needs_root(st->hosts_file, uid, groups, ngroups))
		keep |= (1ULL << CAP_DAC_OVERRIDE) | (1ULL << CAP_CHOWN);

	/* what capd keeps writing after the switch */
	privdrop_chown_dir(st->state_dir, uid, gid);
	privdrop_chown_dir(st->spool, uid, gid);
	/* the socket's folder, if capd made it: the user removes socket and lock at stop */
	privdrop_chown_dir(control_made_dir(), uid, gid);
	spool_guard_user(uid, gid);  /* a process of its own: our switch is not its */

	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) {
		*why = xasprintf("prctl(PR_SET_KEEPCAPS): %s", strerror(errno));
		return -1;
	}
	if (privdrop_bounding(keep) < 0) {
		*why = xasprintf("cannot shrink the capability bounding set: %s", strerror(errno));
		return -1;
	}
	if (initgroups(name, gid) < 0 && setgroups(1, &gid) < 0) {
		*why = xasprintf("cannot set the groups of %s: %s", name, strerror(errno));
		return -1;
	}
	if (setresgid(gid, gid, gid) < 0) {
		*why = xasprintf("cannot switch to group %u: %s", (unsigned)gid, strerror(errno));
		return -1;
	}
	if (setresuid(uid, uid, uid) < 0) {
		*why = xasprintf("cannot switch to user %s: %s", name, strerror(errno));
		return -1;
	}
	if (privdrop_capset(keep) < 0) {
		*why = xasprintf("cannot keep capabilities after switching to %s: %s", name, strerror(errno));
		return -1;
	}
	prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
	/* the kernel made us non-dumpable at the switch; keep it so (keys, forged certificates) */
	if (setuid(0) == 0 || seteuid(0) == 0)
		fatalx("privilege drop: root came back");
	privdrop_describe(keep, caps, sizeof caps);
	log_notice("running as %s (uid %u, gid %u), keeping %s", name, (unsigned)uid, (unsigned)gid, caps);
	/* a reload reads the file as the user now: say so at start, not at the
	 * first systemctl reload (which checks it as root, and passes) */
	int fd = open(capd_config_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		log_warnx("%s cannot be read by %s (%s): reloads will fail until it can", capd_config_path, name,
		          strerror(errno));
	else
		close(fd);
	return 0;
}

/*
 * sniff: passive capture with libpcap. One pcap handle per instance in
 * non-blocking mode; its selectable fd sits in the libev loop and
 * each wake-up dispatches what the kernel ring holds into the spool, on a
 * pcapng interface of its own carrying the device's link type, snap length
 * and timestamp resolution. A sniffer has no listen address: its `listen` is
 * the interface. As with dumpcap, an interface taken down and up again is
 * captured on after it comes back; when it is deleted the instance fails (it
 * stays listed with the reason) and the daemon carries on.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <pcap/pcap.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capd.h"
#include "instance.h"
#include "log.h"
#include "spool.h"
#include "values.h"
#include "xmalloc.h"

#define SNIFF_SNAPLEN_MAX VALUE_SNAPLEN_MAX  /* libpcap's own default and ceiling */
/*
 * Asked of libpcap beyond snaplen, and cut off here: libpcap 1.10's TPACKET_V2
 * ring (immediate mode, or a kernel without TPACKET_V3) aligns the network
 * header within frames sized by the snap length, which takes 2 bytes of an
 * Ethernet (or loopback) packet's snaplen: `--snaplen 60` kept 58 bytes where
 * dumpcap -s 60 keeps 60.
 */
#define SNIFF_SNAP_SLACK 64u
/*
 * Kernel ring, and how long the kernel holds a part-filled block of it before
 * handing it over. Not immediate mode: libpcap 1.10 makes that a TPACKET_V2
 * ring of fixed frames as big as the snap length (64 KiB on a veth or lo, with
 * their offloads), so 32 MiB held 500 packets whatever their size, and a flood
 * of small UDP datagrams lost 8% of them where dumpcap (TPACKET_V3, packets
 * packed in blocks, 2 MiB) lost none. A block is handed over when full or
 * after SNIFF_TIMEOUT_MS, which bounds the delay a packet sees before capd
 * takes it (dumpcap waits 250 ms).
 */
/* buffer_size's default; libpcap maps all of it into capd (4 sniffers: 128 MiB resident) */
#define SNIFF_BUFFER (32u << 20)
#define SNIFF_TIMEOUT_MS 100
#define SNIFF_BATCH 256               /* packets per pcap_dispatch call */
#define SNIFF_ROUNDS 8                /* dispatch calls per wake-up before yielding to others */
#define SNIFF_STATS_EVERY 1.0         /* seconds between the counters told to the spool while packets come */
#define SNIFF_DOWN_CHECK 1.0          /* seconds between looks at a down interface: deleted, or up again? */

/* Parsed parameters. Owned by the instance; freed by sniff_free. */
struct sniff_cfg {
	char *interface;
	char *filter;                 /* NULL: everything */
	bool promisc;
	unsigned snaplen;
	unsigned buffer_size;         /* bytes of kernel ring asked of libpcap */
};

/* Runtime state between start and stop: sniff_start makes it, sniff_stop frees it. */
struct sniff_run {
	pcap_t *pcap;
	ev_io io;
	ev_timer down;                /* runs while the interface is down (sniff_down_cb) */
	unsigned ifindex;             /* of the interface at start; 0 for any */
	int linktype;                 /* pcapng LINKTYPE_ of the device */
	bool tsnano;
	ev_tstamp told;               /* when the spool last had its counters (sniff_stats) */
};

/* Counters; they outlive the pcap handle, so a failed sniffer still shows what it saw. */
struct sniff_counts {
	uint64_t packets;             /* handed to us by libpcap */
	uint64_t dropped_kernel;      /* pcap_stats ps_drop (dumpcap's "pcap" drops), last known */
	uint64_t dropped_interface;   /* ps_ifdrop: the device's own (dumpcap's ps_ifdrop), last known */
	uint64_t dropped_spool;       /* refused by the spool's queue */
};

/* inst->cfg of a sniffer: made by sniff_configure, freed by sniff_free. */
struct sniff {
	struct sniff_cfg cfg;
	struct sniff_counts n;
	struct sniff_run *run;        /* NULL when not running */
};

static const char *const sniff_keys[] = { "interface", "filter", "promisc", "snaplen", "buffer_size", NULL };

/* pcapng wants LINKTYPE_ values; libpcap hands out DLT_ values. They differ for a few. */
static int
sniff_linktype(int dlt)
{
	switch (dlt) {
	case DLT_RAW:
		return 101;               /* LINKTYPE_RAW */
	case DLT_ATM_RFC1483:
		return 100;
	case DLT_C_HDLC:
		return 104;
	default:
		return dlt;
	}
}

/*
 * What libpcap says against a filter before any device is open; NULL when
 * only the real device can tell. A filter that compiles for one of the
 * usual link types may suit the device (vlan on Ethernet, not on a cooked
 * capture). One none compiles is refused unless libpcap blamed a name it
 * could not look up (a host, port or protocol: the resolver may answer at
 * start) or the link type: an error in the expression itself, a syntax
 * error or a bad value alike (port 99999, net 10.0.0.1/8, a cut Ethernet
 * address), that `capd -t` would otherwise call good and start-up refuse.
 */
static char *
sniff_filter_check(const char *filter, unsigned snaplen)
{
	static const int dlts[] = { DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_RAW,
	                            DLT_IEEE802_11_RADIO, DLT_NULL };
	char *first = NULL;

	for (size_t i = 0; i < sizeof dlts / sizeof dlts[0]; i++) {
		pcap_t *dead = pcap_open_dead(dlts[i], (int)snaplen);
		struct bpf_program prog;
		bool ok;

		if (dead == NULL)
			continue;
		if ((ok = pcap_compile(dead, &prog, filter, 1, PCAP_NETMASK_UNKNOWN) == 0))
			pcap_freecode(&prog);
		else if (first == NULL)
			first = xstrdup(pcap_geterr(dead));
		pcap_close(dead);
		/* a name that did not resolve: no need to ask the resolver again per link type */
		if (ok || strstr(first, "unknown") != NULL) {
			free(first);
			return NULL;
		}
	}
	if (first != NULL && strstr(first, "support") != NULL) {
		free(first);
		return NULL;
	}
	return first;
}

static int
sniff_configure(struct instance *inst, struct params *p)
{
	struct sniff *sn = xcalloc(1, sizeof *sn);
	const char *iface = params_str(p, "interface", NULL);
	const char *filter = params_str(p, "filter", NULL);
	uint64_t snaplen, bufsize;

	inst->cfg = sn;
	if (json_object_get(p->obj, "listen"))
		return params_fail(p, "listen", "a sniffer has no listen address: set 'interface' instead");
	if (iface == NULL)
		return params_fail(p, NULL, "a sniff instance needs 'interface = NAME' (or 'any')");
	if (*iface == '\0' || strlen(iface) >= IFNAMSIZ || strpbrk(iface, " \t/") != NULL)
		return params_fail(p, "interface", "bad interface name '%s'", iface);
	if (params_bool(p, "promisc", false, &sn->cfg.promisc) < 0 ||
	    params_uint(p, "snaplen", SNIFF_SNAPLEN_MAX, SNIFF_SNAPLEN_MAX, &snaplen) < 0 ||
	    params_size(p, "buffer_size", SNIFF_BUFFER, &bufsize) < 0)
		return -1;
	if (bufsize < VALUE_SNIFF_BUFFER_MIN || bufsize > VALUE_SNIFF_BUFFER_MAX)
		return params_fail(p, "buffer_size", "buffer_size must be between 1M and 1G");
	sn->cfg.buffer_size = (unsigned)bufsize;
	if (sn->cfg.promisc && strcmp(iface, "any") == 0) {
		/* libpcap opens `any` without promiscuous mode whatever is asked (tcpdump
		 * warns and goes on): taken, warned of once when it starts and by
		 * `capd -t`, and shown off, so capctl list says what runs */
		params_warn(p, inst->name, "promisc",
		            "promiscuous mode is not supported on interface any: capturing without it");
		sn->cfg.promisc = false;
	}
	if (snaplen == 0)
		snaplen = SNIFF_SNAPLEN_MAX;
	sn->cfg.snaplen = (unsigned)snaplen;
	sn->cfg.interface = xstrdup(iface);
	/* empty or only blanks: no filter at all, as tcpdump and dumpcap compile it
	 * (libpcap takes it as "everything"), so the listing and the files show none */
	if (filter && filter[strspn(filter, " \t\r\n\v\f")] == '\0')
		filter = NULL;
	if (filter && !capd_serving) {
		char *bad;

		/*
		 * Errors show up here, with the config line, for `capd -t` and at
		 * start-up. Once the daemon serves, compiling here could wait on a
		 * host name's lookup in the loop: sniff_prepare's compile, off the
		 * loop, tells instead.
		 */
		if ((bad = sniff_filter_check(filter, sn->cfg.snaplen)) != NULL) {
			params_fail(p, "filter", "bad filter '%s': %s", filter, bad);
			free(bad);
			return -1;
		}
	}
	if (filter)
		sn->cfg.filter = xstrdup(filter);
	snprintf(inst->listen_str, sizeof inst->listen_str, "%s", iface);
	return 0;
}

/*
 * Refreshes the kernel's counts while the handle is open, and tells them to
 * the spool for the ISB that closes each file.
 */
static void
sniff_stats(struct instance *inst)
{
	struct sniff *sn = inst->cfg;
	struct pcap_stat ps;

	/*
	 * ps_ifdrop is what the device dropped before any capture could see it
	 * (libpcap reads the NIC's rx_missed/rx_fifo counters, in promiscuous
	 * mode only): dumpcap reports it apart from the capture's own drops, and
	 * writes only ps_drop in the ISB's isb_ifdrop, as we do.
	 */
	if (sn->run && pcap_stats(sn->run->pcap, &ps) == 0) {
		sn->n.dropped_kernel = ps.ps_drop;
		sn->n.dropped_interface = ps.ps_ifdrop;
	}
	if (sn->run)
		sn->run->told = ev_now(capd_loop);
	spool_iface_stats(inst->spool_iface, sn->n.dropped_kernel, sn->n.dropped_spool);
}

static void
sniff_packet_cb(u_char *arg, const struct pcap_pkthdr *h, const u_char *bytes)
{
	struct instance *inst = (struct instance *)arg;
	struct sniff *sn = inst->cfg;
	struct timespec ts;

	sn->n.packets++;
	inst->bytes_up += h->len;
	if (inst->spool_iface < 0)
		return;
	ts.tv_sec = h->ts.tv_sec;
	/* with nanosecond precision libpcap puts nanoseconds in tv_usec */
	ts.tv_nsec = sn->run->tsnano ? (long)h->ts.tv_usec : (long)h->ts.tv_usec * 1000;
	if (!spool_packet(inst->spool_iface, &ts, bytes, h->caplen < sn->cfg.snaplen ? h->caplen : sn->cfg.snaplen,
	                  h->len))
		sn->n.dropped_spool++;
}

enum sniff_link { SNIFF_UP, SNIFF_DOWN, SNIFF_GONE };

/*
 * What became of the interface the capture started on, found by its index:
 * one deleted and made again under the same name is another interface, its
 * packet socket no longer bound to anything. name (IFNAMSIZ bytes, or NULL)
 * gets its name now, "" when unknown.
 */
static enum sniff_link
sniff_iface_link(struct sniff *sn, char *name)
{
	struct ifreq ifr;
	int fd = pcap_fileno(sn->run->pcap);

	if (name)
		name[0] = '\0';
	if (sn->run->ifindex == 0)
		return SNIFF_UP;  /* any */
	memset(&ifr, 0, sizeof ifr);
	ifr.ifr_ifindex = (int)sn->run->ifindex;
	if (ioctl(fd, SIOCGIFNAME, &ifr) < 0)
		return errno == ENODEV || errno == ENXIO ? SNIFF_GONE : SNIFF_UP;
	if (name)
		snprintf(name, IFNAMSIZ, "%s", ifr.ifr_name);
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		return errno == ENODEV || errno == ENXIO ? SNIFF_GONE : SNIFF_UP;
	return (ifr.ifr_flags & IFF_UP) ? SNIFF_UP : SNIFF_DOWN;
}

static void
sniff_gone(struct instance *inst)
{
	char *why = xasprintf("capture on %s stopped: the interface disappeared", inst->listen_str);

	sniff_stats(inst);
	instance_fail(inst, why);  /* runs sniff_stop: sn->run is gone after this */
	free(why);
}

/* While the interface is down: nothing wakes the socket if it is deleted then. */
static void
sniff_down_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct instance *inst = w->data;
	struct sniff *sn = inst->cfg;
	char name[IFNAMSIZ];

	(void)revents;
	switch (sniff_iface_link(sn, name)) {
	case SNIFF_GONE:
		sniff_gone(inst);
		break;
	case SNIFF_UP:
		ev_timer_stop(loop, w);
		if (name[0] == '\0' || strcmp(name, inst->listen_str) == 0) {
			log_info("%s: interface %s is up again: capturing", inst->name, inst->listen_str);
			break;
		}
		/*
		 * Renamed while down (Linux renames only a down interface): the socket
		 * is bound to it by index, so the capture goes on there, as dumpcap's;
		 * `listen` says where, lest the old name, maybe given to another
		 * interface since, be taken for it.
		 */
		log_warnx("%s: interface %s is up again, renamed %s: capturing on it", inst->name, inst->listen_str,
		          name);
		snprintf(inst->listen_str, sizeof inst->listen_str, "%s", name);
		break;
	case SNIFF_DOWN:
		break;
	}
}

/*
 * A packet socket reports ENETDOWN when its interface goes down or is
 * deleted, and libpcap 1.10 in non-blocking mode never reads it: read here,
 * or the socket stays readable and the loop spins. The kernel binds the
 * socket again when the interface comes back up, so a down interface is
 * waited for, as dumpcap does; a deleted one fails the sniffer.
 */
static void
sniff_link_event(struct instance *inst)
{
	struct sniff *sn = inst->cfg;
	int err = 0;
	socklen_t len = sizeof err;

	(void)getsockopt(pcap_fileno(sn->run->pcap), SOL_SOCKET, SO_ERROR, &err, &len);
	switch (sniff_iface_link(sn, NULL)) {
	case SNIFF_GONE:
		sniff_gone(inst);
		break;
	case SNIFF_DOWN:
		if (!ev_is_active(&sn->run->down)) {
			log_warnx("%s: interface %s went down: capturing again once it is up", inst->name,
			          inst->listen_str);
			ev_timer_again(capd_loop, &sn->run->down);
		}
		break;
	case SNIFF_UP:
		break;
	}
}

static void
sniff_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct instance *inst = w->data;
	struct sniff *sn = inst->cfg;
	int n = 0;

	(void)revents;
	for (int round = 0; round < SNIFF_ROUNDS; round++) {
		n = pcap_dispatch(sn->run->pcap, SNIFF_BATCH, sniff_packet_cb, (u_char *)inst);
		if (n < SNIFF_BATCH)
			break;
	}
	if (n > 0 && ev_now(loop) - sn->run->told >= SNIFF_STATS_EVERY)
		sniff_stats(inst);
	if (n == PCAP_ERROR) {
		char *why = xasprintf("capture on %s stopped: %s", inst->listen_str, pcap_geterr(sn->run->pcap));

		sniff_stats(inst);
		instance_fail(inst, why);  /* runs sniff_stop: sn->run is gone after this */
		free(why);
	} else if (n == 0) {
		sniff_link_event(inst);
	}
}

/* Turns pcap_activate's answer into a sentence that says what to do. */
static char *
sniff_activate_error(struct sniff *sn, pcap_t *pc, int rc)
{
	const char *ifc = sn->cfg.interface;

	switch (rc) {
	case PCAP_ERROR_NO_SUCH_DEVICE:
		return xasprintf("no interface '%s'", ifc);
	case PCAP_ERROR_PERM_DENIED:
		return xasprintf("no permission to capture on %s: capd needs CAP_NET_RAW (%s)", ifc, pcap_geterr(pc));
	case PCAP_ERROR_PROMISC_PERM_DENIED:
		return xasprintf("no permission to put %s in promiscuous mode: capd needs CAP_NET_RAW", ifc);
	case PCAP_ERROR_IFACE_NOT_UP:
		return xasprintf("interface %s is down", ifc);
	case PCAP_ERROR_RFMON_NOTSUP:
		return xasprintf("%s does not support monitor mode", ifc);
	default:
		return xasprintf("cannot capture on %s: %s", ifc, *pcap_geterr(pc) ? pcap_geterr(pc) : pcap_statustostr(rc));
	}
}

/*
 * Opens, activates and filters the handle. Compiling a filter that names a
 * host has libpcap look the name up (getaddrinfo, which waits on DNS), so
 * once the daemon serves this runs on a helper thread (instance_add_async).
 */
static int
sniff_prepare(struct instance *inst, char **why)
{
	struct sniff *sn = inst->cfg;
	char errbuf[PCAP_ERRBUF_SIZE] = "";
	struct bpf_program prog;
	bpf_u_int32 net, mask;
	pcap_t *pc;
	int rc;
	bool tsnano;

	if ((pc = pcap_create(sn->cfg.interface, errbuf)) == NULL) {
		*why = xasprintf("cannot capture on %s: %s", sn->cfg.interface, errbuf);
		return -1;
	}
	pcap_set_snaplen(pc, (int)(sn->cfg.snaplen < SNIFF_SNAPLEN_MAX ? sn->cfg.snaplen + SNIFF_SNAP_SLACK
	                                                               : SNIFF_SNAPLEN_MAX));
	pcap_set_promisc(pc, sn->cfg.promisc);
	pcap_set_timeout(pc, SNIFF_TIMEOUT_MS);
	pcap_set_buffer_size(pc, (int)sn->cfg.buffer_size);
	tsnano = pcap_set_tstamp_precision(pc, PCAP_TSTAMP_PRECISION_NANO) == 0;
	rc = pcap_activate(pc);
	if (rc < 0) {
		*why = sniff_activate_error(sn, pc, rc);
		goto fail;
	}
	if (rc > 0)
		log_warnx("%s: %s: %s", inst->name, pcap_statustostr(rc), pcap_geterr(pc));
	if (rc == PCAP_WARNING_PROMISC_NOTSUP)
		sn->cfg.promisc = false;  /* it runs without: say so (not yet listed, so not racing) */
	if (sn->cfg.filter) {
		/*
		 * `ip broadcast` needs the netmask of the device's IPv4 address. pcap_lookupnet
		 * gives it in network byte order, the filter compiler takes it in host order.
		 */
		if (pcap_lookupnet(sn->cfg.interface, &net, &mask, errbuf) < 0)
			mask = PCAP_NETMASK_UNKNOWN;
		else
			mask = ntohl(mask);
		if (pcap_compile(pc, &prog, sn->cfg.filter, 1, mask) < 0) {
			*why = xasprintf("bad filter '%s': %s", sn->cfg.filter, pcap_geterr(pc));
			goto fail;
		}
		rc = pcap_setfilter(pc, &prog);
		pcap_freecode(&prog);
		if (rc < 0) {
			*why = xasprintf("cannot set filter on %s: %s", sn->cfg.interface, pcap_geterr(pc));
			goto fail;
		}
	}
	if (pcap_setnonblock(pc, 1, errbuf) < 0) {
		*why = xasprintf("cannot capture on %s: %s", sn->cfg.interface, errbuf);
		goto fail;
	}
	sn->run = xcalloc(1, sizeof *sn->run);
	sn->run->pcap = pc;
	sn->run->tsnano = tsnano && pcap_get_tstamp_precision(pc) == PCAP_TSTAMP_PRECISION_NANO;
	return 0;
fail:
	pcap_close(pc);
	return -1;
}

/* Puts the prepared handle in the loop and gives it a pcapng interface. */
static int
sniff_start(struct instance *inst, char **why)
{
	struct sniff *sn = inst->cfg;
	int fd, dlt = pcap_datalink(sn->run->pcap);

	if ((fd = pcap_get_selectable_fd(sn->run->pcap)) < 0) {
		*why = xasprintf("cannot capture on %s: no selectable descriptor", sn->cfg.interface);
		return -1;  /* sniff_free closes the handle */
	}
	if (strcmp(sn->cfg.interface, "any") != 0 && (sn->run->ifindex = if_nametoindex(sn->cfg.interface)) == 0) {
		*why = xasprintf("no interface '%s'", sn->cfg.interface);
		return -1;
	}
	if (sniff_iface_link(sn, NULL) != SNIFF_UP) {
		/* Linux lets a packet socket bind a down interface; dumpcap refuses it too */
		*why = xasprintf("interface %s is down", sn->cfg.interface);
		return -1;
	}
	sn->run->linktype = sniff_linktype(dlt);
	sn->n = (struct sniff_counts){ 0 };
	inst->proto_state = sn->run;
	if (inst->capture) {
		char *desc = xasprintf("capd sniff instance on %s%s%s", sn->cfg.interface,
		                       sn->cfg.filter ? ", filter " : "", sn->cfg.filter ? sn->cfg.filter : "");
		inst->spool_iface = spool_iface_add_sniffer(inst->name, desc, sn->run->linktype, sn->cfg.snaplen,
		                                             sn->run->tsnano, sn->cfg.filter);
		free(desc);
	}
	ev_io_init(&sn->run->io, sniff_read_cb, fd, EV_READ);
	sn->run->io.data = inst;
	ev_init(&sn->run->down, sniff_down_cb);
	sn->run->down.repeat = SNIFF_DOWN_CHECK;
	sn->run->down.data = inst;
	ev_io_start(capd_loop, &sn->run->io);
	log_info("%s: capturing on %s (%s, snaplen %u, %s timestamps%s%s)", inst->name, sn->cfg.interface,
	         pcap_datalink_val_to_name(dlt) ? pcap_datalink_val_to_name(dlt) : "?", sn->cfg.snaplen,
	         sn->run->tsnano ? "ns" : "us", sn->cfg.promisc ? ", promiscuous" : "",
	         sn->cfg.filter ? ", filtered" : "");
	return 0;
}

static void *
sniff_close_main(void *arg)
{
	pcap_close(arg);
	return NULL;
}

/*
 * Closing a packet socket waits for the kernel's RCU grace period
 * (packet_release's synchronize_net, and another to take the ring down):
 * 15 to 40 ms on the loop at each `capctl remove` or sniffer that failed,
 * every control client and the main loop's sessions held meanwhile. The
 * handle is no one's once out of the loop, so a detached thread closes it.
 * One still closing when capd exits is closed by the kernel: nothing is
 * written there (the counters were read before).
 */
static void
sniff_close(pcap_t *pc)
{
	pthread_attr_t attr;
	sigset_t all, old;
	pthread_t t;
	int err;

	/* no signal for it: they belong to the main loop */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	err = pthread_create(&t, &attr, sniff_close_main, pc);
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err != 0)
		pcap_close(pc);  /* no thread: here, as before */
}

static void
sniff_stop(struct instance *inst)
{
	struct sniff *sn = inst->cfg;

	if (sn == NULL || sn->run == NULL)
		return;
	sniff_stats(inst);
	ev_io_stop(capd_loop, &sn->run->io);
	ev_timer_stop(capd_loop, &sn->run->down);
	sniff_close(sn->run->pcap);
	free(sn->run);
	sn->run = NULL;
	inst->proto_state = NULL;
}

static void
sniff_free(struct instance *inst)
{
	struct sniff *sn = inst->cfg;

	if (sn == NULL)
		return;
	sniff_stop(inst);
	free(sn->cfg.interface);
	free(sn->cfg.filter);
	free(sn);
	inst->cfg = NULL;
}

static void
sniff_describe(struct instance *inst, json_t *o)
{
	struct sniff *sn = inst->cfg;

	sniff_stats(inst);
	json_object_set_new(o, "interface", json_string(sn->cfg.interface));
	if (sn->cfg.filter)
		json_object_set_new(o, "filter", json_string(sn->cfg.filter));
	json_object_set_new(o, "promisc", json_boolean(sn->cfg.promisc));
	json_object_set_new(o, "snaplen", json_integer(sn->cfg.snaplen));
	json_object_set_new(o, "buffer_size", json_integer(sn->cfg.buffer_size));
	if (sn->run) {
		int dlt = pcap_datalink(sn->run->pcap);
		const char *ln = pcap_datalink_val_to_name(dlt);
		json_object_set_new(o, "linktype", json_string(ln ? ln : "unknown"));
	}
	json_object_set_new(o, "packets", json_integer((json_int_t)sn->n.packets));
	json_object_set_new(o, "dropped_kernel", json_integer((json_int_t)sn->n.dropped_kernel));
	json_object_set_new(o, "dropped_interface", json_integer((json_int_t)sn->n.dropped_interface));
	json_object_set_new(o, "dropped_spool", json_integer((json_int_t)(sn->n.dropped_spool +
	                                                                  spool_iface_dropped(inst->spool_iface))));
}

const struct proto proto_sniff = {
	.name = "sniff",
	.keys = sniff_keys,
	.listens = false,
	.configure = sniff_configure,
	.prepare = sniff_prepare,
	.start = sniff_start,
	.stop = sniff_stop,
	.free = sniff_free,
	.describe = sniff_describe,
};

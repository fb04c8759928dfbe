/*
 * DNS message handling for the dns instance, with ldns for the wire format:
 * the answer rules, the decision for each client query, the answers capd
 * gives itself, error replies, and the check that an upstream's reply
 * belongs to the query it was sent for. No I/O here.
 */
#include "dns-msg.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <ldns/ldns.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "xmalloc.h"

int
dns_rules_add(struct dns_rules *r, const char *spec, char **why)
{
	const char *eq = strrchr(spec, '=');
	struct dns_rule rule;
	size_t nlen;
	char addr[INET6_ADDRSTRLEN + 2];  /* the longest IPv6 text (45) in brackets, and its NUL */
	bool bracket;

	memset(&rule, 0, sizeof rule);
	if (eq == NULL) {
		*why = xasprintf("bad answer rule '%s' (expected name=addr)", spec);
		return -1;
	}
	nlen = (size_t)(eq - spec);
	if (nlen == 0 || nlen > HOST_MAX) {
		*why = xasprintf("bad answer rule '%s' (expected name=addr)", spec);
		return -1;
	}
	memcpy(rule.pattern, spec, nlen);
	rule.pattern[nlen] = '\0';
	if (nlen > 1 && rule.pattern[nlen - 1] == '.' && strcmp(rule.pattern, "*.") != 0)
		rule.pattern[nlen - 1] = '\0';  /* "www.example.com." is the same name */
	if (strcmp(rule.pattern, "*") != 0) {
		const char *host = strncmp(rule.pattern, "*.", 2) == 0 ? rule.pattern + 2 : rule.pattern;
		if (!hostname_valid(host) || strchr(host, '*') != NULL) {
			*why = xasprintf("bad name '%s' in answer rule (a host name, *.suffix or *)%s", rule.pattern,
			                 hostname_idn_hint(host));
			return -1;
		}
	}
	if (strlen(eq + 1) > INET6_ADDRSTRLEN + 1) {
		*why = xasprintf("bad address in answer rule '%s' (an IPv4 or IPv6 address)", spec);
		return -1;
	}
	strcpy(addr, eq + 1);
	bracket = addr[0] == '[' && addr[strlen(addr) - 1] == ']';
	if (bracket) {
		memmove(addr, addr + 1, strlen(addr));
		addr[strlen(addr) - 1] = '\0';
	}
	if (inet_pton(AF_INET, addr, &rule.addr.v4) == 1) {
		if (bracket) {
			/* brackets are for IPv6 (RFC 3986 IP-literal), as in listen and upstream */
			*why = xasprintf("bad address in answer rule '%s' (brackets are for an IPv6 address: write %s)",
			                 spec, addr);
			return -1;
		}
		rule.family = AF_INET;
	} else if (inet_pton(AF_INET6, addr, &rule.addr.v6) == 1) {
		rule.family = AF_INET6;
	} else {
		*why = xasprintf("bad address in answer rule '%s' (an IPv4 or IPv6 address)", spec);
		return -1;
	}
	for (size_t i = 0; i < r->n; i++)
		if (r->v[i].family == rule.family && strcasecmp(r->v[i].pattern, rule.pattern) == 0 &&
		    memcmp(&r->v[i].addr, &rule.addr, sizeof rule.addr) == 0)
			return 0;  /* RFC 2181 5: an RRset holds no record twice; the same rule again is the one there */
	r->v = xrealloc(r->v, (r->n + 1) * sizeof *r->v);
	r->v[r->n++] = rule;
	return 0;
}

void
dns_rules_free(struct dns_rules *r)
{
	free(r->v);
	r->v = NULL;
	r->n = 0;
}

/*
 * The TSIG records ldns reads in p's additional section (as far as it reads),
 * record by record with ldns itself: where a record ends is ldns's to say, as
 * a name in the rdata may run past the record's RDLENGTH. Only messages with
 * two additional records or more are read: one TSIG is nothing to refuse.
 */
static unsigned
dns_wire_tsigs(const uint8_t *p, size_t n)
{
	static const ldns_pkt_section sections[] = { LDNS_SECTION_QUESTION, LDNS_SECTION_ANSWER,
	                                             LDNS_SECTION_AUTHORITY, LDNS_SECTION_ADDITIONAL };
	size_t pos = DNS_HEADER_LEN;
	unsigned tsigs = 0;

	if (n < DNS_HEADER_LEN || LDNS_ARCOUNT(p) < 2)
		return 0;
	for (size_t s = 0; s < 4; s++) {
		unsigned count = (unsigned)(p[4 + 2 * s] << 8 | p[5 + 2 * s]);

		for (unsigned i = 0; i < count; i++) {
			ldns_rr *rr = NULL;

			if (ldns_wire2rr(&rr, p, n, &pos, sections[s]) != LDNS_STATUS_OK)
				return tsigs;
			if (sections[s] == LDNS_SECTION_ADDITIONAL && ldns_rr_get_type(rr) == LDNS_RR_TYPE_TSIG)
				tsigs++;
			ldns_rr_free(rr);
		}
	}
	return tsigs;
}

/*
 * ldns_wire2pkt, with a message that holds more than one TSIG record refused
 * before ldns reads it: ldns (1.8.3) keeps the last one it reads and loses the
 * others, so that each such query from a client (or answer from an upstream)
 * leaked memory, some 100 KB for a 16 KB TCP query. A TSIG record is the
 * last one of its message (RFC 8945 5.1): two are malformed in any case.
 */
static ldns_status
dns_wire2pkt(ldns_pkt **pkt, const uint8_t *p, size_t n)
{
	if (dns_wire_tsigs(p, n) > 1)
		return LDNS_STATUS_ERR;
	return ldns_wire2pkt(pkt, p, n);
}

/* Exact names beat suffixes, longer suffixes beat shorter ones, and "*" comes last. */
static size_t
dns_rule_rank(const char *pattern)
{
	if (strcmp(pattern, "*") == 0)
		return 1;
	if (strncmp(pattern, "*.", 2) == 0)
		return 2 + strlen(pattern);
	return 1000 + strlen(pattern);
}

/*
 * Whether a "*.suffix" pattern that matched name did so at a label boundary (other
 * patterns: true). name is in presentation form, where a dot inside a label is
 * written "\.": "x\.game.test" (the labels "x.game" and "test") ends in the text
 * ".game.test" but is a name under test, not under game.test.
 */
static bool
dns_suffix_at_label(const char *pattern, const char *name)
{
	size_t nlen = strlen(name), plen = strlen(pattern) - 1;  /* ".suffix" */
	size_t dot, slashes = 0;

	if (strncmp(pattern, "*.", 2) != 0 || nlen <= plen)
		return true;
	dot = nlen - plen;
	while (slashes < dot && name[dot - 1 - slashes] == '\\')
		slashes++;
	return slashes % 2 == 0;  /* an odd count escapes the dot */
}

const char *
dns_rules_match(const struct dns_rules *r, const char *name)
{
	const char *best = NULL;
	size_t best_rank = 0;

	if (name[0] == '\0')
		return NULL;  /* the root is nobody's to claim */
	for (size_t i = 0; i < r->n; i++) {
		size_t rank = dns_rule_rank(r->v[i].pattern);
		if (rank > best_rank && hostname_match(r->v[i].pattern, name) &&
		    dns_suffix_at_label(r->v[i].pattern, name)) {
			best = r->v[i].pattern;
			best_rank = rank;
		}
	}
	return best;
}

/* Header-only reply: the query's id, opcode and RD, QR and RA set, rcode. */
static uint8_t *
dns_msg_header_reply(const uint8_t *p, int rcode, size_t *outlen)
{
	uint8_t *out = xcalloc(1, DNS_HEADER_LEN);

	out[0] = p[0];
	out[1] = p[1];
	out[2] = (uint8_t)(0x80 | (p[2] & 0x79));  /* QR, opcode, RD */
	out[3] = (uint8_t)(0x80 | (rcode & 0x0f));  /* RA */
	*outlen = DNS_HEADER_LEN;
	return out;
}

/* A reply skeleton for a parsed query: id, flags, the question, OPT (version 0, DO copied) when the client sent one.
 * An extended rcode (BADVERS) keeps its low 4 bits in the header and the rest in the OPT. */
static ldns_pkt *
dns_msg_reply_new(const ldns_pkt *qp, const ldns_rr *qrr, int rcode)
{
	ldns_pkt *a = ldns_pkt_new();

	ldns_pkt_set_id(a, ldns_pkt_id(qp));
	ldns_pkt_set_qr(a, true);
	ldns_pkt_set_opcode(a, ldns_pkt_get_opcode(qp));
	ldns_pkt_set_rd(a, ldns_pkt_rd(qp));
	ldns_pkt_set_cd(a, ldns_pkt_cd(qp));
	ldns_pkt_set_ra(a, true);
	ldns_pkt_set_rcode(a, (uint8_t)(rcode & 0x0f));
	if (qrr) {
		ldns_rr *qc = ldns_rr_clone(qrr);
		ldns_rr_set_question(qc, true);
		ldns_pkt_push_rr(a, LDNS_SECTION_QUESTION, qc);
	}
	if (ldns_pkt_edns(qp)) {
		ldns_pkt_set_edns_udp_size(a, DNS_EDNS_SIZE);
		ldns_pkt_set_edns_extended_rcode(a, (uint8_t)(rcode >> 4));
		ldns_pkt_set_edns_do(a, ldns_pkt_edns_do(qp));  /* RFC 3225 3: DO is copied into the response */
	}
	return a;
}

static uint8_t *
dns_msg_wire(const ldns_pkt *a, size_t *outlen)
{
	uint8_t *w = NULL;

	if (ldns_pkt2wire(&w, a, outlen) != LDNS_STATUS_OK) {
		free(w);
		return NULL;
	}
	return w;
}

uint8_t *
dns_msg_error(const uint8_t *p, size_t n, int rcode, size_t *outlen)
{
	ldns_pkt *qp = NULL, *a;
	uint8_t *w = NULL;

	if (n < DNS_HEADER_LEN)
		return NULL;
	if (((p[2] >> 3) & 0x0f) == LDNS_PACKET_QUERY && dns_wire2pkt(&qp, p, n) == LDNS_STATUS_OK &&
	    ldns_pkt_qdcount(qp) == 1) {
		a = dns_msg_reply_new(qp, ldns_rr_list_rr(ldns_pkt_question(qp), 0), rcode);
		w = dns_msg_wire(a, outlen);
		ldns_pkt_free(a);
	}
	ldns_pkt_free(qp);
	return w ? w : dns_msg_header_reply(p, rcode, outlen);
}

/* A new answer to the upstream's response rp: its id, opcode, RD, RA and CD; QR set. */
static ldns_pkt *
dns_msg_answer_head(const ldns_pkt *rp)
{
	ldns_pkt *a = ldns_pkt_new();

	ldns_pkt_set_id(a, ldns_pkt_id(rp));
	ldns_pkt_set_qr(a, true);
	ldns_pkt_set_opcode(a, ldns_pkt_get_opcode(rp));
	ldns_pkt_set_rd(a, ldns_pkt_rd(rp));
	ldns_pkt_set_ra(a, ldns_pkt_ra(rp));
	ldns_pkt_set_cd(a, ldns_pkt_cd(rp));
	return a;
}

/*
 * The reply a UDP client gets when an upstream's answer (n bytes) is larger
 * than it takes: what a resolver sends (RFC 2181 9, RFC 6891 7): the
 * answer's header with TC set, its (first) question and OPT record (options
 * dropped when even that would not fit), and no records, so that the client asks
 * again over TCP. An answer ldns cannot read is stood for by the query's
 * question. NULL when neither parses. Caller frees.
 */
uint8_t *
dns_msg_truncate(const uint8_t *query, size_t qlen, const uint8_t *p, size_t n, size_t max, size_t *outlen)
{
	ldns_pkt *rp = NULL, *qp = NULL, *a = NULL;
	uint8_t *w = NULL;

	if (dns_wire2pkt(&rp, p, n) == LDNS_STATUS_OK) {
		a = dns_msg_answer_head(rp);
		ldns_pkt_set_aa(a, ldns_pkt_aa(rp));
		ldns_pkt_set_rcode(a, ldns_pkt_get_rcode(rp));
		if (ldns_pkt_qdcount(rp) > 0) {
			/* the one that matched the query (dns_msg_reply_matches): it fits any client */
			ldns_rr *qc = ldns_rr_clone(ldns_rr_list_rr(ldns_pkt_question(rp), 0));
			ldns_rr_set_question(qc, true);
			ldns_pkt_push_rr(a, LDNS_SECTION_QUESTION, qc);
		}
		if (ldns_pkt_edns(rp)) {
			ldns_pkt_set_edns_udp_size(a, ldns_pkt_edns_udp_size(rp));
			ldns_pkt_set_edns_extended_rcode(a, ldns_pkt_edns_extended_rcode(rp));
			ldns_pkt_set_edns_version(a, ldns_pkt_edns_version(rp));
			ldns_pkt_set_edns_z(a, ldns_pkt_edns_z(rp));  /* DO with it */
			if (ldns_pkt_edns_data(rp))
				ldns_pkt_set_edns_data(a, ldns_rdf_clone(ldns_pkt_edns_data(rp)));
		}
	} else if (dns_wire2pkt(&qp, query, qlen) == LDNS_STATUS_OK && ldns_pkt_qdcount(qp) == 1) {
		a = dns_msg_reply_new(qp, ldns_rr_list_rr(ldns_pkt_question(qp), 0), LDNS_RCODE_NOERROR);
		ldns_pkt_set_id(a, dns_msg_id(p));
	}
	ldns_pkt_free(rp);
	ldns_pkt_free(qp);
	if (a == NULL)
		return NULL;
	ldns_pkt_set_tc(a, true);
	w = dns_msg_wire(a, outlen);
	if (w && *outlen > max && ldns_pkt_edns_data(a)) {
		/* the options alone are too many: the OPT record goes without them */
		free(w);
		ldns_rdf_deep_free(ldns_pkt_edns_data(a));
		ldns_pkt_set_edns_data(a, NULL);
		w = dns_msg_wire(a, outlen);
	}
	ldns_pkt_free(a);
	return w;
}

/*
 * The SOA capd stands behind for a name it answers: owned by the name itself,
 * so that it is in bailiwick for every resolver (an ancestor-or-self of the
 * question), with capd's rule TTL as its TTL and its MINIMUM, which RFC 2308 5
 * makes the time a resolver keeps a negative answer. Caller owns.
 */
static ldns_rr *
dns_msg_soa(const ldns_rr *qrr, uint32_t ttl)
{
	const uint32_t timers[] = { DNS_SOA_SERIAL, DNS_SOA_REFRESH, DNS_SOA_RETRY, DNS_SOA_EXPIRE, ttl };
	ldns_rr *rr = ldns_rr_new();

	ldns_rr_set_owner(rr, ldns_rdf_clone(ldns_rr_owner(qrr)));
	ldns_rr_set_class(rr, LDNS_RR_CLASS_IN);
	ldns_rr_set_ttl(rr, ttl);
	ldns_rr_set_type(rr, LDNS_RR_TYPE_SOA);
	ldns_rr_push_rdf(rr, ldns_dname_new_frm_str(DNS_SOA_MNAME));
	ldns_rr_push_rdf(rr, ldns_dname_new_frm_str(DNS_SOA_RNAME));
	ldns_rr_push_rdf(rr, ldns_native2rdf_int32(LDNS_RDF_TYPE_INT32, timers[0]));
	for (size_t i = 1; i < sizeof timers / sizeof timers[0]; i++)
		ldns_rr_push_rdf(rr, ldns_native2rdf_int32(LDNS_RDF_TYPE_PERIOD, timers[i]));
	return rr;
}

/*
 * Adds one address record per rule of pattern that fits the question type. A
 * question of a type the name has no record of (AAAA for a name with only an
 * A, MX, HTTPS...) gets NODATA: no answer and the SOA in the authority section,
 * without which a resolver cannot keep the negative answer (RFC 2308 2.2, 5)
 * and asks again at every lookup. An SOA question gets that SOA as its answer.
 */
static void
dns_msg_add_answers(ldns_pkt *a, const struct dns_rules *r, const char *pattern, const ldns_rr *qrr)
{
	ldns_rr_type qt = ldns_rr_get_type(qrr);
	size_t added = 0;

	for (size_t i = 0; i < r->n; i++) {
		const struct dns_rule *rule = &r->v[i];
		ldns_rr *rr;

		if (strcasecmp(rule->pattern, pattern) != 0)
			continue;
		if (rule->family == AF_INET && qt != LDNS_RR_TYPE_A && qt != LDNS_RR_TYPE_ANY)
			continue;
		if (rule->family == AF_INET6 && qt != LDNS_RR_TYPE_AAAA && qt != LDNS_RR_TYPE_ANY)
			continue;
		rr = ldns_rr_new();
		ldns_rr_set_owner(rr, ldns_rdf_clone(ldns_rr_owner(qrr)));
		ldns_rr_set_class(rr, LDNS_RR_CLASS_IN);
		ldns_rr_set_ttl(rr, r->ttl);
		if (rule->family == AF_INET) {
			ldns_rr_set_type(rr, LDNS_RR_TYPE_A);
			ldns_rr_push_rdf(rr, ldns_rdf_new_frm_data(LDNS_RDF_TYPE_A, 4, &rule->addr.v4));
		} else {
			ldns_rr_set_type(rr, LDNS_RR_TYPE_AAAA);
			ldns_rr_push_rdf(rr, ldns_rdf_new_frm_data(LDNS_RDF_TYPE_AAAA, 16, &rule->addr.v6));
		}
		ldns_pkt_push_rr(a, LDNS_SECTION_ANSWER, rr);
		added++;
	}
	if (qt == LDNS_RR_TYPE_SOA)
		ldns_pkt_push_rr(a, LDNS_SECTION_ANSWER, dns_msg_soa(qrr, r->ttl));
	else if (added == 0)  /* after a CNAME chain too (dns_msg_chain_answer): NODATA of its target */
		ldns_pkt_push_rr(a, LDNS_SECTION_AUTHORITY, dns_msg_soa(qrr, r->ttl));
	ldns_pkt_set_aa(a, true);
}

/* A name in presentation form without the final dot ("" for the root), as dns_rules_match takes it. */
static void
dns_name_text(const ldns_rdf *dname, char *out, size_t len)
{
	char *name = ldns_rdf2str(dname);
	size_t n;

	out[0] = '\0';
	if (name == NULL)
		return;
	n = strlen(name);
	if (n > 0 && name[n - 1] == '.')
		name[--n] = '\0';
	snprintf(out, len, "%s", name);
	free(name);
}

static void
dns_question_fill(struct dns_question *q, const ldns_pkt *qp, const ldns_rr *qrr)
{
	char *type = ldns_rr_type2str(ldns_rr_get_type(qrr));

	dns_name_text(ldns_rr_owner(qrr), q->qname, sizeof q->qname);
	if (type)
		snprintf(q->qtype_str, sizeof q->qtype_str, "%s", type);
	free(type);
	q->qtype = ldns_rr_get_type(qrr);
	q->qclass = ldns_rr_get_class(qrr);
	if (ldns_pkt_edns(qp) && ldns_pkt_edns_udp_size(qp) > DNS_UDP_MIN)
		q->udp_max = ldns_pkt_edns_udp_size(qp);
}

/*
 * Whether p, which ldns took, is well formed as BIND and Knot read a query
 * (RFC 6891 6.1.1): ldns takes an OPT record in any section, owned by any name,
 * several of them (it keeps the last), and bytes after the last record. Else
 * q->why says which.
 */
static bool
dns_msg_well_formed(const uint8_t *p, size_t n, struct dns_question *q)
{
	static const ldns_pkt_section sections[] = { LDNS_SECTION_QUESTION, LDNS_SECTION_ANSWER,
	                                             LDNS_SECTION_AUTHORITY, LDNS_SECTION_ADDITIONAL };
	static const char *const names[] = { "question", "answer", "authority", "additional" };
	size_t pos = DNS_HEADER_LEN;
	unsigned opts = 0;

	for (size_t s = 0; s < 4; s++) {
		unsigned count = (unsigned)(p[4 + 2 * s] << 8 | p[5 + 2 * s]);
		for (unsigned i = 0; i < count; i++) {
			ldns_rr *rr = NULL;
			if (ldns_wire2rr(&rr, p, n, &pos, sections[s]) != LDNS_STATUS_OK)
				return true;  /* cannot happen after ldns_wire2pkt took it */
			if (ldns_rr_get_type(rr) == LDNS_RR_TYPE_OPT) {
				if (sections[s] != LDNS_SECTION_ADDITIONAL)
					snprintf(q->why, sizeof q->why, "FORMERR: an OPT record in the %s section", names[s]);
				else if (ldns_rdf_size(ldns_rr_owner(rr)) != 1)  /* the root is one zero byte */
					snprintf(q->why, sizeof q->why, "FORMERR: an OPT record owned by a name, not the root");
				opts++;
			}
			ldns_rr_free(rr);
			if (q->why[0])
				return false;
		}
	}
	if (opts > 1)
		snprintf(q->why, sizeof q->why, "FORMERR: %u OPT records", opts);
	else if (pos < n)
		snprintf(q->why, sizeof q->why, "FORMERR: %zu byte%s after the message", n - pos, n - pos == 1 ? "" : "s");
	return q->why[0] == '\0';
}

/* RFC 6891 for a query capd answers itself: the rcode its OPT record calls for, q->why set when not NOERROR. */
static int
dns_msg_edns_rcode(const ldns_pkt *qp, struct dns_question *q)
{
	if (ldns_pkt_edns(qp) && ldns_pkt_edns_version(qp) > 0) {
		snprintf(q->why, sizeof q->why, "BADVERS: EDNS version %u", ldns_pkt_edns_version(qp));
		return DNS_RCODE_BADVERS;
	}
	return LDNS_RCODE_NOERROR;
}

/* q->rule of a localhost name that no rule of the instance claims (compared by address) */
static const char dns_localhost[] = "localhost";

/*
 * RFC 6761 6.3: "localhost" and the names below it are the loopback, and a
 * DNS server answers them itself (unbound's default local-zone) rather than
 * ask others: with the instance's rules when one matches (a "*" too), else
 * with these two. Built for each query: the rules of no instance, shared by
 * no thread. False for any other name.
 */
static bool
dns_localhost_rules(struct dns_rules *lr, struct dns_rule v[2], uint32_t ttl, const char *qname)
{
	if (strcasecmp(qname, dns_localhost) != 0 &&
	    !(hostname_match("*.localhost", qname) && dns_suffix_at_label("*.localhost", qname)))
		return false;
	memset(v, 0, 2 * sizeof *v);
	snprintf(v[0].pattern, sizeof v[0].pattern, "%s", dns_localhost);
	v[0].family = AF_INET;
	v[0].addr.v4.s_addr = htonl(INADDR_LOOPBACK);
	snprintf(v[1].pattern, sizeof v[1].pattern, "%s", dns_localhost);
	v[1].family = AF_INET6;
	v[1].addr.v6 = in6addr_loopback;
	lr->v = v;
	lr->n = 2;
	lr->ttl = ttl;
	return true;
}

enum dns_verdict
dns_msg_query(const struct dns_rules *r, const uint8_t *p, size_t n, bool tcp, struct dns_question *q,
              uint8_t **out, size_t *outlen)
{
	ldns_pkt *qp = NULL, *a;
	const ldns_rr *qrr;
	ldns_status st;
	int opcode, rcode;
	unsigned tsigs;
	struct dns_rules lr;
	struct dns_rule lv[2];

	memset(q, 0, sizeof *q);
	q->udp_max = DNS_UDP_MIN;
	*out = NULL;
	*outlen = 0;
	if (n < DNS_HEADER_LEN) {
		snprintf(q->why, sizeof q->why, "dropped: %zu byte%s, shorter than a DNS header", n, n == 1 ? "" : "s");
		return DNS_DROP;
	}
	q->id = dns_msg_id(p);
	if (p[2] & 0x80) {
		snprintf(q->why, sizeof q->why, "dropped: a response, not a query");
		return DNS_DROP;
	}
	opcode = (p[2] >> 3) & 0x0f;
	if (opcode != LDNS_PACKET_QUERY) {
		snprintf(q->why, sizeof q->why, "NOTIMP: opcode %d", opcode);
		*out = dns_msg_header_reply(p, LDNS_RCODE_NOTIMPL, outlen);
		return DNS_REPLY;
	}
	if ((tsigs = dns_wire_tsigs(p, n)) > 1) {
		snprintf(q->why, sizeof q->why, "FORMERR: %u TSIG records", tsigs);
		*out = dns_msg_header_reply(p, LDNS_RCODE_FORMERR, outlen);
		return DNS_REPLY;
	}
	/* dns_wire2pkt's TSIG count is the one just taken */
	if ((st = ldns_wire2pkt(&qp, p, n)) != LDNS_STATUS_OK) {
		snprintf(q->why, sizeof q->why, "FORMERR: %s", ldns_get_errorstr_by_id(st));
		*out = dns_msg_header_reply(p, LDNS_RCODE_FORMERR, outlen);
		return DNS_REPLY;
	}
	if (ldns_pkt_qdcount(qp) != 1) {
		snprintf(q->why, sizeof q->why, "FORMERR: %u questions", ldns_pkt_qdcount(qp));
		*out = dns_msg_header_reply(p, LDNS_RCODE_FORMERR, outlen);
		ldns_pkt_free(qp);
		return DNS_REPLY;
	}
	qrr = ldns_rr_list_rr(ldns_pkt_question(qp), 0);
	dns_question_fill(q, qp, qrr);
	/* QCLASS * (RFC 1035 3.2.5) asks for IN among the others: forwarded, it
	 * got the real address of a name capd redirects */
	if (q->qclass == LDNS_RR_CLASS_IN || q->qclass == LDNS_RR_CLASS_ANY) {
		q->rule = dns_rules_match(r, q->qname);
		if (q->rule == NULL && dns_localhost_rules(&lr, lv, r->ttl, q->qname)) {
			r = &lr;
			q->rule = dns_localhost;
		}
	}
	/*
	 * Not well formed is FORMERR for a forwarded name too, as for capd's own:
	 * capd relays the client's bytes as they are, and a strict upstream drops
	 * such a query unanswered, which left the client waiting out the tries
	 * (4.5 s) for SERVFAIL.
	 */
	if (!dns_msg_well_formed(p, n, q)) {
		rcode = LDNS_RCODE_FORMERR;
	} else if (q->rule == NULL) {
		snprintf(q->why, sizeof q->why, "forwarded");
		ldns_pkt_free(qp);
		return DNS_FORWARD;
	} else if ((rcode = dns_msg_edns_rcode(qp, q)) == LDNS_RCODE_NOERROR && dns_msg_is_xfr(q->qtype)) {
		/* RFC 5936 2.2: a transfer opens with its zone's SOA, and capd has no zone
		 * to send; an empty NOERROR is a broken transfer, REFUSED says no (2.2.1) */
		snprintf(q->why, sizeof q->why, "REFUSED: %s of a name rule %s answers", q->qtype_str, q->rule);
		rcode = LDNS_RCODE_REFUSED;
	}
	if (rcode != LDNS_RCODE_NOERROR) {
		a = dns_msg_reply_new(qp, qrr, rcode);
		*out = dns_msg_wire(a, outlen);
		ldns_pkt_free(a);
		ldns_pkt_free(qp);
		if (*out == NULL) {
			snprintf(q->why, sizeof q->why, "SERVFAIL: cannot build the answer");
			*out = dns_msg_header_reply(p, LDNS_RCODE_SERVFAIL, outlen);
		}
		return DNS_REPLY;
	}
	a = dns_msg_reply_new(qp, qrr, LDNS_RCODE_NOERROR);
	dns_msg_add_answers(a, r, q->rule, qrr);
	*out = dns_msg_wire(a, outlen);
	if (*out && !tcp && *outlen > q->udp_max) {
		/* too many records for the client's UDP size: an empty truncated answer sends it to TCP */
		ldns_pkt_free(a);
		free(*out);
		a = dns_msg_reply_new(qp, qrr, LDNS_RCODE_NOERROR);
		ldns_pkt_set_aa(a, true);
		ldns_pkt_set_tc(a, true);
		*out = dns_msg_wire(a, outlen);
	}
	ldns_pkt_free(a);
	ldns_pkt_free(qp);
	if (*out == NULL) {
		snprintf(q->why, sizeof q->why, "SERVFAIL: cannot build the answer");
		*out = dns_msg_header_reply(p, LDNS_RCODE_SERVFAIL, outlen);
		return DNS_REPLY;
	}
	if (q->rule == dns_localhost)
		snprintf(q->why, sizeof q->why, "answered: a localhost name is the loopback (RFC 6761)");
	else
		snprintf(q->why, sizeof q->why, "answered by rule %s", q->rule);
	return DNS_REPLY;
}

/* The CNAME record of name in an answer section, or NULL. */
static const ldns_rr *
dns_msg_cname_of(const ldns_rr_list *an, const ldns_rdf *name)
{
	for (size_t i = 0; i < ldns_rr_list_rr_count(an); i++) {
		const ldns_rr *rr = ldns_rr_list_rr(an, i);
		if (ldns_rr_get_type(rr) == LDNS_RR_TYPE_CNAME && ldns_rr_rd_count(rr) == 1 &&
		    ldns_dname_compare(ldns_rr_owner(rr), name) == 0)
			return rr;
	}
	return NULL;
}

/*
 * The name a rule claims at the end of rp's CNAME chain (up to DNS_CHAIN_MAX
 * links from the question), with *links the CNAMEs that lead there and *rule
 * the rule; NULL when the chain meets no rule.
 */
static const ldns_rdf *
dns_msg_chain_target(const struct dns_rules *r, const ldns_pkt *rp, size_t *links, const char **rule)
{
	const ldns_rr_list *an = ldns_pkt_answer(rp);
	const ldns_rdf *name = ldns_rr_owner(ldns_rr_list_rr(ldns_pkt_question(rp), 0));
	const ldns_rr *cn;
	char text[HOST_MAX * 4 + 2];

	for (*links = 1; *links <= DNS_CHAIN_MAX && (cn = dns_msg_cname_of(an, name)) != NULL; ++*links) {
		name = ldns_rr_rdf(cn, 0);
		dns_name_text(name, text, sizeof text);
		if ((*rule = dns_rules_match(r, text)) != NULL)
			return name;
	}
	return NULL;
}

uint8_t *
dns_msg_chain_answer(const struct dns_rules *r, const uint8_t *p, size_t n, const char **rule, size_t *outlen)
{
	ldns_pkt *rp = NULL, *a;
	const ldns_rr *qrr;
	const ldns_rdf *target, *name;
	ldns_rr *tq;
	size_t links;
	uint8_t *w = NULL;

	*rule = NULL;
	if (r->n == 0 || n < DNS_HEADER_LEN || LDNS_ANCOUNT(p) == 0 || LDNS_QDCOUNT(p) != 1 || dns_msg_tc(p) ||
	    (dns_msg_rcode(p) != LDNS_RCODE_NOERROR && dns_msg_rcode(p) != LDNS_RCODE_NXDOMAIN))
		return NULL;
	if (dns_wire2pkt(&rp, p, n) != LDNS_STATUS_OK) {
		ldns_pkt_free(rp);
		return NULL;
	}
	qrr = ldns_rr_list_rr(ldns_pkt_question(rp), 0);
	/* a CNAME question asks for the alias itself, not for where it leads */
	if (ldns_rr_get_class(qrr) != LDNS_RR_CLASS_IN || ldns_rr_get_type(qrr) == LDNS_RR_TYPE_CNAME ||
	    (target = dns_msg_chain_target(r, rp, &links, rule)) == NULL) {
		ldns_pkt_free(rp);
		return NULL;
	}
	a = dns_msg_answer_head(rp);  /* AA and AD stay clear: capd's records are signed by nobody */
	ldns_pkt_set_rcode(a, LDNS_RCODE_NOERROR);
	tq = ldns_rr_clone(qrr);
	ldns_rr_set_question(tq, true);
	ldns_pkt_push_rr(a, LDNS_SECTION_QUESTION, tq);
	name = ldns_rr_owner(qrr);
	for (size_t i = 0; i < links; i++) {  /* the CNAMEs as far as the claimed name */
		const ldns_rr *cn = dns_msg_cname_of(ldns_pkt_answer(rp), name);
		ldns_pkt_push_rr(a, LDNS_SECTION_ANSWER, ldns_rr_clone(cn));
		name = ldns_rr_rdf(cn, 0);
	}
	tq = ldns_rr_clone(qrr);  /* the question as the claimed name's */
	ldns_rdf_deep_free(ldns_rr_owner(tq));
	ldns_rr_set_owner(tq, ldns_rdf_clone(target));
	dns_msg_add_answers(a, r, *rule, tq);
	ldns_rr_free(tq);
	ldns_pkt_set_aa(a, false);  /* the CNAMEs are the upstream's, relayed */
	if (ldns_pkt_edns(rp)) {
		ldns_pkt_set_edns_udp_size(a, ldns_pkt_edns_udp_size(rp));
		ldns_pkt_set_edns_version(a, ldns_pkt_edns_version(rp));
		ldns_pkt_set_edns_z(a, ldns_pkt_edns_z(rp));  /* DO with it */
		if (ldns_pkt_edns_data(rp))
			ldns_pkt_set_edns_data(a, ldns_rdf_clone(ldns_pkt_edns_data(rp)));
	}
	w = dns_msg_wire(a, outlen);
	ldns_pkt_free(a);
	ldns_pkt_free(rp);
	return w;
}

/* The first question of a message, read by ldns (a compressed name too); NULL when it has none. Caller frees. */
static ldns_rr *
dns_msg_question(const uint8_t *p, size_t n)
{
	size_t pos = DNS_HEADER_LEN;
	ldns_rr *rr = NULL;

	if (n < DNS_HEADER_LEN || LDNS_QDCOUNT(p) == 0)
		return NULL;
	if (ldns_wire2rr(&rr, p, n, &pos, LDNS_SECTION_QUESTION) != LDNS_STATUS_OK) {
		ldns_rr_free(rr);
		return NULL;
	}
	return rr;
}

bool
dns_msg_same_question(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	ldns_rr *qa, *qb;
	bool same;

	if (alen < DNS_HEADER_LEN || blen < DNS_HEADER_LEN || LDNS_QDCOUNT(a) != 1 || LDNS_QDCOUNT(b) != 1)
		return false;
	qa = dns_msg_question(a, alen);
	qb = dns_msg_question(b, blen);
	/* ldns_rdf_compare: the wire bytes, case and all (ldns_dname_compare folds case) */
	same = qa != NULL && qb != NULL && ldns_rr_get_type(qa) == ldns_rr_get_type(qb) &&
	       ldns_rr_get_class(qa) == ldns_rr_get_class(qb) &&
	       ldns_rdf_compare(ldns_rr_owner(qa), ldns_rr_owner(qb)) == 0;
	ldns_rr_free(qa);
	ldns_rr_free(qb);
	return same;
}

/* Whether two OPT records' options (either may be NULL: none) are the same bytes. */
static bool
dns_msg_same_options(const ldns_rdf *a, const ldns_rdf *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return ldns_rdf_compare(a, b) == 0;
}

bool
dns_msg_same_ask(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
	ldns_pkt *pa = NULL, *pb = NULL;
	bool same = false;

	/* opcode and RD; AD and CD */
	if (alen < DNS_HEADER_LEN || blen < DNS_HEADER_LEN || LDNS_QDCOUNT(a) != 1 || LDNS_QDCOUNT(b) != 1 ||
	    (a[2] & 0x79) != (b[2] & 0x79) || (a[3] & 0x30) != (b[3] & 0x30))
		return false;
	if (dns_wire2pkt(&pa, a, alen) == LDNS_STATUS_OK && dns_wire2pkt(&pb, b, blen) == LDNS_STATUS_OK) {
		const ldns_rr *qa = ldns_rr_list_rr(ldns_pkt_question(pa), 0);
		const ldns_rr *qb = ldns_rr_list_rr(ldns_pkt_question(pb), 0);

		/* nothing but the question and an OPT (no TSIG: a signed query's answer is its client's) */
		same = qa != NULL && qb != NULL && ldns_pkt_ancount(pa) + ldns_pkt_nscount(pa) + ldns_pkt_arcount(pa) == 0 &&
		       ldns_pkt_ancount(pb) + ldns_pkt_nscount(pb) + ldns_pkt_arcount(pb) == 0 &&
		       ldns_pkt_tsig(pa) == NULL && ldns_pkt_tsig(pb) == NULL &&
		       ldns_rr_get_type(qa) == ldns_rr_get_type(qb) && ldns_rr_get_class(qa) == ldns_rr_get_class(qb) &&
		       ldns_dname_compare(ldns_rr_owner(qa), ldns_rr_owner(qb)) == 0 &&
		       ldns_pkt_edns(pa) == ldns_pkt_edns(pb) && ldns_pkt_edns_version(pa) == ldns_pkt_edns_version(pb) &&
		       ldns_pkt_edns_z(pa) == ldns_pkt_edns_z(pb) &&
		       dns_msg_same_options(ldns_pkt_edns_data(pa), ldns_pkt_edns_data(pb));
	}
	ldns_pkt_free(pa);
	ldns_pkt_free(pb);
	return same;
}

bool
dns_msg_reply_matches(const uint8_t *query, size_t qlen, const uint8_t *reply, size_t n)
{
	ldns_rr *qq, *rq;
	bool same;

	if (qlen < DNS_HEADER_LEN || n < DNS_HEADER_LEN || !(reply[2] & 0x80) ||
	    dns_msg_id(query) != dns_msg_id(reply))
		return false;
	if ((rq = dns_msg_question(reply, n)) == NULL)
		return dns_msg_rcode(reply) != 0;  /* an error without the question still answers it */
	qq = dns_msg_question(query, qlen);
	/* the name's case aside (ldns_dname_compare): a resolver may echo it as it likes (0x20) */
	same = qq != NULL && ldns_rr_get_type(qq) == ldns_rr_get_type(rq) &&
	       ldns_rr_get_class(qq) == ldns_rr_get_class(rq) &&
	       ldns_dname_compare(ldns_rr_owner(qq), ldns_rr_owner(rq)) == 0;
	ldns_rr_free(qq);
	ldns_rr_free(rq);
	return same;
}

void
dns_msg_keep_qname_case(const uint8_t *query, size_t qlen, uint8_t *reply, size_t n)
{
	size_t i = DNS_HEADER_LEN;

	if (qlen <= DNS_HEADER_LEN || n <= DNS_HEADER_LEN || query[4] != 0 || query[5] != 1 ||
	    reply[4] != 0 || reply[5] != 1)
		return;
	/* label by label, the lengths equal and below 64 (no pointer), to the root label */
	while (i < qlen && i < n && query[i] == reply[i] && query[i] < 64) {
		size_t len = query[i];

		if (len == 0) {
			memcpy(reply + DNS_HEADER_LEN, query + DNS_HEADER_LEN, i - DNS_HEADER_LEN);
			return;
		}
		if (i + 1 + len > qlen || i + 1 + len > n)
			return;
		for (size_t k = i + 1; k <= i + len; k++)  /* bytes, not strncasecmp: a label may hold a 0 */
			if (tolower(query[k]) != tolower(reply[k]))
				return;
		i += 1 + len;
	}
}

bool
dns_msg_is_xfr(uint16_t qtype)
{
	return qtype == LDNS_RR_TYPE_AXFR || qtype == LDNS_RR_TYPE_IXFR;
}

bool
dns_msg_xfr_more(const uint8_t *query, const uint8_t *p, size_t n)
{
	return n >= DNS_HEADER_LEN && (p[2] & 0x80) && p[4] == 0 && p[5] == 0 && dns_msg_id(p) == dns_msg_id(query);
}

/* The serial of rr, an SOA record; false when it is none. */
static bool
dns_soa_serial(const ldns_rr *rr, uint32_t *serial)
{
	if (ldns_rr_get_type(rr) != LDNS_RR_TYPE_SOA || ldns_rr_rd_count(rr) < 3)
		return false;
	*serial = ldns_rdf2native_int32(ldns_rr_rdf(rr, 2));
	return true;
}

void
dns_msg_xfr_init(struct dns_xfr *x, uint16_t qtype, const uint8_t *query, size_t qlen)
{
	ldns_pkt *pkt = NULL;
	const ldns_rr_list *ns;

	memset(x, 0, sizeof *x);
	x->qtype = qtype;
	if (qtype != LDNS_RR_TYPE_IXFR || dns_wire2pkt(&pkt, query, qlen) != LDNS_STATUS_OK)
		return;
	ns = ldns_pkt_authority(pkt);
	if (ldns_rr_list_rr_count(ns) > 0)
		x->have_client = dns_soa_serial(ldns_rr_list_rr(ns, 0), &x->client);
	ldns_pkt_free(pkt);
}

bool
dns_msg_xfr_ends(struct dns_xfr *x, const uint8_t *p, size_t n)
{
	ldns_pkt *pkt = NULL;
	const ldns_rr_list *an;
	size_t count;
	bool end = false;

	if (n < DNS_HEADER_LEN || dns_msg_rcode(p) != LDNS_RCODE_NOERROR || dns_wire2pkt(&pkt, p, n) != LDNS_STATUS_OK)
		return true;
	an = ldns_pkt_answer(pkt);
	count = ldns_rr_list_rr_count(an);
	for (size_t i = 0; i < count && !end; i++) {
		const ldns_rr *rr = ldns_rr_list_rr(an, i);
		uint32_t serial;

		if (!dns_soa_serial(rr, &serial)) {
			end = x->soas == 0;
			continue;
		}
		if (++x->soas == 1) {
			x->serial = serial;
			/* RFC 1982: the zone is no newer than the client's, nothing follows;
			 * a query that named no serial: an SOA alone is all there is */
			end = x->qtype == LDNS_RR_TYPE_IXFR &&
			      (x->have_client ? (int32_t)(serial - x->client) <= 0 : count == 1);
		} else {
			end = x->qtype == LDNS_RR_TYPE_AXFR || (x->soas % 2 == 0 && serial == x->serial);
		}
	}
	ldns_pkt_free(pkt);
	return end || x->soas == 0;
}

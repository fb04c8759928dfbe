/*
 * DNS messages for the dns instance: answer rules, parsing a client's query
 * with ldns, deciding (answer here, forward, or drop), building answers and
 * error replies, and checking an upstream's reply against its query.
 * Pure functions over byte arrays: no sockets, no event loop, so they are
 * unit-tested and fuzzed as they are.
 */
#ifndef CAPD_DNS_MSG_H
#define CAPD_DNS_MSG_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "addr.h"

#define DNS_HEADER_LEN 12
#define DNS_UDP_MIN 512       /* what a client without EDNS can take */
#define DNS_EDNS_SIZE 1232    /* the UDP size capd advertises in its answers; a forwarded query keeps its own */
#define DNS_MAX_MSG 65535
#define DNS_RCODE_BADVERS 16  /* RFC 6891: 0 in the header, 1 in the OPT record's extended rcode */
/* The SOA of a name capd answers (its MINIMUM and TTL are the rules' ttl) */
#define DNS_SOA_MNAME "capd.invalid."  /* RFC 6761 6.4: a name that is never real */
#define DNS_SOA_RNAME "hostmaster.capd.invalid."
#define DNS_SOA_SERIAL 1
#define DNS_SOA_REFRESH 3600
#define DNS_SOA_RETRY 600
#define DNS_SOA_EXPIRE 86400

/* One `answer = name=addr` rule. Owned by its dns_rules. */
struct dns_rule {
	char pattern[HOST_MAX + 1];  /* "www.example.com", "*.game.test" or "*" */
	int family;                  /* AF_INET or AF_INET6 */
	union {
		struct in_addr v4;
		struct in6_addr v6;
	} addr;
};

/* The rule set of one instance, in config order. Owner: the instance config. */
struct dns_rules {
	struct dns_rule *v;
	size_t n;
	uint32_t ttl;
};

/* Parses "name=addr" and appends it; -1 with *why (caller frees) on a bad rule. */
int dns_rules_add(struct dns_rules *r, const char *spec, char **why);
void dns_rules_free(struct dns_rules *r);
/* The best rule pattern for name (exact, then the longest *.suffix, then *), or NULL. */
const char *dns_rules_match(const struct dns_rules *r, const char *name);

enum dns_verdict {
	DNS_DROP,     /* no reply: too short to carry a header, or not a query */
	DNS_REPLY,    /* *out is the reply to send (answer, FORMERR, NOTIMP, BADVERS) */
	DNS_FORWARD,  /* a good query no rule claims: relay it upstream */
};

/* What was asked, for logs and the session note. */
struct dns_question {
	uint16_t id;
	uint16_t qtype, qclass;
	char qname[HOST_MAX * 4 + 2];  /* presentation form without the final dot; "" when unknown */
	char qtype_str[16];
	uint16_t udp_max;              /* the largest UDP reply the client takes */
	const char *rule;              /* the rule pattern that answered, or NULL */
	char why[96];                  /* what happened: "answered", "FORMERR: no question"... */
};

/*
 * Decides what to do with a client's query of n bytes. tcp: the client came
 * over TCP (no size limit on the reply). On DNS_REPLY, *out (malloc'd,
 * caller frees) holds *outlen bytes. q->why says what happened.
 */
enum dns_verdict dns_msg_query(const struct dns_rules *r, const uint8_t *p, size_t n, bool tcp,
                               struct dns_question *q, uint8_t **out, size_t *outlen);

/* An error reply (SERVFAIL, FORMERR...) to the query p: header and, when it parses, the question.
 * NULL when p has no header. Caller frees. */
uint8_t *dns_msg_error(const uint8_t *p, size_t n, int rcode, size_t *outlen);

/* A UDP client's reply to query when the upstream's answer p (n bytes) is larger than max:
 * header, question and OPT with TC set, no records. NULL when it cannot be built. Caller frees. */
uint8_t *dns_msg_truncate(const uint8_t *query, size_t qlen, const uint8_t *p, size_t n, size_t max,
                          size_t *outlen);

/*
 * An upstream's answer p (n bytes) whose CNAME chain leads from the question
 * to a name a rule claims (an alias of a redirected name): the answer with the
 * chain's CNAMEs up to that name and then capd's own records for it (or its
 * SOA: NODATA), as if capd had followed the chain itself; *rule says which.
 * NULL when the chain meets no rule, or p is no NOERROR or NXDOMAIN answer to
 * one question. Caller frees.
 */
#define DNS_CHAIN_MAX 16  /* CNAMEs followed in an upstream's answer */
uint8_t *dns_msg_chain_answer(const struct dns_rules *r, const uint8_t *p, size_t n, const char **rule,
                              size_t *outlen);

/*
 * Whether messages a and b ask the same question: one each, of the same type
 * and class, the name spelt byte for byte alike (a client that randomizes its
 * names' case (0x20) asks anew, and its answer must echo the new spelling).
 */
bool dns_msg_same_question(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen);
/*
 * Whether queries a and b ask an upstream the same, so that one answer serves
 * both (dnsmasq and unbound ask once for every client waiting on a question):
 * one question each, alike but for the name's case (each client's spelling
 * goes back in its own answer, dns_msg_keep_qname_case); the same opcode, RD,
 * AD and CD; no other record (a TSIG-signed answer is its client's); EDNS
 * alike but for the UDP size: its version, flags (DO) and options, byte for
 * byte (a cookie is its client's).
 */
bool dns_msg_same_ask(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen);
/* Whether reply (n bytes) answers query (same id, QR set, same question). */
bool dns_msg_reply_matches(const uint8_t *query, size_t qlen, const uint8_t *reply, size_t n);
/*
 * Spells reply's question name as query's (the same name but for case) when both hold
 * one question written out in full: a client that randomizes the case of its names
 * (0x20) checks that the answer echoes it, and an upstream may answer in lower case.
 * Names in the records that point at the question (compression) follow it.
 */
void dns_msg_keep_qname_case(const uint8_t *query, size_t qlen, uint8_t *reply, size_t n);

/*
 * A zone transfer (AXFR, IXFR) is answered over TCP in many messages
 * (RFC 5936 2.2), as few as one record each. dns_msg_xfr_init starts x from
 * the query (an IXFR's carries the client's serial); dns_msg_xfr_ends then
 * follows the answer message by message: whether p is its last. AXFR ends
 * on the second SOA; IXFR (RFC 1995 4) on an SOA of the opening serial in
 * an even place (an odd place opens the additions of a change), or at once
 * when the opening SOA is no newer than the client's (RFC 1982): it is up
 * to date (for a query that named no serial, when the SOA comes alone in its
 * message). An error, a first record that is no SOA, or a message that does
 * not parse ends it: no end could be found after it.
 */
struct dns_xfr {
	uint16_t qtype;                /* LDNS_RR_TYPE_AXFR or _IXFR; 0: no transfer */
	bool have_client;              /* IXFR: the query named the client's serial */
	uint32_t client;               /* ... that serial */
	unsigned soas;                 /* SOA records seen */
	uint32_t serial;               /* the opening SOA's */
};
bool dns_msg_is_xfr(uint16_t qtype);
void dns_msg_xfr_init(struct dns_xfr *x, uint16_t qtype, const uint8_t *query, size_t qlen);
bool dns_msg_xfr_ends(struct dns_xfr *x, const uint8_t *p, size_t n);
/* Whether p is a later message of the transfer asked by query: RFC 5936 2.2.1
 * lets those leave the question out, so the id and QR say it. */
bool dns_msg_xfr_more(const uint8_t *query, const uint8_t *p, size_t n);

static inline uint16_t dns_msg_id(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void dns_msg_set_id(uint8_t *p, uint16_t id) { p[0] = (uint8_t)(id >> 8); p[1] = (uint8_t)id; }
static inline bool dns_msg_tc(const uint8_t *p) { return (p[2] & 0x02) != 0; }
static inline int dns_msg_rcode(const uint8_t *p) { return p[3] & 0x0f; }

#endif

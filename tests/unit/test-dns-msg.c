/* Unit tests for daemon/dns-msg.c: rules, the query decision, answers, error replies, reply matching,
 * zone transfers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ldns/ldns.h>

#include "dns-msg.h"

/* A wire query for name/type with id, optionally with an EDNS OPT record. */
static uint8_t *
query(const char *name, ldns_rr_type type, uint16_t id, bool edns, size_t *len)
{
	ldns_pkt *p = NULL;
	uint8_t *w = NULL;

	assert_int_equal(ldns_pkt_query_new_frm_str(&p, name, type, LDNS_RR_CLASS_IN, LDNS_RD), LDNS_STATUS_OK);
	ldns_pkt_set_id(p, id);
	if (edns)
		ldns_pkt_set_edns_udp_size(p, 4096);
	assert_int_equal(ldns_pkt2wire(&w, p, len), LDNS_STATUS_OK);
	ldns_pkt_free(p);
	return w;
}

static void
rules(struct dns_rules *r)
{
	char *why = NULL;
	const char *specs[] = { "www.example.com=127.0.0.1", "www.example.com=::1", "*.game.test=10.0.0.7",
	                        "*.deep.game.test=10.0.0.8", "v6only.test=[2001:db8::1]" };

	memset(r, 0, sizeof *r);
	r->ttl = 60;
	for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
		assert_int_equal(dns_rules_add(r, specs[i], &why), 0);
}

static void
test_rules_parse(void **state)
{
	struct dns_rules r = { 0 };
	char *why = NULL;
	const char *bad[] = { "noequals", "=1.2.3.4", "name=", "name=1.2.3", "bad_name!=1.2.3.4",
	                      "a.*.b=1.2.3.4", "**=1.2.3.4", "x=::g", "*.=1.2.3.4", "-a.b=1.1.1.1" };

	(void)state;
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		why = NULL;
		assert_int_equal(dns_rules_add(&r, bad[i], &why), -1);
		assert_non_null(why);
		free(why);
	}
	assert_int_equal(r.n, 0);
	assert_int_equal(dns_rules_add(&r, "*=1.2.3.4", &why), 0);
	assert_int_equal(dns_rules_add(&r, "Host.Example.=::1", &why), 0);
	assert_string_equal(r.v[1].pattern, "Host.Example");
	assert_int_equal(r.v[1].family, AF_INET6);
	dns_rules_free(&r);
}

static void
test_rules_match(void **state)
{
	struct dns_rules r;
	char *why = NULL;

	(void)state;
	rules(&r);
	assert_string_equal(dns_rules_match(&r, "www.example.com"), "www.example.com");
	assert_string_equal(dns_rules_match(&r, "WWW.Example.COM"), "www.example.com");
	assert_null(dns_rules_match(&r, "example.com"));
	assert_null(dns_rules_match(&r, "game.test"));  /* a wildcard matches sub-names only */
	assert_string_equal(dns_rules_match(&r, "a.game.test"), "*.game.test");
	assert_string_equal(dns_rules_match(&r, "a.b.c.game.test"), "*.game.test");
	assert_string_equal(dns_rules_match(&r, "x.deep.game.test"), "*.deep.game.test");  /* longest suffix */
	assert_null(dns_rules_match(&r, "other.test"));
	/* a dot inside a label ("\\.") is no label boundary: x\\.game.test is under test */
	assert_null(dns_rules_match(&r, "x\\.game.test"));
	assert_string_equal(dns_rules_match(&r, "x\\.deep.game.test"), "*.game.test");
	assert_string_equal(dns_rules_match(&r, "a\\.b.game.test"), "*.game.test");
	assert_string_equal(dns_rules_match(&r, "a\\\\.game.test"), "*.game.test");  /* a label ending in '\\' */
	assert_int_equal(dns_rules_add(&r, "*=192.0.2.1", &why), 0);
	assert_string_equal(dns_rules_match(&r, "other.test"), "*");
	assert_string_equal(dns_rules_match(&r, "www.example.com"), "www.example.com");  /* exact beats * */
	assert_null(dns_rules_match(&r, ""));
	dns_rules_free(&r);
}

static ldns_pkt *
decide(const struct dns_rules *r, const uint8_t *q, size_t n, bool tcp, enum dns_verdict want,
       struct dns_question *dq)
{
	uint8_t *out = NULL;
	size_t outlen = 0;
	ldns_pkt *a = NULL;

	assert_int_equal(dns_msg_query(r, q, n, tcp, dq, &out, &outlen), want);
	if (want != DNS_REPLY) {
		assert_null(out);
		return NULL;
	}
	assert_non_null(out);
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	free(out);
	return a;
}

/* The authority section of a holds one SOA of owner with TTL and MINIMUM ttl, and nothing else. */
static void
assert_nodata_soa(const ldns_pkt *a, const char *owner, uint32_t ttl)
{
	ldns_rr *soa;
	char *txt;

	assert_int_equal(ldns_pkt_nscount(a), 1);
	soa = ldns_rr_list_rr(ldns_pkt_authority(a), 0);
	assert_int_equal(ldns_rr_get_type(soa), LDNS_RR_TYPE_SOA);
	txt = ldns_rdf2str(ldns_rr_owner(soa));
	assert_string_equal(txt, owner);
	free(txt);
	assert_int_equal(ldns_rr_ttl(soa), ttl);
	assert_int_equal(ldns_rr_rd_count(soa), 7);
	assert_int_equal(ldns_rdf2native_int32(ldns_rr_rdf(soa, 6)), ttl);
}

static void
test_answer_a_aaaa(void **state)
{
	struct dns_rules r;
	struct dns_question dq;
	size_t n;
	uint8_t *q;
	ldns_pkt *a;
	char *txt;

	(void)state;
	rules(&r);
	q = query("www.example.com", LDNS_RR_TYPE_A, 0x1234, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_id(a), 0x1234);
	assert_true(ldns_pkt_qr(a));
	assert_true(ldns_pkt_aa(a));
	assert_true(ldns_pkt_rd(a));
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_NOERROR);
	assert_int_equal(ldns_pkt_qdcount(a), 1);
	assert_int_equal(ldns_pkt_ancount(a), 1);
	assert_int_equal(ldns_pkt_nscount(a), 0);  /* a positive answer has no SOA */
	ldns_rr *rr = ldns_rr_list_rr(ldns_pkt_answer(a), 0);
	assert_int_equal(ldns_rr_get_type(rr), LDNS_RR_TYPE_A);
	assert_int_equal(ldns_rr_ttl(rr), 60);
	txt = ldns_rdf2str(ldns_rr_rdf(rr, 0));
	assert_string_equal(txt, "127.0.0.1");
	free(txt);
	assert_string_equal(dq.qname, "www.example.com");
	assert_string_equal(dq.qtype_str, "A");
	ldns_pkt_free(a);
	free(q);

	q = query("www.example.com", LDNS_RR_TYPE_AAAA, 7, true, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_ancount(a), 1);
	rr = ldns_rr_list_rr(ldns_pkt_answer(a), 0);
	assert_int_equal(ldns_rr_get_type(rr), LDNS_RR_TYPE_AAAA);
	txt = ldns_rdf2str(ldns_rr_rdf(rr, 0));
	assert_string_equal(txt, "::1");
	free(txt);
	assert_true(ldns_pkt_edns(a));  /* EDNS in, EDNS out */
	assert_int_equal(dq.udp_max, 4096);
	ldns_pkt_free(a);
	free(q);

	/* a type without an address: NODATA, NOERROR with the name's SOA as authority (RFC 2308) */
	q = query("v6only.test", LDNS_RR_TYPE_A, 8, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_NOERROR);
	assert_int_equal(ldns_pkt_ancount(a), 0);
	assert_nodata_soa(a, "v6only.test.", 60);
	ldns_pkt_free(a);
	free(q);
	q = query("a.game.test", LDNS_RR_TYPE_MX, 9, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_ancount(a), 0);
	assert_nodata_soa(a, "a.game.test.", 60);
	ldns_pkt_free(a);
	free(q);
	q = query("A.Game.Test", LDNS_RR_TYPE_SOA, 9, false, &n);  /* an SOA question: the SOA is the answer */
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_ancount(a), 1);
	assert_int_equal(ldns_pkt_nscount(a), 0);
	rr = ldns_rr_list_rr(ldns_pkt_answer(a), 0);
	assert_int_equal(ldns_rr_get_type(rr), LDNS_RR_TYPE_SOA);
	txt = ldns_rdf2str(ldns_rr_owner(rr));
	assert_string_equal(txt, "A.Game.Test.");
	free(txt);
	ldns_pkt_free(a);
	free(q);

	/* a zone transfer of a claimed name: REFUSED (it got an empty NOERROR, a broken transfer) */
	q = query("www.example.com", LDNS_RR_TYPE_AXFR, 13, false, &n);
	a = decide(&r, q, n, true, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_REFUSED);
	assert_int_equal(ldns_pkt_qdcount(a), 1);
	assert_int_equal(ldns_pkt_ancount(a) + ldns_pkt_nscount(a), 0);
	assert_string_equal(dq.why, "REFUSED: AXFR of a name rule www.example.com answers");
	ldns_pkt_free(a);
	free(q);
	q = query("a.game.test", LDNS_RR_TYPE_IXFR, 14, false, &n);
	a = decide(&r, q, n, true, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_REFUSED);
	ldns_pkt_free(a);
	free(q);

	/* the wildcard: sub-names answered, the bare suffix forwarded */
	q = query("x.y.game.test", LDNS_RR_TYPE_A, 10, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_ancount(a), 1);
	ldns_pkt_free(a);
	free(q);
	q = query("game.test", LDNS_RR_TYPE_A, 11, false, &n);
	decide(&r, q, n, false, DNS_FORWARD, &dq);
	assert_int_equal(dq.id, 11);
	free(q);
	q = query("elsewhere.org", LDNS_RR_TYPE_A, 12, false, &n);
	decide(&r, q, n, false, DNS_FORWARD, &dq);
	assert_string_equal(dq.why, "forwarded");
	free(q);
	dns_rules_free(&r);
}

static void
test_truncation(void **state)
{
	struct dns_rules r = { .ttl = 5 };
	struct dns_question dq;
	char spec[64], *why = NULL;
	size_t n;
	uint8_t *q;
	ldns_pkt *a;

	(void)state;
	for (int i = 0; i < 60; i++) {
		snprintf(spec, sizeof spec, "many.test=10.0.%d.%d", i / 200, i % 200);
		assert_int_equal(dns_rules_add(&r, spec, &why), 0);
	}
	q = query("many.test", LDNS_RR_TYPE_A, 1, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);  /* 60 x 25 bytes > 512: TC, no answers */
	assert_true(ldns_pkt_tc(a));
	assert_int_equal(ldns_pkt_ancount(a), 0);
	ldns_pkt_free(a);
	a = decide(&r, q, n, true, DNS_REPLY, &dq);  /* TCP: everything */
	assert_false(ldns_pkt_tc(a));
	assert_int_equal(ldns_pkt_ancount(a), 60);
	ldns_pkt_free(a);
	free(q);
	dns_rules_free(&r);
}

static void
test_malformed(void **state)
{
	struct dns_rules r;
	struct dns_question dq;
	uint8_t *out = NULL;
	size_t outlen, n;

	(void)state;
	rules(&r);
	/* too short for a header: dropped */
	uint8_t shortq[5] = { 1, 2, 3, 4, 5 };
	assert_int_equal(dns_msg_query(&r, shortq, sizeof shortq, false, &dq, &out, &outlen), DNS_DROP);
	assert_null(out);
	assert_null(dns_msg_error(shortq, sizeof shortq, 2, &outlen));
	/* a header with one question that is not there: FORMERR under the same id */
	uint8_t trunc[12] = { 0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0 };
	assert_int_equal(dns_msg_query(&r, trunc, sizeof trunc, false, &dq, &out, &outlen), DNS_REPLY);
	assert_int_equal(outlen, 12);
	assert_int_equal(dns_msg_id(out), 0xabcd);
	assert_true(out[2] & 0x80);
	assert_int_equal(dns_msg_rcode(out), LDNS_RCODE_FORMERR);
	free(out);
	/* no question at all */
	uint8_t none[12] = { 0, 9, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0 };
	assert_int_equal(dns_msg_query(&r, none, sizeof none, false, &dq, &out, &outlen), DNS_REPLY);
	assert_int_equal(dns_msg_rcode(out), LDNS_RCODE_FORMERR);
	free(out);
	/* a compression pointer that points at itself */
	uint8_t loop[] = { 0, 10, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1 };
	assert_int_equal(dns_msg_query(&r, loop, sizeof loop, false, &dq, &out, &outlen), DNS_REPLY);
	assert_int_equal(dns_msg_rcode(out), LDNS_RCODE_FORMERR);
	assert_int_equal(dns_msg_id(out), 10);
	free(out);
	/* two pointers pointing at each other */
	uint8_t loop2[] = { 0, 11, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, 'a', 0xc0, 16, 0xc0, 14, 0, 1, 0, 1 };
	assert_int_equal(dns_msg_query(&r, loop2, sizeof loop2, false, &dq, &out, &outlen), DNS_REPLY);
	assert_int_equal(dns_msg_rcode(out), LDNS_RCODE_FORMERR);
	free(out);
	/* a response sent to us is dropped */
	uint8_t *q = query("www.example.com", LDNS_RR_TYPE_A, 3, false, &n);
	q[2] |= 0x80;
	assert_int_equal(dns_msg_query(&r, q, n, false, &dq, &out, &outlen), DNS_DROP);
	/* another opcode: NOTIMP */
	q[2] = (uint8_t)((q[2] & ~0x80) | (5 << 3));
	assert_int_equal(dns_msg_query(&r, q, n, false, &dq, &out, &outlen), DNS_REPLY);
	assert_int_equal(dns_msg_rcode(out), LDNS_RCODE_NOTIMPL);
	free(out);
	free(q);
	dns_rules_free(&r);
}

static void
test_servfail_and_matching(void **state)
{
	size_t n, rn, outlen;
	uint8_t *q, *r, *out;
	ldns_pkt *a = NULL;

	(void)state;
	q = query("Elsewhere.ORG", LDNS_RR_TYPE_A, 0x4242, true, &n);
	out = dns_msg_error(q, n, LDNS_RCODE_SERVFAIL, &outlen);
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_SERVFAIL);
	assert_int_equal(ldns_pkt_id(a), 0x4242);
	assert_int_equal(ldns_pkt_qdcount(a), 1);
	ldns_pkt_free(a);
	/* the SERVFAIL answers its query; it does not answer another id or name */
	assert_true(dns_msg_reply_matches(q, n, out, outlen));
	r = query("elsewhere.org", LDNS_RR_TYPE_A, 0x4242, false, &rn);
	r[2] |= 0x80;
	assert_true(dns_msg_reply_matches(q, n, r, rn));  /* case does not matter */
	assert_false(dns_msg_reply_matches(q, n, q, n));  /* a query is no reply */
	dns_msg_set_id(r, 0x4243);
	assert_false(dns_msg_reply_matches(q, n, r, rn));
	free(r);
	r = query("elsewhere.net", LDNS_RR_TYPE_A, 0x4242, false, &rn);
	r[2] |= 0x80;
	assert_false(dns_msg_reply_matches(q, n, r, rn));
	free(r);
	r = query("elsewhere.org", LDNS_RR_TYPE_AAAA, 0x4242, false, &rn);
	r[2] |= 0x80;
	assert_false(dns_msg_reply_matches(q, n, r, rn));
	free(r);
	assert_false(dns_msg_reply_matches(q, n, out, 5));
	free(out);
	free(q);
	/* a question whose name is compressed ("foo" and a pointer to a later owner name) is
	 * answered by a reply that writes it out whole */
	uint8_t cq[] = { 0x51, 0x51, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1, 3, 'f', 'o', 'o', 0xc0, 22, 0, 1, 0, 1,
	                 7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 3, 'o', 'r', 'g', 0, 0, 16, 0, 1, 0, 0, 0, 0, 0, 1, 0 };
	r = query("FOO.example.org", LDNS_RR_TYPE_A, 0x5151, false, &rn);
	r[2] |= 0x80;
	assert_true(dns_msg_reply_matches(cq, sizeof cq, r, rn));
	r[rn - 3] = LDNS_RR_TYPE_AAAA;
	assert_false(dns_msg_reply_matches(cq, sizeof cq, r, rn));
	free(r);
}

/* A transfer message with id and the answer records given as text; *len its size. */
static uint8_t *
xfr_msg(uint16_t id, bool question, const char *const *rrs, size_t nrr, size_t *len)
{
	ldns_pkt *p = ldns_pkt_new();
	uint8_t *w = NULL;
	ldns_rr *rr = NULL;

	ldns_pkt_set_id(p, id);
	ldns_pkt_set_qr(p, true);
	if (question) {
		assert_int_equal(ldns_rr_new_question_frm_str(&rr, "zone.test. IN AXFR", NULL, NULL), LDNS_STATUS_OK);
		ldns_pkt_push_rr(p, LDNS_SECTION_QUESTION, rr);
	}
	for (size_t i = 0; i < nrr; i++) {
		assert_int_equal(ldns_rr_new_frm_str(&rr, rrs[i], 3600, NULL, NULL), LDNS_STATUS_OK);
		ldns_pkt_push_rr(p, LDNS_SECTION_ANSWER, rr);
	}
	assert_int_equal(ldns_pkt2wire(&w, p, len), LDNS_STATUS_OK);
	ldns_pkt_free(p);
	return w;
}

#define SOA(serial) "zone.test. 3600 IN SOA ns.zone.test. admin.zone.test. " #serial " 3600 600 86400 60"
#define A(n) "h" #n ".zone.test. 3600 IN A 192.0.2." #n

/* A transfer query for zone.test: IXFR with the client's serial in its authority section (client >= 0). */
static uint8_t *
xfr_query(uint16_t qtype, long client, size_t *len)
{
	ldns_pkt *p = NULL;
	ldns_rr *rr = NULL;
	uint8_t *w = NULL;
	char soa[160];

	assert_int_equal(ldns_pkt_query_new_frm_str(&p, "zone.test", qtype, LDNS_RR_CLASS_IN, 0), LDNS_STATUS_OK);
	if (client >= 0) {
		snprintf(soa, sizeof soa, "zone.test. 3600 IN SOA ns.zone.test. admin.zone.test. %ld 1 1 1 1", client);
		assert_int_equal(ldns_rr_new_frm_str(&rr, soa, 3600, NULL, NULL), LDNS_STATUS_OK);
		ldns_pkt_push_rr(p, LDNS_SECTION_AUTHORITY, rr);
	}
	assert_int_equal(ldns_pkt2wire(&w, p, len), LDNS_STATUS_OK);
	ldns_pkt_free(p);
	return w;
}

/* Feeds the messages (NULL-separated runs of records) to one transfer asked by
 * a qtype query (an IXFR's from serial client, none when < 0); returns a bit
 * per message, set where dns_msg_xfr_ends said it was the last. */
static unsigned
xfr_run(uint16_t qtype, long client, const char *const *recs, size_t nrecs)
{
	struct dns_xfr x;
	size_t qn;
	uint8_t *q = xfr_query(qtype, client, &qn);

	dns_msg_xfr_init(&x, qtype, q, qn);
	free(q);
	assert_int_equal(x.have_client, qtype == LDNS_RR_TYPE_IXFR && client >= 0);
	if (x.have_client)
		assert_int_equal(x.client, (uint32_t)client);
	unsigned ends = 0, msg = 0;
	size_t start = 0, len;

	for (size_t i = 0; i <= nrecs; i++) {
		if (i < nrecs && recs[i] != NULL)
			continue;
		uint8_t *w = xfr_msg(7, msg == 0, recs + start, i - start, &len);
		if (dns_msg_xfr_ends(&x, w, len))
			ends |= 1u << msg;
		free(w);
		msg++;
		start = i + 1;
	}
	return ends;
}

/* Zone transfers (RFC 5936, RFC 1995): where the last message is, and what later messages look like. */
static void
test_zone_transfers(void **state)
{
	(void)state;
	const char *axfr[] = { SOA(9), A(1), A(2), NULL, A(3), NULL, A(4), SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_AXFR, -1, axfr, 8), 1u << 2);
	const char *axfr_one[] = { SOA(9), A(1), SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_AXFR, -1, axfr_one, 3), 1u);
	/* IXFR: the additions of the last change open with the new serial in an odd place */
	const char *ixfr[] = { SOA(9), SOA(8), A(1), NULL, SOA(9), A(2), NULL, SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 8, ixfr, 8), 1u << 2);
	/* ... also one record a message (BIND's one-answer): the opening SOA alone is not the end */
	const char *ixfr_one_rr[] = { SOA(9), NULL, SOA(7), NULL, A(1), NULL, SOA(9), NULL, A(2), NULL, SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 7, ixfr_one_rr, 11), 1u << 5);
	/* up to date: the client has 9 (or newer, across the RFC 1982 wrap) */
	const char *ixfr_current[] = { SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 9, ixfr_current, 1), 1u);
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 12, ixfr_current, 1), 1u);
	const char *ixfr_wrap[] = { SOA(4294967290) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 3, ixfr_wrap, 1), 1u);
	const char *ixfr_full[] = { SOA(9), A(1), NULL, A(2), SOA(9) };  /* answered AXFR-style */
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 7, ixfr_full, 5), 1u << 1);
	const char *ixfr_full_one_rr[] = { SOA(9), NULL, A(1), NULL, SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, 7, ixfr_full_one_rr, 5), 1u << 2);
	/* no SOA first: nothing to wait for */
	const char *no_soa[] = { A(1), SOA(9) };
	assert_int_equal(xfr_run(LDNS_RR_TYPE_AXFR, -1, no_soa, 2), 1u);

	struct dns_xfr x = { .qtype = LDNS_RR_TYPE_AXFR };
	size_t len, qn;

	/* an IXFR query without the client's SOA: an SOA alone in its message is all there is */
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, -1, ixfr_current, 1), 1u);
	assert_int_equal(xfr_run(LDNS_RR_TYPE_IXFR, -1, ixfr, 8), 1u << 2);
	uint8_t *w = xfr_msg(7, true, axfr, 3, &len);
	w[3] = (uint8_t)((w[3] & 0xf0) | LDNS_RCODE_REFUSED);
	assert_true(dns_msg_xfr_ends(&x, w, len));  /* an error ends it */
	memset(&x, 0, sizeof x);
	x.qtype = LDNS_RR_TYPE_AXFR;
	assert_true(dns_msg_xfr_ends(&x, w, 5));    /* so does what does not parse */
	assert_true(dns_msg_xfr_ends(&x, w, len - 3));
	free(w);

	/* later messages may leave the question out: the id and QR say whose they are */
	uint8_t *q = query("zone.test", LDNS_RR_TYPE_AXFR, 7, false, &qn);
	assert_true(dns_msg_is_xfr(LDNS_RR_TYPE_AXFR) && dns_msg_is_xfr(LDNS_RR_TYPE_IXFR));
	assert_false(dns_msg_is_xfr(LDNS_RR_TYPE_SOA));
	w = xfr_msg(7, false, axfr + 4, 1, &len);
	assert_true(dns_msg_xfr_more(q, w, len));
	assert_false(dns_msg_xfr_more(q, w, 11));
	dns_msg_set_id(w, 8);
	assert_false(dns_msg_xfr_more(q, w, len));
	free(w);
	w = xfr_msg(7, true, axfr + 4, 1, &len);  /* with a question: dns_msg_reply_matches judges it */
	assert_false(dns_msg_xfr_more(q, w, len));
	free(w);
	assert_false(dns_msg_xfr_more(q, q, qn));  /* a query is no reply */
	free(q);
}

/* q (an EDNS query of *n bytes) with a second OPT record appended; q is freed. */
static uint8_t *
second_opt(uint8_t *q, size_t *n)
{
	static const uint8_t opt[] = { 0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0 };  /* root, OPT, 4096, ttl 0, no data */
	uint8_t *w = malloc(*n + sizeof opt);
	uint16_t ar;

	memcpy(w, q, *n);
	memcpy(w + *n, opt, sizeof opt);
	ar = (uint16_t)((w[10] << 8 | w[11]) + 1);
	w[10] = (uint8_t)(ar >> 8);
	w[11] = (uint8_t)ar;
	*n += sizeof opt;
	free(q);
	return w;
}

/* RFC 6891 for the names capd answers: EDNS version 1 gets BADVERS, two OPT records FORMERR. */
static void
test_edns(void **state)
{
	struct dns_rules r;
	struct dns_question dq;
	ldns_pkt *p = NULL, *a;
	uint8_t *q = NULL;
	size_t n;

	(void)state;
	rules(&r);
	assert_int_equal(ldns_pkt_query_new_frm_str(&p, "www.example.com", LDNS_RR_TYPE_A, LDNS_RR_CLASS_IN, LDNS_RD),
	                 LDNS_STATUS_OK);
	ldns_pkt_set_id(p, 0x5151);
	ldns_pkt_set_edns_udp_size(p, 4096);
	ldns_pkt_set_edns_version(p, 1);
	assert_int_equal(ldns_pkt2wire(&q, p, &n), LDNS_STATUS_OK);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	/* BADVERS is 16: 0 in the header, 1 in the OPT's extended rcode; the OPT says version 0 */
	assert_int_equal(ldns_pkt_id(a), 0x5151);
	assert_int_equal(ldns_pkt_get_rcode(a), 0);
	assert_true(ldns_pkt_edns(a));
	assert_int_equal(ldns_pkt_edns_extended_rcode(a), 1);
	assert_int_equal(ldns_pkt_edns_version(a), 0);
	assert_int_equal(ldns_pkt_ancount(a), 0);
	assert_int_equal(ldns_pkt_qdcount(a), 1);
	assert_non_null(strstr(dq.why, "BADVERS"));
	ldns_pkt_free(a);
	free(q);
	/* a forwarded name is the upstream's to judge */
	ldns_pkt_set_id(p, 0x5152);
	ldns_pkt_set_edns_version(p, 1);
	ldns_rdf_deep_free(ldns_rr_owner(ldns_rr_list_rr(ldns_pkt_question(p), 0)));
	ldns_rr_set_owner(ldns_rr_list_rr(ldns_pkt_question(p), 0), ldns_dname_new_frm_str("elsewhere.org"));
	assert_int_equal(ldns_pkt2wire(&q, p, &n), LDNS_STATUS_OK);
	decide(&r, q, n, false, DNS_FORWARD, &dq);
	free(q);
	ldns_pkt_free(p);

	/* two OPT records: FORMERR (with an OPT of our own), for either transport */
	q = second_opt(query("www.example.com", LDNS_RR_TYPE_A, 0x5153, true, &n), &n);
	for (int tcp = 0; tcp < 2; tcp++) {
		a = decide(&r, q, n, tcp, DNS_REPLY, &dq);
		assert_int_equal(ldns_pkt_id(a), 0x5153);
		assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_FORMERR);
		assert_int_equal(ldns_pkt_edns_extended_rcode(a), 0);
		assert_int_equal(ldns_pkt_ancount(a), 0);
		assert_non_null(strstr(dq.why, "FORMERR"));
		ldns_pkt_free(a);
	}
	free(q);
	/* for a forwarded name too: a strict upstream would drop it unanswered */
	q = second_opt(query("elsewhere.org", LDNS_RR_TYPE_A, 0x5154, true, &n), &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_id(a), 0x5154);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_FORMERR);
	assert_string_equal(dq.why, "FORMERR: 2 OPT records");
	ldns_pkt_free(a);
	free(q);

	/* version 0, one OPT: answered as before */
	q = query("www.example.com", LDNS_RR_TYPE_A, 0x5155, true, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_NOERROR);
	assert_int_equal(ldns_pkt_edns_extended_rcode(a), 0);
	assert_int_equal(ldns_pkt_ancount(a), 1);
	ldns_pkt_free(a);
	free(q);
	dns_rules_free(&r);
}

/* An upstream's answer too large for a UDP client: header, question and OPT with TC, no records. */
static void
test_truncate_upstream_answer(void **state)
{
	size_t n, rn, outlen;
	uint8_t *q, *w, *out;
	ldns_pkt *r = NULL, *a = NULL;
	ldns_rr *rr = NULL;
	char text[64];

	(void)state;
	q = query("many.org", LDNS_RR_TYPE_A, 7, true, &n);
	assert_int_equal(ldns_wire2pkt(&r, q, n), LDNS_STATUS_OK);
	ldns_pkt_set_qr(r, true);
	ldns_pkt_set_ra(r, true);
	ldns_pkt_set_edns_do(r, true);
	/* a long option (padding, 600 bytes): it goes when even the bare answer would not fit */
	ldns_pkt_set_edns_data(r, ldns_rdf_new_frm_data(LDNS_RDF_TYPE_UNKNOWN, 604, (uint8_t[604]){ 0, 12, 600 >> 8,
	                                                                                               600 & 0xff }));
	for (int i = 0; i < 100; i++) {
		snprintf(text, sizeof text, "many.org. 300 IN A 192.0.2.%d", i + 1);
		assert_int_equal(ldns_rr_new_frm_str(&rr, text, 0, NULL, NULL), LDNS_STATUS_OK);
		ldns_pkt_push_rr(r, LDNS_SECTION_ANSWER, rr);
	}
	assert_int_equal(ldns_pkt2wire(&w, r, &rn), LDNS_STATUS_OK);
	ldns_pkt_free(r);
	out = dns_msg_truncate(q, n, w, rn, 512, &outlen);
	assert_non_null(out);
	assert_true(outlen <= 512);
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	assert_true(ldns_pkt_tc(a) && ldns_pkt_qr(a) && ldns_pkt_ra(a) && ldns_pkt_rd(a));
	assert_int_equal(ldns_pkt_id(a), 7);
	assert_int_equal(ldns_pkt_qdcount(a), 1);
	assert_int_equal(ldns_pkt_ancount(a), 0);
	assert_true(ldns_pkt_edns(a) && ldns_pkt_edns_do(a));
	assert_null(ldns_pkt_edns_data(a));
	assert_true(dns_msg_reply_matches(q, n, out, outlen));
	ldns_pkt_free(a);
	free(out);
	/* an answer ldns cannot read: the query's question stands for it */
	w[5] = 2;  /* two questions, the second of which is not there */
	out = dns_msg_truncate(q, n, w, rn, 512, &outlen);
	assert_non_null(out);
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	assert_true(ldns_pkt_tc(a));
	assert_int_equal(ldns_pkt_qdcount(a), 1);
	ldns_pkt_free(a);
	free(out);
	free(w);
	free(q);
}

/* An upstream's answer to name/type: rcode, and the records of texts in its answer section. Caller frees. */
static uint8_t *
upstream_answer(const char *name, ldns_rr_type type, int rcode, const char *const *texts, size_t count, size_t *n)
{
	ldns_pkt *r = NULL;
	uint8_t *w = NULL;

	assert_int_equal(ldns_pkt_query_new_frm_str(&r, name, type, LDNS_RR_CLASS_IN, LDNS_RD), LDNS_STATUS_OK);
	ldns_pkt_set_id(r, 9);
	ldns_pkt_set_qr(r, true);
	ldns_pkt_set_ra(r, true);
	ldns_pkt_set_ad(r, true);
	ldns_pkt_set_rcode(r, (uint8_t)rcode);
	for (size_t i = 0; i < count; i++) {
		ldns_rr *rr = NULL;
		assert_int_equal(ldns_rr_new_frm_str(&rr, texts[i], 0, NULL, NULL), LDNS_STATUS_OK);
		ldns_pkt_push_rr(r, LDNS_SECTION_ANSWER, rr);
	}
	assert_int_equal(ldns_pkt2wire(&w, r, n), LDNS_STATUS_OK);
	ldns_pkt_free(r);
	return w;
}

static void
test_cname_chain_to_a_claimed_name(void **state)
{
	static const char *const chain[] = { "alias.org. 300 IN CNAME mid.org.", "mid.org. 300 IN CNAME www.example.com.",
	                                     "www.example.com. 300 IN A 192.0.2.1" };
	static const char *const loop[] = { "a.org. 300 IN CNAME b.org.", "b.org. 300 IN CNAME a.org." };
	static const char *const nx[] = { "nx.org. 300 IN CNAME x.game.test." };
	struct dns_rules r;
	const char *rule = NULL;
	uint8_t *w, *out;
	size_t n, outlen;
	ldns_pkt *a = NULL;
	char *txt;

	(void)state;
	rules(&r);
	w = upstream_answer("alias.org", LDNS_RR_TYPE_A, LDNS_RCODE_NOERROR, chain, 3, &n);
	out = dns_msg_chain_answer(&r, w, n, &rule, &outlen);
	assert_non_null(out);
	assert_string_equal(rule, "www.example.com");
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	assert_int_equal(ldns_pkt_id(a), 9);
	assert_false(ldns_pkt_ad(a));
	assert_int_equal(ldns_pkt_ancount(a), 3);
	txt = ldns_rr2str(ldns_rr_list_rr(ldns_pkt_answer(a), 2));
	assert_string_equal(txt, "www.example.com.\t60\tIN\tA\t127.0.0.1\n");
	free(txt);
	ldns_pkt_free(a);
	free(out);
	free(w);
	/* MX of the alias: the CNAMEs and the claimed name's SOA (NODATA) */
	w = upstream_answer("alias.org", LDNS_RR_TYPE_MX, LDNS_RCODE_NOERROR, chain, 2, &n);
	out = dns_msg_chain_answer(&r, w, n, &rule, &outlen);
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	assert_int_equal(ldns_pkt_ancount(a), 2);
	assert_nodata_soa(a, "www.example.com.", 60);
	ldns_pkt_free(a);
	free(out);
	free(w);
	/* a CNAME question is left alone */
	w = upstream_answer("alias.org", LDNS_RR_TYPE_CNAME, LDNS_RCODE_NOERROR, chain, 2, &n);
	assert_null(dns_msg_chain_answer(&r, w, n, &rule, &outlen));
	free(w);
	/* NXDOMAIN at the end of a chain into a wildcard rule: capd's address, NOERROR */
	w = upstream_answer("nx.org", LDNS_RR_TYPE_A, LDNS_RCODE_NXDOMAIN, nx, 1, &n);
	out = dns_msg_chain_answer(&r, w, n, &rule, &outlen);
	assert_string_equal(rule, "*.game.test");
	assert_int_equal(ldns_wire2pkt(&a, out, outlen), LDNS_STATUS_OK);
	assert_int_equal(ldns_pkt_get_rcode(a), LDNS_RCODE_NOERROR);
	assert_int_equal(ldns_pkt_ancount(a), 2);
	ldns_pkt_free(a);
	free(out);
	free(w);
	/* a loop of CNAMEs that meets no rule ends */
	w = upstream_answer("a.org", LDNS_RR_TYPE_A, LDNS_RCODE_NOERROR, loop, 2, &n);
	assert_null(dns_msg_chain_answer(&r, w, n, &rule, &outlen));
	free(w);
	dns_rules_free(&r);
}

/* Bytes of a header with one question, then name, then type A class IN. */
static size_t
qname_msg(uint8_t *buf, const char *name, size_t nlen)
{
	static const uint8_t head[12] = { 0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0 };

	memcpy(buf, head, sizeof head);
	memcpy(buf + 12, name, nlen);
	memcpy(buf + 12 + nlen, "\0\1\0\1", 4);
	return 12 + nlen + 4;
}

static void
test_keep_qname_case(void **state)
{
	uint8_t q[64], r[64];
	size_t qn, rn;

	(void)state;
	qn = qname_msg(q, "\3WwW\7ExAmPlE\3oRg", 17);
	rn = qname_msg(r, "\3www\7example\3org", 17);
	dns_msg_keep_qname_case(q, qn, r, rn);
	assert_memory_equal(r + 12, "\3WwW\7ExAmPlE\3oRg", 17);
	/* another name, or one label longer: left alone */
	rn = qname_msg(r, "\3wwx\7example\3org", 17);
	dns_msg_keep_qname_case(q, qn, r, rn);
	assert_memory_equal(r + 12, "\3wwx\7example\3org", 17);
	rn = qname_msg(r, "\4wwww\7example\3org", 18);
	dns_msg_keep_qname_case(q, qn, r, rn);
	assert_memory_equal(r + 12, "\4wwww\7example\3org", 18);
	/* a 0 inside a label is compared too, not taken as the end of the text */
	qn = qname_msg(q, "\3A\0X", 5);
	rn = qname_msg(r, "\3a\0y", 5);
	dns_msg_keep_qname_case(q, qn, r, rn);
	assert_memory_equal(r + 12, "\3a\0y", 5);
	/* a compressed reply name, a cut message or two questions: left alone */
	qn = qname_msg(q, "\1A", 3);
	rn = qname_msg(r, "\xc0\x0c", 2);
	dns_msg_keep_qname_case(q, qn, r, rn);
	assert_memory_equal(r + 12, "\xc0\x0c", 2);
	rn = qname_msg(r, "\1a", 3);
	dns_msg_keep_qname_case(q, qn, r, 14);
	assert_int_equal(r[13], 'a');
	r[5] = 2;
	dns_msg_keep_qname_case(q, qn, r, rn);
	assert_int_equal(r[13], 'a');
}

/* dns_msg_same_question: what makes a UDP client's query a repeat of one in flight */
static void
test_same_question(void **state)
{
	size_t n, on;
	uint8_t *q, *o;

	(void)state;
	q = query("again.example", LDNS_RR_TYPE_A, 7, false, &n);
	o = query("again.example", LDNS_RR_TYPE_A, 8, true, &on);
	assert_true(dns_msg_same_question(q, n, q, n));
	assert_true(dns_msg_same_question(q, n, o, on));  /* the id and EDNS are not the question */
	free(o);
	o = query("AGAIN.example", LDNS_RR_TYPE_A, 7, false, &on);
	assert_false(dns_msg_same_question(q, n, o, on));  /* 0x20: another spelling is another query */
	free(o);
	o = query("again.example", LDNS_RR_TYPE_AAAA, 7, false, &on);
	assert_false(dns_msg_same_question(q, n, o, on));
	free(o);
	o = query("again.example.org", LDNS_RR_TYPE_A, 7, false, &on);
	assert_false(dns_msg_same_question(q, n, o, on));
	free(o);
	assert_false(dns_msg_same_question(q, n, q, 5));  /* no header */
	q[5] = 0;  /* no question */
	assert_false(dns_msg_same_question(q, n, q, n));
	free(q);
}

/* dns_msg_same_ask: what lets another client's query wait for the answer to one in flight */
static void
test_same_ask(void **state)
{
	size_t n, on;
	uint8_t *q, *o;
	ldns_pkt *p = NULL;

	(void)state;
	q = query("again.example", LDNS_RR_TYPE_A, 7, true, &n);
	o = query("AGAIN.Example", LDNS_RR_TYPE_A, 8, true, &on);
	assert_true(dns_msg_same_ask(q, n, o, on));  /* another id, another spelling (0x20) */
	o[on - 8] = 0x02;                            /* OPT's UDP size 4096 -> 512 */
	assert_true(dns_msg_same_ask(q, n, o, on));
	o[on - 4] = 0x80;                            /* DO */
	assert_false(dns_msg_same_ask(q, n, o, on));
	o[on - 4] = 0;
	o[on - 5] = 1;                               /* EDNS version 1 */
	assert_false(dns_msg_same_ask(q, n, o, on));
	o[on - 5] = 0;
	o[2] &= ~0x01;                               /* RD clear */
	assert_false(dns_msg_same_ask(q, n, o, on));
	o[2] |= 0x01;
	o[3] |= 0x10;                                /* CD */
	assert_false(dns_msg_same_ask(q, n, o, on));
	o[3] &= ~0x10;
	assert_true(dns_msg_same_ask(q, n, o, on));
	free(o);
	o = query("again.example", LDNS_RR_TYPE_A, 7, false, &on);
	assert_false(dns_msg_same_ask(q, n, o, on)); /* without EDNS */
	free(o);
	o = query("again.example", LDNS_RR_TYPE_AAAA, 7, true, &on);
	assert_false(dns_msg_same_ask(q, n, o, on));
	free(o);
	/* options (a client cookie) must be the same bytes */
	assert_int_equal(ldns_wire2pkt(&p, q, n), LDNS_STATUS_OK);
	ldns_pkt_set_edns_data(p, ldns_rdf_new_frm_data(LDNS_RDF_TYPE_UNKNOWN, 12,
	                                                "\0\x0a\0\x08" "abcdefgh"));
	o = NULL;
	assert_int_equal(ldns_pkt2wire(&o, p, &on), LDNS_STATUS_OK);
	assert_false(dns_msg_same_ask(q, n, o, on));
	assert_true(dns_msg_same_ask(o, on, o, on));
	ldns_pkt_free(p);
	free(o);
	q[7] = 1;                                    /* an answer record: not a plain query */
	assert_false(dns_msg_same_ask(q, n, q, n));
	free(q);
}

/* The only answer record of a, as text ("127.0.0.1"); caller frees. */
static char *
only_answer(const ldns_pkt *a)
{
	assert_int_equal(ldns_pkt_ancount(a), 1);
	return ldns_rdf2str(ldns_rr_rdf(ldns_rr_list_rr(ldns_pkt_answer(a), 0), 0));
}

/* RFC 6761 6.3: localhost and the names below it are the loopback, unless a rule claims them */
static void
test_localhost_names(void **state)
{
	struct dns_rules r;
	struct dns_question dq;
	char *why = NULL, *txt;
	size_t n;
	uint8_t *q;
	ldns_pkt *a;

	(void)state;
	rules(&r);
	q = query("App.LocalHost", LDNS_RR_TYPE_A, 1, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_true(ldns_pkt_aa(a));
	assert_string_equal(txt = only_answer(a), "127.0.0.1");
	assert_string_equal(dq.why, "answered: a localhost name is the loopback (RFC 6761)");
	free(txt);
	ldns_pkt_free(a);
	free(q);
	q = query("localhost", LDNS_RR_TYPE_AAAA, 2, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_string_equal(txt = only_answer(a), "::1");
	free(txt);
	ldns_pkt_free(a);
	free(q);
	q = query("a.b.localhost", LDNS_RR_TYPE_MX, 3, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_int_equal(ldns_pkt_ancount(a), 0);
	assert_nodata_soa(a, "a.b.localhost.", 60);
	ldns_pkt_free(a);
	free(q);
	/* names that only look like it go upstream */
	const char *others[] = { "notlocalhost", "localhost.example", "x\\.localhost" };
	for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
		q = query(others[i], LDNS_RR_TYPE_A, 4, false, &n);
		decide(&r, q, n, false, DNS_FORWARD, &dq);
		free(q);
	}
	/* the instance's own rules win, a "*" too */
	assert_int_equal(dns_rules_add(&r, "*.localhost=10.0.0.1", &why), 0);
	q = query("app.localhost", LDNS_RR_TYPE_A, 5, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_string_equal(txt = only_answer(a), "10.0.0.1");
	free(txt);
	ldns_pkt_free(a);
	free(q);
	assert_int_equal(dns_rules_add(&r, "*=10.0.0.2", &why), 0);
	q = query("localhost", LDNS_RR_TYPE_A, 6, false, &n);
	a = decide(&r, q, n, false, DNS_REPLY, &dq);
	assert_string_equal(txt = only_answer(a), "10.0.0.2");
	free(txt);
	ldns_pkt_free(a);
	free(q);
	dns_rules_free(&r);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rules_parse),
		cmocka_unit_test(test_rules_match),
		cmocka_unit_test(test_answer_a_aaaa),
		cmocka_unit_test(test_truncation),
		cmocka_unit_test(test_malformed),
		cmocka_unit_test(test_servfail_and_matching),
		cmocka_unit_test(test_edns),
		cmocka_unit_test(test_zone_transfers),
		cmocka_unit_test(test_truncate_upstream_answer),
		cmocka_unit_test(test_cname_chain_to_a_claimed_name),
		cmocka_unit_test(test_keep_qname_case),
		cmocka_unit_test(test_same_question),
		cmocka_unit_test(test_same_ask),
		cmocka_unit_test(test_localhost_names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Fuzzes the dns instance's message handling: the query decision (parse,
 * match, answer, FORMERR/NOTIMP), error replies, truncated answers, reply
 * matching with the input as both query and reply, CNAME chains into a
 * claimed name, and zone transfer messages. The first byte picks UDP or TCP limits (and AXFR or IXFR).
 * Split in two halves, the input is also a query and an upstream's reply:
 * whether they ask alike, and the query's name case put back into the reply.
 */
#include <stddef.h>
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dns-msg.h"

/* Compiled in here, not taken from the daemon library, so libFuzzer's coverage sees it. */
#include "dns-msg.c"

/* The first half as a query, the second as the reply an upstream sent for it. */
static void
fuzz_pair(const uint8_t *q, size_t qlen, const uint8_t *p, size_t n)
{
	uint8_t *reply = malloc(n ? n : 1), *was = malloc(n ? n : 1);  /* exactly n: ASan sees an overrun */
	struct dns_xfr x;

	(void)dns_msg_same_ask(q, qlen, p, n);
	(void)dns_msg_same_question(q, qlen, p, n);
	memcpy(reply, p, n);
	memcpy(was, p, n);
	dns_msg_keep_qname_case(q, qlen, reply, n);
	for (size_t i = 0; i < n; i++)  /* only the case of the reply's letters may change */
		if (tolower(reply[i]) != tolower(was[i]))
			abort();
	free(reply);
	free(was);
	dns_msg_xfr_init(&x, LDNS_RR_TYPE_IXFR, q, qlen);
	(void)dns_msg_xfr_ends(&x, p, n);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct dns_rules rules;
	static int ready;
	struct dns_question q;
	uint8_t *out = NULL, *err;
	size_t outlen = 0, elen = 0;
	bool tcp;

	if (!ready) {
		char *why = NULL;
		const char *specs[] = { "www.example.com=127.0.0.1", "www.example.com=::1", "*.game.test=10.0.0.7",
		                        "*.deep.game.test=10.0.0.8" };
		rules.ttl = 60;
		for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
			if (dns_rules_add(&rules, specs[i], &why) < 0)
				abort();
		ready = 1;
	}
	if (size < 1)
		return 0;
	tcp = data[0] & 1;
	data++;
	size--;
	switch (dns_msg_query(&rules, data, size, tcp, &q, &out, &outlen)) {
	case DNS_DROP:
		if (out != NULL)
			abort();
		break;
	case DNS_REPLY:
		if (out == NULL || outlen < DNS_HEADER_LEN || !(out[2] & 0x80) || dns_msg_id(out) != dns_msg_id(data))
			abort();
		if (!tcp && outlen > q.udp_max)
			abort();
		break;
	case DNS_FORWARD:
		if (out != NULL)
			abort();
		/* the input as an upstream's answer too large for a UDP client: the cut one fits */
		out = dns_msg_truncate(data, size, data, size, DNS_UDP_MIN, &outlen);
		if (out == NULL || outlen > DNS_UDP_MIN || !(out[2] & 0x02))
			abort();
		break;
	}
	free(out);
	err = dns_msg_error(data, size, 2, &elen);
	if (err) {
		if (size < DNS_HEADER_LEN || elen < DNS_HEADER_LEN || dns_msg_rcode(err) != 2)
			abort();
		(void)dns_msg_reply_matches(data, size, err, elen);
	}
	(void)dns_msg_reply_matches(data, size, data, size);
	if (size > 2) {
		(void)dns_msg_reply_matches(data, size / 2, data + size / 2, size - size / 2);
		fuzz_pair(data, size / 2, data + size / 2, size - size / 2);
	}
	free(err);
	/* the input as an upstream's answer whose CNAME chain may lead to a claimed name */
	{
		const char *rule = NULL;
		size_t clen = 0;
		uint8_t *chain = dns_msg_chain_answer(&rules, data, size, &rule, &clen);
		if (chain != NULL && (rule == NULL || clen < DNS_HEADER_LEN || dns_msg_id(chain) != dns_msg_id(data)))
			abort();
		free(chain);
	}
	/* the input as the messages of a zone transfer: itself, then its halves */
	struct dns_xfr x = { .qtype = tcp ? LDNS_RR_TYPE_AXFR : LDNS_RR_TYPE_IXFR };
	if (!dns_msg_xfr_ends(&x, data, size) && size > 2)
		(void)dns_msg_xfr_ends(&x, data + size / 2, size - size / 2);
	if (size >= 2)
		(void)dns_msg_xfr_more(data, data, size);
	return 0;
}

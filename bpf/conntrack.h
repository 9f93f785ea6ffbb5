/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection and fragment state: keys, expiry, and how a packet advances a
 * connection. Mirrors control/evaluate.py's Conntrack (flow_key, _expired,
 * _advance) and its fragment table. Whether a connection is still allowed
 * after a policy change is the classifier's question (classify.h).
 */
#ifndef ISOEBPF_CONNTRACK_H
#define ISOEBPF_CONNTRACK_H

#include "abi.h"
#include "maps.h"
#include "parse.h"

/*
 * The connection a packet belongs to, seen from its sender (evaluate.flow_key).
 * Returns 0 when the packet cannot be tracked: ICMP other than echo, or a
 * transport header cut short (its fields were never read).
 */
static __always_inline int flow_key_of(const struct packet *pkt, struct flow_key *key)
{
	if (pkt->truncated)
		return 0;
	if (is_icmp(pkt->proto)) {
		if (!is_icmp_echo(pkt->proto, pkt->icmp_type))
			return 0;
		/* Echo request and reply share the identifier: it is both "ports". */
		key->sport = pkt->icmp_id;
		key->dport = pkt->icmp_id;
	} else {
		/* Ports are 0 for protocols without them, as the parser left them. */
		key->sport = pkt->sport;
		key->dport = pkt->dport;
	}
	key->family = pkt->family;
	key->proto = pkt->proto;
	__builtin_memcpy(key->src, pkt->src, 16);
	__builtin_memcpy(key->dst, pkt->dst, 16);
	return 1;
}

/* The flow of the packet an ICMP error quotes; 0 when untrackable. */
static __always_inline int quoted_flow_key(const struct packet *pkt, struct flow_key *key)
{
	const struct quoted_packet *q = &pkt->inner;

	if (is_icmp(q->proto)) {
		if (!is_icmp_echo(q->proto, q->icmp_type))
			return 0;
		key->sport = q->icmp_id;
		key->dport = q->icmp_id;
	} else if (q->proto == IPPROTO_TCP || q->proto == IPPROTO_UDP) {
		key->sport = q->sport;
		key->dport = q->dport;
	} else {
		/* Other protocols have no ports. */
		key->sport = 0;
		key->dport = 0;
	}
	key->family = pkt->family;
	key->proto = q->proto;
	__builtin_memcpy(key->src, q->src, 16);
	__builtin_memcpy(key->dst, q->dst, 16);
	return 1;
}

/*
 * Put the key's endpoints in canonical order: the lower (address, port)
 * first, comparing the address as two 64-bit words in host order and then
 * the port as stored (any total order serves; the control plane never
 * builds a key, it reads which end opened from the value). Returns the end
 * the key's sender is now: FLOW_BY_SRC, or FLOW_BY_DST when they were swapped.
 */
static __always_inline int flow_canonical(struct flow_key *key)
{
	/* The addresses are 8-byte aligned (abi.h): read them a word at a time. */
	__u64 *src = (__u64 *)key->src;
	__u64 *dst = (__u64 *)key->dst;
	__u64 src0 = src[0], src1 = src[1];
	__be16 port = key->sport;

	if (src0 < dst[0] || (src0 == dst[0] && (src1 < dst[1] ||
						 (src1 == dst[1] && port <= key->dport))))
		return FLOW_BY_SRC;
	src[0] = dst[0];
	src[1] = dst[1];
	dst[0] = src0;
	dst[1] = src1;
	key->sport = key->dport;
	key->dport = port;
	return FLOW_BY_DST;
}

/* evaluate.Conntrack._expired: idle longer than the timeout for its state. */
static __always_inline int flow_expired(__u8 proto, const struct flow_state *state,
					const struct params *p, __u64 now)
{
	__u64 timeout;

	if (state->flags & FLOW_CLOSING)
		timeout = p->tcp_closing_timeout_ns;
	else if (proto == IPPROTO_TCP)
		timeout = p->tcp_timeout_ns;
	else if (is_icmp(proto))
		timeout = p->icmp_timeout_ns;
	else
		timeout = p->udp_timeout_ns;
	/* A clock read on another CPU may trail last_seen: that is not idleness. */
	return now > state->last_seen_ns && now - state->last_seen_ns > timeout;
}

static __always_inline void flow_open(struct flow_state *state, __u32 gen, __u64 now)
{
	state->last_seen_ns = now;
	state->gen = gen;
	state->flags = FLOW_OPEN;
}

/*
 * End `by` of the (canonical) key opens a connection: in the pair's entry
 * when it has one (`entry`, as looked up), else in a new one.
 */
static __always_inline void flow_start(const struct flow_key *key, struct flow_entry *entry, int by,
				       __u32 gen, __u64 now)
{
	struct flow_entry fresh = {};

	if (!entry) {
		flow_open(&fresh.opened[by & 1], gen, now);
		if (!conntrack.insert((struct flow_key *)key, &fresh))
			return;
		/*
		 * Another CPU made the pair's entry since our lookup (its other end
		 * opening at the same moment): join it rather than overwrite it.
		 */
		entry = conntrack.lookup((struct flow_key *)key);
		if (!entry)
			return;
	}
	flow_open(&entry->opened[by & 1], gen, now);
}

/*
 * A packet of a live connection passed (evaluate.Conntrack._advance).
 * `from_opener`: the packet travels in the connection's first direction.
 */
static __always_inline void flow_advance(struct flow_state *state, __u8 proto,
					 const struct packet *pkt, int from_opener, __u64 now)
{
	__u8 flags = state->flags;

	state->last_seen_ns = now;
	if (proto != IPPROTO_TCP)
		return;
	if (pkt->tcp_flags & TCP_FLAGS_RST) {
		flags |= FLOW_CLOSING;
	} else if (pkt->tcp_flags & TCP_FLAGS_FIN) {
		flags |= from_opener ? FLOW_FIN_ORIG : FLOW_FIN_REPLY;
		/* Closing once FIN went both ways; a RST's closing is never undone. */
		if ((flags & (FLOW_FIN_ORIG | FLOW_FIN_REPLY)) == (FLOW_FIN_ORIG | FLOW_FIN_REPLY))
			flags |= FLOW_CLOSING;
	}
	state->flags = flags;
}

static __always_inline void fragment_key_of(const struct packet *pkt, struct fragment_key *key)
{
	key->family = pkt->family;
	key->proto = pkt->proto;
	key->id = pkt->frag_id;
	__builtin_memcpy(key->src, pkt->src, 16);
	__builtin_memcpy(key->dst, pkt->dst, 16);
}

/* Remember a first fragment's verdict for the fragments that follow it. */
static __always_inline void fragment_remember(const struct packet *pkt, __u8 action, __u32 rule,
					      __u64 now)
{
	struct fragment_key key = {};
	struct fragment_verdict verdict = { .seen_ns = now, .rule = rule, .action = action };

	fragment_key_of(pkt, &key);
	fragments.update(&key, &verdict);
}

/* The first fragment's verdict, if seen within the lifetime; NULL otherwise. */
static __always_inline struct fragment_verdict *fragment_recall(const struct packet *pkt,
								 const struct params *p, __u64 now)
{
	struct fragment_key key = {};
	struct fragment_verdict *verdict;

	fragment_key_of(pkt, &key);
	verdict = fragments.lookup(&key);
	if (verdict && now > verdict->seen_ns && now - verdict->seen_ns > p->fragment_timeout_ns)
		return NULL;
	return verdict;
}

#endif /* ISOEBPF_CONNTRACK_H */

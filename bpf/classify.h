/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The classifier shared by the XDP and TC programs: the contract's
 * semantics, in the order control/evaluate.py's decide() and
 * Classifier.judge() apply them:
 *
 *   unfiltered -> exception (tracked) -> later fragment -> transport header
 *   cut short -> established (incl. ICMP errors about a tracked connection)
 *   -> hairpin -> allow rule -> default
 *
 * Each step either settles the verdict or lets the next one decide.
 */
#ifndef ISOEBPF_CLASSIFY_H
#define ISOEBPF_CLASSIFY_H

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"
#include "clock.h"

struct verdict {
	__u32 gen; /* the generation that judged the packet */
	__u32 rule;
	__u32 accept_mark; /* params' accept_mark for a filtered packet, else 0 */
	__u8 action;
	__u8 between_overlays; /* filtered, from one overlay to another */
	__u8 audit; /* judged by a generation in audit mode: a denial is let through */
};

/* Source and destination (class, overlay). */
struct endpoints {
	struct class_value src;
	struct class_value dst;
};

static __always_inline void settle(struct verdict *v, __u8 action, __u32 rule)
{
	v->action = action;
	v->rule = rule;
}

/* Read once per packet: every lookup of this packet uses this generation. */
static __always_inline __u32 active_generation(void)
{
	int index = 0;
	__u32 *gen = config.lookup(&index);

	return gen ? *gen : 0;
}

/* The half of the policy tables that generation gen lives in. */
static __always_inline __u32 policy_slot(__u32 gen)
{
	return gen & 1;
}

/* The class of the longest policy CIDR holding addr; 0 when it is in no overlay. */
static __always_inline int address_class(__u32 gen, __u8 family, const __u8 *addr,
					 struct class_value *out)
{
	struct class_value *found;

	if (family == FAMILY_IPV4) {
		struct class_v4_key key = { .prefixlen = CLASS_FIXED_BITS + 32,
					    .slot = bpf_htonl(policy_slot(gen)) };

		__builtin_memcpy(key.addr, addr, 4);
		found = classes_v4.lookup(&key);
	} else {
		struct class_v6_key key = { .prefixlen = CLASS_FIXED_BITS + 128,
					    .slot = bpf_htonl(policy_slot(gen)) };

		__builtin_memcpy(key.addr, addr, 16);
		found = classes_v6.lookup(&key);
	}
	if (!found)
		return 0;
	*out = *found;
	return 1;
}

/* Contract step 1: only traffic with both ends in overlays is filtered. */
static __always_inline int between_overlays(__u32 gen, __u8 family, const __u8 *src,
					    const __u8 *dst, struct endpoints *ends)
{
	return address_class(gen, family, src, &ends->src) &&
	       address_class(gen, family, dst, &ends->dst);
}

/* The exception rule that leaves this pair unfiltered, or 0 (rule ids start at 16). */
static __always_inline __u32 exception_rule(__u32 gen, const struct params *p,
					    const struct endpoints *ends)
{
	struct exception_key key = { .slot = policy_slot(gen),
				     .src_class = ends->src.class_id,
				     .dst_class = ends->dst.class_id };
	struct rule_value *rule;

	if (!p->has_exceptions)
		return 0;
	rule = exceptions.lookup(&key);
	return rule ? rule->rule : 0;
}

/* Contract steps 2b-2d for a packet that opens a connection: hairpin, allow rule, default. */
static __always_inline void judge_by_policy(__u32 gen, const struct params *p,
					    const struct endpoints *ends, __u8 proto, __be16 dport,
					    struct verdict *v)
{
	struct hairpin_key same_overlay = { .slot = policy_slot(gen), .overlay_id = ends->src.overlay_id };
	struct allow_key key = { .prefixlen = ALLOW_FIXED_BITS + 24,
				 .slot = bpf_htonl(policy_slot(gen)),
				 .src_class = bpf_htonl(ends->src.class_id),
				 .dst_class = bpf_htonl(ends->dst.class_id) };
	struct rule_value *rule;

	if (ends->src.overlay_id == ends->dst.overlay_id) {
		rule = hairpins.lookup(&same_overlay);
		if (rule) {
			settle(v, ACTION_ALLOW, rule->rule);
			return;
		}
	}
	/* The policy's `icmp` means ICMP and ICMPv6; only TCP and UDP have ports. */
	key.proto = is_icmp(proto) ? PROTO_ICMP : proto;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
		__builtin_memcpy(key.port, &dport, 2);
	rule = allowed.lookup(&key);
	if (rule)
		settle(v, ACTION_ALLOW, rule->rule);
	else
		settle(v, p->default_action, RULE_DEFAULT);
}

/*
 * Would the active policy allow the first packet (a TCP SYN, an echo
 * request) of the connection end `by` of the key opened?
 * evaluate.Conntrack.revalidate asks the same.
 */
static __always_inline int first_packet_allowed(__u32 gen, const struct params *p,
						const struct flow_key *key, int by)
{
	const __u8 *src = by == FLOW_BY_SRC ? key->src : key->dst;
	const __u8 *dst = by == FLOW_BY_SRC ? key->dst : key->src;
	struct endpoints ends;
	struct verdict v;

	if (!between_overlays(gen, key->family, src, dst, &ends))
		return 1;
	if (exception_rule(gen, p, &ends))
		return 1;
	judge_by_policy(gen, p, &ends, key->proto, by == FLOW_BY_SRC ? key->dport : key->sport, &v);
	return v.action == ACTION_ALLOW;
}

/*
 * The connection end `by` of the key opened, if it is alive and still
 * allowed; else NULL.
 *
 * Lazy revocation: a connection remembers the generation that last allowed
 * it. Under a newer one its first packet is judged again; if the new policy
 * would not allow it, it is closed (the entry stays for the other end's, or
 * for the LRU or the next sweep to take) and the packet is judged afresh.
 * (program.activate also sweeps the table after a flip, so a connection cut
 * by one policy stays cut even if no packet of it passed until the next.)
 */
static __always_inline struct flow_state *flow_live(struct flow_entry *entry, int by,
						    const struct flow_key *key, __u32 gen,
						    const struct params *p, struct clock *clock)
{
	struct flow_state *state = &entry->opened[by & 1];

	if (!(state->flags & FLOW_OPEN) || flow_expired(key->proto, state, p, clock_now(clock)))
		return NULL;
	if (state->gen != gen) {
		if (!first_packet_allowed(gen, p, key, by)) {
			state->flags = 0;
			return NULL;
		}
		state->gen = gen;
	}
	return state;
}

/*
 * An exception's traffic is not filtered but is tracked, so that its
 * replies (which the exception may not cover) pass as established. Only a
 * connection this end opened counts (evaluate.decide), not one the other did.
 */
static __always_inline void track_exception_flow(const struct packet *pkt, __u32 gen,
						 const struct params *p, struct clock *clock)
{
	struct flow_state *state = NULL;
	struct flow_entry *entry;
	struct flow_key key = {};
	int by;

	if (!flow_key_of(pkt, &key))
		return;
	by = flow_canonical(&key);
	entry = conntrack.lookup(&key);
	if (entry)
		state = flow_live(entry, by, &key, gen, p, clock);
	if (state)
		flow_advance(state, key.proto, pkt, 1, clock_now(clock));
	else
		flow_start(&key, entry, by, gen, clock_now(clock));
}

/* Contract 5: a later fragment follows its first fragment; without one it is dropped. */
static __always_inline void follow_first_fragment(const struct packet *pkt,
						  const struct params *p, struct clock *clock,
						  struct verdict *v)
{
	struct fragment_verdict *first = fragment_recall(pkt, p, clock_now(clock));

	if (!first) {
		settle(v, ACTION_DROP, RULE_FRAGMENT);
		return;
	}
	/* One answer per datagram is enough: a rejected datagram's later fragments are dropped. */
	settle(v, first->action == ACTION_REJECT ? ACTION_DROP : first->action, first->rule);
}

/* LLVM lowers __builtin_memcmp to a libcall that BPF cannot make: compare words. */
static __always_inline int same_address(const __u8 *a, const __u8 *b)
{
	__u64 a_words[2], b_words[2];

	__builtin_memcpy(a_words, a, 16);
	__builtin_memcpy(b_words, b, 16);
	return a_words[0] == b_words[0] && a_words[1] == b_words[1];
}

/*
 * The flow whose tracked state settles this packet: its own, or, for an
 * ICMP error, the quoted packet's, provided the error travels back to that
 * packet's sender. Returns 0 when there is none to look up.
 */
static __always_inline int flow_to_look_up(const struct packet *pkt, struct flow_key *key)
{
	if (!is_icmp_error_about_flow(pkt->proto, pkt->icmp_type))
		return flow_key_of(pkt, key);
	if (!pkt->inner.present || !same_address(pkt->dst, pkt->inner.src))
		return 0;
	return quoted_flow_key(pkt, key);
}

/* Contract step 2 for a filtered packet that is not a later fragment. */
static __always_inline void judge_filtered(const struct packet *pkt, const struct endpoints *ends,
					   __u32 gen, const struct params *p, struct clock *clock,
					   struct verdict *v)
{
	int icmp_error = is_icmp_error_about_flow(pkt->proto, pkt->icmp_type);
	struct flow_entry *entry = NULL;
	struct flow_key key = {};
	struct flow_state *state;
	int by = FLOW_BY_SRC;
	int tracked;
	int i;

	if (pkt->truncated) {
		settle(v, ACTION_DROP, RULE_MALFORMED);
		return;
	}
	/*
	 * Contract 2a: a tracked connection in either direction, or an ICMP error
	 * about one. Both directions share one entry: one lookup, and each packet
	 * that finds none (every denied one) costs one miss, not two.
	 */
	tracked = flow_to_look_up(pkt, &key);
	if (tracked) {
		by = flow_canonical(&key);
		entry = conntrack.lookup(&key);
	}
	if (entry) {
		/*
		 * The connection this end opened first, then the one the other end
		 * did, as evaluate.decide tries (key, reverse(key)). Not unrolled: one
		 * copy of flow_live (and its policy lookups) keeps the stack small.
		 */
#pragma clang loop unroll(disable)
		for (i = 0; i < 2; i++) {
			state = flow_live(entry, by ^ i, &key, gen, p, clock);
			if (!state)
				continue;
			/* An ICMP error passes but does not count as the connection's traffic. */
			if (!icmp_error)
				flow_advance(state, key.proto, pkt, i == 0, clock_now(clock));
			settle(v, ACTION_ALLOW, RULE_ESTABLISHED);
			return;
		}
	}
	judge_by_policy(gen, p, ends, pkt->proto, pkt->dport, v);
	/*
	 * Contract 3: allowed packets open connections, except a TCP reset, which
	 * ends one, and an ICMP error (key is then the quoted packet's). In audit
	 * mode so do denied ones, which pass: their replies are then not counted
	 * as denials. A switch to enforcing re-judges them.
	 */
	if ((v->action == ACTION_ALLOW || p->audit) && tracked && !icmp_error &&
	    !(pkt->proto == IPPROTO_TCP && (pkt->tcp_flags & TCP_FLAGS_RST)))
		flow_start(&key, entry, by, gen, clock_now(clock));
}

/*
 * ICMPv6 router/neighbour solicitations and advertisements and redirects
 * (types 133-137) are the link's own plumbing: never filtered (the contract).
 */
static __always_inline int is_neighbour_discovery(const struct packet *pkt)
{
	return pkt->proto == IPPROTO_ICMPV6 && !pkt->truncated && !pkt->later_fragment &&
	       pkt->icmp_type >= 133 && pkt->icmp_type <= 137;
}

/* The verdict for a parsed IP packet. */
static __always_inline void judge_ip(const struct packet *pkt, struct clock *clock,
				     struct verdict *v)
{
	struct endpoints ends;
	struct params *p;
	__u32 rule;
	int slot;

	v->gen = active_generation();
	if (is_neighbour_discovery(pkt) ||
	    !between_overlays(v->gen, pkt->family, pkt->src, pkt->dst, &ends)) {
		settle(v, ACTION_ALLOW, RULE_UNFILTERED);
		return;
	}
	slot = policy_slot(v->gen);
	p = params.lookup(&slot);
	if (!p) {
		/* Unreachable (an array of 2 always has index 0 and 1); the verifier needs the check. */
		settle(v, ACTION_ALLOW, RULE_UNFILTERED);
		return;
	}
	rule = exception_rule(v->gen, p, &ends);
	if (rule) {
		if (!pkt->later_fragment)
			track_exception_flow(pkt, v->gen, p, clock);
		settle(v, ACTION_ALLOW, rule);
		return;
	}
	/* Judged by the policy from here on (exception pairs are never filtered). */
	v->accept_mark = p->accept_mark;
	v->audit = p->audit;
	v->between_overlays = ends.src.overlay_id != ends.dst.overlay_id;
	if (pkt->later_fragment) {
		follow_first_fragment(pkt, p, clock, v);
		return;
	}
	judge_filtered(pkt, &ends, v->gen, p, clock, v);
}

/*
 * Every first fragment's verdict is remembered, an unfiltered one too: if a
 * new policy filters the pair before the later fragments arrive, they still
 * follow their first fragment, so no datagram is judged half by each policy.
 */
static __always_inline void classify_ip(const struct packet *pkt, struct clock *clock,
					struct verdict *v)
{
	judge_ip(pkt, clock, v);
	if (pkt->first_fragment)
		fragment_remember(pkt, v->action, v->rule, clock_now(clock));
}

/* The verdict for a frame that parse_frame() returned `frame` for. */
static __always_inline void classify(int frame, const struct packet *pkt, struct clock *clock,
				     struct verdict *v)
{
	if (frame == FRAME_IP) {
		classify_ip(pkt, clock, v);
		return;
	}
	v->gen = active_generation();
	if (frame == FRAME_MALFORMED)
		settle(v, ACTION_DROP, RULE_MALFORMED);
	else
		settle(v, ACTION_ALLOW, RULE_UNFILTERED);
}

#endif /* ISOEBPF_CLASSIFY_H */

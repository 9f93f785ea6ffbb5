/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Everything the datapath shares with the control plane: rule ids, verdict
 * codes, and the layout of every map key and value.
 *
 * control/abi.py mirrors this file with ctypes and tests/unit/test_abi.py
 * parses it, so keep it plain: #define NAME number, and structs of fixed-width
 * fields with explicit padding (no bitfields, no implicit holes), so both
 * sides agree on every offset without asking a compiler.
 *
 * Byte order: fields named __be* and every field inside an LPM key's data are
 * big-endian, because an LPM trie compares the data bit by bit from the first
 * byte, most significant bit first. Other fields are in host order.
 */
#ifndef ISOEBPF_ABI_H
#define ISOEBPF_ABI_H

/*
 * Fixed rule ids, equal to control/ir.py's RULE_*. They are also the numbered
 * verdict reasons of counters and events: never renumber one, only add.
 * Policy rules (exceptions, hairpins, allow rules) start at FIRST_POLICY_RULE.
 */
#define RULE_UNFILTERED   0 /* source or destination in no overlay, or not IP (by its ethertype) */
#define RULE_ESTABLISHED  1 /* a tracked connection, or an ICMP error about one */
#define RULE_DEFAULT      2 /* no exception, hairpin or allow rule matched */
#define RULE_FRAGMENT     3 /* a later fragment whose first fragment was not seen */
/*
 * A filtered packet whose transport header is cut short; any IP packet whose
 * IP header cannot be read (IPv4: shorter than 20 bytes or than its IHL,
 * IHL < 5, total length below the header length, version not 4; IPv6:
 * shorter than 40 bytes, version not 6, an extension header cut short, or
 * more than IPV6_MAX_EXT_HEADERS of them); and any frame whose link header
 * cannot be read (shorter than Ethernet, a VLAN tag cut short, more than
 * VLAN_MAX_TAGS tags). Without its addresses such a packet cannot be shown to
 * be outside the overlays, so it is dropped rather than let through unjudged
 * (the kernel's own input would drop most of them as well).
 */
#define RULE_MALFORMED    4
#define FIRST_POLICY_RULE 16

/* Rule ids the counters hold: counters[rule], shared by both generations. */
#ifndef ISOEBPF_MAX_RULES
#define ISOEBPF_MAX_RULES 4096
#endif

/* What happens to a packet: the `action` of verdicts, fragments and events. */
#define ACTION_ALLOW  1
#define ACTION_DROP   2
#define ACTION_REJECT 3

/* Protocol codes in the allow table: ICMP and ICMPv6 share PROTO_ICMP. */
#define PROTO_ICMP 1
#define PROTO_TCP  6
#define PROTO_UDP  17

/* Extension headers an IPv6 packet may carry before its transport header. */
#define IPV6_MAX_EXT_HEADERS 8

/* VLAN tags (802.1Q or 802.1ad) a frame may carry before its ethertype: QinQ. */
#define VLAN_MAX_TAGS 2

/*
 * REJECT replies: an ICMP error quotes as much of the offending packet as
 * keeps the reply within the minimum MTU (RFC 1812 4.3.2.3, RFC 4443 2.4(c)),
 * and every reply leaves with this TTL / hop limit.
 */
#define REPLY_MAX_IPV4  576
#define REPLY_MAX_IPV6  1280
#define REPLY_HOP_LIMIT 64

/* Address families in keys and events: the IP version. */
#define FAMILY_IPV4 4
#define FAMILY_IPV6 6

/* Bits of an LPM key's data that precede the part a prefix may cut short. */
#define CLASS_FIXED_BITS 32 /* slot */
#define ALLOW_FIXED_BITS 96 /* slot, src_class, dst_class */

/* flow_state.flags */
#define FLOW_FIN_ORIG  1 /* the connection's opener sent FIN */
#define FLOW_FIN_REPLY 2 /* the other side sent FIN */
#define FLOW_CLOSING   4 /* RST seen, or FIN both ways: alive for tcp_closing only */
#define FLOW_OPEN      8 /* this end opened a connection (flow_entry.opened) */

/* flow_entry.opened's index: which end of the key opened the connection. */
#define FLOW_BY_SRC 0
#define FLOW_BY_DST 1

/* classes_v4: prefixlen = CLASS_FIXED_BITS + the network's prefix length. */
struct class_v4_key {
	__u32 prefixlen;
	__be32 slot;
	__u8 addr[4];
};

/* classes_v6: prefixlen = CLASS_FIXED_BITS + the network's prefix length. */
struct class_v6_key {
	__u32 prefixlen;
	__be32 slot;
	__u8 addr[16];
};

struct class_value {
	__u32 class_id;
	__u32 overlay_id;
};

struct exception_key {
	__u32 slot;
	__u32 src_class;
	__u32 dst_class;
};

struct hairpin_key {
	__u32 slot;
	__u32 overlay_id;
};

/*
 * allowed: prefixlen = ALLOW_FIXED_BITS + match_bits, where match_bits is 0
 * (any protocol), 8 (one protocol) or 8 + k (k leading bits of the port). The
 * port follows the protocol byte directly so that those bits are contiguous;
 * pad is last, always zero and never inside a prefix.
 */
struct allow_key {
	__u32 prefixlen;
	__be32 slot;
	__be32 src_class;
	__be32 dst_class;
	__u8 proto;
	__u8 port[2];
	__u8 pad;
};

struct rule_value {
	__u32 rule;
};

/*
 * A pair of endpoints, in the datapath's canonical order (conntrack.h's
 * flow_canonical), so that both directions of a connection find it with one
 * lookup; which end opened it is in the value (flow_entry). IPv4 addresses
 * fill the first 4 bytes, the other 12 are zero. TCP and UDP carry their
 * ports, ICMP echo its identifier as both ports, other protocols zeros.
 * proto is the IP protocol (ICMPv6 is 58 here, not PROTO_ICMP).
 */
struct flow_key {
	__u8 family;
	__u8 proto;
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__u8 src[16];
	__u8 dst[16];
};

struct flow_state {
	__u64 last_seen_ns;
	__u32 gen; /* the generation that last allowed the connection */
	__u8 flags;
	__u8 pad[3];
};

/*
 * conntrack's value: the connection each end of the key opened, if it did
 * (FLOW_OPEN). Almost always one end; both only when each opened its own,
 * as an exception's traffic may beside a connection the other way. Each is
 * judged, refreshed and cut on its own, as two entries would be.
 */
struct flow_entry {
	struct flow_state opened[2]; /* index FLOW_BY_SRC, FLOW_BY_DST */
};

/* A datagram's fragments: IPv4 ids are 16 bits, IPv6 ids 32. */
struct fragment_key {
	__u8 family;
	__u8 proto;
	__u16 pad;
	__u32 id;
	__u8 src[16];
	__u8 dst[16];
};

struct fragment_verdict {
	__u64 seen_ns;
	__u32 rule;
	__u8 action;
	__u8 pad[3];
};

/* Per-generation scalars, params[gen & 1]. */
struct params {
	__u64 tcp_timeout_ns;
	__u64 tcp_closing_timeout_ns;
	__u64 udp_timeout_ns; /* also every protocol but TCP and ICMP */
	__u64 icmp_timeout_ns;
	__u64 fragment_timeout_ns;
	__u32 default_action;
	/*
	 * Mark bits the TC program sets on the packets it allows between two
	 * overlays (0: none). Where Docker's FORWARD isolation would drop them
	 * again, one DOCKER-USER rule accepts what carries them (docs/docker.md).
	 */
	__u32 accept_mark;
	/*
	 * Audit mode (1): verdicts are reached, counted and traced as always, but
	 * nothing is denied; connections the policy would deny are tracked, so
	 * that their replies are not counted as denials too.
	 */
	__u32 audit;
	/*
	 * 1 when the generation has exceptions; 0 spares every packet between
	 * overlays the exception lookup (a hash of a class pair, ~5-10 ns).
	 */
	__u32 has_exceptions;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * Per-CPU token bucket of events; tokens are counted in billionths.
 * `suppressed`: verdicts not sent while tracing because the bucket was empty.
 * `lost`: events the bucket allowed that found the ring buffer full.
 */
struct token_bucket {
	__u64 refilled_ns;
	__u64 nanotokens;
	__u64 suppressed;
	__u64 lost;
};

/* One verdict, as `isoebpf trace` shows it. Ports as in flow_key. */
struct verdict_event {
	__u64 timestamp_ns;
	__u32 ifindex;
	__u32 rule;
	__u8 family;
	__u8 proto;
	__u8 action;
	__u8 audit; /* audit mode let it through: `action` is what enforcing would have done */
	__be16 sport;
	__be16 dport;
	__u8 src[16];
	__u8 dst[16];
};

#endif /* ISOEBPF_ABI_H */

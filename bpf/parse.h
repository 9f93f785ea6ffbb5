/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Frame -> struct packet: what the classifier reads from one packet.
 *
 * Parser contract: each parser takes a cursor, checks the header against the
 * end of the data before reading it, advances past it, and returns the next
 * protocol or -1. tests/packets.py parses frames by the same rules (it is how
 * the tests know which Packet the evaluator must be given for a frame).
 */
#ifndef ISOEBPF_PARSE_H
#define ISOEBPF_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#include "abi.h"

/* What parse_frame found. */
#define FRAME_NOT_IP    0 /* an ethertype other than IPv4/IPv6, after at most VLAN_MAX_TAGS tags */
#define FRAME_IP        1
#define FRAME_MALFORMED 2 /* a link or IP header that cannot be read: see RULE_MALFORMED */

/* IPv4 frag_off bits (include/net/ip.h is not UAPI). */
#define IPV4_MORE_FRAGMENTS 0x2000
#define IPV4_OFFSET_MASK    0x1fff

/* IPv6 fragment header frag_off bits. */
#define IPV6_MORE_FRAGMENTS 0x0001
#define IPV6_OFFSET_MASK    0xfff8

#define ICMP_ECHO_REPLY_TYPE     0
#define ICMP_ECHO_REQUEST_TYPE   8
#define ICMPV6_ECHO_REQUEST_TYPE 128
#define ICMPV6_ECHO_REPLY_TYPE   129

/* The TCP flags byte (offset 13 of the header). */
#define TCP_FLAGS_FIN 0x01
#define TCP_FLAGS_SYN 0x02
#define TCP_FLAGS_RST 0x04
#define TCP_FLAGS_ACK 0x10

/* An 802.1Q/802.1ad tag (include/linux/if_vlan.h is not UAPI). */
struct vlan_tag {
	__be16 tci;
	__be16 encapsulated_proto;
};

/* The longest link header parse_ethernet() reads: Ethernet and VLAN_MAX_TAGS tags. */
#define LINK_HEADER_MAX (ETH_HLEN + VLAN_MAX_TAGS * sizeof(struct vlan_tag))

/*
 * Above every offset of an IP header (LINK_HEADER_MAX) and of a transport
 * header (then IPv6 and IPV6_MAX_EXT_HEADERS extension headers of at most
 * 2 KiB): masks for the verifier (parse_frame).
 */
#define L3_OFF_MASK 0x1f
#define L4_OFF_MASK 0x7fff
_Static_assert(LINK_HEADER_MAX <= L3_OFF_MASK, "L3_OFF_MASK must not change an offset");
_Static_assert(LINK_HEADER_MAX + 40 + IPV6_MAX_EXT_HEADERS * 2048 <= L4_OFF_MASK,
	       "L4_OFF_MASK must not change an offset");

/* Transport bytes a quoted packet must carry: RFC 792's "64 bits of data". */
#define QUOTED_TRANSPORT_BYTES 8

/* The IPv6 fragment header (RFC 8200 4.5; include/net/ipv6.h is not UAPI). */
struct ipv6_fragment_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/*
 * The packet an ICMP error quotes, as far as its flow is concerned. The 8
 * transport bytes are read both as TCP/UDP ports and as ICMP type and
 * identifier, whatever the protocol: quoted_flow_key() picks by protocol.
 */
struct quoted_packet {
	__u8 present; /* an IP header and 8 transport bytes were quoted */
	__u8 proto;
	__u8 icmp_type;
	__u8 pad;
	__be16 sport;
	__be16 dport;
	__be16 icmp_id;
	__u16 pad2;
	__u8 src[16];
	__u8 dst[16];
};

struct packet {
	__u8 family;
	__u8 proto; /* IP protocol of the transport header (ICMPv6 is 58) */
	__u8 later_fragment; /* fragment offset > 0: no transport header */
	__u8 first_fragment; /* offset 0 with more fragments to come */
	__u8 truncated; /* the transport header is cut short: its fields stay 0 */
	__u8 tcp_flags;
	__u8 tcp_header_len;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 link_multicast; /* sent to an Ethernet group address (broadcast included) */
	/*
	 * Where the IP header starts: 14, 18 or 22 (no, one or two VLAN tags).
	 * A u8, so that the verifier knows every pointer computed from it stays
	 * far below 64 KiB.
	 */
	__u8 l3_off;
	__u8 pad;
	__u16 l4_off;
	__u16 ip_len; /* the datagram's length by its own header */
	__be16 sport;
	__be16 dport;
	__be16 icmp_id;
	__u32 frag_id;
	__be32 tcp_seq;
	__be32 tcp_ack;
	__u8 src[16]; /* IPv4 in the first 4 bytes, as in flow_key */
	__u8 dst[16];
	struct quoted_packet inner; /* only for ICMP errors (is_icmp_error_about_flow) */
};

struct cursor {
	void *pos;
	void *end;
};

static __always_inline int is_icmp(__u8 proto)
{
	return proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/*
 * ICMP errors that may concern a tracked connection (evaluate.ICMP_ERRORS):
 * destination unreachable (it carries "fragmentation needed"), time exceeded,
 * and for IPv6 packet too big.
 */
static __always_inline int is_icmp_error_about_flow(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED;
	if (proto == IPPROTO_ICMPV6)
		return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG ||
		       type == ICMPV6_TIME_EXCEED;
	return 0;
}

static __always_inline int is_icmp_echo(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == ICMP_ECHO_REQUEST_TYPE || type == ICMP_ECHO_REPLY_TYPE;
	return type == ICMPV6_ECHO_REQUEST_TYPE || type == ICMPV6_ECHO_REPLY_TYPE;
}

static __always_inline int is_vlan_tag(__u16 ethertype)
{
	return ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD;
}

/*
 * Ethernet and up to VLAN_MAX_TAGS VLAN tags, 802.1Q or 802.1ad in any order
 * (the kernel stacks VLAN devices either way, and strips the tags on the
 * way to an address behind them). Returns the ethertype (host order), or -1
 * for a link header that cannot be read: cut short, or with a tag beyond
 * VLAN_MAX_TAGS, whose payload may as well be IP for an overlay.
 */
static __always_inline int parse_ethernet(struct cursor *c, struct packet *pkt)
{
	struct ethhdr *eth = c->pos;
	struct vlan_tag *tag;
	__u16 type;
	int i;

	if ((void *)(eth + 1) > c->end)
		return -1;
	c->pos = eth + 1;
	pkt->link_multicast = eth->h_dest[0] & 1;
	type = bpf_ntohs(eth->h_proto);
#pragma unroll
	for (i = 0; i < VLAN_MAX_TAGS; i++) {
		if (!is_vlan_tag(type))
			return type;
		tag = c->pos;
		if ((void *)(tag + 1) > c->end)
			return -1;
		c->pos = tag + 1;
		type = bpf_ntohs(tag->encapsulated_proto);
	}
	return is_vlan_tag(type) ? -1 : type;
}

/* Returns the IP protocol, or -1 for a header that cannot be read. */
static __always_inline int parse_ipv4(struct cursor *c, struct packet *pkt)
{
	struct iphdr *ip = c->pos;
	__u32 header_len;
	__u16 frag;

	if ((void *)(ip + 1) > c->end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	header_len = ip->ihl * 4;
	if (c->pos + header_len > c->end || bpf_ntohs(ip->tot_len) < header_len)
		return -1;
	pkt->family = FAMILY_IPV4;
	pkt->ip_len = bpf_ntohs(ip->tot_len);
	__builtin_memcpy(pkt->src, &ip->saddr, 4);
	__builtin_memcpy(pkt->dst, &ip->daddr, 4);
	frag = bpf_ntohs(ip->frag_off);
	pkt->later_fragment = (frag & IPV4_OFFSET_MASK) != 0;
	pkt->first_fragment = !pkt->later_fragment && (frag & IPV4_MORE_FRAGMENTS);
	pkt->frag_id = bpf_ntohs(ip->id);
	c->pos += header_len;
	return ip->protocol;
}

/*
 * Walks at most IPV6_MAX_EXT_HEADERS extension headers. Returns the upper
 * protocol, or -1. A later fragment stops at its fragment header: what
 * follows is the middle of the datagram, and the fragment header's next
 * header is the protocol.
 */
static __always_inline int parse_ipv6(struct cursor *c, struct packet *pkt)
{
	struct ipv6hdr *ip6 = c->pos;
	struct ipv6_opt_hdr *opt;
	struct ipv6_fragment_hdr *frag;
	__u8 next;
	__u16 frag_off;
	int i;

	if ((void *)(ip6 + 1) > c->end || ip6->version != 6)
		return -1;
	pkt->family = FAMILY_IPV6;
	pkt->ip_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	__builtin_memcpy(pkt->src, &ip6->saddr, 16);
	__builtin_memcpy(pkt->dst, &ip6->daddr, 16);
	next = ip6->nexthdr;
	c->pos = ip6 + 1;
	for (i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		switch (next) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			opt = c->pos;
			if ((void *)(opt + 1) > c->end)
				return -1;
			next = opt->nexthdr;
			c->pos += (opt->hdrlen + 1) * 8;
			break;
		case IPPROTO_FRAGMENT:
			frag = c->pos;
			if ((void *)(frag + 1) > c->end)
				return -1;
			next = frag->nexthdr;
			frag_off = bpf_ntohs(frag->frag_off);
			pkt->frag_id = bpf_ntohl(frag->identification);
			c->pos = frag + 1;
			if (frag_off & IPV6_OFFSET_MASK) {
				pkt->later_fragment = 1;
				return next;
			}
			pkt->first_fragment = (frag_off & IPV6_MORE_FRAGMENTS) != 0;
			break;
		default:
			return next;
		}
	}
	switch (next) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_FRAGMENT:
		return -1;
	}
	return next;
}

/*
 * The packet an ICMP error quotes: an IP header of the outer packet's family
 * and the first 8 bytes of its transport header. IPv6 extension headers are
 * not walked here: the quoted next header is taken as the protocol.
 */
static __always_inline void parse_quoted(struct cursor *c, struct packet *pkt)
{
	struct quoted_packet *q = &pkt->inner;
	__u8 *l4;

	if (pkt->family == FAMILY_IPV4) {
		struct iphdr *ip = c->pos;

		if ((void *)(ip + 1) > c->end || ip->version != 4 || ip->ihl < 5)
			return;
		l4 = c->pos + ip->ihl * 4;
		q->proto = ip->protocol;
		__builtin_memcpy(q->src, &ip->saddr, 4);
		__builtin_memcpy(q->dst, &ip->daddr, 4);
	} else {
		struct ipv6hdr *ip6 = c->pos;

		if ((void *)(ip6 + 1) > c->end || ip6->version != 6)
			return;
		l4 = (__u8 *)(ip6 + 1);
		q->proto = ip6->nexthdr;
		__builtin_memcpy(q->src, &ip6->saddr, 16);
		__builtin_memcpy(q->dst, &ip6->daddr, 16);
	}
	if ((void *)(l4 + QUOTED_TRANSPORT_BYTES) > c->end)
		return;
	/*
	 * No branch on the protocol here: each doubled the states the verifier
	 * carried through the classifier and the reply (part of why 6.1 refused
	 * the TC program with E2BIG).
	 */
	q->sport = *(__be16 *)l4;
	q->dport = *(__be16 *)(l4 + 2);
	q->icmp_type = l4[0];
	q->icmp_id = *(__be16 *)(l4 + 4);
	q->present = 1;
}

/*
 * Ports, flags and ICMP fields. A transport header cut short sets
 * `truncated` and leaves every transport field 0.
 */
static __always_inline void parse_transport(struct cursor *c, struct packet *pkt)
{
	if (pkt->later_fragment)
		return;
	if (pkt->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = c->pos;

		if ((void *)(tcp + 1) > c->end) {
			pkt->truncated = 1;
			return;
		}
		pkt->sport = tcp->source;
		pkt->dport = tcp->dest;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
		pkt->tcp_header_len = tcp->doff * 4;
		pkt->tcp_seq = tcp->seq;
		pkt->tcp_ack = tcp->ack_seq;
	} else if (pkt->proto == IPPROTO_UDP) {
		struct udphdr *udp = c->pos;

		if ((void *)(udp + 1) > c->end) {
			pkt->truncated = 1;
			return;
		}
		pkt->sport = udp->source;
		pkt->dport = udp->dest;
	} else if (is_icmp(pkt->proto)) {
		/* ICMP and ICMPv6 share this layout: type, code, checksum, id, sequence. */
		struct icmphdr *icmp = c->pos;

		if ((void *)(icmp + 1) > c->end) {
			pkt->truncated = 1;
			return;
		}
		pkt->icmp_type = icmp->type;
		pkt->icmp_code = icmp->code;
		pkt->icmp_id = icmp->un.echo.id;
		if (is_icmp_error_about_flow(pkt->proto, pkt->icmp_type)) {
			c->pos = icmp + 1;
			parse_quoted(c, pkt);
		}
	}
}

/*
 * After the link header and after the IP header, the cursor goes on from its
 * offset, masked. Each way through a parser (each number of VLAN tags and of
 * IPv6 extension headers) left it differently bounded, and the verifier
 * carried every one through the rest of the program: the 6.1 verifier gave
 * up on the TC program (E2BIG). From a masked offset they look alike. The
 * masks change no offset a parser can reach.
 */
static __always_inline int parse_frame(void *data, void *data_end, struct packet *pkt)
{
	struct cursor c = { .pos = data, .end = data_end };
	int ethertype = parse_ethernet(&c, pkt);
	int proto;

	if (ethertype < 0)
		return FRAME_MALFORMED;
	if (ethertype != ETH_P_IP && ethertype != ETH_P_IPV6)
		return FRAME_NOT_IP;
	pkt->l3_off = c.pos - data;
	c.pos = data + (pkt->l3_off & L3_OFF_MASK);
	if (ethertype == ETH_P_IP)
		proto = parse_ipv4(&c, pkt);
	else
		proto = parse_ipv6(&c, pkt);
	if (proto < 0)
		return FRAME_MALFORMED;
	pkt->proto = proto;
	pkt->l4_off = c.pos - data;
	c.pos = data + (pkt->l4_off & L4_OFF_MASK);
	parse_transport(&c, pkt);
	return FRAME_IP;
}

/*
 * Did parsing stop short of something it needed? On TC the rest of the
 * packet may sit in a nonlinear skb's fragments: pull it in and parse again.
 */
static __always_inline int parse_wants_more(int frame, const struct packet *pkt)
{
	return frame == FRAME_MALFORMED || pkt->truncated ||
	       (is_icmp_error_about_flow(pkt->proto, pkt->icmp_type) && !pkt->inner.present);
}

#endif /* ISOEBPF_PARSE_H */

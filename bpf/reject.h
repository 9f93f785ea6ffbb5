/* SPDX-License-Identifier: Apache-2.0 */
/*
 * REJECT: turn the offending frame, in place, into the answer and send it
 * back out of the interface it came in on.
 *
 * TCP gets a reset (RFC 9293 3.10.7.1): if the segment carried an ACK, the
 * reset takes its sequence number from it; otherwise it has sequence 0, ACK
 * set, and acknowledges everything the segment occupied (payload, SYN, FIN).
 * Everything else gets ICMP destination unreachable, "administratively
 * prohibited" (type 3 code 13; ICMPv6 type 1 code 1), quoting as much of the
 * offending packet as fits in REPLY_MAX_IPV4 / REPLY_MAX_IPV6 bytes.
 *
 * The reply comes from the packet's original destination, swaps the MAC
 * addresses, keeps the VLAN tags (both of a QinQ frame), and leaves with REPLY_HOP_LIMIT.
 *
 * The frame is resized by the entry point (XDP and TC move packets with
 * different helpers), then reply_write() fills it in.
 */
#ifndef ISOEBPF_REJECT_H
#define ISOEBPF_REJECT_H

#include "abi.h"
#include "parse.h"

#define ICMP_ADMIN_PROHIBITED_TYPE   3
#define ICMP_ADMIN_PROHIBITED_CODE   13
#define ICMPV6_ADMIN_PROHIBITED_TYPE 1
#define ICMPV6_ADMIN_PROHIBITED_CODE 1
#define ICMP_HEADER_LEN              8
#define TCP_RESET_LEN                20 /* a header without options */
#define IPV4_REPLY_HEADER_LEN        20 /* no options */
#define IPV6_REPLY_HEADER_LEN        40

/*
 * bpf_csum_diff() sums at most 512 bytes per call, in multiples of 4: the
 * quote is summed in chunks, then words, then the last 1-3 bytes.
 */
#define CSUM_CHUNK      64
#define CSUM_MAX_CHUNKS (REPLY_MAX_IPV6 / CSUM_CHUNK)
#define CSUM_MAX_WORDS  (CSUM_CHUNK / 4)
#define CSUM_LEN_MASK   0x7ff /* above every quote length: bounds it for the verifier */
_Static_assert(REPLY_MAX_IPV6 <= CSUM_LEN_MASK, "quotes must fit CSUM_LEN_MASK");

/* How the frame must change size before reply_write() fills it in. */
struct reply_plan {
	__u32 keep; /* bytes of the frame kept: the tail beyond is cut first */
	__u16 quote_len; /* bytes of the offending IP packet an ICMP reply quotes */
	__u8 grow; /* bytes then added in front (the ICMP reply's own headers); small for the verifier */
	__u8 pad;
};

/* ICMPv4 error messages (RFC 1122 3.2.2): never answered with another error. */
static __always_inline int is_icmpv4_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH || type == ICMP_REDIRECT ||
	       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

static __always_inline int is_group_address(__u8 family, const __u8 *addr)
{
	/* IPv4: 224/4 multicast, 240/4 reserved and the limited broadcast. */
	return family == FAMILY_IPV4 ? addr[0] >= 224 : addr[0] == 0xff;
}

/*
 * May this packet be answered? Not a reset with a reset, not an ICMP error
 * with an ICMP error, and, as RFC 1122 3.2.2 asks of ICMP errors, nothing
 * sent to or from a group address or to a link-layer group address (a
 * broadcast would otherwise draw one answer per listener).
 */
static __always_inline int reply_allowed(const struct packet *pkt)
{
	if (pkt->link_multicast || is_group_address(pkt->family, pkt->dst) ||
	    is_group_address(pkt->family, pkt->src))
		return 0;
	if (pkt->proto == IPPROTO_TCP)
		return !(pkt->tcp_flags & TCP_FLAGS_RST);
	if (pkt->proto == IPPROTO_ICMP)
		return !is_icmpv4_error(pkt->icmp_type);
	if (pkt->proto == IPPROTO_ICMPV6)
		return pkt->icmp_type >= ICMPV6_INFOMSG_MASK; /* types below 128 are errors */
	return 1;
}

static __always_inline __u32 reply_ip_header_len(const struct packet *pkt)
{
	return pkt->family == FAMILY_IPV4 ? IPV4_REPLY_HEADER_LEN : IPV6_REPLY_HEADER_LEN;
}

/* Returns 0 and fills `plan`, or -1 when the packet is not to be answered. */
static __always_inline int reply_plan(const struct packet *pkt, __u32 frame_len,
				      struct reply_plan *plan)
{
	__u32 ip_header = reply_ip_header_len(pkt);
	__u32 limit = pkt->family == FAMILY_IPV4 ? REPLY_MAX_IPV4 : REPLY_MAX_IPV6;
	__u32 quote;

	if (!reply_allowed(pkt))
		return -1;
	if (pkt->proto == IPPROTO_TCP) {
		/* The parsed headers are at least this long: the frame only shrinks. */
		plan->keep = pkt->l3_off + ip_header + TCP_RESET_LEN;
		plan->grow = 0;
		plan->quote_len = 0;
		return 0;
	}
	/* Quote the datagram as its header sizes it (not the link's padding), as much as fits. */
	quote = frame_len - pkt->l3_off;
	if (quote > pkt->ip_len)
		quote = pkt->ip_len;
	if (quote > limit - ip_header - ICMP_HEADER_LEN)
		quote = limit - ip_header - ICMP_HEADER_LEN;
	plan->keep = pkt->l3_off + quote;
	plan->grow = ip_header + ICMP_HEADER_LEN;
	plan->quote_len = quote;
	return 0;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Sum a header the reply builds on the stack (`size`: even, a constant) into
 * `sum`, a 16-bit word at a time, in line: a handful of adds cost less than
 * a call of bpf_csum_diff(), and the reset takes three such sums. Stack
 * reads must be aligned, so `buf` is at least 2-byte aligned.
 */
static __always_inline __u32 csum_add_stack(const void *buf, __u32 size, __u32 sum)
{
	const __u16 *words = buf;
	__u64 total = sum;
	int i;

#pragma unroll
	for (i = 0; i < size / 2; i++)
		total += words[i];
	total = (total & 0xffffffff) + (total >> 32);
	total = (total & 0xffffffff) + (total >> 32);
	return total;
}

/*
 * Sum `len` packet bytes from data + off into `sum`; -1 if they are not all there.
 *
 * Quotes are shorter than CSUM_MAX_CHUNKS chunks (and CSUM_LEN_MASK), so each
 * loop ends having summed all that it can: `done` is set to that again, from
 * `len`, between the loops. To the verifier the loops' exits then look alike and are
 * pruned; with `done` a different constant after every number of chunks, it
 * walked each combination of chunk, word and tail counts, most of the 1M
 * instructions after which the 6.1 verifier refused the TC program (E2BIG).
 */
static __always_inline __s64 csum_add_packet(void *data, void *data_end, __u32 off, __u32 len,
					     __u32 sum)
{
	__u8 last[4] __attribute__((aligned(2))) = {};
	__u32 done = 0;
	__u8 *p;
	int i;

	for (i = 0; i < CSUM_MAX_CHUNKS && done + CSUM_CHUNK <= len; i++) {
		p = data + off + done;
		if ((void *)(p + CSUM_CHUNK) > data_end)
			return -1;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)p, CSUM_CHUNK, sum);
		done += CSUM_CHUNK;
	}
	done = len & CSUM_LEN_MASK & ~(CSUM_CHUNK - 1);
	for (i = 0; i < CSUM_MAX_WORDS && done + 4 <= len; i++) {
		p = data + off + done;
		if ((void *)(p + 4) > data_end)
			return -1;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)p, 4, sum);
		done += 4;
	}
	done = len & CSUM_LEN_MASK & ~3;
	/* An odd tail is summed as if padded with zeros (RFC 1071). */
	for (i = 0; i < 3 && done < len; i++) {
		p = data + off + done;
		if ((void *)(p + 1) > data_end)
			return -1;
		last[i] = *p;
		done++;
	}
	if (i)
		sum = csum_add_stack(last, sizeof(last), sum);
	return sum;
}

/* The IPv6 pseudo-header of RFC 8200 8.1. */
struct ipv6_pseudo_header {
	__u8 src[16];
	__u8 dst[16];
	__be32 len;
	__u8 zero[3];
	__u8 next;
};

/* The IPv4 pseudo-header of RFC 9293 3.1. */
struct ipv4_pseudo_header {
	__u8 src[4];
	__u8 dst[4];
	__u8 zero;
	__u8 proto;
	__be16 len;
};

/* The reply's pseudo-header sum: addresses swapped, as the reply travels. */
static __always_inline __u32 csum_pseudo_header(const struct packet *pkt, __u8 proto, __u32 len)
{
	if (pkt->family == FAMILY_IPV4) {
		struct ipv4_pseudo_header ph = { .proto = proto, .len = bpf_htons(len) };

		__builtin_memcpy(ph.src, pkt->dst, 4);
		__builtin_memcpy(ph.dst, pkt->src, 4);
		return csum_add_stack(&ph, sizeof(ph), 0);
	} else {
		struct ipv6_pseudo_header ph = { .len = bpf_htonl(len), .next = proto };

		__builtin_memcpy(ph.src, pkt->dst, 16);
		__builtin_memcpy(ph.dst, pkt->src, 16);
		return csum_add_stack(&ph, sizeof(ph), 0);
	}
}

/* The reply's IP header at data + l3_off; -1 if the frame is too short. */
static __always_inline int write_ip_header(void *data, void *data_end, __u32 l3_off,
					   const struct packet *pkt, __u8 proto, __u32 payload_len)
{
	if (pkt->family == FAMILY_IPV4) {
		struct iphdr ip = { .version = 4,
				    .ihl = IPV4_REPLY_HEADER_LEN / 4,
				    .tot_len = bpf_htons(IPV4_REPLY_HEADER_LEN + payload_len),
				    .ttl = REPLY_HOP_LIMIT,
				    .protocol = proto };
		void *at = data + l3_off;

		__builtin_memcpy(&ip.saddr, pkt->dst, 4);
		__builtin_memcpy(&ip.daddr, pkt->src, 4);
		ip.check = csum_fold(csum_add_stack(&ip, sizeof(ip), 0));
		if (at + sizeof(ip) > data_end)
			return -1;
		__builtin_memcpy(at, &ip, sizeof(ip));
	} else {
		struct ipv6hdr ip6 = { .version = 6,
				       .payload_len = bpf_htons(payload_len),
				       .nexthdr = proto,
				       .hop_limit = REPLY_HOP_LIMIT };
		void *at = data + l3_off;

		__builtin_memcpy(&ip6.saddr, pkt->dst, 16);
		__builtin_memcpy(&ip6.daddr, pkt->src, 16);
		if (at + sizeof(ip6) > data_end)
			return -1;
		__builtin_memcpy(at, &ip6, sizeof(ip6));
	}
	return 0;
}

/* The reset for a TCP segment, at data + l4. */
static __always_inline int write_tcp_reset(void *data, void *data_end, __u32 l4,
					   const struct packet *pkt)
{
	struct tcphdr rst = { .source = pkt->dport, .dest = pkt->sport, .doff = 5, .rst = 1 };
	__u32 header_len = (pkt->l4_off - pkt->l3_off) + pkt->tcp_header_len;
	__u32 occupied = pkt->ip_len > header_len ? pkt->ip_len - header_len : 0;
	void *at = data + l4;
	__u32 sum;

	if (pkt->tcp_flags & TCP_FLAGS_ACK) {
		rst.seq = pkt->tcp_ack;
	} else {
		occupied += !!(pkt->tcp_flags & TCP_FLAGS_SYN) + !!(pkt->tcp_flags & TCP_FLAGS_FIN);
		rst.ack_seq = bpf_htonl(bpf_ntohl(pkt->tcp_seq) + occupied);
		rst.ack = 1;
	}
	sum = csum_pseudo_header(pkt, IPPROTO_TCP, sizeof(rst));
	rst.check = csum_fold(csum_add_stack(&rst, sizeof(rst), sum));
	if (at + sizeof(rst) > data_end)
		return -1;
	__builtin_memcpy(at, &rst, sizeof(rst));
	return 0;
}

/* The ICMP error at data + l4, the quote already after it. */
static __always_inline int write_icmp_error(void *data, void *data_end, __u32 l4,
					    const struct packet *pkt, __u32 quote_len)
{
	struct icmphdr icmp = {};
	void *at = data + l4;
	__u32 sum = 0;
	__s64 quoted;

	if (pkt->family == FAMILY_IPV4) {
		icmp.type = ICMP_ADMIN_PROHIBITED_TYPE;
		icmp.code = ICMP_ADMIN_PROHIBITED_CODE;
	} else {
		/* ICMPv6 sums a pseudo-header too; ICMP does not. */
		icmp.type = ICMPV6_ADMIN_PROHIBITED_TYPE;
		icmp.code = ICMPV6_ADMIN_PROHIBITED_CODE;
		sum = csum_pseudo_header(pkt, IPPROTO_ICMPV6, ICMP_HEADER_LEN + quote_len);
	}
	sum = csum_add_stack(&icmp, sizeof(icmp), sum);
	quoted = csum_add_packet(data, data_end, l4 + ICMP_HEADER_LEN, quote_len, sum);
	if (quoted < 0)
		return -1;
	icmp.checksum = csum_fold(quoted);
	if (at + sizeof(icmp) > data_end)
		return -1;
	__builtin_memcpy(at, &icmp, sizeof(icmp));
	return 0;
}

/*
 * Fill in the resized frame. The original link header now starts
 * plan->grow bytes in; everything else reply_write needs was parsed before.
 * Returns 0, or -1 when the frame is not as the plan left it.
 */
static __always_inline int reply_write(void *data, void *data_end, const struct packet *pkt,
				       const struct reply_plan *plan)
{
	__u32 l3_off = pkt->l3_off;
	__u32 l4 = l3_off + reply_ip_header_len(pkt);
	__u8 link[LINK_HEADER_MAX];
	__u8 *old = data + plan->grow;
	__u8 mac[ETH_ALEN];

	if ((void *)(old + LINK_HEADER_MAX) > data_end)
		return -1;
	/*
	 * Copy LINK_HEADER_MAX bytes however many tags there are: past the last
	 * tag they are the start of the IP header, which write_ip_header()
	 * overwrites (it is longer than the two tags a frame may lack).
	 */
	__builtin_memcpy(link, old, LINK_HEADER_MAX);
	__builtin_memcpy(mac, link, ETH_ALEN);
	__builtin_memcpy(link, link + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(link + ETH_ALEN, mac, ETH_ALEN);
	if (data + LINK_HEADER_MAX > data_end)
		return -1;
	__builtin_memcpy(data, link, LINK_HEADER_MAX);

	if (pkt->proto == IPPROTO_TCP) {
		if (write_ip_header(data, data_end, l3_off, pkt, IPPROTO_TCP, TCP_RESET_LEN))
			return -1;
		return write_tcp_reset(data, data_end, l4, pkt);
	}
	if (write_ip_header(data, data_end, l3_off, pkt,
			    pkt->family == FAMILY_IPV4 ? IPPROTO_ICMP : IPPROTO_ICMPV6,
			    ICMP_HEADER_LEN + plan->quote_len))
		return -1;
	return write_icmp_error(data, data_end, l4, pkt, plan->quote_len);
}

/* XDP: resize the frame for the reply and fill it in; 0 when it is ready to send. */
static __always_inline int xdp_reply(struct xdp_md *ctx, const struct packet *pkt,
				     __u32 frame_len)
{
	struct reply_plan plan;
	void *data, *data_end;

	if (reply_plan(pkt, frame_len, &plan))
		return -1;
	if (frame_len > plan.keep && bpf_xdp_adjust_tail(ctx, (int)plan.keep - (int)frame_len))
		return -1;
	if (plan.grow && bpf_xdp_adjust_head(ctx, -(int)plan.grow))
		return -1;
	/* Both helpers moved the packet: every pointer into it is stale. */
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	return reply_write(data, data_end, pkt, &plan);
}

/* TC: the same, with the skb helpers; the kept bytes are made linear first. */
static __always_inline int tc_reply(struct __sk_buff *skb, const struct packet *pkt)
{
	struct reply_plan plan;
	void *data, *data_end;

	if (reply_plan(pkt, skb->len, &plan))
		return -1;
	if (skb->len > plan.keep && bpf_skb_change_tail(skb, plan.keep, 0))
		return -1;
	/* Usually linear already: a pull is a helper call that would change nothing. */
	if ((long)skb->data_end - (long)skb->data < plan.keep && bpf_skb_pull_data(skb, plan.keep))
		return -1;
	if (plan.grow && bpf_skb_change_head(skb, plan.grow, 0))
		return -1;
	/* The helpers may have reallocated the skb's data: re-read the pointers. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	return reply_write(data, data_end, pkt, &plan);
}

#endif /* ISOEBPF_REJECT_H */

/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Forwarding beside Docker: the TC program hands what it allows between two
 * overlays straight to the next hop's device (bpf_redirect_neigh, kernel
 * 5.10), so it never crosses the host's FORWARD hook.
 *
 * Why: Docker drops everything between its networks in FORWARD, and while
 * dockerd restarts it rebuilds those chains one command at a time, flushing
 * the rule that lets our marked packets past. A packet the policy allows
 * that met FORWARD in that moment would be dropped. Forwarded here, it is
 * judged by the policy alone, in both directions, and keeps its source
 * address (Docker's MASQUERADE between bridges never sees it).
 *
 * Only where the control plane set params' accept_mark (Docker's chains are
 * there): elsewhere allowed packets go on through the host's own firewall.
 * A packet the route lookup cannot forward (no route, too big for the next
 * device, TTL running out, a VLAN-tagged frame) goes on to FORWARD as
 * before, with the mark.
 */
#ifndef ISOEBPF_ROUTE_H
#define ISOEBPF_ROUTE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"

#define ETH_HEADER_LEN 14
#define ADDRESS_FAMILY_INET  2  /* AF_INET, which is not UAPI */
#define ADDRESS_FAMILY_INET6 10 /* AF_INET6 */

/*
 * The kernel's bpf_redirect_neigh(ifindex, params, plen, flags): bcc 0.26's
 * helpers.h declares it without plen, which would leave flags to chance.
 */
static long (*redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
			      __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* Route lookup for the IP packet after an untagged Ethernet header; 0 when it has no route. */
static __always_inline int next_hop_device(struct __sk_buff *skb, struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = skb->ingress_ifindex;
	/* tot_len 0: the kernel checks the skb against the device's MTU, GSO aware. */
	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return 0;
		fib->family = ADDRESS_FAMILY_INET;
		fib->l4_protocol = ip->protocol;
		fib->ipv4_src = ip->saddr;
		fib->ipv4_dst = ip->daddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return 0;
		fib->family = ADDRESS_FAMILY_INET6;
		fib->l4_protocol = ip6->nexthdr;
		__builtin_memcpy(fib->ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, &ip6->daddr, 16);
	} else {
		return 0;
	}
	switch (bpf_fib_lookup(skb, fib, sizeof(*fib), 0)) {
	case BPF_FIB_LKUP_RET_SUCCESS:
	case BPF_FIB_LKUP_RET_NO_NEIGH: /* redirect_neigh resolves it */
		return fib->ifindex;
	default:
		return 0;
	}
}

/* A router's TTL (hop limit) step; 0 when the packet must not be forwarded. */
static __always_inline int take_one_hop(struct __sk_buff *skb, __u8 family)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (family == ADDRESS_FAMILY_INET) {
		struct iphdr *ip = data + ETH_HEADER_LEN;
		__be16 before;

		if ((void *)(ip + 1) > data_end || ip->ttl <= 1)
			return 0;
		before = *(__be16 *)&ip->ttl; /* TTL and protocol: one checksummed word */
		ip->ttl--;
		bpf_l3_csum_replace(skb, ETH_HEADER_LEN + offsetof(struct iphdr, check), before,
				    *(__be16 *)&ip->ttl, sizeof(__be16));
	} else {
		struct ipv6hdr *ip6 = data + ETH_HEADER_LEN;

		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return 0;
		ip6->hop_limit--;
	}
	return 1;
}

/*
 * The forwarder: tc_isoebpf tail-calls it (the classifier leaves no stack
 * for a route lookup) with a packet it allowed between two overlays, where
 * Docker runs. Redirected to the next hop, or left to FORWARD (UNSPEC).
 */
int tc_forward(struct __sk_buff *skb)
{
	int index = 0;
	struct bpf_fib_lookup *fib = route_lookup.lookup(&index);
	int ifindex = 0;
	int ret = TC_ACT_UNSPEC;

	if (fib)
		ifindex = next_hop_device(skb, fib);
	if (ifindex && take_one_hop(skb, fib->family))
		ret = redirect_neigh(ifindex, NULL, 0, 0);
	return ret;
}

#endif /* ISOEBPF_ROUTE_H */

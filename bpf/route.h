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
#include "parse.h"

#define ADDRESS_FAMILY_INET  2  /* AF_INET, which is not UAPI */
#define ADDRESS_FAMILY_INET6 10 /* AF_INET6 */

/*
 * The kernel's bpf_redirect_neigh(ifindex, params, plen, flags): bcc 0.26's
 * helpers.h declares it without plen, which would leave flags to chance.
 */
static long (*redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
			      __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/*
 * The route lookup for the packet tc_isoebpf parsed (the CPU's `packets`
 * entry: a tail call goes on in the same run); 0 when it has no route.
 */
static __always_inline int next_hop_device(struct __sk_buff *skb, const struct packet *pkt,
					   struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = skb->ingress_ifindex;
	fib->l4_protocol = pkt->proto;
	/* tot_len 0: the kernel checks the skb against the device's MTU, GSO aware. */
	if (pkt->family == FAMILY_IPV4) {
		fib->family = ADDRESS_FAMILY_INET;
		__builtin_memcpy(&fib->ipv4_src, pkt->src, 4);
		__builtin_memcpy(&fib->ipv4_dst, pkt->dst, 4);
	} else {
		fib->family = ADDRESS_FAMILY_INET6;
		__builtin_memcpy(fib->ipv6_src, pkt->src, 16);
		__builtin_memcpy(fib->ipv6_dst, pkt->dst, 16);
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

	if (family == FAMILY_IPV4) {
		struct iphdr *ip = data + ETH_HLEN;
		__be16 before;

		if ((void *)(ip + 1) > data_end || ip->ttl <= 1)
			return 0;
		before = *(__be16 *)&ip->ttl; /* TTL and protocol: one checksummed word */
		ip->ttl--;
		bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), before,
				    *(__be16 *)&ip->ttl, sizeof(__be16));
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return 0;
		ip6->hop_limit--;
	}
	return 1;
}

/*
 * The forwarder: tc_isoebpf tail-calls it (the classifier leaves no stack
 * for a route lookup) with a packet it allowed between two overlays, where
 * Docker runs. Redirected to the next hop, or left to FORWARD (UNSPEC): so
 * is a VLAN-tagged frame, which redirect_neigh cannot send as it is.
 */
int tc_forward(struct __sk_buff *skb)
{
	int index = 0;
	struct packet *pkt = packets.lookup(&index);
	struct bpf_fib_lookup *fib = route_lookup.lookup(&index);
	int ifindex = 0;
	int ret = TC_ACT_UNSPEC;

	if (pkt && fib && pkt->l3_off == ETH_HLEN)
		ifindex = next_hop_device(skb, pkt, fib);
	if (ifindex && take_one_hop(skb, pkt->family))
		ret = redirect_neigh(ifindex, NULL, 0, 0);
	return ret;
}

#endif /* ISOEBPF_ROUTE_H */

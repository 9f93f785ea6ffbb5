/* SPDX-License-Identifier: Apache-2.0 */
/*
 * isoebpf: isolation between overlay networks.
 *
 * Two entry points share one classifier (classify.h) and one exit
 * (record_verdict, stats.h): xdp_isoebpf for XDP, tc_isoebpf for TC clsact
 * ingress. Beside Docker, tc_isoebpf tail-calls a third, tc_forward
 * (route.h), with what it allows between overlays.
 * control/backends/ebpf/program.py compiles this file with bcc, and
 * tests/bpf runs both programs through BPF_PROG_TEST_RUN against the
 * reference evaluator.
 *
 * bcc rewrites map accesses (map.lookup(...)) only in the file it compiles,
 * so program.py inlines the local headers below into one source, with #line
 * markers that keep diagnostics pointing at the headers.
 */
#include <uapi/linux/pkt_cls.h>

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "conntrack.h"
#include "clock.h"
#include "classify.h"
#include "reject.h"
#include "route.h"
#include "stats.h"

/* Headers a TC parse may need linear: Ethernet, VLAN tags, IPv6 and extensions, a quote. */
#define TC_PARSE_BYTES 256

/* XDP's verdict on the frame, parsed into the CPU's scratch pkt. */
static __always_inline int xdp_judge(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;
	struct clock clock = {};
	struct verdict v = {};
	int frame;
	int ret;

	__builtin_memset(pkt, 0, sizeof(*pkt));
	frame = parse_frame(data, data_end, pkt);
	classify(frame, pkt, &clock, &v);
	if (v.action == ACTION_ALLOW || v.audit)
		ret = XDP_PASS;
	else if (v.action == ACTION_REJECT && !xdp_reply(ctx, pkt, frame_len))
		ret = XDP_TX;
	else
		ret = XDP_DROP;
	record_verdict(ctx->ingress_ifindex, frame_len, pkt, &v, &clock);
	return ret;
}

int xdp_isoebpf(struct xdp_md *ctx)
{
	int scratch = 0;
	struct packet *pkt = packets.lookup(&scratch);

	/* The lookup cannot fail (index 0 of a one-entry array); the verifier wants the check. */
	return pkt ? xdp_judge(ctx, pkt) : XDP_DROP;
}

/* TC's verdict on skb, parsed into the CPU's scratch pkt. */
static __always_inline int tc_judge(struct __sk_buff *skb, struct packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 skb_len = skb->len;
	struct clock clock = {};
	struct verdict v = {};
	int forward = 0;
	int frame;
	int ret;

	__builtin_memset(pkt, 0, sizeof(*pkt));
	frame = parse_frame(data, data_end, pkt);
	if (parse_wants_more(frame, pkt) && data_end - data < skb_len) {
		/*
		 * Headers reach into a nonlinear skb's fragments: pull them in and
		 * parse again (should the pull fail, the second parse sees what the
		 * first did). The pull may move the data: re-read the pointers.
		 */
		bpf_skb_pull_data(skb, skb_len < TC_PARSE_BYTES ? skb_len : TC_PARSE_BYTES);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		__builtin_memset(pkt, 0, sizeof(*pkt));
		frame = parse_frame(data, data_end, pkt);
	}
	classify(frame, pkt, &clock, &v);
	/*
	 * UNSPEC rather than OK for "allow": filters of other tools after ours on
	 * the same hook still get their say. The mark tells a firewall further on
	 * (Docker's isolation) that the policy allowed it; beside Docker, what
	 * crosses overlays is forwarded here instead (route.h).
	 */
	if (v.action == ACTION_ALLOW) {
		skb->mark |= v.accept_mark;
		forward = v.accept_mark && v.between_overlays;
		ret = TC_ACT_UNSPEC;
	}
	else if (v.audit)
		ret = TC_ACT_UNSPEC; /* unmarked: a firewall further on judges it as if we were not there */
	else if (v.action == ACTION_REJECT && !tc_reply(skb, pkt))
		ret = bpf_redirect(skb->ifindex, 0);
	else
		ret = TC_ACT_SHOT;
	record_verdict(skb->ifindex, skb_len, pkt, &v, &clock);
	if (forward)
		forwarders.call(skb, FORWARDER); /* returns only if the forwarder is missing */
	return ret;
}

int tc_isoebpf(struct __sk_buff *skb)
{
	int scratch = 0;
	struct packet *pkt = packets.lookup(&scratch);

	/* The lookup cannot fail (index 0 of a one-entry array); the verifier wants the check. */
	return pkt ? tc_judge(skb, pkt) : TC_ACT_SHOT;
}

/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What every verdict leaves behind: a per-rule counter, and, when the trace
 * command asks for them, an event, at most event_rate[0] per second per CPU
 * so that tracing cannot slow the datapath down; the verdicts beyond the rate
 * are counted (token_bucket.suppressed), not sent.
 */
#ifndef ISOEBPF_STATS_H
#define ISOEBPF_STATS_H

#include "abi.h"
#include "maps.h"
#include "parse.h"
#include "classify.h"
#include "clock.h"

#define ONE_SECOND_NS 1000000000ULL

static __always_inline void count_verdict(const struct verdict *v, __u64 bytes)
{
	struct counter *counter;
	int index = v->rule;

	if (v->rule >= ISOEBPF_MAX_RULES)
		return;
	counter = counters.lookup(&index);
	if (!counter)
		return;
	/* Per-CPU: no other CPU writes this counter. */
	counter->packets++;
	counter->bytes += bytes;
}

/*
 * A token bucket of `rate` tokens per second holding at most one second's
 * worth, kept in billionths of a token so that refilling needs no division.
 */
static __always_inline int event_budget_allows(struct clock *clock)
{
	struct token_bucket *bucket;
	__u32 *rate;
	__u64 elapsed;
	__u64 full;
	__u64 now;
	int index = 0;

	rate = event_rate.lookup(&index);
	if (!rate || !*rate)
		return 0;
	bucket = event_tokens.lookup(&index);
	if (!bucket)
		return 0;
	now = clock_now(clock);
	full = *rate * ONE_SECOND_NS;
	elapsed = now > bucket->refilled_ns ? now - bucket->refilled_ns : 0;
	/* Capped, so that elapsed * rate cannot overflow 64 bits. */
	if (elapsed > ONE_SECOND_NS)
		elapsed = ONE_SECOND_NS;
	bucket->nanotokens += elapsed * *rate;
	if (bucket->nanotokens > full)
		bucket->nanotokens = full;
	bucket->refilled_ns = now;
	if (bucket->nanotokens < ONE_SECOND_NS) {
		bucket->suppressed++;
		return 0;
	}
	bucket->nanotokens -= ONE_SECOND_NS;
	return 1;
}

static __always_inline void emit_event(void *ctx, __u32 ifindex, const struct packet *pkt,
				       const struct verdict *v, struct clock *clock)
{
	struct verdict_event event = { .ifindex = ifindex,
				       .rule = v->rule,
				       .family = pkt->family,
				       .proto = pkt->proto,
				       .action = v->action,
				       .audit = v->action != ACTION_ALLOW && v->audit };
	struct flow_key flow = {};

	if (!event_budget_allows(clock))
		return;
	event.timestamp_ns = clock_now(clock);
	if (pkt->family && flow_key_of(pkt, &flow)) {
		event.sport = flow.sport;
		event.dport = flow.dport;
	}
	__builtin_memcpy(event.src, pkt->src, 16);
	__builtin_memcpy(event.dst, pkt->dst, 16);
	events.perf_submit(ctx, &event, sizeof(event));
}

/* The one exit of both programs: count the verdict, and trace it if asked. */
static __always_inline void record_verdict(void *ctx, __u32 ifindex, __u64 bytes,
					   const struct packet *pkt, const struct verdict *v,
					   struct clock *clock)
{
	count_verdict(v, bytes);
	emit_event(ctx, ifindex, pkt, v, clock);
}

#endif /* ISOEBPF_STATS_H */

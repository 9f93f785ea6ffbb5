/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What every verdict leaves behind: a per-rule counter, and, when the trace
 * command asks for them, an event, at most event_rate[0] per second per CPU
 * so that tracing cannot slow the datapath down; the verdicts beyond the rate
 * are counted (token_bucket.suppressed), not sent, and so are the events the
 * ring buffer has no room for (token_bucket.lost).
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
 * Returns the CPU's bucket when it allows an event, else NULL.
 */
static __always_inline struct token_bucket *event_budget_allows(struct clock *clock)
{
	struct token_bucket *bucket;
	__u32 *rate;
	__u64 elapsed;
	__u64 full;
	__u64 now;
	int index = 0;

	rate = event_rate.lookup(&index);
	if (!rate || !*rate)
		return NULL;
	bucket = event_tokens.lookup(&index);
	if (!bucket)
		return NULL;
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
		return NULL;
	}
	bucket->nanotokens -= ONE_SECOND_NS;
	return bucket;
}

/*
 * The event is written in place in the ring (reserve, fill, submit): no copy,
 * and no room on the stack, which the TC program has little of. A reserve
 * fails only when the ring is full (the reader is behind): counted as lost.
 */
static __always_inline void emit_event(__u32 ifindex, const struct packet *pkt,
				       const struct verdict *v, struct clock *clock)
{
	struct token_bucket *bucket = event_budget_allows(clock);
	struct verdict_event *event;
	struct flow_key flow = {};

	if (!bucket)
		return;
	event = events.ringbuf_reserve(sizeof(*event));
	if (!event) {
		bucket->lost++; /* per-CPU: no other CPU writes this bucket */
		return;
	}
	event->timestamp_ns = clock_now(clock);
	event->ifindex = ifindex;
	event->rule = v->rule;
	event->family = pkt->family;
	event->proto = pkt->proto;
	event->action = v->action;
	event->audit = v->action != ACTION_ALLOW && v->audit;
	event->sport = 0;
	event->dport = 0;
	if (pkt->family && flow_key_of(pkt, &flow)) {
		event->sport = flow.sport;
		event->dport = flow.dport;
	}
	__builtin_memcpy(event->src, pkt->src, 16);
	__builtin_memcpy(event->dst, pkt->dst, 16);
	events.ringbuf_submit(event, 0);
}

/* The one exit of both programs: count the verdict, and trace it if asked. */
static __always_inline void record_verdict(__u32 ifindex, __u64 bytes, const struct packet *pkt,
					   const struct verdict *v, struct clock *clock)
{
	count_verdict(v, bytes);
	emit_event(ifindex, pkt, v, clock);
}

#endif /* ISOEBPF_STATS_H */

/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The packet's time, read from the clock once and only when a step needs it
 * (a tracked connection's age, a fragment's, an event's timestamp): reading
 * it costs about 25 ns here (kernel 6.18 in a VM, B1), more than the lookup
 * of a class, and a packet that opens nothing and finds nothing never needs it.
 */
#ifndef ISOEBPF_CLOCK_H
#define ISOEBPF_CLOCK_H

struct clock {
	__u64 ns; /* 0: not read yet */
};

static __always_inline __u64 clock_now(struct clock *clock)
{
	if (!clock->ns)
		clock->ns = bpf_ktime_get_ns();
	return clock->ns;
}

#endif /* ISOEBPF_CLOCK_H */

/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of the program. Key and value layouts are in abi.h.
 *
 * Generations: the policy tables hold two policies at once, in two slots told
 * apart by the slot (generation & 1) that leads every key. program.py writes
 * generation g+1 into the slot g does not use (only the entries that differ
 * from what the slot holds: usually generation g-1) and flips `config`; g's
 * entries stay, as the base of the next change. The program reads the
 * generation once per packet, so each packet is judged wholly by one policy.
 * Table sizes therefore count both slots.
 *
 * Sizes are ISOEBPF_MAX_* constants, overridable at compile time
 * (-DISOEBPF_MAX_...=N, see program.compile_program).
 */
#ifndef ISOEBPF_MAPS_H
#define ISOEBPF_MAPS_H

#include "abi.h"
#include "parse.h" /* struct packet, for packets */

#ifndef ISOEBPF_MAX_CLASSES
#define ISOEBPF_MAX_CLASSES 16384
#endif
#ifndef ISOEBPF_MAX_EXCEPTIONS
#define ISOEBPF_MAX_EXCEPTIONS 16384
#endif
#ifndef ISOEBPF_MAX_HAIRPINS
#define ISOEBPF_MAX_HAIRPINS 2048
#endif
#ifndef ISOEBPF_MAX_ALLOWED
#define ISOEBPF_MAX_ALLOWED 131072
#endif
#ifndef ISOEBPF_MAX_CONNECTIONS
#define ISOEBPF_MAX_CONNECTIONS 131072
#endif
#ifndef ISOEBPF_MAX_FRAGMENTS
#define ISOEBPF_MAX_FRAGMENTS 8192
#endif
#ifndef ISOEBPF_EVENT_RING_PAGES
#define ISOEBPF_EVENT_RING_PAGES 256
#endif

/*
 * The active generation, at index 0. Written by program.activate (one word,
 * so the flip is atomic), read once per packet. 0 = nothing loaded yet: the
 * tables are empty until the first activation, so every packet passes as
 * unfiltered.
 */
BPF_ARRAY(config, __u32, 1);

/*
 * Per-generation scalars (timeouts, default action), index gen & 1: the
 * active generation and the one being written never share a slot. Written by
 * program.py before the flip, read per filtered packet.
 */
BPF_ARRAY(params, struct params, 2);

/*
 * IPv4 address -> (class, overlay) of the longest policy CIDR holding it
 * (IR.classes). Missing: in no overlay, unfiltered. Written by
 * program.py, read twice per IP packet. Size: classes of two
 * generations; an LPM trie allocates only what it holds.
 */
BPF_F_TABLE("lpm_trie", struct class_v4_key, struct class_value, classes_v4, ISOEBPF_MAX_CLASSES,
	    BPF_F_NO_PREALLOC);

/* IPv6 twin of classes_v4. */
BPF_F_TABLE("lpm_trie", struct class_v6_key, struct class_value, classes_v6, ISOEBPF_MAX_CLASSES,
	    BPF_F_NO_PREALLOC);

/*
 * (src class, dst class) -> the exception rule that leaves the pair
 * unfiltered (IR.exceptions). Written by program.py, read per packet
 * between overlays. Size: class pairs the exceptions expand to, two
 * generations.
 */
BPF_HASH(exceptions, struct exception_key, struct rule_value, ISOEBPF_MAX_EXCEPTIONS);

/*
 * Overlay -> its hairpin rule, only for overlays that are not isolated
 * (IR.overlays). Written by program.py, read per new connection inside
 * one overlay. Size: overlays of two generations.
 */
BPF_HASH(hairpins, struct hairpin_key, struct rule_value, ISOEBPF_MAX_HAIRPINS);

/*
 * (src class, dst class, protocol, port prefix) -> the first allow rule in
 * file order that allows it (IR.allowed, already resolved for longest-prefix
 * reading by the compiler). Written by program.py, read per new
 * connection. Size: a port range costs up to 30 entries per class pair.
 */
BPF_F_TABLE("lpm_trie", struct allow_key, struct rule_value, allowed, ISOEBPF_MAX_ALLOWED,
	    BPF_F_NO_PREALLOC);

/*
 * Tracked connections, under their endpoints in canonical order: one lookup
 * per filtered packet, whichever way it travels (the value says which end
 * opened). Written by the program (new connection, refresh, FIN/RST, lazy
 * revocation) and by program.activate (cuts connections a new policy
 * forbids). LRU: when full, the longest idle pair goes first, and its next
 * packet is judged afresh (fails closed). Size: concurrent pairs of
 * endpoints between overlays.
 *
 * A policy that outgrows the maps in force moves to a program compiled anew
 * with larger ones; that program shares this table (and `fragments`) with
 * the running one, by the running one's pin (ISOEBPF_CONNTRACK_PIN), so that
 * no connection is forgotten when each interface switches programs.
 */
#ifdef ISOEBPF_CONNTRACK_PIN
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_entry, conntrack, ISOEBPF_MAX_CONNECTIONS,
		 ISOEBPF_CONNTRACK_PIN);
#else
BPF_TABLE("lru_hash", struct flow_key, struct flow_entry, conntrack, ISOEBPF_MAX_CONNECTIONS);
#endif

/*
 * First fragments' verdicts, for the fragments that follow. Written and read
 * by the program only; entries live fragment_timeout_ns. LRU: a lost entry
 * drops the datagram's later fragments (fails closed). Size: datagrams in
 * reassembly at once.
 */
#ifdef ISOEBPF_FRAGMENTS_PIN
BPF_TABLE_PINNED("lru_hash", struct fragment_key, struct fragment_verdict, fragments,
		 ISOEBPF_MAX_FRAGMENTS, ISOEBPF_FRAGMENTS_PIN);
#else
BPF_TABLE("lru_hash", struct fragment_key, struct fragment_verdict, fragments,
	  ISOEBPF_MAX_FRAGMENTS);
#endif

/*
 * Packets and bytes per rule, index rule id, whatever the generation: an
 * update keeps the id of every rule it keeps (ir.compiler numbers by rule
 * identity), so a rule counts on where it counted, and only a rule new to
 * an id has its counter zeroed (by program.py, before its generation goes
 * live). Per-CPU so that counting needs no atomics; program.read_counters
 * sums the CPUs.
 */
BPF_PERCPU_ARRAY(counters, struct counter, ISOEBPF_MAX_RULES);

/*
 * Verdict events for `isoebpf trace`: one BPF ring buffer (kernel 5.8) that
 * every CPU writes, in ISOEBPF_EVENT_RING_PAGES pages (a power of two). Read
 * by the trace command through libbpf (control/backends/ebpf/ringbuf.py);
 * nothing is sent unless it asks (event_rate), and an event that finds no
 * room is counted in event_tokens' `lost`. Size: 1 MiB holds 16,384 events
 * of 64 bytes (with the ring's own header), a second of the default rate
 * (1000 a second per CPU) on 16 CPUs should the reader stall that long.
 */
BPF_RINGBUF_OUTPUT(events, ISOEBPF_EVENT_RING_PAGES);

/*
 * Events per second each CPU may send, index 0; 0 (the default) sends none.
 * Written by the trace command (program.set_event_rate), read per packet.
 */
BPF_ARRAY(event_rate, __u32, 1);

/*
 * Each CPU's token bucket for events, and what became of the verdicts it did
 * not send (suppressed, lost). Written by the program; read by the trace
 * command, which sums the CPUs.
 */
BPF_PERCPU_ARRAY(event_tokens, struct token_bucket, 1);

/*
 * The forwarder (route.h's tc_forward) at index FORWARDER, which tc_isoebpf
 * tail-calls with what it allows between overlays beside Docker. Written by
 * program.compile_program, once; kept filled by its pin (a program array
 * empties when its last user reference goes).
 */
#define FORWARDER 0
BPF_PROG_ARRAY(forwarders, 1);

/*
 * Each CPU's parsed packet, index 0, for both programs: their stacks (the
 * classifier's keys, REJECT answers, the tail call) have no room for it. A
 * CPU runs one program at a time to its end. The programs' own scratch.
 */
BPF_PERCPU_ARRAY(packets, struct packet, 1);

/* Each CPU's route lookup for tc_forward, index 0. The program's own scratch. */
BPF_PERCPU_ARRAY(route_lookup, struct bpf_fib_lookup, 1);

#endif /* ISOEBPF_MAPS_H */

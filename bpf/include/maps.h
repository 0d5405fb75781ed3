/* SPDX-License-Identifier: GPL-2.0 */
/*
 * maps.h - every map, in one place. All are pinned under BH_PIN_DIR (set by
 * the loader), so a restarted agent reuses them and enforcement never
 * pauses. Names are at most 15 characters (the kernel's object name limit).
 *
 * Policy maps come in two slots (suffix _0/_1). The agent fills the
 * inactive slot, then flips ctl.active_slot in one array update: a packet
 * reads the slot once, so it is judged entirely by one policy.
 */
#ifndef BH_MAPS_H
#define BH_MAPS_H

#include "consts.h"
#include "types.h"

#ifndef BH_PIN_DIR
#error "BH_PIN_DIR must be defined by the loader"
#endif

/* ctl[0]: active slot + global flags. Written by the agent only. */
BPF_TABLE_PINNED("array", __u32, struct bh_ctl, ctl, 1, BH_PIN_DIR "/ctl");

/* if_cfg: ifindex -> reject send path of the interface. Written by the loader at attach; not per slot. */
BPF_TABLE_PINNED("array", __u32, struct bh_if_cfg, if_cfg, BH_MAX_IFINDEX, BH_PIN_DIR "/if_cfg");

/* slot_cfg[slot]: generation, default action, audit mode of each slot. */
BPF_TABLE_PINNED("array", __u32, struct bh_slot_cfg, slot_cfg, BH_NUM_SLOTS, BH_PIN_DIR "/slot_cfg");

/*
 * Per-slot maps. Hash maps do not preallocate: a slot holds what its policy
 * needs, not its capacity (lookups cost the same either way).
 */
#define BH_SLOT_MAPS(n)                                                                            \
	/* seg_map_N: ifindex -> segment; an array so the per-packet lookup is inlined. */         \
	BPF_TABLE_PINNED("array", __u32, struct bh_seg_val, seg_map_##n, BH_MAX_IFINDEX,           \
			 BH_PIN_DIR "/seg_map_" #n);                                               \
	/* src_host_N: (segment, host address) -> app. */                                          \
	BPF_TABLE_PINNED("hash", struct bh_src_key, struct bh_ident, src_host_##n, BH_MAX_IDENT,   \
			 BH_PIN_DIR "/src_host_" #n, BPF_F_NO_PREALLOC);                            \
	/* src_ident_N: (segment, src prefix) -> app. LPM tries must not preallocate. */           \
	BPF_TABLE_PINNED("lpm_trie", struct bh_src_key, struct bh_ident, src_ident_##n,            \
			 BH_MAX_IDENT, BH_PIN_DIR "/src_ident_" #n, BPF_F_NO_PREALLOC);            \
	/* dst_host_N: host address -> app. */                                                     \
	BPF_TABLE_PINNED("hash", struct bh_dst_key, struct bh_ident, dst_host_##n, BH_MAX_IDENT,   \
			 BH_PIN_DIR "/dst_host_" #n, BPF_F_NO_PREALLOC);                            \
	/* dst_ident_N: dst prefix -> app (destination apps have distinct addresses). */           \
	BPF_TABLE_PINNED("lpm_trie", struct bh_dst_key, struct bh_ident, dst_ident_##n,            \
			 BH_MAX_IDENT, BH_PIN_DIR "/dst_ident_" #n, BPF_F_NO_PREALLOC);            \
	/* pol_exact_N: one port / any port / any protocol -> action (prefixlen in the key). */    \
	BPF_TABLE_PINNED("hash", struct bh_policy_key, struct bh_policy_val, pol_exact_##n,        \
			 BH_MAX_POLICY, BH_PIN_DIR "/pol_exact_" #n, BPF_F_NO_PREALLOC);            \
	/* policy_N: port-range blocks -> action. */                                               \
	BPF_TABLE_PINNED("lpm_trie", struct bh_policy_key, struct bh_policy_val, policy_##n,       \
			 BH_MAX_POLICY, BH_PIN_DIR "/policy_" #n, BPF_F_NO_PREALLOC);              \
	/* sni_names_N: (src app, dst app, port, server name hash) -> verdict. */                  \
	BPF_TABLE_PINNED("hash", struct bh_sni_key, struct bh_sni_val, sni_names_##n, BH_MAX_SNI,  \
			 BH_PIN_DIR "/sni_names_" #n, BPF_F_NO_PREALLOC);                           \
	/* fab_N: the fabric: service addresses, segments and apps behind gateways, transit peers. */ \
	BPF_TABLE_PINNED("hash", struct bh_fab_key, struct bh_fab_val, fab_##n, BH_MAX_IDENT,      \
			 BH_PIN_DIR "/fab_" #n, BPF_F_NO_PREALLOC)

BH_SLOT_MAPS(0);
BH_SLOT_MAPS(1);

/*
 * flows4/flows6: verdict cache, two entries per flow (forward key on the
 * client's segment, reply key on the server's). LRU: under pressure the
 * least recently used flow is re-judged on its next packet, never allowed blind.
 */
#ifndef BH_FLOWS_LRU_FLAGS
#define BH_FLOWS_LRU_FLAGS 0
#endif
BPF_TABLE_PINNED("lru_hash", struct bh_flow4_key, struct bh_flow, flows4, BH_MAX_FLOWS, BH_PIN_DIR "/flows4",
		 BH_FLOWS_LRU_FLAGS);
BPF_TABLE_PINNED("lru_hash", struct bh_flow6_key, struct bh_flow, flows6, BH_MAX_FLOWS, BH_PIN_DIR "/flows6",
		 BH_FLOWS_LRU_FLAGS);

/* fab_snat: the client's address and port of each source-translated flow from another gateway (bulkhead_transit_in). */
BPF_TABLE_PINNED("lru_hash", struct bh_snat_key, struct bh_snat_val, fab_snat, BH_MAX_FLOWS, BH_PIN_DIR "/fab_snat");

/* frags: verdict of each fragmented datagram, written by its first fragment. */
BPF_TABLE_PINNED("lru_hash", struct bh_frag_key, struct bh_frag, frags, BH_MAX_FRAGS, BH_PIN_DIR "/frags");

/* sni_state: ClientHellos being parsed across segments, then the name asked for. */
BPF_TABLE_PINNED("lru_hash", struct bh_flow6_key, struct bh_sni_state, sni_state, BH_MAX_SNI_PARSE,
		 BH_PIN_DIR "/sni_state");

/* sni_scratch: one per-CPU bh_sni_state to build a new entry in (too big for the stack). */
BPF_TABLE_PINNED("percpu_array", __u32, struct bh_sni_state, sni_scratch, 1, BH_PIN_DIR "/sni_scratch");

/* addr_scratch: one per-CPU address (the service address of a new translated flow, off bulkhead_xdp's full stack). Not pinned. */
BPF_PERCPU_ARRAY(addr_scratch, struct bh_addr16, 1);

/* flow_scratch: one per-CPU flow entry to build a new one in (too big for bulkhead_xdp's stack). Not pinned. */
BPF_PERCPU_ARRAY(flow_scratch, struct bh_flow, 1);

#ifdef BH_NO_XDP_META
/*
 * A kernel without bpf_xdp_adjust_meta (the loader probes it): what bulkhead_xdp
 * would put in front of the packet goes here instead. meta_handoff: the
 * fast path's input (bh_fwd_handoff tail-calls bulkhead_forward: same CPU,
 * same run). send_back_pending: reject answers bulkhead_xdp passed up for
 * bulkhead_tc to send back out (XDP_PASS and TC ingress run on the same CPU,
 * in the same softirq). Not pinned.
 */
BPF_PERCPU_ARRAY(meta_handoff, struct bh_meta, 1);
BPF_PERCPU_ARRAY(send_back_pending, struct bh_send_back, 1);
#endif

/* req_hop: the timed request of each HTTP/TLS flow through the transit (struct bh_hop). Not pinned. */
BPF_TABLE("lru_hash", struct bh_flow6_key, struct bh_hop, req_hop, BH_MAX_SNI_PARSE);
/* hop_scratch: the forward key and a new turn, off the TC programs' full stacks. Not pinned. */
BPF_PERCPU_ARRAY(hop_scratch, struct bh_hop_scratch, 1);

/* flow_events: new flow / verdict change / end records for the agent's flow log. */
#ifdef BH_NO_TELEMETRY
#elif defined(BH_EVENTS_PERF)
BPF_PERF_OUTPUT(flow_events); /* kernels without BPF_MAP_TYPE_RINGBUF (< 5.8) */
#else
BPF_RINGBUF_OUTPUT(flow_events, BH_EVENT_RING_PAGES);
#endif
#ifdef BH_BENCH
/* bench_ctr: per-CPU run counter of BH_CTL_BENCH_NEW_FLOW (benchmark builds only). */
BPF_PERCPU_ARRAY(bench_ctr, __u32, 1);
#endif
/* ev_scratch: one per-CPU event to build (too big for the stack). Not pinned: scratch only. */
BPF_PERCPU_ARRAY(ev_scratch, struct bh_flow_event, 1);

/* lat_hist: hop-latency histograms per (src app, dst app, kind, log2 bucket). */
BPF_TABLE_PINNED("percpu_hash", struct bh_lat_key, struct bh_lat_val, lat_hist, BH_MAX_LAT,
		 BH_PIN_DIR "/lat_hist", BPF_F_NO_PREALLOC);

/* pair_flows: flows judged per (src app, dst app, rule, reason): exact, read at scrape time. */
BPF_TABLE_PINNED("percpu_hash", struct bh_pair_key, __u64, pair_flows, BH_MAX_PAIRS, BH_PIN_DIR "/pair_flows",
		 BPF_F_NO_PREALLOC);

/* stats: per-CPU packets/bytes per enum bh_reason. Summed by the agent at read time. */
BPF_TABLE_PINNED("percpu_array", __u32, struct bh_counter, stats, BH_REASON_MAX, BH_PIN_DIR "/stats");

/* events: per-CPU counts per enum bh_event. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, events, BH_EVENT_MAX, BH_PIN_DIR "/events");

/*
 * tails: enum bh_tail -> program. Pinned: a program array is emptied when
 * its last user reference goes, and the agent may exit while XDP stays.
 */
BPF_TABLE_PINNED("prog", __u32, __u32, tails, BH_TAIL_MAX, BH_PIN_DIR "/tails");

#endif /* BH_MAPS_H */

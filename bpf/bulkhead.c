/* SPDX-License-Identifier: GPL-2.0 */
/*
 * bulkhead.c - XDP application segmentation.
 *
 * Attached to every gateway interface the policy's segments name. For each
 * packet: parse (parse.h) -> segment of the ingress interface -> flow cache
 * (LRU, keyed per direction) -> on a miss, classify by identity:
 *
 *   src app = LPM(segment, src addr)      dst app = LPM(dst addr)
 *   verdict = LPM(src app, dst app, proto, dport)  or settings.default_action
 *
 * and cache the verdict for both directions (the reply key lives on the
 * destination's segment, so overlapping client CIDRs stay apart).
 * bh_record() is the single exit: every verdict is counted there by reason.
 *
 * Map accesses live in this file because bcc only rewrites map calls in the
 * main source file; headers hold pure parsing and packet building.
 */
#include <linux/pkt_cls.h>

#include "consts.h"
#include "enums.h"
#include "types.h"
#include "parse.h"
#include "reject.h"
#include "forward.h"
#include "sni_hash.h"
#include "tls_parse.h"
#include "tls_stream.h"
#include "maps.h"

/*
 * Benchmark hooks, compiled in only by -DBH_BENCH (benchmarks/conftest.py;
 * tests/bpf builds it once more for the tests of the hooks): the ctl flags
 * BH_CTL_BYPASS_FLOWS and BH_CTL_SNI_BENCH, and the reference program
 * bulkhead_empty. The production object has none of them, and ignores the
 * flags (tests/bpf/test_xdp_bench.py).
 */
#ifdef BH_BENCH
#define BH_BYPASS_FLOWS(ctl_flags) ((ctl_flags) & BH_CTL_BYPASS_FLOWS)
/*
 * BH_CTL_BENCH_NEW_FLOW: the same frame repeated is a new flow every run,
 * which takes the real new-flow path (flow-table miss, both inserts into the
 * LRU, evictions once it is full, the flow event): the source port and the
 * flow key's pad byte come from a per-CPU counter and the CPU (2^19 distinct
 * 5-tuples per CPU, four times the flows the table holds). Policy never looks
 * at either.
 */
static __always_inline void bh_bench_new_flow(struct bh_pkt *p)
{
	__u32 zero = 0;
	__u32 *n = bench_ctr.lookup(&zero);

	if (n) {
		__u32 c = (*n)++;
		p->sport_be = c;
		/* Bit 7 set: never the tuple of a real packet (pad 0). The CPU in the tag:
		 * a run moved to another CPU never repeats a tuple of this one's. */
		p->bench_tag = 0x80 | ((bpf_get_smp_processor_id() & 0x0f) << 3) | ((c >> 16) & 0x07);
	}
}
#else
#define BH_BYPASS_FLOWS(ctl_flags) 0
#endif

/* The one place a verdict is recorded: counter by reason, then the XDP code. */
static __always_inline int bh_record(__u32 reason, int xdp_code, __u64 len)
{
	struct bh_counter *c = stats.lookup(&reason);

	/* Per-CPU array lookups only fail for an index out of range. */
	if (c) {
		c->packets++;
		c->bytes += len;
	}
	return xdp_code;
}

/*
 * The verdict after a tail call that returned: its slot of `tails` is empty
 * (the loader fills every one: a program-array fault) or the chain ran out
 * (the kernel allows 33 tail calls per packet). Dropped, and counted as
 * that, not as what the caller would otherwise have fallen back to, so an
 * operator can tell a fault from policy. Never a pass: the packet's verdict
 * needed the program that did not run.
 */
static __always_inline int bh_tail_missed(__u64 len)
{
	return bh_record(BH_R_TAIL_CALL_MISSED, XDP_DROP, len);
}

static __always_inline void bh_event(__u32 ev)
{
	__u64 *v = events.lookup(&ev);
	if (v)
		(*v)++;
}

static __always_inline int bh_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* What a cached or fresh reason means for the packet in hand. */
static __always_inline int bh_reason_xdp(__u8 reason)
{
	switch (reason) {
	case BH_R_ALLOW_RULE:
	case BH_R_ALLOW_DEFAULT:
	case BH_R_ALLOW_REPLY:
	case BH_R_AUDIT_RULE:
	case BH_R_AUDIT_DEFAULT:
	case BH_R_SNI_PENDING:
	case BH_R_SNI_UNKNOWN_ALLOW:
	case BH_R_L7_STEER:
	case BH_R_L7_UPSTREAM:
		return XDP_PASS;
	case BH_R_REJECT_RULE:
		return XDP_TX;
	default:
		return XDP_DROP;
	}
}

/*
 * Slot selectors. Written as `slot ? map_1.lookup(k) : map_0.lookup(k)`,
 * clang merges the two calls into one call site with a selected map
 * pointer; the verifier then can't tell which map the call uses ("poisoned"
 * map pointer), stops inlining the lookup and emits a generic helper call:
 * ~10 ns per lookup, most of the established-flow cost. The empty asm on one
 * branch keeps the call sites apart. (bcc refuses map calls inside macros,
 * hence one function per map pair.)
 */
#define BH_KEEP_APART(v) asm volatile("" : "+r"(v))

static __always_inline struct bh_seg_val *bh_sel_seg(__u32 slot, __u32 *ifindex)
{
	struct bh_seg_val *v;
	if (slot) {
		v = seg_map_1.lookup(ifindex);
		BH_KEEP_APART(v);
	} else {
		v = seg_map_0.lookup(ifindex);
	}
	return v;
}

static __always_inline struct bh_ident *bh_sel_src_host(__u32 slot, struct bh_src_key *k)
{
	struct bh_ident *v;
	if (slot) {
		v = src_host_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = src_host_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_ident *bh_sel_src_ident(__u32 slot, struct bh_src_key *k)
{
	struct bh_ident *v;
	if (slot) {
		v = src_ident_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = src_ident_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_ident *bh_sel_dst_host(__u32 slot, struct bh_dst_key *k)
{
	struct bh_ident *v;
	if (slot) {
		v = dst_host_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = dst_host_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_ident *bh_sel_dst_ident(__u32 slot, struct bh_dst_key *k)
{
	struct bh_ident *v;
	if (slot) {
		v = dst_ident_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = dst_ident_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_policy_val *bh_sel_pol_exact(__u32 slot, struct bh_policy_key *k)
{
	struct bh_policy_val *v;
	if (slot) {
		v = pol_exact_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = pol_exact_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_policy_val *bh_sel_policy(__u32 slot, struct bh_policy_key *k)
{
	struct bh_policy_val *v;
	if (slot) {
		v = policy_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = policy_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_sni_val *bh_sel_sni(__u32 slot, struct bh_sni_key *k)
{
	struct bh_sni_val *v;
	if (slot) {
		v = sni_names_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = sni_names_0.lookup(k);
	}
	return v;
}

static __always_inline struct bh_fab_val *bh_sel_fab(__u32 slot, struct bh_fab_key *k)
{
	struct bh_fab_val *v;
	if (slot) {
		v = fab_1.lookup(k);
		BH_KEEP_APART(v);
	} else {
		v = fab_0.lookup(k);
	}
	return v;
}

/* A fact of the fabric (enum bh_fab_kind) by id or by address (NULL: by id only). */
static __always_inline struct bh_fab_val *bh_fab(__u32 slot, __u32 kind, __u32 id, const __u8 *addr)
{
	struct bh_fab_key k = {};

	k.kind = kind;
	k.id = id;
	if (addr)
		__builtin_memcpy(k.addr, addr, 16);
	return bh_sel_fab(slot, &k);
}

/*
 * The client's own address and port of a packet of a source-translated flow
 * (BH_FLOWX_SNAT) as the server sends it, on the server's segment `seg`
 * (fab_snat), or NULL.
 */
static __always_inline struct bh_snat_val *bh_snat_orig(const struct bh_pkt *p, __u32 seg)
{
	struct bh_snat_key k = {};

	__builtin_memcpy(k.saddr, p->saddr, 16);
	k.sport_be = p->sport_be;
	k.dport_be = p->dport_be;
	k.proto = p->proto;
	k.family = p->family;
	k.segment_id = seg;
	return fab_snat.lookup(&k);
}

/*
 * As bh_nat_other_key, for a reply (on segment `seg`) to a client whose
 * source this gateway translated (BH_FLOWX_SNAT): the forward entry has the
 * client's own address and port. Only hop timing needs it: a flow decided
 * by server name was decided at the client's gateway.
 */
static __always_inline void bh_snat_other_key(struct bh_pkt *p, const struct bh_flow *f, __u32 seg)
{
	if (!(f->xflags & BH_FLOWX_SNAT) || !(f->flags & BH_FLOWF_REPLY))
		return;
	struct bh_snat_val *o = bh_snat_orig(p, seg);
	if (o) {
		__builtin_memcpy(p->daddr, o->addr, 16);
		__builtin_memcpy(&p->daddr4_be, o->addr + 12, 4);
		p->dport_be = o->port_be;
	}
}

/*
 * A translated flow's two entries are keyed on the two sides of the
 * translation (forward: the service address the client sends to; reply: the
 * real address the app answers from). Turn `p`, parsed as `f`'s own key has
 * it, into the tuple whose reverse is the other entry's key. Needs the
 * 16-byte addresses (bh_pkt_addrs16).
 */
static __always_inline void bh_nat_other_key(__u32 slot, struct bh_pkt *p, const struct bh_flow *f)
{
	struct bh_fab_val *nv;

	if (!(f->flags & BH_FLOWF_NAT))
		return;
	if (f->flags & BH_FLOWF_REPLY) {
		nv = bh_fab(slot, BH_FAB_REAL, 0, p->saddr);
		if (nv) {
			__builtin_memcpy(p->saddr, nv->addr, 16);
			__builtin_memcpy(&p->saddr4_be, nv->addr + 12, 4);
		}
	} else {
		nv = bh_fab(slot, BH_FAB_VIP, 0, p->daddr);
		if (nv) {
			__builtin_memcpy(p->daddr, nv->addr, 16);
			__builtin_memcpy(&p->daddr4_be, nv->addr + 12, 4);
		}
	}
}

static __always_inline __u32 bh_segment_of(__u32 slot, __u32 ifindex)
{
	struct bh_seg_val *sv = bh_sel_seg(slot, &ifindex);
	/* Array lookups fail only past BH_MAX_IFINDEX: no segment either way. */
	return sv ? sv->segment_id : 0;
}

/* Where replies to `daddr` will arrive when no destination app says so: ask the FIB. */
static __always_inline __u32 bh_fib_segment(struct xdp_md *ctx, __u32 slot, const struct bh_pkt *p)
{
	struct bpf_fib_lookup fib = {};

	fib.ifindex = ctx->ingress_ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport_be;
	fib.dport = p->dport_be;
	if (p->family == 4) {
		fib.family = 2; /* AF_INET */
		fib.ipv4_src = p->saddr4_be;
		fib.ipv4_dst = p->daddr4_be;
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, p->daddr, 16);
	}
	long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	return bh_segment_of(slot, fib.ifindex);
}

/*
 * Judge a new flow (seg, saddr -> daddr, proto, dport) by the slot's policy.
 * Fills action/flags/reason/rule/apps and peer_segment (the destination
 * app's segment, 0 if unknown).
 */
/* The destination app of an address: the host hash first (a host is the longest match), the trie only if the slot has prefixes. */
static __always_inline struct bh_ident *bh_dst_ident(__u32 slot, const struct bh_slot_cfg *cfg, const __u8 *daddr)
{
	struct bh_dst_key dk = {};
	struct bh_ident *di;

	dk.prefixlen = BH_DST_PLEN_HOST;
	__builtin_memcpy(dk.addr, daddr, 16);
	di = bh_sel_dst_host(slot, &dk);
	if (!di && (cfg->flags & BH_SLOTF_DST_LPM))
		di = bh_sel_dst_ident(slot, &dk);
	return di;
}

static __always_inline void bh_judge(__u32 slot, const struct bh_slot_cfg *cfg, __u32 src_app,
				     const struct bh_ident *di, __u8 proto, __u16 dport_be, struct bh_flow *v);

static __always_inline void bh_classify(__u32 slot, const struct bh_slot_cfg *cfg, __u32 seg,
					const __u8 *saddr, const __u8 *daddr, __u8 proto,
					__u16 dport_be, struct bh_flow *v)
{
	struct bh_src_key sk = {};
	struct bh_ident *si;

	/* Identities: the host hash first (a host is the longest match), the trie only if the slot has prefixes. */
	sk.prefixlen = BH_SRC_PLEN_HOST;
	sk.segment_id = seg;
	__builtin_memcpy(sk.addr, saddr, 16);
	si = bh_sel_src_host(slot, &sk);
	if (!si && (cfg->flags & BH_SLOTF_SRC_LPM))
		si = bh_sel_src_ident(slot, &sk);
	bh_judge(slot, cfg, si ? si->app_id : 0, bh_dst_ident(slot, cfg, daddr), proto, dport_be, v);
}

/*
 * The verdict for a source app (0: the source is no app) and a destination
 * identity (NULL: no app's address), by the slot's policy. A packet from
 * another gateway is judged here by the app id it carries (bulkhead_transit_in).
 */
static __always_inline void bh_judge(__u32 slot, const struct bh_slot_cfg *cfg, __u32 src_app,
				     const struct bh_ident *di, __u8 proto, __u16 dport_be, struct bh_flow *v)
{
	__u8 action = BH_ACT_NONE, flags = 0;
	__u32 rule = 0;
	v->src_app = src_app;
	v->dst_app = di ? di->app_id : 0;
	v->peer_segment = di ? di->segment_id : 0;
	/*
	 * A destination that is no app's address may still be a hostname-only
	 * app: the policy then has entries for BH_APP_ANY, decided by name.
	 */
	if (src_app && !di && (cfg->flags & BH_SLOTF_SNI_ANY))
		v->dst_app = BH_APP_ANY;
	if (src_app && v->dst_app) {
		struct bh_policy_key pk = {};
		struct bh_policy_val *pv;

		/* Longest first: one port, a range block, any port, any protocol. */
		pk.prefixlen = BH_POLICY_PLEN_EXACT;
		pk.src_app = src_app;
		pk.dst_app = v->dst_app;
		pk.proto = proto;
		pk.dport_be = dport_be;
		pv = bh_sel_pol_exact(slot, &pk);
		if (!pv && (cfg->flags & BH_SLOTF_POL_LPM))
			pv = bh_sel_policy(slot, &pk);
		if (!pv) {
			pk.prefixlen = BH_POLICY_PLEN_ANY_PORT;
			pk.dport_be = 0;
			pv = bh_sel_pol_exact(slot, &pk);
		}
		if (!pv) {
			pk.prefixlen = BH_POLICY_PLEN_ANY_PROTO;
			pk.proto = 0;
			pv = bh_sel_pol_exact(slot, &pk);
		}
		if (pv) {
			action = pv->action;
			flags = pv->flags;
			rule = pv->rule_id;
		}
	}
	int dflt = action == BH_ACT_NONE;
	if (dflt)
		action = cfg->default_action;
	if (cfg->flags & BH_SLOTF_AUDIT)
		flags |= BH_ACTF_AUDIT;
	flags &= BH_ACTF_AUDIT;

	__u8 reason;
	switch (action) {
	case BH_ACT_ALLOW:
		reason = dflt ? BH_R_ALLOW_DEFAULT : BH_R_ALLOW_RULE;
		break;
	case BH_ACT_REJECT:
		reason = (flags & BH_ACTF_AUDIT) ? BH_R_AUDIT_RULE : BH_R_REJECT_RULE;
		break;
	case BH_ACT_SNI:
		/* Decided by the ClientHello (bulkhead_sni). Only TCP carries one. */
		if (proto == IPPROTO_TCP)
			reason = BH_R_SNI_PENDING;
		else if (cfg->unknown_sni == BH_ACT_ALLOW)
			reason = BH_R_SNI_UNKNOWN_ALLOW;
		else
			reason = (flags & BH_ACTF_AUDIT) ? BH_R_AUDIT_RULE : BH_R_SNI_UNKNOWN;
		break;
	case BH_ACT_L7:
		/*
		 * Decided per request by the userspace verifier, which speaks TCP
		 * (HTTP) only. Steered also in audit mode: the verifier forwards
		 * every request then, and logs what it would deny. Whether a
		 * verifier listens is checked per packet (bh_steer), not cached.
		 */
		reason = proto == IPPROTO_TCP ? BH_R_L7_STEER : BH_R_PUNT_NO_HANDLER;
		break;
	default: /* BH_ACT_DENY, or a corrupt entry: fail closed */
		if (flags & BH_ACTF_AUDIT)
			reason = dflt ? BH_R_AUDIT_DEFAULT : BH_R_AUDIT_RULE;
		else
			reason = dflt ? BH_R_DENY_DEFAULT : BH_R_DENY_RULE;
		break;
	}
	v->action = action;
	v->flags = flags;
	v->reason = reason;
	v->rule_id = rule;
	v->generation = cfg->generation;
}

/* Flow key of the packet (reverse: of its reply) on segment `seg`. */
static __always_inline void bh_key4(const struct bh_pkt *p, __u32 seg, int reverse, struct bh_flow4_key *k)
{
	k->saddr_be = reverse ? p->daddr4_be : p->saddr4_be;
	k->daddr_be = reverse ? p->saddr4_be : p->daddr4_be;
	k->sport_be = reverse ? p->dport_be : p->sport_be;
	k->dport_be = reverse ? p->sport_be : p->dport_be;
	k->proto = p->proto;
	k->segment_id = seg;
#ifdef BH_BENCH
	k->pad = p->bench_tag;
#endif
}

static __always_inline void bh_key6(const struct bh_pkt *p, __u32 seg, int reverse, struct bh_flow6_key *k)
{
	__builtin_memcpy(k->saddr, reverse ? p->daddr : p->saddr, 16);
	__builtin_memcpy(k->daddr, reverse ? p->saddr : p->daddr, 16);
	k->sport_be = reverse ? p->dport_be : p->sport_be;
	k->dport_be = reverse ? p->sport_be : p->dport_be;
	k->proto = p->proto;
	k->segment_id = seg;
#ifdef BH_BENCH
	k->pad = p->bench_tag;
#endif
}

static __always_inline struct bh_flow *bh_flow_get(const struct bh_pkt *p, __u32 seg, int reverse)
{
	struct bh_flow *f;

	if (p->family == 4) {
		struct bh_flow4_key k = {};
		bh_key4(p, seg, reverse, &k);
		f = flows4.lookup(&k);
		BH_KEEP_APART(f); /* see the slot selectors above */
	} else {
		struct bh_flow6_key k = {};
		bh_key6(p, seg, reverse, &k);
		f = flows6.lookup(&k);
	}
	return f;
}

static __always_inline int bh_flow_put(const struct bh_pkt *p, __u32 seg, int reverse, struct bh_flow *v)
{
	int rc;

	if (p->family == 4) {
		struct bh_flow4_key k = {};
		bh_key4(p, seg, reverse, &k);
		rc = flows4.update(&k, v);
	} else {
		struct bh_flow6_key k = {};
		bh_key6(p, seg, reverse, &k);
		rc = flows6.update(&k, v);
	}
	if (rc)
		bh_event(BH_EV_FLOW_INSERT_FAILED);
	return rc;
}

/*
 * ---------------------------------------------------------------- telemetry
 * Flow events (ring buffer), flows per app pair and hop-latency histograms.
 * All of it runs per flow, never per packet: the established path only
 * tests two flag bytes it already has in registers (bh_observe_wanted).
 * BH_NO_TELEMETRY compiles it out (benchmarks: the cost of having it).
 */
#ifndef BH_NO_TELEMETRY
/*
 * Send one flow event. `v` is the entry of this packet's direction after
 * the event, `o` the other direction's (or NULL); the tuple is turned
 * around for a reply so the event always reads client -> server.
 */
static __always_inline void bh_fe_emit(void *ctx, __u8 kind, const struct bh_pkt *p, int is_reply,
				       __u32 seg, const struct bh_flow *v, const struct bh_flow *o, __u8 reason,
				       __u8 prev_reason, const struct bh_sni_state *st)
{
#ifdef BH_EVENTS_PERF
	__u32 zero = 0;
	struct bh_flow_event *e = ev_scratch.lookup(&zero); /* perf_submit copies it */
#else
	struct bh_flow_event *e = flow_events.ringbuf_reserve(sizeof(struct bh_flow_event));
#endif
	if (!e) {
		bh_event(BH_EV_FLOW_EVENT_LOST);
		return;
	}
	const struct bh_flow *fw = is_reply ? o : v;
	const struct bh_flow *rp = is_reply ? v : o;
	e->ts_ns = v->last_seen_ns; /* the packet's time (coarse clock: the flow log needs no more) */
	e->packets = fw ? fw->packets : 0;
	e->bytes = fw ? fw->bytes : 0;
	e->r_packets = rp ? rp->packets : 0;
	e->r_bytes = rp ? rp->bytes : 0;
	__builtin_memcpy(e->saddr, is_reply ? p->daddr : p->saddr, 16);
	__builtin_memcpy(e->daddr, is_reply ? p->saddr : p->daddr, 16);
	e->sport_be = is_reply ? p->dport_be : p->sport_be;
	e->dport_be = is_reply ? p->sport_be : p->dport_be;
	e->src_app = v->src_app;
	e->dst_app = v->dst_app;
	e->rule_id = v->rule_id;
	e->generation = v->generation;
	e->segment_id = is_reply ? v->peer_segment : seg;
	e->peer_segment = is_reply ? seg : v->peer_segment;
	e->kind = kind;
	e->family = p->family;
	e->proto = p->proto;
	e->reason = reason;
	e->prev_reason = prev_reason;
	e->flags = (v->flags & (BH_ACTF_AUDIT | BH_FLOWF_NAT | BH_FLOWF_TRANSIT | BH_FLOWF_VIA_VIP)) |
		   (is_reply ? BH_FLOWF_REPLY : 0);
	e->tcp_flags = p->tcp_flags;
	e->xflags = v->xflags;
	e->snat_port_be = v->snat_port_be;
	e->sni_len = 0;
	if (st && (st->flags & BH_SNIF_HAVE_NAME)) {
		__builtin_memcpy(e->sni, st->name, BH_SNI_LOG_LEN);
		e->sni_len = st->name_len; /* <= BH_TLS_NAME_MAX (255): more than sni[] holds means cut */
	}
#ifdef BH_EVENTS_PERF
	if (flow_events.perf_submit(ctx, e, sizeof(*e)))
		bh_event(BH_EV_FLOW_EVENT_LOST);
#else
	flow_events.ringbuf_submit(e, 0);
#endif
}

/* One more flow judged for (src app, dst app, rule, reason): exact, per CPU. */
static __always_inline void bh_pair_count(const struct bh_flow *v, __u8 reason)
{
	struct bh_pair_key k = {};
	__u64 one = 1;

	k.src_app = v->src_app;
	k.dst_app = v->dst_app;
	k.rule_id = v->rule_id;
	k.reason = reason;
	__u64 *c = pair_flows.lookup(&k);
	if (c)
		(*c)++;
	else if (pair_flows.update(&k, &one))
		bh_event(BH_EV_PAIR_FULL);
}

static __always_inline __u8 bh_log2_bucket(__u32 x)
{
	__u32 r = 0;

	if (x >> 16) {
		x >>= 16;
		r += 16;
	}
	if (x >> 8) {
		x >>= 8;
		r += 8;
	}
	if (x >> 4) {
		x >>= 4;
		r += 4;
	}
	if (x >> 2) {
		x >>= 2;
		r += 2;
	}
	if (x >> 1)
		r += 1;
	return r >= BH_LAT_BUCKETS ? BH_LAT_BUCKETS - 1 : r;
}

/* One hop-latency sample (units of 1024 ns) for the flow's app pair. */
static __always_inline void bh_lat_sample(const struct bh_flow *f, __u8 kind, __u32 units)
{
	struct bh_lat_key k = {};

	k.src_app = f->src_app;
	k.dst_app = f->dst_app;
	k.kind = kind;
	k.bucket = bh_log2_bucket(units);
	struct bh_lat_val *lv = lat_hist.lookup(&k);
	if (lv) {
		lv->count++;
		lv->sum_units += units;
	} else {
		struct bh_lat_val n = {};
		n.count = 1;
		n.sum_units = units;
		if (lat_hist.update(&k, &n)) {
			bh_event(BH_EV_LAT_HIST_FULL);
			return;
		}
	}
	bh_event(BH_EV_LAT_SAMPLE);
}

/*
 * Does this packet of an established entry carry a timing sample or the
 * flow's end? Exact, so that bh_observe always clears what made it true:
 * bulkhead_observe hands the packet back to bulkhead_xdp, which must not
 * send it round again. The first test is the common case: nothing pending.
 */
static __always_inline int bh_observe_wanted(const struct bh_flow *f, const struct bh_pkt *p)
{
	__u8 tf = p->tcp_flags;

	if (!((f->flags & BH_FLOWF_OBSERVE) | (tf & (BH_TCP_FIN | BH_TCP_RST))))
		return 0;
	if ((tf & (BH_TCP_FIN | BH_TCP_RST)) && !(f->flags & BH_FLOWF_ENDED))
		return 1;
	if (f->flags & BH_FLOWF_T_HS) {
		/* reply: any packet settles it (a SYN-ACK samples); forward: any but a SYN. */
		if ((f->flags & BH_FLOWF_REPLY) || !(tf & BH_TCP_SYN))
			return 1;
	}
	return (f->flags & BH_FLOWF_T_DATA) && p->l4_len > p->tcp_doff;
}

/*
 * Hop timing and the end of a TCP flow, on the packets that carry them:
 *   server RTT  = SYN-ACK - SYN        (reply entry; its t_a is the SYN's time)
 *   client RTT  = ACK - SYN-ACK        (forward entry; t_b written at the SYN-ACK)
 *   server time = first response byte - first request byte
 * and one end event per flow at its first FIN or RST (both entries marked),
 * with the packets and bytes before that packet.
 */
static __always_inline void bh_observe(struct xdp_md *ctx, struct bh_pkt *p, struct bh_flow *f, __u32 seg)
{
	__u8 tf = p->tcp_flags;
	int reply = f->flags & BH_FLOWF_REPLY;
	int payload = p->l4_len > p->tcp_doff;
	struct bh_flow *o;
	__u32 t = bpf_ktime_get_ns() >> BH_LAT_SHIFT;

	if (reply) {
		if (f->flags & BH_FLOWF_T_HS) {
			f->flags &= ~BH_FLOWF_T_HS;
			if ((tf & (BH_TCP_SYN | BH_TCP_ACK)) == (BH_TCP_SYN | BH_TCP_ACK)) {
				bh_lat_sample(f, BH_LAT_SERVER_RTT, t - f->t_a);
				f->t_b = (t - f->t_a) ? t - f->t_a : 1; /* kept: the server's gateway tells it on (bh_tc_fabric_flow) */
				o = bh_flow_get(p, f->peer_segment, 1);
				if (o && (o->flags & BH_FLOWF_T_HS))
					o->t_b = t;
			}
		}
		if ((f->flags & BH_FLOWF_T_DATA) && payload) {
			f->flags &= ~BH_FLOWF_T_DATA;
			o = bh_flow_get(p, f->peer_segment, 1);
			/* The forward entry's t_a is the request's time once its T_DATA is clear. */
			if (o && !(o->flags & BH_FLOWF_T_DATA) && o->t_a && o->t_b)
				bh_lat_sample(f, BH_LAT_SERVER_TIME, t - o->t_a);
		}
	} else {
		if ((f->flags & BH_FLOWF_T_HS) && !(tf & BH_TCP_SYN)) {
			f->flags &= ~BH_FLOWF_T_HS;
			if (f->t_b && (tf & BH_TCP_ACK)) {
				bh_lat_sample(f, BH_LAT_CLIENT_RTT, t - f->t_b);
				f->t_b = (t - f->t_b) ? t - f->t_b : 1; /* kept: request timing's client RTT (bh_hop_client) */
			} else {
				f->t_b = 0;
			}
		}
		if ((f->flags & BH_FLOWF_T_DATA) && payload) {
			f->flags &= ~BH_FLOWF_T_DATA;
			if (f->t_b)
				f->t_a = t; /* the request's first byte; kept only after a measured handshake */
			else
				f->t_a = 0;
		}
	}
	if (!(tf & (BH_TCP_FIN | BH_TCP_RST)) || (f->flags & BH_FLOWF_ENDED))
		return;
	f->flags |= BH_FLOWF_ENDED;
	o = f->peer_segment ? bh_flow_get(p, f->peer_segment, 1) : NULL;
	if (o) {
		if (o->flags & BH_FLOWF_ENDED)
			return; /* the other direction's end already told */
		o->flags |= BH_FLOWF_ENDED;
	}
	bh_pkt_addrs16(p);
	bh_fe_emit(ctx, BH_FE_END, p, reply, seg, f, o, (reply && o) ? o->reason : f->reason, 0, NULL);
}
#endif /* BH_NO_TELEMETRY */

static __always_inline void bh_frag_key(const struct bh_pkt *p, __u32 seg, struct bh_frag_key *k)
{
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->id = p->frag_id;
	k->proto = p->proto;
	k->segment_id = seg;
}

/* A first fragment decides for the whole datagram: remember it for the rest. */
static __always_inline void bh_remember_fragment(const struct bh_pkt *p, __u32 seg, __u64 now, __u8 reason)
{
	struct bh_frag_key k = {};
	struct bh_frag v = {};

	bh_frag_key(p, seg, &k);
	v.last_seen_ns = now;
	/*
	 * A steered flow's later fragments can't carry the mark (they have no
	 * flow entry to find): the datagram is punted whole or not at all, so
	 * they are dropped, counted as a punt without handler.
	 */
	if (reason == BH_R_L7_STEER || reason == BH_R_L7_UPSTREAM)
		reason = BH_R_PUNT_NO_HANDLER;
	v.reason = reason;
	v.xdp_action = bh_reason_xdp(reason) == XDP_PASS ? XDP_PASS : XDP_DROP;
	if (frags.update(&k, &v))
		bh_event(BH_EV_FRAG_INSERT_FAILED);
	bh_event(BH_EV_FRAG_FIRST);
}

/* A non-first fragment has no ports: it follows its first fragment's verdict. */
static __always_inline int bh_follow_fragment(const struct bh_pkt *p, __u32 seg, __u64 now, __u64 len)
{
	struct bh_frag_key k = {};

	bh_frag_key(p, seg, &k);
	struct bh_frag *f = frags.lookup(&k);
	if (!f || f->last_seen_ns + BH_FRAG_IDLE_NS < now)
		return bh_record(BH_R_FRAG_NO_FLOW, XDP_DROP, len);
	f->last_seen_ns = now;
	bh_event(BH_EV_FRAG_FOLLOW);
	return bh_record(f->reason, f->xdp_action == XDP_PASS ? XDP_PASS : XDP_DROP, len);
}

/*
 * An ICMP error quotes a packet A->B and travels to A. It passes only if the
 * flow of B's packets on this segment (the entry keyed B->A here) passes
 * under the policy in force: an entry of an older generation is a verdict of
 * the old policy, so it relates nothing until a packet of the flow has
 * re-judged it (tests/bpf: test_icmp_error_not_judged_by_old_generation).
 */
static __always_inline int bh_icmp_error(const struct bh_pkt *p, __u32 seg, __u32 generation, __u64 len)
{
	struct bh_flow *f;

	if (p->family == 4) {
		struct bh_flow4_key k = {};
		__builtin_memcpy(&k.saddr_be, p->inner_daddr + 12, 4);
		__builtin_memcpy(&k.daddr_be, p->inner_saddr + 12, 4);
		k.sport_be = p->inner_dport_be;
		k.dport_be = p->inner_sport_be;
		k.proto = p->inner_proto;
		k.segment_id = seg;
		f = flows4.lookup(&k);
	} else {
		struct bh_flow6_key k = {};
		__builtin_memcpy(k.saddr, p->inner_daddr, 16);
		__builtin_memcpy(k.daddr, p->inner_saddr, 16);
		k.sport_be = p->inner_dport_be;
		k.dport_be = p->inner_sport_be;
		k.proto = p->inner_proto;
		k.segment_id = seg;
		f = flows6.lookup(&k);
	}
	if (f && f->generation == generation && bh_reason_xdp(f->reason) == XDP_PASS)
		return bh_record(BH_R_ICMP_ERROR_RELATED, XDP_PASS, len);
	return bh_record(BH_R_ICMP_ERROR_NO_FLOW, XDP_DROP, len);
}

/*
 * A flow waiting for its ClientHello: handshake packets and pure ACKs pass
 * both ways; the client's payload goes to bulkhead_sni; the server's payload
 * is held (dropped, the server resends) until the name is decided.
 */
static __always_inline int bh_sni_pending(struct xdp_md *ctx, const struct bh_pkt *p, int is_reply, __u64 len)
{
	if (p->proto != IPPROTO_TCP || p->l4_len <= p->tcp_doff)
		return bh_record(BH_R_SNI_PENDING, XDP_PASS, len);
	if (is_reply)
		return bh_record(BH_R_SNI_HOLD, XDP_DROP, len);
	tails.call(ctx, BH_TAIL_SNI);
	return bh_tail_missed(len);
}

/*
 * A re-judged entry keeps what it knew of the flow's server name. One that
 * was not waiting on a ClientHello and knows no name (judged by address
 * until this policy) takes its payload from this packet on: what comes is
 * parsed as a ClientHello, and anything else is an unknown name.
 */
static __always_inline void bh_sni_carry(struct bh_flow *v, const struct bh_flow *f, const struct bh_pkt *p)
{
	v->sni_h = f->sni_h;
	v->sni_w = f->sni_w;
	v->sni_flags = f->sni_flags;
	v->sni_seq = f->sni_seq;
	if (f->reason != BH_R_SNI_PENDING && !(f->sni_flags & BH_FSNI_DONE))
		v->sni_seq = bpf_ntohl(p->seq_be) + !!(p->tcp_flags & BH_TCP_SYN);
}

/*
 * Put bulkhead's metadata in front of the packet for bulkhead_tc (TC ingress
 * reads it; XDP can't set skb->mark). Returns 0, or -1 when the driver can't
 * carry metadata (generic XDP): each caller says what that means for it.
 */
#ifdef BH_NO_XDP_META
/* No XDP metadata in this kernel: bulkhead_tc finds what it needs itself (bh_tc_nometa). */
static __always_inline int bh_meta_put(struct xdp_md *ctx, __u32 mark, __u32 flags)
{
	return -1;
}
#else
static __always_inline int bh_meta_put(struct xdp_md *ctx, __u32 mark, __u32 flags)
{
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct bh_meta)))
		return -1;
	void *data = (void *)(long)ctx->data;
	struct bh_meta *m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 1) > data)
		return -1;
	m->magic = BH_META_MAGIC;
	m->mark = mark;
	m->flags = flags;
	return 0;
}
#endif

/*
 * Pass a packet of an L7 flow with the mark that steers it to the verifier
 * (nftables TPROXY on BH_MARK_L7, see agent/datapath/plumbing.py). XDP can't set
 * skb->mark: the mark travels as packet metadata, and bulkhead_tc (TC
 * ingress) copies it. No verifier, or a driver without XDP metadata: the
 * packet is dropped, counted; a punt is never an implicit allow.
 */
static __always_inline int bh_steer(struct xdp_md *ctx, __u8 reason, __u32 seg, __u32 ctl_flags, __u64 len)
{
	if (!(ctl_flags & BH_CTL_L7_READY))
		return bh_record(BH_R_PUNT_NO_HANDLER, XDP_DROP, len);
#ifndef BH_NO_XDP_META
	if (bh_meta_put(ctx, BH_MARK_L7 | (seg & 0xffff), 0))
		return bh_record(BH_R_L7_NO_META, XDP_DROP, len);
#endif
	/* Without XDP metadata, bulkhead_tc marks it from the flow entry (bh_tc_nometa). */
	return bh_record(reason, XDP_PASS, len);
}

/*
 * An allowed packet bulkhead does not steer goes on to bulkhead_forward (the
 * fast path), carrying what it needs in the packet's metadata: the verdict
 * to record and BH_MARK_SEG | the segment it leaves by (0: by the main
 * table). The mark is also what the stack gets if the packet passes up
 * (bulkhead_tc copies it into skb->mark): the plumbing skips conntrack for
 * it and routes it by that segment's table (agent/datapath/plumbing.py). A
 * tail call keeps the forwarding's branches out of this program's verifier
 * budget (every path here would otherwise meet each of them). A driver
 * without XDP metadata passes the packet unmarked: conntrack and the ct-mark
 * rules route it, as before the mark existed.
 */
static __always_inline int bh_fwd_handoff(struct xdp_md *ctx, __u8 reason, __u32 out_seg, __u32 slot, __u64 len)
{
	__u32 mark = BH_MARK_SEG | (out_seg & 0xffff);
	__u32 flags = BH_METAF_FORWARD | (slot ? BH_METAF_SLOT1 : 0) | ((__u32)reason << BH_METAF_REASON_SHIFT);
#ifdef BH_NO_XDP_META
	/* The tail call runs next on this CPU: a per-CPU slot carries what metadata would. */
	__u32 zero = 0;
	struct bh_meta *m = meta_handoff.lookup(&zero);
	if (!m)
		return bh_record(reason, XDP_PASS, len);
	m->magic = BH_META_MAGIC;
	m->mark = mark;
	m->flags = flags;
	tails.call(ctx, BH_TAIL_FORWARD);
	m->magic = 0;
#else
	if (bh_meta_put(ctx, mark, flags))
		return bh_record(reason, XDP_PASS, len);
	tails.call(ctx, BH_TAIL_FORWARD);
#endif
	bh_event(BH_EV_FWD_TAIL_MISSED);
	return bh_record(reason, XDP_PASS, len); /* allowed either way: the stack forwards it, marked */
}

/* Rewrite the parsed destination (not the packet): flow keys of a translated flow. */
static __always_inline void bh_pkt_set_daddr(struct bh_pkt *p, const __u8 *addr)
{
	__builtin_memcpy(p->daddr, addr, 16);
	__builtin_memcpy(&p->daddr4_be, addr + 12, 4);
}

/*
 * The fabric's part of a new allowed flow (the slot has fab_N entries): a
 * destination that is a service address is translated (BH_FLOWF_NAT, `real`
 * gets the address), and one whose segment is behind another gateway goes
 * through the transit tunnel (BH_FLOWF_TRANSIT). Returns a drop reason, or 0.
 * `real` points into the fab_N value.
 */
static __always_inline __u8 bh_fab_flow(__u32 slot, struct bh_flow *v, const __u8 *daddr, const __u8 **real)
{
	struct bh_fab_val *nv = bh_fab(slot, BH_FAB_VIP, 0, daddr);

	if (nv) {
		v->flags |= BH_FLOWF_NAT;
		*real = nv->addr; /* map memory: stays valid for the rest of the program */
	}
	if (!v->peer_segment)
		return 0;
	struct bh_fab_val *sv = bh_fab(slot, BH_FAB_SEG, v->peer_segment, NULL);
	if (!sv)
		return 0; /* no transit in this policy */
	struct bh_fab_val *me = bh_fab(slot, BH_FAB_SELF, 0, NULL);
	/*
	 * No SELF: the agent runs the whole policy as one gateway (no --gateway),
	 * every segment its own, as before there was transit.
	 */
	if (!me || sv->a == me->a)
		return 0; /* a segment of this gateway */
	if (!me->b)
		return BH_R_TRANSIT_NO_TUNNEL; /* behind another gateway, and this one has no transit device */
	v->flags |= BH_FLOWF_TRANSIT;
	return 0;
}

/*
 * An allowed packet of a flow through the fabric (a service address, or an
 * app behind another gateway) goes up to bulkhead_tc, which looks its entry
 * up, translates the address and encapsulates it for the other gateway
 * (skb helpers: checksum offload states, tunnel keys); it carries the mark
 * of the segment it leaves by, as bh_fwd_handoff's. A driver without XDP
 * metadata passes it unmarked: bulkhead_tc looks up what it gets without
 * metadata too, when the slot has fabric entries.
 */
static __always_inline int bh_fab_handoff(struct xdp_md *ctx, __u8 reason, __u32 out_seg, __u32 slot, __u64 len)
{
	bh_meta_put(ctx, BH_MARK_SEG | (out_seg & 0xffff), BH_METAF_FABRIC | (slot ? BH_METAF_SLOT1 : 0));
	return bh_record(reason, XDP_PASS, len); /* without metadata too: bulkhead_tc looks it up */
}

/* Apply a verdict: forward, pass, drop, steer to the verifier, or hand the packet to bulkhead_reject. */
static __always_inline int bh_apply(struct xdp_md *ctx, const struct bh_pkt *p, __u8 reason, int is_reply,
				    __u64 len, __u32 seg, __u32 peer_seg, __u32 slot, __u32 ctl_flags, __u8 fflags)
{
	int code = bh_reason_xdp(reason);

	if (reason == BH_R_L7_STEER || reason == BH_R_L7_UPSTREAM)
		return bh_steer(ctx, reason, seg, ctl_flags, len);
	if (code == XDP_PASS && (fflags & (BH_FLOWF_NAT | BH_FLOWF_TRANSIT)))
		return bh_fab_handoff(ctx, reason, is_reply ? peer_seg : 0, slot, len);
	/* SNI-pending flows pass their handshake plainly: their verdict is not known yet. */
	if (code == XDP_PASS && reason != BH_R_SNI_PENDING && !(ctl_flags & BH_CTL_NO_FASTPATH))
		return bh_fwd_handoff(ctx, reason, is_reply ? peer_seg : 0, slot, len);
	if (code != XDP_TX)
		return bh_record(reason, code, len);
	/* Replies of a flow now rejected are only dropped: the client is not waiting on us. */
	if (is_reply || p->frag == BH_FRAG_LATER)
		return bh_record(reason, XDP_DROP, len);
	tails.call(ctx, BH_TAIL_REJECT);
	return bh_tail_missed(len);
}

int bulkhead_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct bh_pkt p;

	bh_pkt_init(&p);
	int rc = bh_parse(data, data_end, &p);
	if (rc == BH_PARSE_NON_IP)
		return bh_record(BH_R_PASS_NON_IP, XDP_PASS, len);
	if (rc)
		return bh_record(rc, XDP_DROP, len);
	if (p.family == 6 && p.proto == IPPROTO_ICMPV6 && p.frag == BH_FRAG_NONE &&
	    bh_icmp6_is_control(p.icmp_type))
		return bh_record(BH_R_PASS_IPV6_CONTROL, XDP_PASS, len);

	__u32 zero = 0;
	struct bh_ctl *gc = ctl.lookup(&zero);
	if (!gc)
		return bh_record(BH_R_NO_POLICY, XDP_DROP, len);
	__u32 slot = gc->active_slot & 1;
	__u32 ctl_flags = gc->flags;
	struct bh_slot_cfg *cfg = slot_cfg.lookup(&slot);
	if (!cfg || !cfg->generation)
		return bh_record(BH_R_NO_POLICY, XDP_DROP, len);
#ifdef BH_BENCH
	if (ctl_flags & BH_CTL_BENCH_NEW_FLOW)
		bh_bench_new_flow(&p);
#endif

	__u32 seg = bh_segment_of(slot, ctx->ingress_ifindex);
	if (!seg)
		return bh_record(BH_R_NO_SEGMENT, XDP_DROP, len);
	__u64 now = bpf_ktime_get_coarse_ns();

	if (p.frag == BH_FRAG_LATER) {
		bh_pkt_addrs16(&p);
		return bh_follow_fragment(&p, seg, now, len);
	}
	if (p.icmp_error)
		return bh_icmp_error(&p, seg, cfg->generation, len);

	/*
	 * Established path: one hash lookup. A pure SYN on a forward entry whose
	 * handshake is not pending (it completed, or the entry was made without
	 * one) is a new connection on a reused 5-tuple: judged afresh (a new flow
	 * event, and a new ClientHello for a flow decided by server name). A SYN
	 * while the handshake is pending is a retransmission.
	 */
	struct bh_flow *f = BH_BYPASS_FLOWS(ctl_flags) ? NULL : bh_flow_get(&p, seg, 0);
	int syn_only = (p.tcp_flags & (BH_TCP_SYN | BH_TCP_ACK)) == BH_TCP_SYN;
	int reused = syn_only && f && !(f->flags & (BH_FLOWF_REPLY | BH_FLOWF_T_HS));
	if (f && f->generation == cfg->generation && !reused) {
#ifndef BH_NO_TELEMETRY
		/*
		 * A few packets per TCP flow (handshake, first data, FIN/RST) are
		 * measured in bulkhead_observe, which hands them back here (so they
		 * are counted below, once). If the tail call returns, the packet is
		 * judged unmeasured (telemetry never decides a verdict), counted.
		 */
		if (bh_observe_wanted(f, &p)) {
			tails.call(ctx, BH_TAIL_OBSERVE);
			bh_event(BH_EV_OBSERVE_MISSED);
		}
#endif
		f->last_seen_ns = now;
		f->packets++;
		f->bytes += len;
		if (f->reason == BH_R_SNI_PENDING)
			return bh_sni_pending(ctx, &p, f->flags & BH_FLOWF_REPLY, len);
		if (p.frag == BH_FRAG_FIRST) {
			bh_pkt_addrs16(&p);
			bh_remember_fragment(&p, seg, now, f->reason);
		}
		return bh_apply(ctx, &p, f->reason, f->flags & BH_FLOWF_REPLY, len, seg, f->peer_segment, slot, ctl_flags,
				f->flags);
	}

	/* Slow path from here: classification and fragment keys need 16-byte addresses. */
	bh_pkt_addrs16(&p);
	/* The new entry is built in a per-CPU scratch (bh_flow does not fit beside the rest on the stack). */
	struct bh_flow *v = flow_scratch.lookup(&zero);
	if (!v)
		return bh_record(BH_R_NO_POLICY, XDP_DROP, len); /* unreachable: index 0 of a one-entry array */
	__builtin_memset(v, 0, sizeof(*v));
	int is_reply = 0;
	if (f && (f->flags & BH_FLOWF_REPLY)) {
		/*
		 * A reply entry from an older generation: re-judge the forward
		 * direction (client segment, client -> server) under the new policy.
		 */
		__u16 client_seg = f->peer_segment;
		__u16 rj_port = bh_has_ports(p.proto) ? p.sport_be : 0;
		/* A client behind another gateway is the app it said it was (bulkhead_transit_in made the entry). */
		if (f->flags & BH_FLOWF_TRANSIT)
			bh_judge(slot, cfg, f->src_app, bh_dst_ident(slot, cfg, p.saddr), p.proto, rj_port, v);
		else
			bh_classify(slot, cfg, client_seg, p.daddr, p.saddr, p.proto, rj_port, v);
		/* How the flow crosses the fabric is the connection's, not the policy's. */
		v->flags |= f->flags & (BH_FLOWF_NAT | BH_FLOWF_TRANSIT | BH_FLOWF_VIA_VIP);
		v->xflags = f->xflags;
		v->snat_port_be = f->snat_port_be;
		is_reply = 1;
		__u8 fwd_reason = v->reason;
		if (bh_reason_xdp(v->reason) == XDP_PASS && v->reason != BH_R_SNI_PENDING) {
			/*
			 * The reply side of a verifier's upstream connection stays steered to it
			 * while the pair still passes: the client's connection ends at the
			 * verifier, whatever the new rule says (an L7 rule that became a plain
			 * allow; a router's backend, judged as the pair client -> backend).
			 */
			int upstream = f->reason == BH_R_L7_UPSTREAM;
			v->reason = upstream ? BH_R_L7_UPSTREAM : BH_R_ALLOW_REPLY;
			v->action = BH_ACT_ALLOW;
		}
		v->flags |= BH_FLOWF_REPLY;
		v->peer_segment = client_seg;
		if (v->reason == BH_R_SNI_PENDING)
			bh_sni_carry(v, f, &p);
		v->last_seen_ns = now;
		v->packets = f->packets + 1;
		v->bytes = f->bytes + len;
		bh_flow_put(&p, seg, 0, v);
		bh_event(BH_EV_FLOW_RECLASSIFY);
#ifndef BH_NO_TELEMETRY
		if (v->reason != f->reason || v->rule_id != f->rule_id)
			bh_fe_emit(ctx, BH_FE_CHANGE, &p, 1, seg, v, NULL, fwd_reason, f->reason, NULL);
#endif
		/* A name decided under the old policy is re-decided from the entry's hashes. */
		if (v->reason == BH_R_SNI_PENDING && (v->sni_flags & BH_FSNI_DONE)) {
			tails.call(ctx, BH_TAIL_SNI);
			return bh_tail_missed(len); /* held, as anything undecided */
		}
	} else {
		bh_classify(slot, cfg, seg, p.saddr, p.daddr, p.proto, p.policy_dport_be, v);
		v->last_seen_ns = now;
		v->packets = 1;
		v->bytes = len;
		int pass = bh_reason_xdp(v->reason) == XDP_PASS;
		int reply_new = 0;
		/*
		 * A service address: replies come from the real one (p.daddr while the
		 * reply key is made; the service address waits in a per-CPU scratch:
		 * bulkhead_xdp's stack is full).
		 */
		const __u8 *real = NULL;
		struct bh_addr16 *vip = NULL;
		int nat = 0;
		if (pass && (cfg->flags & BH_SLOTF_FABRIC)) {
			__u8 fr = bh_fab_flow(slot, v, p.daddr, &real);
			if (!fr && real && !(vip = addr_scratch.lookup(&zero)))
				fr = BH_R_NO_POLICY; /* unreachable: index 0 of a one-entry array */
			if (!fr && (v->flags & (BH_FLOWF_NAT | BH_FLOWF_TRANSIT)) && p.frag != BH_FRAG_NONE)
				fr = BH_R_FRAG_NO_FLOW; /* translated and tunnelled flows carry no fragments */
			if (fr) {
#ifndef BH_NO_TELEMETRY
				bh_pair_count(v, fr);
				bh_fe_emit(ctx, BH_FE_NEW, &p, 0, seg, v, NULL, fr, 0, NULL);
#endif
				return bh_record(fr, XDP_DROP, len);
			}
			if (real && vip) {
				nat = 1;
				__builtin_memcpy(vip->a, p.daddr, 16);
				bh_pkt_set_daddr(&p, real);
			}
		}
		if (pass && !v->peer_segment)
			v->peer_segment = bh_fib_segment(ctx, slot, &p);
		if (pass && v->peer_segment) {
			/*
			 * The reply key lives on the destination's segment. If it is
			 * already held, fresh, by a flow from another segment, the
			 * same 5-tuple is live twice (overlapping CIDRs, same ports):
			 * replies could not tell the two apart, so refuse the newcomer.
			 *
			 * The key may also hold the *forward* entry of the flow this
			 * packet answers (a flow whose reply segment was unknown: no
			 * app and no FIB answer, peer_segment 0). That entry claims no
			 * segment, so it is no collision: without the peer_segment
			 * test, the reply of every such allowed flow was dropped as
			 * FLOW_COLLISION (tests/bpf: test_reply_segment_from_fib).
			 */
			struct bh_flow *r = BH_BYPASS_FLOWS(ctl_flags) ? NULL : bh_flow_get(&p, v->peer_segment, 1);
			/*
			 * So is a client tuple that reaches one app both by its service
			 * address and by its real one: both flows' replies have one key,
			 * and only one of them may be translated back (tests/bpf:
			 * test_two_flows_on_one_reply_tuple_are_a_collision).
			 */
			if (r && r->peer_segment && r->last_seen_ns + BH_FLOW_IDLE_NS > now &&
			    (r->peer_segment != seg || ((r->flags ^ v->flags) & BH_FLOWF_NAT))) {
#ifndef BH_NO_TELEMETRY
				bh_pair_count(v, BH_R_FLOW_COLLISION);
				bh_fe_emit(ctx, BH_FE_NEW, &p, 0, seg, v, NULL, BH_R_FLOW_COLLISION, 0, NULL);
#endif
				return bh_record(BH_R_FLOW_COLLISION, XDP_DROP, len);
			}
			reply_new = !r;
		}
		if (nat && vip)
			bh_pkt_set_daddr(&p, vip->a); /* the forward entry is keyed on what the client sends */
		/* A new connection (no entry, or a SYN on a reused 5-tuple) rather than a re-judged one. */
		int fresh = !f || reused;
		if (nat && fresh)
			bh_event(BH_EV_VIP_NAT);
		if (v->reason == BH_R_SNI_PENDING) {
			if (fresh)
				v->sni_seq = bpf_ntohl(p.seq_be) + !!(p.tcp_flags & BH_TCP_SYN); /* payload offset 0 */
			else
				bh_sni_carry(v, f, &p);
		}
#ifndef BH_NO_TELEMETRY
		if (fresh) {
			/* Pending flows are counted when their name is decided (bulkhead_sni). */
			if (v->reason != BH_R_SNI_PENDING)
				bh_pair_count(v, v->reason);
			bh_fe_emit(ctx, BH_FE_NEW, &p, 0, seg, v, NULL, v->reason, 0, NULL);
		} else if (v->reason != f->reason || v->rule_id != f->rule_id) {
			bh_fe_emit(ctx, BH_FE_CHANGE, &p, 0, seg, v, NULL, v->reason, f->reason, NULL);
		}
		/* Hop timing starts at the SYN (T_HS also tells a retransmitted SYN from a new one). */
		if (syn_only) {
			v->flags |= BH_FLOWF_OBSERVE;
			v->t_a = bpf_ktime_get_ns() >> BH_LAT_SHIFT;
			/* Through the transit: its first payload says whether requests are timed (bh_hop_client). */
			if (v->flags & BH_FLOWF_TRANSIT)
				v->xflags |= BH_FLOWX_HOP_CLASSIFY;
		}
#endif
		if (!BH_BYPASS_FLOWS(ctl_flags)) {
			bh_flow_put(&p, seg, 0, v);
			if (!f)
				bh_event(BH_EV_FLOW_ENTRY_NEW);
			if (pass && v->peer_segment) {
				/* Reuse v for the reply entry; keep what follows needs. */
				__u8 fwd_reason = v->reason;
				__u16 reply_seg = v->peer_segment;
				v->flags |= BH_FLOWF_REPLY;
				if (fwd_reason != BH_R_SNI_PENDING) {
					v->action = BH_ACT_ALLOW;
					v->reason = BH_R_ALLOW_REPLY;
				}
				v->peer_segment = seg;
				v->packets = 0;
				v->bytes = 0;
				if (nat && real)
					bh_pkt_set_daddr(&p, real);
				bh_flow_put(&p, reply_seg, 1, v);
				if (nat && vip)
					bh_pkt_set_daddr(&p, vip->a);
				if (reply_new)
					bh_event(BH_EV_FLOW_ENTRY_NEW);
				v->reason = fwd_reason;
			}
			bh_event(fresh ? BH_EV_FLOW_NEW : BH_EV_FLOW_RECLASSIFY);
			/* bulkhead_sni parses payload on the first packet (TCP Fast Open, a
			 * flow picked up mid-stream) or re-decides a flow whose name is
			 * known (re-judged after a swap). A SYN just passes: the entry holds
			 * where its payload starts. */
			if (v->reason == BH_R_SNI_PENDING &&
			    ((v->sni_flags & BH_FSNI_DONE) || p.l4_len > p.tcp_doff)) {
				tails.call(ctx, BH_TAIL_SNI);
				return bh_tail_missed(len); /* never pass unparsed */
			}
		}
	}

	if (p.frag == BH_FRAG_FIRST)
		bh_remember_fragment(&p, seg, now, v->reason);
	return bh_apply(ctx, &p, v->reason, is_reply, len, seg, v->peer_segment, slot, ctl_flags, v->flags);
}

/*
 * Tail call target for the packets bh_observe_wanted() picks: record their
 * hop timing or the flow's end, then hand the packet back to bulkhead_xdp,
 * which judges it as usual (bh_observe cleared what sent it here).
 */
int bulkhead_observe(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bh_pkt p;

#ifndef BH_NO_TELEMETRY
	bh_pkt_init(&p);
	if (bh_parse(data, data_end, &p) == BH_PARSE_OK && p.proto == IPPROTO_TCP) {
		__u32 zero = 0;
		struct bh_ctl *gc = ctl.lookup(&zero);
		if (gc) {
			__u32 slot = gc->active_slot & 1;
			__u32 seg = bh_segment_of(slot, ctx->ingress_ifindex);
			struct bh_flow *f = seg ? bh_flow_get(&p, seg, 0) : NULL;
			if (f && bh_observe_wanted(f, &p)) {
				bh_pkt_addrs16(&p);
				bh_snat_other_key(&p, f, seg);
				bh_nat_other_key(slot, &p, f); /* its other entry is behind the translation */
				bh_observe(ctx, &p, f, seg);
			}
		}
	}
#endif
	tails.call(ctx, BH_TAIL_MAIN);
	return bh_tail_missed(data_end - data); /* the packet can't be judged */
}

/*
 * Send the answer built in place back out of the ingress interface, by the
 * path the loader chose for it (if_cfg). XDP_TX from native XDP on a veth
 * lands on the peer's XDP ring, which only a peer with an XDP program of
 * its own drains: there the answer is passed up with BH_METAF_SEND_BACK and
 * bulkhead_tc redirects it out through the normal transmit path. Counted as
 * a reject either way; metadata that can't be written is a counted drop.
 * Should no TC program take it, the stack still drops the frame: its
 * destination MAC is the client's (PACKET_OTHERHOST), not the gateway's.
 */
static __always_inline int bh_reject_send(struct xdp_md *ctx, __u32 ev, __u64 len)
{
	__u32 ifindex = ctx->ingress_ifindex;
	struct bh_if_cfg *ic = if_cfg.lookup(&ifindex);

	/* Array lookups fail only for an ifindex >= BH_MAX_IFINDEX, which no segment has. */
	if (!ic || ic->reject_path != BH_REJECT_TC) {
		bh_event(ev);
		return bh_record(BH_R_REJECT_RULE, XDP_TX, len);
	}
#ifdef BH_NO_XDP_META
	/* bulkhead_tc takes it by its pending count and its type (PACKET_OTHERHOST: the client's MAC). */
	__u32 zero = 0;
	struct bh_send_back *pending = send_back_pending.lookup(&zero);
	if (!pending)
		return bh_record(BH_R_REJECT_FAILED, XDP_DROP, len);
	__u64 now = bpf_ktime_get_ns();
	if (now - pending->ts_ns > BH_SEND_BACK_NS)
		pending->count = 0; /* what was pending never reached TC (dropped on the way) */
	pending->count++;
	pending->ts_ns = now;
#else
	if (bh_meta_put(ctx, 0, BH_METAF_SEND_BACK))
		return bh_record(BH_R_REJECT_FAILED, XDP_DROP, len);
#endif
	bh_event(ev);
	return bh_record(BH_R_REJECT_RULE, XDP_PASS, len);
}

/*
 * Tail call target for BH_R_REJECT_RULE: re-parse (the caller's stack is
 * gone) and turn the packet into a TCP RST or ICMP unreachable.
 */
int bulkhead_reject(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct bh_pkt p;

	bh_pkt_init(&p);
	if (bh_parse(data, data_end, &p) != BH_PARSE_OK)
		return bh_record(BH_R_REJECT_FAILED, XDP_DROP, len);
	if (p.proto == IPPROTO_TCP) {
		if (bh_build_tcp_rst(ctx, &p, 0) == 0)
			return bh_reject_send(ctx, BH_EV_REJECT_TCP_RST, len);
	} else if (bh_build_icmp_unreach(ctx, &p) == 0) {
		return bh_reject_send(ctx, BH_EV_REJECT_ICMP, len);
	}
	return bh_record(BH_R_REJECT_FAILED, XDP_DROP, len);
}

/* Forward-direction key of a flow in the 16-byte form sni_state uses. */
static __always_inline void bh_sni_key_of(const struct bh_pkt *p, __u32 client_seg, int is_reply,
					  struct bh_flow6_key *k)
{
	__builtin_memcpy(k->saddr, is_reply ? p->daddr : p->saddr, 16);
	__builtin_memcpy(k->daddr, is_reply ? p->saddr : p->daddr, 16);
	k->sport_be = is_reply ? p->dport_be : p->sport_be;
	k->dport_be = is_reply ? p->sport_be : p->dport_be;
	k->proto = p->proto;
	k->pad = 0;
	k->segment_id = client_seg;
}

/*
 * The verdict for a flow whose ClientHello was parsed (the name's hashes are
 * in its entry): exact name, then "*." patterns; this port, then any.
 */
static __always_inline __u8 bh_sni_decide(__u32 slot, const struct bh_slot_cfg *cfg, const struct bh_flow *f,
					  __u16 dport_be, __u32 *rule_id, __u32 *app_id)
{
	struct bh_sni_key k = {};
	struct bh_sni_val *sv = NULL;

	*rule_id = 0;
	*app_id = 0;
	if (!(f->sni_flags & BH_FSNI_NAME)) {
		if (cfg->unknown_sni == BH_ACT_ALLOW)
			return BH_R_SNI_UNKNOWN_ALLOW;
		return (cfg->flags & BH_SLOTF_AUDIT) ? BH_R_AUDIT_DEFAULT : BH_R_SNI_UNKNOWN;
	}
	k.src_app = f->src_app;
	k.dst_app = f->dst_app;
	k.proto = IPPROTO_TCP;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		int wild = i >= 2;
		if (wild && !(f->sni_flags & BH_FSNI_WILD))
			break;
		k.name_hash = wild ? f->sni_w : f->sni_h;
		k.dport_be = (i & 1) ? 0 : dport_be;
		sv = bh_sel_sni(slot, &k);
		if (sv)
			break;
	}
	__u8 audit = cfg->flags & BH_SLOTF_AUDIT;
	/*
	 * Through a service address the client asked for one app by DNS: a
	 * ClientHello naming another (domain fronting) is refused whatever the
	 * default says.
	 */
	if (!sv && (f->flags & BH_FLOWF_NAT))
		return audit ? BH_R_AUDIT_DEFAULT : BH_R_SNI_FRONTING;
	if (!sv) {
		/* Address matched, name did not: the app did not match; the default decides. */
		if (cfg->default_action == BH_ACT_ALLOW)
			return BH_R_ALLOW_DEFAULT;
		return audit ? BH_R_AUDIT_DEFAULT : BH_R_DENY_DEFAULT;
	}
	*rule_id = sv->rule_id;
	*app_id = sv->app_id;
	if (sv->action == BH_ACT_ALLOW)
		return BH_R_ALLOW_RULE;
	if (audit || (sv->flags & BH_ACTF_AUDIT))
		return BH_R_AUDIT_RULE;
	return sv->action == BH_ACT_REJECT ? BH_R_REJECT_RULE : BH_R_DENY_RULE;
}

/* A parse's result into a flow entry: from here on the entry knows the name (or that there is none). */
static __always_inline void bh_sni_learn(struct bh_flow *e, const struct bh_sni_state *st)
{
	e->sni_h = st->h64;
	e->sni_w = st->w64;
	e->sni_flags = (e->sni_flags & ~(BH_FSNI_NAME | BH_FSNI_WILD)) | BH_FSNI_DONE |
		       ((st->flags & BH_SNIF_HAVE_NAME) ? BH_FSNI_NAME : 0) |
		       ((st->flags & (BH_SNIF_HAVE_NAME | BH_SNIF_WILD)) == (BH_SNIF_HAVE_NAME | BH_SNIF_WILD) ?
			BH_FSNI_WILD : 0);
}

/* Write a decided verdict into a flow entry, with the name it was decided on (from `src`). */
static __always_inline void bh_sni_settle(struct bh_flow *e, const struct bh_flow *src, __u8 reason, int reply,
					  __u32 rule_id, __u32 app_id)
{
	int pass = bh_reason_xdp(reason) == XDP_PASS;

	e->rule_id = rule_id;
	if (app_id)
		e->dst_app = app_id;
	if (reply) {
		e->reason = pass ? BH_R_ALLOW_REPLY : reason;
		e->action = pass ? BH_ACT_ALLOW : BH_ACT_DENY;
	} else {
		e->reason = reason;
		e->action = pass ? BH_ACT_ALLOW : (reason == BH_R_REJECT_RULE ? BH_ACT_REJECT : BH_ACT_DENY);
	}
	if (e != src) {
		e->sni_h = src->sni_h;
		e->sni_w = src->sni_w;
		e->sni_flags = src->sni_flags & (BH_FSNI_NAME | BH_FSNI_WILD | BH_FSNI_DONE);
	}
}

/*
 * Entry of the tail-called SNI programs (the caller's stack is gone): parse
 * the packet again, find the active slot, the segment and the packet's flow
 * entry. 0, or the reason to drop the packet for.
 */
static __always_inline __u8 bh_sni_enter(struct xdp_md *ctx, struct bh_pkt *p, struct bh_ctl **gc, __u32 *slot,
					 __u32 *seg, struct bh_flow **f)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	bh_pkt_init(p);
	if (bh_parse(data, data_end, p) != BH_PARSE_OK || p->proto != IPPROTO_TCP)
		return BH_R_SNI_UNKNOWN;
	*gc = ctl.lookup(&zero);
	if (!*gc)
		return BH_R_NO_POLICY;
	*slot = (*gc)->active_slot & 1;
	*seg = bh_segment_of(*slot, ctx->ingress_ifindex);
	if (!*seg)
		return BH_R_SNI_UNKNOWN;
	bh_pkt_addrs16(p);
	*f = bh_flow_get(p, *seg, 0);
	return *f ? 0 : BH_R_SNI_UNKNOWN;
}

/*
 * Tail call target for flows waiting on their server name.
 *
 * The client's first payload segment, when it holds the whole ClientHello
 * (nearly always), is parsed straight from the packet into a per-CPU
 * scratch state (bh_tls_whole) and decided in this call: no parse state is
 * looked up or kept, the flow entry says where the payload starts. A
 * ClientHello that goes on in later segments (or that the one-shot path
 * does not take) keeps its parse in sni_state, one streaming call per
 * segment (bh_tls_chunk), then is decided the same way. A flow whose name
 * is already known (re-judged after a policy swap) is decided from its
 * entry. Both entries of the flow are settled and learn the name's hashes.
 */
int bulkhead_sni(struct xdp_md *ctx)
{
	__u64 len = ctx->data_end - ctx->data;
	struct bh_pkt p;
	struct bh_ctl *gc;
	__u32 slot, seg;
	struct bh_flow *f;
	__u8 why = bh_sni_enter(ctx, &p, &gc, &slot, &seg, &f);
	if (why)
		return bh_record(why, XDP_DROP, len);
	__u32 zero = 0;
	struct bh_slot_cfg *cfg = slot_cfg.lookup(&slot);
	if (!cfg || !cfg->generation)
		return bh_record(BH_R_NO_POLICY, XDP_DROP, len);
	int is_reply = f->flags & BH_FLOWF_REPLY;
	__u32 client_seg = is_reply ? f->peer_segment : seg;
	__u32 paylen = p.l4_len > p.tcp_doff ? p.l4_len - p.tcp_doff : 0;
	/*
	 * The parse's result, whichever way it came, is in the per-CPU scratch
	 * state when the decision starts: one way into the decision for the
	 * verifier (each way in would be a walk of it of its own).
	 */
	struct bh_sni_state *st = sni_scratch.lookup(&zero);
	if (!st)
		return bh_record(BH_R_SNI_UNKNOWN, XDP_DROP, len); /* unreachable: index 0 of a one-entry array */

	if (f->sni_flags & BH_FSNI_DONE) {
		/* The name is known (re-decided under a new policy): from the entry. No name to log. */
		st->h64 = f->sni_h;
		st->w64 = f->sni_w;
		st->flags = ((f->sni_flags & BH_FSNI_NAME) ? BH_SNIF_HAVE_NAME : 0) |
			    ((f->sni_flags & BH_FSNI_WILD) ? BH_SNIF_WILD : 0);
		st->name_len = 0;
		goto decide;
	}
	if (is_reply)
		return bh_record(paylen ? BH_R_SNI_HOLD : BH_R_SNI_PENDING, paylen ? XDP_DROP : XDP_PASS, len);
	if (!paylen)
		return bh_record(BH_R_SNI_PENDING, XDP_PASS, len);
	__u32 seq = bpf_ntohl(p.seq_be) + !!(p.tcp_flags & BH_TCP_SYN); /* TCP Fast Open: data after the SYN's */
	__u32 rel = seq - f->sni_seq;

	if (!(f->sni_flags & BH_FSNI_STREAM)) {
		if (rel != 0) {
			/* Before payload offset 0 (a retransmission of nothing parsed) may pass; later waits for it. */
			if ((__s32)(0 - (rel + paylen)) >= 0)
				return bh_record(BH_R_SNI_PENDING, XDP_PASS, len);
			return bh_record(BH_R_SNI_OUT_OF_ORDER, XDP_DROP, len);
		}
		st->flags = 0;
		st->step = BH_TLS_REC_HDR;
		st->got = 0;
		/* The payload offset passed through st: one state for the verifier whatever the header layout. */
		int rc = bh_tls_whole(ctx, BH_TLS_FORGET(st->poff, p.l4_off + p.tcp_doff), paylen, st);
		if (rc == BH_TLS_DONE) {
			bh_event(BH_EV_SNI_SEGMENT);
			goto decide;
		}
		/*
		 * The parse goes on in sni_state: from where the one-shot walk
		 * stopped (MORE: the rest is in later segments), or from the start
		 * (CONT: a shape it does not take), in bulkhead_sni_stream.
		 */
		if (rc == BH_TLS_MORE) {
			st->next_rel = paylen;
			st->acc = 0;
			st->wacc = 0;
			if (!(st->flags & BH_SNIF_SEEN_SNI)) {
				/* The name is in a later segment: the streaming parser hashes it from scratch. */
				st->h64 = BH_NH_SEED_NAME;
				st->name_got = 0;
				__builtin_memset(st->name, 0, sizeof(st->name));
			}
			bh_event(BH_EV_SNI_SEGMENT);
		} else {
			bh_sni_state_init(st, f->sni_seq);
			st->next_rel = 0;
		}
		st->base_seq = f->sni_seq;
		st->flags |= BH_SNIF_STREAM;
		struct bh_flow6_key k = {};
		bh_sni_key_of(&p, client_seg, is_reply, &k);
		if (sni_state.update(&k, st)) {
			bh_event(BH_EV_SNI_STATE_FAILED);
			return bh_record(BH_R_SNI_UNKNOWN, XDP_DROP, len); /* the client resends it */
		}
		f->sni_flags |= BH_FSNI_STREAM;
		if (rc == BH_TLS_MORE)
			return bh_record(BH_R_SNI_PENDING, XDP_PASS, len);
		tails.call(ctx, BH_TAIL_SNI_STREAM);
		return bh_tail_missed(len); /* the client resends: the stored parse goes on */
	}

	struct bh_flow6_key k = {};
	bh_sni_key_of(&p, client_seg, is_reply, &k);
	struct bh_sni_state *ss = sni_state.lookup(&k);
	if (!ss || ss->base_seq != f->sni_seq) {
		/* The parse was evicted (sni_state is LRU): the name can't be known. Decided as unknown. */
		bh_event(BH_EV_SNI_STATE_LOST);
		st->flags = 0;
		st->name_len = 0;
		goto decide;
	}
	if (!(ss->flags & BH_SNIF_DONE)) {
		/* This segment goes on with the parse (bulkhead_sni_stream), which comes back here once it is done. */
		tails.call(ctx, BH_TAIL_SNI_STREAM);
		return bh_tail_missed(len);
	}
	/* The streamed parse is complete: its result to the scratch state, for the decision. */
	st->h64 = ss->h64;
	st->w64 = ss->w64;
	st->flags = ss->flags;
	st->name_len = ss->name_len;
	__builtin_memcpy(st->name, ss->name, sizeof(st->name));

decide:;
	bh_sni_learn(f, st);
	__u32 rule_id, app_id;
	__u8 reason = bh_sni_decide(slot, cfg, f, is_reply ? p.sport_be : p.dport_be, &rule_id, &app_id);
	bh_event(BH_EV_SNI_DECIDED);
#ifdef BH_BENCH
	int bench = gc->flags & BH_CTL_SNI_BENCH;
	__u32 f_rule = f->rule_id, f_dst = f->dst_app; /* what the benchmark puts back (below) */
#endif
	/* Settle both entries: this packet's, and its other direction's. */
	bh_sni_settle(f, f, reason, is_reply, rule_id, app_id);
	__u32 other_seg = is_reply ? client_seg : f->peer_segment;
	struct bh_flow *o = NULL;
	if (other_seg) {
		bh_nat_other_key(slot, &p, f);
		o = bh_flow_get(&p, other_seg, 1);
		if (o)
			bh_sni_settle(o, f, reason, !is_reply, rule_id, app_id);
	}
#ifndef BH_NO_TELEMETRY
	bh_pair_count(f, reason);
	if (is_reply)
		bh_fe_emit(ctx, BH_FE_CHANGE, &p, 1, seg, f, o, reason, BH_R_SNI_PENDING, st);
	else
		bh_fe_emit(ctx, BH_FE_CHANGE, &p, 0, seg, f, o, reason, BH_R_SNI_PENDING, st);
#endif
	if (f->sni_flags & BH_FSNI_STREAM) {
		/* A streamed parse is done with: its result lives in the flow entries now. */
		f->sni_flags &= ~BH_FSNI_STREAM;
		struct bh_flow6_key dk = {};
		bh_sni_key_of(&p, client_seg, is_reply, &dk);
		sni_state.delete(&dk);
	}
#ifdef BH_BENCH
	if (bench) {
		/*
		 * Benchmarks: the same ClientHello runs `repeat` times, so put the
		 * flow back as it was before it (pending, the name not known):
		 * every run then does what the real one did, plus these stores.
		 */
		f->reason = BH_R_SNI_PENDING;
		f->action = BH_ACT_SNI;
		f->rule_id = f_rule;
		f->dst_app = f_dst;
		f->sni_flags = 0;
		if (o) {
			o->reason = BH_R_SNI_PENDING;
			o->action = BH_ACT_SNI;
			o->rule_id = f_rule;
			o->dst_app = f_dst;
			o->sni_flags = 0;
		}
	}
#endif
	int code = bh_reason_xdp(reason);
	if (is_reply)
		return code == XDP_PASS ? bh_record(BH_R_ALLOW_REPLY, XDP_PASS, len) : bh_record(reason, XDP_DROP, len);
	if (code != XDP_TX)
		return bh_record(reason, code, len);
	/*
	 * Reject by name: RST to both ends. XDP sends one packet per packet, so
	 * this segment becomes a RST for the server (it has the connection open
	 * and is waiting for the ClientHello); the client's retransmission of it
	 * then meets the cached reject and gets its RST from bulkhead_reject.
	 */
	tails.call(ctx, BH_TAIL_RESET_ONWARD);
	return bh_tail_missed(len); /* the entries are settled: the client's resend meets the reject */
}

/*
 * Tail call target for a segment of a ClientHello that spans segments: one
 * bounded step of the streaming parser (tls_stream.h) over it. A step that leaves
 * more of this segment to parse calls this program again; a finished
 * ClientHello (or a malformed one) goes back to bulkhead_sni, which
 * decides. Its own program: the streaming parser's exits would multiply
 * the verifier's walk of the decision.
 */
int bulkhead_sni_stream(struct xdp_md *ctx)
{
	__u64 len = ctx->data_end - ctx->data;
	struct bh_pkt p;
	struct bh_ctl *gc;
	__u32 slot, seg;
	struct bh_flow *f;
	__u8 why = bh_sni_enter(ctx, &p, &gc, &slot, &seg, &f);
	if (why)
		return bh_record(why, XDP_DROP, len);
	/* Only a client's segment of a flow whose parse is under way comes here. */
	if ((f->flags & BH_FLOWF_REPLY) || !(f->sni_flags & BH_FSNI_STREAM))
		return bh_record(BH_R_SNI_UNKNOWN, XDP_DROP, len);
	struct bh_flow6_key k = {};
	bh_sni_key_of(&p, seg, 0, &k);
	struct bh_sni_state *st = sni_state.lookup(&k);
	if (!st || st->base_seq != f->sni_seq || (st->flags & BH_SNIF_DONE)) {
		tails.call(ctx, BH_TAIL_SNI); /* bulkhead_sni sorts it out (lost, or done) */
		return bh_tail_missed(len);
	}
	__u32 paylen = p.l4_len > p.tcp_doff ? p.l4_len - p.tcp_doff : 0;
	__u32 seq = bpf_ntohl(p.seq_be) + !!(p.tcp_flags & BH_TCP_SYN);
	__u32 rel = seq - f->sni_seq;
	if (rel != st->next_rel) {
		/* Already parsed (a retransmission): it may pass again. Anything else waits. */
		if ((__s32)(st->next_rel - (rel + paylen)) >= 0)
			return bh_record(BH_R_SNI_PENDING, XDP_PASS, len);
		return bh_record(BH_R_SNI_OUT_OF_ORDER, XDP_DROP, len);
	}
	/*
	 * Fresh packet pointers, and the payload offset passed through st: what
	 * the header parse proved differs by header layout, and would make each
	 * layout a walk of the parser of its own for the verifier.
	 */
	__u32 poff = BH_TLS_FORGET(st->poff, p.l4_off + p.tcp_doff);
	void *pkt = (void *)(long)ctx->data, *pkt_end = (void *)(long)ctx->data_end;
	__u32 end = rel + paylen;
	int rc;
	if (st->flags & BH_SNIF_REC_NEXT) {
		/* Between two records of the ClientHello: the next one's header. */
		__u32 data_at = st->rec_end + st->shift + 5; /* payload offset of the record's first byte */
		rc = bh_tls_next_record(pkt, pkt_end, poff, rel, end, st);
		if (rc == BH_TLS_CONT && (st->flags & BH_SNIF_TAIL)) {
			/* Only the records' headers are left to check: until one holds the ClientHello's end. */
			if (st->rec_end >= st->body_end) {
				rc = BH_TLS_DONE;
			} else {
				st->flags |= BH_SNIF_REC_NEXT;
				if (st->rec_end + st->shift >= end)
					rc = BH_TLS_MORE;
			}
		} else if (rc == BH_TLS_CONT && data_at >= end) {
			rc = BH_TLS_MORE; /* they start in the next segment */
		}
	} else {
		/*
		 * The parser sees this segment in its own offsets (payload offset -
		 * shift), and only up to the current record's end: there, it
		 * answers MORE, and the next record's header is read first.
		 */
		__u32 vrel = rel - st->shift, vseg = end - st->shift;
		if (st->flags & BH_SNIF_TAIL)
			rc = BH_TLS_MORE; /* nothing left to parse in this record: wait for its end */
		else
			rc = bh_tls_chunk(pkt, pkt_end, poff, vrel, (vseg < st->rec_end ? vseg : st->rec_end) - vrel, st);
		/* (the first record's header, parsed in this call, may have set rec_end) */
		if (rc == BH_TLS_DONE && st->body_end > st->rec_end) {
			/*
			 * Every extension is walked, but the ClientHello's last bytes
			 * (skipped, unread) are in a later record: decided only once
			 * its header is there and sane, as a server would read it.
			 */
			st->flags |= BH_SNIF_TAIL;
			rc = BH_TLS_MORE;
		}
		if (rc == BH_TLS_MORE && st->rec_end <= vseg) {
			st->flags |= BH_SNIF_REC_NEXT;
			if (st->rec_end < vseg)
				rc = BH_TLS_CONT; /* the next record starts in this segment */
		}
	}
	if (rc == BH_TLS_MORE) {
		st->next_rel = end;
		bh_event(BH_EV_SNI_SEGMENT);
		return bh_record(BH_R_SNI_PENDING, XDP_PASS, len);
	}
	if (rc == BH_TLS_CONT) {
		/* More of this segment to parse: the next step, in a fresh call. */
		tails.call(ctx, BH_TAIL_SNI_STREAM);
	} else {
		if (rc == BH_TLS_BAD)
			st->flags &= ~BH_SNIF_HAVE_NAME;
		st->flags |= BH_SNIF_DONE;
		st->next_rel = rel + paylen;
		bh_event(BH_EV_SNI_SEGMENT);
		tails.call(ctx, BH_TAIL_SNI);
	}
	/*
	 * The tail call returned: the chain ran out (33 calls: a ClientHello we
	 * can't follow) or a slot is empty. The parse ends here without a name,
	 * so the client's resend of this segment is decided as an unknown name.
	 */
	st->flags = (st->flags & ~BH_SNIF_HAVE_NAME) | BH_SNIF_DONE;
	st->next_rel = rel + paylen;
	return bh_tail_missed(len);
}

/* Tail call target: this segment of a rejected flow, rewritten as a RST for its receiver. */
int bulkhead_reset_onward(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct bh_pkt p;

	bh_pkt_init(&p);
	if (bh_parse(data, data_end, &p) != BH_PARSE_OK || p.proto != IPPROTO_TCP ||
	    bh_build_tcp_rst(ctx, &p, 1))
		return bh_record(BH_R_REJECT_FAILED, XDP_DROP, len);
	bh_event(BH_EV_RESET_ONWARD);
	return bh_record(BH_R_REJECT_RULE, XDP_PASS, len);
}

#define BH_FIB_OTHER_SEGMENT 1000 /* not a BPF_FIB_LKUP_RET_*: the route found leaves by another segment */

/*
 * Where the kernel would send the packet. Replies leave by their client's
 * segment (out_seg), whose table the plumbing keeps (ip rule on its mark):
 * looked up in that table directly where the kernel can
 * (BPF_FIB_LOOKUP_TBID, upstream 6.8+). Kernels without it reject the flag (-EINVAL) and
 * get the main table's answer, taken only if it leaves by that same
 * segment: the segment's table holds the main table's routes via the
 * segment's interfaces, so the two then agree; else the stack routes it, by
 * the mark. Forward packets carry no segment in the stack either: the
 * policy-routed lookup without a mark is theirs (out_seg 0).
 */
static __always_inline long bh_fwd_fib(struct xdp_md *ctx, const struct bh_pkt *p, __u32 out_seg, __u32 slot,
				       struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *ip = data + BH_ETH_HLEN;

	/* bh_fwd_plain checked the lengths; the verifier wants them again. */
	if ((void *)(ip + BH_IPV4_MIN_HLEN) > data_end)
		return BPF_FIB_LKUP_RET_NOT_FWDED;
	fib->ifindex = ctx->ingress_ifindex;
	fib->l4_protocol = p->proto;
	fib->sport = p->sport_be;
	fib->dport = p->dport_be;
	fib->tot_len = p->ip_len; /* the MTU check: FRAG_NEEDED if it does not fit */
	if (p->family == 4) {
		fib->family = 2; /* AF_INET */
		fib->tos = ip[1];
		fib->ipv4_src = p->saddr4_be;
		fib->ipv4_dst = p->daddr4_be;
	} else {
		if ((void *)(ip + BH_IPV6_HLEN) > data_end)
			return BPF_FIB_LKUP_RET_NOT_FWDED;
		fib->family = 10; /* AF_INET6 */
		fib->flowinfo = *(__be32 *)ip & bpf_htonl(0x0fffffff);
		__builtin_memcpy(fib->ipv6_src, p->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, p->daddr, 16);
	}
	if (!out_seg)
		return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	/* fib.tbid shares its place with h_vlan_proto/h_vlan_TCI (6.8+ headers; 6.1's lack the name). */
	*(__u32 *)&fib->h_vlan_proto = BH_MARK_SEG | out_seg;
	long rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), BPF_FIB_LOOKUP_DIRECT | BH_FIB_TBID);
	if (rc >= 0)
		return rc;
	*(__u32 *)&fib->h_vlan_proto = 0;
	fib->ifindex = ctx->ingress_ifindex;
	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS && bh_segment_of(slot, fib->ifindex) != out_seg)
		return BH_FIB_OTHER_SEGMENT;
	return rc;
}

/*
 * Tail call target for allowed, unsteered packets (bh_fwd_handoff): the fast
 * path. Forwarded as the kernel would forward it (FIB lookup, new MACs,
 * TTL - 1) with bpf_redirect, it never reaches the stack, netfilter or
 * conntrack. What can't go this way passes to the stack, counted by why
 * (BH_EV_FWD_*), with the metadata's mark, so that it skips conntrack;
 * except local delivery (FIB: not forwarded), which keeps conntrack (the
 * gateway's own replies are routed back by ct mark), and fragments: their
 * mark is withdrawn.
 * The verdict was recorded by nobody yet: each exit here records it.
 */
/* Take the mark back: the packet goes up as an unmarked one, through conntrack. */
static __always_inline void bh_fwd_unmark(struct xdp_md *ctx)
{
#ifndef BH_NO_XDP_META /* else nothing marks it */
	void *data = (void *)(long)ctx->data;
	struct bh_meta *m = (void *)(long)ctx->data_meta;

	if ((void *)(m + 1) <= data)
		m->magic = 0;
#endif
}

int bulkhead_forward(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 len = data_end - data;
	struct bpf_fib_lookup fib = {};
	struct bh_pkt p;
	__u32 ev = BH_EV_FWD_FIB_OTHER;
#ifdef BH_NO_XDP_META
	__u32 zero = 0;
	struct bh_meta *m = meta_handoff.lookup(&zero);
	if (!m || m->magic != BH_META_MAGIC || !(m->flags & BH_METAF_FORWARD))
		return bh_record(BH_R_TAIL_CALL_MISSED, XDP_DROP, len); /* only bh_fwd_handoff calls here */
	m->magic = 0;
#else
	struct bh_meta *m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 1) > data || m->magic != BH_META_MAGIC || !(m->flags & BH_METAF_FORWARD))
		return bh_record(BH_R_TAIL_CALL_MISSED, XDP_DROP, len); /* only bh_fwd_handoff calls here */
#endif
	__u8 reason = m->flags >> BH_METAF_REASON_SHIFT;
	__u32 slot = !!(m->flags & BH_METAF_SLOT1);
	__u32 out_seg = m->mark & 0xffff;
	/* TC copies the mark only; the flags are for this program. */
	m->flags = 0;

	bh_pkt_init(&p);
	if (bh_parse(data, data_end, &p) != BH_PARSE_OK) {
		bh_event(BH_EV_FWD_PACKET); /* bulkhead_xdp parsed it: unreachable */
		return bh_record(reason, XDP_PASS, len);
	}
	if (p.frag != BH_FRAG_NONE) {
		/* Conntrack's defragmentation sees every fragment: the later ones carry no mark. */
		bh_fwd_unmark(ctx);
		bh_event(BH_EV_FWD_PACKET);
		return bh_record(reason, XDP_PASS, len);
	}
	if (!bh_fwd_plain(&p, data, data_end)) {
		ev = BH_EV_FWD_PACKET;
		goto stack;
	}
	bh_pkt_addrs16(&p);
	if (bh_fwd_csum_partial(&p, data, data_end)) {
		ev = BH_EV_FWD_CSUM_PARTIAL;
		goto stack;
	}
	long rc = bh_fwd_fib(ctx, &p, out_seg, slot, &fib);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__u32 oif = fib.ifindex;
		struct bh_if_cfg *ic = if_cfg.lookup(&oif);
		/* Array lookups fail only past BH_MAX_IFINDEX: not an interface the loader set up. */
		if (!ic || !ic->redirect_ok) {
			ev = BH_EV_FWD_NO_TARGET;
			goto stack;
		}
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (bh_fwd_rewrite(&p, data, data_end, fib.dmac, fib.smac)) {
			ev = BH_EV_FWD_PACKET;
			goto stack;
		}
#ifndef BH_NO_XDP_META
		/* The metadata would travel with the frame into the peer: taken off. */
		bpf_xdp_adjust_meta(ctx, (int)sizeof(struct bh_meta));
#endif
		bh_event(BH_EV_FWD_REDIRECT);
		return bh_record(reason, bpf_redirect(oif, 0), len);
	}
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED) {
		bh_fwd_unmark(ctx);
		bh_event(BH_EV_FWD_LOCAL);
		return bh_record(reason, XDP_PASS, len);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		ev = BH_EV_FWD_NO_NEIGH;
	else if (rc == BH_FIB_OTHER_SEGMENT)
		ev = BH_EV_FWD_OTHER_SEGMENT;
stack:
	bh_event(ev);
	return bh_record(reason, XDP_PASS, len);
}

/* ---------------------------------------------------------------- the fabric, in TC */

/* The VXLAN-GBP tunnel option (the kernel's struct vxlan_metadata): the policy id is its low 16 bits. */
struct bh_vxlan_md {
	__u32 gbp;
};
#define BH_GBP_ID_MASK 0xffff
#define BH_PACKET_HOST 0 /* linux/if_packet.h */

/* Parse the headers of an skb (made linear first: bh_parse_headers reads them directly). */
static __always_inline int bh_tc_parse(struct __sk_buff *skb, struct bh_pkt *p)
{
	__u32 want = skb->len < 128 ? skb->len : 128; /* Ethernet, IP with options, TCP with options */

	if (bpf_skb_pull_data(skb, want))
		return BH_R_MALFORMED_L2;
	bh_pkt_init(p);
	int rc = bh_parse_headers((void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, p);
	if (rc == BH_PARSE_OK)
		bh_pkt_addrs16(p);
	return rc;
}

/*
 * Translate one address of the packet (dst: the destination, else the
 * source) to `to`, with the checksums: the kernel's helpers keep what the
 * skb says of them (a checksum left to offload stays right). Returns 0, or
 * -1 if the packet could not be written.
 */
static __always_inline int bh_tc_nat(struct __sk_buff *skb, const struct bh_pkt *p, int dst, const __u8 *to)
{
	const __u8 *from = dst ? p->daddr : p->saddr;
	__u32 l3 = p->l3_off, l4 = p->l4_off;
	__u32 csum_off = 0, l4_flags = BPF_F_PSEUDO_HDR;

	if (p->proto == IPPROTO_TCP) {
		csum_off = l4 + 16;
	} else if (p->proto == IPPROTO_UDP) {
		csum_off = l4 + 6;
		l4_flags |= BPF_F_MARK_MANGLED_0; /* UDP over IPv4 may carry no checksum: it stays 0 */
	} else if (p->proto == IPPROTO_ICMPV6) {
		csum_off = l4 + 2; /* ICMPv6 sums the pseudo-header; ICMPv4 does not */
	}
	if (p->family == 4) {
		__u32 old4, new4;
		__builtin_memcpy(&old4, from + 12, 4);
		__builtin_memcpy(&new4, to + 12, 4);
		if (csum_off && bpf_l4_csum_replace(skb, csum_off, old4, new4, l4_flags | 4))
			return -1;
		if (bpf_l3_csum_replace(skb, l3 + 10, old4, new4, 4))
			return -1;
		return bpf_skb_store_bytes(skb, l3 + (dst ? 16 : 12), &new4, 4, 0) ? -1 : 0;
	}
	__u8 a[16], b[16];
	__builtin_memcpy(a, from, 16);
	__builtin_memcpy(b, to, 16);
	/*
	 * A 32-bit one's-complement sum: bcc 0.26 declares the helper `int`, so a
	 * sum with its top bit set looks negative (6.1's csum_partial gives such
	 * sums, 6.18's rarely). Its only error is a size not a multiple of 4 (not
	 * these), so the value is taken as the unsigned sum it is.
	 */
	__u32 diff = (__u32)bpf_csum_diff((__be32 *)a, 16, (__be32 *)b, 16, 0);
	if (csum_off && bpf_l4_csum_replace(skb, csum_off, 0, diff, l4_flags))
		return -1;
	return bpf_skb_store_bytes(skb, l3 + (dst ? 24 : 8), b, 16, 0) ? -1 : 0;
}

/*
 * Translate one TCP or UDP port of the packet (dst: the destination, else
 * the source) to `to`, with the checksum. Other protocols keep theirs (an
 * ICMP echo its identifier: bh_snat_claim never changes it). Returns 0, or
 * -1 if the packet could not be written.
 */
static __always_inline int bh_tc_port(struct __sk_buff *skb, const struct bh_pkt *p, int dst, __u16 to)
{
	__u16 from = dst ? p->dport_be : p->sport_be;
	__u32 csum_off, flags = 2;

	if (from == to)
		return 0;
	if (p->proto == IPPROTO_TCP) {
		csum_off = p->l4_off + 16;
	} else if (p->proto == IPPROTO_UDP) {
		csum_off = p->l4_off + 6;
		flags |= BPF_F_MARK_MANGLED_0;
	} else {
		return 0;
	}
	if (bpf_l4_csum_replace(skb, csum_off, from, to, flags))
		return -1;
	return bpf_skb_store_bytes(skb, p->l4_off + (dst ? 2 : 0), &to, 2, 0) ? -1 : 0;
}

/* ---------------------------------------------------------------- request timing per hop */

/*
 * HTTP and TLS requests of flows through the transit, timed per hop without
 * synchronized clocks. Each gateway times the request/response turn on its
 * own clock, at the packets of the flow that cross the tunnel:
 *
 *   client's gateway (A): client RTT (handshake, XDP), request -> answer here
 *   server's gateway (B): server RTT (handshake, XDP), request -> answer there
 *
 * B tells A its part in-band: every answer packet's VNI carries, in bits
 * 17-23, B's time since the request (the SYN-ACK's: B's server RTT), so A
 * pairs the two parts of the same request with no store, no matching ids
 * and no clock sync. A sends one BH_FE_HOP event per request (HTTP: at the
 * first answer byte; TLS, inferred: at the next request or the end, with the
 * turn's last answer byte, so tickets and the handshake don't count). The
 * agent turns the four times into ingress, backbone, app VPC and app parts
 * (agent/telemetry/hops.py). Only flows whose first client payload is an
 * HTTP method or a TLS record are timed (BH_FLOWX_HOP): others pay one flag
 * test per packet.
 */
#define BH_HOP_UNIT_SHIFT 4 /* the VNI's codes count units of 16 x 1024 ns */

/*
 * A duration (units of 1024 ns) in 7 bits, never 0: 1-15 linear steps of
 * 16.4 us, then 8 steps per octave (a log-float with 3 mantissa bits,
 * rounded: within 1/16 of the value) up to 127 = 4.0 s or more.
 */
static __always_inline __u32 bh_hop_code(__u32 units)
{
	__u32 v = units >> BH_HOP_UNIT_SHIFT;

	if (v < 16)
		return v ? v : 1;
	__u32 e = bh_log2_bucket(v); /* >= 4 */
	__u32 r = (v + (1U << (e - 4))) >> (e - 3);
	if (r >= 16) {
		e++;
		r = 8;
	}
	if (e > 17)
		return 127;
	return ((e - 2) << 3) | (r - 8);
}

static __always_inline __u32 bh_hop_units(__u32 code)
{
	if (code < 16)
		return code << BH_HOP_UNIT_SHIFT;
	__u32 e = ((code >> 3) & 15) + 2;
	return ((8 + (code & 7)) << (e - 3)) << BH_HOP_UNIT_SHIFT;
}

/* What a flow's first client payload is: BH_HOP_HTTP (a method), BH_HOP_TLS (a handshake record), or 0. */
static __always_inline __u8 bh_hop_kind(struct __sk_buff *skb, const struct bh_pkt *p)
{
	__u8 b[4];

	if (p->l4_len < p->tcp_doff + 4 || bpf_skb_load_bytes(skb, p->l4_off + p->tcp_doff, b, 4))
		return 0;
	if (b[0] == 0x16 && b[1] == 0x03)
		return BH_HOP_TLS;
	__u32 w = ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
	switch (w) {
	case 0x47455420: /* "GET " */
	case 0x50555420: /* "PUT " */
	case 0x504f5354: /* "POST" */
	case 0x48454144: /* "HEAD" */
	case 0x44454c45: /* "DELE"TE */
	case 0x50415443: /* "PATC"H */
	case 0x4f505449: /* "OPTI"ONS */
		return BH_HOP_HTTP;
	}
	return 0;
}

/* A TLS turn that starts with application data is a request; one of handshake records is not. */
static __always_inline int bh_hop_tls_app(struct __sk_buff *skb, const struct bh_pkt *p)
{
	__u8 b[7];
	__u32 off = p->l4_off + p->tcp_doff;

	if (bpf_skb_load_bytes(skb, off, b, 1))
		return 0;
	if (b[0] == 0x17)
		return 1;
	/* TLS 1.3 compatibility mode: a one-byte ChangeCipherSpec, then the encrypted Finished and data. */
	if (b[0] != 0x14 || p->l4_len < p->tcp_doff + 7 || bpf_skb_load_bytes(skb, off, b, 7))
		return 0;
	return b[3] == 0 && b[4] == 1 && b[6] == 0x17;
}

/* One timed request, answered: a BH_FE_HOP record for the agent (the client's gateway only). */
static __always_inline void bh_hop_emit(void *ctx, const struct bh_flow6_key *k, const struct bh_flow *ent,
					struct bh_hop *h, __u8 family, __u16 peer_seg)
{
	int told = h->state & BH_HOPS_TOLD;

	h->state |= BH_HOPS_TOLD;
	if (told || !(h->state & BH_HOPS_APP) || !(h->state & BH_HOPS_RESP))
		return;
#ifndef BH_NO_TELEMETRY
#ifdef BH_EVENTS_PERF
	__u32 zero = 0;
	struct bh_flow_event *e = ev_scratch.lookup(&zero);
#else
	struct bh_flow_event *e = flow_events.ringbuf_reserve(sizeof(struct bh_flow_event));
#endif
	if (!e) {
		bh_event(BH_EV_FLOW_EVENT_LOST);
		return;
	}
	int tls = h->kind == BH_HOP_TLS;
	__u8 far = tls ? h->far_last : h->far_first;
	e->ts_ns = bpf_ktime_get_coarse_ns();
	e->packets = h->crtt;
	e->bytes = (tls ? h->t_last : h->t_first) - h->t_req;
	e->r_packets = far ? bh_hop_units(far) : 0;
	e->r_bytes = h->far_srtt ? bh_hop_units(h->far_srtt) : 0;
	__builtin_memcpy(e->saddr, k->saddr, 16);
	__builtin_memcpy(e->daddr, k->daddr, 16);
	e->sport_be = k->sport_be;
	e->dport_be = k->dport_be;
	e->src_app = ent->src_app;
	e->dst_app = ent->dst_app;
	e->rule_id = ent->rule_id;
	e->generation = ent->generation;
	e->segment_id = k->segment_id;
	e->peer_segment = peer_seg;
	e->kind = BH_FE_HOP;
	e->family = family;
	e->proto = IPPROTO_TCP;
	e->reason = ent->reason;
	e->prev_reason = h->kind;
	e->flags = ent->flags & (BH_ACTF_AUDIT | BH_FLOWF_NAT | BH_FLOWF_TRANSIT | BH_FLOWF_VIA_VIP);
	e->tcp_flags = 0;
	e->sni_len = 0;
	e->xflags = ent->xflags;
	e->snat_port_be = ent->snat_port_be;
#ifdef BH_EVENTS_PERF
	if (flow_events.perf_submit(ctx, e, sizeof(*e)))
		bh_event(BH_EV_FLOW_EVENT_LOST);
#else
	flow_events.ringbuf_submit(e, 0);
#endif
#endif
}

/*
 * A client packet of a TCP flow through the transit, at either gateway
 * (`near`: the client's). The first with payload says whether the flow is
 * timed (then `rep`, its reply entry, is flagged too); a payload after an
 * answer begins the next turn (and tells the last one, at the client's
 * gateway); a FIN or RST ends it.
 */
/*
 * Whether a packet of a TCP flow through the transit has anything for
 * request timing to do: its flow is to be classified or is timed, and the
 * packet carries payload (or, from the client, a FIN or RST that ends the
 * turn). Every other packet (an untimed flow's, a timed flow's pure ACK)
 * pays this test and nothing more.
 */
static __always_inline int bh_hop_wants(const struct bh_flow *f, const struct bh_pkt *p)
{
	if (!(f->xflags & (BH_FLOWX_HOP_CLASSIFY | BH_FLOWX_HOP)))
		return 0;
	if (p->l4_len > p->tcp_doff)
		return 1;
	return !(f->flags & BH_FLOWF_REPLY) && (f->xflags & BH_FLOWX_HOP) && (p->tcp_flags & (BH_TCP_FIN | BH_TCP_RST));
}

static __always_inline void bh_hop_client(void *ctx, const struct bh_pkt *p, const struct bh_flow6_key *k,
					  struct bh_flow *fwd, struct bh_flow *rep, int near)
{
	struct __sk_buff *skb = ctx;
	int payload = p->l4_len > p->tcp_doff;
	__u32 t = bpf_ktime_get_ns() >> BH_LAT_SHIFT;

	if (fwd->xflags & BH_FLOWX_HOP_CLASSIFY) {
		if (!payload)
			return;
		fwd->xflags &= ~BH_FLOWX_HOP_CLASSIFY;
		__u8 kind = bh_hop_kind(skb, p);
		if (!kind || !rep)
			return;
		__u32 zero = 0;
		struct bh_hop_scratch *sc = hop_scratch.lookup(&zero);
		if (!sc)
			return;
		struct bh_hop *n = &sc->n;
		__builtin_memset(n, 0, sizeof(*n));
		n->t_req = t;
		n->kind = kind;
		n->turns = 1;
		n->state = BH_HOPS_REQ | (kind == BH_HOP_HTTP ? BH_HOPS_APP : 0);
		if (near) {
			n->crtt = (fwd->flags & BH_FLOWF_T_HS) ? 0 : fwd->t_b;
			n->far_srtt = fwd->hop_srtt;
		}
		if (req_hop.update((struct bh_flow6_key *)k, n))
			return;
		fwd->xflags |= BH_FLOWX_HOP;
		rep->xflags |= BH_FLOWX_HOP;
		return;
	}
	struct bh_hop *h = req_hop.lookup((struct bh_flow6_key *)k);
	if (!h)
		return;
	if (p->tcp_flags & (BH_TCP_FIN | BH_TCP_RST)) {
		if (near)
			bh_hop_emit(ctx, k, fwd, h, p->family, fwd->peer_segment);
		h->state = 0;
		return;
	}
	if (!payload || !(h->state & BH_HOPS_RESP))
		return; /* more of the same request (or the flow ended) */
	if (near)
		bh_hop_emit(ctx, k, fwd, h, p->family, fwd->peer_segment);
	h->t_req = t;
	h->t_first = 0;
	h->t_last = 0;
	h->far_first = 0;
	h->far_last = 0;
	h->turns++;
	h->state = BH_HOPS_REQ | ((h->kind == BH_HOP_HTTP || bh_hop_tls_app(skb, p)) ? BH_HOPS_APP : 0);
}

/*
 * An answer packet of a timed flow (its reply entry has BH_FLOWX_HOP). At
 * the server's gateway: returns the code of its time since the request, for
 * the VNI. At the client's (`near`, `far` the code the VNI brought): notes
 * the answer, and tells an HTTP request at its first byte.
 */
static __always_inline __u32 bh_hop_server(void *ctx, const struct bh_pkt *p, const struct bh_flow6_key *k,
					   const struct bh_flow *ent, int near, __u8 far, __u16 peer_seg)
{
	struct bh_hop *h = req_hop.lookup((struct bh_flow6_key *)k);

	if (!h || !(h->state & BH_HOPS_REQ) || p->l4_len <= p->tcp_doff)
		return 0;
	__u32 t = bpf_ktime_get_ns() >> BH_LAT_SHIFT;
	h->state |= BH_HOPS_RESP;
	if (!near)
		return bh_hop_code(t - h->t_req);
	if (!h->t_first) {
		h->t_first = t;
		h->far_first = far;
	}
	h->t_last = t;
	h->far_last = far;
	if (h->kind == BH_HOP_HTTP)
		bh_hop_emit(ctx, k, ent, h, p->family, peer_seg);
	return 0;
}

/*
 * Send the packet to the gateway of segment `vni` through the transit
 * device: VXLAN with the segment in the VNI and `app`, the identity it
 * carries, in the Group Based Policy id; `hop_code` (0: none) in the VNI's
 * bits 17-23 (request timing). Returns a TC code.
 */
static __always_inline int bh_tc_encap(struct __sk_buff *skb, __u32 slot, __u32 vni, __u32 app, int via_vip,
				       __u32 hop_code)
{
	struct bh_fab_val *sv = bh_fab(slot, BH_FAB_SEG, vni, NULL);
	struct bh_fab_val *me = bh_fab(slot, BH_FAB_SELF, 0, NULL);
	if (!sv || !me || !me->b || app > BH_GBP_ID_MASK)
		return bh_record(BH_R_TRANSIT_NO_TUNNEL, TC_ACT_SHOT, skb->len);
	struct bh_fab_val *gv = bh_fab(slot, BH_FAB_GW, sv->a, NULL);
	if (!gv)
		return bh_record(BH_R_TRANSIT_NO_TUNNEL, TC_ACT_SHOT, skb->len);
	struct bpf_tunnel_key key = {};
	__u64 kflags = 0;
	key.tunnel_id = vni | (via_vip ? BH_VNI_VIA_VIP : 0) | ((hop_code << BH_VNI_HOP_SHIFT) & BH_VNI_HOP_MASK);
	key.tunnel_ttl = 64;
	if (gv->a == 6) {
		__builtin_memcpy(key.remote_ipv6, gv->addr, 16);
		__builtin_memcpy(key.local_ipv6, me->addr, 16);
		kflags = BPF_F_TUNINFO_IPV6;
	} else {
		__u32 r, l;
		__builtin_memcpy(&r, gv->addr + 12, 4);
		__builtin_memcpy(&l, me->addr + 12, 4);
		key.remote_ipv4 = bpf_ntohl(r);
		key.local_ipv4 = bpf_ntohl(l);
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), kflags))
		return bh_record(BH_R_TRANSIT_NO_TUNNEL, TC_ACT_SHOT, skb->len);
	struct bh_vxlan_md md = {};
	md.gbp = app;
	if (bpf_skb_set_tunnel_opt(skb, &md, sizeof(md)))
		return bh_record(BH_R_TRANSIT_NO_TUNNEL, TC_ACT_SHOT, skb->len);
	/* The outer packet is routed by the underlay's tables, not a segment's: our mark goes. */
	skb->mark &= BH_MARK_KEEP;
	bh_event(BH_EV_TRANSIT_ENCAP);
	return bpf_redirect(me->b, 0);
}

/*
 * Forward a translated or decapsulated packet out of segment `out_seg` (0:
 * by the main table) as the kernel would (TTL / hop limit minus one), with
 * bpf_redirect_neigh: it never reaches the stack, so no conntrack, and no
 * reverse-path filter that knows nothing of service addresses (a reply whose
 * source became one has no route back). The addresses in `p` are the
 * packet's as it leaves. What the FIB can't route goes up the stack.
 */
static __always_inline int bh_tc_route(struct __sk_buff *skb, const struct bh_pkt *p, __u32 out_seg)
{
	struct bpf_fib_lookup fib = {};
	__u32 l3 = p->l3_off;

	fib.ifindex = skb->ingress_ifindex;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport_be;
	fib.dport = p->dport_be;
	if (p->family == 4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, p->saddr + 12, 4);
		__builtin_memcpy(&fib.ipv4_dst, p->daddr + 12, 4);
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, p->daddr, 16);
	}
	long rc = -1;
	if (out_seg) {
		*(__u32 *)&fib.h_vlan_proto = BH_MARK_SEG | out_seg; /* fib.tbid (see bh_fwd_fib) */
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_DIRECT | BH_FIB_TBID);
		if (rc < 0) {
			*(__u32 *)&fib.h_vlan_proto = 0; /* no per-table lookup (kernel < 6.8): the main table */
			fib.ifindex = skb->ingress_ifindex;
		}
	}
	if (rc < 0)
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	/* bpf_redirect_neigh resolves a neighbour the FIB has no entry for yet. */
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK; /* local, unreachable, needs fragmenting: the stack knows what to do */
	__u8 ttl = 0;
	if (p->family == 4) {
		__u8 w[2];
		if (bpf_skb_load_bytes(skb, l3 + 8, w, 2) || w[0] <= 1)
			return TC_ACT_OK; /* the stack sends the time-exceeded */
		__u16 old = bpf_htons(((__u16)w[0] << 8) | w[1]);
		__u16 new = bpf_htons(((__u16)(w[0] - 1) << 8) | w[1]);
		ttl = w[0] - 1;
		if (bpf_l3_csum_replace(skb, l3 + 10, old, new, 2) || bpf_skb_store_bytes(skb, l3 + 8, &ttl, 1, 0))
			return TC_ACT_SHOT;
	} else {
		if (bpf_skb_load_bytes(skb, l3 + 7, &ttl, 1) || ttl <= 1)
			return TC_ACT_OK;
		ttl--;
		if (bpf_skb_store_bytes(skb, l3 + 7, &ttl, 1, 0))
			return TC_ACT_SHOT;
	}
	skb->mark &= BH_MARK_KEEP;
	/* The kernel's signature (bcc 0.26 declares an older three-argument one: flags would be garbage). */
	return ((long (*)(__u32, void *, int, __u64))bpf_redirect_neigh)(fib.ifindex, NULL, 0, 0);
}

/*
 * A packet of a flow through the fabric, arriving on a segment interface
 * (bulkhead_xdp judged it and let it through): translate a service address
 * (forward: destination to the real address; reply: source back to the
 * service address) and, for a peer behind another gateway, encapsulate.
 */
static __always_inline int bh_tc_fabric_flow(struct __sk_buff *skb, __u32 slot, __u32 seg, struct bh_pkt *p,
					     struct bh_flow *f)
{
	__u8 fflags = f->flags;
	__u32 vni = f->peer_segment;
	__u32 app = (fflags & BH_FLOWF_REPLY) ? f->dst_app : f->src_app;
	/* Request timing: the forward key, before a translation changes the destination. */
	__u32 zero = 0;
	struct bh_hop_scratch *hs = NULL;
	int timed = p->proto == IPPROTO_TCP && (fflags & BH_FLOWF_TRANSIT) && bh_hop_wants(f, p);
	if (timed)
		hs = hop_scratch.lookup(&zero);
	if (hs && !(fflags & BH_FLOWF_REPLY))
		bh_sni_key_of(p, seg, 0, &hs->k);
	if (fflags & BH_FLOWF_NAT) {
		int reply = fflags & BH_FLOWF_REPLY;
		struct bh_fab_val *nv = reply ? bh_fab(slot, BH_FAB_REAL, 0, p->saddr) : bh_fab(slot, BH_FAB_VIP, 0, p->daddr);
		/*
		 * The slot XDP judged it by was refilled while the packet was on its way
		 * (two applies in a row): nothing to translate it to under a policy that is gone.
		 */
		if (!nv)
			return bh_record(BH_R_NO_POLICY, TC_ACT_SHOT, skb->len);
		if (bh_tc_nat(skb, p, !reply, nv->addr))
			return bh_record(BH_R_MALFORMED_L4, TC_ACT_SHOT, skb->len); /* the helpers refused to write it */
		if (reply) {
			__builtin_memcpy(p->saddr, nv->addr, 16);
			__builtin_memcpy(&p->saddr4_be, nv->addr + 12, 4); /* flow keys (bh_key4) read these */
		} else {
			bh_pkt_set_daddr(p, nv->addr);
		}
	}
	if ((f->xflags & BH_FLOWX_SNAT) && (fflags & BH_FLOWF_REPLY)) {
		/* A reply to a client whose source this gateway translated: back to the client's own. */
		struct bh_snat_val *o = bh_snat_orig(p, seg);
		if (!o)
			return bh_record(BH_R_TRANSIT_SNAT_LOST, TC_ACT_SHOT, skb->len);
		__u16 cport = o->port_be;
		if (bh_tc_nat(skb, p, 1, o->addr) || bh_tc_port(skb, p, 1, cport))
			return bh_record(BH_R_MALFORMED_L4, TC_ACT_SHOT, skb->len);
		bh_pkt_set_daddr(p, o->addr);
		p->dport_be = cport;
	}
	if (fflags & BH_FLOWF_TRANSIT) {
		__u32 hop_code = 0;
		if (p->proto == IPPROTO_TCP && (fflags & BH_FLOWF_REPLY)) {
			/* The server's gateway: its server RTT on the SYN-ACK, its time since the request on answers. */
			if ((p->tcp_flags & BH_TCP_SYN) && f->t_b) {
				hop_code = bh_hop_code(f->t_b);
			} else if (hs && (f->xflags & BH_FLOWX_HOP)) {
				bh_sni_key_of(p, vni, 1, &hs->k);
				hop_code = bh_hop_server(skb, p, &hs->k, f, 0, 0, 0);
			}
		} else if (hs) {
			struct bh_flow *rep = (f->xflags & BH_FLOWX_HOP_CLASSIFY) ? bh_flow_get(p, vni, 1) : NULL;
			bh_hop_client(skb, p, &hs->k, f, rep, 1);
		}
		return bh_tc_encap(skb, slot, vni, app, (fflags & BH_FLOWF_NAT) && !(fflags & BH_FLOWF_REPLY), hop_code);
	}
	/* Translated, to an app of this gateway: a reply leaves by its client's segment. */
	return bh_tc_route(skb, p, (fflags & BH_FLOWF_REPLY) ? vni : 0);
}

static __always_inline int bh_tc_fabric(struct __sk_buff *skb, __u32 slot)
{
	struct bh_pkt p;

	if (bh_tc_parse(skb, &p) != BH_PARSE_OK || p.frag != BH_FRAG_NONE || p.icmp_error)
		return TC_ACT_OK; /* judged by XDP as it is; nothing of the fabric's */
	__u32 seg = bh_segment_of(slot, skb->ifindex);
	struct bh_flow *f = bh_flow_get(&p, seg, 0);
	if (!f || !(f->flags & (BH_FLOWF_NAT | BH_FLOWF_TRANSIT)))
		return TC_ACT_OK;
	return bh_tc_fabric_flow(skb, slot, seg, &p, f);
}

#ifdef BH_NO_XDP_META
#define BH_PACKET_OTHERHOST 3 /* linux/if_packet.h */

/*
 * A kernel without XDP metadata: bulkhead_tc learns what bulkhead_xdp decided
 * from the flow entry XDP judged the packet by. A steered flow (L7) gets the
 * mark that sends it to the verifier; a flow through the fabric goes to
 * bh_tc_fabric_flow; another allowed packet XDP gave the stack gets the
 * segment mark bh_fwd_handoff would have given it. Only what XDP passes
 * comes here (the fast path redirects the rest): the cost, one flow lookup
 * (and for those, one FIB lookup) per such packet.
 */
static __always_inline int bh_tc_nometa(struct __sk_buff *skb, __u32 slot, const struct bh_slot_cfg *cfg,
					__u32 ctl_flags)
{
	struct bh_pkt p;

	/* A first fragment of a steered flow is steered (its later ones XDP drops: punt_no_handler). */
	if (bh_tc_parse(skb, &p) != BH_PARSE_OK || p.frag == BH_FRAG_LATER || p.icmp_error)
		return TC_ACT_OK;
	__u32 seg = bh_segment_of(slot, skb->ifindex);
	if (!seg)
		return TC_ACT_OK;
	struct bh_flow *f = bh_flow_get(&p, seg, 0);
	if (!f)
		return TC_ACT_OK;
	if (f->reason == BH_R_L7_STEER || f->reason == BH_R_L7_UPSTREAM) {
		skb->mark = (skb->mark & BH_MARK_KEEP) | BH_MARK_L7 | (seg & 0xffff);
		return TC_ACT_OK;
	}
	if (p.frag != BH_FRAG_NONE)
		return TC_ACT_OK; /* conntrack's defragmentation sees every fragment: unmarked */
	__u32 out_seg = (f->flags & BH_FLOWF_REPLY) ? f->peer_segment : 0;
	if ((cfg->flags & BH_SLOTF_FABRIC) && (f->flags & (BH_FLOWF_NAT | BH_FLOWF_TRANSIT))) {
		/* bh_fab_handoff's mark: what the stack routes it by if TC leaves it there. */
		skb->mark = (skb->mark & BH_MARK_KEEP) | BH_MARK_SEG | (out_seg & 0xffff);
		return bh_tc_fabric_flow(skb, slot, seg, &p, f);
	}
	/*
	 * What the fast path gave the stack (bulkhead_forward: no neighbour yet,
	 * TTL 1, IP options, ...) gets the mark bh_fwd_handoff would have put on
	 * it, so it skips conntrack as it does with metadata; except a packet for
	 * the gateway itself (its replies are routed back by ct mark).
	 */
	if (f->reason == BH_R_SNI_PENDING || (ctl_flags & BH_CTL_NO_FASTPATH) || bh_reason_xdp(f->reason) != XDP_PASS)
		return TC_ACT_OK;
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = p.proto;
	fib.sport = p.sport_be;
	fib.dport = p.dport_be;
	if (p.family == 4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, p.saddr + 12, 4);
		__builtin_memcpy(&fib.ipv4_dst, p.daddr + 12, 4);
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, p.saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, p.daddr, 16);
	}
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) == BPF_FIB_LKUP_RET_NOT_FWDED)
		return TC_ACT_OK;
	skb->mark = (skb->mark & BH_MARK_KEEP) | BH_MARK_SEG | (out_seg & 0xffff);
	return TC_ACT_OK;
}

/*
 * A reject answer bulkhead_xdp passed up (bh_reject_send): addressed to the
 * client's MAC (PACKET_OTHERHOST, which the stack would drop), while this
 * CPU's count of answers on their way, from the last 10 ms, is not spent.
 */
static __always_inline int bh_tc_take_answer(struct __sk_buff *skb)
{
	__u32 zero = 0;

	if (skb->pkt_type != BH_PACKET_OTHERHOST)
		return 0;
	struct bh_send_back *pending = send_back_pending.lookup(&zero);
	if (!pending || !pending->count)
		return 0;
	if (bpf_ktime_get_ns() - pending->ts_ns > BH_SEND_BACK_NS) {
		pending->count = 0; /* lost on the way: this frame is not one of them */
		return 0;
	}
	pending->count--;
	return 1;
}
#endif

/*
 * TC ingress on every segment interface: send a reject answer XDP built
 * (bh_reject_send) back out of this interface, or copy the steering mark
 * XDP left in the metadata (bh_steer) into skb->mark, before netfilter
 * sees the packet; then the fabric's part (bh_tc_fabric) of a packet XDP
 * handed over for it, or of one it passed without metadata while the
 * policy has fabric entries (a flow decided by server name passes its
 * handshake plainly). Other packets pass untouched.
 */
int bulkhead_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	struct bh_meta *m = (void *)(long)skb->data_meta;

	if ((void *)(m + 1) > data || m->magic != BH_META_MAGIC) {
		__u32 zero = 0;
#ifdef BH_NO_XDP_META
		if (bh_tc_take_answer(skb))
			goto send_back;
#endif
		struct bh_ctl *gc = ctl.lookup(&zero);
		if (!gc)
			return TC_ACT_OK;
		__u32 slot = gc->active_slot & 1;
		struct bh_slot_cfg *cfg = slot_cfg.lookup(&slot);
#ifdef BH_NO_XDP_META
		if (!cfg)
			return TC_ACT_OK;
		return bh_tc_nometa(skb, slot, cfg, gc->flags);
#else
		if (!cfg || !(cfg->flags & BH_SLOTF_FABRIC))
			return TC_ACT_OK;
		return bh_tc_fabric(skb, slot);
#endif
	}
	if (m->flags & BH_METAF_SEND_BACK) {
		/*
		 * Metadata can travel with the skb to the peer: cleared, so a
		 * bulkhead_tc there does not take the answer for one of its own.
		 */
		m->magic = 0;
#ifdef BH_NO_XDP_META
send_back:
#endif
		/* Egress of the ingress device: dev_queue_xmit, which reaches any veth peer. */
		if (bpf_redirect(skb->ifindex, 0) != TC_ACT_REDIRECT)
			return TC_ACT_SHOT; /* an answer addressed to the client is never the gateway's to read */
		bh_event(BH_EV_REJECT_VIA_TC);
		return TC_ACT_REDIRECT;
	}
	skb->mark = (skb->mark & BH_MARK_KEEP) | m->mark;
	if (m->flags & BH_METAF_FABRIC)
		return bh_tc_fabric(skb, !!(m->flags & BH_METAF_SLOT1));
	return TC_ACT_OK;
}

/*
 * Source translation at the far gateway (a segment with transit_snat): a
 * flow from another gateway enters the server's segment from the segment's
 * own address (fab_N BH_FAB_SNAT4/6), so a server whose network holds the
 * client's (overlapping) address still answers through this gateway. Its
 * source port is claimed in fab_snat with BPF_NOEXIST, which makes the
 * translated tuple (server, server port, port) unique in the segment: the
 * client's own port if it is free there, else random ones from 32768-60999
 * (an ICMP echo, or SCTP whose checksum covers the port, keeps its own).
 * `keep`: a port the flow has already (re-judged under a new policy).
 * Returns 0 with *port set, or -1 if no port was free (or the table is full).
 */
#define BH_SNAT_PROBES 8
#define BH_SNAT_PORT_LO 32768
#define BH_SNAT_PORT_SPAN 28232
static __always_inline int bh_snat_claim(const struct bh_pkt *p, __u32 seg, int keep, __u16 *port)
{
	struct bh_snat_key k = {};
	struct bh_snat_val o = {};
	int probes = (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) ? BH_SNAT_PROBES : 1;

	__builtin_memcpy(k.saddr, p->daddr, 16);
	k.sport_be = p->dport_be;
	k.proto = p->proto;
	k.family = p->family;
	k.segment_id = seg;
	__builtin_memcpy(o.addr, p->saddr, 16);
	o.port_be = p->sport_be;
	if (keep) {
		k.dport_be = *port;
		return fab_snat.update(&k, &o) ? -1 : 0;
	}
	for (int i = 0; i < BH_SNAT_PROBES; i++) {
		if (i >= probes)
			break;
		__u16 cand = p->sport_be;
		if (i)
			cand = bpf_htons(BH_SNAT_PORT_LO + bpf_get_prandom_u32() % BH_SNAT_PORT_SPAN);
		k.dport_be = cand;
		if (!fab_snat.insert(&k, &o)) {
			*port = cand;
			return 0;
		}
	}
	return -1;
}

/* The reply entry of a source-translated flow: keyed on (server -> `snat`:`port`) in the server's segment. */
static __always_inline int bh_flow_put_snat(const struct bh_pkt *p, __u32 seg, const __u8 *snat, __u16 port,
					    struct bh_flow *v)
{
	int rc;

	if (p->family == 4) {
		struct bh_flow4_key k = {};
		k.saddr_be = p->daddr4_be;
		__builtin_memcpy(&k.daddr_be, snat + 12, 4);
		k.sport_be = p->dport_be;
		k.dport_be = port;
		k.proto = p->proto;
		k.segment_id = seg;
		rc = flows4.update(&k, v);
	} else {
		struct bh_flow6_key k = {};
		__builtin_memcpy(k.saddr, p->daddr, 16);
		__builtin_memcpy(k.daddr, snat, 16);
		k.sport_be = p->dport_be;
		k.dport_be = port;
		k.proto = p->proto;
		k.segment_id = seg;
		rc = flows6.update(&k, v);
	}
	if (rc)
		bh_event(BH_EV_FLOW_INSERT_FAILED);
	return rc;
}

/* A packet from the transit refused: counted by why, dropped. */
static __always_inline int bh_transit_drop(__u8 reason, __u64 len)
{
	return bh_record(reason, TC_ACT_SHOT, len);
}

/*
 * TC ingress on the transit device (VXLAN, external mode, GBP): packets
 * other gateways sent. The gateway enforces again by the identity the
 * packet carries, never by its inner source address (which may be anyone's
 * in an overlapping CIDR):
 *
 *   outer source  = a gateway's transit address   (else transit_unknown_peer)
 *   GBP id        = an app behind that gateway     (else transit_bad_identity)
 *   VNI           = a segment of this gateway, the destination an app in it
 *                                                  (else transit_bad_segment)
 *   (GBP app, destination app, proto, port) judged by the policy, as XDP would.
 *
 * A reply to a flow this gateway's client opened arrives the same way, and
 * must come from the app and segment the flow went to. What passes is
 * delivered into the VNI's segment by its routing table (BH_MARK_SEG).
 */
int bulkhead_transit_in(struct __sk_buff *skb)
{
	__u64 len = skb->len;
	__u32 zero = 0;
	struct bh_ctl *gc = ctl.lookup(&zero);
	if (!gc)
		return bh_transit_drop(BH_R_NO_POLICY, len);
	__u32 slot = gc->active_slot & 1;
	struct bh_slot_cfg *cfg = slot_cfg.lookup(&slot);
	if (!cfg || !cfg->generation)
		return bh_transit_drop(BH_R_NO_POLICY, len);
	struct bh_fab_val *me = bh_fab(slot, BH_FAB_SELF, 0, NULL);
	if (!me)
		return bh_transit_drop(BH_R_TRANSIT_NO_TUNNEL, len);
	__u32 me_gw = me->a;
	struct bh_fab_val *mine = bh_fab(slot, BH_FAB_GW, me_gw, NULL);

	/* Who sent it: the outer source address. */
	struct bpf_tunnel_key key = {};
	__u8 raddr[16] = {};
	if (mine && mine->a == 6) {
		if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), BPF_F_TUNINFO_IPV6))
			return bh_transit_drop(BH_R_TRANSIT_UNKNOWN_PEER, len);
		__builtin_memcpy(raddr, key.remote_ipv6, 16);
	} else {
		if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0))
			return bh_transit_drop(BH_R_TRANSIT_UNKNOWN_PEER, len);
		bh_v4mapped(raddr, bpf_htonl(key.remote_ipv4));
	}
	struct bh_fab_val *peer = bh_fab(slot, BH_FAB_PEER, 0, raddr);
	if (!peer || peer->a == me_gw)
		return bh_transit_drop(BH_R_TRANSIT_UNKNOWN_PEER, len);
	__u32 peer_gw = peer->a;

	/* What it is: the app id it carries, which must be behind the gateway that sent it. */
	struct bh_vxlan_md md = {};
	if (bpf_skb_get_tunnel_opt(skb, &md, sizeof(md)) < (int)sizeof(md))
		return bh_transit_drop(BH_R_TRANSIT_BAD_IDENTITY, len);
	__u32 app = md.gbp & BH_GBP_ID_MASK;
	struct bh_fab_val *ai = app ? bh_fab(slot, BH_FAB_APP, app, NULL) : NULL;
	if (!ai || ai->b != peer_gw)
		return bh_transit_drop(BH_R_TRANSIT_BAD_IDENTITY, len);
	__u32 app_seg = ai->a;

	/* Where it goes: a segment of this gateway. */
	__u32 vni = key.tunnel_id & BH_VNI_SEG_MASK;
	__u8 via_vip = (key.tunnel_id & BH_VNI_VIA_VIP) ? BH_FLOWF_VIA_VIP : 0;
	__u8 far_code = (key.tunnel_id & BH_VNI_HOP_MASK) >> BH_VNI_HOP_SHIFT; /* the sender's part of a request */
	int vni_ok = vni && !(key.tunnel_id & ~(BH_VNI_SEG_MASK | BH_VNI_VIA_VIP | BH_VNI_HOP_MASK));
	struct bh_fab_val *sv = vni_ok ? bh_fab(slot, BH_FAB_SEG, vni, NULL) : NULL;
	if (!sv || sv->a != me_gw)
		return bh_transit_drop(BH_R_TRANSIT_BAD_SEGMENT, len);

	struct bh_pkt p;
	int rc = bh_tc_parse(skb, &p);
	if (rc == BH_PARSE_NON_IP)
		return bh_transit_drop(BH_R_TRANSIT_BAD_SEGMENT, len); /* only IP is sent through the transit */
	if (rc)
		return bh_transit_drop(rc, len);
	if (p.frag != BH_FRAG_NONE)
		return bh_transit_drop(BH_R_FRAG_NO_FLOW, len); /* the sender sends no fragments (bulkhead_xdp) */
	if (p.icmp_error)
		return bh_transit_drop(BH_R_ICMP_ERROR_NO_FLOW, len);

	__u64 now = bpf_ktime_get_coarse_ns();
	__u8 reason = BH_R_ALLOW_REPLY;
	__u8 fflags = BH_FLOWF_TRANSIT;
	int judge = 1, rejudge = 0;
	int snat = 0;          /* the client's packets leave with the segment's address and snat_port */
	__u16 snat_port = 0;
	struct bh_fab_val *sa = NULL; /* that address (fab_N BH_FAB_SNAT4/6), once looked up */
	struct bh_flow *f = bh_flow_get(&p, app_seg, 0);
	if (f && (f->flags & BH_FLOWF_REPLY)) {
		/* A reply to our client: it comes from the app, and into the segment, its flow went to. */
		if (f->dst_app != app || f->peer_segment != vni || !(f->flags & BH_FLOWF_TRANSIT))
			return bh_transit_drop(BH_R_TRANSIT_BAD_IDENTITY, len);
		/* Of an older policy: re-judged as the client's flow under the one in force (as bulkhead_xdp does). */
		rejudge = f->generation != cfg->generation;
		judge = rejudge;
	} else if (f && f->generation == cfg->generation) {
		/* A flow from the other gateway's app, judged already. */
		if (f->src_app != app || f->peer_segment != vni)
			return bh_transit_drop(BH_R_TRANSIT_BAD_IDENTITY, len);
		reason = f->reason;
		if (bh_reason_xdp(reason) != XDP_PASS)
			return bh_transit_drop(reason, len);
		judge = 0;
		snat = f->xflags & BH_FLOWX_SNAT;
		snat_port = f->snat_port_be;
	}
	if (!judge) {
		fflags = f->flags;
		f->last_seen_ns = now;
		f->packets++;
		f->bytes += len;
	} else {
		struct bh_flow *v = flow_scratch.lookup(&zero);
		if (!v)
			return bh_transit_drop(BH_R_NO_POLICY, len);
		__builtin_memset(v, 0, sizeof(*v));
		__u32 src_app = app;
		__u16 dport = p.policy_dport_be;
		struct bh_ident *di;
		if (rejudge) {
			/* Our client, by its address in its segment (the VNI); the server by its address. */
			struct bh_src_key sk = {};
			struct bh_ident *si;
			sk.prefixlen = BH_SRC_PLEN_HOST;
			sk.segment_id = vni;
			__builtin_memcpy(sk.addr, p.daddr, 16);
			si = bh_sel_src_host(slot, &sk);
			if (!si && (cfg->flags & BH_SLOTF_SRC_LPM))
				si = bh_sel_src_ident(slot, &sk);
			src_app = si ? si->app_id : 0;
			di = bh_dst_ident(slot, cfg, p.saddr);
			dport = bh_has_ports(p.proto) ? p.sport_be : 0;
			if (!di || di->app_id != app)
				return bh_transit_drop(BH_R_TRANSIT_BAD_IDENTITY, len);
		} else {
			/* New: the destination must be an app of the VNI's segment, and the pair allowed. */
			di = bh_dst_ident(slot, cfg, p.daddr);
			if (!di || di->segment_id != vni)
				return bh_transit_drop(BH_R_TRANSIT_BAD_SEGMENT, len);
		}
		bh_judge(slot, cfg, src_app, di, p.proto, dport, v);
		/*
		 * A flow decided by server name had its ClientHello judged by the
		 * client's gateway (bulkhead_sni there); here its pair is. HTTP rules
		 * stay at one gateway (the policy refuses them across): a steer here
		 * has no verifier to go to.
		 */
		if (v->reason == BH_R_SNI_PENDING) {
			v->reason = BH_R_ALLOW_RULE;
			v->action = BH_ACT_ALLOW;
		} else if (v->reason == BH_R_L7_STEER) {
			v->reason = BH_R_PUNT_NO_HANDLER;
		}
		if (rejudge) {
			if (bh_reason_xdp(v->reason) != XDP_PASS)
				return bh_transit_drop(v->reason, len);
			fflags = f->flags;
			f->generation = cfg->generation;
			f->rule_id = v->rule_id;
			f->src_app = v->src_app;
			f->last_seen_ns = now;
			f->packets++;
			f->bytes += len;
		} else {
			v->last_seen_ns = now;
			v->packets = 1;
			v->bytes = len;
			v->peer_segment = vni;
			v->flags |= BH_FLOWF_TRANSIT | via_vip;
			reason = v->reason;
			/* A reject is a drop here: the client is behind the other gateway. */
			int pass = bh_reason_xdp(reason) == XDP_PASS;
			sa = bh_fab(slot, p.family == 4 ? BH_FAB_SNAT4 : BH_FAB_SNAT6, vni, NULL);
			if (pass && sa) {
				/* A flow re-judged under a new policy keeps the port it has. */
				int keep = f && (f->xflags & BH_FLOWX_SNAT);
				snat_port = keep ? f->snat_port_be : 0;
				if (bh_snat_claim(&p, vni, keep, &snat_port)) {
					reason = BH_R_TRANSIT_SNAT_FULL;
					pass = 0;
				} else {
					snat = 1;
					v->xflags = BH_FLOWX_SNAT;
					v->snat_port_be = snat_port;
				}
			}
#ifndef BH_NO_TELEMETRY
			bh_pair_count(v, reason);
			bh_fe_emit(skb, BH_FE_NEW, &p, 0, app_seg, v, NULL, reason, 0, NULL);
#endif
			if (!pass)
				return bh_transit_drop(reason, len);
			/* Request timing: a TCP flow from its SYN (bh_hop_*): the server RTT on the reply entry. */
			int hs = p.proto == IPPROTO_TCP && (p.tcp_flags & (BH_TCP_SYN | BH_TCP_ACK)) == BH_TCP_SYN;
			if (hs)
				v->xflags |= BH_FLOWX_HOP_CLASSIFY;
			bh_flow_put(&p, app_seg, 0, v);
			if (hs) {
				v->xflags &= ~BH_FLOWX_HOP_CLASSIFY;
				v->flags |= BH_FLOWF_T_HS;
				v->t_a = bpf_ktime_get_ns() >> BH_LAT_SHIFT;
			}
			v->flags |= BH_FLOWF_REPLY;
			v->reason = BH_R_ALLOW_REPLY;
			v->action = BH_ACT_ALLOW;
			v->peer_segment = app_seg;
			v->packets = 0;
			v->bytes = 0;
			if (snat)
				bh_flow_put_snat(&p, vni, sa->addr, snat_port, v);
			else
				bh_flow_put(&p, vni, 1, v);
			bh_event(BH_EV_FLOW_NEW);
		}
	}
	/* Request timing (bh_hop_*) of an established TCP flow: this entry, and the forward key. */
	struct bh_flow *tf = (judge && !rejudge) || p.proto != IPPROTO_TCP ? NULL : f;
	struct bh_hop_scratch *hs = NULL;
	if (tf && bh_hop_wants(tf, &p))
		hs = hop_scratch.lookup(&zero);
	if (hs && !(tf->flags & BH_FLOWF_REPLY))
		bh_sni_key_of(&p, app_seg, 0, &hs->k); /* before the source translation below */
	/* The client's packets into a segment that translates sources: from the segment's address. */
	if (snat) {
		if (!sa) /* an established flow: its segment's address under the policy in force */
			sa = bh_fab(slot, p.family == 4 ? BH_FAB_SNAT4 : BH_FAB_SNAT6, vni, NULL);
		if (!sa)
			return bh_transit_drop(BH_R_TRANSIT_SNAT_LOST, len);
		if (bh_tc_nat(skb, &p, 0, sa->addr) || bh_tc_port(skb, &p, 0, snat_port))
			return bh_transit_drop(BH_R_MALFORMED_L4, len);
		__builtin_memcpy(p.saddr, sa->addr, 16);
		__builtin_memcpy(&p.saddr4_be, sa->addr + 12, 4);
		p.sport_be = snat_port;
	}
	/* A reply of a translated flow leaves from the service address the client dialed. */
	if ((fflags & BH_FLOWF_NAT) && (fflags & BH_FLOWF_REPLY)) {
		struct bh_fab_val *nv = bh_fab(slot, BH_FAB_REAL, 0, p.saddr);
		if (!nv || bh_tc_nat(skb, &p, 0, nv->addr))
			return bh_transit_drop(BH_R_TRANSIT_BAD_SEGMENT, len);
		__builtin_memcpy(p.saddr, nv->addr, 16);
		__builtin_memcpy(&p.saddr4_be, nv->addr + 12, 4);
	}
	if (tf && (tf->flags & BH_FLOWF_REPLY)) {
		/* The client's gateway: an answer, or the SYN-ACK (server RTT from here, the far one's in the VNI). */
		if ((tf->flags & BH_FLOWF_T_HS) && (p.tcp_flags & (BH_TCP_SYN | BH_TCP_ACK)) == (BH_TCP_SYN | BH_TCP_ACK)) {
			__u32 t = bpf_ktime_get_ns() >> BH_LAT_SHIFT;
			tf->flags &= ~BH_FLOWF_T_HS;
			bh_lat_sample(tf, BH_LAT_SERVER_RTT, t - tf->t_a);
			struct bh_flow *o = bh_flow_get(&p, vni, 1);
			if (o && (o->flags & BH_FLOWF_T_HS)) {
				o->t_b = t; /* the client RTT is measured from here (bh_observe, at the ACK) */
				o->hop_srtt = far_code;
			}
		} else if (hs && (tf->xflags & BH_FLOWX_HOP)) {
			bh_sni_key_of(&p, vni, 1, &hs->k);
			bh_hop_server(skb, &p, &hs->k, tf, 1, far_code, app_seg);
		}
	} else if (tf && hs) {
		/* The server's gateway: a client packet (its reply entry is keyed by the translated tuple). */
		struct bh_flow *rep = (tf->xflags & BH_FLOWX_HOP_CLASSIFY) ? bh_flow_get(&p, vni, 1) : NULL;
		bh_hop_client(skb, &p, &hs->k, tf, rep, 0);
	}
	bh_event(BH_EV_TRANSIT_DECAP);
	bh_record(reason, 0, len);
	/* Into the VNI's segment, by its table; what the FIB can't route goes up the stack, marked. */
	int code = bh_tc_route(skb, &p, vni);
	if (code == TC_ACT_OK) {
		/* The inner frame is addressed to the sender's segment interface: ours now. */
		bpf_skb_change_type(skb, BH_PACKET_HOST);
		skb->mark = (skb->mark & BH_MARK_KEEP) | BH_MARK_SEG | (vni & 0xffff);
	}
	return code;
}

#ifdef BH_BENCH
/* Reference program for benchmarks: the cost of XDP itself. */
int bulkhead_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/*
 * Reference program for benchmarks: the floor of the established path,
 * what any flow-cached verdict needs (parse, the ctl word, the ingress
 * segment, one flow-table hit), with nothing bulkhead does with the entry.
 */
int bulkhead_bench_lookup(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct bh_pkt p;
	__u32 zero = 0;

	bh_pkt_init(&p);
	if (bh_parse(data, data_end, &p) != BH_PARSE_OK)
		return XDP_ABORTED;
	struct bh_ctl *gc = ctl.lookup(&zero);
	if (!gc)
		return XDP_ABORTED;
	__u32 seg = bh_segment_of(gc->active_slot & 1, ctx->ingress_ifindex);
	return bh_flow_get(&p, seg, 0) ? XDP_PASS : XDP_DROP;
}
#endif

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * types.h - every struct shared with userspace.
 *
 * Fixed-width types, explicit padding, byte order in the field name
 * (`_be` = network order). Mirrored field by field in
 * agent/datapath/abi.py; tests/bpf/test_abi_btf.py checks names, sizes and
 * offsets against the compiled object's BTF. Changing a layout changes the map's value
 * size, and the loader refuses to reuse pinned maps of another size.
 */
#ifndef BH_TYPES_H
#define BH_TYPES_H

/* ctl[0]: global control word, written only by the agent. */
struct bh_ctl {
	__u32 active_slot; /* 0 or 1: the policy slot packets are judged by */
	__u32 flags;       /* BH_CTL_* */
};
/* BH_CTL_BYPASS_FLOWS, BH_CTL_SNI_BENCH and BH_CTL_BENCH_NEW_FLOW act only in a -DBH_BENCH build (benchmarks): production ignores them. */
#define BH_CTL_BYPASS_FLOWS 0x1 /* benchmarks: ignore the flow cache (every packet is new) */
#define BH_CTL_L7_READY 0x2     /* a verifier listens: BH_ACT_L7 flows may be steered */
#define BH_CTL_SNI_BENCH 0x4    /* benchmarks: after deciding a ClientHello, put its flow back to pending */
#define BH_CTL_NO_FASTPATH 0x8  /* every allowed packet goes up the stack, through conntrack (no redirect, no notrack mark) */
#define BH_CTL_BENCH_NEW_FLOW 0x10 /* benchmarks: every packet a new 5-tuple (sport and key pad from a per-CPU counter) */

/*
 * XDP metadata in front of a packet XDP passes to bulkhead_tc
 * (bpf_xdp_adjust_meta): a steered packet (mark), or a reject answer TC is
 * to send back out of the interface (BH_METAF_SEND_BACK).
 */
struct bh_meta {
	__u32 magic; /* BH_META_MAGIC */
	__u32 mark;  /* BH_MARK_L7 | client segment id (steered), BH_MARK_SEG | out segment (forwarded); 0 with BH_METAF_SEND_BACK */
	__u32 flags; /* BH_METAF_* */
};
#define BH_METAF_SEND_BACK 0x1 /* a reject answer built in place: TC redirects it out of its ingress interface */
#define BH_METAF_FORWARD 0x2   /* bulkhead_forward's input (bh_fwd_handoff); cleared before TC sees it */
#define BH_METAF_SLOT1 0x4     /* with FORWARD: the packet was judged by policy slot 1 */
#define BH_METAF_FABRIC 0x8    /* a flow through the fabric (BH_FLOWF_NAT / _TRANSIT): bulkhead_tc looks its entry up, translates, encapsulates */
#define BH_METAF_REASON_SHIFT 8 /* with FORWARD: bits 8..15 hold the enum bh_reason to record */

/* send_back_pending (BH_NO_XDP_META builds): reject answers XDP passed up for bulkhead_tc, on this CPU. */
struct bh_send_back {
	__u32 count; /* answers passed up, not yet taken */
	__u32 pad;
	__u64 ts_ns; /* bpf_ktime_get_ns() of the last: older than BH_SEND_BACK_NS, none is still on its way */
};
#define BH_SEND_BACK_NS 10000000ULL

/* slot_cfg[slot]: settings that swap together with the slot's maps. */
struct bh_slot_cfg {
	__u32 generation;     /* 0 = slot never filled: judge nothing by it */
	__u8 default_action;  /* BH_ACT_ALLOW or BH_ACT_DENY */
	__u8 flags;           /* BH_SLOTF_* */
	__u8 unknown_sni;     /* BH_ACT_ALLOW or BH_ACT_DENY */
	__u8 pad;
};
#define BH_SLOTF_AUDIT 0x1   /* settings.mode: audit */
#define BH_SLOTF_SRC_LPM 0x2 /* the slot has source prefixes (not only hosts): consult src_ident */
#define BH_SLOTF_DST_LPM 0x4 /* likewise destinations: consult dst_ident */
#define BH_SLOTF_POL_LPM 0x8 /* the slot has port-range blocks: consult policy */
#define BH_SLOTF_SNI_ANY 0x10 /* the slot has hostname-only apps: unknown destinations may match by name */
#define BH_SLOTF_FABRIC 0x20  /* the slot has fab_N entries: service addresses or transit */

/* seg_map_N: ingress ifindex -> segment. */
struct bh_seg_val {
	__u32 segment_id; /* 1..65535; 0 = interface in no segment */
	__u32 flags;
};

/* if_cfg: ingress ifindex -> how this interface's attachment works, set by the loader at attach. */
struct bh_if_cfg {
	__u8 reject_path; /* enum bh_reject_path */
	__u8 redirect_ok; /* 1: the XDP fast path may bpf_redirect frames out of this interface */
	__u8 pad[2];
};

/*
 * src_host_N (hash, prefixlen = BH_SRC_PLEN_HOST) and src_ident_N (LPM, the
 * shorter prefixes): (segment, source address) -> app. A host entry is the
 * longest possible match, so trying the hash first gives the LPM answer.
 */
struct bh_src_key {
	__u32 prefixlen; /* BH_SEG_BITS + address bits (v4: + BH_V4MAPPED_BITS) */
	__u32 segment_id;
	__u8 addr[16];   /* IPv6, or IPv4-mapped IPv6 */
};

/* dst_host_N (hash) / dst_ident_N (LPM): destination address -> app (destinations are distinct). */
struct bh_dst_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Value of both identity tries. */
struct bh_ident {
	__u32 app_id;     /* 1..; 0 is never stored */
	__u32 segment_id; /* the app's segment: where its packets arrive */
};

/*
 * pol_exact_N (hash) and policy_N (LPM, port-range blocks only):
 * (src app, dst app, proto, dport) -> action. Wildcards are shorter
 * prefixes; the compiler resolves precedence (deny beats allow) before
 * emitting, so the longest match is always the right answer. The datapath
 * tries, longest first: one port (hash), a range block (trie), any port
 * (hash), any protocol (hash); prefixlen is part of the hash key.
 */
struct bh_policy_key {
	__u32 prefixlen;
	__u32 src_app;
	__u32 dst_app;
	__u8 proto;
	__u8 pad;
	__u16 dport_be; /* 0 for protocols without ports */
};

struct bh_policy_val {
	__u8 action; /* enum bh_action */
	__u8 flags;  /* BH_ACTF_AUDIT */
	__u16 pad;
	__u32 rule_id; /* 1..; names live in the agent's bundle */
};

/*
 * fab_N (hash): the fabric's facts of a slot, one key shape for all of them
 * (docs/fabric.md). `kind` (enum bh_fab_kind) says what the key names and
 * what the value holds; unused fields are zero. Addresses are 16 bytes,
 * IPv4-mapped for IPv4, as in every other key.
 */
struct bh_fab_key {
	__u32 kind;
	__u32 id;
	__u8 addr[16];
};

struct bh_fab_val {
	__u32 a;
	__u32 b;
	__u8 addr[16];
};

/*
 * fab_snat (LRU): a flow from another gateway whose source was translated
 * (BH_FLOWX_SNAT), by its reply entry's key as far as it is the
 * translation's (the translated address is the segment's), to the client's
 * own address and port, which its replies get back before they leave.
 */
struct bh_snat_key {
	__u8 saddr[16];     /* the server, as its replies come from it */
	__u16 sport_be;     /* the server's port */
	__u16 dport_be;     /* the translated port (ICMP echo: the identifier) */
	__u8 proto;
	__u8 family;        /* 4 or 6: the segment has one translated address of each */
	__u16 segment_id;   /* the server's segment */
};

struct bh_snat_val {
	__u8 addr[16];      /* the client's address */
	__u16 port_be;      /* and port */
	__u16 pad;
	__u32 pad2;
};

/* addr_scratch (per-CPU, not pinned): one 16-byte address. */
struct bh_addr16 {
	__u8 a[16];
};

/* flows4 (LRU): one entry per direction of an IPv4 flow. */
struct bh_flow4_key {
	__u32 saddr_be;
	__u32 daddr_be;
	__u16 sport_be; /* ICMP echo: identifier */
	__u16 dport_be; /* ICMP echo: identifier */
	__u8 proto;
	__u8 pad;
	__u16 segment_id; /* segment the keyed direction arrives on */
};

/* flows6 (LRU): as flows4 for IPv6. */
struct bh_flow6_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport_be;
	__u16 dport_be;
	__u8 proto;
	__u8 pad;
	__u16 segment_id;
};

/* Value of both flow tables. */
struct bh_flow {
	__u64 last_seen_ns; /* bpf_ktime_get_coarse_ns() */
	__u64 packets;      /* approximate: unsynchronized across CPUs */
	__u64 bytes;
	__u32 generation;   /* policy generation this verdict was computed under */
	__u32 rule_id;      /* 0: no rule, the default decided */
	__u32 src_app;      /* of the forward direction */
	__u32 dst_app;
	__u16 peer_segment; /* forward: where replies arrive; reply: the client's segment */
	__u8 action;        /* enum bh_action, as enforced */
	__u8 flags;         /* BH_ACTF_AUDIT | BH_FLOWF_* */
	__u8 reason;        /* enum bh_reason recorded for this flow's packets */
	__u8 sni_flags;     /* BH_FSNI_*: what the entry knows of the flow's TLS server name */
	__u8 xflags;        /* BH_FLOWX_* */
	__u8 hop_srtt;      /* forward entry at the client's gateway of a transit flow: the far gateway's server RTT (bh_hop_code), 0: not told */
	/*
	 * TCP hop timing (BH_FLOWF_T_*), in units of 1024 ns (ktime >> 10; wraps
	 * after 73 min, differences stay right). Forward entry: t_a = SYN, then
	 * the first request byte; t_b = SYN-ACK (written by the reply side).
	 * Reply entry: t_a = SYN (copied at creation). After the handshake's
	 * samples, the forward entry's t_b holds the client RTT and the reply
	 * entry's the server RTT (request timing, bh_hop_*).
	 */
	__u32 t_a;
	__u32 t_b;
	/*
	 * A flow decided by server name (both entries hold the same): the name's
	 * hashes (sni_hash.h, agent/policy/sni.py), so the flow is re-decided after a
	 * policy swap from its own entry; and, while pending, the client's TCP
	 * sequence number of payload offset 0 (host order), so a ClientHello
	 * whole in the first segment is parsed and decided without a lookup of
	 * sni_state (only ClientHellos that span segments keep a parse there).
	 */
	__u64 sni_h;        /* the name (BH_FSNI_NAME) */
	__u64 sni_w;        /* the rest after its first label, for "*." patterns (BH_FSNI_WILD) */
	__u32 sni_seq;
	/*
	 * BH_FLOWX_SNAT (a flow from another gateway, into a segment with
	 * transit_snat): the source port its packets leave with, in both entries.
	 */
	__u16 snat_port_be;
	__u16 pad2;
};
#define BH_FLOWX_HOP_CLASSIFY 0x02 /* a TCP flow through the transit: its first client payload says whether requests are timed */
#define BH_FLOWX_HOP 0x04          /* its requests are timed per hop (req_hop holds the turn) */
#define BH_FLOWX_SNAT 0x01 /* from the transit into a segment that translates sources (fab_N BH_FAB_SNAT4/6) */

/*
 * req_hop (LRU hash, by the forward key of a flow through the transit whose
 * first client payload was HTTP or a TLS record): the request/response turn
 * in progress, timed in units of 1024 ns on this gateway's own clock.
 */
struct bh_hop {
	__u32 t_req;    /* the turn's first client byte */
	__u32 t_first;  /* its first answer byte (0: none yet) */
	__u32 t_last;   /* its last answer byte so far */
	__u32 crtt;     /* the client's gateway: client RTT from the handshake (0: unknown) */
	__u16 turns;    /* turns begun */
	__u8 kind;      /* BH_HOP_HTTP or BH_HOP_TLS */
	__u8 state;     /* BH_HOPS_* */
	__u8 far_first; /* the client's gateway: the far one's part at t_first, at t_last, its server RTT */
	__u8 far_last;  /*   (bh_hop_code values from the VNI; 0: not told) */
	__u8 far_srtt;
	__u8 pad;
};
struct bh_hop_scratch {
	struct bh_flow6_key k;
	struct bh_hop n;
};
#define BH_HOP_HTTP 1
#define BH_HOP_TLS 2
#define BH_HOPS_REQ 0x01  /* the turn's request seen */
#define BH_HOPS_RESP 0x02 /* answered */
#define BH_HOPS_TOLD 0x04 /* its event sent (HTTP: at the first answer byte) */
#define BH_HOPS_APP 0x08  /* a request worth telling (TLS: application data, not the handshake) */
#define BH_FSNI_NAME 0x01   /* a server name was read: sni_h is its hash */
#define BH_FSNI_WILD 0x02   /* it has a dot: sni_w is the hash of what follows the first one */
#define BH_FSNI_STREAM 0x04 /* this connection's ClientHello spans segments: sni_state holds its parse */
#define BH_FSNI_DONE 0x08   /* the ClientHello was parsed: the entry knows the name, or that there is none */

/* frags (LRU): the verdict of a fragmented datagram, from its first fragment. */
struct bh_frag_key {
	__u8 saddr[16]; /* IPv4-mapped for IPv4 */
	__u8 daddr[16];
	__u32 id;       /* IPv4: 16-bit id; IPv6: fragment header id */
	__u8 proto;
	__u8 pad;
	__u16 segment_id;
};

struct bh_frag {
	__u64 last_seen_ns;
	__u8 xdp_action; /* XDP_PASS or XDP_DROP */
	__u8 reason;     /* counted again for every following fragment */
	__u8 pad[6];
};

/*
 * sni_names_N (hash): (src app, dst app, port, server name) -> verdict.
 * dst_app is BH_APP_ANY for hostname-only apps; dport_be 0 means any port.
 * name_hash is FNV-1a 64 of the lowercased name without a trailing dot;
 * wildcard entries hash "*.rest" (one left-most label). name_check is
 * FNV-1a 32 of the same bytes: a false match needs both to collide.
 */
struct bh_sni_key {
	__u64 name_hash;
	__u32 src_app;
	__u32 dst_app;
	__u16 dport_be;
	__u8 proto;
	__u8 pad[5];
};

struct bh_sni_val {
	__u8 action; /* BH_ACT_ALLOW / DENY / REJECT */
	__u8 flags;  /* BH_ACTF_AUDIT */
	__u16 pad;
	__u32 rule_id;
	__u32 app_id;     /* the hostname app the name matched */
};

/*
 * A ClientHello's parse. One whole in the client's first payload segment is
 * parsed in a per-CPU scratch copy (sni_scratch) and decided at once; one
 * that spans segments keeps its parse in sni_state (LRU, keyed like flows6
 * with IPv4 mapped) until it is complete. Offsets are relative to the first
 * client payload byte (base_seq).
 */
struct bh_sni_state {
	__u64 h64;       /* the name's hash (sni_hash.h): running over whole words, then final */
	__u64 w64;       /* ... of the rest after the name's first dot (BH_SNIF_WILD) */
	__u64 acc;       /* name bytes of the word being filled (streaming parser) */
	__u64 wacc;      /* ... of the rest's word */
	__u32 base_seq;  /* TCP seq of payload offset 0 (host order): the flow entry's sni_seq */
	__u32 next_rel;  /* payload offset the next segment must start at */
	__u32 want;      /* payload offset of the next field to read */
	__u32 body_end;  /* end of the ClientHello */
	__u32 ext_end;   /* end of the extensions block */
	__u32 name_off;  /* payload offset of the name's first byte */
	__u16 name_len;
	__u16 name_got;  /* name bytes hashed so far */
	__u8 step;       /* enum bh_tls_step */
	__u8 got;        /* bytes of the current field collected */
	__u8 flags;      /* BH_SNIF_* */
	__u8 pad1;
	__u8 field[6];   /* the current field's bytes (the longest field is 5) */
	__u8 last;       /* the name's last byte so far */
	__u8 wild_at;    /* index of the name's first dot (when BH_SNIF_WILD) */
	__u32 poff;      /* the segment's payload offset in the packet (bulkhead_sni_stream) */
	/*
	 * A ClientHello may continue in further TLS records. The parser's offsets
	 * are the handshake's as if it were one record; a payload offset is the
	 * parser's plus `shift`, the bytes of the later records' headers so far.
	 */
	__u32 rec_end;   /* parser offset where the current record ends (~0 before the first header) */
	__u32 shift;
	__u8 rh[5];      /* the next record's header, collected (BH_SNIF_REC_NEXT) */
	__u8 rh_got;
	__u8 pad[6];
	__u8 name[BH_SNI_LOG_LEN]; /* first bytes of the name, lowercased (not NUL-terminated if full) */
};
#define BH_SNIF_HAVE_NAME 0x01
#define BH_SNIF_WILD 0x02       /* a first dot was seen: w64 hashes what follows it */
#define BH_SNIF_STREAM 0x04     /* not whole in its first segment: the streaming parser reads it */
#define BH_SNIF_DONE 0x08
#define BH_SNIF_SEEN_SNI 0x10 /* a server_name extension was met (a second one is malformed) */
#define BH_SNIF_REC_NEXT 0x20 /* the current record is used up: the next one's header comes first */
#define BH_SNIF_TAIL 0x40     /* every extension walked; the ClientHello ends in a later record, not read yet */

/*
 * flow_events (ring buffer): one record per flow event (enum bh_flow_ev).
 * The tuple is always the forward (client -> server) direction.
 */
struct bh_flow_event {
	__u64 ts_ns;      /* the packet's bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC base, jiffy resolution) */
	__u64 packets;    /* forward direction so far */
	__u64 bytes;
	__u64 r_packets;  /* reply direction so far (end events) */
	__u64 r_bytes;
	__u8 saddr[16];   /* client; IPv4-mapped for IPv4 */
	__u8 daddr[16];   /* server */
	__u16 sport_be;
	__u16 dport_be;
	__u32 src_app;
	__u32 dst_app;
	__u32 rule_id;
	__u32 generation;
	__u16 segment_id;   /* the client's segment */
	__u16 peer_segment; /* the server's segment, 0 if unknown */
	__u8 kind;        /* enum bh_flow_ev */
	__u8 family;      /* 4 or 6 */
	__u8 proto;
	__u8 reason;      /* enum bh_reason: the flow's verdict now */
	__u8 prev_reason; /* before a change (BH_FE_CHANGE); 0 otherwise */
	__u8 flags;       /* BH_ACTF_AUDIT | BH_FLOWF_REPLY: the packet that caused it was a reply */
	__u8 tcp_flags;   /* of that packet */
	__u8 sni_len;     /* the name's length (over BH_SNI_LOG_LEN: sni[] holds its start); 0: no name */
	__u8 sni[BH_SNI_LOG_LEN]; /* server name asked for, lowercased */
	__u16 snat_port_be; /* BH_FLOWX_SNAT: the port the client's packets leave this gateway with */
	__u8 xflags;        /* BH_FLOWX_* of the flow */
	__u8 pad[5];
};

/* lat_hist (per-CPU hash): one bucket of one hop-latency histogram. */
struct bh_lat_key {
	__u32 src_app;
	__u32 dst_app;
	__u8 kind;   /* enum bh_lat */
	__u8 bucket; /* log2 of the latency in units of 1024 ns, capped at BH_LAT_BUCKETS - 1 */
	__u16 pad;
};

struct bh_lat_val {
	__u64 count;
	__u64 sum_units; /* sum of the latencies in units of 1024 ns */
};

/* pair_flows (per-CPU hash): flows judged, by (src app, dst app, rule, reason). */
struct bh_pair_key {
	__u32 src_app;
	__u32 dst_app;
	__u32 rule_id;
	__u8 reason;
	__u8 pad[3];
};

/* stats (per-CPU array, BH_REASON_MAX): indexed by enum bh_reason. */
struct bh_counter {
	__u64 packets;
	__u64 bytes;
};

#ifdef __BPF__
/* Catch layout drift at compile time; the Python mirror checks the same. */
_Static_assert(sizeof(struct bh_ctl) == 8, "bh_ctl");
_Static_assert(sizeof(struct bh_meta) == 12, "bh_meta"); /* XDP metadata: a multiple of 4, at most 32 on 6.1 */
_Static_assert(sizeof(struct bh_if_cfg) == 4, "bh_if_cfg");
_Static_assert(sizeof(struct bh_send_back) == 16, "bh_send_back");
_Static_assert(sizeof(struct bh_hop) == 24, "bh_hop");
_Static_assert(sizeof(struct bh_hop_scratch) == 64, "bh_hop_scratch");
_Static_assert(sizeof(struct bh_slot_cfg) == 8, "bh_slot_cfg");
_Static_assert(sizeof(struct bh_src_key) == 24, "bh_src_key");
_Static_assert(sizeof(struct bh_dst_key) == 20, "bh_dst_key");
_Static_assert(sizeof(struct bh_policy_key) == 16, "bh_policy_key");
_Static_assert(sizeof(struct bh_policy_val) == 8, "bh_policy_val");
_Static_assert(sizeof(struct bh_flow4_key) == 16, "bh_flow4_key");
_Static_assert(sizeof(struct bh_flow6_key) == 40, "bh_flow6_key");
_Static_assert(sizeof(struct bh_flow) == 80, "bh_flow");
_Static_assert(sizeof(struct bh_fab_key) == 24, "bh_fab_key");
_Static_assert(sizeof(struct bh_fab_val) == 24, "bh_fab_val");
_Static_assert(sizeof(struct bh_snat_key) == 24, "bh_snat_key");
_Static_assert(sizeof(struct bh_snat_val) == 24, "bh_snat_val");
_Static_assert(sizeof(struct bh_flow_event) == 176, "bh_flow_event");
_Static_assert(sizeof(struct bh_lat_key) == 12, "bh_lat_key");
_Static_assert(sizeof(struct bh_lat_val) == 16, "bh_lat_val");
_Static_assert(sizeof(struct bh_pair_key) == 16, "bh_pair_key");
_Static_assert(sizeof(struct bh_frag_key) == 40, "bh_frag_key");
_Static_assert(sizeof(struct bh_frag) == 16, "bh_frag");
_Static_assert(sizeof(struct bh_sni_key) == 24, "bh_sni_key");
_Static_assert(sizeof(struct bh_sni_val) == 12, "bh_sni_val");
_Static_assert(sizeof(struct bh_sni_state) == 160, "bh_sni_state");
#endif

#endif /* BH_TYPES_H */

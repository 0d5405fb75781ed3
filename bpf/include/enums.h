/* SPDX-License-Identifier: GPL-2.0 */
/*
 * enums.h - verdict actions, reasons and datapath events.
 *
 * Every enum here is APPEND-ONLY and mirrored by agent/datapath/abi.py;
 * tests/bpf/test_abi_btf.py compares the compiled enums with it and fails
 * if the two drift.
 * A retired value stays reserved: never reuse a number, because counters
 * and flow-log consumers key on it.
 */
#ifndef BH_ENUMS_H
#define BH_ENUMS_H

/* What a policy entry (and a cached flow) says to do with a flow. */
enum bh_action {
	BH_ACT_NONE   = 0, /* no entry: settings.default_action decides */
	BH_ACT_ALLOW  = 1,
	BH_ACT_DENY   = 2,
	BH_ACT_REJECT = 3, /* deny + TCP RST / ICMP unreachable to the sender */
	BH_ACT_L7     = 4, /* HTTP rules: only the userspace verifier can decide */
	BH_ACT_SNI    = 5, /* destination named by TLS server name: decide on ClientHello */
};

/* Flags on a policy entry / flow entry (bitmask, u8). */
#define BH_ACTF_AUDIT 0x01 /* deny/reject in shadow mode: pass, count as would-deny */
#define BH_FLOWF_REPLY 0x02 /* flow entry keyed by the reply direction of a flow */
#define BH_FLOWF_T_HS 0x08   /* TCP timing: handshake sample pending (fwd: client RTT at the ACK; reply: server RTT at the SYN-ACK) */
#define BH_FLOWF_T_DATA 0x10 /* TCP timing: first payload pending (fwd: request start; reply: server response time) */
#define BH_FLOWF_ENDED 0x20  /* a FIN or RST was seen and the flow's end event sent */
#define BH_FLOWF_VIA_VIP 0x04 /* from another gateway, for a service address its client dialed there (that gateway translated it) */
#define BH_FLOWF_NAT 0x40     /* a service address: forward packets' destination is translated to the app's real address, replies' source back */
#define BH_FLOWF_TRANSIT 0x80 /* the other end is behind another gateway: this direction leaves (or arrived) through the transit tunnel */
#define BH_FLOWF_OBSERVE (BH_FLOWF_T_HS | BH_FLOWF_T_DATA) /* established path: something to measure */

/*
 * Why a packet got its verdict. Index into the per-CPU `stats` array, so
 * every value must stay below BH_REASON_MAX (consts.h).
 */
enum bh_reason {
	BH_R_UNSPEC             = 0,
	BH_R_PASS_NON_IP        = 1,  /* ARP, LLDP, ...: not ours to judge */
	BH_R_PASS_IPV6_CONTROL  = 2,  /* ICMPv6 ND / MLD: link-local control plane */
	BH_R_ALLOW_RULE         = 3,
	BH_R_ALLOW_DEFAULT      = 4,  /* settings.default_action: allow */
	BH_R_ALLOW_REPLY        = 5,  /* reply direction of an allowed flow */
	BH_R_DENY_RULE          = 6,
	BH_R_DENY_DEFAULT       = 7,
	BH_R_REJECT_RULE        = 8,
	BH_R_AUDIT_RULE         = 9,  /* a rule would deny/reject; audit mode passes it */
	BH_R_AUDIT_DEFAULT      = 10, /* the default would deny; audit mode passes it */
	BH_R_NO_POLICY          = 11, /* no policy loaded yet: fail closed */
	BH_R_NO_SEGMENT         = 12, /* ingress interface belongs to no segment */
	BH_R_MALFORMED_L2       = 13, /* truncated Ethernet / VLAN header */
	BH_R_VLAN_TOO_DEEP      = 14, /* more than BH_VLAN_MAX_DEPTH tags */
	BH_R_MALFORMED_IPV4     = 15, /* bad version/ihl/total length, truncated */
	BH_R_MALFORMED_IPV6     = 16, /* truncated header or extension header */
	BH_R_IPV6_EXT_CHAIN     = 17, /* more than BH_IPV6_EXT_MAX extension headers */
	BH_R_MALFORMED_L4       = 18, /* truncated TCP/UDP/ICMP header, bad doff */
	BH_R_FRAG_NO_FLOW       = 19, /* non-first fragment whose first fragment we never judged */
	BH_R_PUNT_NO_HANDLER    = 20, /* verdict needs SNI/L7 and no handler is available */
	BH_R_FLOW_COLLISION     = 21, /* same 5-tuple already live from another segment */
	BH_R_ICMP_ERROR_RELATED = 22, /* ICMP error about a flow we allowed */
	BH_R_ICMP_ERROR_NO_FLOW = 23, /* ICMP error about no flow we allowed */
	BH_R_REJECT_FAILED      = 24, /* reject wanted, reply could not be built: dropped */
	BH_R_SNI_PENDING        = 25, /* flow waits for its ClientHello: handshake/ACKs pass */
	BH_R_SNI_HOLD           = 26, /* server payload before the server-name verdict: dropped */
	BH_R_SNI_UNKNOWN        = 27, /* no server name (no SNI, malformed, not TLS): unknown_sni deny */
	BH_R_SNI_UNKNOWN_ALLOW  = 28, /* no server name, passed by settings.unknown_sni: allow */
	BH_R_SNI_OUT_OF_ORDER   = 29, /* ClientHello segment not the next expected: dropped, resent */
	BH_R_L7_STEER           = 30, /* L7 flow: passed with a mark that steers it to the verifier */
	BH_R_L7_UPSTREAM        = 31, /* reply to a verifier's upstream connection: steered to its socket */
	BH_R_L7_NO_META         = 32, /* L7 flow, but the driver can't carry the steering mark: dropped */
	BH_R_TAIL_CALL_MISSED   = 33, /* a tail call returned (empty tails slot, or the chain of 33 ran out): dropped */
	BH_R_TRANSIT_UNKNOWN_PEER = 34, /* from the transit tunnel, sent by an address that is no gateway's transit address */
	BH_R_TRANSIT_BAD_IDENTITY = 35, /* from the transit: no app id, an unknown one, one not behind the sending gateway, or not its flow's */
	BH_R_TRANSIT_BAD_SEGMENT  = 36, /* from the transit: the VNI is no segment of this gateway, or the destination is not in it */
	BH_R_TRANSIT_NO_TUNNEL    = 37, /* to another gateway, but this one has no transit (device, address, metadata) for it */
	BH_R_SNI_FRONTING         = 38, /* through an app's service address, a ClientHello naming none of that app's names: dropped */
	BH_R_TRANSIT_SNAT_FULL    = 39, /* from the transit, new, into a segment with transit_snat: no free translated port for it (or the table is full) */
	BH_R_TRANSIT_SNAT_LOST    = 40, /* a reply of a source-translated flow whose translation is gone (evicted): it can't be turned back */
};

/* Datapath events (not verdicts): index into the per-CPU `events` array. */
enum bh_event {
	BH_EV_FLOW_NEW           = 0, /* a flow was classified and cached */
	BH_EV_FLOW_RECLASSIFY    = 1, /* cached flow re-judged under a new generation */
	BH_EV_FLOW_INSERT_FAILED = 2, /* flow table update failed: verdict applied, not cached */
	BH_EV_FRAG_INSERT_FAILED = 3, /* fragment table update failed */
	BH_EV_REJECT_TCP_RST     = 4, /* RST sent back */
	BH_EV_REJECT_ICMP        = 5, /* ICMP/ICMPv6 unreachable sent back */
	BH_EV_FRAG_FIRST         = 6, /* first fragment recorded */
	BH_EV_FRAG_FOLLOW        = 7, /* non-first fragment followed its flow's verdict */
	BH_EV_SNI_SEGMENT        = 8, /* a ClientHello segment was parsed */
	BH_EV_SNI_DECIDED        = 9, /* a flow got its server-name verdict */
	BH_EV_SNI_STATE_FAILED   = 10, /* sni_state update failed: the ClientHello segment was dropped (the client resends) */
	BH_EV_RESET_ONWARD       = 11, /* a rejected flow's segment was turned into a RST for the server */
	BH_EV_FLOW_EVENT_LOST    = 12, /* flow_events ring buffer full: a flow event was dropped */
	BH_EV_FLOW_ENTRY_NEW     = 13, /* a flow-table entry was created (forward or reply key) */
	BH_EV_LAT_SAMPLE         = 14, /* a hop-latency sample was recorded */
	BH_EV_LAT_HIST_FULL      = 15, /* lat_hist full: a latency sample was dropped */
	BH_EV_PAIR_FULL          = 16, /* pair_flows full: a flow went uncounted by app pair */
	BH_EV_SNI_STATE_LOST     = 17, /* a multi-segment ClientHello's parse was evicted: flow decided as unknown name */
	BH_EV_REJECT_VIA_TC      = 18, /* bulkhead_tc sent a reject answer back out (if_cfg reject_path tc) */
	BH_EV_OBSERVE_MISSED     = 19, /* the tail call to bulkhead_observe returned: a packet judged unmeasured */
	/* The XDP fast path (bh_forward): an allowed packet forwarded in XDP, or why it went to the stack. */
	BH_EV_FWD_REDIRECT       = 20, /* forwarded by bpf_fib_lookup + bpf_redirect, never reaching the stack */
	BH_EV_FWD_LOCAL          = 21, /* the FIB says not forwarded (a local address, or no route in the table) */
	BH_EV_FWD_NO_NEIGH       = 22, /* next hop's neighbour entry not resolved: the stack resolves it */
	BH_EV_FWD_NO_TARGET      = 23, /* egress can't take XDP frames (no bulkhead interface, a veth peer without XDP) */
	BH_EV_FWD_PACKET         = 24, /* the packet itself: VLAN tag, IPv4 options, fragment, TTL/hop limit <= 1 */
	BH_EV_FWD_FIB_OTHER      = 25, /* FIB: blackhole/unreachable/prohibit, needs fragmenting, forwarding off, error */
	BH_EV_FWD_OTHER_SEGMENT  = 26, /* no per-table lookup (kernel < 6.8) and the main table leaves by another segment */
	BH_EV_FWD_TAIL_MISSED    = 27, /* the tail call to bulkhead_forward returned: passed to the stack, marked */
	BH_EV_FWD_CSUM_PARTIAL   = 28, /* TCP/UDP checksum left to offload (a local sender behind a veth): the stack finishes it */
	BH_EV_TRANSIT_ENCAP      = 29, /* a packet sent to another gateway through the transit tunnel */
	BH_EV_TRANSIT_DECAP      = 30, /* a packet from another gateway accepted from the transit tunnel */
	BH_EV_VIP_NAT            = 31, /* a new flow to a service address, translated to its app's real address */
};

/*
 * How a reject answer leaves the interface it was built on (if_cfg,
 * chosen by the loader per interface at attach time).
 */
enum bh_reject_path {
	BH_REJECT_XDP_TX = 0, /* XDP_TX: native XDP on a NIC, and generic XDP (dev_queue_xmit) */
	BH_REJECT_TC     = 1, /* XDP_PASS with BH_METAF_SEND_BACK; bulkhead_tc redirects it out: native XDP on veth & co. */
};

/* What a fab_N key names (types.h struct bh_fab_key), and what its value holds. */
enum bh_fab_kind {
	BH_FAB_SELF = 1, /* id 0: a = this gateway's id, b = ifindex of the transit device (0: none), addr = this gateway's transit address */
	BH_FAB_VIP  = 2, /* addr = a service address: a = its app, b = the app's segment, addr = the real address it translates to */
	BH_FAB_REAL = 3, /* addr = that real address: a = the app, addr = its service address of the same family */
	BH_FAB_SEG  = 4, /* id = a segment (every one of the policy): a = its gateway's id */
	BH_FAB_APP  = 5, /* id = an app with a segment: a = its segment, b = its gateway's id */
	BH_FAB_PEER = 6, /* addr = a gateway's transit address: a = that gateway's id */
	BH_FAB_GW   = 7, /* id = a gateway's id: addr = its transit address, a = 4 or 6 */
	BH_FAB_SNAT4 = 8, /* id = a segment of this gateway with transit_snat: addr = the IPv4 source flows from other gateways take in it */
	BH_FAB_SNAT6 = 9, /* as BH_FAB_SNAT4, the IPv6 source */
};

/* Kind of a flow_events record. */
enum bh_flow_ev {
	BH_FE_NONE   = 0,
	BH_FE_NEW    = 1, /* a flow was judged for the first time (any verdict) */
	BH_FE_CHANGE = 2, /* its verdict or rule changed: a policy swap, or its server name was decided */
	BH_FE_END    = 3, /* its first FIN or RST */
	BH_FE_HOP    = 4, /* one request of a flow between two gateways, answered: packets = client RTT, bytes = response
			   * time here, r_packets = the far gateway's part, r_bytes = its server RTT (units of 1024 ns;
			   * 0: unknown); prev_reason = BH_HOP_HTTP or BH_HOP_TLS (inferred from TCP timing) */
};

/* Hop-latency histograms (lat_hist), measured at the gateway for TCP flows. */
enum bh_lat {
	BH_LAT_SERVER_RTT  = 0, /* SYN -> SYN-ACK: gateway -> server -> gateway */
	BH_LAT_CLIENT_RTT  = 1, /* SYN-ACK -> ACK: gateway -> client -> gateway */
	BH_LAT_SERVER_TIME = 2, /* first request byte -> first response byte */
};

/* Slots of the `tails` program array (tail calls keep cold paths off the main stack). */
enum bh_tail {
	BH_TAIL_REJECT = 0, /* bulkhead_reject: build and bounce the reject answer */
	BH_TAIL_SNI    = 1, /* bulkhead_sni: parse a ClientHello segment, decide by server name */
	BH_TAIL_RESET_ONWARD = 2, /* bulkhead_reset_onward: turn the segment into a RST for its receiver */
	BH_TAIL_MAIN = 3,    /* bulkhead_xdp itself: bulkhead_observe hands the packet back to it */
	BH_TAIL_OBSERVE = 4, /* bulkhead_observe: hop timing and end events, then back to bulkhead_xdp */
	BH_TAIL_SNI_STREAM = 5, /* bulkhead_sni_stream: one step of the streaming ClientHello parser */
	BH_TAIL_FORWARD = 6, /* bulkhead_forward: the fast path for allowed, unsteered packets */
};

#endif /* BH_ENUMS_H */

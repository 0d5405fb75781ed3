/* SPDX-License-Identifier: GPL-2.0 */
/*
 * consts.h - sizes and bounds. Map sizes can be overridden at load time
 * with -D flags built in one place: agent/datapath/loader.py (cflags()).
 */
#ifndef BH_CONSTS_H
#define BH_CONSTS_H

#ifndef BH_MAX_IFINDEX
#define BH_MAX_IFINDEX 65536 /* seg_map is an array indexed by ifindex: ifindex must be below this */
#endif
#ifndef BH_MAX_IDENT
#define BH_MAX_IDENT 262144 /* identity entries per slot and map (hosts and prefixes each) */
#endif
#ifndef BH_MAX_POLICY
#define BH_MAX_POLICY 524288 /* policy entries per slot and map (exact and ranges each) */
#endif
#ifndef BH_MAX_FLOWS
#define BH_MAX_FLOWS 262144 /* LRU flow entries per family (two per flow) */
#endif
#ifndef BH_MAX_SNI
#define BH_MAX_SNI 262144 /* server-name entries per slot */
#endif
#ifndef BH_MAX_SNI_PARSE
#define BH_MAX_SNI_PARSE 65536 /* LRU ClientHellos being parsed across segments (one-segment ones need none) */
#endif
#ifndef BH_MAX_FRAGS
#define BH_MAX_FRAGS 16384 /* LRU in-flight fragmented datagrams */
#endif

#ifndef BH_MAX_LAT
#define BH_MAX_LAT 65536 /* lat_hist buckets (app pairs x kinds x buckets in use) */
#endif
#ifndef BH_MAX_PAIRS
#define BH_MAX_PAIRS 65536 /* pair_flows entries (app pairs x rules x reasons seen) */
#endif
#ifndef BH_EVENT_RING_PAGES
#define BH_EVENT_RING_PAGES 512 /* flow_events ring buffer: 2 MiB with 4 KiB pages (power of two) */
#endif
#define BH_LAT_BUCKETS 28 /* log2 buckets of 1024 ns: the last holds >= 2^27 units (~137 s) */
#define BH_LAT_SHIFT 10   /* timing unit: ktime >> BH_LAT_SHIFT ns */

#define BH_REASON_MAX 64 /* size of the stats array; enum bh_reason < this */
#define BH_EVENT_MAX 32  /* size of the events array; enum bh_event < this */
#define BH_NUM_SLOTS 2   /* policy double buffer */
#define BH_TAIL_MAX 8    /* size of the tails program array */

/*
 * ClientHello parser bounds (tls_parse.h, tls_stream.h). A per-call bound
 * hands the rest to the next bulkhead_sni_stream call (a tail call; a
 * segment that needs more than the chain of 33 allows is tail_call_missed),
 * a one-shot bound to the streaming parser; a name longer than
 * BH_TLS_NAME_MAX is malformed: an unknown name (settings.unknown_sni).
 */
#define BH_TLS_EXTS_PER_CALL 32 /* extension headers walked per bulkhead_sni_stream call */
#define BH_TLS_NAME_PER_CALL 64 /* server-name bytes hashed per bulkhead_sni_stream call */
#define BH_TLS_WHOLE_EXTS 32    /* extensions the one-shot path walks; more: the streaming parser */
#define BH_TLS_WHOLE_NAME 64    /* longest name the one-shot path hashes (<= BH_SNI_LOG_LEN); longer: streaming */
#define BH_TLS_NAME_MAX 255     /* longest server name accepted (RFC 6066 allows 2^16-1; DNS 253) */
#define BH_SNI_LOG_LEN 64       /* bytes of the server name kept for flow logs; a longer one is cut (sni_len tells) */
/*
 * Steering L7 flows to the verifier: XDP leaves a struct bh_meta in the
 * packet's metadata, bulkhead_tc copies its mark into skb->mark, nftables
 * TPROXY and an ip rule on the mark deliver the packet to the verifier.
 * agent/datapath/plumbing.py uses the same values.
 */
#define BH_META_MAGIC 0xb4e7a11d /* "this metadata is bulkhead's" */
#define BH_MARK_L7 0x0c000000    /* | client segment id: steer to the verifier */
#define BH_MARK_KEEP 0x00ff0000  /* skb->mark bits that belong to others: kept */
/*
 * | the segment the packet leaves by (0: by the main table): a packet of a
 * flow bulkhead forwards without steering, passed to the stack. The
 * plumbing skips conntrack for it (notrack) and routes it by the segment's
 * table (its ip rule on this mark), what the ct mark did before.
 */
#define BH_MARK_SEG 0x0b000000
/* Transit VNI: the destination segment in its low 16 bits; this bit: the client dialed the app's service address. */
#define BH_VNI_SEG_MASK 0xffff
#define BH_VNI_VIA_VIP 0x10000
/*
 * Bits 17-23 of a VNI the server's gateway sends: its own part of the
 * request being answered (hop.h: bh_hop_code), so the client's gateway can
 * split the response time without synchronized clocks. 0: nothing told.
 */
#define BH_VNI_HOP_SHIFT 17
#define BH_VNI_HOP_MASK 0xfe0000
#define BH_APP_ANY 0xffffffff /* dst app id of hostname-only apps: any destination address */
/* Header parser bounds (parse.h): one more is dropped under its own reason. */
#define BH_VLAN_MAX_DEPTH 2 /* 802.1Q + 802.1ad (QinQ); more tags: vlan_too_deep */
#define BH_IPV6_EXT_MAX 6   /* IPv6 extension headers walked; more: ipv6_ext_chain */

/*
 * Flow entries idle this long are treated as absent for collision checks
 * (a reply key of a dead flow must not block a new flow forever).
 */
#define BH_FLOW_IDLE_NS 300000000000ULL /* 300 s in nanoseconds */
#define BH_FRAG_IDLE_NS 30000000000ULL  /* 30 s in nanoseconds (RFC 8200 reassembly time: 60 s) */

/*
 * Prefix lengths in the identity tries. IPv4 addresses are stored
 * IPv4-mapped (::ffff:a.b.c.d), so one trie serves both families.
 */
#define BH_SEG_BITS 32
#define BH_V4MAPPED_BITS 96

/*
 * Prefix lengths of policy keys: src(32) dst(32) proto(8) pad(8) port(16).
 * 96 (one port), 72 (any port) and 64 (any protocol) live in the exact-match
 * hash; only port-range blocks (81..95) need the trie.
 */
#define BH_POLICY_PLEN_ANY_PROTO 64
#define BH_POLICY_PLEN_ANY_PORT 72
#define BH_POLICY_PLEN_PORT_BASE 80 /* + number of port bits fixed */
#define BH_POLICY_PLEN_EXACT (BH_POLICY_PLEN_PORT_BASE + 16)
#define BH_SRC_PLEN_HOST (BH_SEG_BITS + 128)
#define BH_DST_PLEN_HOST 128

#endif /* BH_CONSTS_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * parse.h - bounds-checked header parsing into struct bh_pkt.
 *
 * Pure functions of the packet: no map access here (bcc rewrites map
 * accesses only in the main source file, so those live in bulkhead.c).
 * Every helper checks bounds before it reads, validates derived lengths
 * (ihl*4, doff*4, extension header lengths) before using them, and
 * returns 0 or the enum bh_reason the packet must be dropped for.
 */
#ifndef BH_PARSE_H
#define BH_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include <linux/in.h>

#include "consts.h"
#include "enums.h"

#define BH_ETH_P_8021Q 0x8100
#define BH_ETH_P_8021AD 0x88A8

#define BH_IP_MF 0x2000
#define BH_IP_OFFSET 0x1FFF

enum bh_frag_kind {
	BH_FRAG_NONE  = 0,
	BH_FRAG_FIRST = 1, /* offset 0, more fragments follow: carries the L4 header */
	BH_FRAG_LATER = 2, /* offset > 0: no L4 header, follows its datagram's verdict */
};

/*
 * Everything the verdict needs from one packet. bh_pkt_init() zeroes only
 * the scalars: the address arrays at the end are always written before they
 * are read (saddr/daddr by the parser or bh_pkt_addrs16(), inner_* only
 * when icmp_error is set), and zeroing 64 bytes per packet shows in the
 * established-flow cost.
 */
struct bh_pkt {
	__u32 saddr4_be; /* IPv4 only */
	__u32 daddr4_be;
	__u32 frag_id;
	__u32 seq_be; /* TCP */
	__u32 ack_seq_be;
	__u16 sport_be; /* flow-key ports (ICMP echo: identifier in both) */
	__u16 dport_be;
	__u16 policy_dport_be; /* port the policy is looked up with: 0 without ports */
	__u16 l3_off;          /* from data: start of the IP header */
	__u16 l4_off;          /* from data: start of the L4 header */
	__u16 l4_len;          /* bytes from l4_off to the end of the IP datagram */
	__u16 ip_len;          /* whole IP datagram as the header says */
	__u8 family;           /* 4 or 6 */
	__u8 proto;            /* L4 protocol after extension headers */
	__u8 frag;             /* enum bh_frag_kind */
	__u8 vlan_depth;
	__u8 tcp_flags;        /* byte 13 of the TCP header */
	__u8 tcp_doff;         /* in bytes */
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 icmp_error; /* ICMP error: inner_* describe the quoted packet */
	__u8 inner_proto;
	__u16 inner_sport_be;
	__u16 inner_dport_be;
	__u16 bench_tag; /* -DBH_BENCH with BH_CTL_BENCH_NEW_FLOW: goes into the flow key's pad (bh_key4/6) */
	/* written before read, not zeroed: */
	__u8 saddr[16]; /* IPv6, or IPv4-mapped IPv6 */
	__u8 daddr[16];
	__u8 inner_saddr[16];
	__u8 inner_daddr[16];
};

static __always_inline void bh_pkt_init(struct bh_pkt *p)
{
	__builtin_memset(p, 0, __builtin_offsetof(struct bh_pkt, saddr));
}

#define BH_TCP_FIN 0x01
#define BH_TCP_SYN 0x02
#define BH_TCP_RST 0x04
#define BH_TCP_ACK 0x10

/* Return codes of bh_parse beyond the reasons: not IP, pass as is. */
#define BH_PARSE_OK 0
#define BH_PARSE_NON_IP 255

static __always_inline void bh_v4mapped(__u8 *dst, __u32 addr_be)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr_be, 4);
}

/*
 * The 16-byte address forms the identity and fragment keys use. IPv4 packets
 * get them only when needed: the established path keys flows by the 4-byte
 * addresses and never pays for the IPv4-mapped copies.
 */
static __always_inline void bh_pkt_addrs16(struct bh_pkt *p)
{
	if (p->family == 4) {
		bh_v4mapped(p->saddr, p->saddr4_be);
		bh_v4mapped(p->daddr, p->daddr4_be);
	}
}

/*
 * A 16-bit length from the packet in host order, with a range the verifier
 * keeps. Older verifiers (seen on 6.1) forget a value's bounds across a byte
 * swap and then refuse packet-pointer math with it; the mask restores them,
 * and the empty asm stops clang from dropping the mask as redundant.
 */
static __always_inline __u32 bh_len16(__u16 be)
{
	__u32 v = bpf_ntohs(be);
	asm volatile("" : "+r"(v));
	return v & 0xffff;
}

static __always_inline int bh_is_v6_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	       nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH || nh == 135 /* mobility */;
}

/* ICMP echo uses the identifier as both ports, so request and reply key alike. */
static __always_inline int bh_icmp_is_echo(__u8 family, __u8 type)
{
	if (family == 4)
		return type == ICMP_ECHO || type == ICMP_ECHOREPLY;
	return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
}

static __always_inline int bh_icmp_is_error(__u8 family, __u8 type)
{
	if (family == 4)
		return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
		       type == ICMP_PARAMETERPROB || type == ICMP_SOURCE_QUENCH;
	return type >= 1 && type <= 4;
}

/* ND (133-137), MLD (130-132, 143): link-local control the host needs. */
static __always_inline int bh_icmp6_is_control(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

/*
 * ICMP errors quote the offending packet: its IP header and at least 8
 * bytes of L4. Parse that quote so the error follows the quoted flow.
 * The quote is only read, never trusted for lengths beyond the packet.
 */
static __always_inline int bh_parse_icmp_quote(void *pos, void *data_end, struct bh_pkt *p)
{
	__u16 *q;

	if (p->family == 4) {
		struct iphdr *iph = pos;
		if ((void *)(iph + 1) > data_end)
			return BH_R_MALFORMED_L4;
		if (iph->version != 4 || iph->ihl < 5)
			return BH_R_MALFORMED_L4;
		__u32 hl = iph->ihl * 4;
		q = pos + hl;
		p->inner_proto = iph->protocol;
		bh_v4mapped(p->inner_saddr, iph->saddr);
		bh_v4mapped(p->inner_daddr, iph->daddr);
	} else {
		struct ipv6hdr *ip6 = pos;
		if ((void *)(ip6 + 1) > data_end)
			return BH_R_MALFORMED_L4;
		/* Quotes with extension headers are not followed: they match no flow. */
		q = (void *)(ip6 + 1);
		p->inner_proto = ip6->nexthdr;
		__builtin_memcpy(p->inner_saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->inner_daddr, &ip6->daddr, 16);
	}
	/* RFC 792/4443: the quote holds at least 8 bytes of the L4 header. */
	if ((void *)(q + 4) > data_end)
		return BH_R_MALFORMED_L4;
	if (p->inner_proto == IPPROTO_ICMP || p->inner_proto == IPPROTO_ICMPV6) {
		/* quoted echo: keyed by its identifier, like the echo flow itself */
		p->inner_sport_be = q[2];
		p->inner_dport_be = q[2];
	} else {
		p->inner_sport_be = q[0];
		p->inner_dport_be = q[1];
	}
	p->icmp_error = 1;
	return BH_PARSE_OK;
}

static __always_inline int bh_parse_l4(void *data, void *data_end, struct bh_pkt *p)
{
	void *l4 = data + p->l4_off;

	p->policy_dport_be = 0;
	if (p->frag == BH_FRAG_LATER)
		return BH_PARSE_OK; /* no L4 header in this fragment */

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return BH_R_MALFORMED_L4;
		__u32 doff = th->doff * 4;
		if (doff < sizeof(*th) || doff > p->l4_len)
			return BH_R_MALFORMED_L4;
		if (l4 + doff > data_end)
			return BH_R_MALFORMED_L4;
		p->sport_be = th->source;
		p->dport_be = th->dest;
		p->policy_dport_be = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_doff = doff;
		p->seq_be = th->seq;
		p->ack_seq_be = th->ack_seq;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return BH_R_MALFORMED_L4;
		/* First fragments carry the whole datagram's length: only check the minimum. */
		if (bpf_ntohs(uh->len) < sizeof(*uh))
			return BH_R_MALFORMED_L4;
		if (p->frag == BH_FRAG_NONE && bpf_ntohs(uh->len) > p->l4_len)
			return BH_R_MALFORMED_L4;
		p->sport_be = uh->source;
		p->dport_be = uh->dest;
		p->policy_dport_be = uh->dest;
	} else if (p->proto == IPPROTO_SCTP) {
		__u16 *ports = l4;
		if ((void *)(ports + 6) > data_end) /* 12-byte common header */
			return BH_R_MALFORMED_L4;
		p->sport_be = ports[0];
		p->dport_be = ports[1];
		p->policy_dport_be = ports[1];
	} else if ((p->family == 4 && p->proto == IPPROTO_ICMP) ||
		   (p->family == 6 && p->proto == IPPROTO_ICMPV6)) {
		__u8 *ih = l4;
		if ((void *)(ih + 8) > data_end) /* every ICMP message has 8 header bytes */
			return BH_R_MALFORMED_L4;
		p->icmp_type = ih[0];
		p->icmp_code = ih[1];
		if (bh_icmp_is_echo(p->family, ih[0])) {
			__u16 id = *(__u16 *)(ih + 4);
			p->sport_be = id;
			p->dport_be = id;
		} else if (bh_icmp_is_error(p->family, ih[0]) && p->frag == BH_FRAG_NONE) {
			int rc = bh_parse_icmp_quote(ih + 8, data_end, p);
			if (rc)
				return rc;
		}
	}
	/* Other protocols (GRE, ESP, ...): no ports; policy by protocol only. */
	return BH_PARSE_OK;
}

static __always_inline int bh_parse_ipv4(void *data, void *data_end, struct bh_pkt *p)
{
	struct iphdr *iph = data + p->l3_off;

	if ((void *)(iph + 1) > data_end)
		return BH_R_MALFORMED_IPV4;
	if (iph->version != 4)
		return BH_R_MALFORMED_IPV4;
	__u32 hl = iph->ihl * 4;
	if (hl < sizeof(*iph))
		return BH_R_MALFORMED_IPV4;
	__u32 tot = bh_len16(iph->tot_len);
	/* Ethernet may pad a frame past tot_len; a frame shorter than tot_len is truncated. */
	if (tot < hl || (void *)iph + tot > data_end)
		return BH_R_MALFORMED_IPV4;

	p->family = 4;
	p->proto = iph->protocol;
	p->saddr4_be = iph->saddr;
	p->daddr4_be = iph->daddr;
	/* saddr/daddr (16-byte forms) are filled by bh_pkt_addrs16() off the fast path. */
	p->ip_len = tot;
	p->l4_off = p->l3_off + hl;
	p->l4_len = tot - hl;

	__u16 frag_off = bpf_ntohs(iph->frag_off);
	if (frag_off & BH_IP_OFFSET)
		p->frag = BH_FRAG_LATER;
	else if (frag_off & BH_IP_MF)
		p->frag = BH_FRAG_FIRST;
	p->frag_id = bpf_ntohs(iph->id);
	return bh_parse_l4(data, data_end, p);
}

static __always_inline int bh_parse_ipv6(void *data, void *data_end, struct bh_pkt *p)
{
	struct ipv6hdr *ip6 = data + p->l3_off;

	if ((void *)(ip6 + 1) > data_end)
		return BH_R_MALFORMED_IPV6;
	if (ip6->version != 6)
		return BH_R_MALFORMED_IPV6;
	__u32 plen = bh_len16(ip6->payload_len);
	/* payload_len 0 is a jumbogram (hop-by-hop option): not on gateway links. */
	if (plen == 0 || (void *)(ip6 + 1) + plen > data_end)
		return BH_R_MALFORMED_IPV6;

	p->family = 6;
	__builtin_memcpy(p->saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	p->ip_len = plen + sizeof(*ip6);

	__u8 nh = ip6->nexthdr;
	__u32 off = p->l3_off + sizeof(*ip6);
	__u32 end = p->l3_off + p->ip_len;

	/*
	 * Walk at most BH_IPV6_EXT_MAX extension headers. A chain still going
	 * after that is dropped (BH_R_IPV6_EXT_CHAIN): passing it unexamined
	 * would let a long chain smuggle any L4 header past the policy.
	 */
#pragma unroll
	for (int i = 0; i < BH_IPV6_EXT_MAX; i++) {
		if (!bh_is_v6_ext(nh))
			break;
		__u8 *eh = data + off;
		if ((void *)(eh + 8) > data_end)
			return BH_R_MALFORMED_IPV6;
		__u32 len;
		if (nh == IPPROTO_FRAGMENT) {
			__u16 fo = bpf_ntohs(*(__u16 *)(eh + 2));
			p->frag_id = bpf_ntohl(*(__u32 *)(eh + 4));
			if (fo & 0xFFF8)
				p->frag = BH_FRAG_LATER;
			else if (fo & 1)
				p->frag = BH_FRAG_FIRST;
			len = 8;
		} else if (nh == IPPROTO_AH) {
			len = (eh[1] + 2) * 4;
		} else {
			len = (eh[1] + 1) * 8;
		}
		nh = eh[0];
		off += len;
		if (off > end)
			return BH_R_MALFORMED_IPV6;
		if (p->frag == BH_FRAG_LATER)
			break; /* what follows is payload of the datagram, not headers */
	}
	if (p->frag != BH_FRAG_LATER && bh_is_v6_ext(nh))
		return BH_R_IPV6_EXT_CHAIN;

	p->proto = nh;
	p->l4_off = off;
	p->l4_len = end - off;
	return bh_parse_l4(data, data_end, p);
}

/*
 * Parse Ethernet, up to BH_VLAN_MAX_DEPTH 802.1Q/802.1ad tags, IP and L4.
 * Returns BH_PARSE_OK, BH_PARSE_NON_IP, or the enum bh_reason to drop for.
 */
static __always_inline int bh_parse(void *data, void *data_end, struct bh_pkt *p)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return BH_R_MALFORMED_L2;
	__u16 proto = eth->h_proto;
	__u32 off = sizeof(*eth);

#pragma unroll
	for (int i = 0; i < BH_VLAN_MAX_DEPTH; i++) {
		if (proto != bpf_htons(BH_ETH_P_8021Q) && proto != bpf_htons(BH_ETH_P_8021AD))
			break;
		__u16 *tag = data + off; /* TCI, then the encapsulated EtherType */
		if ((void *)(tag + 2) > data_end)
			return BH_R_MALFORMED_L2;
		proto = tag[1];
		off += 4;
		p->vlan_depth++;
	}
	if (proto == bpf_htons(BH_ETH_P_8021Q) || proto == bpf_htons(BH_ETH_P_8021AD))
		return BH_R_VLAN_TOO_DEEP;

	p->l3_off = off;
	if (proto == bpf_htons(ETH_P_IP))
		return bh_parse_ipv4(data, data_end, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return bh_parse_ipv6(data, data_end, p);
	return BH_PARSE_NON_IP;
}

/*
 * The headers of a packet TC sees (bulkhead_tc, bulkhead_transit_in): an
 * skb's linear part may end before its datagram does, so lengths are checked
 * against `pkt_len`, the whole packet, and only the headers against
 * data_end. No VLAN tags, IPv4 options up to their 60 bytes, IPv6 without
 * extension headers (BH_R_IPV6_EXT_CHAIN), no ICMP quotes (icmp_error set,
 * the quote unread). Fills what the flow keys and the policy need, exactly
 * as bh_parse does for the same packet: a flow keyed in TC is found by XDP.
 */
static __always_inline int bh_parse_headers(void *data, void *data_end, __u32 pkt_len, struct bh_pkt *p)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return BH_R_MALFORMED_L2;
	p->l3_off = sizeof(*eth);
	__u8 *l4;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return BH_R_MALFORMED_IPV4;
		__u32 hl = (iph->ihl * 4) & 0x3c;
		__u32 tot = bh_len16(iph->tot_len);
		if (tot < hl || sizeof(*eth) + tot > pkt_len)
			return BH_R_MALFORMED_IPV4;
		p->family = 4;
		p->proto = iph->protocol;
		p->saddr4_be = iph->saddr;
		p->daddr4_be = iph->daddr;
		p->ip_len = tot;
		p->l4_off = sizeof(*eth) + hl;
		p->l4_len = tot - hl;
		__u16 frag_off = bpf_ntohs(iph->frag_off);
		if (frag_off & BH_IP_OFFSET)
			p->frag = BH_FRAG_LATER;
		else if (frag_off & BH_IP_MF)
			p->frag = BH_FRAG_FIRST;
		p->frag_id = bpf_ntohs(iph->id);
		l4 = (__u8 *)iph + hl;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return BH_R_MALFORMED_IPV6;
		__u32 plen = bh_len16(ip6->payload_len);
		if (plen == 0 || sizeof(*eth) + sizeof(*ip6) + plen > pkt_len)
			return BH_R_MALFORMED_IPV6;
		if (bh_is_v6_ext(ip6->nexthdr))
			return BH_R_IPV6_EXT_CHAIN;
		p->family = 6;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		p->proto = ip6->nexthdr;
		p->ip_len = plen + sizeof(*ip6);
		p->l4_off = sizeof(*eth) + sizeof(*ip6);
		p->l4_len = plen;
		l4 = (void *)(ip6 + 1);
	} else {
		return BH_PARSE_NON_IP;
	}
	p->policy_dport_be = 0;
	if (p->frag == BH_FRAG_LATER)
		return BH_PARSE_OK;
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)l4;
		if ((void *)(th + 1) > data_end)
			return BH_R_MALFORMED_L4;
		__u32 doff = th->doff * 4;
		if (doff < sizeof(*th) || doff > p->l4_len)
			return BH_R_MALFORMED_L4;
		p->sport_be = th->source;
		p->dport_be = th->dest;
		p->policy_dport_be = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_doff = doff;
		p->seq_be = th->seq;
		p->ack_seq_be = th->ack_seq;
	} else if (p->proto == IPPROTO_UDP) {
		struct udphdr *uh = (void *)l4;
		if ((void *)(uh + 1) > data_end || bpf_ntohs(uh->len) < sizeof(*uh))
			return BH_R_MALFORMED_L4;
		if (p->frag == BH_FRAG_NONE && bpf_ntohs(uh->len) > p->l4_len)
			return BH_R_MALFORMED_L4;
		p->sport_be = uh->source;
		p->dport_be = uh->dest;
		p->policy_dport_be = uh->dest;
	} else if (p->proto == IPPROTO_SCTP) {
		__u16 *ports = (void *)l4;
		if ((void *)(ports + 6) > data_end)
			return BH_R_MALFORMED_L4;
		p->sport_be = ports[0];
		p->dport_be = ports[1];
		p->policy_dport_be = ports[1];
	} else if ((p->family == 4 && p->proto == IPPROTO_ICMP) ||
		   (p->family == 6 && p->proto == IPPROTO_ICMPV6)) {
		if ((void *)(l4 + 8) > data_end)
			return BH_R_MALFORMED_L4;
		p->icmp_type = l4[0];
		p->icmp_code = l4[1];
		if (bh_icmp_is_echo(p->family, l4[0])) {
			__u16 id = *(__u16 *)(l4 + 4);
			p->sport_be = id;
			p->dport_be = id;
		} else if (bh_icmp_is_error(p->family, l4[0])) {
			p->icmp_error = 1;
		}
	}
	return BH_PARSE_OK;
}

#endif /* BH_PARSE_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * forward.h - the packet side of the XDP fast path (bh_forward in bulkhead.c):
 * what the kernel's forwarding would write into a packet that leaves by
 * another interface, done in place: new MAC addresses from the FIB answer,
 * the IPv4 TTL (with the header checksum) or the IPv6 hop limit decremented.
 *
 * Only plain frames go this way: no VLAN tag (the tag belongs to the ingress
 * link), IPv4 without options (the kernel may have to act on them), no
 * fragment, TCP/UDP/ICMP, a TTL that survives the decrement (else the
 * kernel sends the ICMP time exceeded), and a checksum that is complete
 * (bh_fwd_csum_partial). bh_fwd_plain says which, but for the checksum.
 */
#ifndef BH_FORWARD_H
#define BH_FORWARD_H

#include "parse.h"

/*
 * bpf_fib_lookup flags and fields newer than some kernels' headers. The
 * kernel rejects a flag it does not know with -EINVAL (upstream 6.1 knows DIRECT and
 * OUTPUT only), which is how bh_forward learns to fall back.
 */
#ifndef BPF_FIB_LOOKUP_DIRECT
#define BPF_FIB_LOOKUP_DIRECT (1U << 0)
#endif
/* BPF_FIB_LOOKUP_TBID, upstream 6.8+ (Debian's 6.1.0-57 too): look up in the table named by fib.tbid.
 * tests/bpf builds once more with an unknown bit here, to run the fallback of kernels without it. */
#ifndef BH_FIB_TBID
#define BH_FIB_TBID (1U << 3)
#endif

#define BH_ETH_HLEN 14
#define BH_IPV4_MIN_HLEN 20
#define BH_IPV6_HLEN 40

/* The packet can leave by redirect as far as its own headers go. */
static __always_inline int bh_fwd_plain(const struct bh_pkt *p, void *data, void *data_end)
{
	if (p->vlan_depth || p->frag != BH_FRAG_NONE || p->l3_off != BH_ETH_HLEN)
		return 0;
	/* Protocols whose checksums bh_fwd_csum_partial can judge (SCTP's CRC32c may be left to offload too). */
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP && p->proto != IPPROTO_ICMP &&
	    p->proto != IPPROTO_ICMPV6)
		return 0;
	if (p->family == 4) {
		__u8 *ip = data + BH_ETH_HLEN;
		if ((void *)(ip + BH_IPV4_MIN_HLEN) > data_end)
			return 0;
		return ip[0] == 0x45 && ip[8] > 1; /* version 4, ihl 5: no options; ttl */
	}
	__u8 *ip6 = data + BH_ETH_HLEN;
	if ((void *)(ip6 + BH_IPV6_HLEN) > data_end)
		return 0;
	return ip6[7] > 1; /* hop limit */
}

/*
 * A TCP/UDP checksum left to offload (CHECKSUM_PARTIAL): the sender wrote
 * only the pseudo-header's sum, folded, and expects the device (or the
 * stack) to finish it. That is what a local socket behind a veth sends. A
 * redirected XDP frame loses the skb's note that the checksum is unfinished,
 * so it would arrive broken: such packets go to the stack, which finishes
 * them. A complete checksum equals the pseudo-header sum only by chance (1
 * in 65536): such a packet merely takes the slow way.
 */
static __always_inline int bh_fwd_csum_partial(const struct bh_pkt *p, void *data, void *data_end)
{
	__u16 *csum;
	__u8 *l4 = data + (p->l4_off & 0x7ff); /* bounded for the verifier; bh_parse set it */

	if (p->proto == IPPROTO_TCP) {
		csum = (void *)(l4 + 16);
	} else if (p->proto == IPPROTO_UDP) {
		csum = (void *)(l4 + 6);
	} else {
		return 0;
	}
	if ((void *)(csum + 1) > data_end)
		return 0;
	__u32 sum = bpf_htons(p->proto) + bpf_htons(p->l4_len);
	const __u16 *w = (const __u16 *)p->saddr; /* 16-byte copies: IPv4-mapped for IPv4 */
	int first = p->family == 4 ? 6 : 0;      /* the ::ffff: prefix is not in IPv4's pseudo-header */
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i >= first)
			sum += w[i];
	w = (const __u16 *)p->daddr;
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i >= first)
			sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	/* 0 and 0xffff are the same number in one's complement. */
	return *csum == sum || (sum == 0xffff && *csum == 0);
}

/*
 * New MACs, TTL / hop limit minus one. As the kernel's ip_decrease_ttl: the
 * TTL is the high byte of its 16-bit word, so the checksum goes up by 0x0100
 * (RFC 1624, with the end-around carry). Returns -1 if the frame is shorter
 * than bh_fwd_plain found it (it is not: the verifier needs the checks again).
 */
static __always_inline int bh_fwd_rewrite(const struct bh_pkt *p, void *data, void *data_end,
					  const __u8 *dmac, const __u8 *smac)
{
	__u8 *eth = data;
	__u8 *ip = eth + BH_ETH_HLEN;

	if (p->family == 4) {
		if ((void *)(ip + BH_IPV4_MIN_HLEN) > data_end)
			return -1;
		__u16 *check = (void *)(ip + 10);
		__u32 c = *check;
		c += bpf_htons(0x0100);
		*check = (__u16)(c + (c >= 0xffff));
		ip[8]--;
	} else {
		if ((void *)(ip + BH_IPV6_HLEN) > data_end)
			return -1;
		ip[7]--;
	}
	__builtin_memcpy(eth, dmac, 6);
	__builtin_memcpy(eth + 6, smac, 6);
	return 0;
}

#endif /* BH_FORWARD_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * reject.h - turn the packet in hand into the answer that makes a client
 * fail fast: a TCP RST, or an ICMP/ICMPv6 "administratively prohibited"
 * unreachable, sent back out the ingress interface with XDP_TX.
 *
 * Everything needed from the original is saved on the stack first, then
 * the frame is resized (bpf_xdp_adjust_head/tail invalidate every packet
 * pointer) and written fresh. VLAN tags are kept so the answer goes back
 * on the same VLAN. Returns 0 when the frame is ready to XDP_TX, -1 when
 * no answer may or can be built (the caller drops and counts).
 */
#ifndef BH_REJECT_H
#define BH_REJECT_H

#include "parse.h"



#define BH_L2_MAX 22          /* Ethernet + two VLAN tags */
#define BH_ICMP_QUOTE_MAX 128 /* bytes of the offending datagram quoted back */
#define BH_REPLY_TTL 64

static __always_inline __u16 bh_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Sum `bytes` (a compile-time even constant) of a stack buffer as 16-bit words. */
static __always_inline __u32 bh_csum_buf(const void *buf, int bytes, __u32 sum)
{
	const __u16 *w = buf;
#pragma unroll
	for (int i = 0; i < bytes / 2; i++)
		sum += w[i];
	return sum;
}

/*
 * Pseudo-header sum. Addition commutes, so the answer (addresses swapped)
 * has the same sum as the packet in hand: no swapped copy needed.
 */
static __always_inline __u32 bh_csum_pseudo(const struct bh_pkt *p, __u8 proto, __u32 len)
{
	__u32 sum = 0;
	if (p->family == 4) {
		sum += p->saddr4_be & 0xffff;
		sum += p->saddr4_be >> 16;
		sum += p->daddr4_be & 0xffff;
		sum += p->daddr4_be >> 16;
		sum += bpf_htons(proto);
		sum += bpf_htons(len);
	} else {
		sum = bh_csum_buf(p->saddr, 16, sum);
		sum = bh_csum_buf(p->daddr, 16, sum);
		sum += bpf_htons(len);
		sum += bpf_htons(proto);
	}
	return sum;
}

/* Copy the L2 header (Ethernet + tags) to the stack; swap the MACs for an answer. */
static __always_inline int bh_save_l2(void *data, void *data_end, __u32 l2_len, __u8 *l2, int swap)
{
	if (data + BH_L2_MAX <= data_end) {
		__builtin_memcpy(l2, data, BH_L2_MAX);
	} else if (l2_len == 14 && data + 14 <= data_end) {
		__builtin_memcpy(l2, data, 14);
	} else if (l2_len == 18 && data + 18 <= data_end) {
		__builtin_memcpy(l2, data, 18);
	} else {
		return -1;
	}
	if (!swap)
		return 0;
	__u8 mac[6];
	__builtin_memcpy(mac, l2, 6);
	__builtin_memcpy(l2, l2 + 6, 6);
	__builtin_memcpy(l2 + 6, mac, 6);
	return 0;
}

static __always_inline int bh_write_l2(void *data, void *data_end, __u32 l2_len, const __u8 *l2)
{
	if (l2_len == 14 && data + 14 <= data_end)
		__builtin_memcpy(data, l2, 14);
	else if (l2_len == 18 && data + 18 <= data_end)
		__builtin_memcpy(data, l2, 18);
	else if (l2_len == 22 && data + 22 <= data_end)
		__builtin_memcpy(data, l2, 22);
	else
		return -1;
	return 0;
}

/* Fresh IP header: an answer's (swap: source = original destination), or the packet's own. */
static __always_inline int bh_write_ip(void *ip, void *data_end, const struct bh_pkt *p, __u8 proto,
				       __u32 l4_len, int swap)
{
	if (p->family == 4) {
		struct iphdr h = {};
		if (ip + sizeof(h) > data_end)
			return -1;
		h.version = 4;
		h.ihl = 5;
		h.tot_len = bpf_htons(sizeof(h) + l4_len);
		h.frag_off = bpf_htons(0x4000); /* DF */
		h.ttl = BH_REPLY_TTL;
		h.protocol = proto;
		h.saddr = swap ? p->daddr4_be : p->saddr4_be;
		h.daddr = swap ? p->saddr4_be : p->daddr4_be;
		h.check = bh_csum_fold(bh_csum_buf(&h, sizeof(h), 0));
		__builtin_memcpy(ip, &h, sizeof(h));
	} else {
		struct ipv6hdr h = {};
		if (ip + sizeof(h) > data_end)
			return -1;
		h.version = 6;
		h.payload_len = bpf_htons(l4_len);
		h.nexthdr = proto;
		h.hop_limit = BH_REPLY_TTL;
		__builtin_memcpy(&h.saddr, swap ? p->daddr : p->saddr, 16);
		__builtin_memcpy(&h.daddr, swap ? p->saddr : p->daddr, 16);
		__builtin_memcpy(ip, &h, sizeof(h));
	}
	return 0;
}

/*
 * RFC 9293 3.10.7.1: a reset that the sender of this segment will accept
 * (onward = 0, bounced back with XDP_TX); or, onward = 1, the segment itself
 * turned into a reset for its receiver (seq = this segment's, which is the
 * receiver's next expected byte), passed on with XDP_PASS.
 */
/*
 * Cut the frame in hand to `new_len` bytes (an answer is never longer than what it answers:
 * a longer one is refused) and write the saved L2 header back at its front. Every packet
 * pointer is invalid afterwards: the caller reloads ctx->data / data_end.
 */
static __always_inline int bh_reframe(struct xdp_md *ctx, int new_len, __u32 l2_len, const __u8 *l2)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 cur_len = data_end - data;
	/* Keep clang from re-associating this into pointer math on data_end (refused). */
	asm volatile("" : "+r"(cur_len));
	int delta = new_len - (int)cur_len;
	if (delta > 0)
		return -1;
	if (delta && bpf_xdp_adjust_tail(ctx, delta))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	return bh_write_l2(data, data_end, l2_len, l2);
}

static __always_inline int bh_build_tcp_rst(struct xdp_md *ctx, const struct bh_pkt *p, int onward)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 l2[BH_L2_MAX];
	__u32 l2_len = p->l3_off;

	if (p->tcp_flags & BH_TCP_RST)
		return -1; /* never answer a reset */
	if (l2_len > BH_L2_MAX || bh_save_l2(data, data_end, l2_len, l2, !onward))
		return -1;

	struct tcphdr th = {};
	th.source = onward ? p->sport_be : p->dport_be;
	th.dest = onward ? p->dport_be : p->sport_be;
	th.doff = 5;
	th.rst = 1;
	if (onward) {
		th.seq = p->seq_be;
		th.ack_seq = p->ack_seq_be;
		th.ack = !!(p->tcp_flags & BH_TCP_ACK);
	} else if (p->tcp_flags & BH_TCP_ACK) {
		th.seq = p->ack_seq_be;
	} else {
		__u32 seg_len = p->l4_len - p->tcp_doff;
		if (p->tcp_flags & BH_TCP_SYN)
			seg_len++;
		if (p->tcp_flags & BH_TCP_FIN)
			seg_len++;
		th.ack_seq = bpf_htonl(bpf_ntohl(p->seq_be) + seg_len);
		th.ack = 1;
	}
	th.check = bh_csum_fold(bh_csum_buf(&th, sizeof(th), bh_csum_pseudo(p, IPPROTO_TCP, sizeof(th))));

	__u32 ip_hlen = p->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	if (bh_reframe(ctx, l2_len + ip_hlen + sizeof(th), l2_len, l2))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	void *ip = data + l2_len;
	if (bh_write_ip(ip, data_end, p, IPPROTO_TCP, sizeof(th), !onward))
		return -1;
	void *tcp = ip + ip_hlen;
	if (tcp + sizeof(th) > data_end)
		return -1;
	__builtin_memcpy(tcp, &th, sizeof(th));
	return 0;
}

/*
 * ICMP type 3 code 13 / ICMPv6 type 1 code 1, quoting the offending IP
 * header(s) and the first 8 bytes of L4. The frame grows at the front by
 * the new IP + ICMP headers, so the quote is already where it belongs.
 */
static __always_inline int bh_build_icmp_unreach(struct xdp_md *ctx, const struct bh_pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 l2[BH_L2_MAX];
	__u32 l2_len = p->l3_off;

	if (p->icmp_error || p->frag == BH_FRAG_LATER)
		return -1; /* RFC 1122: no error about an error, nor about a later fragment */
	if (p->family == 4 && (p->daddr4_be == 0xffffffff || (bpf_ntohl(p->daddr4_be) >> 28) == 0xe))
		return -1; /* broadcast / multicast */
	if (p->family == 6 && p->daddr[0] == 0xff)
		return -1;
	if (l2_len > BH_L2_MAX || bh_save_l2(data, data_end, l2_len, l2, 1))
		return -1;

	__u32 quote_len = p->l4_off - p->l3_off + 8;
	if (quote_len > p->ip_len)
		quote_len = p->ip_len;
	if (quote_len > BH_ICMP_QUOTE_MAX)
		quote_len = BH_ICMP_QUOTE_MAX;
	quote_len &= ~1U; /* even: the checksum loop reads 16-bit words */

	__u32 ip_hlen = p->family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	int add = ip_hlen + 8;
	if (bpf_xdp_adjust_head(ctx, -add))
		return -1;
	if (bh_reframe(ctx, l2_len + add + quote_len, l2_len, l2))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	void *ip = data + l2_len;
	__u8 proto = p->family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
	__u32 icmp_len = 8 + quote_len;
	if (bh_write_ip(ip, data_end, p, proto, icmp_len, 1))
		return -1;

	__u8 ih[8] = {};
	ih[0] = p->family == 4 ? ICMP_DEST_UNREACH : ICMPV6_DEST_UNREACH;
	ih[1] = p->family == 4 ? ICMP_PKT_FILTERED : ICMPV6_ADM_PROHIBITED;
	__u32 sum = p->family == 4 ? 0 : bh_csum_pseudo(p, IPPROTO_ICMPV6, icmp_len);
	sum = bh_csum_buf(ih, sizeof(ih), sum);

	void *icmp = ip + ip_hlen;
	void *quote = icmp + 8;
	for (__u32 i = 0; i < BH_ICMP_QUOTE_MAX; i += 2) {
		if (i >= quote_len)
			break;
		void *w = quote + i;
		/* Keep clang from folding the check into pkt_end arithmetic the verifier refuses. */
		asm volatile("" : "+r"(w));
		if (w + 2 > data_end)
			return -1;
		sum += *(__u16 *)w;
	}
	__u16 csum = bh_csum_fold(sum);
	__builtin_memcpy(ih + 2, &csum, 2);
	if (icmp + 8 > data_end)
		return -1;
	__builtin_memcpy(icmp, ih, 8);
	return 0;
}

#endif /* BH_REJECT_H */

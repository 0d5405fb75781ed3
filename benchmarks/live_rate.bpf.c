/* SPDX-License-Identifier: GPL-2.0 */
/*
 * live_rate.bpf.c - the traffic generator and the counters of the live-rate
 * benchmark (benchmarks/test_live_rate.py; ../shared/BENCHMARKS.md method 2).
 *
 *   lr_gen    run by BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES on the
 *             sender's veth: writes the frame and returns XDP_TX, so each run
 *             is one frame out of the sender towards the gateway.
 *   lr_count  XDP on the receiver's veth: counts per CPU and drops.
 *   lr_pass   a bare XDP_PASS for the gateway ("the ceiling for anything
 *             that passes to the stack").
 *   lr_fwd    a minimal XDP forwarder for the gateway (FIB + redirect, no
 *             policy): the ceiling for anything forwarded in XDP.
 *
 * Live-frames pages are recycled without being re-initialised, and the
 * gateway writes into them (TTL, MACs, checksums): every run therefore copies
 * the whole template in again rather than trusting what the page holds.
 */
#include <uapi/linux/bpf.h>

#define LR_FRAME_LEN 60     /* Ethernet + IPv4 + TCP, padded to the 60-byte minimum (64 with the FCS) */
#define LR_SPORT_SPAN 64512 /* source ports 1024..65535 */
#define LR_HOST_SPAN 4096   /* low 12 bits of the source address: a /20 of clients */

struct lr_cfg {
	__u8 frame[64];       /* template; the first LR_FRAME_LEN bytes are sent */
	__u32 vary;           /* 0: one flow; 1: a new (source address, port) every frame */
	__u16 sport_be;       /* the template's source port */
	__u16 saddr_lo_be;    /* the template's low 16 bits of the source address */
};

/* lr_cfg[0]: written by the benchmark before each run. */
BPF_ARRAY(lr_cfg, struct lr_cfg, 1);
/* lr_seq[0]: frames generated; only the generator's CPU writes it. */
BPF_ARRAY(lr_seq, __u64, 1);
/* lr_rx[0]: frames seen by lr_count, per CPU. */
BPF_PERCPU_ARRAY(lr_rx, __u64, 1);

/* RFC 1624: a 16-bit word of a one's-complement sum changed from `from` to `to`. */
static __always_inline __u16 lr_csum_replace(__u16 sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~sum + (__u16)~from + to;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

int lr_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	if (data + LR_FRAME_LEN > data_end)
		return XDP_ABORTED;
	struct lr_cfg *cfg = lr_cfg.lookup(&zero);
	if (!cfg)
		return XDP_ABORTED;
	__builtin_memcpy(data, cfg->frame, LR_FRAME_LEN);
	if (!cfg->vary)
		return XDP_TX;

	__u64 *seq = lr_seq.lookup(&zero);
	if (!seq)
		return XDP_ABORTED;
	__u64 n = (*seq)++;
	__u16 sport = 1024 + n % LR_SPORT_SPAN;
	__u16 host = (n / LR_SPORT_SPAN) % LR_HOST_SPAN;
	__u8 *b = data;
	/* Offsets in the template: IPv4 at 14 (checksum 24, saddr 26..29), TCP at 34 (sport 34, checksum 50). */
	__u16 lo_old = cfg->saddr_lo_be;
	__u16 lo_new = bpf_htons((bpf_ntohs(lo_old) & 0xf000) | host);
	__u16 sp_new = bpf_htons(sport);
	__u16 *w_ipsum = (void *)(b + 24), *w_lo = (void *)(b + 28);
	__u16 *w_sport = (void *)(b + 34), *w_tcpsum = (void *)(b + 50);

	*w_lo = lo_new;
	*w_sport = sp_new;
	*w_ipsum = lr_csum_replace(*w_ipsum, lo_old, lo_new);
	*w_tcpsum = lr_csum_replace(lr_csum_replace(*w_tcpsum, lo_old, lo_new), cfg->sport_be, sp_new);
	return XDP_TX;
}

int lr_count(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *c = lr_rx.lookup(&zero);

	if (c)
		(*c)++;
	return XDP_DROP;
}

int lr_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/*
 * The floor of any XDP forwarder on this setup (as xdp-tools' xdp_fwd): FIB
 * lookup, new MACs, TTL - 1, bpf_redirect; no policy. IPv4 without options
 * only; anything else passes.
 */
int lr_fwd(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *eth = data;
	__u8 *ip = eth + 14;
	struct bpf_fib_lookup fib = {};

	if ((void *)(ip + 20) > data_end || eth[12] != 0x08 || eth[13] != 0x00 || ip[0] != 0x45 || ip[8] <= 1)
		return XDP_PASS;
	fib.family = 2; /* AF_INET */
	fib.tos = ip[1];
	fib.l4_protocol = ip[9];
	fib.tot_len = bpf_ntohs(*(__u16 *)(ip + 2));
	fib.ipv4_src = *(__u32 *)(ip + 12);
	fib.ipv4_dst = *(__u32 *)(ip + 16);
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u16 *check = (void *)(ip + 10);
	__u32 c = *check + bpf_htons(0x0100);
	*check = (__u16)(c + (c >= 0xffff));
	ip[8]--;
	__builtin_memcpy(eth, fib.dmac, 6);
	__builtin_memcpy(eth + 6, fib.smac, 6);
	return bpf_redirect(fib.ifindex, 0);
}

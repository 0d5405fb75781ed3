/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The far end's XDP program in tests/integration/test_fastpath.py: a veth takes frames
 * redirected into it only if its peer has an XDP program (and so a NAPI ring) of its own.
 */
#include <uapi/linux/bpf.h>

int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

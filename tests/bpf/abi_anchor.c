/* SPDX-License-Identifier: GPL-2.0 */
/*
 * abi_anchor.c - the ABI headers compiled alone, for tests/bpf/test_abi_btf.py.
 *
 * clang emits BTF only for types reachable from a map, a global or a
 * function's signature. The enums reach none (their values are folded into
 * instructions) and some structs only local variables (bh_meta), so the
 * session's bulkhead.c object has no BTF for them. This object gives each
 * one a member of a map value: BH_ABI_ANCHORS, built by the test from the
 * names enums.h and types.h define, is "enum bh_x e_bh_x; struct bh_y s_bh_y; ...".
 * Compiled by bcc with the loader's cflags: the same compiler and knobs.
 */
#include "consts.h"
#include "types.h"
#include "enums.h"

struct bh_abi_anchor {
	BH_ABI_ANCHORS
};
BPF_ARRAY(abi_anchor, struct bh_abi_anchor, 1);

/* bcc loads an object's BTF only along with a function; this one is never loaded. */
int bh_abi_anchor_fn(struct xdp_md *ctx)
{
	return XDP_PASS;
}

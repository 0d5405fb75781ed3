/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sni_hash.h - the server-name hash, the one agent/policy/sni.py mirrors
 * (word_hash): the policy compiler stores names under it in sni_names, the
 * parsers look a ClientHello's name up under it. In two forms that must
 * agree byte for byte: whole words at a time (bh_nh_word over
 * bh_tls_lower8'd loads, used by the one-shot parser, tls_parse.h) and byte
 * by byte into struct bh_sni_state (bh_sni_hash_char, used by the streaming
 * parser, tls_stream.h, for names that straddle segments).
 * Pure: no map access, no packet access.
 */
#ifndef BH_SNI_HASH_H
#define BH_SNI_HASH_H

#include "consts.h"
#include "types.h"

/*
 * Server-name hash: 64 bits over 8-byte little-endian words, the last one
 * zero-padded, then the length and a finalizer (splitmix64's). Word-wise,
 * so the one-shot path hashes a 20-byte name in three multiplies where
 * FNV-1a needed twenty. The name and "what follows its first dot" (the
 * form "*.rest" patterns are looked up under) use different seeds, so the
 * two share sni_names. agent/policy/sni.py computes the same.
 */
#define BH_NH_SEED_NAME 0x243f6a8885a308d3ULL
#define BH_NH_SEED_REST 0x13198a2e03707344ULL
#define BH_NH_K1 0x9e3779b97f4a7c15ULL
#define BH_NH_K2 0xbf58476d1ce4e5b9ULL
#define BH_NH_K3 0x94d049bb133111ebULL
#define BH_NH_ONES 0x0101010101010101ULL
#define BH_NH_HIGHS 0x8080808080808080ULL
#define BH_NH_DOTS 0x2e2e2e2e2e2e2e2eULL

static __always_inline __u64 bh_nh_word(__u64 h, __u64 w)
{
	h = (h ^ w) * BH_NH_K1;
	return h ^ (h >> 29);
}

static __always_inline __u64 bh_nh_final(__u64 h, __u64 n)
{
	h ^= n;
	h ^= h >> 30;
	h *= BH_NH_K2;
	h ^= h >> 27;
	h *= BH_NH_K3;
	return h ^ (h >> 31);
}

/* A word as loaded from memory, as the hash takes it: byte k of the name in bits 8k..8k+7. */
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BH_NH_LE(v) __builtin_bswap64(v)
#else
#define BH_NH_LE(v) (v)
#endif

/* All ones if the low bit of `bit` is set, else zero: -(bit & 1), as arithmetic (BPF has no conditional move). */
#define BH_NH_MASK(bit) (-(__u64)((bit) & 1))

/*
 * Name byte i (lowercased) into the streaming hashes: collected into a word,
 * mixed in when the word is full. At the first dot the rest's hash starts;
 * every later byte goes into it too. `skip`: a trailing dot, logged but not
 * hashed. Without a branch (each one in this per-byte body would multiply
 * the paths the verifier walks): every choice is a mask.
 */
static __always_inline void bh_sni_hash_char(struct bh_sni_state *st, __u64 c, __u64 i, __u64 skip)
{
	__u64 keep = ~BH_NH_MASK(skip);
	__u64 is_dot = ((c ^ '.') - 1) >> 63;               /* 1 iff c == '.' */
	__u64 wild = (st->flags & BH_SNIF_WILD) ? 1 : 0;
	asm volatile("" : "+r"(wild)); /* keep the test above the only branch */

	__u64 acc = st->acc | ((c << ((i & 7) * 8)) & keep);
	__u64 full = BH_NH_MASK((((i & 7) + 1) >> 3)) & keep; /* this byte ends a word */
	__u64 h = st->h64;
	st->h64 = h ^ ((h ^ bh_nh_word(h, acc)) & full);
	st->acc = acc & ~full;

	/* The rest: bytes after the first dot. */
	__u64 j = i - st->wild_at - 1;
	__u64 in_rest = BH_NH_MASK(wild) & keep;
	__u64 wacc = st->wacc | ((c << ((j & 7) * 8)) & in_rest);
	__u64 wfull = BH_NH_MASK((((j & 7) + 1) >> 3)) & in_rest;
	__u64 w = st->w64;
	w = w ^ ((w ^ bh_nh_word(w, wacc)) & wfull);
	wacc &= ~wfull;
	/* The first dot starts it. */
	__u64 start = BH_NH_MASK(is_dot & ~wild) & keep;
	st->w64 = (w & ~start) | (BH_NH_SEED_REST & start);
	st->wacc = wacc & ~start;
	st->wild_at = (st->wild_at & ~start) | (i & start);
	st->flags |= BH_SNIF_WILD & start;
}

/*
 * Eight bytes (as loaded from the packet) lowercased at once, exactly as
 * the streaming parser does each (bh_tls_name): per byte, bit 7 of lo7 + 0x3f
 * is "low 7 bits >= 'A'", of lo7 + 0x25 "> 'Z'" (no carry crosses bytes:
 * lo7 <= 0x7f); a byte with bit 7 set is no letter.
 */
static __always_inline __u64 bh_tls_lower8(__u64 v)
{
	__u64 lo7 = v & 0x7f7f7f7f7f7f7f7fULL;
	__u64 upper = (lo7 + 0x3f3f3f3f3f3f3f3fULL) & ~(lo7 + 0x2525252525252525ULL) & ~v & 0x8080808080808080ULL;
	return v | (upper >> 2);
}

#endif /* BH_SNI_HASH_H */

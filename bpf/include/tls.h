/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tls.h - a streaming TLS ClientHello parser that finds the server name.
 *
 * Real ClientHellos span TCP segments (post-quantum key shares make them
 * ~1.8 KB; Chrome shuffles extension order; small MSS splits even small
 * ones), so the parser never needs the whole message at once. Its state
 * (struct bh_sni_state, in the sni_state map) is "the payload offset of the
 * next field I need, and the bytes of it collected so far". Each segment
 * advances it: fields are read only at their offsets, everything between
 * (random, cipher suites, other extensions) is skipped without being
 * touched, and the name is hashed byte by byte as it streams past (FNV-1a,
 * lowercased, a trailing dot dropped, plus the "*.rest" wildcard form), so
 * nothing needs buffering across segments.
 *
 * Every length is checked against its container (record, ClientHello,
 * extensions block, the SNI extension) before it is used; a lie, a
 * truncation, a second server_name or a non-TLS first byte is BH_TLS_BAD.
 * Pure: no map access (bcc rewrites map calls only in the main file).
 */
#ifndef BH_TLS_H
#define BH_TLS_H

#include "consts.h"
#include "types.h"

enum bh_tls_step {
	BH_TLS_REC_HDR   = 0, /* 5 bytes at 0: type 22, version 3.x, record length */
	BH_TLS_HS_HDR    = 1, /* 4 bytes at 5: type 1 (client_hello), length */
	BH_TLS_SID_LEN   = 2, /* 1 byte at 43, after version and random */
	BH_TLS_CS_LEN    = 3, /* 2 bytes */
	BH_TLS_COMP_LEN  = 4, /* 1 byte */
	BH_TLS_EXT_TOTAL = 5, /* 2 bytes */
	BH_TLS_EXT_HDR   = 6, /* 4 bytes: extension type, length */
	BH_TLS_SNI_HDR   = 7, /* 5 bytes: list length, name type, name length */
	BH_TLS_NAME      = 8, /* the name's bytes */
};

#define BH_TLS_MORE 0 /* the segment is used up: need the next one */
#define BH_TLS_DONE 1 /* every extension walked: decide */
#define BH_TLS_BAD 2  /* not TLS, malformed, or a shape we do not follow */
#define BH_TLS_CONT 3 /* this segment holds more to parse: call again (bulkhead_sni re-enters itself) */

#define BH_FNV64_BASIS 0xcbf29ce484222325ULL
#define BH_FNV64_PRIME 0x100000001b3ULL
#define BH_FNV32_BASIS 0x811c9dc5U
#define BH_FNV32_PRIME 0x01000193U

#define BH_TLS_REC_HANDSHAKE 22
#define BH_TLS_HS_CLIENT_HELLO 1
#define BH_TLS_EXT_SERVER_NAME 0
#define BH_TLS_RANDOM_END 43 /* 5 + 4 + 2 (legacy_version) + 32 (random) */
#define BH_TLS_PKT_OFF_MAX 0x3fff /* frames up to 16 KiB: beyond any MTU we attach to */

static __always_inline void bh_sni_state_init(struct bh_sni_state *st, __u32 base_seq)
{
	__builtin_memset(st, 0, sizeof(*st));
	st->h64 = BH_FNV64_BASIS;
	st->h32 = BH_FNV32_BASIS;
	st->base_seq = base_seq;
	st->step = BH_TLS_REC_HDR;
}

/*
 * One lowercased name byte into both hashes. The wildcard form is fed every
 * byte and restarted as "*." at the first dot, so no branch depends on
 * whether a dot was seen (each branch in this per-byte body multiplies the
 * paths the verifier explores). A trailing dot is undone at the end.
 */
static __always_inline void bh_sni_hash_char(struct bh_sni_state *st, __u8 c)
{
	st->h64 = (st->h64 ^ c) * BH_FNV64_PRIME;
	st->h32 = (st->h32 ^ c) * BH_FNV32_PRIME;
	if (c == '.' && !(st->flags & BH_SNIF_WILD)) {
		st->flags |= BH_SNIF_WILD;
		st->wild_at = st->name_got;
		st->w64 = (BH_FNV64_BASIS ^ '*') * BH_FNV64_PRIME;
		st->w32 = (BH_FNV32_BASIS ^ '*') * BH_FNV32_PRIME;
	}
	st->w64 = (st->w64 ^ c) * BH_FNV64_PRIME;
	st->w32 = (st->w32 ^ c) * BH_FNV32_PRIME;
}

/*
 * The name ended in '.': take it back out. FNV-1a's multiply is by an odd
 * prime, so it is invertible modulo 2^64 / 2^32.
 */
#define BH_FNV64_PRIME_INV 0xce965057aff6957bULL
#define BH_FNV32_PRIME_INV 0x359c449bU

static __always_inline void bh_sni_unhash_dot(struct bh_sni_state *st)
{
	st->h64 = (st->h64 * BH_FNV64_PRIME_INV) ^ '.';
	st->h32 = (st->h32 * BH_FNV32_PRIME_INV) ^ '.';
	st->w64 = (st->w64 * BH_FNV64_PRIME_INV) ^ '.';
	st->w32 = (st->w32 * BH_FNV32_PRIME_INV) ^ '.';
}

static __always_inline __u32 bh_tls_field_len(__u8 step)
{
	switch (step) {
	case BH_TLS_REC_HDR:
	case BH_TLS_SNI_HDR:
		return 5;
	case BH_TLS_HS_HDR:
	case BH_TLS_EXT_HDR:
		return 4;
	case BH_TLS_CS_LEN:
	case BH_TLS_EXT_TOTAL:
		return 2;
	default:
		return 1;
	}
}

/* A field is complete in st->field: check it and say where the next one is. */
static __always_inline int bh_tls_field(struct bh_sni_state *st)
{
	__u8 *f = st->field;
	__u32 at = st->want;

	switch (st->step) {
	case BH_TLS_REC_HDR: {
		__u32 rec_len = ((__u32)f[3] << 8) | f[4];
		if (f[0] != BH_TLS_REC_HANDSHAKE || f[1] != 3 || rec_len < 4)
			return BH_TLS_BAD;
		st->body_end = 5 + rec_len; /* the record's end, until the handshake length is known */
		st->want = 5;
		st->step = BH_TLS_HS_HDR;
		return BH_TLS_CONT;
	}
	case BH_TLS_HS_HDR: {
		__u32 hs_len = ((__u32)f[1] << 16) | ((__u32)f[2] << 8) | f[3];
		/* A ClientHello continued in a second TLS record is legal but rare: not followed. */
		if (f[0] != BH_TLS_HS_CLIENT_HELLO || 9 + hs_len > st->body_end || hs_len < 38)
			return BH_TLS_BAD;
		st->body_end = 9 + hs_len;
		st->want = BH_TLS_RANDOM_END;
		st->step = BH_TLS_SID_LEN;
		return BH_TLS_CONT;
	}
	case BH_TLS_SID_LEN:
		if (f[0] > 32)
			return BH_TLS_BAD;
		st->want = at + 1 + f[0];
		st->step = BH_TLS_CS_LEN;
		break;
	case BH_TLS_CS_LEN: {
		__u32 cs = ((__u32)f[0] << 8) | f[1];
		if (cs < 2 || (cs & 1))
			return BH_TLS_BAD;
		st->want = at + 2 + cs;
		st->step = BH_TLS_COMP_LEN;
		break;
	}
	case BH_TLS_COMP_LEN:
		if (f[0] < 1)
			return BH_TLS_BAD;
		st->want = at + 1 + f[0];
		if (st->want == st->body_end)
			return BH_TLS_DONE; /* no extensions at all: no server name */
		st->step = BH_TLS_EXT_TOTAL;
		break;
	case BH_TLS_EXT_TOTAL: {
		__u32 total = ((__u32)f[0] << 8) | f[1];
		st->ext_end = at + 2 + total;
		if (st->ext_end != st->body_end)
			return BH_TLS_BAD;
		st->want = at + 2;
		st->step = BH_TLS_EXT_HDR;
		if (st->want == st->ext_end)
			return BH_TLS_DONE;
		break;
	}
	case BH_TLS_EXT_HDR: {
		__u32 type = ((__u32)f[0] << 8) | f[1];
		__u32 len = ((__u32)f[2] << 8) | f[3];
		if (at + 4 + len > st->ext_end)
			return BH_TLS_BAD;
		if (type == BH_TLS_EXT_SERVER_NAME) {
			if (st->flags & BH_SNIF_SEEN_SNI)
				return BH_TLS_BAD; /* RFC 8446 4.2: no extension type twice */
			st->flags |= BH_SNIF_SEEN_SNI;
			st->name_len = len; /* the extension's length, checked against its contents next */
			st->want = at + 4;
			st->step = BH_TLS_SNI_HDR;
			break;
		}
		st->want = at + 4 + len;
		if (st->want == st->ext_end)
			return BH_TLS_DONE;
		break;
	}
	case BH_TLS_SNI_HDR: {
		__u32 list_len = ((__u32)f[0] << 8) | f[1];
		__u32 name_len = ((__u32)f[3] << 8) | f[4];
		/* Exactly one host_name entry filling the list, filling the extension (RFC 6066 3). */
		if (list_len + 2 != st->name_len || f[2] != 0 || name_len + 3 != list_len ||
		    name_len < 1 || name_len > BH_TLS_NAME_MAX)
			return BH_TLS_BAD;
		st->name_len = name_len;
		st->name_got = 0;
		st->name_off = at + 5;
		st->want = at + 5;
		st->step = BH_TLS_NAME;
		return BH_TLS_CONT;
	}
	default:
		return BH_TLS_BAD;
	}
	/* Every later field must start inside the ClientHello. */
	if (st->want + bh_tls_field_len(st->step) > st->body_end)
		return BH_TLS_BAD;
	return BH_TLS_CONT;
}

/* Packet pointer to payload offset `at` of a segment covering [rel, end), or NULL. */
static __always_inline __u8 *bh_tls_ptr(void *data, void *data_end, __u32 poff, __u32 rel, __u32 at, __u32 n)
{
	__u32 o = poff + (at - rel);
	/* The verifier only tracks packet ranges for offsets it can bound below 64 KiB. */
	if (at < rel || o > BH_TLS_PKT_OFF_MAX)
		return NULL;
	__u8 *b = data + (o & BH_TLS_PKT_OFF_MAX);
	if ((void *)(b + n) > data_end)
		return NULL;
	return b;
}

/*
 * Generic path: collect ONE field (which may straddle segments) byte by
 * byte, then interpret it. Used for whatever the fast paths can't take.
 */
static __always_inline int bh_tls_one_field(void *data, void *data_end, __u32 poff, __u32 rel, __u32 end,
					    struct bh_sni_state *st)
{
	__u32 flen = bh_tls_field_len(st->step);
#pragma unroll
	for (int j = 0; j < 5; j++) {
		if (st->got >= flen)
			break;
		__u32 at = st->want + st->got;
		if (at >= end)
			return BH_TLS_MORE; /* the field continues in the next segment */
		__u8 *b = bh_tls_ptr(data, data_end, poff, rel, at, 1);
		if (!b)
			return BH_TLS_BAD;
		__u32 fi = st->got;
		asm volatile("" : "+r"(fi)); /* keep the mask clang would drop: the verifier needs it */
		fi &= 7;
		if (fi >= sizeof(st->field))
			return BH_TLS_BAD; /* unreachable: fields are at most 5 bytes */
		st->field[fi] = *b;
		st->got++;
	}
	st->got = 0;
	return bh_tls_field(st);
}

/*
 * Fast path for a fresh ClientHello whose fixed part (up to the extensions
 * length) lies in this segment, as it does unless the MSS is tiny: read the
 * fields straight from the packet, then hand over to the extension walk.
 */
static __always_inline int bh_tls_head(void *data, void *data_end, __u32 poff, __u32 rel, __u32 end,
				       struct bh_sni_state *st)
{
	__u8 *h = bh_tls_ptr(data, data_end, poff, rel, 0, BH_TLS_RANDOM_END + 1);
	if (rel != 0 || end < BH_TLS_RANDOM_END + 1 || !h)
		return bh_tls_one_field(data, data_end, poff, rel, end, st);
	__builtin_memcpy(st->field, h, 5);
	int rc = bh_tls_field(st); /* record header */
	if (rc != BH_TLS_CONT)
		return rc;
	__builtin_memcpy(st->field, h + 5, 4);
	rc = bh_tls_field(st); /* handshake header */
	if (rc != BH_TLS_CONT)
		return rc;
	/*
	 * Session id, cipher suites, compression, extensions length: at variable
	 * offsets, each taken whole from the packet when it lies in this segment
	 * and checked by bh_tls_field like any other; one that straddles the
	 * segment is left to the generic path (st says which and where).
	 */
	for (int j = 0; j < 4 && st->step != BH_TLS_EXT_HDR; j++) {
		__u8 *b = bh_tls_ptr(data, data_end, poff, rel, st->want, 2);
		if (!b || st->want + bh_tls_field_len(st->step) > end)
			return BH_TLS_CONT;
		st->field[0] = b[0];
		st->field[1] = b[1];
		rc = bh_tls_field(st);
		if (rc != BH_TLS_CONT)
			return rc;
	}
	return BH_TLS_CONT;
}

/*
 * Walk extension headers that lie whole in this segment. Stops at the
 * server_name extension (its own header is parsed here too when it fits),
 * at a header straddling the segment (the generic path takes it), or after
 * BH_TLS_EXTS_PER_CALL extensions (the next call goes on).
 */
static __always_inline int bh_tls_exts(void *data, void *data_end, __u32 poff, __u32 rel, __u32 end,
				       struct bh_sni_state *st)
{
	for (int i = 0; i < BH_TLS_EXTS_PER_CALL; i++) {
		asm volatile("" : "+r"(i)); /* keep i as the bound the verifier sees */
		__u32 at = st->want;
		if (at >= end)
			return BH_TLS_MORE;
		if (at + 4 > end)
			return bh_tls_one_field(data, data_end, poff, rel, end, st);
		__u8 *b = bh_tls_ptr(data, data_end, poff, rel, at, 4);
		if (!b)
			return BH_TLS_BAD;
		__u32 type = ((__u32)b[0] << 8) | b[1];
		__u32 len = ((__u32)b[2] << 8) | b[3];
		if (at + 4 + len > st->ext_end)
			return BH_TLS_BAD;
		if (type == BH_TLS_EXT_SERVER_NAME) {
			__builtin_memcpy(st->field, b, 4);
			return bh_tls_field(st); /* checks for a second one, moves to SNI_HDR */
		}
		st->want = at + 4 + len;
		if (st->want == st->ext_end)
			return BH_TLS_DONE;
	}
	return BH_TLS_CONT;
}

/* Hash the name bytes this segment holds; on the last one, go back to extensions. */
static __always_inline int bh_tls_name(void *data, void *data_end, __u32 poff, __u32 rel, __u32 end,
				       struct bh_sni_state *st)
{
	if (st->step != BH_TLS_NAME)
		return BH_TLS_CONT;
	for (int i = 0; i < BH_TLS_NAME_PER_CALL; i++) {
		/* Keep i as the loop's bound: clang would otherwise fold it into
		 * name_got, whose bound the verifier can't see. */
		asm volatile("" : "+r"(i));
		if (st->name_got >= st->name_len)
			break;
		__u32 at = st->name_off + st->name_got;
		if (at >= end)
			return BH_TLS_MORE;
		__u8 *b = bh_tls_ptr(data, data_end, poff, rel, at, 1);
		if (!b)
			return BH_TLS_BAD;
		__u8 c = *b;
		if ((__u8)(c - 'A') < 26)
			c |= 0x20; /* ASCII lowercase */
		bh_sni_hash_char(st, c);
		/* The log keeps the first BH_SNI_LOG_LEN bytes; later ones overwrite the last slot. */
		__u32 idx = st->name_got < BH_SNI_LOG_LEN ? st->name_got : BH_SNI_LOG_LEN - 1;
		asm volatile("" : "+r"(idx)); /* keep the mask clang would drop: the verifier needs it */
		st->name[idx & (BH_SNI_LOG_LEN - 1)] = c;
		st->last = c;
		st->name_got++;
	}
	if (st->name_got < st->name_len)
		return BH_TLS_CONT; /* more name bytes in this segment: next call */
	int have = 1;
	if (st->last == '.') {
		/* A trailing dot is not part of the name (a fully qualified spelling). */
		bh_sni_unhash_dot(st);
		if (st->name_len <= BH_SNI_LOG_LEN)
			st->name[(st->name_len - 1) & (BH_SNI_LOG_LEN - 1)] = 0;
		if (st->wild_at == st->name_len - 1)
			st->flags &= ~BH_SNIF_WILD; /* "a.": its only dot was the trailing one */
		have = st->name_len > 1;      /* "." alone names nothing */
	}
	if (have)
		st->flags |= BH_SNIF_HAVE_NAME;
	st->want = st->name_off + st->name_len;
	st->step = BH_TLS_EXT_HDR;
	if (st->want == st->ext_end)
		return BH_TLS_DONE;
	if (st->want + 4 > st->ext_end)
		return BH_TLS_BAD;
	return BH_TLS_CONT;
}

/*
 * Eight bytes (as loaded from the packet) lowercased at once, exactly as
 * bh_tls_lower does each: per byte, bit 7 of lo7 + 0x3f is "low 7 bits >= 'A'",
 * of lo7 + 0x25 "> 'Z'" (no carry crosses bytes: lo7 <= 0x7f); a byte with
 * bit 7 set is no letter.
 */
static __always_inline __u64 bh_tls_lower8(__u64 v)
{
	__u64 lo7 = v & 0x7f7f7f7f7f7f7f7fULL;
	__u64 upper = (lo7 + 0x3f3f3f3f3f3f3f3fULL) & ~(lo7 + 0x2525252525252525ULL) & ~v & 0x8080808080808080ULL;
	return v | (upper >> 2);
}

/* Shift that brings the k-th byte in memory of a loaded 64-bit word to the bottom. */
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BH_TLS_BYTE_SHIFT(k) (56 - 8 * (k))
#else
#define BH_TLS_BYTE_SHIFT(k) (8 * (k))
#endif

/* ASCII lowercase without a branch: c | 0x20 iff 'A' <= c <= 'Z'. */
static __always_inline __u32 bh_tls_lower(__u32 c)
{
	__u32 x = c - 'A';
	return c | ((((x - 26) & ~x) >> 26) & 0x20);
}

/*
 * `v` passed through a field of st: read back from the map value it carries
 * no range. Loop exits reach the code after a loop with ranges that differ
 * by iteration (the verifier refines them at each comparison); laundered
 * this way they become one state for the verifier instead of one per exit.
 */
#define BH_TLS_FORGET(field, v) ({ (field) = (v); *(volatile __typeof__(field) *)&(field); })

/*
 * The wildcard form of a name the one-shot path hashed (BH_SNIF_WILD_LATER),
 * made from the log when the exact name matched nothing: that path takes only
 * names the log holds whole, lowercased, without a trailing dot. Same result
 * as the streaming parser's (tests/bpf: test_one_shot_and_streaming_parsers_agree).
 */
static __always_inline void bh_sni_wild_from_log(struct bh_sni_state *st)
{
	__u64 n = st->name_len - (st->last == '.');
	__u64 i;
	for (i = 0; i < BH_SNI_LOG_LEN; i++) {
		asm volatile("" : "+r"(i)); /* keep i as the bound the verifier sees */
		if (i >= n || st->name[i & (BH_SNI_LOG_LEN - 1)] == '.')
			break;
	}
	st->flags &= ~BH_SNIF_WILD_LATER;
	__u64 dot = BH_TLS_FORGET(st->wild_at, i);
	n = st->name_len - (st->last == '.'); /* read again: no range from the loop's exits */
	if (dot >= n)
		return; /* no dot: no wildcard form */
	__u64 w64 = (((BH_FNV64_BASIS ^ '*') * BH_FNV64_PRIME) ^ '.') * BH_FNV64_PRIME;
	__u32 w32 = (((BH_FNV32_BASIS ^ '*') * BH_FNV32_PRIME) ^ '.') * BH_FNV32_PRIME;
	for (__u64 k = dot + 1, j = 0; j < BH_SNI_LOG_LEN; j++, k++) {
		asm volatile("" : "+r"(j)); /* keep j as the bound the verifier sees */
		if (k >= n)
			break;
		__u32 c = st->name[k & (BH_SNI_LOG_LEN - 1)];
		w64 = (w64 ^ c) * BH_FNV64_PRIME;
		w32 = (w32 ^ c) * BH_FNV32_PRIME;
	}
	st->w64 = w64;
	st->w32 = w32;
	st->flags |= BH_SNIF_WILD;
}

/*
 * One-shot path: the whole ClientHello in the client's first payload segment,
 * as nearly always. Every field is read straight from the packet and the walk
 * stays in registers: extension headers are skipped by their lengths and the
 * server_name extension is only noted; then its name is hashed. Returns
 * BH_TLS_DONE with st holding the result (hashes, flags, the name's log) for a
 * well-formed ClientHello; anything else (continued in a later segment,
 * malformed, more than BH_TLS_WHOLE_EXTS extensions, a name longer than
 * BH_TLS_WHOLE_NAME) returns BH_TLS_CONT, and the streaming parser, from the
 * start, gives the answer (st's parse fields are rewritten by it before use).
 * The checks are the streaming parser's, each field inside its container, so
 * the two agree on every ClientHello this path takes (tests/bpf/test_xdp_sni.py
 * sends each case whole and split).
 *
 * For the verifier, the loop bodies have no branch but their exits: a branch
 * inside a long loop makes it walk the rest of the loop again for each
 * iteration the branch was taken at (states of other iterations are evicted
 * from its cache before they can match).
 */
static __always_inline int bh_tls_whole(struct xdp_md *ctx, __u32 poff, __u32 paylen, struct bh_sni_state *st)
{
	/* Fresh packet pointers: the caller's carry the range its header parse proved,
	 * one per header layout, and would make each layout a walk of its own. */
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *h = bh_tls_ptr(data, data_end, poff, 0, 0, BH_TLS_RANDOM_END + 1);
	if (!h || paylen < BH_TLS_RANDOM_END + 1)
		return BH_TLS_CONT;
	__u32 rec_len = ((__u32)h[3] << 8) | h[4];
	__u32 hs_len = ((__u32)h[6] << 16) | ((__u32)h[7] << 8) | h[8];
	if (h[0] != BH_TLS_REC_HANDSHAKE || h[1] != 3 || h[5] != BH_TLS_HS_CLIENT_HELLO || hs_len < 38 ||
	    hs_len + 4 > rec_len)
		return BH_TLS_CONT;
	__u32 body_end = 9 + hs_len;
	/* The fixed part must be in this segment (and inside the ClientHello); the extensions may go on. */
	__u32 lim = body_end < paylen ? body_end : paylen;
	__u32 sid = h[BH_TLS_RANDOM_END];
	if (sid > 32)
		return BH_TLS_CONT;

	/* cipher suites, compression methods, extensions length */
	__u32 at = BH_TLS_RANDOM_END + 1 + sid;
	__u8 *b = bh_tls_ptr(data, data_end, poff, 0, at, 2);
	if (!b || at + 2 > lim)
		return BH_TLS_CONT;
	__u32 cs = ((__u32)b[0] << 8) | b[1];
	if (cs < 2 || (cs & 1))
		return BH_TLS_CONT;
	at += 2 + cs;
	b = bh_tls_ptr(data, data_end, poff, 0, at, 1);
	if (!b || at + 1 > lim || b[0] < 1)
		return BH_TLS_CONT;
	at += 1 + b[0];
	if (at != body_end) { /* else no extensions at all: no server name */
		b = bh_tls_ptr(data, data_end, poff, 0, at, 2);
		if (!b || at + 2 > lim || at + 2 + ((((__u32)b[0] << 8) | b[1])) != body_end)
			return BH_TLS_CONT;
		at += 2;
	}

	/*
	 * The walk: the headers must add up to the block; server_name (type 0) is
	 * counted and noted. Every way here carries other ranges for `at` and
	 * body_end: forgotten, they make the walk one state for the verifier.
	 * Offsets are 64-bit from here (no zero-extension in the JIT's code), and
	 * bounded once: every offset below the ClientHello's end is inside the
	 * mask, which is then only for the verifier.
	 */
	__u64 q = poff + BH_TLS_FORGET(st->want, at);          /* packet offsets from here */
	__u64 q_end = poff + BH_TLS_FORGET(st->body_end, body_end);
	/* headers are read up to the ClientHello's end or this segment's, whichever is first */
	__u64 q_stop = poff + (body_end < paylen ? body_end : paylen);
	if (q_end > BH_TLS_PKT_OFF_MAX)
		return BH_TLS_CONT;
	__u64 acc = 0; /* server_name extensions seen << 32 | the offset of the one */
	for (int i = 0; i < BH_TLS_WHOLE_EXTS; i++) {
		asm volatile("" : "+r"(i)); /* keep i as the bound the verifier sees */
		if (q + 4 > q_stop)
			break; /* all walked (q at the end); or the next header is not (whole) in this segment */
		b = data + (q & BH_TLS_PKT_OFF_MAX);
		if ((void *)(b + 4) > data_end)
			return BH_TLS_CONT;
		__u64 type = b[0] | b[1]; /* 0: server_name */
		__u64 next = q + 4 + (((__u64)b[2] << 8) | b[3]);
		if (next > q_end)
			return BH_TLS_CONT;
		asm volatile("" : "+r"(type)); /* keep clang from turning the next line into a branch */
		__u64 sni = (type - 1) >> 63;  /* 1 iff type 0 */
		acc += (sni << 32) | (q & -sni);
		q = next;
	}
	/*
	 * Where the walk stopped: the end (DONE), or, for a ClientHello that goes
	 * on in later segments, a header that starts in one of them (MORE: the
	 * streaming parser goes on from there; a ClientHello larger than the MSS,
	 * e.g. with post-quantum key shares, needs no extra call). Anything else
	 * is the streaming parser's, from the start: a header straddling the
	 * segment's end, more extensions than this path walks, a second
	 * server_name, one that ends in a later segment.
	 */
	__u64 end = q_end - poff;
	__u64 stop = BH_TLS_FORGET(st->want, q - poff);
	if ((stop != end && (body_end <= paylen || stop < paylen)) || acc >= (2ULL << 32))
		return BH_TLS_CONT;
	__u64 seen = acc >> 32, sni_at = (__u32)acc - poff;
	if (seen) {
		sni_at = BH_TLS_FORGET(st->name_off, sni_at);
		/* Exactly one host_name entry filling the list, filling the extension (RFC 6066 3). */
		b = data + ((poff + sni_at) & BH_TLS_PKT_OFF_MAX);
		if ((void *)(b + 9) > data_end || sni_at + 9 > end)
			return BH_TLS_CONT;
		__u32 ext_len = ((__u32)b[2] << 8) | b[3];
		__u32 list_len = ((__u32)b[4] << 8) | b[5];
		__u32 name_len = ((__u32)b[7] << 8) | b[8];
		if (list_len + 2 != ext_len || b[6] != 0 || name_len + 3 != list_len || name_len < 1 ||
		    name_len > BH_TLS_WHOLE_NAME || sni_at + 4 + ext_len > paylen /* ends in a later segment */)
			return BH_TLS_CONT;
		__u64 name_at = poff + sni_at + 9; /* packet offset of the name */
		b = data + ((name_at + name_len - 1) & BH_TLS_PKT_OFF_MAX);
		if ((void *)(b + 1) > data_end)
			return BH_TLS_CONT;
		__u8 last = *b;
		/* A trailing dot is not part of the name (a fully qualified spelling): not hashed. */
		__u64 n = name_len - (last == '.');
		/* "." alone names nothing; a name's wildcard form is made later, if needed (below) */
		st->flags |= BH_SNIF_SEEN_SNI | (n ? BH_SNIF_HAVE_NAME | BH_SNIF_WILD_LATER : 0);

		/*
		 * The name into its hash and the log. Its wildcard form ("*" + the
		 * rest from the first dot) is left for the decision to make from the
		 * log, only if the exact name matches nothing (bh_sni_wild_from_log):
		 * two hash chains here instead of four keep the loop in registers.
		 */
		__u64 h64 = BH_FNV64_BASIS;
		__u32 h32 = BH_FNV32_BASIS;
		__u64 i = 0;
		/* Eight bytes at a time: one load, lowercased together, logged with one store. */
		for (int w = 0; w < BH_TLS_WHOLE_NAME / 8; w++) {
			asm volatile("" : "+r"(w)); /* keep w as the bound the verifier sees */
			if (i + 8 > n)
				break;
			b = data + ((name_at + i) & BH_TLS_PKT_OFF_MAX);
			if ((void *)(b + 8) > data_end)
				goto undo;
			__u64 v = bh_tls_lower8(*(__u64 *)b);
			*(__u64 *)&st->name[i & (BH_SNI_LOG_LEN - 8)] = v;
#pragma unroll
			for (int k = 0; k < 8; k++) {
				__u32 c = (v >> BH_TLS_BYTE_SHIFT(k)) & 0xff;
				h64 = (h64 ^ c) * BH_FNV64_PRIME;
				h32 = (h32 ^ c) * BH_FNV32_PRIME;
			}
			i += 8;
		}
		/* The last bytes, fewer than eight, one by one. */
		i = BH_TLS_FORGET(st->name_got, i);
		for (int k = 0; k < 7; k++) {
			asm volatile("" : "+r"(k)); /* keep k as the bound the verifier sees */
			if (i >= n)
				break;
			b = data + ((name_at + i) & BH_TLS_PKT_OFF_MAX);
			if ((void *)(b + 1) > data_end)
				goto undo;
			__u32 c = bh_tls_lower(*b);
			h64 = (h64 ^ c) * BH_FNV64_PRIME;
			h32 = (h32 ^ c) * BH_FNV32_PRIME;
			st->name[i & (BH_SNI_LOG_LEN - 1)] = c;
			i++;
		}
		st->h64 = h64;
		st->h32 = h32;
		st->last = last;
		st->name_off = sni_at + 9;
		st->name_len = name_len;
		st->name_got = name_len;
	}
	st->body_end = body_end;
	st->ext_end = body_end;
	st->want = stop;
	st->step = BH_TLS_EXT_HDR;
	return stop == end ? BH_TLS_DONE : BH_TLS_MORE;
undo:
	/* Unreachable (the IP length was checked against the frame), but leave no half result. */
	st->flags &= ~(BH_SNIF_SEEN_SNI | BH_SNIF_HAVE_NAME | BH_SNIF_WILD | BH_SNIF_WILD_LATER);
	__builtin_memset(st->name, 0, sizeof(st->name));
	return BH_TLS_CONT;
}

/*
 * Advance the parse over one in-order segment by a bounded amount of work
 * (the verifier explores every loop iteration; bounded chunks keep each
 * program small). BH_TLS_CONT: call again for the same segment.
 */
static __always_inline int bh_tls_chunk(void *data, void *data_end, __u32 poff, __u32 rel, __u32 len,
					struct bh_sni_state *st)
{
	__u32 end = rel + len;

	int rc;

	if (st->got) /* a field straddling segments is being collected */
		return bh_tls_one_field(data, data_end, poff, rel, end, st);
	/*
	 * The common shape, back to back in one call: header, extensions up to
	 * the name, the name, the rest of the extensions. Each phase exits
	 * early (MORE/DONE/BAD, or CONT at a shape it doesn't take); every tail
	 * call saved is a packet re-parse and two map lookups.
	 */
	if (st->step == BH_TLS_REC_HDR) {
		rc = bh_tls_head(data, data_end, poff, rel, end, st);
		if (rc != BH_TLS_CONT || st->got || st->step != BH_TLS_EXT_HDR)
			return rc;
	}
	if (st->step == BH_TLS_EXT_HDR) {
		rc = bh_tls_exts(data, data_end, poff, rel, end, st);
		if (rc != BH_TLS_CONT || st->got)
			return rc;
	}
	if (st->step == BH_TLS_SNI_HDR) {
		rc = bh_tls_one_field(data, data_end, poff, rel, end, st);
		if (rc != BH_TLS_CONT || st->got)
			return rc;
	}
	if (st->step == BH_TLS_NAME) {
		rc = bh_tls_name(data, data_end, poff, rel, end, st);
		if (rc != BH_TLS_CONT || st->got || st->step != BH_TLS_EXT_HDR)
			return rc;
		return bh_tls_exts(data, data_end, poff, rel, end, st);
	}
	if (st->step == BH_TLS_EXT_HDR)
		return BH_TLS_CONT; /* the walk stopped after BH_TLS_EXTS_PER_CALL: next call */
	return bh_tls_one_field(data, data_end, poff, rel, end, st);
}

#endif /* BH_TLS_H */

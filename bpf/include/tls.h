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
 * touched, and the name is hashed as it streams past (lowercased, a
 * trailing dot dropped, plus what follows its first dot for "*." patterns),
 * so nothing needs buffering across segments. A ClientHello whole in one
 * segment, as nearly all are, takes the one-shot path (bh_tls_whole).
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

#define BH_TLS_REC_HANDSHAKE 22
#define BH_TLS_HS_CLIENT_HELLO 1
#define BH_TLS_EXT_SERVER_NAME 0
#define BH_TLS_RANDOM_END 43 /* 5 + 4 + 2 (legacy_version) + 32 (random) */
#define BH_TLS_PKT_OFF_MAX 0x3fff /* frames up to 16 KiB: beyond any MTU we attach to */

static __always_inline void bh_sni_state_init(struct bh_sni_state *st, __u32 base_seq)
{
	__builtin_memset(st, 0, sizeof(*st));
	st->h64 = BH_NH_SEED_NAME;
	st->base_seq = base_seq;
	st->step = BH_TLS_REC_HDR;
	st->rec_end = ~0U; /* no record yet */
}

/* All ones if x is nonzero... of the low bit: -(x & 1), as arithmetic (BPF has no conditional move). */
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
		if (f[0] != BH_TLS_REC_HANDSHAKE || f[1] != 3 || rec_len < 1)
			return BH_TLS_BAD;
		st->body_end = 5 + rec_len; /* the record's end, until the handshake length is known */
		st->rec_end = 5 + rec_len;
		st->want = 5;
		st->step = BH_TLS_HS_HDR;
		return BH_TLS_CONT;
	}
	case BH_TLS_HS_HDR: {
		__u32 hs_len = ((__u32)f[1] << 16) | ((__u32)f[2] << 8) | f[3];
		/* It may go on in further records (bulkhead_sni_stream follows them). */
		if (f[0] != BH_TLS_HS_CLIENT_HELLO || hs_len < 38)
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
	/* Offsets wrap (a segment's start in the parser's offsets is below 0 when it began
	 * with a record header): `at` is in the segment iff at - rel is small. */
	__u32 d = at - rel;
	__u32 o = poff + d;
	/* The verifier only tracks packet ranges for offsets it can bound below 64 KiB. */
	if (d > BH_TLS_PKT_OFF_MAX || o > BH_TLS_PKT_OFF_MAX)
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
	/* Straight from the packet only inside the first record; a shorter one: the generic path, next call. */
	if (end > st->rec_end)
		end = st->rec_end;
	if (end < BH_TLS_RANDOM_END + 1)
		return BH_TLS_CONT;
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
		/* A trailing dot is not part of the name (a fully qualified spelling): not hashed. */
		__u64 got = st->name_got;
		__u64 at_end = (((got + 1) ^ st->name_len) - 1) >> 63; /* 1 iff this is the last byte */
		bh_sni_hash_char(st, c, got, at_end & ((((__u64)c ^ '.') - 1) >> 63));
		/* The log keeps the first BH_SNI_LOG_LEN bytes; later ones overwrite the last slot. */
		__u32 idx = st->name_got < BH_SNI_LOG_LEN ? st->name_got : BH_SNI_LOG_LEN - 1;
		asm volatile("" : "+r"(idx)); /* keep the mask clang would drop: the verifier needs it */
		st->name[idx & (BH_SNI_LOG_LEN - 1)] = c;
		st->last = c;
		st->name_got++;
	}
	if (st->name_got < st->name_len)
		return BH_TLS_CONT; /* more name bytes in this segment: next call */
	/* The name is complete: the partial words, then the lengths. */
	__u32 n = st->name_len - (st->last == '.');
	if (st->last == '.' && st->name_len <= BH_SNI_LOG_LEN)
		st->name[(st->name_len - 1) & (BH_SNI_LOG_LEN - 1)] = 0;
	if (n & 7)
		st->h64 = bh_nh_word(st->h64, st->acc);
	st->h64 = bh_nh_final(st->h64, n);
	if (st->flags & BH_SNIF_WILD) {
		__u32 m = n - st->wild_at - 1;
		if (m & 7)
			st->w64 = bh_nh_word(st->w64, st->wacc);
		st->w64 = bh_nh_final(st->w64, m);
	}
	if (n) /* "." alone names nothing */
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

/*
 * `v` passed through a field of st: read back from the map value it carries
 * no range. Loop exits reach the code after a loop with ranges that differ
 * by iteration (the verifier refines them at each comparison); laundered
 * this way they become one state for the verifier instead of one per exit.
 */
#define BH_TLS_FORGET(field, v) ({ (field) = (v); *(volatile __typeof__(field) *)&(field); })

/*
 * Hash n (<= BH_SNI_LOG_LEN) name bytes at packet offset q, lowercased, and
 * log them if `log`: whole words, then the last 1..7 bytes from the word
 * that ends with them (it starts inside the name or the headers before it,
 * so it is in the packet: no byte loop). Nonzero if a bound fails (it
 * can't: the caller checked the name lies in the packet).
 */
static __always_inline int bh_nh_packet(void *data, void *data_end, __u64 q, __u64 n, __u64 h, __u8 *log,
					__u64 *out)
{
	__u64 i = 0;
	for (int w = 0; w < BH_SNI_LOG_LEN / 8; w++) {
		asm volatile("" : "+r"(w)); /* keep w as the bound the verifier sees */
		if (i + 8 > n)
			break;
		__u8 *b = data + ((q + i) & BH_TLS_PKT_OFF_MAX);
		if ((void *)(b + 8) > data_end)
			return -1;
		__u64 v = bh_tls_lower8(*(__u64 *)b);
		if (log)
			*(__u64 *)&log[i & (BH_SNI_LOG_LEN - 8)] = v;
		h = bh_nh_word(h, BH_NH_LE(v));
		i += 8;
	}
	__u64 r = (n - i) & 7;
	if (r) {
		__u8 *b = data + ((q + n - 8) & BH_TLS_PKT_OFF_MAX);
		if ((void *)(b + 8) > data_end)
			return -1;
		__u64 v = BH_NH_LE(bh_tls_lower8(*(__u64 *)b)) >> (64 - 8 * r);
		if (log)
			*(__u64 *)&log[i & (BH_SNI_LOG_LEN - 8)] = BH_NH_LE(v);
		h = bh_nh_word(h, v);
	}
	*out = bh_nh_final(h, n);
	return 0;
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
		/* "." alone names nothing */
		st->flags |= BH_SNIF_SEEN_SNI | (n ? BH_SNIF_HAVE_NAME : 0);
		/* The log holds the name and zeros after it (the search for its first dot reads it). */
		__builtin_memset(st->name, 0, sizeof(st->name));
		__u64 h64;
		if (bh_nh_packet(data, data_end, name_at, n, BH_NH_SEED_NAME, st->name, &h64))
			goto undo;
		st->h64 = h64;

		/* Its first dot, eight bytes at a time, from the log. */
		__u64 dot = BH_SNI_LOG_LEN;
		for (int k = 0; k < BH_SNI_LOG_LEN / 8; k++) {
			asm volatile("" : "+r"(k)); /* keep k as the bound the verifier sees */
			__u64 x = BH_NH_LE(*(__u64 *)&st->name[(k * 8) & (BH_SNI_LOG_LEN - 8)]) ^ BH_NH_DOTS;
			__u64 m = (x - BH_NH_ONES) & ~x & BH_NH_HIGHS; /* lowest set byte: the first '.' */
			if (m) {
				/* byte index of the lowest set 0x80: (1 << 8j) times 0x0001..07 has j in its top byte */
				dot = k * 8 + ((((m & -m) >> 7) * 0x0001020304050607ULL) >> 56);
				break;
			}
		}
		dot = BH_TLS_FORGET(st->wild_at, dot); /* one state after the loop's exits */
		if (dot < n) {
			__u64 w64;
			if (bh_nh_packet(data, data_end, name_at + dot + 1, n - dot - 1, BH_NH_SEED_REST, NULL, &w64))
				goto undo;
			st->w64 = w64;
			st->flags |= BH_SNIF_WILD;
		}
		st->last = last;
		st->name_off = sni_at + 9;
		st->name_len = name_len;
		st->name_got = name_len;
	}
	st->body_end = body_end;
	st->ext_end = body_end;
	st->rec_end = 5 + rec_len;
	st->shift = 0;
	st->rh_got = 0;
	st->want = stop;
	st->step = BH_TLS_EXT_HDR;
	return stop == end ? BH_TLS_DONE : BH_TLS_MORE;
undo:
	/* Unreachable (the IP length was checked against the frame), but leave no half result. */
	st->flags &= ~(BH_SNIF_SEEN_SNI | BH_SNIF_HAVE_NAME | BH_SNIF_WILD);
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
		if (end > st->rec_end)
			end = st->rec_end; /* the first record's end is known now */
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

/*
 * The header of the record a ClientHello continues in, at payload offset
 * rec_end + shift, collected from the segment [rel, end) (payload offsets):
 * MORE if it goes on in the next segment, CONT once it is whole and sane
 * (the parser goes on inside the new record), BAD otherwise: a handshake
 * record, TLS 1.x, not empty (RFC 8446 5.1: no zero-length handshake
 * fragments).
 */
static __always_inline int bh_tls_next_record(void *data, void *data_end, __u32 poff, __u32 rel, __u32 end,
					      struct bh_sni_state *st)
{
#pragma unroll
	for (int j = 0; j < 5; j++) {
		if (st->rh_got >= 5)
			break;
		__u32 at = st->rec_end + st->shift + st->rh_got;
		if (at >= end)
			return BH_TLS_MORE;
		__u8 *b = bh_tls_ptr(data, data_end, poff, rel, at, 1);
		if (!b)
			return BH_TLS_BAD;
		__u32 i = st->rh_got;
		asm volatile("" : "+r"(i)); /* keep the mask clang would drop: the verifier needs it */
		i &= 7;
		if (i >= sizeof(st->rh))
			return BH_TLS_BAD; /* unreachable: rh_got < 5 here */
		st->rh[i] = *b;
		st->rh_got++;
		/* Checked as they come: a stream that is not a handshake record goes no further. */
		if ((i == 0 && *b != BH_TLS_REC_HANDSHAKE) || (i == 1 && *b != 3))
			return BH_TLS_BAD;
	}
	__u32 len = ((__u32)st->rh[3] << 8) | st->rh[4];
	if (st->rh[0] != BH_TLS_REC_HANDSHAKE || st->rh[1] != 3 || len < 1)
		return BH_TLS_BAD;
	st->shift += 5;
	st->rec_end += len;
	st->rh_got = 0;
	st->flags &= ~BH_SNIF_REC_NEXT;
	return BH_TLS_CONT;
}

#endif /* BH_TLS_H */

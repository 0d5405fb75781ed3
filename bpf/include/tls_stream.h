/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tls_stream.h - the streaming ClientHello parser (bulkhead_sni_stream).
 *
 * Real ClientHellos span TCP segments (post-quantum key shares make them
 * ~1.8 KB; Chrome shuffles extension order; small MSS splits even small
 * ones), so the parser never needs the whole message at once. Its state
 * (struct bh_sni_state, in the sni_state map) is "the payload offset of the
 * next field I need, and the bytes of it collected so far". Each segment
 * advances it: fields are read only at their offsets, everything between
 * (random, cipher suites, other extensions) is skipped without being
 * touched, and the name is hashed as it streams past (sni_hash.h:
 * lowercased, a trailing dot dropped, plus what follows its first dot for
 * "*." patterns), so nothing needs buffering across segments. A ClientHello
 * whole in one segment, as nearly all are, takes the one-shot path instead
 * (bh_tls_whole, tls_parse.h); this parser takes what that one does not, and
 * goes on where it stopped for a ClientHello continued in later segments.
 *
 * Every length is checked against its container (record, ClientHello,
 * extensions block, the SNI extension) before it is used; a lie, a
 * truncation, a second server_name or a non-TLS first byte is BH_TLS_BAD.
 * Pure: no map access (bcc rewrites map calls only in the main file).
 * Included by bulkhead.c.
 */
#ifndef BH_TLS_STREAM_H
#define BH_TLS_STREAM_H

#include "consts.h"
#include "types.h"
#include "sni_hash.h"
#include "tls_parse.h"

/* A fresh parse from payload offset 0 of the flow (base_seq: the client's sequence number there). */
static __always_inline void bh_sni_state_init(struct bh_sni_state *st, __u32 base_seq)
{
	__builtin_memset(st, 0, sizeof(*st));
	st->h64 = BH_NH_SEED_NAME;
	st->base_seq = base_seq;
	st->step = BH_TLS_REC_HDR;
	st->rec_end = ~0U; /* no record yet */
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

#endif /* BH_TLS_STREAM_H */

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * tls_parse.h - what both ClientHello parsers share, and the one-shot parser.
 *
 * Shared (with tls_stream.h and bulkhead.c): the parse steps and result
 * codes, the TLS constants, packet pointers at payload offsets
 * (bh_tls_ptr) and BH_TLS_FORGET. The one-shot parser (bh_tls_whole) takes
 * a ClientHello whole in the client's first payload segment, as nearly all
 * are: read straight from the packet, decided in the same call by
 * bulkhead_sni. Whatever it does not take goes to the streaming parser
 * (tls_stream.h), which makes the same checks.
 *
 * Every length is checked against its container (record, ClientHello,
 * extensions block, the SNI extension) before it is used.
 * Pure: no map access (bcc rewrites map calls only in the main file).
 * Included by bulkhead.c and tls_stream.h.
 */
#ifndef BH_TLS_PARSE_H
#define BH_TLS_PARSE_H

#include "consts.h"
#include "types.h"
#include "sni_hash.h"

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
#define BH_TLS_CONT 3 /* this segment holds more to parse: call again (bulkhead_sni_stream tail-calls itself) */

#define BH_TLS_REC_HANDSHAKE 22
#define BH_TLS_HS_CLIENT_HELLO 1
#define BH_TLS_EXT_SERVER_NAME 0
#define BH_TLS_RANDOM_END 43 /* 5 + 4 + 2 (legacy_version) + 32 (random) */
#define BH_TLS_PKT_OFF_MAX 0x3fff /* frames up to 16 KiB: beyond any MTU we attach to */

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

#endif /* BH_TLS_PARSE_H */

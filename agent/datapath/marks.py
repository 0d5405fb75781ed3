"""Every skb->mark / ct mark value bulkhead uses, in one place.

The top byte says whose a mark is; 0x00ff0000 belongs to others and every write of ours keeps
it. The XDP side's values (BH_MARK_L7, BH_MARK_KEEP in bpf/include/consts.h) come from the ABI
mirror, so C and Python cannot disagree; the rest are the gateway plumbing's (nftables, ip rules)
and the verifier's (SO_MARK on its upstream sockets).
"""
from __future__ import annotations

from bulkhead.datapath.abi import MARK_KEEP, MARK_L7, MARK_SEG

MARK_BASE = MARK_SEG       # "bulkhead" | segment id: the segment a packet leaves by (ct mark, XDP's mark, ip rules)
MARK_MASK = 0xFF00FFFF     # the bits our ip rules compare (MARK_KEEP's belong to others)
MARK_L7_MASK = 0xFF000000  # MARK_L7 | segment id: XDP steers the packet to the verifier
L7_TABLE = MARK_L7         # routing table for local delivery of steered packets
SEGMENT_ID_MAX = 0xFFFF

__all__ = ["L7_TABLE", "MARK_BASE", "MARK_KEEP", "MARK_L7", "MARK_L7_MASK", "MARK_MASK", "MARK_SEG", "segment_mark"]


def segment_mark(segment_id: int) -> int:
    """The mark of a segment's flows: replies and verifier upstreams leave by its table."""
    if not 1 <= segment_id <= SEGMENT_ID_MAX:
        raise ValueError(f"segment id {segment_id} outside 1..{SEGMENT_ID_MAX}")
    return MARK_BASE | segment_id

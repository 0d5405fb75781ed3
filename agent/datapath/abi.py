"""Userspace mirror of bpf/include/{enums,types,consts}.h.

Every struct here matches its C twin field by field (ctypes lays them out
with the same natural alignment as clang does for BPF). tests/bpf/test_abi_btf.py
compares structs and enums with the compiled object's BTF, tests/unit/test_abi.py
the constants with the headers; both fail if names, values, sizes or offsets drift.
"""
from __future__ import annotations

import ctypes as C
import enum

from bulkhead.core.names import AUDIT, DROP, PASS, REJECT


class Action(enum.IntEnum):
    NONE = 0
    ALLOW = 1
    DENY = 2
    REJECT = 3
    L7 = 4
    SNI = 5


ACTF_AUDIT = 0x01
FLOWF_REPLY = 0x02
FLOWF_VIA_VIP = 0x04  # from another gateway, for a service address its client dialed there
FLOWF_T_HS = 0x08
FLOWF_T_DATA = 0x10
FLOWF_ENDED = 0x20
FLOWF_NAT = 0x40  # a service address: forward packets' destination translated, replies' source back
FLOWF_TRANSIT = 0x80  # the other end is behind another gateway: through the transit tunnel
FLOWF_OBSERVE = FLOWF_T_HS | FLOWF_T_DATA
FLOWX_HOP_CLASSIFY = 0x02  # bh_flow.xflags: a transit TCP flow whose first client payload is not seen yet
FLOWX_HOP = 0x04  # bh_flow.xflags: its requests are timed per hop (req_hop)
HOP_HTTP = 1  # bh_hop.kind, and a BH_FE_HOP event's prev_reason
HOP_TLS = 2
HOPS_REQ = 0x01  # bh_hop.state
HOPS_RESP = 0x02
HOPS_TOLD = 0x04
HOPS_APP = 0x08
FLOWX_SNAT = 0x01  # bh_flow.xflags: from the transit into a segment that translates sources (transit_snat)


class Reason(enum.IntEnum):
    UNSPEC = 0
    PASS_NON_IP = 1
    PASS_IPV6_CONTROL = 2
    ALLOW_RULE = 3
    ALLOW_DEFAULT = 4
    ALLOW_REPLY = 5
    DENY_RULE = 6
    DENY_DEFAULT = 7
    REJECT_RULE = 8
    AUDIT_RULE = 9
    AUDIT_DEFAULT = 10
    NO_POLICY = 11
    NO_SEGMENT = 12
    MALFORMED_L2 = 13
    VLAN_TOO_DEEP = 14
    MALFORMED_IPV4 = 15
    MALFORMED_IPV6 = 16
    IPV6_EXT_CHAIN = 17
    MALFORMED_L4 = 18
    FRAG_NO_FLOW = 19
    PUNT_NO_HANDLER = 20
    FLOW_COLLISION = 21
    ICMP_ERROR_RELATED = 22
    ICMP_ERROR_NO_FLOW = 23
    REJECT_FAILED = 24
    SNI_PENDING = 25
    SNI_HOLD = 26
    SNI_UNKNOWN = 27
    SNI_UNKNOWN_ALLOW = 28
    SNI_OUT_OF_ORDER = 29
    L7_STEER = 30
    L7_UPSTREAM = 31
    L7_NO_META = 32
    TAIL_CALL_MISSED = 33
    TRANSIT_UNKNOWN_PEER = 34
    TRANSIT_BAD_IDENTITY = 35
    TRANSIT_BAD_SEGMENT = 36
    TRANSIT_NO_TUNNEL = 37
    SNI_FRONTING = 38
    TRANSIT_SNAT_FULL = 39
    TRANSIT_SNAT_LOST = 40


class Event(enum.IntEnum):
    FLOW_NEW = 0
    FLOW_RECLASSIFY = 1
    FLOW_INSERT_FAILED = 2
    FRAG_INSERT_FAILED = 3
    REJECT_TCP_RST = 4
    REJECT_ICMP = 5
    FRAG_FIRST = 6
    FRAG_FOLLOW = 7
    SNI_SEGMENT = 8
    SNI_DECIDED = 9
    SNI_STATE_FAILED = 10
    RESET_ONWARD = 11
    FLOW_EVENT_LOST = 12
    FLOW_ENTRY_NEW = 13
    LAT_SAMPLE = 14
    LAT_HIST_FULL = 15
    PAIR_FULL = 16
    SNI_STATE_LOST = 17
    REJECT_VIA_TC = 18
    OBSERVE_MISSED = 19
    FWD_REDIRECT = 20
    FWD_LOCAL = 21
    FWD_NO_NEIGH = 22
    FWD_NO_TARGET = 23
    FWD_PACKET = 24
    FWD_FIB_OTHER = 25
    FWD_OTHER_SEGMENT = 26
    FWD_TAIL_MISSED = 27
    FWD_CSUM_PARTIAL = 28
    TRANSIT_ENCAP = 29
    TRANSIT_DECAP = 30
    VIP_NAT = 31


class FabKind(enum.IntEnum):
    """What a fab_N key names (bh_fab_key.kind), and what its value (bh_fab_val) holds."""
    SELF = 1  # id 0: a = this gateway's id, b = ifindex of the transit device (0: none), addr = its transit address
    VIP = 2  # addr = a service address: a = its app, b = the app's segment, addr = the real address
    REAL = 3  # addr = that real address: a = the app, addr = its service address of the same family
    SEG = 4  # id = a segment (every one of the policy): a = its gateway's id
    APP = 5  # id = an app with a segment: a = its segment, b = its gateway's id
    PEER = 6  # addr = a gateway's transit address: a = that gateway's id
    GW = 7  # id = a gateway's id: addr = its transit address, a = 4 or 6
    SNAT4 = 8  # id = a segment of this gateway with transit_snat: addr = the IPv4 source flows from other gateways take
    SNAT6 = 9  # as SNAT4, the IPv6 source


# The kinds by the names the policy side uses (one definition: the enum above).
FAB_SELF, FAB_VIP, FAB_REAL, FAB_SEG, FAB_APP, FAB_PEER, FAB_GW, FAB_SNAT4, FAB_SNAT6 = FabKind


class FlowEv(enum.IntEnum):
    """Kind of a flow_events record."""
    NONE = 0
    NEW = 1
    CHANGE = 2
    END = 3
    HOP = 4


class Lat(enum.IntEnum):
    """Hop-latency histogram kinds (lat_hist)."""
    SERVER_RTT = 0
    CLIENT_RTT = 1
    SERVER_TIME = 2


# The verdict class of each reason: what a user sees in `status`.
REASON_VERDICT = {
    Reason.UNSPEC: DROP,
    Reason.PASS_NON_IP: PASS,
    Reason.PASS_IPV6_CONTROL: PASS,
    Reason.ALLOW_RULE: PASS,
    Reason.ALLOW_DEFAULT: PASS,
    Reason.ALLOW_REPLY: PASS,
    Reason.DENY_RULE: DROP,
    Reason.DENY_DEFAULT: DROP,
    Reason.REJECT_RULE: REJECT,
    Reason.AUDIT_RULE: AUDIT,
    Reason.AUDIT_DEFAULT: AUDIT,
    Reason.NO_POLICY: DROP,
    Reason.NO_SEGMENT: DROP,
    Reason.MALFORMED_L2: DROP,
    Reason.VLAN_TOO_DEEP: DROP,
    Reason.MALFORMED_IPV4: DROP,
    Reason.MALFORMED_IPV6: DROP,
    Reason.IPV6_EXT_CHAIN: DROP,
    Reason.MALFORMED_L4: DROP,
    Reason.FRAG_NO_FLOW: DROP,
    Reason.PUNT_NO_HANDLER: DROP,
    Reason.FLOW_COLLISION: DROP,
    Reason.ICMP_ERROR_RELATED: PASS,
    Reason.ICMP_ERROR_NO_FLOW: DROP,
    Reason.REJECT_FAILED: DROP,
    Reason.SNI_PENDING: PASS,
    Reason.SNI_HOLD: DROP,
    Reason.SNI_UNKNOWN: DROP,
    Reason.SNI_UNKNOWN_ALLOW: PASS,
    Reason.SNI_OUT_OF_ORDER: DROP,
    Reason.L7_STEER: PASS,
    Reason.L7_UPSTREAM: PASS,
    Reason.L7_NO_META: DROP,
    Reason.TAIL_CALL_MISSED: DROP,
    Reason.TRANSIT_UNKNOWN_PEER: DROP,
    Reason.TRANSIT_BAD_IDENTITY: DROP,
    Reason.TRANSIT_BAD_SEGMENT: DROP,
    Reason.TRANSIT_NO_TUNNEL: DROP,
    Reason.SNI_FRONTING: DROP,
    Reason.TRANSIT_SNAT_FULL: DROP,
    Reason.TRANSIT_SNAT_LOST: DROP,
}

# consts.h
REASON_MAX = 64
EVENT_MAX = 32
NUM_SLOTS = 2
VLAN_MAX_DEPTH = 2
IPV6_EXT_MAX = 6
SEG_BITS = 32
V4MAPPED_BITS = 96
POLICY_PLEN_ANY_PROTO = 64
POLICY_PLEN_ANY_PORT = 72
POLICY_PLEN_PORT_BASE = 80
CTL_BYPASS_FLOWS = 0x1
CTL_L7_READY = 0x2
CTL_SNI_BENCH = 0x4
CTL_NO_FASTPATH = 0x8
CTL_BENCH_NEW_FLOW = 0x10  # -DBH_BENCH builds only: every packet a new 5-tuple
SLOTF_AUDIT = 0x1
SLOTF_SRC_LPM = 0x2
SLOTF_DST_LPM = 0x4
SLOTF_POL_LPM = 0x8
SLOTF_SNI_ANY = 0x10
SLOTF_FABRIC = 0x20  # the slot has fab_N entries: service addresses or transit
APP_ANY = 0xFFFFFFFF
META_MAGIC = 0xB4E7A11D
SEND_BACK_NS = 10_000_000  # a pending reject answer older than this never reached TC (BH_NO_XDP_META)
METAF_SEND_BACK = 0x1
METAF_FORWARD = 0x2
METAF_SLOT1 = 0x4
METAF_FABRIC = 0x8  # a flow through the fabric (FLOWF_NAT / FLOWF_TRANSIT): bulkhead_tc translates, encapsulates
METAF_REASON_SHIFT = 8
MARK_L7 = 0x0C000000
MARK_KEEP = 0x00FF0000
MARK_SEG = 0x0B000000
# the transit VNI: the destination segment, and a bit saying the client dialed a service address
VNI_SEG_MASK = 0xFFFF
VNI_VIA_VIP = 0x10000
VNI_HOP_SHIFT = 17  # bits 17-23: the server's gateway's part of a request (hop_code)
VNI_HOP_MASK = 0xFE0000
TLS_EXTS_PER_CALL = 32
TLS_NAME_PER_CALL = 64
TLS_WHOLE_EXTS = 32
TLS_WHOLE_NAME = 64
TLS_NAME_MAX = 255
SNI_LOG_LEN = 64
SNIF_HAVE_NAME = 0x01
SNIF_WILD = 0x02
SNIF_STREAM = 0x04
SNIF_DONE = 0x08
SNIF_SEEN_SNI = 0x10
SNIF_REC_NEXT = 0x20
SNIF_TAIL = 0x40
# bh_flow.sni_flags: what a flow entry knows of the flow's TLS server name
FSNI_NAME = 0x01
FSNI_WILD = 0x02
FSNI_STREAM = 0x04
FSNI_DONE = 0x08
POLICY_PLEN_EXACT = POLICY_PLEN_PORT_BASE + 16
SRC_PLEN_HOST = SEG_BITS + 128
DST_PLEN_HOST = 128

LAT_BUCKETS = 28
LAT_SHIFT = 10
# Audit reasons: would-deny, passed. Shown as verdict "audit", never as a deny.
AUDIT_REASONS = frozenset({Reason.AUDIT_RULE, Reason.AUDIT_DEFAULT})


def verdict_of(reason: int) -> str:
    """The verdict class (core.names.VERDICTS) of a reason number; unknown numbers are drops.

    The one classification every room uses (status, flows, metrics, top): a would-deny
    (audit_rule, audit_default) is "audit", never a deny.
    """
    try:
        return REASON_VERDICT[Reason(reason)]
    except (ValueError, KeyError):
        return DROP

# Default map sizes (consts.h); the loader may override them with -D.
DEFAULT_SIZES = {
    "BH_MAX_IFINDEX": 65536,
    "BH_MAX_IDENT": 262144,
    "BH_MAX_POLICY": 524288,
    "BH_MAX_FLOWS": 262144,
    "BH_MAX_FRAGS": 16384,
    "BH_MAX_SNI": 262144,
    "BH_MAX_SNI_PARSE": 65536,
    "BH_MAX_LAT": 65536,
    "BH_MAX_PAIRS": 65536,
    "BH_EVENT_RING_PAGES": 512,
}

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class Meta(C.Structure):
    _fields_ = [("magic", u32), ("mark", u32), ("flags", u32)]


class Ctl(C.Structure):
    _fields_ = [("active_slot", u32), ("flags", u32)]


class SlotCfg(C.Structure):
    _fields_ = [
        ("generation", u32),
        ("default_action", u8),
        ("flags", u8),
        ("unknown_sni", u8),
        ("pad", u8),
    ]


class SegVal(C.Structure):
    _fields_ = [("segment_id", u32), ("flags", u32)]


class IfCfg(C.Structure):
    _fields_ = [("reject_path", u8), ("redirect_ok", u8), ("pad", u8 * 2)]


class Hop(C.Structure):
    """req_hop: the timed request/response turn of a flow through the transit."""
    _fields_ = [("t_req", u32), ("t_first", u32), ("t_last", u32), ("crtt", u32), ("turns", u16),
                ("kind", u8), ("state", u8), ("far_first", u8), ("far_last", u8), ("far_srtt", u8), ("pad", u8)]


class SendBack(C.Structure):
    """send_back_pending (kernels without bpf_xdp_adjust_meta): answers on their way to TC."""
    _fields_ = [("count", u32), ("pad", u32), ("ts_ns", u64)]


class SrcKey(C.Structure):
    _fields_ = [("prefixlen", u32), ("segment_id", u32), ("addr", u8 * 16)]


class DstKey(C.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class Ident(C.Structure):
    _fields_ = [("app_id", u32), ("segment_id", u32)]


class PolicyKey(C.Structure):
    _fields_ = [
        ("prefixlen", u32),
        ("src_app", u32),
        ("dst_app", u32),
        ("proto", u8),
        ("pad", u8),
        ("dport_be", u16),
    ]


class PolicyVal(C.Structure):
    _fields_ = [("action", u8), ("flags", u8), ("pad", u16), ("rule_id", u32)]


class FabKey(C.Structure):
    _fields_ = [("kind", u32), ("id", u32), ("addr", u8 * 16)]


class FabVal(C.Structure):
    _fields_ = [("a", u32), ("b", u32), ("addr", u8 * 16)]


class Addr16(C.Structure):
    _fields_ = [("a", u8 * 16)]


class Flow4Key(C.Structure):
    _fields_ = [
        ("saddr_be", u32),
        ("daddr_be", u32),
        ("sport_be", u16),
        ("dport_be", u16),
        ("proto", u8),
        ("pad", u8),
        ("segment_id", u16),
    ]


class Flow6Key(C.Structure):
    _fields_ = [
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("sport_be", u16),
        ("dport_be", u16),
        ("proto", u8),
        ("pad", u8),
        ("segment_id", u16),
    ]


class HopScratch(C.Structure):
    _fields_ = [("k", Flow6Key), ("n", Hop)]


class Flow(C.Structure):
    _fields_ = [
        ("last_seen_ns", u64),
        ("packets", u64),
        ("bytes", u64),
        ("generation", u32),
        ("rule_id", u32),
        ("src_app", u32),
        ("dst_app", u32),
        ("peer_segment", u16),
        ("action", u8),
        ("flags", u8),
        ("reason", u8),
        ("sni_flags", u8),
        ("xflags", u8),
        ("hop_srtt", u8),
        ("t_a", u32),
        ("t_b", u32),
        ("sni_h", u64),
        ("sni_w", u64),
        ("sni_seq", u32),
        ("snat_port_be", u16),
        ("pad2", u16),
    ]


class SnatKey(C.Structure):
    _fields_ = [
        ("saddr", u8 * 16),
        ("sport_be", u16),
        ("dport_be", u16),
        ("proto", u8),
        ("family", u8),
        ("segment_id", u16),
    ]


class SnatVal(C.Structure):
    _fields_ = [("addr", u8 * 16), ("port_be", u16), ("pad", u16), ("pad2", u32)]


class FragKey(C.Structure):
    _fields_ = [
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("id", u32),
        ("proto", u8),
        ("pad", u8),
        ("segment_id", u16),
    ]


class Frag(C.Structure):
    _fields_ = [
        ("last_seen_ns", u64),
        ("xdp_action", u8),
        ("reason", u8),
        ("pad", u8 * 6),
    ]


class SniKey(C.Structure):
    _fields_ = [
        ("name_hash", u64),
        ("src_app", u32),
        ("dst_app", u32),
        ("dport_be", u16),
        ("proto", u8),
        ("pad", u8 * 5),
    ]


class SniVal(C.Structure):
    _fields_ = [
        ("action", u8),
        ("flags", u8),
        ("pad", u16),
        ("rule_id", u32),
        ("app_id", u32),
    ]


class SniState(C.Structure):
    _fields_ = [
        ("h64", u64),
        ("w64", u64),
        ("acc", u64),
        ("wacc", u64),
        ("base_seq", u32),
        ("next_rel", u32),
        ("want", u32),
        ("body_end", u32),
        ("ext_end", u32),
        ("name_off", u32),
        ("name_len", u16),
        ("name_got", u16),
        ("step", u8),
        ("got", u8),
        ("flags", u8),
        ("pad1", u8),
        ("field", u8 * 6),
        ("last", u8),
        ("wild_at", u8),
        ("poff", u32),
        ("rec_end", u32),
        ("shift", u32),
        ("rh", u8 * 5),
        ("rh_got", u8),
        ("pad", u8 * 6),
        ("name", u8 * 64),
    ]


class FlowEvent(C.Structure):
    _fields_ = [
        ("ts_ns", u64),
        ("packets", u64),
        ("bytes", u64),
        ("r_packets", u64),
        ("r_bytes", u64),
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("sport_be", u16),
        ("dport_be", u16),
        ("src_app", u32),
        ("dst_app", u32),
        ("rule_id", u32),
        ("generation", u32),
        ("segment_id", u16),
        ("peer_segment", u16),
        ("kind", u8),
        ("family", u8),
        ("proto", u8),
        ("reason", u8),
        ("prev_reason", u8),
        ("flags", u8),
        ("tcp_flags", u8),
        ("sni_len", u8),
        ("sni", u8 * 64),
        ("snat_port_be", u16),
        ("xflags", u8),
        ("pad", u8 * 5),
    ]


class LatKey(C.Structure):
    _fields_ = [("src_app", u32), ("dst_app", u32), ("kind", u8), ("bucket", u8), ("pad", u16)]


class LatVal(C.Structure):
    _fields_ = [("count", u64), ("sum_units", u64)]


class PairKey(C.Structure):
    _fields_ = [("src_app", u32), ("dst_app", u32), ("rule_id", u32), ("reason", u8), ("pad", u8 * 3)]


class Counter(C.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


# C struct name -> mirror, for the drift test.
STRUCTS = {
    "bh_meta": Meta,
    "bh_ctl": Ctl,
    "bh_slot_cfg": SlotCfg,
    "bh_seg_val": SegVal,
    "bh_if_cfg": IfCfg,
    "bh_send_back": SendBack,
    "bh_hop": Hop,
    "bh_hop_scratch": HopScratch,
    "bh_src_key": SrcKey,
    "bh_dst_key": DstKey,
    "bh_ident": Ident,
    "bh_policy_key": PolicyKey,
    "bh_policy_val": PolicyVal,
    "bh_fab_key": FabKey,
    "bh_fab_val": FabVal,
    "bh_snat_key": SnatKey,
    "bh_snat_val": SnatVal,
    "bh_addr16": Addr16,
    "bh_flow4_key": Flow4Key,
    "bh_flow6_key": Flow6Key,
    "bh_flow": Flow,
    "bh_frag_key": FragKey,
    "bh_frag": Frag,
    "bh_sni_key": SniKey,
    "bh_sni_val": SniVal,
    "bh_sni_state": SniState,
    "bh_counter": Counter,
    "bh_flow_event": FlowEvent,
    "bh_lat_key": LatKey,
    "bh_lat_val": LatVal,
    "bh_pair_key": PairKey,
}

class Tail(enum.IntEnum):
    REJECT = 0
    SNI = 1
    RESET_ONWARD = 2
    MAIN = 3
    OBSERVE = 4
    SNI_STREAM = 5
    FORWARD = 6


class RejectPath(enum.IntEnum):
    """if_cfg.reject_path: how a reject answer leaves its interface (status shows the lower-case name)."""

    XDP_TX = 0
    TC = 1


ENUMS = {"bh_action": Action, "bh_reason": Reason, "bh_event": Event, "bh_tail": Tail, "bh_flow_ev": FlowEv,
         "bh_lat": Lat, "bh_reject_path": RejectPath, "bh_fab_kind": FabKind}

"""In-kernel TLS SNI: ClientHellos through BPF_PROG_TEST_RUN.

The base policy gates web -> payments tcp/9443 on the server name
(RULE_PAY_SNI); this module adds the name table. Each case opens the flow
with a SYN, then sends the ClientHello in one or more segments and checks
the verdict of every segment.
"""
from __future__ import annotations

import contextlib
import ctypes as C
import os
import struct

import pytest
from scapy.all import IP, TCP, IPv6, Raw

from bulkhead.datapath import abi, libbpf
from bulkhead.policy import sni

from .conftest import APP_PAY, APP_WEB, C4, C6, PAY4, PAY6, E, R, X, base_bundle

PORT = 9443
RULE_NAME_ALLOW, RULE_WILD_ALLOW, RULE_NAME_DENY, RULE_NAME_REJECT, RULE_ANYPORT = 20, 21, 22, 23, 24


def name_entry(pattern: str, action: int, rule: int, port: int = PORT) -> tuple:
    return (sni.name_hash(pattern), APP_WEB, APP_PAY, port, action, 0, rule, APP_PAY)


NAMES = [
    name_entry("pay.example.internal", abi.Action.ALLOW, RULE_NAME_ALLOW),
    name_entry("*.svc.example.internal", abi.Action.ALLOW, RULE_WILD_ALLOW),
    name_entry("blocked.example.internal", abi.Action.DENY, RULE_NAME_DENY),
    name_entry("rej.example.internal", abi.Action.REJECT, RULE_NAME_REJECT),
    name_entry("any.example.internal", abi.Action.ALLOW, RULE_ANYPORT, port=0),
]


def sni_bundle(**settings):
    b = base_bundle(settings or None)
    b.sni_entries = list(NAMES)
    return b


# ------------------------------------------------------------- ClientHello
def ext(etype: int, data: bytes) -> bytes:
    return struct.pack("!HH", etype, len(data)) + data


def sni_ext(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def client_hello(name: bytes | None = b"pay.example.internal", before: int = 3, after: int = 3,
                 sid_len: int = 32, pad: int = 0, extra_sni: bool = False, grease: bool = True) -> bytes:
    """A TLS record holding a ClientHello; the SNI extension after `before` others."""
    filler = [ext(0x0a, b"\x00\x04\x00\x1d\x00\x17"), ext(0x0d, b"\x00\x04\x04\x03\x08\x04"),
              ext(0x2b, b"\x04\x03\x04\x03\x03"), ext(0x33, b"\x00\x26\x00\x1d\x00\x20" + b"k" * 32),
              ext(0x10, b"\x00\x03\x02h2"), ext(0x17, b""), ext(0xff01, b"\x00")]
    exts = []
    if grease:
        exts.append(ext(0x0a0a, b""))
    exts += [filler[i % len(filler)] for i in range(before)]
    if name is not None:
        exts.append(sni_ext(name))
    exts += [filler[(before + i) % len(filler)] for i in range(after)]
    if extra_sni:
        exts.append(sni_ext(b"other.example.internal"))
    if pad:
        exts.append(ext(0x15, b"\x00" * pad))  # RFC 7685 padding
    ext_block = b"".join(exts)
    body = (b"\x03\x03" + b"r" * 32 + bytes([sid_len]) + b"s" * sid_len
            + struct.pack("!H", 4) + b"\x13\x01\x13\x02" + b"\x01\x00"
            + struct.pack("!H", len(ext_block)) + ext_block)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


# ----------------------------------------------------------------- helpers
SPORT, ISN = 40123, 1000


def l3(v6: bool):
    return IPv6(src=C6, dst=PAY6) if v6 else IP(src=C4, dst=PAY4)


def l3_reply(v6: bool):
    return IPv6(src=PAY6, dst=C6) if v6 else IP(src=PAY4, dst=C4)


def syn(v6=False):
    return E / l3(v6) / TCP(sport=SPORT, dport=PORT, flags="S", seq=ISN - 1)


def seg(payload: bytes, offset: int, v6=False):
    return E / l3(v6) / TCP(sport=SPORT, dport=PORT, flags="PA", seq=ISN + offset, ack=1) / Raw(payload)


def server_data(v6=False):
    return E / l3_reply(v6) / TCP(sport=PORT, dport=SPORT, flags="PA", seq=5000, ack=ISN) / Raw(b"hello")


def res(v) -> tuple[X, R]:
    """(XDP code, the one reason that counted the packet, exactly once)."""
    assert len(v.reasons) == 1 and list(v.reasons.values()) == [1], v.reasons
    return X(v.retval), next(iter(v.reasons))


def send_hello(xdp, hello: bytes, cuts=(), v6=False):
    """Open the flow, send `hello` cut at `cuts`; return the deciding segment's verdict.

    Segments pass as sni_pending until one decides; the parser may decide
    before the last segment (once every extension has been walked, the rest
    of the last one is not needed), and every later segment must then get
    the same verdict from the flow cache.
    """
    xdp.expect(syn(v6), "prod", X.PASS, R.SNI_PENDING)
    bounds = [0, *cuts, len(hello)]
    decided = None
    for a, b in zip(bounds, bounds[1:]):
        v = xdp.judge(seg(hello[a:b], a, v6), "prod")
        code, reason = res(v)
        if decided is None:
            if reason == R.SNI_PENDING and b < len(hello):
                assert code == X.PASS
                continue
            decided = v
        elif res(decided)[1] != R.REJECT_RULE:  # a reset flow's later segments: reset again
            assert (code, reason) == res(decided), (a, b)
    return decided


@pytest.fixture
def sx(xdp):
    xdp.apply(sni_bundle())
    return xdp


# ------------------------------------------------------------------- cases
@pytest.mark.parametrize("name,code,reason", [
    (b"pay.example.internal", X.PASS, R.ALLOW_RULE),
    (b"PAY.Example.Internal", X.PASS, R.ALLOW_RULE),
    (b"pay.example.internal.", X.PASS, R.ALLOW_RULE),
    (b"a.svc.example.internal", X.PASS, R.ALLOW_RULE),  # wildcard: one label
    (b"a.b.svc.example.internal", X.DROP, R.DENY_DEFAULT),  # two labels: no match
    (b"svc.example.internal", X.DROP, R.DENY_DEFAULT),  # no label at all
    (b"blocked.example.internal", X.DROP, R.DENY_RULE),
    (b"rej.example.internal", X.PASS, R.REJECT_RULE),  # passed on as a RST to the server
    (b"any.example.internal", X.PASS, R.ALLOW_RULE),  # any-port entry
    (b"nobody.example.internal", X.DROP, R.DENY_DEFAULT),
    (b"x" * 255, X.DROP, R.DENY_DEFAULT),  # max-length name
    (b".", X.DROP, R.SNI_UNKNOWN),  # names nothing
], ids=lambda v: v.decode()[:40] if isinstance(v, bytes) else None)
def test_name_verdicts(sx, name, code, reason):
    v = send_hello(sx, client_hello(name))
    assert res(v) == (code, reason)


@pytest.mark.parametrize("before,after", [(0, 15), (7, 8), (15, 0), (30, 2)], ids=["first", "middle", "last", "after-30"])
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_sni_position_among_extensions(sx, before, after, v6):
    v = send_hello(sx, client_hello(before=before, after=after), v6=v6)
    assert res(v) == (X.PASS, R.ALLOW_RULE)


@pytest.mark.parametrize("sid_len", [0, 1, 16, 31, 32])
def test_session_id_lengths(sx, sid_len):
    assert res(send_hello(sx, client_hello(sid_len=sid_len)))[1] == R.ALLOW_RULE


def test_every_split_point_gives_the_same_verdict(sx):
    """Two segments, cut at every byte: fields and the name straddle segments."""
    hello = client_hello(b"blocked.example.internal", before=2, after=2, sid_len=8)
    for cut in range(1, len(hello)):
        sx.clear_flows()
        v = send_hello(sx, hello, cuts=(cut,))
        assert res(v) == (X.DROP, R.DENY_RULE), f"cut at {cut}"


def test_small_mss_many_segments(sx):
    hello = client_hello(pad=600)
    cuts = tuple(range(200, len(hello), 200))  # an MSS of 200
    assert res(send_hello(sx, hello, cuts=cuts))[1] == R.ALLOW_RULE


def test_padded_past_1500_bytes_in_two_segments(sx):
    hello = client_hello(b"a.svc.example.internal", before=5, after=1, pad=1600)
    assert len(hello) > 1500
    v = send_hello(sx, hello, cuts=(1400,))
    assert res(v) == (X.PASS, R.ALLOW_RULE)


@pytest.mark.parametrize("hello", [
    pytest.param(client_hello(None), id="no-sni"),
    pytest.param(client_hello(extra_sni=True), id="two-server-name-extensions"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: pay.example.internal\r\n\r\n", id="not-tls"),
    pytest.param(client_hello(sid_len=33), id="session-id-33"),
], )
def test_unknown_server_name(sx, hello):
    v = send_hello(sx, hello)
    assert res(v) == (X.DROP, R.SNI_UNKNOWN)


def test_two_names_in_one_server_name_list_is_malformed(sx):
    """RFC 6066: one host_name per list. Two entries in the same extension."""
    two = sni_ext(b"pay.example.internal", b"other.example.internal")
    hello = client_hello(None, before=2, after=0)
    ext_block_len_off = 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2
    old_len = int.from_bytes(hello[ext_block_len_off:ext_block_len_off + 2], "big")
    body = hello[9:] + two
    body = (body[:ext_block_len_off - 9] + (old_len + len(two)).to_bytes(2, "big")
            + body[ext_block_len_off - 9 + 2:])
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    v = send_hello(sx, b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs)
    assert res(v) == (X.DROP, R.SNI_UNKNOWN)


def test_truncated_at_every_byte_never_decides_or_passes_server_data(sx):
    """A ClientHello cut short at any byte waits for the rest: no verdict, no server payload."""
    hello = client_hello(b"blocked.example.internal", before=3, after=3)
    for cut in range(1, len(hello)):
        sx.clear_flows()
        sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
        v = sx.judge(seg(hello[:cut], 0), "prod")
        code, reason = res(v)
        # waiting, or already decided by name if the cut only removed the tail of the
        # last extension; never allowed (the name is denied) and never unknown on a prefix
        assert reason in (R.SNI_PENDING, R.DENY_RULE), (cut, reason)
        if reason == R.SNI_PENDING:
            sx.expect(server_data(), "core", X.DROP, R.SNI_HOLD)


def test_unknown_server_name_allowed_by_setting(xdp):
    xdp.apply(sni_bundle(unknown_sni="allow"))
    v = send_hello(xdp, client_hello(None))
    assert res(v) == (X.PASS, R.SNI_UNKNOWN_ALLOW)


def _lie(hello: bytes, offset: int, value: bytes) -> bytes:
    return hello[:offset] + value + hello[offset + len(value):]


@pytest.mark.parametrize("field,off,width,delta,expect", [
    # a record may carry more than the ClientHello: one byte longer is legal
    ("record+1", 3, 2, 1, R.ALLOW_RULE),
    ("record-1", 3, 2, -1, R.SNI_UNKNOWN),
    ("handshake+1", 6, 3, 1, R.SNI_UNKNOWN),
    ("handshake-1", 6, 3, -1, R.SNI_UNKNOWN),
    ("extensions+1", 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2, 2, 1, R.SNI_UNKNOWN),
    ("extensions-1", 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2, 2, -1, R.SNI_UNKNOWN),
    ("sni-list+1", None, 2, 1, R.SNI_UNKNOWN),
    ("sni-name+1", None, 2, 1, R.SNI_UNKNOWN),
    ("sni-name-1", None, 2, -1, R.SNI_UNKNOWN),
], ids=lambda v: v if isinstance(v, str) else None)
def test_lying_lengths_are_malformed(sx, field, off, width, delta, expect):
    hello = client_hello(before=0, after=2, grease=False)
    if off is None:  # inside the server_name extension, right after the extensions length
        sni_at = 5 + 4 + 2 + 32 + 1 + 32 + 2 + 4 + 2 + 2 + 4
        off = sni_at if field.startswith("sni-list") else sni_at + 3
    v0 = int.from_bytes(hello[off:off + width], "big")
    bad = hello[:off] + (v0 + delta).to_bytes(width, "big") + hello[off + width:]
    v = send_hello(sx, bad)
    assert res(v)[1] == expect


def test_truncated_clienthello_never_passes_server_data(sx):
    hello = client_hello()
    for cut in range(1, len(hello), 7):
        sx.clear_flows()
        sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
        sx.expect(seg(hello[:cut], 0), "prod", X.PASS, R.SNI_PENDING)
        sx.expect(server_data(), "core", X.DROP, R.SNI_HOLD)


def test_server_payload_held_until_allowed(sx):
    sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(server_data(), "core", X.DROP, R.SNI_HOLD)
    hello = client_hello()
    sx.expect(seg(hello, 0), "prod", X.PASS, R.ALLOW_RULE)
    sx.expect(server_data(), "core", X.PASS, R.ALLOW_REPLY)


def test_denied_flow_stays_denied(sx):
    hello = client_hello(b"blocked.example.internal")
    assert res(send_hello(sx, hello))[1] == R.DENY_RULE
    sx.expect(seg(b"more", len(hello)), "prod", X.DROP, R.DENY_RULE)
    sx.expect(server_data(), "core", X.DROP, R.DENY_RULE)


def test_out_of_order_segment_waits(sx):
    hello = client_hello(pad=300)
    sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(seg(hello[200:], 200), "prod", X.DROP, R.SNI_OUT_OF_ORDER)  # gap: the client resends
    sx.expect(seg(hello[:200], 0), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(seg(hello[:200], 0), "prod", X.PASS, R.SNI_PENDING)  # retransmission of parsed bytes
    sx.expect(seg(hello[200:], 200), "prod", X.PASS, R.ALLOW_RULE)


def test_policy_swap_redecides_from_stored_name(sx):
    hello = client_hello()
    assert res(send_hello(sx, hello))[1] == R.ALLOW_RULE
    b = sni_bundle()
    b.sni_entries = [name_entry("pay.example.internal", abi.Action.DENY, RULE_NAME_DENY)]
    sx.apply(b)
    sx.expect(server_data(), "core", X.DROP, R.DENY_RULE)


@pytest.mark.parametrize("cuts", [(), (1,)], ids=["one-shot", "streamed"])
def test_policy_swap_redecides_from_the_entry_both_ways(sx, cuts):
    """The name lives in both flow entries (no parse state is kept): a swap
    re-decides from whichever direction's packet comes first, exact names
    and "*." patterns alike, and leaves both entries agreeing."""
    hello = client_hello(b"a.svc.example.internal")
    assert res(send_hello(sx, hello, cuts=cuts))[1] == R.ALLOW_RULE
    assert not libbpf.map_keys(sx.dp.map_fds["sni_state"], abi.Flow6Key)
    b = sni_bundle()
    b.sni_entries = [name_entry("*.svc.example.internal", abi.Action.DENY, RULE_NAME_DENY)]
    sx.apply(b)
    sx.expect(server_data(), "core", X.DROP, R.DENY_RULE)  # the reply entry re-decides
    sx.expect(seg(b"more", len(hello)), "prod", X.DROP, R.DENY_RULE)
    b.sni_entries = [name_entry("a.svc.example.internal", abi.Action.ALLOW, RULE_NAME_ALLOW)]
    sx.apply(b)
    sx.expect(seg(b"more", len(hello)), "prod", X.PASS, R.ALLOW_RULE)  # the forward entry re-decides
    sx.expect(server_data(), "core", X.PASS, R.ALLOW_REPLY)
    assert {v.rule_id for _, v in sx.flows(4)} == {RULE_NAME_ALLOW}


def test_evicted_parse_is_an_unknown_name_never_a_pass(sx):
    """sni_state is LRU: a ClientHello whose parse is evicted between its
    segments can't be known any more: decided as unknown_sni, counted."""
    hello = client_hello(pad=300)
    sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(seg(hello[:200], 0), "prod", X.PASS, R.SNI_PENDING)
    fd = sx.dp.map_fds["sni_state"]
    keys = libbpf.map_keys(fd, abi.Flow6Key)
    assert len(keys) == 1
    libbpf.map_delete(fd, keys[0])
    v = sx.expect(seg(hello[200:], 200), "prod", X.DROP, R.SNI_UNKNOWN)
    assert v.events.get(abi.Event.SNI_STATE_LOST) == 1
    sx.expect(server_data(), "core", X.DROP, R.SNI_UNKNOWN)


def test_reused_tuple_reads_the_new_connections_name(sx):
    """A new connection on a 5-tuple whose last one was allowed by name asks
    for another name: it is decided by its own ClientHello, not the cache."""
    assert res(send_hello(sx, client_hello()))[1] == R.ALLOW_RULE
    assert res(send_hello(sx, client_hello(b"blocked.example.internal")))[1] == R.DENY_RULE
    assert res(send_hello(sx, client_hello(pad=300), cuts=(100,)))[1] == R.ALLOW_RULE


def records(hello: bytes, sizes, rtype: int = 22) -> bytes:
    """The ClientHello (a one-record `hello`) re-cut into TLS records of `sizes` bytes (the last takes the rest)."""
    body, out, at = hello[5:], b"", 0
    for n in list(sizes) + [len(body)]:
        chunk = body[at:at + n]
        if not chunk:
            break
        out += bytes([rtype]) + hello[1:3] + struct.pack("!H", len(chunk)) + chunk
        at += len(chunk)
    return out


@pytest.mark.parametrize("name,reason", [
    (b"pay.example.internal", R.ALLOW_RULE),
    (b"blocked.example.internal", R.DENY_RULE),
    (b"a.svc.example.internal", R.ALLOW_RULE),
    (b"nobody.example.internal", R.DENY_DEFAULT),
])
@pytest.mark.parametrize("sizes", [(2,), (60,), (100, 7), (30,) * 12, (1,) * 6],
                         ids=["hs-header-split", "two", "three", "many", "one-byte-records"])
def test_clienthello_in_several_records(sx, name, reason, sizes):
    """A ClientHello continued in further TLS records (legal; some clients and
    DPI-evasion tools do it) is followed record by record: the same verdict as
    in one record, whole in a segment or cut at every 37th byte (headers and
    the name straddle records and segments)."""
    hello = records(client_hello(name, before=4, after=4), sizes)
    assert res(send_hello(sx, hello))[1] == reason
    sx.clear_flows()
    assert res(send_hello(sx, hello, cuts=range(37, len(hello), 37)))[1] == reason
    assert not libbpf.map_keys(sx.dp.map_fds["sni_state"], abi.Flow6Key)


@pytest.mark.parametrize("hello", [
    pytest.param(lambda h: records(h, (50,))[:55] + b"\x17" + records(h, (50,))[56:], id="second-record-not-handshake"),
    pytest.param(lambda h: records(h, (50,))[:55] + b"\x16\x02" + records(h, (50,))[57:], id="second-record-not-tls1x"),
    pytest.param(lambda h: records(h, (50,))[:55] + b"\x16\x03\x01\x00\x00" + records(h, (50,))[55:],
                 id="zero-length-record"),
])
def test_malformed_record_sequences_are_unknown(sx, hello):
    got = send_hello(sx, hello(client_hello()), cuts=(20,))
    assert res(got) == (X.DROP, R.SNI_UNKNOWN)
    sx.expect(server_data(), "core", X.DROP, R.SNI_UNKNOWN)


@pytest.mark.parametrize("cut", [60, 130, 150], ids=["before-name", "mid-record", "at-record-end"])
def test_clienthello_ending_in_a_later_record(sx, cut):
    """Every extension header is in the first record, but the last extension's
    data runs on into a second one: the flow is decided only once the second
    record's header has come and is sane, never on the walk alone."""
    one = client_hello(before=3, after=3)
    first = len(one) - 5 - 3  # the first record holds all but the last 3 bytes
    hello = records(one, (first,))
    assert len(hello) == len(one) + 5
    sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    cut = min(cut, first + 5)
    sx.expect(seg(hello[:cut], 0), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(seg(hello[cut:first + 5], cut), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(server_data(), "core", X.DROP, R.SNI_HOLD)
    sx.expect(seg(hello[first + 5:first + 7], first + 5), "prod", X.PASS, R.SNI_PENDING)  # header, in part
    sx.expect(seg(hello[first + 7:], first + 7), "prod", X.PASS, R.ALLOW_RULE)
    # the same with a second record that is not a handshake record
    sx.clear_flows()
    bad = hello[:first + 5] + b"\x17" + hello[first + 6:]
    sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    sx.expect(seg(bad[:cut], 0), "prod", X.PASS, R.SNI_PENDING)
    assert res(send_rest(sx, bad, cut)) == (X.DROP, R.SNI_UNKNOWN)


def send_rest(sx, hello: bytes, at: int):
    return sx.judge(seg(hello[at:], at), "prod")


def test_records_cut_short_wait_and_hold_server_data(sx):
    hello = records(client_hello(), (50, 50))
    sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    for a, b in ((0, 40), (40, 58), (58, len(hello) - 1)):  # the second header straddles segments
        sx.expect(seg(hello[a:b], a), "prod", X.PASS, R.SNI_PENDING)
        sx.expect(server_data(), "core", X.DROP, R.SNI_HOLD)
    sx.expect(seg(hello[-1:], len(hello) - 1), "prod", X.PASS, R.ALLOW_RULE)


def test_reject_by_name_resets_both_ends(sx):
    """The deciding segment becomes a RST for the server; the client's
    retransmission of it gets a RST back (XDP sends one packet per packet)."""
    from scapy.all import Ether

    hello = client_hello(b"rej.example.internal")
    v = send_hello(sx, hello)
    assert res(v) == (X.PASS, R.REJECT_RULE) and v.events.get(abi.Event.RESET_ONWARD) == 1
    out = Ether(v.data_out)
    ip, tcp = out[IP], out[TCP]
    assert (ip.src, ip.dst, tcp.sport, tcp.dport) == (C4, PAY4, SPORT, PORT)  # onward, not bounced
    assert tcp.flags == "RA" and tcp.seq == ISN and not bytes(tcp.payload)
    assert ip.len == 40
    ip_ok, tcp_ok = ip.chksum, tcp.chksum
    del ip.chksum, tcp.chksum
    again = Ether(bytes(out))
    assert (again[IP].chksum, again[TCP].chksum) == (ip_ok, tcp_ok)
    # the client, unanswered, retransmits: now it is reset
    r = sx.judge(seg(hello, 0), "prod")
    assert res(r) == (X.TX, R.REJECT_RULE)
    back = Ether(r.data_out)
    assert (back[IP].src, back[IP].dst, back[TCP].sport, back[TCP].dport) == (PAY4, C4, PORT, SPORT)
    assert "R" in back[TCP].flags


def _forward_entry(xdp) -> abi.Flow:
    """The one flow's forward entry (IPv4)."""
    fwd = [v for _, v in xdp.flows(4) if not v.flags & abi.FLOWF_REPLY]
    assert len(fwd) == 1, fwd
    return fwd[0]


def test_kernel_hashes_match_the_compiler(sx):
    """The name the kernel read hashes exactly like bulkhead.policy.sni, in both
    parsers; both entries of the flow keep it, and no parse state is left."""
    name = b"Mixed.Case.Example."
    for cuts in ((), (1,)):
        sx.clear_flows()
        send_hello(sx, client_hello(name), cuts=cuts)
        exact, wild = sni.lookup_hashes(name)
        assert (exact, wild) == (sni.name_hash("mixed.case.example"), sni.name_hash("*.case.example"))
        entries = [v for _, v in sx.flows(4)]
        assert len(entries) == 2
        for v in entries:
            assert (v.sni_h, v.sni_w) == (exact, wild), cuts
            assert v.sni_flags == abi.FSNI_DONE | abi.FSNI_NAME | abi.FSNI_WILD, cuts
        assert not libbpf.map_keys(sx.dp.map_fds["sni_state"], abi.Flow6Key), "a finished parse is not kept"


def _parse_state(xdp) -> dict:
    """What the one flow's forward entry knows of the name, once decided."""
    v = _forward_entry(xdp)
    return {"flags": v.sni_flags, "h": v.sni_h if v.sni_flags & abi.FSNI_NAME else None,
            "w": v.sni_w if v.sni_flags & abi.FSNI_WILD else None, "reason": v.reason, "rule": v.rule_id}


def _scratch_clear(xdp) -> None:
    """Zero the per-CPU scratch state on every CPU."""
    n = libbpf.possible_cpus()
    libbpf.map_update(xdp.dp.map_fds["sni_scratch"], C.c_uint32(0), (abi.SniState * n)())


@contextlib.contextmanager
def _one_cpu():
    """Keep this process on one CPU: BPF_PROG_TEST_RUN runs the program on the caller's
    CPU, and a sequence of packets must leave its scratch state on one CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _scratch_streamed(xdp) -> bool:
    """Did the last decision (the one CPU whose scratch is not zero) come from the streaming parser?"""
    n = libbpf.possible_cpus()
    vals = (abi.SniState * n)()
    key = C.c_uint32(0)
    assert libbpf.lib().bpf_map_lookup_elem(xdp.dp.map_fds["sni_scratch"], C.byref(key), C.byref(vals)) == 0
    used = [v for v in vals if v.step or v.flags or v.h64]
    assert len(used) == 1, "one decision on one CPU since the scratch was cleared"
    return bool(used[0].flags & abi.SNIF_STREAM)


@pytest.mark.parametrize("name", [
    b"pay.example.internal", b"Mixed.Case.Example.", b"a.svc.example.internal", b"noDotAtAll", b"a.", b".",
    b"..", b"a..b", b"x" * 64, b"y" * 63 + b".", b"A" * 30 + b"." + b"b" * 33, b"z" * 65, b"w." * 40,
    b"@AZ[`az{.\xc1\xda\xe1Q", b"Eight.Ok", b"NineChars", b"Sixteen.Bytes.ab", b"x.Seventeen.BYTES",
], ids=lambda v: v.decode("latin-1")[:24])
def test_one_shot_and_streaming_parsers_agree(sx, name):
    """A ClientHello whole in its segment takes the one-shot path (names up to
    BH_TLS_WHOLE_NAME); cut inside the extensions after the name, the one-shot
    path hands over to the streaming parser; cut after its first byte, the
    streaming parser does it all. All three must leave the same verdict and
    the same name hashes and flags in the flow entry, the agent's."""
    hello = client_hello(name, before=5, after=5)
    last_ext = len(hello) - 9  # the last extension (5 data bytes) starts a segment of its own
    got = {}
    for how, cuts in (("whole", ()), ("late", (last_ext,)), ("first-byte", (1,))):
        sx.clear_flows()
        with _one_cpu():
            _scratch_clear(sx)
            if how == "late":
                # the one-shot path reads the first segment and hands over to the streaming parser
                sx.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
                sx.expect(seg(hello[:last_ext], 0), "prod", X.PASS, R.SNI_PENDING)
                assert len(libbpf.map_keys(sx.dp.map_fds["sni_state"], abi.Flow6Key)) == 1, "the parse goes on"
                assert _forward_entry(sx).sni_flags == abi.FSNI_STREAM
                v = sx.judge(seg(hello[last_ext:], last_ext), "prod")
            else:
                v = send_hello(sx, hello, cuts=cuts)
            # which parser decided: a streamed parse reaches the decision with BH_SNIF_STREAM set
            one_shot = how == "whole" and len(name) <= abi.TLS_WHOLE_NAME
            assert _scratch_streamed(sx) == (not one_shot), how
        got[how] = (res(v), _parse_state(sx))
        assert not libbpf.map_keys(sx.dp.map_fds["sni_state"], abi.Flow6Key), (how, "a finished parse is not kept")
    assert got["whole"] == got["late"] == got["first-byte"]
    exact, wild = sni.lookup_hashes(name)
    flags = got["whole"][1]["flags"]
    if flags & abi.FSNI_NAME:
        assert got["whole"][1]["h"] == exact
        assert got["whole"][1]["w"] == wild
    else:
        assert sni.normalize(name) in (b"", b".")
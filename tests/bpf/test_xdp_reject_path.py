"""How a reject answer leaves its interface: the reject path (if_cfg, bh_reject_send, bulkhead_tc).

XDP_TX from native XDP on a veth lands on the peer's XDP ring, which only a
peer with an XDP program of its own drains: a client behind a plain veth
never gets its RST. On such interfaces (the loader picks the path per
interface at attach, loader.choose_reject_path) XDP builds the answer in
place as always, marks it BH_METAF_SEND_BACK in the XDP metadata and passes
it; bulkhead_tc on clsact ingress redirects it out of the same interface.

BPF_PROG_TEST_RUN covers the XDP side byte for byte. It can't give a
SCHED_CLS program XDP metadata (the skb test run has no data_meta input),
so bulkhead_tc's send-back branch is tested with real frames instead: a
SYN injected on a veth peer that has no XDP program, the RST read back on it.
"""
from __future__ import annotations

import contextlib
import ctypes as C
import os
import socket
import struct
import time

import pytest
from pyroute2 import IPRoute
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, IPv6, Raw, raw

from bulkhead.datapath import abi, libbpf, loader

from .conftest import C4, C6, CLIENT_MAC, EV, PAY4, PAY6, X, E, R
from .test_xdp_policy import check_rst, check_unreachable

META = struct.Struct("=III")  # struct bh_meta: magic, mark, flags
SEND_BACK = (abi.META_MAGIC, 0, abi.METAF_SEND_BACK)
TC_ACT_OK = 0
TC_ACT_REDIRECT = 7
P = abi.RejectPath


@contextlib.contextmanager
def reject_path(xdp, ifname: str, path: abi.RejectPath):
    """if_cfg[ifname] = path inside the block; back to the default (XDP_TX) after it."""
    ifindex = xdp.ifindex[ifname]
    xdp.dp.set_reject_path(ifindex, path)
    try:
        assert xdp.dp.reject_path(ifindex) == loader.REJECT_PATH_NAMES[path]
        yield
    finally:
        xdp.dp.set_reject_path(ifindex, P.XDP_TX)


def run_with_meta(xdp, frame: bytes, ifname: str, meta_len: int) -> tuple[int, bytes]:
    """bulkhead_xdp on a frame that already carries `meta_len` bytes of XDP metadata
    -> (XDP code, output from data_meta on)."""
    buf_in = C.create_string_buffer(b"\xee" * meta_len + frame, meta_len + len(frame))
    buf_out = C.create_string_buffer(meta_len + len(frame) + 256)
    ctx = libbpf.XdpMd(data=meta_len, data_end=meta_len + len(frame), ingress_ifindex=xdp.ifindex[ifname])
    opts = libbpf.TestRunOpts(sz=C.sizeof(libbpf.TestRunOpts), repeat=1)
    opts.data_in, opts.data_size_in = C.cast(buf_in, C.c_void_p), meta_len + len(frame)
    opts.data_out, opts.data_size_out = C.cast(buf_out, C.c_void_p), len(buf_out)
    opts.ctx_in, opts.ctx_size_in = C.cast(C.pointer(ctx), C.c_void_p), C.sizeof(ctx)
    libbpf._check(libbpf.lib().bpf_prog_test_run_opts(xdp.dp.prog_fd(), C.byref(opts)), "test run")
    return opts.retval, buf_out.raw[: opts.data_size_out]


@contextlib.contextmanager
def one_cpu():
    """Run the block on one CPU: the XDP and TC test runs then share the per-CPU
    send_back_pending of kernels without XDP metadata, as a real packet's do."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def sent_back(xdp, v, frame: bytes, ifname: str) -> bytes:
    """The answer XDP built and passed up for bulkhead_tc to send back out of `ifname`:
    behind SEND_BACK metadata; on a kernel without XDP metadata, with nothing in front,
    counted as pending, and bulkhead_tc takes it (redirect out of the ingress device) and
    spends the count. Returns the answer frame. Call inside one_cpu()."""
    if xdp.meta:
        assert META.unpack(v.data_out[: META.size]) == SEND_BACK
        return v.data_out[META.size:]
    answer = v.data_out
    assert Ether(answer).dst == Ether(frame).src, "addressed to the client (PACKET_OTHERHOST here)"
    n = xdp.send_back_pending()
    assert n >= 1
    code, out, _mark = xdp.tc(answer, ifname)
    assert (code, out) == (TC_ACT_REDIRECT, answer)
    assert xdp.send_back_pending() == n - 1
    return answer


def syn(dport=22, v6=False, vlan=None):
    ip = IPv6(src=C6, dst=PAY6) if v6 else IP(src=C4, dst=PAY4)
    l2 = E / Dot1Q(vlan=vlan) if vlan else E
    return raw(l2 / ip / TCP(sport=40000, dport=dport, flags="S", seq=1000))


# ------------------------------------------------------------- XDP side
@pytest.mark.parametrize("frame", [syn(), syn(v6=True), syn(vlan=10)], ids=["v4", "v6", "vlan"])
def test_tc_path_passes_the_rst_behind_send_back_metadata(xdp, frame):
    with reject_path(xdp, "prod", P.TC), one_cpu():
        v = xdp.expect(frame, "prod", X.PASS, R.REJECT_RULE)
        answer = sent_back(xdp, v, frame, "prod")
    assert v.events.get(EV.REJECT_TCP_RST) == 1
    check_rst(frame, answer, "RA", 0, 1001)


@pytest.mark.parametrize("frame", [
    raw(E / IP(src=C4, dst=PAY4) / UDP(sport=40000, dport=5353) / Raw(b"m" * 30)),
    raw(E / IPv6(src=C6, dst=PAY6) / UDP(sport=40000, dport=5353) / Raw(b"m" * 3)),
], ids=["v4", "v6"])
def test_tc_path_passes_the_icmp_unreachable_behind_send_back_metadata(xdp, frame):
    with reject_path(xdp, "prod", P.TC), one_cpu():
        v = xdp.expect(frame, "prod", X.PASS, R.REJECT_RULE)
        answer = sent_back(xdp, v, frame, "prod")
    assert v.events.get(EV.REJECT_ICMP) == 1
    check_unreachable(frame, answer)


def test_the_path_is_per_interface(xdp):
    """tc on one interface leaves another's XDP_TX alone; written back to xdp_tx, XDP_TX again."""
    frame = syn()
    with reject_path(xdp, "dev", P.TC):
        v = xdp.expect(frame, "prod", X.TX, R.REJECT_RULE)
        check_rst(frame, v.data_out, "RA", 0, 1001)  # no metadata in front
        xdp.clear_flows()
        with reject_path(xdp, "prod", P.TC):
            xdp.expect(frame, "prod", X.PASS, R.REJECT_RULE)
        xdp.clear_flows()
        v = xdp.expect(frame, "prod", X.TX, R.REJECT_RULE)
        check_rst(frame, v.data_out, "RA", 0, 1001)


def test_tc_path_without_room_for_metadata_is_a_counted_drop(xdp):
    """A frame that already carries as much metadata as the test run accepts: ours
    doesn't fit, adjust_meta fails, and the answer is dropped and counted as
    reject_failed, never passed up as is. (6.1 caps metadata at 32 bytes; later
    kernels at what the headroom in front of the frame leaves.)"""
    frame = syn()
    if not xdp.meta:
        _no_meta_spent_or_stale_count_sends_nothing_back(xdp, frame)
        return
    p0, _ = xdp.counters()
    e0 = xdp.events()
    with reject_path(xdp, "prod", P.TC):
        for meta_len in range(252, 0, -4):  # the largest the test run takes; refused runs run nothing
            try:
                code, _out = run_with_meta(xdp, frame, "prod", meta_len)
                break
            except OSError:
                continue
    p1, _ = xdp.counters()
    e1 = xdp.events()
    assert X(code) == X.DROP
    assert {r: p1[r] - p0[r] for r in R if p1[r] != p0[r]} == {R.REJECT_FAILED: 1}
    assert e1[EV.REJECT_TCP_RST] == e0[EV.REJECT_TCP_RST], "no answer was sent"


def _no_meta_spent_or_stale_count_sends_nothing_back(xdp, frame: bytes) -> None:
    """Without XDP metadata the count is what tells an answer: a frame for another MAC
    (PACKET_OTHERHOST) once the count is spent, or after it went stale (an answer lost
    on its way: 10 ms), is not sent back out but passes as any frame does."""
    with reject_path(xdp, "prod", P.TC), one_cpu():
        v = xdp.expect(frame, "prod", X.PASS, R.REJECT_RULE)
        answer = sent_back(xdp, v, frame, "prod")  # spends it
        assert xdp.tc(answer, "prod")[0] == TC_ACT_OK, "a second copy is not an answer"
        xdp.clear_flows()
        xdp.expect(frame, "prod", X.PASS, R.REJECT_RULE)  # pending again, then lost
        assert xdp.send_back_pending() >= 1
        time.sleep(0.05)
        assert xdp.tc(answer, "prod")[0] == TC_ACT_OK, "a stale count takes nothing"
        assert xdp.send_back_pending() == 0


def test_tc_path_with_metadata_already_there_keeps_it_behind(xdp):
    """A frame that came with 8 bytes of metadata: ours goes in front of it (20 in all).
    Without XDP metadata in the kernel, the 8 bytes stay in front untouched."""
    frame = syn()
    with reject_path(xdp, "prod", P.TC):
        code, out = run_with_meta(xdp, frame, "prod", 8)
    assert X(code) == X.PASS
    if not xdp.meta:
        assert out[:8] == b"\xee" * 8
        check_rst(frame, out[8:], "RA", 0, 1001)
        return
    assert META.unpack(out[: META.size]) == SEND_BACK
    assert out[META.size: META.size + 8] == b"\xee" * 8
    check_rst(frame, out[META.size + 8:], "RA", 0, 1001)


# -------------------------------------------------------------- TC side
class SkBuff(C.Structure):
    """The head of struct __sk_buff, up to cb[]: what a SCHED_CLS test run may set."""

    _fields_ = [("len", C.c_uint32), ("pkt_type", C.c_uint32), ("mark", C.c_uint32),
                ("queue_mapping", C.c_uint32), ("protocol", C.c_uint32), ("vlan_present", C.c_uint32),
                ("vlan_tci", C.c_uint32), ("vlan_proto", C.c_uint32), ("priority", C.c_uint32),
                ("ingress_ifindex", C.c_uint32), ("ifindex", C.c_uint32), ("tc_index", C.c_uint32),
                ("cb", C.c_uint32 * 5), ("_rest", C.c_uint8 * 256)]  # the kernel copies the whole __sk_buff out


def run_tc(xdp, frame: bytes, mark: int) -> tuple[int, int]:
    """bulkhead_tc on a frame (no metadata: the skb test run has none) -> (TC code, skb->mark after)."""
    buf_in = C.create_string_buffer(frame, len(frame))
    buf_out = C.create_string_buffer(len(frame) + 256)
    ctx_in, ctx_out = SkBuff(mark=mark), SkBuff()
    head = SkBuff._rest.offset  # the test run refuses input fields past cb[] that are set
    opts = libbpf.TestRunOpts(sz=C.sizeof(libbpf.TestRunOpts), repeat=1)
    opts.data_in, opts.data_size_in = C.cast(buf_in, C.c_void_p), len(frame)
    opts.data_out, opts.data_size_out = C.cast(buf_out, C.c_void_p), len(buf_out)
    opts.ctx_in, opts.ctx_size_in = C.cast(C.pointer(ctx_in), C.c_void_p), head
    opts.ctx_out, opts.ctx_size_out = C.cast(C.pointer(ctx_out), C.c_void_p), C.sizeof(ctx_out)
    libbpf._check(libbpf.lib().bpf_prog_test_run_opts(xdp.dp.prog_fd(loader.TC_PROG), C.byref(opts)), "test run")
    return opts.retval, ctx_out.mark


def test_tc_without_metadata_passes_untouched(xdp):
    """A packet XDP put no metadata in front of (or that never met XDP) goes on, its mark kept."""
    e0 = xdp.events()
    code, mark = run_tc(xdp, syn(), 0x00AB1234)
    assert (code, mark) == (TC_ACT_OK, 0x00AB1234)
    assert xdp.events()[EV.REJECT_VIA_TC] == e0[EV.REJECT_VIA_TC]


# -------------------------------------------------- real frames, both sides
def _mac(ifname: str) -> str:
    with IPRoute() as ipr:
        return ipr.link("get", ifname=ifname)[0].get_attr("IFLA_ADDRESS")


def _rst_on(sock: socket.socket) -> Ether:
    """The first frame the peer receives (not its own outgoing ones) that is our RST.
    The socket's timeout turns a missing answer into a failure, not a hang."""
    while True:
        data, addr = sock.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        f = Ether(data)
        if TCP in f and f[TCP].sport == 22 and f[TCP].dport == 40000 and "R" in str(f[TCP].flags):
            return f


@pytest.mark.parametrize("mode, want", [("native", "tc_redirect"), ("generic", "xdp_tx")])
def test_reject_answer_reaches_a_veth_peer_without_xdp(xdp, mode, want):
    """A SYN from a veth peer with no XDP program gets its RST back on that peer.

    Native XDP on a veth: the loader picks the TC path, and bulkhead_tc sends the
    answer out (counted as reject_via_tc). Generic XDP: XDP_TX is a
    dev_queue_xmit, which reaches the peer; the loader keeps it."""
    peer = "prod-p"
    with IPRoute() as ipr:
        assert not ipr.link("get", ifname=peer)[0].get_attr("IFLA_XDP").get_attr("IFLA_XDP_PROG_ID"), \
            "the peer must have no XDP program of its own"
    frame = raw(Ether(src=CLIENT_MAC, dst=_mac("prod")) / IP(src=C4, dst=PAY4)
                / TCP(sport=40000, dport=22, flags="S", seq=1000))
    with contextlib.ExitStack() as stack:
        stack.callback(xdp.dp.set_reject_path, xdp.ifindex["prod"], P.XDP_TX)
        stack.callback(loader.Datapath.detach_tc, "prod")
        stack.callback(loader.Datapath.detach, "prod")
        xdp.dp.attach_tc("prod")
        assert xdp.dp.attach("prod", mode) == mode
        assert xdp.dp.reject_path(xdp.ifindex["prod"]) == want
        s = stack.enter_context(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
        s.bind((peer, 0))
        s.settimeout(3.0)
        p0, _ = xdp.counters()
        e0 = xdp.events()
        s.send(frame)
        rst = _rst_on(s)
        p1, _ = xdp.counters()
        e1 = xdp.events()
    check_rst(frame, raw(rst), "RA", 0, 1001)
    assert p1[R.REJECT_RULE] - p0[R.REJECT_RULE] == 1
    assert e1[EV.REJECT_VIA_TC] - e0[EV.REJECT_VIA_TC] == (1 if want == "tc_redirect" else 0)

"""A tail call that returns is a drop of its own: tail_call_missed.

Each case empties (or re-points) slots of the `tails` program array, sends
the packet that needs the missing program, and checks it is dropped and
counted under TAIL_CALL_MISSED, not under whatever the caller fell back to
before (punt_no_handler, reject_failed, sni_unknown). The slots are put back
after each case, whatever happens, and where a flow can go on afterwards the
test shows it does: a hold stays a hold, never a pass.
"""
from __future__ import annotations

import contextlib
import ctypes as C

from scapy.all import IP, TCP, Raw

from bulkhead.datapath import abi, libbpf, loader

from .conftest import C4, EV, PAY4, E, R, X
from .test_xdp_sni import (
    ISN,
    PORT,
    SPORT,
    client_hello,
    res,
    send_hello,
    seg,
    server_data,
    sni_bundle,
    syn,
)

T = abi.Tail


@contextlib.contextmanager
def tails(x, **slots):
    """tails[slot] emptied (None) or pointed at another program inside the block; every
    slot is put back to the loader's program afterwards."""
    fd = x.dp.map_fds["tails"]
    try:
        for name, prog in slots.items():
            key = C.c_uint32(T[name])
            if prog is None:
                libbpf.map_delete(fd, key)
            else:
                libbpf.map_update(fd, key, C.c_int(x.dp.prog_fd(prog)))
        yield
    finally:
        for slot, prog in loader.TAIL_PROGS.items():
            libbpf.map_update(fd, C.c_uint32(slot), C.c_int(x.dp.prog_fd(prog)))


def missed(x, frame, ifname: str = "prod"):
    return x.expect(frame, ifname, X.DROP, R.TAIL_CALL_MISSED)


def tcp4(dport: int, flags: str, sport: int = 41777, reply: bool = False, payload: bytes = b""):
    l3 = IP(src=PAY4, dst=C4) if reply else IP(src=C4, dst=PAY4)
    l4 = TCP(sport=dport, dport=sport, flags=flags) if reply else TCP(sport=sport, dport=dport, flags=flags)
    return E / l3 / l4 / Raw(payload) if payload else E / l3 / l4


def test_reject_without_its_program(xdp):
    with tails(xdp, REJECT=None):
        missed(xdp, tcp4(22, "S"))  # RULE_PAY_SSH: reject
    xdp.expect(tcp4(22, "S"), "prod", X.TX, R.REJECT_RULE)


def test_clienthello_without_the_sni_program(xdp):
    xdp.apply(sni_bundle())
    hello = client_hello()
    xdp.expect(syn(), "prod", X.PASS, R.SNI_PENDING)  # a SYN needs no parse
    with tails(xdp, SNI=None):
        missed(xdp, seg(hello, 0))
        xdp.expect(server_data(), "core", X.DROP, R.SNI_HOLD)  # undecided: still held
    xdp.expect(seg(hello, 0), "prod", X.PASS, R.ALLOW_RULE)  # the client resends


def test_flow_picked_up_with_payload_without_the_sni_program(xdp):
    """A first packet that carries payload (no SYN seen) goes straight to bulkhead_sni."""
    xdp.apply(sni_bundle())
    with tails(xdp, SNI=None):
        missed(xdp, seg(client_hello(), 0))


def test_streamed_clienthello_without_the_stream_program(xdp):
    xdp.apply(sni_bundle())
    hello = client_hello()
    xdp.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    with tails(xdp, SNI_STREAM=None):
        missed(xdp, seg(hello[:1], 0))  # one byte: the one-shot path hands it to the streaming parser
    # The parse was stored before the call: the client's resend goes on from there.
    xdp.expect(seg(hello[:1], 0), "prod", X.PASS, R.SNI_PENDING)
    xdp.expect(seg(hello[1:], 1), "prod", X.PASS, R.ALLOW_RULE)


def test_stream_step_that_cannot_go_on_ends_the_parse_as_an_unknown_name(xdp):
    """A streaming step whose next call returns (the chain ran out, or the slot is
    empty) ends the parse without a name: the resend is decided as unknown."""
    xdp.apply(sni_bundle())
    hello = client_hello()
    xdp.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    xdp.expect(seg(hello[:1], 0), "prod", X.PASS, R.SNI_PENDING)  # the streaming parser has a byte of it
    # bulkhead_sni_stream in the SNI slot takes the rest, and finds no program for its next step.
    with tails(xdp, SNI=loader.SNI_STREAM_PROG, SNI_STREAM=None):
        missed(xdp, seg(hello[1:], 1))
    xdp.expect(seg(hello[1:], 1), "prod", X.DROP, R.SNI_UNKNOWN)
    xdp.expect(server_data(), "core", X.DROP, R.SNI_UNKNOWN)


def test_finished_stream_that_cannot_return_to_the_decision(xdp):
    """A stream step that finds its parse done hands back to bulkhead_sni; with
    bulkhead_sni_stream in that slot too, the calls go round until the chain runs out."""
    xdp.apply(sni_bundle())
    hello = client_hello()
    xdp.expect(syn(), "prod", X.PASS, R.SNI_PENDING)
    xdp.expect(seg(hello[:1], 0), "prod", X.PASS, R.SNI_PENDING)
    with tails(xdp, SNI=loader.SNI_STREAM_PROG):
        missed(xdp, seg(hello[1:], 1))
    # The parse finished before the chain ran out: the resend is decided by its name.
    xdp.expect(seg(hello[1:], 1), "prod", X.PASS, R.ALLOW_RULE)


def test_rejected_name_without_the_reset_program(xdp):
    xdp.apply(sni_bundle())
    with tails(xdp, RESET_ONWARD=None):
        v = send_hello(xdp, client_hello(b"rej.example.internal"))
    assert res(v) == (X.DROP, R.TAIL_CALL_MISSED)
    # The flow was settled before the call: the client's resend meets the reject.
    xdp.expect(seg(client_hello(b"rej.example.internal"), 0), "prod", X.TX, R.REJECT_RULE)


def test_redecision_after_a_swap_without_the_sni_program_holds_the_reply(xdp):
    """The reply side of a flow decided by name, re-judged after a swap, is decided
    from its entry by bulkhead_sni; without it nothing passes, not even an ACK."""
    xdp.apply(sni_bundle())
    assert res(send_hello(xdp, client_hello())) == (X.PASS, R.ALLOW_RULE)
    xdp.apply(sni_bundle())  # a new generation: every entry is re-judged
    ack = E / IP(src=PAY4, dst=C4) / TCP(sport=PORT, dport=SPORT, flags="A", seq=5000, ack=ISN)
    with tails(xdp, SNI=None):
        missed(xdp, server_data(), "core")
    xdp.apply(sni_bundle())
    with tails(xdp, SNI=None):
        missed(xdp, ack, "core")
    xdp.apply(sni_bundle())
    xdp.expect(server_data(), "core", X.PASS, R.ALLOW_REPLY)


def test_observe_without_the_main_program(xdp):
    """bulkhead_observe hands the packet back to bulkhead_xdp: without it, it can't be judged."""
    xdp.expect(tcp4(443, "S"), "prod", X.PASS, R.ALLOW_RULE)
    with tails(xdp, MAIN=None):
        missed(xdp, tcp4(443, "SA", reply=True), "core")


def test_observe_missing_only_leaves_the_packet_unmeasured(xdp):
    """Telemetry decides no verdict: the packet is judged as usual, the miss is an event."""
    xdp.expect(tcp4(443, "S"), "prod", X.PASS, R.ALLOW_RULE)
    with tails(xdp, OBSERVE=None):
        v = xdp.expect(tcp4(443, "SA", reply=True), "core", X.PASS, R.ALLOW_REPLY)
    assert (v.events.get(EV.OBSERVE_MISSED), v.events.get(EV.LAT_SAMPLE)) == (1, None)
    v = xdp.expect(tcp4(443, "A"), "prod", X.PASS, R.ALLOW_RULE)
    assert EV.OBSERVE_MISSED not in v.events


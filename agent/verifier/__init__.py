"""The userspace L7 verifier: a transparent HTTP proxy for the flows the kernel punts.

A rule with an `http:` list is decided per request. The XDP data path marks the
flow's packets, the gateway steers them (nftables TPROXY) to the verifier's
listening socket with the original destination preserved, and the verifier checks
every request on the connection against the rule's entries before forwarding it.
A punt is never an implicit allow: no verifier, no policy for the flow, or an
ambiguous request, and the connection is refused or answered with an error.

What a request means and whether an entry matches lives in bulkhead.l7 (http1,
normalize, rules, tokens, settings: shared with the policy validator). Here:
  proxy.py       the server: Verifier (accept, resolve the flow, TLS or not),
                 new_event_loop
  connection.py  the client side of one connection: answering in order,
                 keep-alive and pipelining, limits, timeouts, flow control
  reader.py      its request side: llhttp (httptools) framing, exact head sizes
  decide.py      the decision for one request as pure functions: check_head
                 (framing ambiguity), decide (normalize, Host checks, rules)
  upstream.py    the origin side: opening (tcp_opener), reuse, relaying and
                 validating responses, TLS to the origin
  records.py     FlowContext, the request being served, RequestRecord, Sink
  service.py     the process the agent supervises: policy from the bundle,
                 flow lookup in the kernel's flow table, transparent upstream
                 sockets, events to the agent
  supervisor.py  the agent's side of it: listening sockets, restarts
  standalone.py  `bulkhead verifier serve`: the engine as a fixed-upstream proxy
"""

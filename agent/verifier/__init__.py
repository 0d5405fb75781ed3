"""The userspace L7 verifier: a transparent HTTP proxy for the flows the kernel punts.

A rule with an `http:` list is decided per request. The XDP data path marks the
flow's packets, the gateway steers them (nftables TPROXY) to the verifier's
listening socket with the original destination preserved, and the verifier checks
every request on the connection against the rule's entries before forwarding it.
A punt is never an implicit allow: no verifier, no policy for the flow, or an
ambiguous request, and the connection is refused or answered with an error.

Modules:
  normalize.py  request-target and Host normalization; refuses ambiguity
  rules.py      compile a rule's `http:` entries; match a normalized request
  tokens.py     bearer JWT (HS256/RS256/ES256) and API-key checks
  proxy.py      the asyncio server: HTTP/1.1 framing (llhttp via httptools),
                smuggling defences, limits and timeouts, TLS termination,
                forwarding with connection reuse, per-request records
  service.py    the process the agent supervises: policy from the bundle,
                flow lookup in the kernel's flow table, transparent upstream
                sockets, events to the agent
"""

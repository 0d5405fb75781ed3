"""HTTP/1 at the application layer: parsing, normalization, rules, tokens.

Shared by the policy validator (which compiles every `http:` entry) and the verifier proxy
(which matches each request), so both read a rule the same way. Pure: no sockets, no kernel.

Modules:
  http1.py      HTTP/1.1 framing helpers and canned responses
  normalize.py  request-target and Host normalization; refuses ambiguity
  rules.py      compile a rule's `http:` entries; match a normalized request
  tokens.py     bearer JWT (HS256/RS256/ES256) and API-key checks
"""

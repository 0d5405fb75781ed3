"""The kernel side seen from Python: loading and probing the BPF programs, the ABI mirror,
pinned maps, and the host plumbing (nftables, ip rules, routes) the data path needs."""

"""The fabric: what joins gateways and attracts traffic to them (docs/fabric.md).

dns: the gateways' DNS, answering published apps' names with their service addresses, per
client segment. Transit between gateways and service-address translation are next.
"""

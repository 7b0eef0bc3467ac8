"""NetworkPolicy -> ipsets + iptables/ip6tables, after Felix; dual-stack (IPv4 and IPv6).

Modules, one job each:
  selectors   label selectors (matchLabels / matchExpressions)
  model       NetworkPolicy dicts -> validated objects (invalid ones: reported, fail closed)
  calc        pure calculation: PolicyInputs -> Calculation (family-neutral ipsets, policy plans, endpoint plans)
  render      Calculation -> hashed rules of one family's filter table (FORWARD and INPUT hooks; IPv6: ICMPv6)
  dataplane/  ipset restore (two-phase, both families), iptables/ip6tables read-back + diff, writers (restore,
              python-iptables), one per family
  controller  PolicyController: the facade the agent calls (applies every active family)
  explain     explain() / policies_for(): evaluated on the same objects the dataplane programs (IPv4 or IPv6 flows)
"""

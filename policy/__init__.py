"""NetworkPolicy -> ipsets + iptables, after Felix.

Modules, one job each:
  selectors   label selectors (matchLabels / matchExpressions)
  model       NetworkPolicy dicts -> validated objects (invalid ones: reported, fail closed)
  calc        pure calculation: PolicyInputs -> Calculation (ipsets, policy plans, endpoint plans)
  render      Calculation -> hashed iptables rules (filter table: FORWARD and INPUT hooks)
  dataplane/  ipset restore (two-phase), iptables read-back + diff, writers (restore, python-iptables)
  controller  PolicyController: the facade the agent calls
  explain     explain() / policies_for(): evaluated on the same objects the dataplane programs
"""

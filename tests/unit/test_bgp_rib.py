import json

from routed.bgp.rib import AdjRibOut, Filters, Rib, Route, parse_message


def update(peer, announce=None, withdraw=None, as_path=(65100,), direction="receive", communities=()):
    upd = {"attribute": {"origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": list(as_path)}},
                         "community": [list(map(int, c.split(":"))) for c in communities]}}
    if announce:
        by_nh = {}
        for prefix, nh in announce:
            by_nh.setdefault(nh, []).append({"nlri": prefix})
        upd["announce"] = {"ipv4 unicast": by_nh}
    if withdraw:
        upd["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
    return json.dumps({"exabgp": "5.0.0", "type": "update", "neighbor": {
        "address": {"local": "10.1.1.2", "peer": peer}, "asn": {"local": 65001, "peer": 65100},
        "direction": direction, "message": {"update": upd}}})


def test_parse_update_and_eor():
    msg = parse_message(update("10.1.1.1", [("10.244.2.0/24", "10.1.1.1")], communities=["65000:100"]))
    assert msg.type == "update" and msg.peer == "10.1.1.1" and msg.direction == "receive"
    r = msg.announce[0]
    assert (r.prefix, r.nexthop, r.as_path, r.communities) == ("10.244.2.0/24", "10.1.1.1", (65100,), ("65000:100",))
    eor = parse_message(json.dumps({"type": "update", "neighbor": {"address": {"peer": "10.1.1.1"},
                                    "direction": "receive", "message": {"eor": {"afi": "ipv4", "safi": "unicast"}}}}))
    assert eor.eor == ("ipv4", "unicast")
    state = parse_message(json.dumps({"type": "state", "neighbor": {"address": {"peer": "10.1.1.1"},
                                      "state": "down", "reason": "peer reset"}}))
    assert (state.state, state.reason) == ("down", "peer reset")
    op = parse_message(json.dumps({"type": "open", "neighbor": {"address": {"peer": "p"}, "direction": "receive",
                       "open": {"capabilities": {"64": {"name": "graceful restart", "time": 120}}}}}))
    assert op.gr_time == 120
    assert parse_message("not json").type == "other"
    v6 = parse_message(json.dumps({"type": "update", "neighbor": {"address": {"peer": "fd00::1"}, "direction": "receive",
                       "message": {"update": {"attribute": {}, "announce": {"ipv6 unicast": {
                           "fd00::1,fe80::1": [{"nlri": "fd10::/64"}]}}}}}}))
    assert v6.announce[0].nexthop == "fd00::1"


def make_rib(**kw):
    f = Filters(own_asn=65001, own_cidrs=("10.244.1.0/24",), own_addresses=("10.1.1.2",), **kw)
    return Rib(f)


def feed(rib, line, now=0.0):
    msg = parse_message(line)
    for p in msg.withdraw:
        rib.withdraw(msg.peer, p)
    for r in msg.announce:
        rib.announce(msg.peer, r, now)


def test_filters():
    rib = make_rib()
    feed(rib, update("10.1.1.1", [("10.244.1.0/24", "10.1.1.1")], as_path=(65100, 65001)))  # own echo
    feed(rib, update("10.1.1.1", [("10.244.1.128/25", "10.1.1.1")]))  # inside own CIDR
    feed(rib, update("10.1.1.1", [("10.244.0.0/16", "10.1.1.1")]))  # covering: allowed
    feed(rib, update("10.1.1.1", [("0.0.0.0/0", "10.1.1.1")]))
    feed(rib, update("10.1.1.1", [("10.244.2.0/24", "10.1.1.1")]))
    feed(rib, update("10.1.1.1", [("10.244.3.0/24", "10.1.1.2")]))  # next hop is us
    assert rib.desired() == {"10.244.0.0/16": frozenset({"10.1.1.1"}), "10.244.2.0/24": frozenset({"10.1.1.1"})}
    reasons = {r["prefix"]: r["rejected"] for r in rib.received("10.1.1.1")}
    assert reasons["10.244.1.0/24"] == "own AS in path"
    assert reasons["10.244.1.128/25"] == "inside own pod CIDR"
    assert reasons["0.0.0.0/0"] == "default route not accepted"
    rib2 = make_rib(accept_default=True)
    feed(rib2, update("10.1.1.1", [("0.0.0.0/0", "10.1.1.1")]))
    assert "0.0.0.0/0" in rib2.desired()


def test_ecmp_withdraw_and_stale():
    rib = make_rib()
    feed(rib, update("10.1.1.1", [("10.244.2.0/24", "10.1.1.1")]))
    feed(rib, update("10.2.1.1", [("10.244.2.0/24", "10.2.1.1")]))
    assert rib.desired() == {"10.244.2.0/24": frozenset({"10.1.1.1", "10.2.1.1"})}
    feed(rib, update("10.2.1.1", withdraw=["10.244.2.0/24"]))
    assert rib.desired() == {"10.244.2.0/24": frozenset({"10.1.1.1"})}
    assert rib.mark_stale("10.1.1.1") == 1
    assert rib.desired() == {"10.244.2.0/24": frozenset({"10.1.1.1"})}  # stale routes still forward
    feed(rib, update("10.1.1.1", [("10.244.3.0/24", "10.1.1.1")]))  # re-learned after restart
    assert rib.drop_stale("10.1.1.1") == 1  # End-of-RIB
    assert rib.desired() == {"10.244.3.0/24": frozenset({"10.1.1.1"})}



def test_retracted_next_hops_until_announced_again():
    rib = make_rib()
    feed(rib, update("10.1.1.1", [("10.244.2.0/24", "10.1.1.1"), ("10.244.3.0/24", "10.1.1.1")]))
    feed(rib, update("10.2.1.1", [("10.244.2.0/24", "10.2.1.1")]))
    assert rib.retracted() == {}
    feed(rib, update("10.2.1.1", withdraw=["10.244.2.0/24"]))
    feed(rib, update("10.1.1.1", [("10.244.3.0/24", "10.1.9.9")]))  # an implicit withdrawal of 10.1.1.1
    assert rib.retracted() == {"10.244.2.0/24": {"10.2.1.1"}, "10.244.3.0/24": {"10.1.1.1"}}
    feed(rib, update("10.2.1.1", [("10.244.2.0/24", "10.2.1.1")]))  # announced again: not gone any more
    rib.mark_stale("10.1.1.1")
    assert rib.drop_stale("10.1.1.1") == 2  # stale routes dropped count as retracted too
    rib.clear("10.2.1.1")  # the session went down
    assert rib.retracted() == {"10.244.2.0/24": {"10.1.1.1", "10.2.1.1"}, "10.244.3.0/24": {"10.1.1.1", "10.1.9.9"}}
    rib.forget_retracted()  # the route table prunes from now on
    feed(rib, update("10.1.1.1", withdraw=["10.244.2.0/24"]))
    assert rib.retracted() == {}

def test_max_prefixes():
    rib = make_rib(max_prefixes={"10.1.1.1": 2})
    for k in range(5):
        feed(rib, update("10.1.1.1", [(f"10.50.{k}.0/24", "10.1.1.1")]))
    assert sorted(rib.desired()) == ["10.50.0.0/24", "10.50.1.0/24"]
    assert rib.max_prefix_hits["10.1.1.1"] == 3
    assert rib.accepted_count("10.1.1.1") == 2
    feed(rib, update("10.1.1.1", withdraw=["10.50.0.0/24"]))
    assert sorted(rib.desired()) == ["10.50.1.0/24", "10.50.2.0/24"]


def test_adj_rib_out():
    out = AdjRibOut()
    out.record(parse_message(update("10.1.1.1", [("10.244.1.0/24", "10.1.1.2")], as_path=(65001,),
                                    direction="send", communities=["65000:100"])), 1.0)
    adv = out.advertised("10.1.1.1")
    assert adv[0]["prefix"] == "10.244.1.0/24" and adv[0]["asPath"] == [65001]
    assert adv[0]["communities"] == ["65000:100"] and adv[0]["nextHop"] == "10.1.1.2"
    out.record(parse_message(update("10.1.1.1", withdraw=["10.244.1.0/24"], direction="send")), 2.0)
    assert out.advertised("10.1.1.1") == []
    assert Route("p", "n").as_dict()["prefix"] == "p"


def test_link_local_next_hop_becomes_peer():
    rib = Rib(Filters(own_asn=65001))
    rib.announce("fd00:1:1::1", Route("fd10:2::/64", "fe80::1"), 0.0)
    assert rib.desired() == {"fd10:2::/64": frozenset({"fd00:1:1::1"})}


# -- IPv6 ------------------------------------------------------------------------------------------
# captured from ExaBGP 5.0.15 against FRR 8.4 (tests/topo): an IPv6 session sends a global and a link-local
# next hop, which ExaBGP reports as two entries of the same prefix
REAL_V6 = ('{ "exabgp": "5.0.0", "time": 1.0, "type": "update", "neighbor": { "address": { "local": "fd00:1:1::2", '
           '"peer": "fd00:1:1::1" }, "asn": { "local": 65001, "peer": 65100 }, "direction": "receive", "message": '
           '{ "update": { "attribute": { "origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": '
           '[65100]}}, "med": 0 }, "announce": { "ipv6 unicast": { "fd00:1:1::1": [ { "nlri": "fd99::/48" } ], '
           '"fe80::9c9e:63ff:fe05:7c19": [ { "nlri": "fd99::/48" } ] } } } } } }')
REAL_V6_EOR = ('{ "exabgp": "5.0.0", "type": "update", "neighbor": { "address": { "local": "10.1.1.2", "peer": '
               '"10.1.1.1" }, "direction": "receive", "message": { "eor": { "afi" : "ipv6", "safi" : "unicast" } } } }')
REAL_OPEN = ('{ "exabgp": "5.0.0", "type": "open", "neighbor": { "address": { "local": "10.1.1.2", "peer": '
             '"10.1.1.1" }, "direction": "receive", "open": { "version": 4, "asn": 65100, "hold_time": 9, '
             '"router_id": "10.255.0.1", "capabilities": { "1": { "name": "multiprotocol", "families": [ '
             '"ipv4/unicast", "ipv6/unicast" ] }, "2": { "name": "route-refresh", "variant": "RFC" }, "64": { '
             '"name": "graceful restart", "time": 120, "address-family-flags": {"ipv4/unicast": [ ] , '
             '"ipv6/unicast": [ ] }, "restart-flags": [ ] } } } } }')


def update6(peer, announce=None, withdraw=None, as_path=(65100,), direction="receive"):
    upd = {"attribute": {"origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": list(as_path)}}}}
    if announce:
        by_nh = {}
        for prefix, nh in announce:
            by_nh.setdefault(nh, []).append({"nlri": prefix})
        upd["announce"] = {"ipv6 unicast": by_nh}
    if withdraw:
        upd["withdraw"] = {"ipv6 unicast": [{"nlri": p} for p in withdraw]}
    return json.dumps({"type": "update", "neighbor": {"address": {"peer": peer}, "direction": direction,
                                                      "message": {"update": upd}}})


def make_rib6(**kw):
    f = Filters(own_asn=65001, own_cidrs=("10.244.1.0/24", "fd10:1::/64"),
                own_addresses=("10.1.1.2", "fd00:1:1::2"), **kw)
    return Rib(f)


def test_parse_real_exabgp_ipv6_messages():
    msg = parse_message(REAL_V6)
    assert [(r.prefix, r.nexthop, r.as_path, r.med) for r in msg.announce] == [("fd99::/48", "fd00:1:1::1", (65100,), 0)]
    # the link-local one first: the global one still wins
    swapped = REAL_V6.replace('"fd00:1:1::1": [ { "nlri": "fd99::/48" } ], ', "") + ""
    swapped = swapped.replace('"fe80::9c9e:63ff:fe05:7c19": [ { "nlri": "fd99::/48" } ]',
                              '"fe80::9c9e:63ff:fe05:7c19": [ { "nlri": "fd99::/48" } ], "fd00:1:1::1": [ { "nlri": '
                              '"fd99::/48" } ]')
    assert [r.nexthop for r in parse_message(swapped).announce] == ["fd00:1:1::1"]
    assert parse_message(REAL_V6_EOR).eor == ("ipv6", "unicast")
    op = parse_message(REAL_OPEN)
    assert op.families == ("ipv4 unicast", "ipv6 unicast") and op.gr_time == 120
    plain = parse_message(json.dumps({"type": "open", "neighbor": {"address": {"peer": "p"}, "direction": "receive",
                                      "open": {"capabilities": {}}}}))
    assert plain.families == ("ipv4 unicast",)  # no multiprotocol capability: IPv4 unicast only (RFC 4760)
    wd = parse_message(update6("10.1.1.1", withdraw=["fd10:2::/64"]))
    assert wd.withdraw == ["fd10:2::/64"]


def test_ipv6_filters_like_ipv4():
    rib = make_rib6(max_prefixes={"10.1.1.1": 3})
    feed(rib, update6("10.1.1.1", [("fd10:1::/64", "fd00:1:1::1")], as_path=(65100, 65001)))  # own echo
    feed(rib, update6("10.1.1.1", [("fd10:1::8000:0:0:0/65", "fd00:1:1::1")]))  # inside own CIDR
    feed(rib, update6("10.1.1.1", [("::/0", "fd00:1:1::1")]))
    feed(rib, update6("10.1.1.1", [("fd10:3::/64", "fd00:1:1::2")]))  # next hop is us
    feed(rib, update6("10.1.1.1", [("fd10:3::/64", "FD00:1:1:0::2".lower())]))  # the same, spelled otherwise
    for k in range(2, 7):
        feed(rib, update6("10.1.1.1", [(f"fd10:{k}0::/64", "fd00:1:1::1")]))
    assert rib.desired() == {f"fd10:{k}0::/64": frozenset({"fd00:1:1::1"}) for k in (2, 3, 4)}
    reasons = {r["prefix"]: r["rejected"] for r in rib.received("10.1.1.1")}
    assert reasons["fd10:1::/64"] == "own AS in path"
    assert reasons["fd10:1::8000:0:0:0/65"] == "inside own pod CIDR"
    assert reasons["::/0"] == "default route not accepted"
    assert reasons["fd10:3::/64"] == "next hop is this node"
    assert reasons["fd10:50::/64"] == "over maxPrefixes 3"
    rib2 = make_rib6(accept_default=True)
    feed(rib2, update6("fd00:1:1::1", [("::/0", "fd00:1:1::1")]))
    assert rib2.desired() == {"::/0": frozenset({"fd00:1:1::1"})}


def test_uninstallable_ipv6_next_hops_rejected_with_a_reason():
    rib = make_rib6()
    feed(rib, update6("10.1.1.1", [("fd10:2::/64", "::ffff:10.1.1.1")]))  # FRR without an IPv6 next hop
    feed(rib, update6("10.1.1.1", [("fd10:3::/64", "::")]))
    feed(rib, update6("10.1.1.1", [("fd10:4::/64", "fe80::1")]))  # link-local over an IPv4 session
    feed(rib, update6("10.1.1.1", [("fd10:5::/64", "10.1.1.1")]))
    feed(rib, update6("10.1.1.1", [("fd10:6::/64", "ff02::1")]))
    feed(rib, update("10.1.1.1", [("10.50.0.0/24", "0.0.0.0")]))
    assert rib.desired() == {}
    reasons = {r["prefix"]: r["rejected"] for r in rib.received("10.1.1.1")}
    assert reasons["fd10:2::/64"].startswith("IPv4-mapped next hop ::ffff:10.1.1.1: the peer sent no IPv6 next hop")
    assert reasons["fd10:3::/64"] == "next hop :: is unusable (unspecified address)"
    assert reasons["fd10:4::/64"].startswith("link-local next hop fe80::1 over an IPv4 session")
    assert reasons["fd10:5::/64"] == "next hop family differs"
    assert reasons["fd10:6::/64"] == "next hop ff02::1 is unusable (multicast address)"
    assert reasons["10.50.0.0/24"] == "next hop 0.0.0.0 is unusable (unspecified address)"
    # over an IPv6 session the link-local next hop is the directly connected peer
    feed(rib, update6("fd00:1:1::1", [("fd10:4::/64", "fe80::1")]))
    assert rib.desired() == {"fd10:4::/64": frozenset({"fd00:1:1::1"})}


def test_ipv6_ecmp_and_per_family_stale():
    rib = make_rib6()
    feed(rib, update6("10.1.1.1", [("fd10:2::/64", "fd00:1:1::1")]))
    feed(rib, update6("10.2.1.1", [("fd10:2::/64", "fd00:2:1::1")]))
    feed(rib, update("10.1.1.1", [("10.244.2.0/24", "10.1.1.1")]))
    assert rib.desired() == {"fd10:2::/64": frozenset({"fd00:1:1::1", "fd00:2:1::1"}),
                             "10.244.2.0/24": frozenset({"10.1.1.1"})}
    assert rib.mark_stale("10.1.1.1") == 2
    assert rib.drop_stale("10.1.1.1", 4) == 1  # the IPv4 End-of-RIB: IPv6 routes stay stale
    assert rib.desired() == {"fd10:2::/64": frozenset({"fd00:1:1::1", "fd00:2:1::1"})}
    assert rib.drop_stale("10.1.1.1", 6) == 1
    assert rib.desired() == {"fd10:2::/64": frozenset({"fd00:2:1::1"})}


def test_adj_rib_out_ipv6_next_hop():
    out = AdjRibOut()
    out.record(parse_message(update6("10.1.1.1", [("fd10:1::/64", "fd00:1:1::2")], as_path=(65001,),
                                     direction="send")), 1.0)
    assert [(r["prefix"], r["nextHop"]) for r in out.advertised("10.1.1.1")] == [("fd10:1::/64", "fd00:1:1::2")]

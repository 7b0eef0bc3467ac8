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

"""Service VIP advertisement: which prefixes a node announces (routed/bgp/services.py)."""

from routed.bgp.services import ServicePolicy, advertisements

POLICY = ServicePolicy(cluster_ip_cidrs=("10.96.0.0/12",), external_ip_cidrs=("192.0.2.0/24",),
                       load_balancer_ip_cidrs=("198.51.100.0/24",), communities={"loadBalancerIP": ("65000:300",)})


def svc(name, ns="demo", etp=None, itp=None, cluster_ips=("10.96.0.10",), external=(), lb=(), annotations=None,
        spec_lb_ip=None):
    spec = {"type": "LoadBalancer", "clusterIPs": list(cluster_ips), "externalIPs": list(external)}
    if cluster_ips:
        spec["clusterIP"] = cluster_ips[0]
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if spec_lb_ip:
        spec["loadBalancerIP"] = spec_lb_ip
    meta = {"name": name, "namespace": ns, **({"annotations": annotations} if annotations else {})}
    return {"kind": "Service", "metadata": meta, "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb]}}}


def eps(service, *endpoints, ns="demo"):
    return {"kind": "EndpointSlice", "metadata": {"name": f"{service}-x", "namespace": ns,
                                                  "labels": {"kubernetes.io/service-name": service}},
            "endpoints": [{"addresses": ["10.244.0.1"], "nodeName": node,
                           **({"conditions": {"ready": ready}} if ready is not None else {})}
                          for node, ready in endpoints]}


def prefixes(node, services, slices, policy=POLICY):
    return {p: (a.kind, a.services) for p, a in advertisements(node, policy, services, slices).items()}


def test_configured_cidrs_from_every_node_and_nothing_without_config():
    assert prefixes("n1", [], []) == {"10.96.0.0/12": ("clusterIP", ()), "192.0.2.0/24": ("externalIP", ()),
                                      "198.51.100.0/24": ("loadBalancerIP", ())}
    assert prefixes("n1", [svc("a", lb=["198.51.100.5"])], [], ServicePolicy()) == {}


def test_local_policy_only_on_nodes_with_a_ready_endpoint():
    services = [svc("web", etp="Local", lb=["198.51.100.5"], external=["192.0.2.7"])]
    slices = [eps("web", ("n2", True), ("n3", False), ("n4", None))]  # n4: no condition counts as ready
    for node, has in (("n1", False), ("n2", True), ("n3", False), ("n4", True)):
        got = prefixes(node, services, slices)
        assert ("198.51.100.5/32" in got) == has and ("192.0.2.7/32" in got) == has, node
        assert got["10.96.0.10/32"] == ("clusterIP", ("demo/web",))  # internalTrafficPolicy Cluster: every node
    assert "10.96.0.10/32" not in prefixes("n1", [svc("web", itp="Local")], slices)
    assert "10.96.0.10/32" in prefixes("n2", [svc("web", itp="Local")], slices)


def test_cluster_policy_everywhere_and_outside_allow_lists_never():
    services = [svc("web", lb=["198.51.100.5", "203.0.113.9"], external=["198.51.100.77"])]
    got = prefixes("n1", services, [])
    assert got["198.51.100.5/32"] == ("loadBalancerIP", ("demo/web",))
    assert "203.0.113.9/32" not in got  # not in serviceLoadBalancerIPs
    assert "198.51.100.77/32" not in got  # an external IP must be inside serviceExternalIPs
    comms = advertisements("n1", POLICY, services, [])["198.51.100.5/32"].communities
    assert comms == ("65000:300",)


def test_lb_ip_from_status_not_spec_all_cluster_ips_and_headless():
    got = prefixes("n1", [svc("a", spec_lb_ip="198.51.100.8", cluster_ips=("10.96.0.20", "10.97.0.20"))], [])
    assert "198.51.100.8/32" not in got
    assert {"10.96.0.20/32", "10.97.0.20/32"} <= set(got)
    assert not any(p.startswith("None") for p in prefixes("n1", [svc("h", cluster_ips=("None",))], []))


def test_shared_ip_is_reference_counted_and_opt_out():
    both = [svc("a", lb=["198.51.100.5"]), svc("b", lb=["198.51.100.5"], cluster_ips=())]
    assert prefixes("n1", both, [])["198.51.100.5/32"] == ("loadBalancerIP", ("demo/a", "demo/b"))
    assert prefixes("n1", both[1:], [])["198.51.100.5/32"] == ("loadBalancerIP", ("demo/b",))
    opted_out = [svc("a", lb=["198.51.100.5"], annotations={"routed.dev/advertise": "false"})]
    got = prefixes("n1", opted_out, [])
    assert "198.51.100.5/32" not in got and "10.96.0.10/32" not in got and "198.51.100.0/24" in got

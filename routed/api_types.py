"""The shapes of the local API's results: one TypedDict per method, keys in camelCase (as our CRDs).

Stdlib only, so clients (the CLI, tests, other tools) can import it without the agent's dependencies. The agent
builds exactly these shapes and the CLI views read exactly these keys; HACKING.md lists the methods.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class TaskStatus(TypedDict):
    """One supervised task (routed/supervisor.py)."""

    name: str
    state: Literal["running", "restarting", "failed", "stopped"]
    required: bool
    onFailure: Literal["restart", "fatal"]
    restarts: int
    lastError: str
    busy: str
    busySeconds: float


# ---- datastore, CNI ------------------------------------------------------------------------------


class DatastoreStatus(TypedDict):
    kind: str  # manifest | kube
    ready: bool
    synced: bool  # the first complete listing is in
    error: str  # why it cannot start or sync right now ("" when fine)
    errors: dict[str, str]  # per kind (kube) or per file (manifest): the last error
    objects: dict[str, int]  # cached objects per kind


class CniStatus(TypedDict):
    ready: bool
    reason: str
    serving: bool  # answering ADDs (only after the first policy sync)
    endpoints: int
    podCIDRs: list[str]
    mtu: int
    repairs: int  # kernel objects restored by resyncs (pod routes, blackholes)


class IpamAllocation(TypedDict):
    ip: str
    containerId: str
    ifname: str


class IpamPool(TypedDict):
    """One pod CIDR of the node: its family, usable addresses and how many are allocated."""

    cidr: str
    family: int
    size: int
    allocated: int


class IpamShow(TypedDict):
    cidrs: list[str]
    pools: list[IpamPool]
    allocations: list[IpamAllocation]


class EndpointRecord(TypedDict):
    """`endpoints.list` items: the persisted record of one pod interface."""

    containerId: str
    ifname: str
    netns: str
    hostIfname: str
    ips: list[str]
    podNamespace: str
    podName: str


# ---- policy --------------------------------------------------------------------------------------


class InvalidPolicy(TypedDict):
    policy: str  # namespace/name
    reasons: list[str]
    failClosed: list[str]  # the directions it fails closed for (Ingress, Egress)


class PolicyReport(TypedDict):
    enabled: bool
    node: str
    ready: bool
    writer: str
    backend: str
    invalidPolicies: list[InvalidPolicy]
    rules: int
    chains: int
    ipsets: int
    members: int
    endpoints: int
    lastApplyTime: float | None  # unix time of the last successful apply
    lastApplySeconds: float | None
    lastError: str
    failures: int  # consecutive failed applies (retried with backoff)
    warnings: list[str]


class Verdict(TypedDict):
    direction: str  # Ingress | Egress
    pod: str | None
    allowed: bool
    reason: str
    policy: str | None
    ruleIndex: int | None


class PolicyExplain(TypedDict):
    allowed: bool
    src: str
    dst: str
    port: int
    protocol: str
    egress: Verdict
    ingress: Verdict
    notes: list[str]


class PolicyShow(TypedDict):
    ingress: list[str]
    egress: list[str]


# ---- BGP -----------------------------------------------------------------------------------------


class BgpPeerStatus(TypedDict):
    address: str
    name: str
    asNumber: int
    state: str  # idle | connected | established | down
    since: float  # unix time of the last state change
    received: int
    accepted: int
    advertised: int
    eorReceived: bool
    eorSent: bool
    gracefulRestartTime: int
    maxPrefixes: int | None
    maxPrefixExceeded: int
    md5: bool
    lastError: str
    bfd: str  # BFD session state ("" when BFD is off for this peer)


class BfdPeerStatus(TypedDict):
    peer: str
    state: str  # adminDown | down | init | up
    remoteState: str
    localDiscriminator: int
    remoteDiscriminator: int
    localDiag: str  # why the session last left Up (RFC 5880 §4.1 names)
    remoteDiag: str
    txIntervalMs: float  # negotiated: max(our desired min TX, the peer's required min RX)
    detectionTimeMs: float  # negotiated: peer's multiplier x max(our required min RX, the peer's desired min TX)
    configuredMinTxMs: int
    configuredMinRxMs: int
    multiplier: int
    remoteMultiplier: int
    sourcePort: int
    since: float  # unix time of the last state change
    ups: int
    downs: int
    packetsIn: int
    packetsOut: int
    sendErrors: int


class BgpStatus(TypedDict):
    enabled: bool
    node: str
    ready: bool
    reason: str
    asNumber: int | None
    routerID: str | None
    podCIDRs: list[str]
    communities: list[str]
    exabgpPid: int | None
    exabgpRestarts: int
    exabgpReloads: int  # configuration reloads ExaBGP confirmed (peer changes that kept the other sessions)
    synced: bool  # every peer sent End-of-RIB (or the startup hold ended)
    errors: list[str]  # BGPPeer/BGPConfiguration objects that do not validate for this node
    updateError: str  # the last failed update ("" after a success)
    peers: list[BgpPeerStatus]
    bfd: list[BfdPeerStatus]  # one per BGPPeer with bfd enabled
    serviceRoutes: int  # Service prefixes announced (configured CIDRs and Service /32s)
    routesInstalled: int
    routeConflicts: list[str]
    routeErrors: dict[str, str]


class BgpRoute(TypedDict, total=False):
    """`bgp.received` and `bgp.advertised` items."""

    peer: str
    prefix: str
    nextHop: str
    asPath: list[int]
    communities: list[str]
    origin: str
    med: int | None
    localPref: int | None
    since: float  # received: when it arrived
    stale: bool  # received: kept through a graceful restart
    accepted: bool  # received: passed the filters
    rejected: str  # received: why not
    sent: float  # advertised: when ExaBGP reported it sent
    source: str  # advertised: what a Service prefix comes from ("Service ns/name", "serviceClusterIPs")


# ---- the agent -----------------------------------------------------------------------------------


class AgentStatus(TypedDict):
    node: str
    ready: bool
    reasons: list[str]
    live: bool  # what /healthz says
    liveReasons: list[str]
    uptimeSeconds: float
    podCIDRs: list[str]
    endpoints: int
    datastore: DatastoreStatus
    cni: CniStatus
    policy: PolicyReport
    bgp: BgpStatus
    tasks: list[TaskStatus]

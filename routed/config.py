"""Agent configuration: a YAML file, overridden by ROUTED_* environment variables, validated by pydantic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from routed.constants import DEFAULT_SOCKET, DEFAULT_STATE_DIR

ENV_PREFIX = "ROUTED_"
# ROUTED_* variables that are not agent settings (the CLI's default socket, test failpoints)
NOT_SETTINGS = frozenset({"ROUTED_SOCKET", "ROUTED_FAILPOINTS"})


class PolicyBudgetOptions(BaseModel):
    """What NetworkPolicies may cost on a node (policy.calc.PolicyBudget: rules per family table, distinct ipsets,
    static set entries). A policy over its own budget, or beyond the node's (policies admitted in namespace/name
    order), is reported invalid and only the pods it selects fail closed. The defaults keep a node well inside
    the DaemonSet's 512Mi (bench/policy_worst.py)."""

    model_config = ConfigDict(extra="forbid")
    policy_rules: int = Field(2_000, ge=1)
    policy_sets: int = Field(200, ge=1)
    policy_members: int = Field(100_000, ge=1)
    node_rules: int = Field(50_000, ge=1)
    node_sets: int = Field(10_000, ge=1, le=32_000)  # each set once per family; the kernel holds 65,534 at most
    node_members: int = Field(500_000, ge=1)


class PolicyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    iptables_writer: Literal["restore", "iptc"] = "restore"
    iptables_backend: Literal["auto", "legacy", "nft"] = "auto"
    deny_log: bool = False  # NFLOG/LOG dropped packets (opt-in)
    deny_log_mode: Literal["nflog", "log"] = "nflog"
    nflog_group: int = Field(100, ge=0, le=65535)
    apply_retries: int = Field(5, ge=0)
    # IP families policed (their own iptables/ip6tables tables, same backend). None: IPv4, plus IPv6 wherever
    # ip6tables and the kernel's IPv6 exist, whether or not pods have IPv6 addresses (a pod without one gets IPv6
    # anti-spoofing: it cannot speak IPv6 unpoliced). [4] leaves IPv6 unfiltered (logged as a warning).
    ip_families: list[Literal[4, 6]] | None = Field(None, min_length=1)
    budget: PolicyBudgetOptions = PolicyBudgetOptions()  # ROUTED_POLICY__BUDGET__NODE_RULES=... (environment)

    @field_validator("ip_families", mode="before")
    @classmethod
    def _families_from_text(cls, value: Any) -> Any:
        """ROUTED_POLICY__IP_FAMILIES=4,6 (environment) as well as a YAML list; duplicates dropped."""
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        if isinstance(value, list):
            value = [int(v) if isinstance(v, str) and v.isdigit() else v for v in value]
            if all(isinstance(v, int) for v in value):
                value = sorted(set(value))
        return value


class BgpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    exabgp: str = ""  # path of the exabgp executable; empty: the one next to this interpreter
    listen_port: int = Field(0, ge=0, le=65535)  # 0: do not listen (outgoing sessions only)
    # On a clean shutdown (SIGTERM): withdraw the pod CIDRs and close sessions (True), or leave like a restart
    # so graceful-restart helpers keep forwarding to this node's pods until the next agent replays (False:
    # what a DaemonSet rolling update wants).
    withdraw_on_shutdown: bool = True


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(min_length=1)
    datastore: Literal["manifest", "kube"] = "manifest"
    manifest_dir: str = ""  # for datastore=manifest
    kubeconfig: str = ""  # for datastore=kube; empty: in-cluster
    kube_namespace: str = "routed-system"  # the agent's own namespace (Secrets for BGP passwords)
    state_dir: str = DEFAULT_STATE_DIR
    socket_path: str = DEFAULT_SOCKET
    http_listen: str = "127.0.0.1:9099"  # /healthz /readyz /metrics; empty disables
    log_file: str = ""
    log_level: str = "INFO"
    mtu: int | None = Field(None, ge=576, le=65535)  # pod veth MTU; None: the uplink's MTU
    # Felix-style periodic resync: policy, routes, BGP and the pod wiring are all re-checked against the kernel
    # this often, so drift made by someone else (a rule or route deleted by hand) is repaired.
    resync_interval: float = Field(180.0, ge=0.5)
    policy: PolicyOptions = PolicyOptions()
    bgp: BgpOptions = BgpOptions()

    def validate_sources(self) -> None:
        if self.datastore == "manifest" and not self.manifest_dir:
            raise ValueError("datastore 'manifest' needs manifest_dir")


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """ROUTED_NODE_NAME=x -> {"node_name": "x"}; ROUTED_POLICY__DENY_LOG=true -> {"policy": {"deny_log": "true"}}."""
    result: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_SETTINGS:
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        target = result
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return result


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> AgentConfig:
    """File < environment < explicit overrides (command-line flags)."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: config must be a mapping")
        data = loaded
    data = _merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    config = AgentConfig.model_validate(data)
    config.validate_sources()
    return config

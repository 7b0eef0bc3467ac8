from __future__ import annotations

import pytest
from pydantic import ValidationError

from routed.config import load_config


def test_file_then_env_then_flags(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node_name: from-file\nmanifest_dir: /tmp/m\nmtu: 1400\npolicy: {deny_log: false}\n")
    env = {"ROUTED_MTU": "1300", "ROUTED_POLICY__DENY_LOG": "true", "OTHER": "x"}
    config = load_config(str(path), {"node_name": "from-flag", "mtu": None}, environ=env)
    assert config.node_name == "from-flag"
    assert config.mtu == 1300
    assert config.policy.deny_log is True
    assert config.manifest_dir == "/tmp/m"


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("node_name: n\nmanifest_dir: /m\nmtuu: 1400\n")
    with pytest.raises(ValidationError, match="mtuu"):
        load_config(str(path), environ={})
    with pytest.raises(ValidationError):
        load_config(None, {"node_name": "n", "manifest_dir": "/m", "mtu": 100}, environ={})


def test_manifest_datastore_needs_a_directory():
    with pytest.raises(ValueError, match="manifest_dir"):
        load_config(None, {"node_name": "n"}, environ={})


def test_deploy_configmap_is_a_valid_agent_config():
    from pathlib import Path

    import yaml

    from routed.config import AgentConfig

    configmap = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "configmap.yaml").read_text())
    data = yaml.safe_load(configmap["data"]["config.yaml"])
    config = AgentConfig.model_validate({**data, "node_name": "node-a"})  # ROUTED_NODE_NAME in the DaemonSet
    assert config.datastore == "kube"
    assert config.bgp.withdraw_on_shutdown is False

"""Logging of the agent: one handler (a file or stderr), every line stamped with the node's name."""

from __future__ import annotations

import logging
import os

from routed.config import AgentConfig


def setup_logging(config: AgentConfig) -> None:
    handler: logging.Handler
    if config.log_file:
        os.makedirs(os.path.dirname(config.log_file) or ".", exist_ok=True)
        handler = logging.FileHandler(config.log_file)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{config.node_name}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())

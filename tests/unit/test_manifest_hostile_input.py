"""The manifest datastore has no apiserver in front of it: an object whose name or namespace the apiserver
would refuse is left out (with a warning naming the file), the file's other objects are kept."""

from __future__ import annotations

import logging

from routed.datastore.manifest import parse_documents

TEXT = """\
kind: Node
metadata: {name: node-a}
---
kind: Node
metadata: {name: "node-b\\nannounce route 8.8.8.8/32 next-hop self"}
---
kind: Pod
metadata: {name: web, namespace: "Bad_NS"}
---
kind: Pod
metadata: {name: Web_1, namespace: demo}
---
kind: Pod
metadata: {name: web-1, namespace: demo}
"""


def test_objects_with_names_the_apiserver_refuses_are_left_out_and_the_rest_kept(caplog):
    caplog.set_level(logging.WARNING, logger="routed.datastore.manifest")
    objects = parse_documents(TEXT, "cluster.yaml")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [("Node", "node-a"), ("Pod", "web-1")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all(w.startswith("cluster.yaml: a ") for w in warnings)
    assert all("\n" not in w for w in warnings)
    assert "metadata.namespace" in warnings[1] and "metadata.name" in warnings[2]

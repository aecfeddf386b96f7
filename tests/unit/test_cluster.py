"""api/cluster.py's defaults: node ids that fit call ids and balancer rules, and a reachable node URL."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from openrealtime.api.cluster import default_node_id, default_node_url
from openrealtime.config import Settings
from openrealtime.state import NODE_ID_RE


def test_the_default_node_id_is_the_host_name_and_port_in_the_node_id_alphabet(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "Web_Server.3.example.com")
    node_id = default_node_id(Settings(port=8101))
    assert node_id == "web-server-3-example-com-8101" and NODE_ID_RE.match(node_id)
    monkeypatch.setattr(socket, "gethostname", lambda: "x" * 80)
    assert NODE_ID_RE.match(default_node_id(Settings(port=65535)))
    monkeypatch.setattr(socket, "gethostname", lambda: "___")
    assert default_node_id(Settings(port=80)) == "node-80"


def test_the_default_node_url_is_one_other_nodes_can_use(monkeypatch: pytest.MonkeyPatch):
    assert default_node_url(Settings(host="127.0.0.1", port=8101)) == "http://127.0.0.1:8101"
    assert default_node_url(Settings(host="::1", port=8101)) == "http://[::1]:8101"
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.0.0.5")
    assert default_node_url(Settings(host="0.0.0.0", port=8000)) == "http://10.0.0.5:8000"


@pytest.mark.parametrize("bad", ["Node-A", "node_a", "-a", "a-", "a" * 33, ""])
def test_node_ids_that_would_break_call_ids_are_refused(bad: str):
    with pytest.raises(ValidationError):
        Settings(node_id=bad)
    assert not NODE_ID_RE.match(bad)


def test_the_state_url_is_never_echoed():
    settings = Settings(state_url="redis://:hunter2@redis:6379/0")
    assert "hunter2" not in repr(settings)

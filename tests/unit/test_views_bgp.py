"""The CLI's BGP views: BFD sessions and the source of Service prefixes."""

from routed.views import bfd_rows, render_routes, table


def test_bfd_rows_show_negotiated_timers_and_discriminators():
    session = {"peer": "10.10.1.0", "state": "up", "remoteState": "up", "localDiscriminator": 7,
               "remoteDiscriminator": 9, "localDiag": "none", "remoteDiag": "none", "txIntervalMs": 100.0,
               "detectionTimeMs": 300.0, "configuredMinTxMs": 100, "configuredMinRxMs": 100, "multiplier": 3,
               "remoteMultiplier": 3, "sourcePort": 50000, "since": 0, "ups": 1, "downs": 0, "packetsIn": 5,
               "packetsOut": 5, "sendErrors": 0}
    rows = bfd_rows([session])
    assert rows[0]["discriminators"] == "7/9" and rows[0]["tx ms"] == "100" and rows[0]["detect ms"] == "300"
    text = table(rows, ["peer", "state", "tx ms"])
    assert text.splitlines()[1].split() == ["10.10.1.0", "up", "100"]


def test_routes_show_a_source_column_only_when_some_route_has_one():
    plain = [{"peer": "p", "prefix": "10.244.1.0/24", "nextHop": "n"}]
    assert "SOURCE" not in render_routes(plain)
    vip = plain + [{"peer": "p", "prefix": "198.51.100.5/32", "nextHop": "n", "source": "Service demo/web"}]
    out = render_routes(vip)
    assert "SOURCE" in out and "Service demo/web" in out

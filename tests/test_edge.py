"""The edge's count of open connections: what keeps the shim up (the idle
exit), told to the gateway when it goes from none to some or back, and an
open status page's stream left out of it. Requests through the edge are
tested in test_proxy_memory.py and test_proxy_edge.py."""

from __future__ import annotations

import trio

from shim.edge import Connections


async def test_the_gateway_hears_of_the_first_connection_and_the_last(autojump_clock: object) -> None:
    changes: list[int] = []
    connections = Connections(lambda: changes.append(connections.open))
    connections.opened()
    await trio.sleep(5)
    connections.opened()
    connections.closed()
    assert (connections.open, changes) == (1, [1])
    connections.closed()
    assert (connections.open, changes) == (0, [1, 0])
    assert connections.last_change == trio.current_time()


async def test_a_status_pages_stream_is_no_client_that_keeps_the_shim_up() -> None:
    changes: list[int] = []
    connections = Connections(lambda: changes.append(connections.open))
    connections.opened()
    since = connections.last_change
    with connections.detached():
        assert connections.open == 0 and changes == [1, 0]
    assert connections.open == 1 and connections.last_change == since
    connections.closed()
    assert changes == [1, 0, 0]

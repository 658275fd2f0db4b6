"""Graceful shutdown (SPEC §10.7, §11 #76): clients are told to reconnect, the process exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest
from helpers import BASE, EXT, Client, RawWS, Server, connected, pubsub_id

RESTART = {"type": "disconnect", "reason": "server_restart", "reconnect": True}


def exit_code(srv: Server, within: float) -> int:
    """The server's exit status; fails if it is still running after ``within`` seconds."""
    assert srv.proc is not None
    try:
        return srv.proc.wait(within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {within}s after the signal")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clients_are_told_to_reconnect_and_the_process_exits_0(make_server, sig: signal.Signals) -> None:
    srv = make_server("--noauth", "--public_streams", "--shutdown_timeout=5").start()
    clients = [Client(srv.url, protocol=p) for p in (EXT, EXT, BASE)]
    try:
        for i, c in enumerate(clients):
            c.expect_welcome()
            c.subscribe(pubsub_id(f"shutdown-{i}"))
        assert srv.proc is not None
        srv.proc.send_signal(sig)
        for c in clients:
            code, frames = c.closed(timeout=5)
            assert frames == [RESTART]
            assert code == 1001
        assert exit_code(srv, 5) == 0
    finally:
        for c in clients:
            c.close()
    assert "shutdown complete" in srv.output()


def test_a_client_that_ignores_the_close_does_not_hold_the_server(make_server) -> None:
    srv = make_server("--noauth", "--public_streams", "--shutdown_timeout=1").start()
    polite = Client(srv.url)
    deaf = RawWS(srv.port, protocols=[EXT])  # never answers the close frame
    idle = socket.create_connection(("127.0.0.1", srv.port))  # connected, never sent a request
    try:
        polite.expect_welcome()
        assert deaf.recv()["type"] == "welcome"
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        assert exit_code(srv, 6) == 0
        # the deaf client was still told, before the server went away
        code, frames = deaf.closed()
        assert (code, frames) == (1001, [RESTART])
        assert deaf.wait_eof(5)
    finally:
        polite.close()
        deaf.close()
        idle.close()


def test_no_new_connections_after_the_signal(make_server) -> None:
    srv = make_server("--noauth", "--public_streams", "--shutdown_timeout=2").start()
    deaf = RawWS(srv.port, protocols=[EXT])  # keeps the shutdown busy for a moment
    try:
        assert deaf.recv()["type"] == "welcome"
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        assert deaf.closed()[0] == 1001  # shutdown has started
        with pytest.raises(OSError):
            with connected(srv):
                pass
        assert exit_code(srv, 6) == 0
    finally:
        deaf.close()


def test_second_signal_exits_at_once(make_server) -> None:
    srv = make_server("--noauth", "--public_streams", "--shutdown_timeout=30", "--shutdown_delay=30").start()
    with connected(srv):
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while "shutting down" not in srv.output():  # the first signal started a 30 s delay
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        assert exit_code(srv, 5) == 1


def test_hup_does_not_stop_a_single_process(make_server) -> None:
    """`systemctl reload` sends HUP: without a master it is logged, and nobody is disconnected."""
    srv = make_server("--noauth", "--public_streams").start()
    assert srv.proc is not None
    with connected(srv, protocol=EXT) as c:
        c.subscribe(pubsub_id("hup"))
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "SIGHUP ignored" not in srv.output():
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.05)
        assert srv.proc.poll() is None
        assert srv.broadcast({"stream": "hup", "data": '"still here"'})[0] == 201
        assert c.recv()["message"] == "still here"


def test_quit_stops_a_single_process_at_once(make_server) -> None:
    srv = make_server("--noauth", "--public_streams", "--shutdown_timeout=30").start()
    assert srv.proc is not None
    with connected(srv, protocol=EXT):
        srv.proc.send_signal(signal.SIGQUIT)
        assert exit_code(srv, 3) == 0

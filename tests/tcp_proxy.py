"""A TCP proxy between the server and Redis that a test can make deaf.

Each client connection gets a pair of pump threads. :meth:`Proxy.deafen` stops
forwarding what Redis sends to connections that subscribed to something (the pub/sub
listeners), while they stay open: the "open but deaf" connection of a failover.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from helpers import free_port


class _Pipe:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.subscriber = False
        self.deaf = threading.Event()

    def close(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.close()
            except OSError:
                pass


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.pipes: list[_Pipe] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            pipe = _Pipe(client, upstream)
            self.pipes.append(pipe)
            threading.Thread(target=self._up, args=(pipe,), daemon=True).start()
            threading.Thread(target=self._down, args=(pipe,), daemon=True).start()

    def _up(self, pipe: _Pipe) -> None:
        try:
            while data := pipe.client.recv(65536):
                if b"SUBSCRIBE" in data.upper():
                    pipe.subscriber = True
                pipe.upstream.sendall(data)
        except OSError:
            pass
        pipe.close()

    def _down(self, pipe: _Pipe) -> None:
        try:
            while data := pipe.upstream.recv(65536):
                if pipe.deaf.is_set():
                    continue  # swallowed: the client hears nothing, the socket stays open
                pipe.client.sendall(data)
        except OSError:
            pass
        pipe.close()

    def deafen(self) -> int:
        """Make every pub/sub connection deaf; returns how many."""
        n = 0
        for pipe in self.pipes:
            if pipe.subscriber:
                pipe.deaf.set()
                n += 1
        return n

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for pipe in self.pipes:
            pipe.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

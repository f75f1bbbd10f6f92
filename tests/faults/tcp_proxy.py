"""A TCP proxy on 127.0.0.1 that meters what clients send, to time a fault in another process.

Clients talk to ``proxy.endpoint``; bytes are forwarded to the real server behind it.
``on_bytes(n, action)`` calls ``action()`` once ``n`` more client bytes have been forwarded (the
S3 fault tests SIGKILL the real server there: in the middle of a transfer, at a byte count, not
at a time). ``down()`` closes the listening socket and every open connection (clients see
resets, then "connection refused", as from a dead server), ``up()`` listens again on the same
port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._fire_at: int | None = None
        self._action: Callable[[], None] | None = None
        self.bytes_up = 0
        self.downs = 0
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control
    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            self.port = sock.getsockname()[1]
            self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            if listener is None:
                return
            self.downs += 1
        for sock in [listener, *conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def on_bytes(self, nbytes: int, action: Callable[[], None]) -> None:
        """Call ``action()`` (once, before forwarding more) after ``nbytes`` more client bytes."""
        with self._lock:
            self._fire_at = self.bytes_up + nbytes
            self._action = action

    def close(self) -> None:
        self._fire_at = None
        self.down()

    # ---- plumbing
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream:
                    action = None
                    with self._lock:
                        self.bytes_up += len(data)
                        if self._fire_at is not None and self.bytes_up >= self._fire_at:
                            self._fire_at, action = None, self._action
                    if action is not None:
                        action()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

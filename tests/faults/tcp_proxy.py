"""A TCP proxy on 127.0.0.1 that can play a server going away and coming back.

Clients talk to ``proxy.endpoint``; bytes are forwarded to the real server behind it. ``down()``
closes the listening socket and every open connection (clients see resets, then "connection
refused", exactly as when the server process is stopped), ``up()`` listens again on the same
port. ``cut_after(n, outage_s)`` arms a fault that fires once ``n`` more client bytes have been
forwarded: the proxy goes down in the middle of a transfer and, unless ``outage_s`` is None,
comes back ``outage_s`` seconds later. The server's own state survives, as with a restarted
MinIO that keeps its disks.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._cut_at: int | None = None
        self._outage_s: float | None = None
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

    def cut_after(self, nbytes: int, outage_s: float | None) -> None:
        """Go down once ``nbytes`` more client->server bytes have passed; back after ``outage_s``."""
        with self._lock:
            self._cut_at = self.bytes_up + nbytes
            self._outage_s = outage_s

    def close(self) -> None:
        self._cut_at = None
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
                    fire = False
                    with self._lock:
                        self.bytes_up += len(data)
                        if self._cut_at is not None and self.bytes_up >= self._cut_at:
                            self._cut_at, fire = None, True
                    if fire:
                        self._fire()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _fire(self) -> None:
        self.down()
        if self._outage_s is not None:
            timer = threading.Timer(self._outage_s, self.up)
            timer.daemon = True
            timer.start()

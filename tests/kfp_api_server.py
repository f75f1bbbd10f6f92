"""A minimal KFP v2beta1 API server on 127.0.0.1 that records what the client sends.

It implements just the endpoints ``kfp.Client`` calls for submit, schedule and list-runs, and
answers with the fields the client reads back.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: dict | None


@dataclass
class FakeKfp:
    server: ThreadingHTTPServer
    requests: list[Recorded] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def find(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


EXPERIMENT = {"experiment_id": "exp-1", "display_name": "gpunet", "namespace": "kubeflow"}


def _response(method: str, path: str, body: dict | None) -> tuple[int, dict]:
    base = "/apis/v2beta1"
    if path == f"{base}/healthz":
        return 200, {"multi_user": False}
    if path == f"{base}/experiments" and method == "GET":
        return 200, {"experiments": [EXPERIMENT], "total_size": 1}
    if path == f"{base}/experiments" and method == "POST":
        return 200, {**EXPERIMENT, "display_name": (body or {}).get("display_name", "gpunet")}
    if path.startswith(f"{base}/experiments/"):
        return 200, EXPERIMENT
    if path == f"{base}/runs" and method == "POST":
        return 200, {"run_id": "run-1", "display_name": (body or {}).get("display_name"),
                     "experiment_id": "exp-1", "state": "PENDING"}
    if path == f"{base}/runs" and method == "GET":
        return 200, {"runs": [{"run_id": "run-1", "display_name": "gpunet-training-x",
                               "state": "SUCCEEDED", "created_at": "2026-11-25T12:00:00Z"}],
                     "total_size": 1}
    if path == f"{base}/recurringruns" and method == "POST":
        return 200, {"recurring_run_id": "rr-1", "display_name": (body or {}).get("display_name"),
                     "status": "ENABLED"}
    return 404, {"error": f"not implemented: {method} {path}"}


def start() -> FakeKfp:
    holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            holder["fake"].requests.append(Recorded(method, url.path, parse_qs(url.query), body))
            status, payload = _response(method, url.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake = FakeKfp(server)
    holder["fake"] = fake
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake

"""A minimal KFP v2beta1 API server on 127.0.0.1 that records what the client sends.

It implements just the endpoints ``kfp.Client`` calls for submit, schedule and list-runs, and
answers with the fields the client reads back. Pipelines and pipeline versions are kept, as
the real server keeps them: an upload creates a pipeline together with a first version named
like it, a version name is unique within its pipeline (a second upload of it is refused with
409), and ``display_name`` filters work on the list calls.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

BASE = "/apis/v2beta1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    body: dict | None
    files: dict[str, bytes] = field(default_factory=dict)  # multipart uploads: field -> bytes


@dataclass
class FakeKfp:
    server: ThreadingHTTPServer
    requests: list[Recorded] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)  # pipeline_id -> pipeline
    versions: dict[str, dict] = field(default_factory=dict)  # version id -> version + "spec"
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def find(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def respond(self, req: Recorded) -> tuple[int, dict]:
        with self.lock:
            return _response(self, req)


EXPERIMENT = {"experiment_id": "exp-1", "display_name": "gpunet", "namespace": "kubeflow"}


def _display_name_filter(query: dict) -> str | None:
    """The value of an ``display_name EQUALS`` predicate in ``?filter=``, if any."""
    for predicate in json.loads(query.get("filter", ["{}"])[0] or "{}").get("predicates", []):
        if predicate.get("key") == "display_name" and predicate.get("operation") == "EQUALS":
            return predicate.get("stringValue") or predicate.get("string_value")
    return None


def _add_version(fake: FakeKfp, pipeline_id: str, name: str, spec: bytes) -> dict:
    version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"ver-{len(fake.versions) + 1}",
               "display_name": name, "created_at": "2026-11-25T12:00:00Z"}
    fake.versions[version["pipeline_version_id"]] = {**version, "spec": spec}
    return version


def _response(fake: FakeKfp, req: Recorded) -> tuple[int, dict]:
    method, path, body, query = req.method, req.path, req.body, req.query
    if path == f"{BASE}/healthz":
        return 200, {"multi_user": False}
    if path == f"{BASE}/experiments" and method == "GET":
        return 200, {"experiments": [EXPERIMENT], "total_size": 1}
    if path == f"{BASE}/experiments" and method == "POST":
        return 200, {**EXPERIMENT, "display_name": (body or {}).get("display_name", "gpunet")}
    if path.startswith(f"{BASE}/experiments/"):
        return 200, EXPERIMENT
    if path == f"{BASE}/runs" and method == "POST":
        return 200, {"run_id": "run-1", "display_name": (body or {}).get("display_name"),
                     "experiment_id": "exp-1", "state": "PENDING"}
    if path == f"{BASE}/runs" and method == "GET":
        return 200, {"runs": [{"run_id": "run-1", "display_name": "gpunet-training-x",
                               "state": "SUCCEEDED", "created_at": "2026-11-25T12:00:00Z"}],
                     "total_size": 1}
    if path == f"{BASE}/recurringruns" and method == "POST":
        return 200, {"recurring_run_id": "rr-1", "display_name": (body or {}).get("display_name"),
                     "status": "ENABLED"}
    if path == f"{BASE}/pipelines" and method == "GET":
        name = _display_name_filter(query)
        found = [p for p in fake.pipelines.values() if name is None or p["display_name"] == name]
        return 200, {"pipelines": found, "total_size": len(found)} if found else {}
    if path == f"{BASE}/pipelines/upload" and method == "POST":
        name = query["name"][0]
        if any(p["display_name"] == name for p in fake.pipelines.values()):
            return 409, {"error": f"pipeline {name!r} already exists", "code": 6}
        pipeline = {"pipeline_id": f"pl-{len(fake.pipelines) + 1}", "display_name": name,
                    "created_at": "2026-11-25T12:00:00Z"}
        fake.pipelines[pipeline["pipeline_id"]] = pipeline
        _add_version(fake, pipeline["pipeline_id"], name, req.files["uploadfile"])
        return 200, pipeline
    if path == f"{BASE}/pipelines/upload_version" and method == "POST":
        pipeline_id, name = query["pipelineid"][0], query["name"][0]
        if pipeline_id not in fake.pipelines:
            return 404, {"error": f"pipeline {pipeline_id} not found", "code": 5}
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name
               for v in fake.versions.values()):
            return 409, {"error": f"version {name!r} already exists", "code": 6}
        return 200, _add_version(fake, pipeline_id, name, req.files["uploadfile"])
    if path.startswith(f"{BASE}/pipelines/") and path.endswith("/versions") and method == "GET":
        pipeline_id, name = path.split("/")[-2], _display_name_filter(query)
        found = [{k: v for k, v in ver.items() if k != "spec"} for ver in fake.versions.values()
                 if ver["pipeline_id"] == pipeline_id and name in (None, ver["display_name"])]
        return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
    return 404, {"error": f"not implemented: {method} {path}"}


def _multipart_files(content_type: str, raw: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}


def start() -> FakeKfp:
    holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = self.headers.get("Content-Type", "")
            files, body = {}, None
            if content_type.startswith("multipart/form-data"):
                files = _multipart_files(content_type, raw)
            elif raw:
                body = json.loads(raw)
            req = Recorded(method, url.path, parse_qs(url.query), body, files)
            holder["fake"].requests.append(req)
            status, payload = holder["fake"].respond(req)
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

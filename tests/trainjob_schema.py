"""Offline, strict validation of TrainJobs against Kubeflow Trainer v2.3.0, and the node pod a
TrainJob turns into.

:func:`problems` lists what a real API server running Trainer v2.3.0 would refuse on create, as
far as that can be checked without one (the CRD and runtime files are in
tests/schemas/kubeflow-trainer-v2.3.0/, copied unchanged):

1. the CRD's defaults are applied first, as the API server does;
2. the CRD's ``openAPIV3Schema`` with ``jsonschema``, strictly: every object schema that lists
   ``properties`` and neither ``additionalProperties`` nor
   ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false`` (the fields the
   API server would prune, and reject with ``fieldValidation=Strict`` / ``kubectl
   --validate=strict``); the ``x-kubernetes-*`` keys are dropped before;
3. ``x-kubernetes-list-type: map``/``set``: no two items with the same key;
4. the CEL rules (``x-kubernetes-validations``) that apply on create, i.e. those not referring
   to ``oldSelf``, evaluated with cel-python where their value is present;
5. ObjectMeta, which the CRD leaves open: known fields only, name/namespace/label/annotation
   syntax (the API server's own checks);
6. the checks of Trainer v2.3.0's validating webhook that our TrainJobs can trip: the runtime
   must exist, ``runtimePatches[].manager`` is a domain-prefixed path, patched replicatedJobs and
   containers exist in the runtime, no ``env`` patch for container ``node``, no ``PET_*`` in
   ``spec.trainer.env`` (pkg/runtime/framework/plugins/{jobset,torch}).

:func:`node_pod` merges a TrainJob into the runtime's ``node`` pod template the way Trainer does
(a simplified strategic merge: lists of containers, volumes, env and mounts merge by key) so the
pod-level policies of tests/test_manifests.py and tests/test_security.py can be applied to it.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kubeflow-trainer-v2.3.0"
TRAINJOB_CRD = SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME = SCHEMAS / "torch_distributed_runtime.yaml"
RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT"}
# what CEL rules a TrainJob create is subject to, by schema path: if the CRD changes, look again
CREATE_TIME_RULES = {
    ("", "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"),
    ("", "size(self.metadata.name) <= 63"),
    ("spec.initializer.dataset.storageUri",
     "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')"),
    ("spec.initializer.model.storageUri",
     "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')"),
    ("spec.managedBy",
     "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']"),
    ("status.trainerStatus", "has(self.lastUpdatedTime)"),
}
_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers",
                "ownerReferences", "uid", "resourceVersion", "generation", "creationTimestamp",
                "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"}
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_HTTP_PATH = re.compile(r"^[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$")


def _load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def crd_schema() -> dict:
    """The TrainJob CRD's openAPIV3Schema, as shipped."""
    crd = _load(TRAINJOB_CRD)
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def runtime() -> dict:
    return _load(RUNTIME)


def _strict(schema: Any) -> Any:
    """``schema`` without x-kubernetes-* keys, closed where Kubernetes would prune."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties"
                                          and isinstance(value, dict)):
            out[key] = _strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_strict(sub) for sub in value]
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def strict_validator() -> jsonschema.protocols.Validator:
    schema = _strict(crd_schema())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def create_time_rules() -> set[tuple[str, str]]:
    """Every (schema path, CEL rule) of the CRD that applies on create (no ``oldSelf``)."""
    found = set()

    def walk(schema: dict, path: str) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" not in rule["rule"]:
                found.add((path, rule["rule"]))
        for name, sub in (schema.get("properties") or {}).items():
            walk(sub, f"{path}.{name}".lstrip("."))
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}{{}}")

    walk(crd_schema(), "")
    return found


@functools.cache
def _cel(rule: str) -> Any:
    import celpy  # cel-python ([dev] extra); only these tests need it

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_holds(rule: str, value: Any) -> bool:
    import celpy

    try:
        result = _cel(rule).evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError:
        return False
    return result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))


def _apply_defaults(schema: dict, data: Any) -> None:
    if isinstance(data, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in data and "default" in sub:
                data[name] = copy.deepcopy(sub["default"])
            if name in data:
                _apply_defaults(sub, data[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in set(data) - set(schema.get("properties") or {}):
                _apply_defaults(extra, data[name])
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for item in data:
            _apply_defaults(schema["items"], item)


def _structural(schema: dict, data: Any, path: str, out: list[str]) -> None:
    """List-map/set uniqueness and create-time CEL rules, where ``data`` has a value."""
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" not in rule["rule"] and not _cel_holds(rule["rule"], data):
            out.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(data, list):
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            names = schema["x-kubernetes-list-map-keys"]
            keys = ["/".join(str(item.get(k)) for k in names) for item in data
                    if isinstance(item, dict)]
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            if dupes:
                out.append(f"{path}: duplicate entries for {'/'.join(names)}: "
                           f"{', '.join(dupes)}")
        elif kind == "set" and len({repr(i) for i in data}) != len(data):
            out.append(f"{path}: duplicate items in a set")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(data):
                _structural(schema["items"], item, f"{path}[{i}]", out)
    elif isinstance(data, dict):
        props = schema.get("properties") or {}
        for name, value in data.items():
            sub = props.get(name, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                _structural(sub, value, f"{path}.{name}".lstrip("."), out)


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str) or not key:
        return "empty key"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return f"prefix {prefix!r} is not a DNS subdomain"
    if len(name) > 63 or not _QUALIFIED.match(name):
        return f"name part {name!r} is not a qualified name"
    return None


def _meta_problems(meta: Any, path: str, out: list[str], *, top: bool) -> None:
    if not isinstance(meta, dict):
        out.append(f"{path}: must be an object")
        return
    if top:
        unknown = sorted(set(meta) - _META_FIELDS)
        if unknown:
            out.append(f"{path}: unknown field(s) {unknown}")
        namespace = meta.get("namespace")
        if namespace is not None and (len(namespace) > 63
                                      or not re.fullmatch(_DNS1123_LABEL, namespace)):
            out.append(f"{path}.namespace: {namespace!r} is not a DNS label")
    for key, value in (meta.get("labels") or {}).items():
        problem = _key_problem(key)
        if problem is None and value and (len(value) > 63 or not _QUALIFIED.match(value)):
            problem = f"value {value!r} is not a valid label value"
        if problem:
            out.append(f"{path}.labels[{key!r}]: {problem}")
    for key in meta.get("annotations") or {}:
        problem = _key_problem(key)
        if problem:
            out.append(f"{path}.annotations[{key!r}]: {problem}")


def _runtime_containers() -> dict[str, set[str]]:
    jobs = runtime()["spec"]["template"]["spec"]["replicatedJobs"]
    return {job["name"]: {c["name"] for kind in ("containers", "initContainers")
                          for c in job["template"]["spec"]["template"]["spec"].get(kind, [])}
            for job in jobs}


def _webhook_problems(job: dict, out: list[str]) -> None:
    spec = job.get("spec") or {}
    ref = spec.get("runtimeRef") or {}
    rt = runtime()
    if (ref.get("kind"), ref.get("name")) != (rt["kind"], rt["metadata"]["name"]):
        out.append(f"spec.RuntimeRef: Invalid value: {ref}: clustertrainingruntimes."
                   f"trainer.kubeflow.org {ref.get('name')!r} not found: specified "
                   "clusterTrainingRuntime must be created before the TrainJob is created")
        return
    containers = _runtime_containers()
    for i, patch in enumerate(spec.get("runtimePatches") or []):
        manager = patch.get("manager", "")
        host, _, rest = manager.partition("/")
        if not host or not rest or len(host) > 253 or not _SUBDOMAIN.match(host) \
                or not _HTTP_PATH.match(rest):
            out.append(f"spec.runtimePatches[{i}].manager: {manager!r} must be a "
                       "domain-prefixed path (such as \"acme.io/foo\")")
        tmpl = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for rjob in tmpl.get("replicatedJobs") or []:
            if rjob["name"] not in containers:
                out.append(f"spec.runtimePatches: replicated job {rjob['name']!r} doesn't "
                           "exist in the runtime job template")
                continue
            pod = ((((rjob.get("template") or {}).get("spec") or {}).get("template") or {})
                   .get("spec") or {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c["name"] not in containers[rjob["name"]]:
                    out.append(f"spec.runtimePatches: container {c['name']!r} doesn't exist "
                               f"in the runtime job {rjob['name']}")
                elif c.get("env") and c["name"] in ("node", "dataset-initializer",
                                                    "model-initializer"):
                    out.append("spec.runtimePatches: must not have envs for the "
                               "dataset-initializer, model-initializer, node containers")
    reserved = sorted({e.get("name") for e in (spec.get("trainer") or {}).get("env") or []}
                      & RESERVED_ENV)
    if reserved:
        out.append(f"spec.trainer.env: must not have reserved envs, invalid envs configured: "
                   f"{reserved}")


def with_defaults(job: dict) -> dict:
    """A copy of ``job`` with the CRD's defaults filled in, as the API server stores it."""
    job = copy.deepcopy(job)
    _apply_defaults(crd_schema(), job)
    return job


def schema_problems(job: dict) -> list[str]:
    """What the API server itself refuses (checks 1-5 of the module docstring)."""
    job = with_defaults(job)
    out = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
           for e in sorted(strict_validator().iter_errors(job), key=lambda e: list(e.path))]
    if out:
        return out  # the API server stops at schema errors
    _meta_problems(job.get("metadata"), "metadata", out, top=True)
    for patch in job["spec"].get("runtimePatches") or []:
        tmpl = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        if "metadata" in tmpl:
            _meta_problems(tmpl["metadata"], "runtimePatches.template.metadata", out, top=False)
        for rjob in (tmpl.get("spec") or {}).get("replicatedJobs") or []:
            template = rjob.get("template") or {}
            for where, meta in (("job", template.get("metadata")),
                                ("pod", ((template.get("spec") or {}).get("template") or {})
                                 .get("metadata"))):
                if meta is not None:
                    _meta_problems(meta, f"replicatedJobs[{rjob['name']}].{where}.metadata",
                                   out, top=False)
    _structural(crd_schema(), job, "", out)
    return out


def webhook_problems(job: dict) -> list[str]:
    """What Trainer's validating webhook refuses (check 6 of the module docstring)."""
    out: list[str] = []
    _webhook_problems(with_defaults(job), out)
    return out


def problems(job: dict) -> list[str]:
    """Everything Trainer v2.3.0's API server and webhook would refuse in ``job`` on create."""
    return schema_problems(job) or webhook_problems(job)


class Invalid(AssertionError):
    """A TrainJob a Trainer v2.3.0 cluster would refuse."""


def validate(job: dict) -> None:
    """Raise :class:`Invalid` listing every problem of ``job`` (see :func:`problems`)."""
    found = problems(job)
    if found:
        raise Invalid("TrainJob refused:\n  " + "\n  ".join(found))


# --------------------------------------------------------------------------- the node pod


def _merge_by(base: list[dict], patch: list[dict], key: str, merge_item) -> list[dict]:
    out = [copy.deepcopy(item) for item in base]
    index = {item.get(key): i for i, item in enumerate(out)}
    for item in patch:
        if item.get(key) in index:
            out[index[item[key]]] = merge_item(out[index[item[key]]], item)
        else:
            out.append(copy.deepcopy(item))
    return out


def _merge_container(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "env":
            out[key] = _merge_by(out.get(key, []), value, "name", lambda a, b: copy.deepcopy(b))
        elif key == "volumeMounts":
            out[key] = _merge_by(out.get(key, []), value, "mountPath",
                                 lambda a, b: copy.deepcopy(b))
        elif key == "securityContext":
            out[key] = {**out.get(key, {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def node_pod(job: dict) -> dict:
    """The pod template (``{metadata, spec}``) of the runtime's ``node`` job after ``job``'s
    runtime patches and trainer settings, as Trainer v2.3.0 builds it."""
    rjob = next(j for j in runtime()["spec"]["template"]["spec"]["replicatedJobs"]
                if j["name"] == "node")
    pod = copy.deepcopy(rjob["template"]["spec"]["template"])
    pod.setdefault("metadata", {})
    for patch in job["spec"].get("runtimePatches") or []:
        tmpl = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for rj in tmpl.get("replicatedJobs") or []:
            if rj["name"] != "node":
                continue
            ptemplate = ((rj.get("template") or {}).get("spec") or {}).get("template") or {}
            for key in ("labels", "annotations"):
                if (ptemplate.get("metadata") or {}).get(key):
                    pod["metadata"][key] = {**pod["metadata"].get(key, {}),
                                            **ptemplate["metadata"][key]}
            for key, value in (ptemplate.get("spec") or {}).items():
                spec = pod["spec"]
                if key in ("containers", "initContainers"):
                    spec[key] = _merge_by(spec.get(key, []), value, "name", _merge_container)
                elif key == "volumes":
                    spec[key] = _merge_by(spec.get(key, []), value, "name",
                                          lambda a, b: copy.deepcopy(b))
                elif key == "nodeSelector":
                    spec[key] = {**spec.get(key, {}), **value}
                else:
                    spec[key] = copy.deepcopy(value)
    trainer = job["spec"].get("trainer") or {}
    node = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
    for key in ("image", "command", "args"):
        if key in trainer:
            node[key] = list(trainer[key]) if isinstance(trainer[key], list) else trainer[key]
    if trainer.get("env"):
        node["env"] = _merge_by(node.get("env", []), trainer["env"], "name",
                                lambda a, b: copy.deepcopy(b))
    if "resourcesPerNode" in trainer:
        node["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    return pod

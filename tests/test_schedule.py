"""``schedule``: a recurring run pinned to the pipeline version it uploads (against a fake KFP
API server that keeps pipelines and versions like the real one)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from gpunet_core.mlops import images
from pipelines import cli
from tests import kfp_api_server

UPLOAD, UPLOAD_VERSION = "/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version"
RECURRING = "/apis/v2beta1/recurringruns"


@pytest.fixture
def fake_kfp():
    server = kfp_api_server.start()
    yield server
    server.stop()


def _schedule(fake, capsys, *args: str) -> dict:
    code = cli.main(["schedule", "--host", fake.host, "--cron", "0 3 * * 1", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_schedule_pins_the_version_it_uploads(fake_kfp, capsys):
    out = _schedule(fake_kfp, capsys, "--param", "epochs=5", "--max-concurrency", "2")
    (upload,) = fake_kfp.find("POST", UPLOAD)
    (upload_version,) = fake_kfp.find("POST", UPLOAD_VERSION)
    assert upload.query["name"] == ["gpunet-training"]
    # the version is the cluster DAG, named after the image tag and its content
    package = upload_version.files["uploadfile"]
    assert package == upload.files["uploadfile"]
    docs = list(yaml.safe_load_all(package))
    assert docs[0]["pipelineInfo"]["name"] == "gpunet-training"
    assert docs[1]["platforms"]["kubernetes"]  # cluster settings: secrets, GPUs
    name = f"{images.default_tag()}-{hashlib.sha256(package).hexdigest()[:12]}"
    assert upload_version.query == {"name": [name], "pipelineid": ["pl-1"]}
    stored = fake_kfp.versions[out["version_id"]]
    assert stored["display_name"] == name and stored["pipeline_id"] == "pl-1"
    assert out == {"recurring_run_id": "rr-1", "cron": "0 0 3 * * 1", "pipeline_id": "pl-1",
                   "version_id": out["version_id"], "version_name": name}
    # the recurring run references that version by id, and carries no spec of its own
    (req,) = fake_kfp.find("POST", RECURRING)
    assert req.body["pipeline_version_reference"] == {"pipeline_id": "pl-1",
                                                      "pipeline_version_id": out["version_id"]}
    assert not req.body.get("pipeline_spec")
    assert req.body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert int(req.body["max_concurrency"]) == 2
    assert req.body["no_catchup"] is True and req.body["mode"] == "ENABLE"
    assert req.body["runtime_config"]["parameters"] == {"epochs": 5}


def test_schedule_again_reuses_the_version_and_a_changed_dag_adds_one(fake_kfp, capsys):
    first = _schedule(fake_kfp, capsys)
    uploads = len(fake_kfp.find("POST", UPLOAD)) + len(fake_kfp.find("POST", UPLOAD_VERSION))
    again = _schedule(fake_kfp, capsys)
    assert again["version_id"] == first["version_id"]
    assert len(fake_kfp.find("POST", UPLOAD)) + len(fake_kfp.find("POST", UPLOAD_VERSION)) \
        == uploads, "the same DAG is not uploaded twice"
    spec_of_first = fake_kfp.versions[first["version_id"]]["spec"]
    changed = _schedule(fake_kfp, capsys, "--gpus-per-node", "8")
    assert changed["pipeline_id"] == first["pipeline_id"]  # a new version, not a new pipeline
    assert changed["version_id"] != first["version_id"]
    assert changed["version_name"] != first["version_name"]
    assert len(fake_kfp.find("POST", UPLOAD)) == 1
    # what the first schedule runs is untouched by the later upload
    assert fake_kfp.versions[first["version_id"]]["spec"] == spec_of_first
    runs = fake_kfp.find("POST", RECURRING)
    assert [r.body["pipeline_version_reference"]["pipeline_version_id"] for r in runs] == [
        first["version_id"], first["version_id"], changed["version_id"]]


def test_schedule_into_a_named_existing_pipeline(fake_kfp, capsys):
    _schedule(fake_kfp, capsys, "--pipeline-name", "retraining")
    out = _schedule(fake_kfp, capsys, "--pipeline-name", "retraining", "--gpus-per-node", "2")
    assert [r.query["name"] for r in fake_kfp.find("POST", UPLOAD)] == [["retraining"]]
    assert fake_kfp.find("POST", UPLOAD_VERSION)[-1].query["pipelineid"] == [out["pipeline_id"]]


def test_recurring_run_macros_are_refused_before_anything_is_sent(fake_kfp, capsys):
    # KFP 2.17 would hand the run the literal text (see cli.check_no_macros)
    for value in ("nightly-[[CurrentTime]]", "[[ScheduledTime.2006-01-02]]",
                  "{{$.pipeline_job_schedule_time_utc}}"):
        code = cli.main(["schedule", "--host", fake_kfp.host, "--cron", "0 3 * * 1",
                         "--param", f"mlflow_experiment={value}"])
        assert code == 2
        err = capsys.readouterr().err
        assert "does not expand" in err and "PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER" in err
    assert not [r for r in fake_kfp.requests if r.method == "POST"]
    cli.check_no_macros({"mlflow_experiment": "nightly", "epochs": 3, "lr": 0.1})


def test_a_refused_upload_says_what_and_where(fake_kfp, capsys):
    answer = fake_kfp.respond
    fake_kfp.respond = lambda req: ((500, {"error": "no space left on device", "code": 13})
                                    if req.path == UPLOAD else answer(req))
    code = cli.main(["schedule", "--host", fake_kfp.host, "--cron", "0 3 * * 1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"uploading the pipeline failed at {fake_kfp.host}" in err
    assert not fake_kfp.find("POST", RECURRING)


def test_the_scheduled_version_hands_promote_its_scheduled_time(fake_kfp, capsys):
    """The KFP 2.17 driver fills in the scheduled time of a recurring run (the Workflow's
    scheduledworkflows.kubeflow.org/workflowEpoch label; a one-off run gets its creation time)
    only for a task input that is the constant {{$.pipeline_job_schedule_time_utc}}."""
    out = _schedule(fake_kfp, capsys)
    spec = next(yaml.safe_load_all(fake_kfp.versions[out["version_id"]]["spec"]))
    inputs = spec["root"]["dag"]["tasks"]["promote"]["inputs"]["parameters"]
    assert inputs["scheduled_time"] == {
        "runtimeValue": {"constant": "{{$.pipeline_job_schedule_time_utc}}"}}


def test_the_search_pipeline_is_submitted_and_scheduled_under_its_own_name(fake_kfp, capsys):
    from tests.test_search_pipeline import loop_of

    out = _schedule(fake_kfp, capsys, "--pipeline", "search", "--parallelism", "2",
                    "--param", "trials=20", "--param", "budget_ms=5")
    (upload,) = fake_kfp.find("POST", UPLOAD)
    assert upload.query["name"] == ["gpunet-search"]
    assert "architecture search" in upload.query["description"][0]
    docs = list(yaml.safe_load_all(fake_kfp.versions[out["version_id"]]["spec"]))
    assert docs[0]["pipelineInfo"]["name"] == "gpunet-search"
    assert loop_of(docs[0])[1]["iteratorPolicy"]["parallelismLimit"] == 2
    assert docs[1]["platforms"]["kubernetes"]  # cluster settings: the study's Secret, GPUs
    (req,) = fake_kfp.find("POST", RECURRING)
    assert req.body["runtime_config"]["parameters"] == {"trials": 20, "budget_ms": 5.0}

    assert cli.main(["submit", "--host", fake_kfp.host, "--pipeline", "search",
                     "--param", "workers=4"]) == 0
    sent = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = fake_kfp.find("POST", "/apis/v2beta1/runs")
    assert sent["url"] == f"{fake_kfp.host}/#/runs/details/{sent['run_id']}"
    assert run.body["display_name"].startswith("gpunet-search-")
    assert run.body["runtime_config"]["parameters"] == {"workers": 4}
    tasks = run.body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert {"search-setup", "search-front", "train-student"} <= set(tasks)


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "search", "--param", "study_storage=sqlite:///study.db"],
     "cannot share an sqlite study"),
    (["--pipeline", "search", "--param", "budget_ms=0"], "--param budget_ms=0.0: must be > 0"),
    (["--pipeline", "search", "--parallelism", "-1"], "--parallelism -1"),
    (["--parallelism", "2"], "with --pipeline search only"),
    (["--param", "trials=3"], "unknown pipeline parameter 'trials'"),
])
@pytest.mark.parametrize("action", ["submit", "schedule"])
def test_search_submissions_with_bad_settings_send_nothing(fake_kfp, capsys, action, args,
                                                          message):
    cron = ["--cron", "0 3 * * 1"] if action == "schedule" else []
    assert cli.main([action, "--host", fake_kfp.host, *cron, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not [r for r in fake_kfp.requests if r.method == "POST"]

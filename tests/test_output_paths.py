"""Output-path checks, the folders a failed command removes, the warnings about settings that
are legal but most likely not meant, and "cannot reach" told apart from "not found".

The user's side of each (exit code, message, no traceback, no files) is in
:mod:`tests.bad_inputs`; these test the helpers' rules and what is a warning, not an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from gpunet_core.utils.errors import OutputPathError
from gpunet_core.utils.files import (
    check_output_dir,
    check_output_file,
    remove_new_dirs_on_error,
)
from tests.bad_inputs import inputs

UNWRITABLE = Path("/sys")  # not even root can create files there


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------- the rules


def test_a_file_output_needs_its_folder(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    before = tree(tmp_path)
    assert check_output_file(tmp_path / "new.json", "--results-file") == tmp_path / "new.json"
    assert check_output_file(tmp_path / "old.json", "--results-file")  # replaced later
    assert check_output_file("s3://bucket/r.json", "--results-file") is None
    # a folder that a library caller (a pipeline step) lets the writer create
    assert check_output_file(tmp_path / "a" / "b" / "r.json", "--results-file", parents=True)
    with pytest.raises(OutputPathError, match=r"cannot write --results-file .*/nodir/r\.json: "
                                              r"its folder .*/nodir does not exist; create it "
                                              r"\(mkdir -p .*/nodir\) or choose another "
                                              r"--results-file$"):
        check_output_file(tmp_path / "nodir" / "r.json", "--results-file")
    assert tree(tmp_path) == before, "a check creates nothing (and leaves no probe file)"


def test_a_folder_output_is_made_with_its_parents(tmp_path):
    before = tree(tmp_path)
    assert check_output_dir(tmp_path / "runs" / "a" / "b", "--output")
    assert check_output_dir(tmp_path, "--output") == tmp_path
    assert check_output_dir("s3://bucket/runs/a", "--output") is None
    assert tree(tmp_path) == before, "the folders are made by the command, not by the check"


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_folder_on_the_path_that_is_a_file(tmp_path, kind):
    (tmp_path / "taken").write_text("x")
    check = check_output_file if kind == "file" else check_output_dir
    for target in (tmp_path / "taken" / "out", tmp_path / "taken" / "a" / "b" / "out"):
        with pytest.raises(OutputPathError, match=r"cannot write --out .*/taken/.*out: .*/taken "
                                                  r"is a file, not a folder; choose another "
                                                  r"--out or move .*/taken away$"):
            check(target, "--out")


def test_the_wrong_kind_at_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputPathError, match=r"it is a file, not a folder; remove it or "
                                              r"choose another --output$"):
        check_output_dir(tmp_path / "file", "--output")
    with pytest.raises(OutputPathError, match=r"it is a folder, not a file; name a file inside "
                                              r"it or choose another -o$"):
        check_output_file(tmp_path / "folder", "-o")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(OutputPathError, match="it is a broken symbolic link, not a folder"):
        check_output_dir(tmp_path / "dangling", "--output")


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="no /sys on this system")
def test_a_folder_nobody_can_write_even_root():
    """Root passes os.access; the probe file shows what the system really allows."""
    with pytest.raises(OutputPathError, match=r"cannot write --results-file /sys/r\.json: no "
                                              r"file can be created in /sys \(.*\); choose "
                                              r"another --results-file in a writable place$"):
        check_output_file(UNWRITABLE / "r.json", "--results-file")
    with pytest.raises(OutputPathError, match=r"no folder can be created in /sys"):
        check_output_dir(UNWRITABLE / "gpunet" / "run", "--output")
    with pytest.raises(OutputPathError, match=r"no file can be created in it"):
        check_output_dir(UNWRITABLE, "--output")


def test_the_caller_chooses_the_error_class(tmp_path):
    from pipelines.cli import PipelineError

    with pytest.raises(PipelineError, match="does not exist"):
        check_output_file(tmp_path / "nodir" / "p.yaml", "--output", error=PipelineError)


# --------------------------------------------------------------------------- cleanup


def test_a_failed_command_removes_the_empty_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), remove_new_dirs_on_error(tmp_path / "a" / "b" / "run",
                                                               tmp_path / "kept"):
        (tmp_path / "a" / "b" / "run").mkdir(parents=True)
        raise RuntimeError("the checkpoint check failed")
    assert tree(tmp_path) == {"kept"}


def test_folders_with_files_and_a_success_are_kept(tmp_path):
    with pytest.raises(RuntimeError), remove_new_dirs_on_error(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run" / "train").mkdir(parents=True)
        (tmp_path / "a" / "run" / "part.jpg").write_bytes(b"resumable")
        raise RuntimeError("failed half-way")
    assert (tmp_path / "a" / "run" / "part.jpg").is_file()
    with remove_new_dirs_on_error(tmp_path / "b", None, "s3://bucket/x"):
        (tmp_path / "b").mkdir()
    assert (tmp_path / "b").is_dir()


# --------------------------------------------------------------------------- warnings


def test_a_run_no_longer_than_its_warmup_is_a_warning():
    from gpunet_core.training.config import TrainConfig, config_warnings

    (warning,) = config_warnings(TrainConfig(data="d", epochs=3, warmup_epochs=3, lr=0.1))
    assert "--epochs 3 is not longer than --warmup-epochs 3" in warning
    assert "never reaches --lr 0.1" in warning and "lower --warmup-epochs" in warning
    assert config_warnings(TrainConfig(data="d", epochs=4, warmup_epochs=3)) == []
    assert config_warnings(TrainConfig(data="d", epochs=1, warmup_epochs=0)) == []


def test_train_logs_the_warmup_warning_before_its_checks(tmp_path, caplog, capsys):
    """The warning comes first and does not stop the run (here a one-class dataset does)."""
    from gpunet_core.cli import main

    data = inputs.build(tmp_path / "in") / "one_class"
    with caplog.at_level(logging.WARNING):
        code = main(["train", str(data), "--output", str(tmp_path / "run"), "-j", "0",
                     "-b", "2", "--img-size", "32", "--epochs", "2"])
    assert code == 2
    assert "--epochs 2 is not longer than --warmup-epochs 3" in caplog.text
    assert "has images of one class only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_batch_that_drops_much_of_each_epoch_is_a_warning(tmp_path):
    from gpunet_core.training.config import TrainError
    from gpunet_core.training.loop import check_batch_size

    assert check_batch_size(16, 8, 1, tmp_path) is None
    assert check_batch_size(17, 8, 1, tmp_path) is None  # 1 of 17 left out: fine
    assert check_batch_size(10, 8, 1, tmp_path) is None  # 2 of 10: at most a quarter
    warning = check_batch_size(12, 8, 1, tmp_path)
    assert "-b 8 leaves out 4 of the 12 training images of each process" in warning
    # per process, as DistributedSampler pads: 10 images over 4 processes are 3 each
    with pytest.raises(TrainError, match=r"batch size 4 \(-b, per process\) is larger than the "
                                         r"training set: .* has 10 images, 3 per process over 4 "
                                         r"processes.* lower -b to at most 3"):
        check_batch_size(10, 4, 4, tmp_path)


def test_pipeline_parameters_no_longer_than_the_warmup_warn(capsys):
    from pipelines import cli

    assert cli.parse_params(["epochs=2", "warmup_epochs=2", "enable_distill=false"]) == {
        "epochs": 2, "warmup_epochs": 2, "enable_distill": False}
    err = capsys.readouterr().err
    assert "pipelines: warning: epochs=2 is not longer than warmup_epochs=2: the student " \
           "never leaves warm-up, so its learning rate never reaches lr=" in err
    assert "teacher" not in err  # no teacher without distillation
    cli.parse_params(["epochs=1", "teacher_epochs=4", "warmup_epochs=3"])
    err = capsys.readouterr().err
    assert "epochs=1 is not longer than warmup_epochs=3" in err
    assert "teacher_epochs" not in err  # 4 epochs leave a 3-epoch warm-up
    cli.parse_params(["teacher_epochs=2", "warmup_epochs=2"])
    assert "teacher_epochs=2 is not longer than warmup_epochs=2: the teacher" in \
        capsys.readouterr().err
    # -1: the step drops the recipe's warm-up from a run no longer than it; 0: none
    for params in (["epochs=1"], ["epochs=1", "warmup_epochs=-1"], ["epochs=1", "warmup_epochs=0"],
                   ["epochs=5", "teacher_epochs=5", "warmup_epochs=4"]):
        cli.parse_params(params)
        assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------- class indices


def test_a_validation_split_lacking_a_class_keeps_the_training_indices(tmp_path):
    """Without a manifest, val/ with classes a and c (train/: a, b, c) is labelled by the
    training split's list: c stays 2, not 1."""
    from gpunet_core.data.loaders import EvalConfig, build_eval_loader

    inputs._image_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "c": 2}},
                         0)
    loader = build_eval_loader(tmp_path / "val", EvalConfig(16, 1.0), batch_size=8, workers=0,
                               classes=["a", "b", "c"])
    (_, labels), = list(loader)
    assert labels.tolist() == [0, 2, 2]


# --------------------------------------------------------------------------- MLflow


def test_cannot_reach_is_not_not_found(tmp_path, monkeypatch):
    """A closed port is "cannot reach MLflow at ..."; a store that answers (sqlite, real
    MLflow) is "has no version"."""
    import socket

    from gpunet_core.mlops import registry
    from gpunet_core.mlops.mlflow_client import MlflowUnreachableError, unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MlflowUnreachableError, match=rf"cannot reach MLflow at "
                                                     rf"http://127.0.0.1:{port} \(connection "
                                                     r"refused\): start the tracking server"):
        registry.promote("gpunet", "1", tracking_uri=f"http://127.0.0.1:{port}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(registry.RegistryError, match="registered model 'gpunet' has no "
                                                     "version 1") as found:
        registry.promote("gpunet", "1", tracking_uri=uri)
    assert not isinstance(found.value, MlflowUnreachableError)
    assert unreachable(ValueError("no such thing")) is None
    assert unreachable(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"

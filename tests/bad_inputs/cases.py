"""The case table of the bad-input corpus.

A :class:`Case` is one bad input handed to one entry point:

* ``gpunet``: ``gpunet_core.cli.main(argv)`` (``python -m gpunet_core`` when ``subprocess``);
* ``pipelines``: ``pipelines.cli.main(argv)`` (``python -m pipelines``);
* ``step``: ``gpunet_core.steps.<step>(*args, **kwargs)`` with the values a KFP component
  passes (artifact paths such as ``<checkpoint>/model_best.pth.tar``).

Placeholders in arguments: ``{in}`` the broken inputs of :mod:`tests.bad_inputs.inputs`,
``{out}`` the case's own empty directory (also the working directory and the cache home),
``{digits}`` the prepared ``digits_small`` dataset, ``{port}`` a closed 127.0.0.1 port,
``{server}`` the URL of a 127.0.0.1 server that answers but has nothing (MLflow's and KFP's
"not found"; KFP's health check passes), ``{repo}`` the repository root.

Every case must fail with exit code 2, print no traceback, and name what is wrong and how to
fix it (``expect``: fragments that must all appear in the message). Output promises:
``outputs`` must not exist afterwards; ``existing`` files are written before the run and must
be byte-for-byte and mtime unchanged (a path below one makes its folders: ``{out}/x/keep``
turns ``{out}/x`` into a folder that exists where a file is wanted); no other file, and no
empty folder, may appear under ``{out}`` except below a ``leaves`` path (the resumable staging
of ``prepare``), and no temp file may appear anywhere.

Output paths: a folder output (``train --output``, ``prepare --out``, ``report -o``,
``export-triton -r``, ``run-local --workdir``) is created with its missing parents, and
removed again when the command fails; a file output (``validate --results-file``, ``bench
-o``, ``export-onnx -o``, ``compile -o``) needs its folder to exist. :data:`UNWRITABLE` is a
folder that not even root can create files in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    id: str
    entry: str  # "gpunet" | "pipelines" | "step"
    argv: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    existing: tuple[str, ...] = ()
    leaves: tuple[str, ...] = ()
    env: dict[str, str | None] = field(default_factory=dict)
    step: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    subprocess: bool = False
    exit_code: int = 2


BUCKET = "s3://gpunet-bad-inputs"
# no credentials anywhere: AWS_* unset, no shared files, no instance metadata lookups
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                  "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "AWS_ENDPOINT_URL": None,
                  "AWS_ENDPOINT_URL_S3": None, "AWS_SHARED_CREDENTIALS_FILE": "{out}/no-creds",
                  "AWS_CONFIG_FILE": "{out}/no-config", "AWS_EC2_METADATA_DISABLED": "true",
                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI": None}
# credentials, but the endpoint is a closed port on this machine
WRONG_ENDPOINT = {**NO_CREDENTIALS, "AWS_ACCESS_KEY_ID": "gpunet-bad-inputs",
                  "AWS_SECRET_ACCESS_KEY": "gpunet-bad-inputs",
                  "AWS_ENDPOINT_URL": "http://127.0.0.1:{port}"}
NO_MLFLOW = {"MLFLOW_TRACKING_URI": None}
# MLflow at a closed port, or at a server that has nothing; one HTTP try, no retries
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
MLFLOW_DOWN = {**QUICK, "MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}
MLFLOW_EMPTY = {**QUICK, "MLFLOW_TRACKING_URI": "{server}"}
UNREACHABLE = ("cannot reach MLflow at http://127.0.0.1:{port}", "connection refused",
               "start the tracking server", "MLFLOW_TRACKING_URI")
KFP_UNREACHABLE = ("cannot reach the KFP API at http://127.0.0.1:{port}", "connection refused",
                   "check --host")
# sysfs: root passes every permission check there, yet no file can be created in it
UNWRITABLE = "/sys"

RUN = "{out}/run"
TRAIN_OUTPUTS = tuple(f"{RUN}/{name}" for name in ("last.pth.tar", "model_best.pth.tar",
                                                   "args.yaml", "summary.csv"))
# the smallest sane training command line, so each case fails on its one bad input
SEARCH = ("search", "{digits}", "--out", "{out}/search", "--img-size", "32", "--trials", "2",
          "--no-references", "--family", "non_d")
TRAIN = ("train", "{digits}", "--output", RUN, "-j", "0", "-b", "8", "--img-size", "32",
         "--epochs", "1", "--max-steps", "1")
VALIDATE = ("validate", "{in}/folder/val", "-j", "0", "--no-progress",
            "--results-file", "{out}/results.json")
EXPORT = ("export-onnx", "-o", "{out}/model.onnx")
EXPORT_OUTPUTS = ("{out}/model.onnx", "{out}/model.onnx.json")
PREPARE_OUT = ("--out", "{out}/ds", "-j", "1", "--no-progress")
DATASET_OUTPUTS = ("{out}/ds/manifest.json", "{out}/ds/SHA256SUMS")
RUN_LOCAL = ("run-local", "--workdir", "{out}/work")
SERVER = ("--host", "http://127.0.0.1:{port}")


def gpunet(id: str, argv: tuple[str, ...], expect: tuple[str, ...], **kw: Any) -> Case:
    return Case(id, "gpunet", argv, expect, **kw)


def pipelines(id: str, argv: tuple[str, ...], expect: tuple[str, ...], **kw: Any) -> Case:
    return Case(id, "pipelines", argv, expect, **kw)


def step(id: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
         expect: tuple[str, ...], **kw: Any) -> Case:
    return Case(id, "step", expect=expect, step=name, args=args, kwargs=kwargs, **kw)


# --------------------------------------------------------------------------- output paths
# Each command that writes, with the path it is given: (entry, argv for that path, its flag).
# The rest of each command line is valid, or fails only after the output check (run-local:
# a missing dataset, found by its preflight, which runs after the --workdir check).
FILE_OUTPUTS = {
    "validate": ("gpunet", lambda p: (*VALIDATE[:-1], p, "--model", "gpunet_0"),
                 "--results-file"),
    "bench": ("gpunet", lambda p: ("bench", "--onnx", "{in}/corrupt.onnx", "-o", p),
              "-o/--results-file"),
    "export": ("gpunet", lambda p: ("export-onnx", "--model", "gpunet_0", "-o", p),
               "--output"),
    "compile": ("pipelines", lambda p: ("compile", "-o", p), "--output"),
}
FOLDER_OUTPUTS = {
    "train": ("gpunet", lambda p: ("train", "{digits}", "--output", p, *TRAIN[4:]), "--output"),
    "prepare": ("gpunet", lambda p: ("prepare", "digits", "--per-class", "2", "--out", p,
                                     "-j", "1", "--no-progress"), "--out"),
    "report": ("gpunet", lambda p: ("report", "{in}/bad_result.json", "-o", p),
               "-o/--output-dir"),
    "triton": ("gpunet", lambda p: ("export-triton", "--onnx", "{in}/corrupt.onnx", "-r", p),
               "-r/--repository"),
    "run-local": ("pipelines", lambda p: ("run-local", "--workdir", p, "--param",
                                          "dataset_source={in}/no_dataset"), "--workdir"),
}


def output_path_cases() -> list[Case]:
    """Per file output: its folder missing, a file, not writable; the path a folder. Per
    folder output: a parent that is a file, not writable; the path a file."""
    cases = []
    for name, (entry, argv, flag) in FILE_OUTPUTS.items():
        cases += [
            Case(f"{name}-output-folder-missing", entry, argv("{out}/nodir/result.out"),
                 (f"cannot write {flag} {{out}}/nodir/result.out",
                  "its folder {out}/nodir does not exist", "mkdir -p {out}/nodir",
                  f"choose another {flag}"), outputs=("{out}/nodir",)),
            Case(f"{name}-output-below-a-file", entry, argv("{out}/taken/result.out"),
                 (f"cannot write {flag} {{out}}/taken/result.out",
                  "{out}/taken is a file, not a folder", f"choose another {flag}"),
                 existing=("{out}/taken",)),
            Case(f"{name}-output-is-a-folder", entry, argv("{out}/result.out"),
                 (f"cannot write {flag} {{out}}/result.out", "it is a folder, not a file",
                  f"choose another {flag}"), existing=("{out}/result.out/keep",)),
            Case(f"{name}-output-not-writable", entry, argv(f"{UNWRITABLE}/gpunet-result.out"),
                 (f"cannot write {flag} {UNWRITABLE}/gpunet-result.out",
                  f"no file can be created in {UNWRITABLE}", f"choose another {flag}")),
        ]
    for name, (entry, argv, flag) in FOLDER_OUTPUTS.items():
        cases += [
            Case(f"{name}-output-below-a-file", entry, argv("{out}/taken/sub/dir"),
                 (f"cannot write {flag} {{out}}/taken/sub/dir",
                  "{out}/taken is a file, not a folder", f"choose another {flag}"),
                 existing=("{out}/taken",)),
            Case(f"{name}-output-is-a-file", entry, argv("{out}/dir"),
                 (f"cannot write {flag} {{out}}/dir", "it is a file, not a folder",
                  f"remove it or choose another {flag}"), existing=("{out}/dir",)),
            Case(f"{name}-output-not-writable", entry, argv(f"{UNWRITABLE}/gpunet/dir"),
                 (f"cannot write {flag} {UNWRITABLE}/gpunet/dir",
                  f"no folder can be created in {UNWRITABLE}", f"choose another {flag}")),
        ]
    return cases


CASES: list[Case] = [
    # ------------------------------------------------------------ gpunet spec: JSON specs
    gpunet("spec-not-json", ("spec", "{in}/spec_not_json.json"),
           ("invalid GPUNet spec", "spec_not_json.json", "not valid JSON", "line 1 column")),
    gpunet("spec-empty-file", ("spec", "{in}/spec_empty.json"),
           ("spec_empty.json", "not valid JSON")),
    gpunet("spec-channel-mismatch", ("spec", "{in}/spec_channel_mismatch.json"),
           ("entry 2, field 'num_in_channels'", "channel mismatch: 3 but entry 1")),
    gpunet("spec-unknown-layer-type", ("spec", "{in}/spec_unknown_layer.json"),
           ("entry 5, field 'layer_type'", "unknown layer type 'transformer'")),
    gpunet("spec-no-layers-list", ("spec", "{in}/spec_no_layers.json"),
           ("spec_no_layers.json", "must be a non-empty JSON list of layer entries")),
    gpunet("spec-missing-file", ("spec", "{in}/no_such_spec.json"),
           ("no_such_spec.json", "file not found")),
    gpunet("spec-unknown-model", ("spec", "gpunet_42"),
           ("unknown model 'gpunet_42'", "valid names are gpunet_0", "JSON spec")),
    gpunet("spec-zero-classes", ("spec", "gpunet_0", "--num-classes", "0"),
           ("--num-classes", "must be >= 1, got 0")),
    gpunet("spec-classes-not-a-number", ("spec", "gpunet_0", "--num-classes", "ten"),
           ("argument --num-classes: invalid int value: 'ten'",)),

    # ------------------------------------------------------------ gpunet train
    gpunet("train-model-spec-malformed",
           (*TRAIN, "--model", "{in}/spec_channel_mismatch.json"),
           ("spec_channel_mismatch.json", "entry 2, field 'num_in_channels'"),
           outputs=TRAIN_OUTPUTS),
    gpunet("train-unknown-model", (*TRAIN, "--model", "gpunet_42"),
           ("unknown model 'gpunet_42'", "valid names are"), outputs=TRAIN_OUTPUTS),
    gpunet("train-model-spec-missing", (*TRAIN, "--model", "{in}/no_such_spec.json"),
           ("no_such_spec.json", "file not found"), outputs=(RUN,)),
    gpunet("train-s3-model-spec-without-credentials",
           (*TRAIN, "--model", f"{BUCKET}/specs/trial.json"),
           ("no S3 credentials found", "AWS_SECRET_ACCESS_KEY"), outputs=(RUN,),
           env=NO_CREDENTIALS),
    gpunet("train-zero-batch", (*TRAIN, "-b", "0"),
           ("-b/--batch-size must be >= 1, got 0",), outputs=(RUN,)),
    gpunet("train-negative-epochs", (*TRAIN, "--epochs", "-3"),
           ("--epochs must be >= 1, got -3",), outputs=(RUN,)),
    gpunet("train-nan-lr", (*TRAIN, "--lr", "nan"),
           ("--lr must be a finite number >= 0, got nan",), outputs=(RUN,)),
    gpunet("train-absurd-img-size", (*TRAIN, "--img-size", "100000"),
           ("--img-size must be in [8, 2048] pixels, got 100000",), outputs=(RUN,)),
    gpunet("train-negative-workers", (*TRAIN, "-j", "-1"),
           ("-j/--workers must be >= 0, got -1",), outputs=(RUN,)),
    gpunet("train-unknown-optimizer", (*TRAIN, "--opt", "adamw9"),
           ("--opt 'adamw9' is not usable", "rmsproptf"), outputs=(RUN,)),
    gpunet("train-unknown-scheduler", (*TRAIN, "--sched", "linear9"),
           ("--sched 'linear9' is not usable", "cosine"), outputs=(RUN,)),
    gpunet("train-crop-scale-out-of-range", (*TRAIN, "--scale", "2", "1"),
           ("--scale 2 1", "0 < MIN <= MAX <= 1"), outputs=(RUN,)),
    gpunet("train-initial-checkpoint-truncated",
           (*TRAIN, "--initial-checkpoint", "{in}/truncated.pth"),
           ("cannot read checkpoint", "truncated.pth", "copy or download it again"),
           outputs=TRAIN_OUTPUTS),
    gpunet("train-initial-checkpoint-pickled",
           (*TRAIN, "--initial-checkpoint", "{in}/pickled.pth.tar"),
           ("stores pickled Python objects", "argparse.Namespace", "--trust-checkpoint"),
           outputs=TRAIN_OUTPUTS),
    gpunet("train-initial-checkpoint-wrong-architecture",
           (*TRAIN, "--model", "gpunet_1", "--initial-checkpoint", "{in}/g0_10.pth"),
           ("does not fit this model (gpunet_1)", "pass --model gpunet_0"),
           outputs=TRAIN_OUTPUTS),
    # the output folder is made before the checkpoint is read, and removed again
    gpunet("train-resume-from-plain-weights", (*TRAIN, "--resume", "{in}/linear.pth"),
           ("cannot resume from", "linear.pth", "use --initial-checkpoint"),
           outputs=(RUN,)),
    gpunet("train-missing-dataset", ("train", "{in}/no_dataset", "--output", RUN),
           ("dataset directory not found", "no_dataset/train"), outputs=(RUN,)),
    gpunet("train-batch-larger-than-dataset", (*TRAIN, "-b", "100000"),
           ("batch size 100000", "larger than the training set", "lower -b"),
           outputs=TRAIN_OUTPUTS),
    gpunet("train-s3-output-without-credentials",
           ("train", "{digits}", "--output", f"{BUCKET}/run", *TRAIN[4:]),
           ("no S3 credentials found", "AWS_ACCESS_KEY_ID"), env=NO_CREDENTIALS,
           outputs=("{out}/cache/gpunet/outputs",)),

    # ------------------------------------------------------------ gpunet validate
    gpunet("validate-checkpoint-truncated",
           (*VALIDATE, "--model", "gpunet_0", "--checkpoint", "{in}/truncated.pth"),
           ("cannot read checkpoint", "truncated, corrupt", "copy or download it again"),
           existing=("{out}/results.json",)),
    gpunet("validate-checkpoint-wrong-architecture",
           (*VALIDATE, "--model", "gpunet_1", "--checkpoint", "{in}/g0_10.pth"),
           ("does not fit this model (gpunet_1)", "the checkpoint fits model 'gpunet_0'",
            "pass --model gpunet_0"), outputs=("{out}/results.json",)),
    gpunet("validate-checkpoint-pickled",
           (*VALIDATE, "--model", "gpunet_0", "--checkpoint", "{in}/pickled.pth.tar"),
           ("argparse.Namespace", "pass trusted=True (CLI: --trust-checkpoint)"),
           existing=("{out}/results.json",), subprocess=True),
    gpunet("validate-class-count-mismatch",
           (*VALIDATE, "--model", "gpunet_0", "--checkpoint", "{in}/g0_10.pth",
            "--img-size", "32"),
           ("has 2 class folders but the model's classifier has 10 outputs",
            "validate with the checkpoint trained on this dataset"),
           existing=("{out}/results.json",)),
    gpunet("validate-negative-workers", (*VALIDATE, "--model", "gpunet_0", "-j", "-1"),
           ("-j/--workers must be >= 0", "got -1"), outputs=("{out}/results.json",)),
    gpunet("validate-zero-batch", (*VALIDATE, "--model", "gpunet_0", "-b", "0"),
           ("-b/--batch-size must be >= 1, got 0",), outputs=("{out}/results.json",)),
    gpunet("validate-zero-img-size", (*VALIDATE, "--model", "gpunet_0", "--img-size", "0"),
           ("--img-size must be in [8, 2048] pixels, got 0", "leave it out"),
           outputs=("{out}/results.json",)),
    gpunet("validate-unknown-device", (*VALIDATE, "--model", "gpunet_0", "--device", "tpu"),
           ("--device 'tpu' is not a device", "use cpu, cuda or cuda:N"),
           outputs=("{out}/results.json",)),
    gpunet("validate-s3-checkpoint-wrong-endpoint",
           (*VALIDATE, "--model", "gpunet_0", "--checkpoint", f"{BUCKET}/ckpt/model.pth"),
           ("cannot reach the S3 endpoint", "127.0.0.1:{port}", "check AWS_ENDPOINT_URL"),
           env=WRONG_ENDPOINT, outputs=("{out}/results.json", "{out}/cache/gpunet/files")),

    # ------------------------------------------------------------ gpunet export-onnx
    gpunet("export-checkpoint-truncated",
           (*EXPORT, "--model", "gpunet_0", "--checkpoint", "{in}/truncated.pth"),
           ("cannot read checkpoint", "truncated.pth"), existing=EXPORT_OUTPUTS),
    gpunet("export-checkpoint-foreign",
           (*EXPORT, "--model", "gpunet_0", "--checkpoint", "{in}/linear.pth"),
           ("does not fit this model (gpunet_0)", "unexpected keys", "pass the --model"),
           outputs=EXPORT_OUTPUTS),
    gpunet("export-checkpoint-pickled",
           (*EXPORT, "--model", "gpunet_0", "--checkpoint", "{in}/pickled.pth.tar"),
           ("stores pickled Python objects", "--trust-checkpoint"), outputs=EXPORT_OUTPUTS),
    gpunet("export-unsupported-opset", (*EXPORT, "--model", "gpunet_0", "--opset", "99"),
           ("--opset 99 is not supported by the torchscript exporter", "use 13..20"),
           outputs=EXPORT_OUTPUTS),
    gpunet("export-absurd-batch", (*EXPORT, "--model", "gpunet_0", "--batch", "100000"),
           ("--batch must be in [1, 4096], got 100000",), existing=EXPORT_OUTPUTS),
    gpunet("export-negative-tolerance",
           (*EXPORT, "--model", "gpunet_0", "--img-size", "32", "--tolerance", "-1"),
           ("--tolerance must be a finite number > 0, got -1.0", "leave it out"),
           outputs=EXPORT_OUTPUTS),
    gpunet("export-zero-img-size", (*EXPORT, "--model", "gpunet_0", "--img-size", "0"),
           ("--img-size must be >= 32", "got 0"), outputs=EXPORT_OUTPUTS),
    gpunet("export-unknown-model", (*EXPORT, "--model", "gpunet_d9"),
           ("unknown model 'gpunet_d9'", "valid names are"), outputs=EXPORT_OUTPUTS),

    # ------------------------------------------------------------ gpunet prepare
    gpunet("prepare-folder-truncated-jpeg", ("prepare", "folder", "{in}/folder", *PREPARE_OUT),
           ("1 of 7 images are undecodable", "--max-bad-fraction",
            "the dataset was not marked complete"),
           outputs=DATASET_OUTPUTS, leaves=("{out}/ds/train", "{out}/ds/val",
                                            "{out}/ds/quarantine")),
    gpunet("prepare-folder-missing-source", ("prepare", "folder", "{in}/nope", *PREPARE_OUT),
           ("source folder not found", "SRC/{train,val}/<class>/<images>"),
           outputs=("{out}/ds",)),
    gpunet("prepare-folder-without-splits",
           ("prepare", "folder", "{in}/folder_flat", *PREPARE_OUT),
           ("has no train/ or val/ directory", "SRC/train/<class>/<images>"),
           outputs=("{out}/ds",)),
    gpunet("prepare-folder-bad-fraction-flag",
           ("prepare", "folder", "{in}/folder", *PREPARE_OUT, "--max-bad-fraction", "1.5"),
           ("--max-bad-fraction must be in [0, 1), got 1.5",), outputs=("{out}/ds",)),
    gpunet("prepare-imagenet-truncated-archive",
           ("prepare", "imagenet", "--train-tar", "{in}/train_truncated.tar", *PREPARE_OUT),
           ("train archive", "train_truncated.tar is truncated or damaged", "download it again"),
           outputs=("{out}/ds",), subprocess=True),
    gpunet("prepare-imagenet-truncated-class-archive",
           ("prepare", "imagenet", "--train-tar", "{in}/train_class_truncated.tar",
            *PREPARE_OUT),
           ("n01440764.tar", "the archive is damaged - download it again"),
           outputs=DATASET_OUTPUTS, leaves=("{out}/ds/train",)),
    gpunet("prepare-imagenet-not-a-tar",
           ("prepare", "imagenet", "--train-tar", "{in}/not_a_tar.tar", *PREPARE_OUT),
           ("not_a_tar.tar is not a readable tar archive",), outputs=("{out}/ds",)),
    gpunet("prepare-imagenet-malformed-labels",
           ("prepare", "imagenet", "--val-tar", "{in}/val.tar", "--val-labels",
            "{in}/labels_bad.txt", *PREPARE_OUT),
           ("labels_bad.txt:2: expected 'filename wnid'",), outputs=("{out}/ds",)),
    gpunet("prepare-digits-tiny-img-size",
           ("prepare", "digits", "--img-size", "4", *PREPARE_OUT),
           ("--img-size must be in [8, 1024], got 4",), outputs=("{out}/ds",)),
    gpunet("prepare-s3-output-without-credentials",
           ("prepare", "folder", "{in}/folder", "--out", f"{BUCKET}/ds", "--no-progress"),
           ("no S3 credentials found", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
           env=NO_CREDENTIALS, outputs=("{out}/cache",)),
    gpunet("prepare-s3-source-wrong-endpoint",
           ("prepare", "folder", f"{BUCKET}/src", *PREPARE_OUT),
           ("cannot reach the S3 endpoint", "--s3-endpoint"), env=WRONG_ENDPOINT,
           outputs=("{out}/ds", "{out}/cache")),

    # ------------------------------------------------------------ bench, bench-data, report
    gpunet("bench-missing-onnx", ("bench", "--onnx", "{in}/missing.onnx", "-o", "{out}/b.json"),
           ("ONNX file not found", "gpunet export-onnx"), outputs=("{out}/b.json",)),
    gpunet("bench-corrupt-onnx", ("bench", "--onnx", "{in}/corrupt.onnx", "-o", "{out}/b.json"),
           ("corrupt.onnx is not a readable ONNX model", "corrupt or truncated"),
           existing=("{out}/b.json",)),
    gpunet("bench-zero-iterations",
           ("bench", "--onnx", "{in}/corrupt.onnx", "--iterations", "0", "-o", "{out}/b.json"),
           ("--iterations must be >= 1, got 0",), outputs=("{out}/b.json",)),
    gpunet("bench-data-negative-workers",
           ("bench-data", "{in}/folder", "--backends", "pil", "-j", "-1"),
           ("-j/--workers must be >= 0", "got -1")),
    gpunet("report-malformed-result", ("report", "{in}/bad_result.json", "-o", "{out}/report"),
           ("cannot read result file", "bad_result.json"), outputs=("{out}/report",)),

    # ------------------------------------------------------------ python -m pipelines
    pipelines("schedule-cron-minute-out-of-range",
              ("schedule", *SERVER, "--cron", "61 * * * *"),
              ("invalid cron minute field '61'", "outside 0-59"), subprocess=True),
    pipelines("schedule-cron-three-fields", ("schedule", *SERVER, "--cron", "* * *"),
              ("invalid cron expression '* * *'", "expected 5 fields")),
    pipelines("schedule-zero-concurrency",
              ("schedule", *SERVER, "--cron", "0 3 * * *", "--max-concurrency", "0"),
              ("--max-concurrency must be >= 1, got 0",)),
    pipelines("submit-unknown-param", ("submit", *SERVER, "--param", "epoch=3"),
              ("unknown pipeline parameter 'epoch'", "valid: ", "epochs")),
    pipelines("submit-negative-gpus", ("submit", *SERVER, "--gpus-per-node", "-2"),
              ("--gpus-per-node must be >= 0", "got -2")),
    pipelines("run-local-unknown-param", (*RUN_LOCAL, "--param", "nope=1"),
              ("unknown pipeline parameter 'nope'", "valid: augment"),
              outputs=("{out}/work",), env=NO_MLFLOW, subprocess=True),
    pipelines("run-local-param-without-value", (*RUN_LOCAL, "--param", "epochs"),
              ("--param 'epochs'", "expected NAME=VALUE"), outputs=("{out}/work",)),
    pipelines("run-local-param-not-a-number", (*RUN_LOCAL, "--param", "epochs=three"),
              ("--param epochs='three'", "expected a int"), outputs=("{out}/work",)),
    pipelines("run-local-param-negative-epochs", (*RUN_LOCAL, "--param", "epochs=-1"),
              ("--param epochs=-1", "must be >= 1"), outputs=("{out}/work",)),
    pipelines("run-local-param-nan-lr", (*RUN_LOCAL, "--param", "lr=nan"),
              ("--param lr=nan", "expected a finite number"), outputs=("{out}/work",)),
    pipelines("run-local-param-unknown-model", (*RUN_LOCAL, "--param", "model_name=gpunet_42"),
              ("--param model_name='gpunet_42'", "valid names are gpunet_0"),
              outputs=("{out}/work",)),
    pipelines("run-local-param-model-spec-malformed",
              (*RUN_LOCAL, "--param", "model_name={in}/spec_channel_mismatch.json"),
              ("--param model_name=", "spec_channel_mismatch.json, entry 2",
               "channel mismatch"), outputs=("{out}/work",)),
    pipelines("run-local-param-model-spec-missing",
              (*RUN_LOCAL, "--param", "model_name={in}/no_such_spec.json"),
              ("--param model_name=", "no_such_spec.json): file not found"),
              outputs=("{out}/work",)),
    pipelines("run-local-s3-model-spec-wrong-endpoint",
              (*RUN_LOCAL, "--param", f"model_name={BUCKET}/specs/trial.json"),
              ("cannot reach the S3 endpoint", "AWS_ENDPOINT_URL"),
              outputs=("{out}/work",), env={**WRONG_ENDPOINT, **NO_MLFLOW}),
    pipelines("run-local-param-teacher-smaller-than-student",
              (*RUN_LOCAL, "--param", "img_size=64", "--param", "teacher_img_size=32"),
              ("teacher_img_size=32 is smaller than img_size=64", "enable_distill=false"),
              outputs=("{out}/work",)),
    pipelines("run-local-missing-dataset-source",
              (*RUN_LOCAL, "--param", "dataset_source={in}/no_dataset"),
              ("no_dataset' does not exist", "pass 'digits', an ImageFolder directory"),
              outputs=("{out}/work",), env=NO_MLFLOW),
    gpunet("promote-negative-max-quant-drop",
           ("promote", "gpunet", "--version", "1", "--max-quant-drop", "-1"),
           ("--max-quant-drop must be >= 0",), env=NO_MLFLOW),
    pipelines("run-local-param-precision-int4", (*RUN_LOCAL, "--param", "precision=int4"),
              ("--param precision='int4'", "valid values are fp32, fp16, int8"),
              outputs=("{out}/work",)),
    pipelines("run-local-param-unknown-quant-target",
              (*RUN_LOCAL, "--param", "quant_target=gpu"),
              ("--param quant_target='gpu'", "valid values are tensorrt", "and cpu"),
              outputs=("{out}/work",)),
    pipelines("run-local-param-negative-max-quant-drop",
              (*RUN_LOCAL, "--param", "max_quant_drop=-1"),
              ("--param max_quant_drop=-1", "must be >= 0"), outputs=("{out}/work",)),
    pipelines("run-local-missing-calib-data",
              (*RUN_LOCAL, "--param", "calib_data={in}/no_images"),
              ("no_images' does not exist", "leave it empty to calibrate on the dataset's"),
              outputs=("{out}/work",), env=NO_MLFLOW),
    pipelines("run-local-s3-source-without-credentials",
              (*RUN_LOCAL, "--param", f"dataset_source={BUCKET}/data"),
              ("no S3 credentials found", "AWS_SECRET_ACCESS_KEY"),
              outputs=("{out}/work",), env={**NO_CREDENTIALS, **NO_MLFLOW}),
    pipelines("compile-negative-gpus",
              ("compile", "-o", "{out}/pipeline.yaml", "--gpus-per-node", "-1"),
              ("--gpus-per-node must be >= 0", "got -1"), outputs=("{out}/pipeline.yaml",)),

    # ------------------------------------------------------------ steps, as components call them
    step("step-prepare-unknown-source", "prepare_dataset", ("imagenet21k", "{out}/dataset"),
         {"img_size": 32, "per_class": None},
         ("dataset source 'imagenet21k'", "neither 'digits' nor an existing directory"),
         outputs=("{out}/dataset",)),
    step("step-prepare-one-image-per-class", "prepare_dataset", ("digits", "{out}/dataset"),
         {"img_size": 32, "per_class": 1}, ("--per-class must be >= 2, got 1",),
         outputs=("{out}/dataset",)),
    step("step-train-unknown-augment", "train_config", ("{digits}", "{out}/checkpoint"),
         {"model": "gpunet_0", "epochs": 1, "img_size": 32, "augment": "heavy"},
         ("augment must be one of ['light', 'recipe']", "'heavy'"),
         outputs=("{out}/checkpoint/last.pth.tar",)),
    step("step-train-s3-model-spec-wrong-endpoint", "train_config",
         ("{digits}", "{out}/checkpoint"),
         {"model": f"{BUCKET}/specs/trial.json", "epochs": 1, "img_size": 32},
         ("cannot reach the S3 endpoint", "AWS_ENDPOINT_URL"), env=WRONG_ENDPOINT,
         outputs=("{out}/checkpoint",)),
    step("step-train-zero-epochs", "train_config", ("{digits}", "{out}/checkpoint"),
         {"model": "gpunet_0", "epochs": 0, "batch_size": 8, "img_size": 32, "workers": 0},
         ("--epochs must be >= 1, got 0",),  # in the launcher, before any process starts
         outputs=("{out}/checkpoint/last.pth.tar", "{out}/checkpoint/args.yaml")),
    step("step-validate-checkpoint-truncated", "validate",
         ("{in}/folder/val", "{in}/ckpt_dir/model_best.pth.tar"),
         {"model": "gpunet_0", "img_size": 32, "results_file": "{out}/results/results.json"},
         ("cannot read checkpoint", "model_best.pth.tar", "truncated, corrupt"),
         outputs=("{out}/results",)),
    step("step-validate-zero-img-size", "validate", ("{in}/folder/val", "{in}/g0_10.pth"),
         {"model": "gpunet_0", "img_size": 0, "results_file": "{out}/results/results.json"},
         ("--img-size must be in [8, 2048] pixels, got 0",), outputs=("{out}/results",)),
    step("step-export-tiny-img-size", "export_onnx", ("{in}/g0_10.pth", "{out}/onnx/model.onnx"),
         {"model": "gpunet_0", "img_size": 8}, ("--img-size must be >= 32", "got 8"),
         outputs=("{out}/onnx",)),
    step("step-benchmark-zero-iterations", "benchmark", ("{in}/corrupt.onnx",),
         {"backend": "auto", "iterations": 0, "results_file": "{out}/results/bench.json"},
         ("--iterations must be >= 1, got 0",), outputs=("{out}/results",)),
    step("step-benchmark-unknown-backend", "benchmark", ("{in}/corrupt.onnx",),
         {"backend": "tpu", "iterations": 10, "results_file": "{out}/results/bench.json"},
         ("unknown backend 'tpu'", "use one of auto, tensorrt"), outputs=("{out}/results",)),
    step("step-promote-without-mlflow", "promote",
         ("{in}/g0_10.pth", "{in}/corrupt.onnx", {"top1": 50.0, "top5": 90.0},
          {"latency_ms": {"median": 1.0}}),
         {"model": "gpunet_0", "img_size": 32, "registered_model": "gpunet"},
         ("promotion needs MLflow", "set MLFLOW_TRACKING_URI"), env=NO_MLFLOW),

    # ------------------------------------------------------------ output paths, beyond the table
    gpunet("export-sidecar-is-a-folder", (*EXPORT, "--model", "gpunet_0"),
           ("cannot write --output {out}/model.onnx.json", "it is a folder, not a file"),
           existing=("{out}/model.onnx.json/keep",), outputs=("{out}/model.onnx",)),
    gpunet("export-output-below-a-file-deeper",
           ("export-onnx", "--model", "gpunet_0", "-o", "{out}/taken/a/b/model.onnx"),
           ("{out}/taken is a file, not a folder", "choose another --output"),
           existing=("{out}/taken",), subprocess=True),
    gpunet("report-file-inside-is-a-folder",
           ("report", "{in}/bad_result.json", "-o", "{out}/report"),
           ("cannot write -o/--output-dir {out}/report/report.md", "it is a folder",
            "move it away or choose another -o/--output-dir"),
           existing=("{out}/report/report.md/keep",)),
    gpunet("prepare-work-dir-is-a-file",
           ("prepare", "digits", "--out", f"{BUCKET}/ds", "--work-dir", "{out}/stage",
            "--no-progress"),
           ("cannot write --work-dir {out}/stage", "it is a file, not a folder"),
           existing=("{out}/stage",), env=NO_CREDENTIALS),
    # missing parents of a folder output are made, and removed again when the command fails
    gpunet("train-new-output-folders-removed-after-a-failed-resume",
           ("train", "{digits}", "--output", "{out}/a/b/run", *TRAIN[4:], "--resume",
            "{in}/linear.pth"), ("cannot resume from", "linear.pth"), outputs=("{out}/a",)),
    gpunet("train-new-output-folders-removed-after-a-bad-checkpoint",
           ("train", "{digits}", "--output", "{out}/a/run", *TRAIN[4:],
            "--initial-checkpoint", "{in}/truncated.pth"),
           ("cannot read checkpoint", "truncated.pth"), outputs=("{out}/a",)),
    gpunet("prepare-new-output-folders-removed-after-a-bad-source",
           ("prepare", "folder", "{in}/folder_flat", "--out", "{out}/a/b/ds", "-j", "1",
            "--no-progress"), ("has no train/ or val/ directory",), outputs=("{out}/a",)),
    gpunet("report-new-output-folders-removed-after-a-bad-result",
           ("report", "{in}/bad_result.json", "-o", "{out}/a/b/report"),
           ("cannot read result file",), outputs=("{out}/a",)),
    gpunet("triton-new-repository-removed-after-a-bad-model",
           ("export-triton", "--onnx", "{in}/corrupt.onnx", "-r", "{out}/a/repo"),
           ("corrupt.onnx",), outputs=("{out}/a",)),
    pipelines("run-local-new-workdir-removed-when-mlflow-is-down",
              ("run-local", "--workdir", "{out}/a/work"), UNREACHABLE, outputs=("{out}/a",),
              env=MLFLOW_DOWN),

    # ------------------------------------------------------------ MLflow, KFP: down or not found
    gpunet("promote-mlflow-down", ("promote", "gpunet", "--version", "1"), UNREACHABLE,
           env=MLFLOW_DOWN),
    gpunet("promote-rollback-mlflow-down", ("promote", "gpunet", "--rollback"), UNREACHABLE,
           env=MLFLOW_DOWN),
    gpunet("promote-version-not-found", ("promote", "gpunet", "--version", "7"),
           ("registered model 'gpunet' has no version 7",), env=MLFLOW_EMPTY),
    gpunet("promote-rollback-nothing-to-roll-back", ("promote", "gpunet", "--rollback"),
           ("registered model 'gpunet' has no 'previous-champion' alias",
            "nothing to roll back to"), env=MLFLOW_EMPTY),
    pipelines("list-runs-kfp-down", ("list-runs", *SERVER), KFP_UNREACHABLE),
    pipelines("submit-kfp-down", ("submit", *SERVER), KFP_UNREACHABLE),
    pipelines("schedule-kfp-down", ("schedule", *SERVER, "--cron", "0 3 * * *"),
              KFP_UNREACHABLE),
    pipelines("list-runs-experiment-not-found",
              ("list-runs", "--host", "{server}", "--experiment", "nope"),
              ("looking up the experiment failed at {server}", "experiment 'nope' not found",
               "check --experiment")),
    pipelines("list-runs-not-found", ("list-runs", "--host", "{server}", "--experiment", ""),
              ("listing runs failed at {server}", "HTTP 404", "not found")),
    pipelines("submit-host-is-not-kfp", ("submit", "--host", "{server}/mlflow"),
              ("no KFP API at {server}/mlflow", "HTTP 404", "check --host")),

    # ------------------------------------------------------------ degenerate datasets
    gpunet("train-one-class", ("train", "{in}/one_class", *TRAIN[2:]),
           ("training split", "one_class/train has images of one class only (a)",
            "needs at least 2 classes"), outputs=(RUN,)),
    gpunet("train-one-class-by-manifest", ("train", "{in}/one_class_manifest", *TRAIN[2:]),
           ("one_class_manifest/train has images of one class only (a)",
            "needs at least 2 classes"), outputs=(RUN,)),
    gpunet("train-val-class-missing-from-train", ("train", "{in}/val_extra_class", *TRAIN[2:]),
           ("val_extra_class/val has class(es) c that the training split", "lacks",
            "add training images of them"), outputs=(RUN,)),
    gpunet("train-val-class-missing-by-manifest",
           ("train", "{in}/val_extra_manifest", *TRAIN[2:]),
           ("val_extra_manifest/val has class(es) c that", "remove them from the validation"),
           outputs=(RUN,)),
    gpunet("train-val-classes-missing-many", ("train", "{in}/val_many_extra", *TRAIN[2:]),
           ("has class(es) x0, x1, x2, x3, x4 and 2 more that the training split",),
           outputs=(RUN,)),
    gpunet("train-batch-larger-than-tiny-dataset", ("train", "{in}/tiny", *TRAIN[2:]),
           ("batch size 8", "larger than the training set", "has 4 images",
            "lower -b to at most 4"), outputs=(RUN,)),
    gpunet("train-batch-one-more-than-dataset", ("train", "{in}/tiny", *TRAIN[2:], "-b", "5"),
           ("batch size 5", "the last incomplete batch is dropped", "lower -b to at most 4"),
           outputs=(RUN,)),

    # ------------------------------------------------------------ gpunet search
    gpunet("search-unknown-backend",
           (*SEARCH, "--budget-ms", "5", "--backend", "openvino"),
           ("unknown --backend 'openvino'", "use one of onnxruntime"), outputs=("{out}/search",)),
    gpunet("search-budget-below-the-space",
           (*SEARCH, "--budget-ms", "0.0001"),
           ("--budget-ms 0.0001 is below anything this space can reach",
            "its fastest spec", "raise the budget"), outputs=("{out}/search",),
           # ONNX Runtime's own device-id file in the cache home (it measured the floor)
           leaves=("{out}/cache/Microsoft",)),
    gpunet("search-unreachable-storage",
           (*SEARCH, "--budget-ms", "5", "--storage",
            "postgresql://search:hunter2@127.0.0.1:{port}/optuna"),
           ("cannot open the study storage postgresql://search:***@127.0.0.1:",
            "Connection refused", "check --storage"), outputs=("{out}/search",)),
    *output_path_cases(),
]

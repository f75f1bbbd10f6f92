"""``gpunet trainjob``: print the Kubeflow Trainer v2 TrainJob of a multi-node ``gpunet train``.

The YAML is :func:`~gpunet_core.mlops.trainjob.trainjob_manifest`'s, the body a pipeline step
creates, so ``gpunet trainjob ... | kubectl apply -f -`` runs what the pipeline would. The
``gpunet train`` arguments after ``--`` are checked with ``gpunet train``'s own parser here, so a
typo fails now instead of in a pod.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from gpunet_core.mlops.cluster import ClusterSettingsError, PodSettings
from gpunet_core.mlops.trainjob import (
    ANNOTATION_RUN_ID,
    DEFAULT_RUNTIME,
    TrainJobError,
    trainjob_labels,
    trainjob_manifest,
    trainjob_name,
)
from gpunet_core.training.config import add_arguments, from_namespace
from gpunet_core.utils import storage

# PodSettings fields settable by flag (the rest through --settings FILE)
_SETTING_FLAGS = {"gpus_per_node": int, "service_account": str, "accelerator": str,
                  "shm_size": str, "cpu": str, "memory": str, "cpu_limit": str,
                  "memory_limit": str}
EXAMPLE = ("gpunet trainjob --nodes 2 --nproc-per-node 8 --gpus-per-node 8 "
           "--image ghcr.io/gpunet-pipeline/gpunet-train:v1 --run-id manual-1 --task train "
           "-- s3://gpunet/datasets/imagenet --preset gpunet_0 --output "
           "s3://gpunet/runs/manual-1 --auto-resume | kubectl apply -n gpunet -f -")


class _TrainArgsParser(argparse.ArgumentParser):
    """``gpunet train``'s parser whose errors are ours (one line, exit 2), not argparse's."""

    def error(self, message: str) -> NoReturn:
        raise TrainJobError(f"the gpunet train arguments after --: {message}")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "trainjob", help="print the Kubeflow Trainer v2 TrainJob of a multi-node training run",
        description="Print (as YAML, for kubectl apply) the TrainJob that runs `gpunet train` "
                    "on --nodes nodes x --nproc-per-node processes under torchrun, on Kubeflow "
                    "Trainer v2.3's torch-distributed runtime, with the pod settings of the "
                    "pipeline (service account, Secret/ConfigMap environment, non-root "
                    "security context, /dev/shm, resources). Everything after -- is gpunet "
                    "train's arguments, checked here.",
        epilog=f"example: {EXAMPLE}")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes (pods)")
    parser.add_argument("--nproc-per-node", type=int, required=True,
                        help="training processes per node (one per GPU)")
    parser.add_argument("--image", required=True, help="the training image reference")
    parser.add_argument("--namespace", help="metadata.namespace (default: none, kubectl's)")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME,
                        help=f"ClusterTrainingRuntime (default {DEFAULT_RUNTIME})")
    naming = parser.add_argument_group("naming (either --name, or --run-id with --task and "
                                       "--attempt as the pipeline names its TrainJobs)")
    naming.add_argument("--name", help="the TrainJob's name")
    naming.add_argument("--run-id", help="pipeline run id (any string)")
    naming.add_argument("--task", default="train", help="task name (default train)")
    naming.add_argument("--attempt", type=int, default=1, help="attempt number (default 1)")
    pods = parser.add_argument_group("pod settings (default: the pipeline's; flags override "
                                     "--settings)")
    pods.add_argument("--settings", metavar="FILE",
                      help="PodSettings JSON (gpunet_core.mlops.cluster.PodSettings.to_json)")
    pods.add_argument("--gpus-per-node", type=int, help="GPUs requested per node (default 0)")
    for name in _SETTING_FLAGS:
        if name != "gpus_per_node":
            pods.add_argument(f"--{name.replace('_', '-')}", dest=name,
                              help=f"default {getattr(PodSettings(), name)}")
    pods.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                      help="node label the pods need (repeatable)")
    pods.add_argument("--toleration", action="append", default=[], metavar="JSON",
                      help='a toleration, e.g. \'{"key": "nvidia.com/gpu", "operator": '
                           '"Exists", "effect": "NoSchedule"}\' (repeatable)')
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN_ARGS",
                        help="gpunet train's arguments (DATA and flags)")
    return parser


def _settings(args: argparse.Namespace) -> PodSettings:
    base = PodSettings()
    if args.settings:
        try:
            text = Path(args.settings).read_text()
        except OSError as exc:
            raise ClusterSettingsError(f"--settings {args.settings}: {exc.strerror}") from None
        base = PodSettings.from_json(text)
    changes: dict[str, Any] = {k: getattr(args, k) for k in _SETTING_FLAGS
                               if getattr(args, k) is not None}
    if args.node_selector:
        pairs = [item.partition("=") for item in args.node_selector]
        bad = [item for item, (_, eq, _) in zip(args.node_selector, pairs, strict=True) if not eq]
        if bad:
            raise ClusterSettingsError(f"--node-selector {bad[0]!r}: expected KEY=VALUE")
        changes["node_selector"] = {**base.node_selector, **{k: v for k, _, v in pairs}}
    if args.toleration:
        tolerations = []
        for text in args.toleration:
            try:
                tolerations.append(json.loads(text))
            except ValueError as exc:
                raise ClusterSettingsError(f"--toleration {text!r} is not JSON: {exc}") from None
        changes["tolerations"] = (*base.tolerations, *tolerations)
    try:
        return dataclasses.replace(base, **changes)
    except ClusterSettingsError as exc:
        raise ClusterSettingsError(f"pod settings: {exc}") from None


def _command_line(args: argparse.Namespace, train_args: list[str]) -> str:
    """The canonical ``gpunet trainjob`` command that prints this output (its header)."""
    parts = ["gpunet", "trainjob", "--nodes", str(args.nodes), "--nproc-per-node",
             str(args.nproc_per_node), "--image", args.image]
    for flag, value in (("--namespace", args.namespace), ("--name", args.name),
                        ("--run-id", args.run_id)):
        if value:
            parts += [flag, value]
    if args.run_id:
        parts += ["--task", args.task, "--attempt", str(args.attempt)]
    if args.runtime != DEFAULT_RUNTIME:
        parts += ["--runtime", args.runtime]
    if args.settings:
        parts += ["--settings", args.settings]
    for name in _SETTING_FLAGS:
        if getattr(args, name) is not None:
            parts += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for item in args.node_selector:
        parts += ["--node-selector", item]
    for item in args.toleration:
        parts += ["--toleration", item]
    return shlex.join([*parts, "--", *train_args])


def run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if not train_args:
        raise TrainJobError("no gpunet train arguments: end the options with -- and give "
                            "DATA and gpunet train's flags, e.g. -- s3://bucket/data --epochs 1")
    cfg = from_namespace(add_arguments(_TrainArgsParser(prog="gpunet train", add_help=False))
                         .parse_args(train_args))
    if args.name and args.run_id:
        raise TrainJobError("pass either --name or --run-id (with --task/--attempt), not both")
    if args.name:
        name, labels, notes = args.name, None, None
    elif args.run_id:
        name = trainjob_name(args.run_id, args.task, args.attempt)
        labels = trainjob_labels(args.run_id, args.task, args.attempt)
        notes = {ANNOTATION_RUN_ID: args.run_id}
    else:
        raise TrainJobError("name the TrainJob: --name NAME, or --run-id ID [--task T] "
                            "[--attempt K] as the pipeline does")
    body = trainjob_manifest(name, train_args, nodes=args.nodes,
                             nproc_per_node=args.nproc_per_node, image=args.image,
                             settings=_settings(args), namespace=args.namespace, labels=labels,
                             runtime=args.runtime, annotations=notes)
    if not storage.is_s3_uri(cfg.output):
        print(f"gpunet trainjob: warning: --output {cfg.output} is inside the pod and is lost "
              "when the job ends; use an s3:// prefix", file=sys.stderr)
    print(f"# Generated by: {_command_line(args, train_args)}")
    print(yaml.safe_dump(body, sort_keys=False, width=100), end="")
    return 0

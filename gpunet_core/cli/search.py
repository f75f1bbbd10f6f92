"""``gpunet search``: a hardware-aware architecture search over the GPUNet space."""

from __future__ import annotations

import argparse
import json
import logging
import os


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pixels such as 32 or 224,256, got {text!r}") \
            from None


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "search", help="find the accuracy/latency Pareto front of GPUNets for your hardware",
        description="GPUNet's own method: sample architectures from the GPUNet search space "
                    "(gpunet_core/search/space.yaml), measure each one's latency on the target "
                    "backend (cached per spec and hardware), train the ones within --budget-ms "
                    "briefly on DATA (the accuracy proxy, with pruning of dominated candidates) "
                    "and let Optuna (constrained multi-objective TPE or NSGA-II) pick the next. "
                    "Writes OUT/pareto.json, OUT/specs/*.json (train one with `gpunet train "
                    "--model OUT/specs/trial-NNNNN.json`) and OUT/pareto.png with NVIDIA's seven "
                    "GPUNets measured the same way. Rerun the same command to resume; several "
                    "machines may share one study through --storage.")
    parser.add_argument("data", help="prepared dataset (train/ and val/ splits), local or s3://")
    parser.add_argument("--out", required=True, help="output folder (also holds the default "
                        "sqlite study)")
    parser.add_argument("--budget-ms", type=float, required=True,
                        help="hard latency budget per batch in ms on --backend")
    parser.add_argument("--backend", default="onnxruntime",
                        help="onnxruntime (default), torch, tensorrt or trtexec (GPU node)")
    parser.add_argument("--precision", default="fp32",
                        help="graph precision measured: fp32 (default), fp16 or int8 (CPU "
                             "QOperator on ONNX Runtime, Q/DQ on TensorRT)")
    parser.add_argument("--batch", type=int, default=1, help="batch measured (default 1)")
    parser.add_argument("--trials", type=int, default=20,
                        help="trials the study should hold in all (default 20)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the study here (default 1)")
    parser.add_argument("--storage", default=os.environ.get("GPUNET_SEARCH_STORAGE"),
                        help="Optuna storage URL (default $GPUNET_SEARCH_STORAGE, else "
                             "sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default="gpunet-search", help="study in the storage")
    parser.add_argument("--img-size", type=_sizes, default=None,
                        help="search resolution in pixels (default: the space's 224-544 grid; "
                             "the proxy needs one size, e.g. 32 for digits)")
    parser.add_argument("--family", action="append", default=None,
                        help="non_d or d (repeatable; default both)")
    parser.add_argument("--space", default=None, help="a search-space YAML (default: packaged)")
    parser.add_argument("--sampler", default="tpe", help="tpe (default) or nsga2")
    parser.add_argument("--seed", type=int, default=0, help="sampler and proxy seed")
    parser.add_argument("--iterations", type=int, default=50,
                        help="timed runs per latency measurement (default 50)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime/torch threads when measuring (default: runtime's)")
    parser.add_argument("--heartbeat-s", type=int, default=20,
                        help="trial heartbeat; a trial silent for 2x this (its worker was "
                             "killed) is retried once with the same architecture (default 20)")
    parser.add_argument("--no-references", action="store_true",
                        help="do not measure NVIDIA's seven GPUNets beside the front")
    proxy = parser.add_argument_group("accuracy proxy (the same for every candidate)")
    proxy.add_argument("--proxy-epochs", type=int, default=3, help="epochs (default 3)")
    proxy.add_argument("--proxy-images", type=int, default=640,
                       help="fixed training subset (default 640; 0: all)")
    proxy.add_argument("--proxy-batch-size", type=int, default=32, help="batch (default 32)")
    proxy.add_argument("--proxy-lr", type=float, default=3e-3, help="AdamW lr (default 3e-3)")
    proxy.add_argument("--teacher", default=None, help="distil from this model (name or spec)")
    proxy.add_argument("--teacher-checkpoint", default=None, help="the teacher's weights")
    proxy.add_argument("--teacher-img-size", type=int, default=None,
                       help="teacher resolution (default: the search's)")
    parser.add_argument("--json", action="store_true", help="print pareto.json")
    return parser


def config_from_args(args: argparse.Namespace):
    # torch and optuna: only when the command runs (`gpunet --help` imports every subcommand)
    from gpunet_core.search.proxy import ProxyConfig
    from gpunet_core.search.study import SearchConfig

    return SearchConfig(
        data=args.data, out=args.out, budget_ms=args.budget_ms, backend=args.backend,
        precision=args.precision, batch=args.batch, trials=args.trials, workers=args.workers,
        storage=args.storage, study_name=args.study_name, resolutions=args.img_size,
        families=tuple(args.family) if args.family else None, space=args.space,
        sampler=args.sampler, seed=args.seed, iterations=args.iterations, threads=args.threads,
        references=not args.no_references, heartbeat_s=args.heartbeat_s,
        proxy=ProxyConfig(epochs=args.proxy_epochs, train_images=args.proxy_images,
                          batch_size=args.proxy_batch_size, lr=args.proxy_lr, seed=args.seed,
                          teacher=args.teacher, teacher_checkpoint=args.teacher_checkpoint,
                          teacher_img_size=args.teacher_img_size))


def run(args: argparse.Namespace) -> int:
    # the search pulls in torch, onnx and optuna: only when the command runs
    from gpunet_core.search.driver import search

    if not getattr(args, "verbose", False):  # one export/benchmark line per candidate: -v
        logging.getLogger("gpunet_core.inference").setLevel(logging.WARNING)
    result = search(config_from_args(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['trials_counted']} trials, {result['trained_in_budget']} trained within "
          f"{result['budget_ms']:g} ms; Pareto front ({result['backend']}, "
          f"{result['img_size']} px, batch {result['batch']}):")
    for r in result["front"]:
        print(f"  trial {r['trial']:>4}: {r['latency_ms']:8.3f} ms  top-1 {r['proxy_top1']:6.2f} %"
              f"  {r['params'] / 1e6:6.2f} M params  {r['gmacs']:.3f} GMACs  {r['spec_path']}")
    for r in result["references"]:
        if r.get("proxy_top1") is not None:
            print(f"  {r['display']:>10}: {r['latency_ms']:8.3f} ms  top-1 "
                  f"{r['proxy_top1']:6.2f} %  (published, measured the same way)")
    print(f"wrote {args.out}/pareto.json, {args.out}/pareto.png")
    return 0

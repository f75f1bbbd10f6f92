"""``gpunet promote``: give a registered model version the champion alias, or roll back."""

from __future__ import annotations

import argparse

from gpunet_core.mlops import registry
from gpunet_core.mlops.mlflow_client import reaching
from gpunet_core.utils.errors import GpunetError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "promote", help="promote a registered model version (MLflow aliases) or roll back",
        description="Compare a registered version's top-1/latency tags with the thresholds and "
                    "the current champion (evaluated on the candidate's validation set when it "
                    "was validated on another): it becomes 'champion' when it qualifies, else "
                    "'challenger'. --rollback restores the previous champion. MLflow from "
                    "MLFLOW_TRACKING_URI.")
    parser.add_argument("name", help="registered model name")
    parser.add_argument("--version", help="candidate version (required unless --rollback)")
    parser.add_argument("--min-top1", type=float, default=0.0)
    parser.add_argument("--max-latency-ms", type=float, default=None)
    parser.add_argument("--margin", type=float, default=0.0,
                        help="top-1 points the candidate must gain over the champion")
    parser.add_argument("--max-latency-increase-pct", type=float, default=None,
                        help="how much slower than the champion the candidate may be, checked "
                             "when both latencies were measured alike (latency_fingerprint)")
    parser.add_argument("--max-quant-drop", type=float, default=registry.DEFAULT_MAX_QUANT_DROP,
                        help="top-1 points an FP16/INT8 version may lose against its own FP32 "
                             "figure (its fp32_top1 tag) (default "
                             f"{registry.DEFAULT_MAX_QUANT_DROP:g})")
    parser.add_argument("--data", help="the candidate's validation set: a champion validated "
                                       "on another dataset is evaluated on it first (required "
                                       "then)")
    parser.add_argument("--rollback", action="store_true", help="restore the previous champion")
    parser.add_argument("--json", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.rollback and not args.version:
        raise GpunetError("--version is required (or pass --rollback)")
    with reaching():  # a server that does not answer says so, wherever it stops answering
        if args.rollback:
            decision = registry.rollback(args.name)
        else:
            decision = registry.promote(args.name, args.version, min_top1=args.min_top1,
                                        max_latency_ms=args.max_latency_ms, margin=args.margin,
                                        max_latency_increase_pct=args.max_latency_increase_pct,
                                        max_quant_drop=args.max_quant_drop, data=args.data)
    print(decision.to_json() if args.json else decision.markdown())
    return 0

"""``gpunet bench``: latency of a GPUNet ONNX export on TensorRT, trtexec, ONNX Runtime or torch."""

from __future__ import annotations

import argparse
import json

from gpunet_core.inference.latency import BACKENDS, PRECISIONS, run_benchmark
from gpunet_core.utils.files import check_output_file, write_json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "bench", help="measure the latency of an ONNX export",
        description="Measure batch latency of a `gpunet export-onnx` file, or of a graph that "
                    "`gpunet quantize` rewrote to fp16/int8, at the graph's own precision. "
                    "tensorrt: TensorRT 10.12+/11 engine, always strongly typed (TensorRT 11 has "
                    "no fp16/int8 builder flags: the precision lives in the ONNX graph), GPU "
                    "compute time between CUDA events (as trtexec's 'GPU Compute Time', NVIDIA's "
                    "published figures); trtexec: runs the binary (--stronglyTyped on 10.x) and "
                    "parses its summary; onnxruntime/torch: for machines without TensorRT; auto: "
                    "tensorrt if a GPU and TensorRT are present, else onnxruntime.")
    parser.add_argument("--onnx", required=True,
                        help="ONNX file from gpunet export-onnx (fp32) or gpunet quantize "
                             "(fp16/int8)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="default: auto")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="default: the graph's precision (fp32 for an export); a different "
                             "one is an error: make that graph first with `gpunet quantize "
                             "--precision P --target tensorrt|cpu`")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--iterations", type=int, default=100, help="timed runs (default 100)")
    parser.add_argument("--warmup-ms", type=float, default=200.0,
                        help="warm-up time before timing, ms (default 200, as trtexec)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for onnxruntime/torch (default: the runtime's)")
    parser.add_argument("--compile", action="store_true", help="torch backend: torch.compile")
    parser.add_argument("--engine", default=None,
                        help="where to save the TensorRT engine (default: beside the ONNX file)")
    parser.add_argument("--workspace-mib", type=int, default=1024,
                        help="TensorRT workspace memory-pool limit in MiB (default 1024)")
    parser.add_argument("--results-file", "--output", "-o", default=None,
                        help="write the result JSON here (its folder must exist)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.results_file:
        check_output_file(args.results_file, "-o/--results-file")
    if args.engine:
        check_output_file(args.engine, "--engine")
    result = run_benchmark(args.onnx, backend=args.backend, precision=args.precision,
                           batch=args.batch, iterations=args.iterations,
                           warmup_ms=args.warmup_ms, threads=args.threads,
                           compile_model=args.compile, engine=args.engine,
                           workspace_mib=args.workspace_mib)
    if args.results_file:
        write_json(result, args.results_file)
    lat = result["latency_ms"]
    print(json.dumps({"model": result["model"], "backend": result["backend"],
                      "backend_reason": result["backend_reason"],
                      "precision": result["precision"], "batch": result["batch"],
                      "median_ms": lat["median"], "mean_ms": lat["mean"], "p99_ms": lat["p99"],
                      "throughput_ips": result["throughput_ips"]}, indent=2))
    return 0

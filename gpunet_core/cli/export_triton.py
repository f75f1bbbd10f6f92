"""``gpunet export-triton``: a Triton Inference Server model repository entry with config.pbtxt."""

from __future__ import annotations

import argparse
import json

from gpunet_core.inference.triton import export_triton
from gpunet_core.utils.files import check_output_dir, remove_new_dirs_on_error


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "export-triton", help="lay out an export as a Triton model repository entry",
        description="Copy a `gpunet export-onnx` file or a `gpunet quantize` graph (or a "
                    "TensorRT plan built from either) to "
                    "REPO/NAME/VERSION/model.onnx|model.plan and write REPO/NAME/config.pbtxt "
                    "(inputs/outputs, max batch, dynamic batching, instance groups).")
    parser.add_argument("--onnx", required=True,
                        help="GPUNet ONNX export (exported with --dynamic-batch for batching), or "
                             "its FP16/INT8 graph from gpunet quantize")
    parser.add_argument("--repository", "-r", required=True,
                        help="model repository directory (created if missing)")
    parser.add_argument("--name", default=None, help="Triton model name (default: the model's)")
    parser.add_argument("--version", type=int, default=1, help="model version (default 1)")
    parser.add_argument("--plan", default=None,
                        help="serve this TensorRT plan (built from --onnx with a profile up to "
                             "--max-batch-size) instead of the ONNX file")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="Triton max_batch_size; 0 disables batching (default 64)")
    parser.add_argument("--instances", type=int, default=2,
                        help="model instances per device (default 2)")
    parser.add_argument("--kind", choices=("gpu", "cpu"), default="gpu",
                        help="instance group kind (default gpu)")
    parser.add_argument("--preferred-batch-size", type=int, nargs="*", default=[],
                        help="dynamic batching preferred batch sizes")
    parser.add_argument("--max-queue-delay-us", type=int, default=100,
                        help="dynamic batching max queue delay, microseconds (default 100)")
    parser.add_argument("--tensorrt-accelerator", action="store_true",
                        help="ONNX on GPU: enable ONNX Runtime's TensorRT accelerator at the "
                             "graph's precision (FP32 export, or FP16 from gpunet quantize)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.repository, "-r/--repository")  # before reading the model
    with remove_new_dirs_on_error(args.repository):
        result = export_triton(args.onnx, args.repository, name=args.name,
                               version=args.version, plan=args.plan,
                               max_batch_size=args.max_batch_size, instances=args.instances,
                               kind=args.kind, preferred_batch_sizes=args.preferred_batch_size,
                               max_queue_delay_us=args.max_queue_delay_us,
                               tensorrt_accelerator=args.tensorrt_accelerator,
                               overwrite=args.overwrite)
    print(json.dumps({k: result[k] for k in ("model_dir", "model_file")}, indent=2))
    return 0

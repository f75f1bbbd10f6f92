"""quantize: the graph to deploy, FP32 export or its FP16/INT8 graph (gpunet_core.steps.quantize)."""

from kfp.dsl import Dataset, Input, Model, Output

from components._images import BENCH_IMAGE, component


@component(BENCH_IMAGE)
def quantize(dataset: Input[Dataset], onnx: Input[Model], precision: str, target: str,
             calib_data: str, calib_samples: int, deployed: Output[Model]):
    """``calib_data``: images to calibrate on (a path or s3:// prefix); empty: the dataset's
    train split."""
    from gpunet_core import steps

    sidecar = steps.quantize(onnx.path, deployed.path, calib_data=calib_data or dataset.path,
                             precision=precision, target=target, calib_samples=calib_samples)
    deployed.metadata.update({"precision": sidecar["precision"],
                              "target": sidecar.get("target") or "",
                              **{k: v for k, v in (sidecar.get("parity_vs_fp32") or {}).items()
                                 if isinstance(v, (int, float))}})

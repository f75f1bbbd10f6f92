"""export_onnx: ONNX export with a parity check (gpunet_core.steps.export_onnx)."""

from kfp.dsl import Input, Model, Output

from components._images import BENCH_IMAGE, component


@component(BENCH_IMAGE)
def export_onnx(checkpoint: Input[Model], model_name: str, img_size: int, onnx: Output[Model]):
    """``model_name``: the architecture, unless ``checkpoint`` carries its own (a custom spec
    the training step kept with it)."""
    import os

    from gpunet_core import steps
    from gpunet_core.utils.files import BEST_CHECKPOINT

    sidecar = steps.export_onnx(os.path.join(checkpoint.path, BEST_CHECKPOINT), onnx.path,
                                model=steps.trained_model(checkpoint.path, model_name),
                                img_size=img_size)
    onnx.metadata.update({k: sidecar[k] for k in ("opset", "parity_max_abs_diff", "input_shape")
                          if k in sidecar})

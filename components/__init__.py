"""KFP v2 components: each a thin typed shell over one :mod:`gpunet_core.steps` function.

Lightweight Python components (imports inside the bodies) so the same code runs on a cluster
from our images and on a laptop under ``kfp.local.SubprocessRunner(use_venv=False)``. Every
``base_image`` comes from ``images/images.yaml`` through :func:`gpunet_core.mlops.images.image_ref`.
"""

from components.benchmark import benchmark
from components.export_onnx import export_onnx
from components.prepare_dataset import prepare_dataset
from components.promote import promote
from components.quantize import quantize
from components.report import report
from components.search import search_front, search_setup, search_worker
from components.train import train_student, train_teacher
from components.validate import validate, validate_deployed

__all__ = ["benchmark", "export_onnx", "prepare_dataset", "promote", "quantize", "report",
           "search_front", "search_setup", "search_worker", "train_student", "train_teacher",
           "validate", "validate_deployed"]

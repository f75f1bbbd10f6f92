"""The base images of the components (one place: images/images.yaml)."""

from gpunet_core.images import image_ref

CPU_IMAGE = image_ref("cpu")
TRAIN_IMAGE = image_ref("train")
BENCH_IMAGE = image_ref("bench")

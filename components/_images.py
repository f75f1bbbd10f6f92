"""The base images of the components (one place: images/images.yaml) and their decorator."""

from kfp import dsl

from gpunet_core.mlops.images import image_ref

CPU_IMAGE = image_ref("cpu")
TRAIN_IMAGE = image_ref("train")
BENCH_IMAGE = image_ref("bench")


def component(base_image: str):
    """``dsl.component`` on one of our images.

    The images install the project with its pinned ``kfp``, so the task does not run
    ``pip install kfp`` first (KFP's default): no PyPI access needed in the pod, and about
    1 s less per task (``make bench``, pipeline overhead).
    """
    return dsl.component(base_image=base_image, install_kfp_package=False)

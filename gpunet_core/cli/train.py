"""``gpunet train``: NVIDIA's recipe under torchrun (see :mod:`gpunet_core.training.loop`)."""

from __future__ import annotations

import argparse
import json

from gpunet_core.training.config import add_arguments, from_namespace, with_model_name


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train", help="train a GPUNet (run under torchrun for several processes)",
        description="Train a GPUNet with NVIDIA's recipe. Single process as is; several with "
                    "`python -m torch.distributed.run --nproc_per_node N -m gpunet_core train ...`"
                    ". --preset loads NVIDIA's hyper-parameters; explicit flags override them.")
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = from_namespace(args)  # bad values fail here, before torch is imported
    cfg = with_model_name(cfg)  # a --model spec (path, s3://): checked and stored, by its name
    # torch: parsing, --help and flag errors cost no torch import
    from gpunet_core.training.loop import train

    result = train(cfg)
    if result.get("epochs"):
        print(json.dumps({k: v for k, v in result.items() if k != "last"}))
    return 0

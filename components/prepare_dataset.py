"""prepare_dataset: the dataset as a canonical ImageFolder + manifest (gpunet_core.steps.prepare_dataset)."""

from kfp.dsl import Dataset, Output

from components._images import CPU_IMAGE, component


@component(CPU_IMAGE)
def prepare_dataset(source: str, img_size: int, per_class: int, dataset: Output[Dataset]):
    """``source``: ``digits`` or an ImageFolder tree (path or s3:// prefix)."""
    from gpunet_core import steps

    manifest = steps.prepare_dataset(source, dataset.path, img_size=img_size,
                                     per_class=per_class or None)
    dataset.metadata.update({"classes": len(manifest["classes"]),
                             "checksum": manifest.get("checksum", ""),
                             **{f"{split}_images": info["count"]
                                for split, info in manifest["splits"].items()}})

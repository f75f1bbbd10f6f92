"""GPUNet models: the JSON spec, the blocks, the builder, checkpoints and timm entry points."""

"""Training: the typed configuration, NVIDIA's presets, distributed set-up, distillation, the loop."""

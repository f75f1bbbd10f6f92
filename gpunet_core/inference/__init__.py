"""Inference: validation, ONNX export, Triton repositories, latency backends, reports."""

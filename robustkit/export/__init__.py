"""``robustkit export``: the exporter interface, the job, and the ONNX and safetensors exporters."""

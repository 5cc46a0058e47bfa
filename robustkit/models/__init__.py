"""Models: safe loading of user files (safetensors, state dicts, ONNX), the built-in zoo."""

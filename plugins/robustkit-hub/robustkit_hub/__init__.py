"""timm, torchvision and Hugging Face image classifiers as robustkit models (provider ``hub``).

Nothing is imported here: robustkit loads ``robustkit_hub.plugin`` through its entry point,
and torch, timm, torchvision and transformers are imported only when such a model is loaded.
"""

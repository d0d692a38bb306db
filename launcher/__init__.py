"""Worker entry point for torchrun (``python -m disttrain.launcher``) and a local multi-process launcher."""

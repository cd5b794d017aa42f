"""TorchServe glue: request/response adaptation (`adapter`), the handler file and config template
(package data), building the .mar and running TorchServe (`archive`, `e2vpt serve ...`).

The archive's layout, shared by the builder (`archive`) and the worker (`adapter`):"""

BACKBONE_FILE = "backbone.safetensors"  # the packed backbone: the one the workers serve
ENGINE_CONFIG = "engine.json"  # settings packed into the .mar (environment variables still override)

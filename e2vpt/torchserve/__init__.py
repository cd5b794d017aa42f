"""TorchServe glue: request/response adaptation (`adapter`), the handler file and config template
(package data), building the .mar and running TorchServe (`archive`, `e2vpt serve ...`)."""

"""The serving runtime: one mixed-task batch per call (`engine`), the device-resident prompt cache fed
by the registry (`cache`), feature backends (`backends`: torch, onnxruntime) and Prometheus `metrics`."""

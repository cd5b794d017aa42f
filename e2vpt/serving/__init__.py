"""The serving runtime: one mixed-task batch per call (`engine`), the device-resident prompt cache fed
by the registry (`cache`), feature backends (`backends`: torch, onnxruntime) and Prometheus `metrics`."""

# The inference API's request headers (TorchServe's handler and the Ray Serve app read them; `e2vpt
# predict` sends them). Lower case: header names are compared that way.
TASK_HEADER = "x-task-id"
TOP_K_HEADER = "x-top-k"

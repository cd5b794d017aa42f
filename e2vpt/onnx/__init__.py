"""The ONNX backend: export the prompted backbone with prompts as graph inputs (`export`) and run it
with onnxruntime as a serving feature backend (`backend`)."""

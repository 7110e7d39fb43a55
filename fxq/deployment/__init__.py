"""ONNX export and deployment on onnxruntime, and what onnxruntime's kernels compute on each CPU.
"""

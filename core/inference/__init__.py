"""The runtime path: engines (torch, ONNX, int8), the quality gate, the scoring pipeline, the
result store, the cluster."""

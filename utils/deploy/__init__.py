"""Model files for deployment: the exporters (TorchScript, ONNX, OpenVINO, TensorRT, a Hub folder),
the deploy form of a network, and the parity check of every exported file.
"""

"""Caffe nets and weights for other runtimes: ONNX export (``to_onnx``), its inspection (``onnx_info``), its check against pycaffe (``verify``).

Sits beside ``heads`` in the layers: may import training (for pycaffe, through its engine), data, net and formats; onnx and onnxruntime are imported lazily.
"""

"""Caffe nets and weights for other runtimes: ONNX export (``to_onnx``), its inspection (``onnx_info``), its check against pycaffe (``verify``).

May import :mod:`caffe_ft.net` and :mod:`caffe_ft.formats` only; onnx, onnxruntime and pycaffe are imported lazily.
"""

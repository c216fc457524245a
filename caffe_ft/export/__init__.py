"""Writing a Caffe net and its weights for other runtimes: ONNX (``to_onnx``) and reading it back (``onnx_info``).

May import :mod:`caffe_ft.net` and :mod:`caffe_ft.formats` only; the ``onnx`` package is imported lazily.
"""

"""Where training and test images come from and how Caffe transforms them: image lists, LMDB, the transform.

Imports caffe_ft.net, caffe_ft.formats and below.
"""

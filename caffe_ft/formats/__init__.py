"""Caffe's files without Caffe: schema, text format, numbers, upgrades, wire codec, binary files.

Imports only caffe_ft.errors, caffe_ft.resources and caffe_ft.version.
"""

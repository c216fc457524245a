"""Questions about a net: graph, shapes, fillers, which weights copy, diffs, the inspect report.

Imports caffe_ft.formats and below.
"""

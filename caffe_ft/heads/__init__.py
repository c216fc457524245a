"""Classifier heads on cached features: the trunk, the features cache, linear heads, Caffe's SGD replayed.

Imports caffe_ft.training and below.
"""

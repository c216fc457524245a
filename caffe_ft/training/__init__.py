"""Engine-independent training (schedules, solver nets, stops, snapshots, progress, plots) and the engines.

Imports caffe_ft.data and below; only pycaffe.py imports caffe, only the torch engine torch.
"""

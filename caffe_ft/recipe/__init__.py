"""The fine-tuning recipe: strategies, the rewrite, the solver rewrite, auto planning, advice, the one job.

Imports caffe_ft.heads, caffe_ft.training and below; never the CLI.
"""

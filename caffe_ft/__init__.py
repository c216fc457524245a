"""caffe-ft: fine-tune Caffe models with deterministic, reviewable rewrites."""

__version__ = "0.1.0"

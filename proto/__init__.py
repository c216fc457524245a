"""The Caffe schema that caffe-ft reads and writes by default (data only)."""

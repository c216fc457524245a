"""After training: how good a model is, and a report people look at.

:mod:`.metrics` turns predictions into numbers (scikit-learn), :mod:`.predict`
runs a net over an image list through pycaffe to get them, :mod:`.report`
writes ``report.html``/``report.json`` for a run and compares two runs.

Import layer: above :mod:`caffe_ft.heads` (it cuts nets with
:func:`caffe_ft.heads.trunk.cut_net`), below :mod:`caffe_ft.recipe`.
"""

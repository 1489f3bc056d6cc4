"""hpcvp: a Slurm-oriented job toolkit for the NYU Deep Learning video mask-prediction competition.

Layers import downward only: base modules (``atomic``, ``progress``), then ``data`` and ``eval`` (no hpcvp imports besides ``data``),
``train`` (generic engine), ``models``, ``stages`` (data + train + models + eval), ``cluster``
(launcher, on top of everything).
"""

__version__ = "0.1.0"

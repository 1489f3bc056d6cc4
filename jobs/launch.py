#!/usr/bin/env python3
"""Launch hpcvp stages on Slurm (Greene, Torch, any cluster) or locally: see --help.

Thin wrapper around hpcvp.cluster.launch.main, runnable from a checkout without installing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcvp.cluster.launch import main

if __name__ == "__main__":
    sys.exit(main())

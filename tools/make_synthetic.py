#!/usr/bin/env python
"""Write synthetic CLEVRER-like videos in the competition raw layout.

    python tools/make_synthetic.py --out data/synthetic --train 200 --val 50 --res 80x120 --workers 2

Everything lives in ``hpcvp.data.synthetic_set`` (scenes: ``hpcvp.data.synthetic``; also installed as ``hpcvp-make-synthetic``).
"""

import sys
from pathlib import Path

# Lets the script run from a clone without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcvp.data.synthetic_set import main

if __name__ == "__main__":
    raise SystemExit(main())

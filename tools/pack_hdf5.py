#!/usr/bin/env python
"""Pack the competition's raw layout into sharded HDF5, verify a packed directory, or stage it.

    python tools/pack_hdf5.py --src /scratch/$USER/dataset --out /scratch/$USER/packed --workers 8
    python tools/pack_hdf5.py --verify /scratch/$USER/packed
    python tools/pack_hdf5.py --stage /scratch/$USER/packed        # to $SLURM_TMPDIR or $TMPDIR

Same as the ``hpcvp-pack`` entry point; see ``hpcvp.data.pack_cli``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpcvp.data.pack_cli import main

if __name__ == "__main__":
    sys.exit(main())

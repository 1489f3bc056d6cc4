"""Stage ``pack``: the raw competition layout -> HDF5 shards + manifest.json (hpcvp.data.pack, hpcvp.data.pack_cli).

A CPU program of its own, not run by the stage worker: it has no config dataclass, and the
launcher builds its command line (--src, --out, --workers).
"""

from __future__ import annotations

from hpcvp.stages.spec import Resources, StageSpec

SPEC = StageSpec(
    name="pack",
    config_cls=None,
    run=None,
    chain_order=0,  # first in --stage all, when --src is given
    resources=Resources(gpus=0),
    sbatch_template="pack.sbatch",
    entry="hpcvp.data.pack_cli:main",
    writes_data=True,
    trains=False,
    description="raw PNG layout -> HDF5 shards + manifest (CPU)",
)

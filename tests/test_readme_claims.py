"""README claims a test can hold: the shard count of the full dataset and the template log names."""

from __future__ import annotations

import math
import re
from pathlib import Path

from hpcvp.data.pack import DEFAULT_SHARD_SIZE
from hpcvp.stages import registry

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# The course's dataset: 1,000 train + 1,000 val + 13,000 unlabelled videos, 2,000 hidden.
COUNTS = {"train": 1000, "val": 1000, "unlabeled": 13000}


def test_shard_count_of_the_full_dataset():
    shards = sum(math.ceil(n / DEFAULT_SHARD_SIZE) for n in COUNTS.values())  # shards never mix splits
    hidden = math.ceil(2000 / DEFAULT_SHARD_SIZE)
    assert f"The result is {shards} shard files ({DEFAULT_SHARD_SIZE} videos each, per split)" in README
    assert f"({hidden} more per 2,000 hidden videos)" in README


def test_template_log_names_are_the_readmes():
    assert "templates log to `hpcvp-<stage>-<job id>.out`" in README
    for spec in registry.STAGES.values():
        text = (REPO / "slurm" / f"{spec.name}.sbatch").read_text()
        # %x is the job name: hpcvp-<stage>-<job id>.out
        assert f"#SBATCH --job-name=hpcvp-{spec.name}\n" in text
        assert re.search(r"^#SBATCH --output=%x-%j\.out$", text, re.M)

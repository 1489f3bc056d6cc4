"""tools/gpu_check.sh's dry run on the CPU: the same plumbing a GPU node runs (every part, the
table it appends, the one-rank-group preempt/resume check), at tiny sizes."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_appends_every_part(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# earlier content\n")
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--device", "cpu", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# earlier content\n")  # appended, not replaced
    assert "## GPU check (" in text and "Failed parts" not in text
    assert "| raft_small | 1.0 | cpu | base |" in text and "| raft_small | 1.0 | cpu | bf16 |" in text
    assert "reference eager fp32 s/step" in text
    assert "One rank in a gloo process group" in text and "same final weights: True: ok" in text
    assert "bf16 + channels_last vs bf16 NCHW" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hpcvp-gpu-check.")]  # work dir removed

"""tools/nyu_env.sh end to end, with fakes on PATH for what a CI machine lacks:

- ``nvidia-smi`` prints the driver version the test chooses (or fails, as on a node without GPUs);
- ``singularity`` records its arguments, checks the image and overlay exist and runs the install
  script with ``/ext3`` rewritten to a temporary directory (the overlay's mount, emulated);
- a Miniforge installer that lays out ``bin/python`` (this interpreter), ``bin/conda`` (records)
  and ``etc/profile.d/conda.sh``;
- ``HPCVP_PIP``: a pip that records its arguments, so nothing is downloaded.

The venv is real (``python -m venv`` on a /scratch-like path); only pip is the stub.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "nyu_env.sh"
REPO = SCRIPT.parents[1]


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, Path]:
    bin_dir = tmp_path / "fakebin"
    log = tmp_path / "calls.log"
    ext3 = tmp_path / "ext3"
    ext3.mkdir()
    _exe(
        bin_dir / "nvidia-smi",
        '#!/bin/bash\n[ -n "$FAKE_DRIVER" ] || { echo "NVIDIA-SMI has failed" >&2; exit 9; }\n'
        '[ "$*" = "--query-gpu=driver_version --format=csv,noheader" ] || exit 8\necho "$FAKE_DRIVER"\n',
    )
    _exe(
        bin_dir / "singularity",
        r"""#!/bin/bash
echo "singularity $*" | head -n 1 >> "$FAKE_LOG"  # the first line of the script
[ "$1" = exec ] || exit 90
shift
overlay=""
while [[ "$1" == --* ]]; do
    case "$1" in
    --overlay) overlay=$2; shift 2 ;;
    --nv) shift ;;
    *) exit 91 ;;
    esac
done
image=$1; shift
[ -f "$image" ] || { echo "FATAL: could not open image $image" >&2; exit 255; }
[ -f "${overlay%:*}" ] || { echo "FATAL: overlay ${overlay%:*} not found" >&2; exit 255; }
echo "overlay-mode ${overlay##*:}" >> "$FAKE_LOG"
[ "$1" = /bin/bash ] && [ "$2" = -c ] || exit 92
exec /bin/bash -c "${3//\/ext3/$FAKE_EXT3}"
""",
    )
    installer = _exe(
        tmp_path / "Miniforge3-fake.sh",
        f"""#!/bin/bash
[ "$1" = -b ] && [ "$2" = -p ] || exit 93
prefix=$3
mkdir -p "$prefix/bin" "$prefix/etc/profile.d"
printf '#!/bin/bash\\nexec {sys.executable} "$@"\\n' > "$prefix/bin/python"
printf '#!/bin/bash\\necho "conda $*" >> "$FAKE_LOG"\\n' > "$prefix/bin/conda"
chmod +x "$prefix/bin/python" "$prefix/bin/conda"
touch "$prefix/etc/profile.d/conda.sh"
echo "miniforge $prefix" >> "$FAKE_LOG"
""",
    )
    pip = _exe(tmp_path / "fake-pip", '#!/bin/bash\necho "pip $*" >> "$FAKE_LOG"\n')
    template = tmp_path / "overlay-15GB-500K.ext3.gz"
    with gzip.open(template, "wb") as f:
        f.write(b"\0" * 1024)
    image = tmp_path / "scratch" / "images" / "cuda12.1.sif"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"SIF")
    home = tmp_path / "home"
    home.mkdir()
    return {
        "bin": bin_dir,
        "log": log,
        "ext3": ext3,
        "installer": installer,
        "pip": pip,
        "template": template,
        "image": image,
        "home": home,
        "scratch": tmp_path / "scratch",
    }


def run(fakes, *args: str, driver: str = "", **env_extra: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{fakes['bin']}:{os.environ['PATH']}",
        "HOME": str(fakes["home"]),
        "FAKE_LOG": str(fakes["log"]),
        "FAKE_EXT3": str(fakes["ext3"]),
        "FAKE_DRIVER": driver,
        "HPCVP_PIP": str(fakes["pip"]),
        "HPCVP_MINIFORGE_INSTALLER": str(fakes["installer"]),
        "HPCVP_OVERLAY_TEMPLATE": str(fakes["template"]),
        **env_extra,
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def calls(fakes) -> list[str]:
    return fakes["log"].read_text().splitlines() if fakes["log"].exists() else []


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("nyu_env.sh: error: ")
    return errors[0]


@pytest.mark.parametrize(
    "driver, wheel",
    [
        ("470.82.01", None),  # too old for any torch CUDA build
        ("525.85.12", "cu118"),
        ("535.104.05", "cu121"),
        ("550.54.15", "cu124"),
        ("560.35.03", "cu126"),
        ("570.86.15", "cu128"),
        ("580.82.07", "cu130"),
        ("", "cpu"),  # no GPU visible
    ],
)
def test_cuda_build_follows_the_driver(fakes, driver, wheel):
    result = run(fakes, "--show-cuda", driver=driver)
    if wheel is None:
        assert "older than any torch CUDA build" in one_error_line(result)
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == wheel
    if wheel == "cpu":
        assert "run this on a GPU node" in result.stderr and "--cuda" in result.stderr


def test_cuda_override_and_bad_value(fakes):
    result = run(fakes, "--show-cuda", "--cuda", "cu121", driver="570.86.15")
    assert result.returncode == 0 and result.stdout.strip() == "cu121"
    assert "--cuda cu12.1" in one_error_line(run(fakes, "--show-cuda", "--cuda", "cu12.1"))


def test_help_and_bad_input(fakes):
    result = run(fakes, "--help")
    assert result.returncode == 0 and "--venv DIR" in result.stdout and "--overlay FILE" in result.stdout
    assert "unknown argument" in one_error_line(run(fakes, "--frobnicate"))
    assert "choose --venv DIR or --overlay" in one_error_line(run(fakes))
    line = one_error_line(run(fakes, "--overlay", str(fakes["scratch"] / "x.ext3"), "--image", "/nope/image.sif"))
    assert "--image /nope/image.sif: no such file" in line
    assert calls(fakes) == []  # nothing ran


def test_venv_on_scratch_end_to_end(fakes):
    target = fakes["scratch"] / "user" / "hpcvp-venv"
    result = run(fakes, "--venv", str(target), "--python", sys.executable, driver="535.104.05")
    assert result.returncode == 0, result.stderr + result.stdout
    assert (target / "bin" / "python").exists() and (target / "pyvenv.cfg").exists()
    assert calls(fakes) == [
        "pip install --upgrade pip",
        "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu121",
        f"pip install -e {REPO}[plots]",
    ]
    # it says what it does
    assert "NVIDIA driver 535.104.05: torch wheel index cu121" in result.stdout
    assert f"+ {sys.executable} -m venv {target}" in result.stdout
    assert f"source {target}/bin/activate" in result.stdout
    # a second run refuses the non-empty directory
    assert "exists and is not empty; pass --force" in one_error_line(
        run(fakes, "--venv", str(target), "--python", sys.executable)
    )


def test_venv_refuses_home_and_old_python(fakes, tmp_path):
    line = one_error_line(run(fakes, "--venv", str(fakes["home"] / "venv"), "--python", sys.executable))
    assert "under $HOME" in line and "30,000 files" in line and "/scratch" in line
    old = _exe(tmp_path / "python3.8", "#!/bin/bash\necho 3.8\n")
    line = one_error_line(run(fakes, "--venv", str(fakes["scratch"] / "v"), "--python", str(old)))
    assert "is Python 3.8; hpcvp needs >= 3.10" in line
    assert not (fakes["scratch"] / "v").exists()


def test_overlay_end_to_end(fakes):
    overlay = fakes["scratch"] / "user" / "hpcvp.ext3"
    image = fakes["image"]
    result = run(fakes, "--overlay", str(overlay), "--image", str(image), driver="570.86.15")
    assert result.returncode == 0, result.stderr + result.stdout
    assert overlay.is_file()  # made from the empty overlay template
    log = calls(fakes)
    assert log[0] == f"singularity exec --overlay {overlay}:rw {image} /bin/bash -c set -euo pipefail -f"
    assert log[1:] == [
        "overlay-mode rw",
        f"miniforge {fakes['ext3']}/miniforge3",
        "conda install -y -q python=3.11",
        "pip install --upgrade pip",
        "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu128",
        f"pip install -e {REPO}[plots]",
        "conda clean -y -q --all",
    ]
    env_sh = (fakes["ext3"] / "env.sh").read_text()
    assert "etc/profile.d/conda.sh" in env_sh and "miniforge3/bin:$PATH" in env_sh
    # what jobs then run: the launcher's --container/--overlay, read-only, after sourcing env.sh
    assert f"singularity exec --nv --overlay {overlay}:ro {image} /bin/bash -c 'source /ext3/env.sh" in result.stdout
    assert f"--container {image} --overlay {overlay}" in result.stdout

    # populated: refused without --force, rebuilt with it
    fakes["log"].unlink()
    line = one_error_line(run(fakes, "--overlay", str(overlay), "--image", str(image), "--cuda", "cu126"))
    assert "already holds" in line and "miniforge3" in line and "pass --force" in line  # /ext3 as the fake maps it
    assert not any(c.startswith("pip") for c in calls(fakes))
    result = run(fakes, "--overlay", str(overlay), "--image", str(image), "--cuda", "cu126", "--force")
    assert result.returncode == 0, result.stderr
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126" in calls(fakes)


def test_launcher_runs_what_the_recipe_builds(tmp_path):
    """The launcher's --container/--overlay prefix: the overlay read-only, then source /ext3/env.sh."""
    from hpcvp.cluster.profiles import load_profiles
    from hpcvp.cluster.sbatch import container_prefix

    for name, profile in load_profiles().items():
        if profile.container_setup is None:
            continue
        words = container_prefix(profile, tmp_path / "i.sif", tmp_path / "o.ext3", use_gpus=True)
        assert words[:2] == ["singularity", "exec"], name
        assert f"{tmp_path / 'o.ext3'}:ro" in words
        assert any("source /ext3/env.sh" in w for w in words)

#!/usr/bin/env bash
# Build hpcvp's Python environment where NYU's quotas allow it (Greene, Torch).
#
# The environment has ~31,000 files and ~5.8 GB: over the home quota's ~30,000 files. Two places fit:
#   --venv /scratch/$USER/hpcvp-venv                     a venv on /scratch (needs a Python >= 3.10)
#   --overlay /scratch/$USER/hpcvp.ext3 --image X.sif    miniforge + pip inside an ext3 overlay, used
#                                                        read-only by jobs (--container/--overlay)
# Run `tools/nyu_env.sh --help` for the options. Test hooks (tests/test_nyu_env.py):
#   HPCVP_PIP                  command used instead of "python -m pip" (a stub that records its args)
#   HPCVP_MINIFORGE_INSTALLER  a local Miniforge installer instead of downloading the latest one
#   HPCVP_OVERLAY_TEMPLATE     the gzipped empty overlay copied when --overlay FILE does not exist
set -euo pipefail

PROG=nyu_env.sh
MIN_PYTHON=3.10
CONTAINER_PYTHON=3.11
TORCH_INDEX=https://download.pytorch.org/whl
OVERLAY_TEMPLATE=${HPCVP_OVERLAY_TEMPLATE:-/scratch/work/public/overlay-fs-ext3/overlay-15GB-500K.ext3.gz}
MINIFORGE_URL="https://github.com/conda-forge/miniforge/releases/latest/download/Miniforge3-Linux-$(uname -m).sh"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The newest PyTorch CUDA wheel index each driver runs: the minimum Linux driver of each CUDA
# toolkit release (NVIDIA's CUDA Toolkit release notes, "CUDA Toolkit and Corresponding Driver
# Versions"). Newest first. Index names: https://pytorch.org/get-started/previous-versions/
CUDA_TABLE=(
    "cu130 580.65.06"
    "cu128 570.26"
    "cu126 560.28.03"
    "cu124 550.54.14"
    "cu121 530.30.02"
    "cu118 520.61.05"
)

usage() {
    cat <<EOF
Usage:
  $PROG --venv DIR [--python PYTHON] [--cuda cuXXX|cpu] [--force]
  $PROG --overlay FILE.ext3 --image IMAGE.sif [--cuda cuXXX|cpu] [--force]
  $PROG --show-cuda [--cuda cuXXX|cpu]

Installs torch (the CUDA build matching this node's driver) and hpcvp ($REPO, editable, with
the plots extra) where NYU's quotas allow: the environment has ~31,000 files and ~5.8 GB, more
files than the home quota (~30,000) holds.

Where:
  --venv DIR          a venv in DIR (put it on /scratch, e.g. /scratch/\$USER/hpcvp-venv). Needs a
                      Python >= $MIN_PYTHON: --python PYTHON, else the newest python3.1x on PATH
                      (on Greene: \`module avail python\`, then \`module load\` a 3.10+ one; or use
                      --overlay, which brings its own Python).
  --overlay FILE      an ext3 overlay holding Miniforge (Python $CONTAINER_PYTHON) in /ext3/miniforge3 and
                      /ext3/env.sh; a missing FILE is made from $OVERLAY_TEMPLATE.
                      Jobs then use it read-only:
                        singularity exec --nv --overlay FILE:ro IMAGE /bin/bash -c 'source /ext3/env.sh && python ...'
                      which is what jobs/launch.py --container IMAGE --overlay FILE runs.
  --image IMAGE.sif   the Singularity image (with --overlay), e.g. one of /scratch/work/public/singularity/

Options:
  --cuda cuXXX|cpu    the torch wheel index (cu118 cu121 cu124 cu126 cu128 cu130, or cpu) instead of the
                      one chosen from \`nvidia-smi --query-gpu=driver_version\` (CPU-only when no GPU is
                      visible: run this on a GPU node, e.g. in \`srun --gres=gpu:1 --pty bash\`, or pass --cuda)
  --python PYTHON     the interpreter for --venv
  --force             install into a non-empty DIR / an overlay that already holds /ext3/miniforge3,
                      or under \$HOME despite its file quota
  --show-cuda         print the chosen torch wheel index and exit
  -h, --help          this text
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

say() { echo "[$PROG] $*"; }

# version_ge A B: A >= B for dotted versions
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }

VENV="" OVERLAY="" IMAGE="" CUDA="" PYTHON="" FORCE=0 SHOW_CUDA=0
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; VENV=$2; shift 2 ;;
    --overlay) [ $# -ge 2 ] || die "--overlay needs an .ext3 file"; OVERLAY=$2; shift 2 ;;
    --image) [ $# -ge 2 ] || die "--image needs a .sif file"; IMAGE=$2; shift 2 ;;
    --cuda) [ $# -ge 2 ] || die "--cuda needs cuXXX or cpu"; CUDA=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
    --force) FORCE=1; shift ;;
    --show-cuda) SHOW_CUDA=1; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- the torch build
choose_cuda() {
    if [ -n "$CUDA" ]; then
        case "$CUDA" in
        cpu) ;;
        cu[0-9][0-9][0-9]) ;;
        *) die "--cuda $CUDA: expected cuXXX (e.g. cu121, cu128) or cpu" ;;
        esac
        say "torch wheel index: $CUDA (--cuda)"
        return
    fi
    local driver=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ') || driver=""
    fi
    if [ -z "$driver" ]; then
        CUDA=cpu
        say "no GPU visible (nvidia-smi absent or silent): installing the CPU-only torch."
        say "note: for GPU jobs run this on a GPU node (srun --gres=gpu:1 --pty bash) or pass --cuda cuXXX"
        return
    fi
    local row
    for row in "${CUDA_TABLE[@]}"; do
        set -- $row
        if version_ge "$driver" "$2"; then
            CUDA=$1
            say "NVIDIA driver $driver: torch wheel index $CUDA (needs driver >= $2)"
            return
        fi
    done
    die "NVIDIA driver $driver is older than any torch CUDA build needs (>= 520.61.05 for cu118); pass --cuda cpu"
}

# ---------------------------------------------------------------- pip steps (the same in both modes)
# $1: the python that runs pip. Prints the commands as it runs them.
pip_steps() {
    local python=$1 pip
    if [ -n "${HPCVP_PIP:-}" ]; then pip=$HPCVP_PIP; else pip="$python -m pip"; fi
    local cmds=(
        "$pip install --upgrade pip"
        "$pip install torch torchvision --index-url $TORCH_INDEX/$CUDA"
        "$pip install -e $REPO[plots]"
    )
    local cmd
    set -f # no globbing of "hpcvp[plots]"
    for cmd in "${cmds[@]}"; do
        say "+ $cmd"
        $cmd
    done
    set +f
}

# ---------------------------------------------------------------- venv on /scratch
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

find_python() {
    if [ -n "$PYTHON" ]; then
        command -v "$PYTHON" >/dev/null 2>&1 || die "--python $PYTHON: not found"
        local v
        v=$(python_version "$PYTHON") || die "--python $PYTHON: does not run"
        version_ge "$v" "$MIN_PYTHON" || die "--python $PYTHON is Python $v; hpcvp needs >= $MIN_PYTHON (module load a newer python, or use --overlay)"
        return
    fi
    local candidate v
    for candidate in python3.13 python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && v=$(python_version "$candidate") && version_ge "$v" "$MIN_PYTHON"; then
            PYTHON=$(command -v "$candidate")
            return
        fi
    done
    v=$(python_version python3 || echo none)
    die "no Python >= $MIN_PYTHON on PATH (python3 is $v): \`module avail python\` and \`module load\` a 3.10+ one, pass --python, or use --overlay"
}

under_home() {
    local target home
    target=$(realpath -m "$1")
    home=$(realpath -m "${HOME:-/nonexistent}")
    case "$target/" in "$home"/*) return 0 ;; esac
    return 1
}

build_venv() {
    local dir=$VENV
    if under_home "$dir" && [ "$FORCE" = 0 ]; then
        die "--venv $dir is under \$HOME, whose quota (~30,000 files) the environment (~31,000 files, 5.8 GB) exceeds; use /scratch/\$USER/... (or --force)"
    fi
    if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ "$FORCE" = 0 ]; then
        die "--venv $dir exists and is not empty; pass --force to install into it"
    fi
    find_python
    choose_cuda
    say "Python: $PYTHON ($(python_version "$PYTHON"))"
    say "+ $PYTHON -m venv $dir"
    "$PYTHON" -m venv "$dir"
    pip_steps "$dir/bin/python"
    say "done: $(find "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1) in $dir"
    say "use it: source $dir/bin/activate, or $dir/bin/python jobs/launch.py ..."
}

# ---------------------------------------------------------------- ext3 overlay + Singularity image
build_overlay() {
    [ -n "$IMAGE" ] || die "--overlay needs --image IMAGE.sif (e.g. one of /scratch/work/public/singularity/)"
    [ -f "$IMAGE" ] || die "--image $IMAGE: no such file"
    command -v singularity >/dev/null 2>&1 || die "singularity not found on PATH (it is on NYU's login and compute nodes)"
    case "$OVERLAY" in *.ext3) ;; *) die "--overlay $OVERLAY: expected an .ext3 file" ;; esac
    if [ ! -e "$OVERLAY" ]; then
        [ -f "$OVERLAY_TEMPLATE" ] || die "--overlay $OVERLAY does not exist and the empty overlay $OVERLAY_TEMPLATE is missing; copy one from /scratch/work/public/overlay-fs-ext3/ and gunzip it"
        mkdir -p "$(dirname "$OVERLAY")"
        say "+ cp $OVERLAY_TEMPLATE $OVERLAY.gz && gunzip $OVERLAY.gz"
        cp "$OVERLAY_TEMPLATE" "$OVERLAY.gz"
        gunzip "$OVERLAY.gz"
    fi
    choose_cuda
    local installer=${HPCVP_MINIFORGE_INSTALLER:-}
    local cleanup=""
    if [ -z "$installer" ]; then
        # next to the overlay (on /scratch, which the container sees), not in the small /tmp
        installer="$(dirname "$(realpath "$OVERLAY")")/.Miniforge3-installer.$$.sh"
        cleanup=$installer
        say "+ download $MINIFORGE_URL"
        if command -v curl >/dev/null 2>&1; then
            curl -fsSL -o "$installer" "$MINIFORGE_URL" || die "could not download $MINIFORGE_URL"
        else
            wget -q -O "$installer" "$MINIFORGE_URL" || die "could not download $MINIFORGE_URL"
        fi
    fi
    [ -f "$installer" ] || die "Miniforge installer $installer: no such file"
    installer=$(realpath "$installer")

    local pip_cmd=${HPCVP_PIP:-python -m pip}
    # Runs inside the container, the overlay mounted read-write on /ext3.
    local inner
    inner=$(
        cat <<EOF
set -euo pipefail -f
say() { echo "[$PROG] \$*"; }
if [ -e /ext3/miniforge3 ] || [ -e /ext3/env.sh ]; then
    if [ "$FORCE" = 1 ]; then
        say "removing the overlay's /ext3/miniforge3 and /ext3/env.sh (--force)"
        rm -rf /ext3/miniforge3 /ext3/env.sh
    else
        echo "$PROG: error: --overlay $OVERLAY already holds /ext3/miniforge3 or /ext3/env.sh; pass --force to rebuild it" >&2
        exit 2
    fi
fi
say "+ bash $installer -b -p /ext3/miniforge3"
bash "$installer" -b -p /ext3/miniforge3
cat > /ext3/env.sh <<'ENVSH'
#!/bin/bash
# hpcvp's environment in this overlay (written by tools/nyu_env.sh): source /ext3/env.sh
unset -f which
source /ext3/miniforge3/etc/profile.d/conda.sh
export PATH=/ext3/miniforge3/bin:\$PATH
ENVSH
say "wrote /ext3/env.sh"
source /ext3/env.sh
say "+ conda install -y python=$CONTAINER_PYTHON"
conda install -y -q python=$CONTAINER_PYTHON
v=\$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "\$(printf '%s\n%s\n' "\$v" "$MIN_PYTHON" | sort -V | head -n1)" != "$MIN_PYTHON" ]; then
    echo "$PROG: error: the overlay's python is \$v; hpcvp needs >= $MIN_PYTHON" >&2
    exit 2
fi
say "Python \$v in /ext3/miniforge3"
for cmd in "$pip_cmd install --upgrade pip" "$pip_cmd install torch torchvision --index-url $TORCH_INDEX/$CUDA" "$pip_cmd install -e $REPO[plots]"; do
    say "+ \$cmd"
    \$cmd
done
conda clean -y -q --all >/dev/null 2>&1 || true
say "the overlay holds \$(find /ext3 | wc -l) files, \$(du -sh /ext3 | cut -f1)"
EOF
    )
    say "+ singularity exec --overlay $OVERLAY:rw $IMAGE /bin/bash -c <install script>"
    local status=0
    singularity exec --overlay "$OVERLAY:rw" "$IMAGE" /bin/bash -c "$inner" || status=$?
    [ -z "$cleanup" ] || rm -f "$cleanup"
    [ "$status" = 0 ] || exit "$status"
    say "done. Jobs use the overlay read-only:"
    say "  singularity exec --nv --overlay $OVERLAY:ro $IMAGE /bin/bash -c 'source /ext3/env.sh && python ...'"
    say "  python jobs/launch.py ... --container $IMAGE --overlay $OVERLAY"
}

# ---------------------------------------------------------------- main
if [ "$SHOW_CUDA" = 1 ]; then
    choose_cuda >&2
    echo "$CUDA"
    exit 0
fi
if [ -n "$VENV" ] && [ -n "$OVERLAY" ]; then
    die "choose one of --venv DIR and --overlay FILE"
fi
if [ -n "$VENV" ]; then
    [ -z "$IMAGE" ] || die "--image goes with --overlay, not --venv"
    build_venv
elif [ -n "$OVERLAY" ]; then
    [ -z "$PYTHON" ] || die "--python goes with --venv (the overlay brings Python $CONTAINER_PYTHON)"
    build_overlay
else
    die "choose --venv DIR or --overlay FILE.ext3 --image IMAGE.sif (see --help)"
fi

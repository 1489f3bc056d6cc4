"""How ``--stage all`` wires the pipeline's stages together, and what each stage reads.

pack -> seg -> pseudo-label -> simvp (on masks) -> predict. Each later stage is pointed at the run
dirs of the earlier ones through its config keys; the run dirs are known before anything runs
(``<run root>/<stage>/<run name>``), so the whole chain can be submitted at once with ``afterok``.
"""

from __future__ import annotations

from pathlib import Path

# Splits each stage reads from the packed set (pre-flight checks the manifest has them).
SPLITS_READ: dict[str, tuple[str, ...]] = {
    "seg": ("train", "val"),
    "pseudo-label": (),
    "simvp": ("train", "val"),
    "raft": ("train",),
    "slot": ("train",),
    "predict": ("val", "hidden"),
}


# Config keys by which a stage reads an earlier stage's run, and that stage.
RUN_LINKS: dict[str, dict[str, str]] = {
    "pseudo-label": {"seg_run": "seg"},
    "slot": {"seg_run": "seg"},
    "predict": {"seg_run": "seg", "simvp_masks_run": "simvp", "raft_run": "raft"},
}


def links(stage: str, run_root: Path, run_name: str) -> list[str]:
    """For a stage launched on its own: read the earlier stages' runs of the same name under the
    same run root (``--run`` names an experiment across stages). ``--set`` given later wins."""
    return [f"{key}={run_root / source / run_name}" for key, source in RUN_LINKS.get(stage, {}).items()]


def wiring(stage: str, run_dirs: dict[str, Path]) -> list[str]:
    """``KEY=VALUE`` overrides that connect ``stage`` to the earlier stages of the chain."""
    if stage == "pseudo-label":
        return [f"seg_run={run_dirs['seg']}"]
    if stage == "simvp":
        # After pseudo-labelling, SimVP learns mask dynamics from every video's (pseudo) masks.
        return ["mode=masks", "train_splits=train,unlabeled", "mask_source=any"]
    if stage == "predict":
        # The chain trains no frame-mode SimVP and no RAFT: score the pipelines it can feed
        # (a: U-Net masks -> SimVP masks; d, e: the no-motion references) and submit the best.
        return [f"seg_run={run_dirs['seg']}", f"simvp_masks_run={run_dirs['simvp']}", "pipelines=a,d,e"]
    return []

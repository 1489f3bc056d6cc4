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

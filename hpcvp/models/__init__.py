"""Models: one file per model, each with ``PRESETS = {"tiny": {...}, "full": {...}}`` (and ``demo``
for the models of the main command's chain: U-Net, SimVP).

``tiny`` is for tests; ``demo`` for the built-in set on a CPU; ``full`` matches the published configurations.
"""

from hpcvp.models.raft import (
    PRESETS as RAFT_PRESETS,
)
from hpcvp.models.raft import (
    RaftWeightsError,
    backward_warp,
    build_raft,
    estimate_flow,
    forward_consistency_occlusion,
    load_raft_weights,
    pad_for_raft,
    unpad,
)
from hpcvp.models.simvp import PRESETS as SIMVP_PRESETS
from hpcvp.models.simvp import SimVP
from hpcvp.models.slot_attention import PRESETS as SLOT_PRESETS
from hpcvp.models.slot_attention import SlotAttentionAutoEncoder
from hpcvp.models.unet import PRESETS as UNET_PRESETS
from hpcvp.models.unet import UNet

ALL_PRESETS = {
    "unet": UNET_PRESETS,
    "simvp": SIMVP_PRESETS,
    "slot": SLOT_PRESETS,
    "raft": RAFT_PRESETS,
}


def preset(model: str, name: str) -> dict:
    """A copy of ``PRESETS[name]`` of ``model`` ("unet", "simvp", "slot", "raft"), with a clear error."""
    if model not in ALL_PRESETS:
        raise KeyError(f"unknown model {model!r}; choose one of {sorted(ALL_PRESETS)}")
    presets = ALL_PRESETS[model]
    if name not in presets:
        raise KeyError(f"unknown preset {name!r} for {model}; choose one of {sorted(presets)}")
    return dict(presets[name])


__all__ = [
    "ALL_PRESETS",
    "RAFT_PRESETS",
    "SIMVP_PRESETS",
    "SLOT_PRESETS",
    "UNET_PRESETS",
    "RaftWeightsError",
    "SimVP",
    "SlotAttentionAutoEncoder",
    "UNet",
    "backward_warp",
    "build_raft",
    "estimate_flow",
    "forward_consistency_occlusion",
    "load_raft_weights",
    "pad_for_raft",
    "preset",
    "unpad",
]

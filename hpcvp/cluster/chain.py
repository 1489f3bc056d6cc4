"""How ``--stage all`` chains the stages, and how a stage launched alone finds earlier runs.

The chain is every stage whose StageSpec has a ``chain_order`` (pack -> seg -> pseudo-label ->
simvp (on masks) -> predict). Each later stage is pointed at the run dirs of the earlier ones
through the config keys of its ``run_links``; the run dirs are known before anything runs
(``<run root>/<stage>/<run name>``), so the whole chain can be submitted at once with ``afterok``.
"""

from __future__ import annotations

from pathlib import Path

from hpcvp.stages.registry import chain_stages, get_stage


def chain(with_pack: bool) -> list[str]:
    """The stage names of ``--stage all``; pack only when there is raw data to pack."""
    return [s.name for s in chain_stages() if with_pack or s.name != "pack"]


def links(stage: str, run_root: Path, run_name: str) -> list[str]:
    """For a stage launched on its own: read the earlier stages' runs of the same name under the
    same run root (``--run`` names an experiment across stages). ``--set`` given later wins."""
    return [f"{key}={run_root / source / run_name}" for key, source in get_stage(stage).run_links.items()]


def wiring(stage: str, run_dirs: dict[str, Path]) -> list[str]:
    """``KEY=VALUE`` overrides that connect ``stage`` to the earlier stages of the chain (the
    links to stages not in the chain keep their defaults), then the chain's own settings."""
    spec = get_stage(stage)
    linked = [f"{key}={run_dirs[source]}" for key, source in spec.run_links.items() if source in run_dirs]
    return linked + list(spec.chain_settings)

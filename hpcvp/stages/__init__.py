"""The stages: one job each that users launch (pack, seg, pseudo-label, simvp, raft, slot, predict).

Map of the package:

- ``spec``: StageSpec, the one description of a stage (config, presets, splits it reads, runs it
  links to, place in ``--stage all``, default resources, sbatch template); run-root defaults.
- ``registry``: STAGES (name -> SPEC of each stage module), ``build_config`` (defaults -> preset ->
  ``--set``; the parser is hpcvp.config_overrides), ``chain_stages``.
- one module per stage, each ending in its ``SPEC``: ``pack``, ``seg``, ``pseudo_label``, ``simvp``,
  ``raft``, ``slot``, ``predict`` (with ``losses`` for the training losses).
- ``worker``: the process every launcher starts; runs one stage.
- ``runs``: run dirs of stages (``stage_config.json``; an earlier stage's model rebuilt from its run).
- ``evaluation``: rank-split evaluation data, autocast, unwrapping; ``report``: pictures, tables, log.

This package file imports nothing, so ``hpcvp.stages.spec`` can be read without torch and no stage
module imports its own registry.
"""

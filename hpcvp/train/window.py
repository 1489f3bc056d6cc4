"""The metrics window: per-rank sums of the training logs between two metrics lines."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class MetricsWindow:
    """Sums of every log (tensors stay on the device until the line is due) and the number of
    micro-batches and optimizer steps they cover.  A checkpoint part (per rank): a resumed run's
    first metrics line then averages over the same micro-batches as an uninterrupted run's."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.micro = 0
        self.steps = 0
        self.skipped = 0  # optimizer steps skipped (non-finite gradients): their logs are not summed

    def add(self, loss: Tensor, logs: dict[str, Any] | None) -> None:
        items = dict(logs or {})
        items["loss"] = loss.detach()  # the engine's loss wins over a task log of that name
        for key, value in items.items():
            value = value.detach().to(torch.float64) if isinstance(value, Tensor) else float(value)
            current = self.sums.get(key)
            self.sums[key] = value if current is None else current + value
        self.micro += 1

    def state_dict(self) -> dict[str, Any]:
        """This rank's partial sums, exactly (float64 -> python float is lossless)."""
        return {
            "sums": {k: float(v) for k, v in self.sums.items()},
            "micro": self.micro,
            "steps": self.steps,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state["sums"])
        self.micro = int(state["micro"])
        self.skipped = int(state.get("skipped", 0))  # absent in checkpoints of older releases

    def reduce(self, env: Any, device: torch.device) -> dict[str, float]:
        """Mean over ranks and micro-batches of the window's logs (a collective); empties it."""
        keys = sorted(self.sums)
        values = [self.sums[k] for k in keys]
        vec = torch.tensor(
            [0.0 if isinstance(v, Tensor) else float(v) for v in values] + [float(self.micro)],
            dtype=torch.float64,
        )
        tensor_positions = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
        if tensor_positions:
            # one device->host copy for all tensor-valued logs instead of one sync per key
            vec[tensor_positions] = torch.stack([values[i] for i in tensor_positions]).cpu()
        if env.distributed:
            if env.backend == "nccl":
                vec = vec.to(device)
                dist.all_reduce(vec)
                vec = vec.cpu()
            else:
                dist.all_reduce(vec)
        total_micro = max(1.0, float(vec[-1]))
        self.sums, self.micro = {}, 0
        return {k: float(vec[i]) / total_micro for i, k in enumerate(keys)}

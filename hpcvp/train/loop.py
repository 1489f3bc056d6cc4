"""The training loop.  A stage plugs in a TrainTask; the loop owns everything else: devices, DDP,
mixed precision, accumulation, clipping, schedules, data order, evaluation cadence, checkpoints,
preemption and metrics.

Step boundary protocol (the same on every rank, so no rank ever runs on alone):
  1. optimizer step ``s`` done; ``task.after_step`` (optional)
  2. one all-reduce(MAX) of [signal received, time-based save due (rank 0's clock)]
  3. signal -> log line if due, save (once), return "preempted"
  4. evaluation if due (then the signal is agreed again: evaluations can be long)
  5. metrics line if due (training logs averaged over ranks, plus evaluation metrics)
  6. checkpoint if due by steps, by minutes, or at the last step
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, IterableDataset

from hpcvp.progress import TrainProgress

from . import dist as hdist
from .checkpoint import Checkpoint, Checkpointer
from .config import TrainConfig
from .fastpath import CompiledWithFallback, effective_fast_path
from .loader import make_loader
from .optim import build_optimizer, build_scheduler
from .rng import TAG_LOADER, TAG_STEP, RngState, mix_seed, seed_everything, seed_globals
from .rundir import MetricsWriter, RunDir, WandbSettings
from .sampler import ResumableDistributedSampler, SeededSamples
from .signals import EXIT_REQUEUE, PreemptionFlag, signal_name
from .window import MetricsWindow

log = logging.getLogger("hpcvp.train")

# TrainConfig keys whose change on resume does not alter the trained weights.
_HARMLESS_KEYS = {
    "eval_every",
    "eval_at_end",
    "save_every_steps",
    "save_every_minutes",
    "keep_last",
    "snapshots",
    "num_workers",
    "prefetch_factor",
    "log_every",
    "progress",
    "wandb",
    "wandb_project",
    "preempt_signal",
    "dist_timeout_minutes",
    "nonfinite_loss",
    "compile",
    "compile_backend",
    "fast_path_model",
}


@runtime_checkable
class TrainTask(Protocol):
    """What a stage provides.  Optional extras the trainer uses when present:

    - ``collate_fn`` attribute: DataLoader collate function
    - ``extra_state() -> object`` / ``load_extra_state(obj)``: small picklable state saved with
      every checkpoint (rank 0's copy) and handed back on resume
    - ``after_step(model, step, env)``: called on every rank after each optimizer step
    - ``describe() -> dict``: written into config.json under "task"
    """

    def build_model(self) -> nn.Module: ...

    def train_dataset(self) -> Dataset: ...

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, dict[str, float]]:
        """Runs under autocast; returns the mean loss of the micro-batch and logs (floats or
        0-dim tensors, averaged over ranks and steps between metrics lines).  The log keys
        must be the same on every rank."""
        ...

    def evaluate(self, model: nn.Module, env: hdist.DistEnv, run: RunDir, step: int) -> dict[str, float]: ...

    def identity(self) -> dict: ...


@dataclass
class FitResult:
    status: str  # "completed" | "preempted"
    step: int
    stop_reason: str = ""
    signal: str | None = None  # e.g. "SIGUSR2" when preempted
    resumed_from: int | None = None
    checkpoint: str | None = None  # last checkpoint written or resumed from

    @property
    def exit_code(self) -> int:
        """Process exit status for the worker: EXIT_REQUEUE when preempted, else 0."""
        return EXIT_REQUEUE if self.status == "preempted" else 0


# Steps in a row whose gradients are not finite before the run stops (train.nonfinite_loss=stop):
# a rare overflow is skipped, a run whose every step overflows has diverged.
MAX_SKIPPED_IN_ROW = 5
# With fp16 the GradScaler halves its scale at each skipped step: 30 in a row take it from 2**16
# to 2**-14, far past any calibration.
MAX_SCALER_SKIPS_IN_ROW = 30


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf (``train.nonfinite_loss=stop``); raised on every rank."""


class IdentityMismatchError(ValueError):
    """Resuming a run whose checkpoint was trained with different model/data settings."""


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Tensors inside dicts/lists/tuples moved to ``device`` (helper for TrainTask.loss)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, tuple):
        value = list(value)
    return {prefix: value}


def identity_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, checkpoint value, current value) for every differing identity key."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            diffs.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
    return diffs


def _jsonable(value: Any) -> Any:
    """Identity values as JSON would round-trip them (tuples -> lists, paths -> str)."""
    import json

    return json.loads(json.dumps(value, default=str))


class _TrainerPart:
    """The trainer's own checkpoint part: the evaluation a preemption postponed, and what the
    resume check compares (settings, identity, thread count).  The step is the Checkpointer's."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "num_threads": torch.get_num_threads(),
            "train_config": t.cfg.to_dict(),
            "identity": t._identity(),
            "pending_eval": t._pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer._pending = state.get("pending_eval")


class _TaskExtra:
    """The task's optional ``extra_state()`` / ``load_extra_state()`` as a checkpoint part."""

    def __init__(self, task: TrainTask):
        self.task = task

    def state_dict(self) -> Any:
        return self.task.extra_state() if hasattr(self.task, "extra_state") else None

    def load_state_dict(self, state: Any) -> None:
        if hasattr(self.task, "load_extra_state"):
            self.task.load_extra_state(state)


class Trainer:
    def __init__(self, task: TrainTask, cfg: TrainConfig, run: RunDir, env: hdist.DistEnv):
        cfg.validate()
        self.task = task
        self.cfg = cfg
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.env = env
        self.device = env.device
        self.step = 0
        self._resumed_from: int | None = None
        self._skipped_in_row = 0  # optimizer steps skipped for non-finite gradients, in a row
        self._window = MetricsWindow()
        self._window_t0 = 0.0
        self._grad_norm: Tensor | None = None
        self._lr = cfg.lr
        self._iter = None
        self._pending: dict[str, Any] | None = None  # metrics line waiting for an evaluation

    # ------------------------------------------------------------------ collectives
    def _agree(self, local_signal: int, save_due: int = 0) -> tuple[int, int]:
        """MAX over ranks of [signal number, save due]; one small CPU collective per step."""
        signum, due = hdist.max_over_ranks([local_signal, save_due], group=hdist.control_group())
        return signum, due

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        hdist.ensure_control_group(env)
        if cfg.deterministic:
            # bitwise-reproducible GPU runs: no autotuned or atomics-based kernels
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # identical initial weights on every rank (DDP would broadcast rank 0's anyway)
        seed_everything(cfg.seed)
        model = self.task.build_model()
        if cfg.sync_batchnorm and env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(env.device)
        fast = effective_fast_path(cfg, env.device)
        amp, channels_last, use_compile = fast.amp, fast.channels_last, fast.compile
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        self.ddp: DDP | None = None
        train_model: nn.Module = model
        if env.distributed:
            self.ddp = DDP(
                model,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
                gradient_as_bucket_view=True,
            )
            train_model = self.ddp
        if use_compile:
            train_model = CompiledWithFallback(train_model, backend=cfg.compile_backend)
        self.train_model = train_model
        self._compile_s: float | None = None  # the first compiled step's seconds (compilation included)
        self.optimizer = build_optimizer(model, cfg, env.device)
        self.scheduler = build_scheduler(self.optimizer, cfg)

        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=(amp == "fp16"))
        self.fast_path = {"amp": amp, "channels_last": channels_last, "compile": use_compile}
        if env.is_main:
            log.info(
                "%s: amp=%s%s, channels_last=%s, compile=%s (%s)",
                env.device,
                amp,
                " + GradScaler" if amp == "fp16" else "",
                channels_last,
                use_compile,
                fast.why,
            )

        dataset = self.task.train_dataset()
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"{type(self.task).__name__}.train_dataset() returned an IterableDataset; the "
                "engine needs a map-style dataset (resumable sampling by index)"
            )
        n = len(dataset)
        self.train_samples = n
        self.sampler = ResumableDistributedSampler(
            n,
            env.world_size,
            env.rank,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            drop_last=True,
            with_sample_seeds=cfg.seed_samples,
        )
        self.batches_per_epoch = self.sampler.per_rank // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train dataset has {n} samples: {self.sampler.per_rank} per rank over "
                f"{env.world_size} rank(s), fewer than TrainConfig.batch_size={cfg.batch_size}"
            )
        self._loader_gen = torch.Generator()
        loader_kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            loader_kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch_factor)
        self.loader = make_loader(
            SeededSamples(dataset) if cfg.seed_samples else dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            collate_fn=getattr(self.task, "collate_fn", None),
            pin_memory=env.device.type == "cuda",
            drop_last=True,
            preempt_signal=cfg.preempt_signal,
            generator=self._loader_gen,
            **loader_kwargs,
        )
        self.checkpointer = Checkpointer(
            self.run.checkpoints,
            env,
            # "trainer" and "sampler" keep format 1's top-level keys (step, epoch, position, ...)
            parts={
                "trainer": _TrainerPart(self),
                "sampler": self.sampler,
                "model": self.module,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "scaler": self.scaler,
            },
            rank_parts={"rng": RngState(), "window": self._window},
            extra=_TaskExtra(self.task),
            flat=("trainer", "sampler"),
            keep_last=cfg.keep_last,
            validate=self._check_resume,
            keep_steps=cfg.snapshot_steps(),
        )

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ data
    def _next_batch(self):
        """The next batch; the sampler's position counts batches *consumed here*, not those
        DataLoader workers prefetched, so a checkpoint resumes right after the last one used."""
        sampler = self.sampler
        while True:
            if self._iter is None:
                self._loader_gen.manual_seed(mix_seed(TAG_LOADER, self.cfg.seed, sampler.epoch, self.env.rank) >> 1)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                sampler.set_epoch(sampler.epoch + 1)
                self._iter = None
                continue
            sampler.advance(self.cfg.batch_size)
            return batch

    # ------------------------------------------------------------------ one step
    def _train_step(self, step: int) -> None:
        """Optimizer step number ``step`` (1-based): grad_accum micro-batches, then update."""
        cfg = self.cfg
        batches = [self._next_batch() for _ in range(cfg.grad_accum)]
        model = self.train_model
        if isinstance(model, CompiledWithFallback) and model.compiled and self._compile_s is None:
            micro_logs = self._first_compiled_step(step, batches, model)
        else:
            micro_logs = self._accumulate(step, batches)
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad)
        if not self.scaler.is_enabled() and not self._gradients_finite():
            # fp32/bf16 have no GradScaler to skip a step whose gradients overflowed: one NaN
            # gradient would make every weight NaN (clipping multiplies by norm 0 * inf)
            self._skip_step(step)
        else:
            # fp16: the GradScaler skips a step whose scaled gradients overflowed and halves its
            # scale (routine while it calibrates); such a step's loss stays out of the metrics
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scale is not None and self.scaler.get_scale() < scale:
                self._skipped_in_row += 1
                self._window.skipped += 1
                if self._skipped_in_row >= MAX_SCALER_SKIPS_IN_ROW:
                    self._nonfinite(
                        step,
                        f"the GradScaler skipped {self._skipped_in_row} steps in a row (scale now {self.scaler.get_scale():g})",
                    )
            else:
                self._skipped_in_row = 0
                for loss, logs in micro_logs:
                    self._window.add(loss, logs)
        self._lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()  # also after a skipped step: the schedule follows the step count
        self.optimizer.zero_grad(set_to_none=True)
        self._window.steps += 1

    def _first_compiled_step(self, step: int, batches: list, model: CompiledWithFallback) -> list:
        """``_accumulate`` for the first compiled step, which compiles the forward and the backward
        graphs: timed and logged, and if either fails to compile, redone eagerly on the same
        batches with the BatchNorm statistics as they were before it."""
        start = time.perf_counter()
        buffers = [buffer.detach().clone() for buffer in self.module.buffers()]
        try:
            micro_logs = self._accumulate(step, batches)
        except Exception as error:
            model.fall_back(error)
            if self.cfg.auto_micro_batch and self.env.is_main:
                # eager needs more memory than the compiled graph the split was planned for
                log.warning(
                    "the micro-batch split (train.auto_micro_batch) assumed a compiled model; if this "
                    "run now runs out of GPU memory, run it with train.compile=false: the split is then "
                    "planned for eager"
                )
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.module.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            micro_logs = self._accumulate(step, batches)
        self._compile_s = time.perf_counter() - start
        if self.env.is_main:
            how = "compilation included" if model.compiled else f"compile failed, eager: {model.compile_error}"
            log.info("torch.compile: the first step took %.1f s (%s)", self._compile_s, how[:300])
        return micro_logs

    def _accumulate(self, step: int, batches: list) -> list:
        """Forward and backward of each micro-batch of step ``step``; gradients add up."""
        cuda = self.device.type == "cuda"
        accum = len(batches)
        micro_logs = []
        for micro, batch in enumerate(batches):
            # everything random in this micro-step is a function of (seed, rank, step, micro)
            seed_globals(mix_seed(TAG_STEP, self.cfg.seed, self.env.rank, step, micro), cuda=cuda)
            sync = self.ddp.no_sync() if self.ddp is not None and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss, logs = self.task.loss(self.train_model, batch, self.device)
                self.scaler.scale(loss / accum).backward()
            micro_logs.append((loss, logs))
        return micro_logs

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (the same answer on every rank: DDP averaged them).
        One device-to-host read per step; the clipped norm is reused when there is one."""
        norm = self._grad_norm if self.cfg.clip_grad > 0 else None
        if norm is None:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if not grads:
                return True
            norm = torch.nn.utils.get_total_norm(grads)
        return bool(torch.isfinite(norm))

    def _skip_step(self, step: int) -> None:
        self._skipped_in_row += 1
        self._window.skipped += 1
        what = f"gradients are not finite (norm {float(self._grad_norm) if self._grad_norm is not None else 'nan/inf'})"
        if self._skipped_in_row >= MAX_SKIPPED_IN_ROW:
            self._nonfinite(step, f"{what} for {self._skipped_in_row} steps in a row (each optimizer step skipped)")
        if self.env.is_main:
            log.warning(
                "step %d: %s: optimizer step skipped, weights unchanged (%d in a row)", step, what, self._skipped_in_row
            )

    # ------------------------------------------------------------------ resume / save
    def _check_resume(self, ckpt: Checkpoint) -> None:
        """Refuse a checkpoint of other model/data settings; warn about changed settings that
        make the run not bitwise equal to an uninterrupted one."""
        state, run = ckpt.state, self.run
        diffs = identity_differences(state.get("identity", {}), self._identity())
        if diffs:
            # one line: the worker prints it as the run's error
            changes = "; ".join(f"{k} checkpoint={a!r} now={b!r}" for k, a, b in diffs)
            raise IdentityMismatchError(
                f"cannot resume {run.path} from {ckpt.path.name}: model/data settings differ ({changes}); "
                "use a new run name (--run), or restore the settings the run was started with"
            )
        saved_cfg = state.get("train_config", {})
        changed = sorted(
            k for k, v in self.cfg.to_dict().items() if k not in _HARMLESS_KEYS and k in saved_cfg and saved_cfg[k] != v
        )
        saved_threads = state.get("num_threads")
        if saved_threads is not None and saved_threads != torch.get_num_threads():
            # CPU reductions split work by thread count; floats then differ in the last bits
            changed.append(f"torch threads {saved_threads}->{torch.get_num_threads()}")
        if changed and self.env.is_main:
            log.warning(
                "resuming %s with changed training settings %s; the run will not be bitwise "
                "equal to an uninterrupted one",
                run.path,
                changed,
            )

    def _resume(self) -> None:
        ckpt = self.checkpointer.load()  # restores every part, or None for a new run
        if ckpt is None:
            if self.env.is_main:
                self.run.truncate_metrics(0)
            return
        if hasattr(self.scheduler, "total_steps"):
            self.scheduler.total_steps = max(self.scheduler.total_steps, self.cfg.max_steps)
        self.step = self._resumed_from = ckpt.step
        if self.env.is_main:
            # a postponed evaluation rewrites its step's line, which must not exist yet
            self.run.truncate_metrics(self.step - 1 if self._pending is not None else self.step)

    def _save(self, step: int) -> None:
        self._check_window_finite(step)  # never a checkpoint of weights a NaN step has broken
        self.checkpointer.save(step)  # every rank waits for rank 0's write (none runs on alone)
        self._last_save_time = time.monotonic()

    def _check_window_finite(self, step: int) -> None:
        """Before a save: the losses since the last metrics line were finite on every rank (one
        small collective, only at saves; the lines themselves are checked in ``_log``)."""
        if self.cfg.nonfinite_loss != "stop":
            return
        loss_sum = self._window.sums.get("loss")
        local_bad = loss_sum is not None and not bool(torch.isfinite(torch.as_tensor(loss_sum)).all())
        if hdist.max_over_ranks([int(local_bad)], group=hdist.control_group())[0]:
            self._nonfinite(step, f"a training loss since step {step - self._window.steps + 1} is not finite")

    def _nonfinite(self, step: int, what: str) -> None:
        if self.cfg.nonfinite_loss == "warn":
            log.warning("step %d: %s (train.nonfinite_loss=warn: training on)", step, what)
            return
        last = self.checkpointer.last_path
        message = (
            f"{self.run.path}: step {step}: {what}; stopped without saving "
            f"({'the last checkpoint, ' + str(last) + ', is kept' if last else 'no checkpoint was written'}). "
            "Usual causes: a learning rate too high (train.lr), reduced precision (try train.amp=off), "
            "no gradient clipping (train.clip_grad). train.nonfinite_loss=warn trains on regardless."
        )
        log.error(message)
        raise NonFiniteLossError(message)

    def _identity(self) -> dict:
        """The task's model/data identity plus the training set's length: the saved sampler
        position means nothing over a dataset that grew or shrank (re-packed, re-labelled)."""
        return _jsonable({**self.task.identity(), "engine": {"train_samples": self.train_samples}})

    # ------------------------------------------------------------------ eval / log
    def _evaluate(self, step: int) -> dict[str, float]:
        was_training = self.module.training
        self.module.eval()
        self._progress.message(f"evaluation at step {step}")  # rank 0 only (the others' is off)
        t0 = time.monotonic()
        try:
            with torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(self.module, self.env, self.run, step)
        finally:
            self.module.train(was_training)
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self._progress.message(
            f"evaluation at step {step} done in {time.monotonic() - t0:.1f}s" + (f": {shown}" if shown else "")
        )
        return metrics

    def _log(self, step: int, eval_metrics: dict[str, float] | None, write: bool = True):
        """Reduce the window over ranks (a collective) and, on rank 0, build the metrics line;
        written now, or returned when it must wait for an evaluation (preemption)."""
        means = self._window.reduce(self.env, self.device)
        now = time.monotonic()
        elapsed = max(1e-9, now - self._window_t0)
        steps = self._window.steps
        rate = steps * self.cfg.batch_size * self.cfg.grad_accum * self.env.world_size / elapsed if steps else None
        self._window.steps = 0
        skipped, self._window.skipped = self._window.skipped, 0
        self._window_t0 = now
        loss = means.get("loss")  # all-reduced: every rank sees the same value and acts alike
        if loss is not None and not math.isfinite(loss):
            self._nonfinite(step, f"the mean training loss of steps {step - steps + 1}-{step} is {loss}")
        if not self.env.is_main:
            return None
        record: dict[str, Any] = {"step": step, "epoch": self.sampler.epoch, "lr": self._lr}
        record.update(means)
        if self._grad_norm is not None:
            record["grad_norm"] = float(self._grad_norm)
        if skipped:
            record["skipped_steps"] = skipped  # since the last line; the same on every rank
        record["samples_per_s"] = rate
        self._progress.update(step, loss, rate)
        if not write:
            return record
        self._write_record(record, eval_metrics)
        return None

    def _write_record(self, record: dict[str, Any], eval_metrics: dict[str, float] | None) -> None:
        record = dict(record)
        rate = record.pop("samples_per_s", None)
        if eval_metrics:
            record.update(eval_metrics)
        record["samples_per_s"] = rate
        record["time"] = time.time()
        self._metrics.write(record, evaluation=eval_metrics is not None)

    def _run_pending_eval(self) -> None:
        """The evaluation a preemption postponed (its step's metrics line waited for it)."""
        pending, self._pending = self._pending, None
        eval_metrics = self._evaluate(pending["step"])
        if self.env.is_main:
            self._write_record(pending, eval_metrics)

    def _write_config(self) -> None:
        existing = self.run.read_config() or {}
        existing.update(
            {
                "train": self.cfg.to_dict(),
                "identity": self._identity(),
                "engine": {
                    "world_size": self.env.world_size,
                    "launcher": self.env.launcher,
                    "backend": self.env.backend,
                    "device": str(self.device),
                    "resumed_from": self._resumed_from,
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            }
        )
        if hasattr(self.task, "describe"):
            existing["task"] = _jsonable(self.task.describe())
        self.run.write_config(existing)

    def _attach_log_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.run.logs / f"engine.rank{self.env.rank}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("hpcvp").addHandler(handler)
        if logging.getLogger("hpcvp").level == logging.NOTSET:
            logging.getLogger("hpcvp").setLevel(logging.INFO)
        return handler

    # ------------------------------------------------------------------ fit
    def fit(self) -> FitResult:
        cfg, env, run = self.cfg, self.env, self.run
        run.ensure()
        handler = self._attach_log_file()
        flag = PreemptionFlag(cfg.preempt_signal)
        if not flag.install():
            log.warning("not on the main thread: preemption signals are not handled")
        self._progress = TrainProgress(0, enabled=False)
        self._metrics = None
        try:
            self._build()
            self._resume()
            if self._resumed_from is not None:
                # in every rank's engine log: with "saved at step N" it shows no step was redone
                log.info("resumed from step %d", self._resumed_from)
            if env.is_main:
                self._write_config()
                label = f"{run.path.parent.name}/{run.path.name}"
                wandb = WandbSettings(cfg.wandb_project, label, self.cfg.to_dict()) if cfg.wandb else None
                self._metrics = MetricsWriter(run.metrics_path, wandb=wandb)
                self._progress = TrainProgress(cfg.max_steps, self.step, label, cfg.progress)
                if self._resumed_from is not None:
                    self._progress.message(f"{label}: resumed from step {self._resumed_from}")
            self.module.train()
            self._window_t0 = self._last_save_time = time.monotonic()
            return self._loop(flag)
        finally:
            flag.uninstall()
            self._progress.close()
            if self._metrics is not None:
                self._metrics.close()
            self._iter = None
            self.loader = None  # shuts down persistent DataLoader workers
            logging.getLogger("hpcvp").removeHandler(handler)
            handler.close()

    def _result(self, status: str, reason: str, signum: int = 0) -> FitResult:
        return FitResult(
            status=status,
            step=self.step,
            stop_reason=reason,
            signal=signal_name(signum) if signum else None,
            resumed_from=self._resumed_from,
            checkpoint=self.checkpointer.last_path,
        )

    def _stop_for_signal(self, signum: int, log_due: bool, eval_due: bool = False) -> FitResult:
        if eval_due:
            # No time to evaluate now: the step's line is kept in the checkpoint and written
            # after the postponed evaluation, on resume (the metrics stay as if never stopped).
            record = self._log(self.step, None, write=False)
            self._pending = hdist.broadcast_from_main(self.env, record)
        elif log_due:
            self._log(self.step, None)
        self._save(self.step)
        if self.step >= self.cfg.max_steps and not eval_due:
            return self._result("completed", f"max_steps reached ({signal_name(signum)} at the last step)", signum)
        reason = f"{signal_name(signum)} received by at least one rank; saved at step {self.step}"
        if self.env.is_main:
            self._progress.message(reason)
        log.info(reason)
        return self._result("preempted", reason, signum)

    def _loop(self, flag: PreemptionFlag) -> FitResult:
        cfg, env = self.cfg, self.env
        if self._pending is not None:
            self._run_pending_eval()
        if self.step >= cfg.max_steps:
            return self._result("completed", f"checkpoint already at step {self.step}")
        minutes = cfg.save_every_minutes * 60.0
        snapshot_steps = cfg.snapshot_steps()
        while self.step < cfg.max_steps:
            self._train_step(self.step + 1)
            self.step += 1
            step = self.step
            if hasattr(self.task, "after_step"):
                self.task.after_step(self.module, step, env)
            last = step >= cfg.max_steps
            log_due = step % cfg.log_every == 0 or last
            time_due = int(env.is_main and minutes > 0 and time.monotonic() - self._last_save_time >= minutes)
            eval_due = bool((cfg.eval_every and step % cfg.eval_every == 0) or (last and cfg.eval_at_end))
            signum, time_due = self._agree(flag.signum, time_due)
            if signum:
                return self._stop_for_signal(signum, log_due, eval_due)
            eval_metrics = None
            if eval_due:
                eval_metrics = self._evaluate(step)
                log_due = True
                signum, _ = self._agree(flag.signum)
                if signum:
                    self._log(step, eval_metrics)
                    return self._stop_for_signal(signum, log_due=False)
            if log_due:
                self._log(step, eval_metrics)
            step_due = (cfg.save_every_steps and step % cfg.save_every_steps == 0) or step in snapshot_steps
            if last or time_due or step_due:
                self._save(step)
        return self._result("completed", f"max_steps={cfg.max_steps} reached")

#!/usr/bin/env python
"""Model-throughput benchmark: train-step samples/s and peak memory of each FULL preset at 160x240.

    python tools/bench_models.py                                   # CPU (and CUDA when present)
    python tools/bench_models.py --devices cpu --batch 1 --steps 2 --variants base,cl,bf16
    python tools/bench_models.py --devices cuda --batch 16 --steps 20 --variants base,bf16,cl+bf16,compile+bf16

A train step = forward + loss + backward + AdamW step on random data of the competition's shape:
  unet           UNet(width 64, depth 4), one frame (B,3,H,W) -> 49-class logits, cross-entropy
  simvp_gsta     SimVP gSTA (hid_S 64, hid_T 512, N_S 4, N_T 8), frames 1-11 -> 12-22 RGB, MSE
  simvp_incepu   SimVP Inception-U translator, same sizes, MSE
  simvp_masks    SimVP gSTA on masks (nn.Embedding(49,16) input), 11 x 49-class logits, cross-entropy
  slot           Slot Attention autoencoder (7 slots, hid 64, full-resolution encoder), MSE
  raft_small/large  torchvision RAFT, 12 flow updates, photometric L1 through backward_warp
"Sample" = one training example (a frame, a clip or a frame pair).

Variants are "+"-joined switches: base (fp32), cl (channels_last), bf16 (autocast bf16),
compile (torch.compile of the model). Every (model, variant, device) runs in its own subprocess
so peak memory is per configuration and compile caches do not leak:
  CUDA: torch.cuda.max_memory_allocated() over the timed steps (includes weights + optimizer state).
  CPU:  resource.getrusage(RUSAGE_SELF).ru_maxrss of the subprocess, reported as the peak RSS and
        as the increase over the RSS right after building the model and the batch (= activations,
        gradients, optimizer state and allocator overhead of training).
Step time is the median over the timed steps (after warmup steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ["unet", "simvp_gsta", "simvp_incepu", "simvp_masks", "slot", "raft_small", "raft_large"]
SWITCHES = {"base", "cl", "bf16", "compile"}
DEFAULT_OUT = Path("/work/bench_results/models.md")
HEIGHT, WIDTH = 160, 240


def build_case(name: str, batch: int, device):
    """Return (model, batch_tensors, loss_fn(model, batch) -> loss)."""
    import torch
    import torch.nn.functional as F

    from hpcvp.models import SimVP, SlotAttentionAutoEncoder, UNet, backward_warp, build_raft, preset

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    def labels(*shape):
        return torch.randint(0, 49, shape, generator=gen).to(device)

    if name == "unet":
        model = UNet(**preset("unet", "full"))
        data = {"image": rand(batch, 3, HEIGHT, WIDTH), "mask": labels(batch, HEIGHT, WIDTH)}

        def loss_fn(m, d):
            return F.cross_entropy(m(d["image"]).float(), d["mask"])

    elif name in ("simvp_gsta", "simvp_incepu"):
        model = SimVP(height=HEIGHT, width=WIDTH, translator=name.split("_")[1], **preset("simvp", "full"))
        data = {"inputs": rand(batch, 11, 3, HEIGHT, WIDTH), "targets": rand(batch, 11, 3, HEIGHT, WIDTH)}

        def loss_fn(m, d):
            return F.mse_loss(m(d["inputs"]).float(), d["targets"])

    elif name == "simvp_masks":
        model = SimVP(
            channels=49, out_channels=49, height=HEIGHT, width=WIDTH, mask_embedding=True, **preset("simvp", "full")
        )
        data = {"inputs": labels(batch, 11, HEIGHT, WIDTH), "targets": labels(batch, 11, HEIGHT, WIDTH)}

        def loss_fn(m, d):
            return F.cross_entropy(m(d["inputs"]).float().flatten(0, 1), d["targets"].flatten(0, 1))

    elif name == "slot":
        model = SlotAttentionAutoEncoder(HEIGHT, WIDTH, **preset("slot", "full"))
        data = {"image": rand(batch, 3, HEIGHT, WIDTH)}

        def loss_fn(m, d):
            return F.mse_loss(m(d["image"])["recon"].float(), d["image"])

    elif name in ("raft_small", "raft_large"):
        model = build_raft(name.split("_")[1])
        data = {"image0": rand(batch, 3, HEIGHT, WIDTH), "image1": rand(batch, 3, HEIGHT, WIDTH)}

        def loss_fn(m, d):
            # 160x240 is divisible by 8 and >= 128: no padding needed.
            flows = m(d["image0"] * 2 - 1, d["image1"] * 2 - 1, num_flow_updates=12)
            total = 0.0
            for i, flow in enumerate(flows):
                warped = backward_warp(d["image1"], flow.float())
                total = total + 0.8 ** (len(flows) - 1 - i) * (warped - d["image0"]).abs().mean()
            return total

    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    return model.to(device), data, loss_fn


def run_single(args) -> dict:
    """Benchmark one (model, variant, device) in this process; returns a JSON-able result."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    switches = set(args.variant.split("+"))
    unknown = switches - SWITCHES
    if unknown:
        raise SystemExit(f"unknown switch(es) {sorted(unknown)} in variant {args.variant!r}; use {sorted(SWITCHES)}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, data, loss_fn = build_case(args.model, args.batch, device)
    params = sum(p.numel() for p in model.parameters())
    if "cl" in switches:
        model = model.to(memory_format=torch.channels_last)
        data = {
            k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
            for k, v in data.items()
        }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if "compile" in switches else model
    model.train()
    use_bf16 = "bf16" in switches

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(step_model, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for _ in range(args.warmup):
        train_step()
    sync()
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    loss = float("nan")
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result = {
        "model": args.model,
        "variant": args.variant,
        "device": args.device,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "params_m": params / 1e6,
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "warmup_s": warmup_s,
        "samples_per_s": args.batch / step_s,
        "loss": loss,
    }
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        result["peak_mem_mb"] = peak_kb / 1024
        result["train_mem_delta_mb"] = (peak_kb - rss_before_kb) / 1024
    return result


def machine_description() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_subprocess(model: str, variant: str, device: str, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--single",
        "--model",
        model,
        "--variant",
        variant,
        "--device",
        device,
        "--batch",
        str(args.batch_for(device)),
        "--steps",
        str(args.steps_for(device)),
        "--warmup",
        str(args.warmup),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load_before = loadavg()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {
            "model": model,
            "variant": variant,
            "device": device,
            "error": f"timeout after {args.timeout}s",
            "load": load_before,
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["load"] = f"{load_before} -> {loadavg()}"
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": model, "variant": variant, "device": device, "error": tail[:160], "load": load_before}


def markdown(results: list[dict], info: dict, argv: list[str], args) -> str:
    lines = [
        f"## Model train-step throughput, full presets at {HEIGHT}x{WIDTH} ({info['date']})",
        "",
        f"- Machine: {info['host']}, {info['cpu']}, {info['cores']} logical cores"
        + (f", GPU {info['gpu']}" if "gpu" in info else ", no GPU")
        + f"; Python {info['python']}, torch {info['torch']}",
        f"- Command: `python tools/bench_models.py {' '.join(argv)}`",
        f"- Step = forward + loss + backward + AdamW; median of the timed steps after {args.warmup} warmup step(s).",
        "- Peak memory: CUDA `max_memory_allocated`; CPU `ru_maxrss` of the per-configuration subprocess "
        "(peak RSS, and in brackets its increase over the RSS after building the model and batch).",
        "- Load = 1-min load average before -> after each run: this machine is shared; above the core count the "
        "CPU numbers are mostly noise.",
        "",
        "- vs base = samples/s over the same model's `base` (eager fp32, NCHW) row on the same device; warmup = "
        "the untimed first step(s), torch.compile's compilation included.",
        "",
        "| model | params (M) | device | variant | batch | threads | steps | s/step (min-max) | samples/s | vs base "
        "| warmup s | peak mem MB | load |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    base = {
        (r["model"], r["device"]): r["samples_per_s"] for r in results if "error" not in r and r["variant"] == "base"
    }
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['model']} | | {r['device']} | {r['variant']} | | | | error: {r['error']} | | | | | {r['load']} |"
            )
            continue
        mem = f"{r['peak_mem_mb']:.0f}"
        reference = base.get((r["model"], r["device"]))
        ratio = f"{r['samples_per_s'] / reference:.2f}x" if reference else "-"
        if "train_mem_delta_mb" in r:
            mem += f" (+{r['train_mem_delta_mb']:.0f})"
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f} | {r['device']} | {r['variant']} | {r['batch']} | {r['threads']} "
            f"| {r['steps']} | {r['step_s']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) "
            f"| {r['samples_per_s']:.3f} | {ratio} | {r.get('warmup_s', float('nan')):.1f} | {mem} | {r['load']} |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu plus cuda when available")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list of '+'-joined switches (base, cl, bf16, compile); "
        "default CPU: base,cl,bf16; CUDA: base,cl,bf16,cl+bf16,compile+bf16",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="comma list of model:variant pairs to run instead of every --models x --variants pair "
        "(e.g. unet:base,unet:cl+bf16: what tools/gpu_check.sh fits in its minutes)",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default CPU 1, CUDA 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default CPU 2, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile needs >= 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown output (default {DEFAULT_OUT})")
    parser.add_argument("--append", action="store_true", help="append a section to --out instead of replacing it")
    # Internal: run one configuration in this process and print its JSON.
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="base", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_for = lambda device: args.batch or (16 if device == "cuda" else 1)
    args.steps_for = lambda device: args.steps or (20 if device == "cuda" else 2)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.single:
        if args.batch is None:
            args.batch = args.batch_for(args.device)
        if args.steps is None:
            args.steps = args.steps_for(args.device)
        print(json.dumps(run_single(args)), flush=True)
        return 0

    import torch

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {MODELS}")
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if "cuda" in devices and not torch.cuda.is_available():
            raise SystemExit("--devices cuda requested but torch.cuda.is_available() is False on this machine")
    info = machine_description()
    plan = []
    for device in devices:
        if args.configs:
            pairs = [pair.strip().split(":", 1) for pair in args.configs.split(",") if pair.strip()]
            for pair in pairs:
                if len(pair) != 2 or pair[0] not in MODELS:
                    raise SystemExit(f"--configs: {':'.join(pair)!r} is not model:variant with a model from {MODELS}")
            plan += [(device, model, variant) for model, variant in pairs]
            continue
        variants = args.variants or ("base,cl,bf16,cl+bf16,compile+bf16" if device == "cuda" else "base,cl,bf16")
        plan += [(device, m, v.strip()) for m in models for v in variants.split(",") if v.strip()]
    # --append adds to what --out held before this run; the table is rewritten after every
    # configuration, so a run cut short (a time limit) keeps the rows it finished
    before = args.out.read_text() if args.append and args.out.exists() else None
    results = []
    for device, model, variant in plan:
        result = run_subprocess(model, variant, device, args)
        results.append(result)
        shown = (
            f"{result['samples_per_s']:.3f} samples/s, {result['step_s']:.2f} s/step, "
            f"peak {result['peak_mem_mb']:.0f} MB"
            if "error" not in result
            else result["error"]
        )
        print(f"{device} {model} {variant}: {shown} (load {result['load']})", flush=True)
        table = markdown(results, info, argv, args)
        write_atomic(args.out, table if before is None else before + "\n" + table)
    print()
    print(table)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

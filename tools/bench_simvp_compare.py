#!/usr/bin/env python
"""SimVP-gSTA train step, side by side: the full preset's defaults vs the reference way to run it.

    python tools/bench_simvp_compare.py --device cpu --threads 1 --batch 1 --steps 4
    python tools/bench_simvp_compare.py --device cuda --batch 16 --steps 20 --out BENCHMARKS.md --append

Two copies of the same network (hid_S 64, hid_T 512, N_S 4, N_T 8, 11 frames of 160x240, same
initial weights) train in one process, one step each in turn (alternating, so load spikes hit
both alike):
  reference  eager fp32, NCHW, ``torch.optim.AdamW`` with its default arguments
  hpcvp      the `full` preset's defaults on this device (hpcvp.train.fastpath: amp,
             channels_last, torch.compile through CompiledWithFallback) and hpcvp's optimizer
Before timing, both forward the same input in fp32 eager and their outputs must agree (it is one
network). Reports the median step of each, their ratio, the compile time (the first step), and
whether compiling pays back within 2 % of a 30,000-step run. ``--tiny`` shrinks the network and
frames to test the plumbing in seconds.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each (alternating)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--mode", choices=("frames", "masks"), default="frames")
    parser.add_argument("--tiny", action="store_true", help="small network and frames (plumbing check)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="override the default")
    parser.add_argument("--max-steps", type=int, default=30000, help="full run length for the pay-back rule")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from hpcvp.models import SimVP, preset
    from hpcvp.train.config import TrainConfig
    from hpcvp.train.fastpath import CompiledWithFallback, compile_pays_back, device_fast_path
    from hpcvp.train.optim import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fast = device_fast_path(device)
    use_compile = fast.compile if args.compile == "auto" else args.compile == "on"
    height, width = (32, 48) if args.tiny else (160, 240)
    sizes = {"hid_S": 8, "hid_T": 32, "N_S": 2, "N_T": 2} if args.tiny else preset("simvp", "full")
    masks = args.mode == "masks"
    kwargs = dict(height=height, width=width, **sizes)
    if masks:
        kwargs.update(channels=49, out_channels=49, mask_embedding=True)
    torch.manual_seed(0)
    reference = SimVP(**kwargs).to(device)
    ours = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(0)
    if masks:
        inputs = torch.randint(0, 49, (args.batch, 11, height, width), generator=gen).to(device)
        targets = torch.randint(0, 49, (args.batch, 11, height, width), generator=gen).to(device)

        def loss_fn(out):
            return F.cross_entropy(out.float().flatten(0, 1), targets.flatten(0, 1))
    else:
        inputs = torch.rand(args.batch, 11, 3, height, width, generator=gen).to(device)
        targets = torch.rand(args.batch, 11, 3, height, width, generator=gen).to(device)

        def loss_fn(out):
            return F.mse_loss(out.float(), targets)

    with torch.no_grad():  # one network: same outputs before any training
        torch.testing.assert_close(ours(inputs), reference(inputs), rtol=1e-4, atol=1e-5)

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-4)
    if fast.channels_last:
        ours.to(memory_format=torch.channels_last)
    our_opt = build_optimizer(ours, TrainConfig(lr=1e-4), device)
    our_model = CompiledWithFallback(ours) if use_compile else ours
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(fast.amp)  # the preset's amp=fast
    scaler = torch.amp.GradScaler(device.type, enabled=fast.amp == "fp16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ref_step():
        loss = loss_fn(reference(inputs))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    def our_step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(our_model(inputs))
        scaler.scale(loss).backward()
        scaler.step(our_opt)
        scaler.update()
        our_opt.zero_grad(set_to_none=True)

    def timed(step):
        sync()
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    load_start = os.getloadavg()
    first_ours = timed(our_step)  # compile happens here
    first_ref = timed(ref_step)
    ref_times, our_times = [], []
    for i in range(args.steps):
        order = (ref_step, our_step) if i % 2 == 0 else (our_step, ref_step)
        for step in order:
            (ref_times if step is ref_step else our_times).append(timed(step))
    load_end = os.getloadavg()
    ref_s, our_s = statistics.median(ref_times), statistics.median(our_times)
    compile_s = getattr(our_model, "compile_seconds", None)
    compiled = getattr(our_model, "compiled", False)
    pays = compile_pays_back(max(first_ours - first_ref, 0.0), ref_s, our_s, args.max_steps) if compiled else None
    peak = ""
    if device.type == "cuda":
        peak = f", peak memory {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB (both models)"
    settings = (
        f"amp={fast.amp}, channels_last={fast.channels_last}, compile={compiled}"
        f"{' (failed: ' + our_model.compile_error[:80] + ')' if use_compile and not compiled else ''}"
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    row = (
        f"| {now} | {name} | simvp_gsta {args.mode}{' (tiny)' if args.tiny else ''} | {args.batch} | "
        f"{args.threads or torch.get_num_threads()} | {ref_s:.3f} | {our_s:.3f} | **{ref_s / our_s:.2f}x** | {settings} | "
        f"{f'{compile_s:.1f} s' if compile_s is not None else '-'} "
        f"{'' if pays is None else ('(pays back)' if pays else '(does not pay back in 2 %)')} | "
        f"{load_start[0]:.1f} -> {load_end[0]:.1f} |"
    )
    header = (
        "| date | device | model | batch | threads | reference eager fp32 s/step | hpcvp full defaults s/step "
        "| speed-up | hpcvp settings | first step (compile) | load |\n|---|---|---|---:|---:|---:|---:|---:|---|---|---|"
    )
    print(header)
    print(row + peak)
    print(f"steps: reference {[round(t, 3) for t in ref_times]}, hpcvp {[round(t, 3) for t in our_times]}")
    if args.out is not None:
        text = (header + "\n" if not args.append else "") + row + "\n" + (f"\n{peak.lstrip(', ')}\n" if peak else "")
        with open(args.out, "a" if args.append else "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step cost of an unrolled VarNet-style network at clinical size (issue #9).

One optimizer step (forward, loss, backward, Adam) of an ``Unrolled`` network with gradient
DC (VarNet/E2E style: 8 cascades, an unshared U-Net per cascade) on multi-coil MRI data,
320x320, 15 coils, 4x equispaced mask. Variants: float32; bf16 autocast (AMP, CUDA); with
gradient checkpointing of each cascade. Memory: on CUDA the peak allocated during a step;
on every device the bytes of the tensors autograd saves for the backward pass (measured
with ``torch.autograd.graph.saved_tensors_hooks``), which is what checkpointing trades
for recomputation.

    python scripts/bench_training.py                       # CPU (small default: batch 1)
    python scripts/bench_training.py --device cuda --amp   # GPU, float32 and bf16 AMP
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from fedrecon.operators import EquispacedMask, MultiCoilMRI, birdcage_maps

from fedrecon.models.factory import ModelConfig, build_model


def _problem(size: int, coils: int, batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    maps = birdcage_maps(coils, size)
    mask = EquispacedMask(0.08, 4, seed=0)((size, size), offset=0).mask  # (1, W)
    op = MultiCoilMRI(maps[None].expand(batch, -1, -1, -1).contiguous(),
                      mask.expand(size, size)[None].expand(batch, -1, -1).contiguous()).to(device)
    x = torch.randn(batch, size, size, generator=gen, dtype=torch.complex64).to(device)
    return op, op.A(x), x


@contextlib.contextmanager
def _saved_bytes(counter: list[int]):
    def pack(t: torch.Tensor):
        counter[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args: argparse.Namespace, checkpointing: bool, amp: bool) -> dict[str, float]:
    device = torch.device(args.device)
    cfg = ModelConfig(dc="gradient", n_iter=args.cascades, share_weights=False, chans=args.chans,
                      num_pools=4, checkpointing=checkpointing)
    model = build_model(cfg, complex_images=True).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    op, y, target = _problem(args.size, args.coils, args.batch, device)
    times, saved = [], [0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        counter = [0]
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if amp
                    else contextlib.nullcontext())
        with autocast, _saved_bytes(counter):
            out = model(y, op)
            loss = (out - target).abs().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            saved[0] = counter[0]
    row = {"step_s": statistics.median(times), "saved_mib": saved[0] / 2**20,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.type == "cuda":
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--coils", type=int, default=15)
    p.add_argument("--cascades", type=int, default=8)
    p.add_argument("--chans", type=int, default=18, help="U-Net channels (E2E VarNet: 18)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="also run bf16 autocast (CUDA)")
    args = p.parse_args(argv)
    variants = [("float32", False, False), ("float32 + checkpointing", True, False)]
    if args.amp:
        variants += [("bf16 AMP", False, True), ("bf16 AMP + checkpointing", True, True)]
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# training step: {name}, torch {torch.__version__}; {args.size}x{args.size}, "
          f"{args.coils} coils, batch {args.batch}, {args.cascades} cascades, U-Net {args.chans} ch "
          f"(4 pools), gradient DC; median of {args.steps} steps after {args.warmup} warm-up")
    rows = [(label, bench(args, ckpt, amp)) for label, ckpt, amp in variants]
    peak = "peak GPU MiB |" if dev.type == "cuda" else ""
    print(f"| variant | step (s) | saved for backward (MiB) | {peak} params (M) |")
    print("|---|---:|---:|" + ("---:|" if peak else "") + "---:|")
    for label, r in rows:
        extra = f" {r['peak_mib']:.0f} |" if peak else ""
        print(f"| {label} | {r['step_s']:.3f} | {r['saved_mib']:.0f} |{extra} {r['params_m']:.2f} |")
    base = rows[0][1]
    ck = rows[1][1]
    print(f"checkpointing: saved activations {base['saved_mib']:.0f} -> {ck['saved_mib']:.0f} MiB "
          f"({base['saved_mib'] / max(ck['saved_mib'], 1e-9):.1f}x less), step time "
          f"{ck['step_s'] / base['step_s']:.2f}x")


if __name__ == "__main__":
    main()

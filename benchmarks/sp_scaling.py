"""Sequence-parallel scaling of one DiT step: degree N against one device, under torchrun.

    torchrun --nproc-per-node 8 -m fastdit.benchmarks.sp_scaling --preset wan2.1-1.3b --size 480x832x81 \\
        --ulysses 4 --ring 2

Every rank builds the same random-weight DiT and the same batch (one 480p video by default, or
``--cfg 2`` for a CFG pair); rank 0 first times the unsharded step on its own device (the
one-device baseline, skip with ``--no-baseline``), then all ranks time the sequence-parallel
step. Reported: step time, the speedup over one device and the scaling efficiency
``t_1 / (N t_N)``, plus the communication volume per rank the docs' model predicts. NCCL on
GPUs (one per rank, ``LOCAL_RANK``), gloo on CPUs. Results go to ``--out`` as JSON (and a PNG).
"""

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from fastdit.benchmarks.dit_step import latent_shape
from fastdit.benchmarks.harness import Report, default_out_dir, measure_ceilings, peak_memory_gib, time_ms
from fastdit.models import DiT, PackedBatch, preset
from fastdit.runtime.parallel import apply_sequence_parallel
from fastdit.sizes import parse_size


def comm_bytes_per_rank(tokens: int, hidden: int, layers: int, ulysses: int, ring: int, itemsize: int) -> dict:
    """The docs' model, per step and rank: Ulysses all-to-all of q, k, v and the output (each rank
    sends (U-1)/U of its 4 * N * C / P elements); Ring passes K and V of its ring shard P_r - 1
    times (2 * N_r * C * (P_r - 1) / P_r, N_r the tokens one Ulysses group holds)."""
    degree = ulysses * ring
    a2a = 4 * tokens * hidden / degree * (ulysses - 1) / ulysses if ulysses > 1 else 0.0
    per_ring_tokens = tokens  # the ring carries every ring shard of its head slice
    ring_bytes = 2 * per_ring_tokens * (hidden / ulysses) * (ring - 1) / ring if ring > 1 else 0.0
    return {"ulysses_bytes": a2a * layers * itemsize, "ring_bytes": ring_bytes * layers * itemsize}


def time_collective_ms(fn, device: torch.device, *, budget_s: float, min_runs: int = 3, max_runs: int = 100) -> float:
    """Median milliseconds of ``fn()``, a step made of collectives, with every rank calling it the
    same number of times. A per-rank budget loop (``time_ms``, triton's ``do_bench``) lets each
    rank pick its own count: a rank that stops early leaves its peers inside a ring exchange (gloo
    aborts, NCCL hangs). So the count comes from the slowest rank's first timed call."""
    cuda = device.type == "cuda"

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    first = torch.tensor([timed()], dtype=torch.float64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    runs = max(min_runs, min(max_runs, int(budget_s * 1e3 / max(float(first.item()), 1e-3))))
    dist.barrier()
    return statistics.median(timed() for _ in range(runs))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--size", default=None, help="HEIGHTxWIDTHxFRAMES in pixels (default 480x832x81 on CUDA)")
    parser.add_argument("--text-len", type=int, default=None)
    parser.add_argument("--ulysses", type=int, default=None, help="default: the world size")
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--cfg", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", default=default_out_dir(), help="directory for the JSON results")
    parser.add_argument("--budget-s", type=float, default=5.0, help="seconds of timed steps per row (after 3 runs)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    ulysses = args.ulysses or world // (args.ring * args.cfg)
    name = args.preset or ("wan2.1-1.3b" if cuda else "tiny")
    height, width, frames = (
        parse_size(args.size, frames="required") if args.size else ((480, 832, 81) if cuda else (64, 96, 9))
    )
    text_len = args.text_len or (512 if cuda else 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = preset(name)

    torch.manual_seed(0)
    model = DiT(config).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(0)
    shape = latent_shape(config, frames, height, width)
    latents = [torch.randn(*shape, generator=gen).to(device, dtype) for _ in range(args.cfg)]
    texts = [torch.randn(text_len, config.text_dim, generator=gen).to(device, dtype) for _ in range(args.cfg)]
    batch = PackedBatch.from_samples(latents, torch.full((args.cfg,), 500.0, device=device), texts, config.patch_size)
    tokens = batch.tokens.shape[0]
    label = f"{name} {height}x{width}x{frames} S={tokens} cfg={args.cfg}"
    report = Report("sp_scaling", device, measure_ceilings(device, quick=True)) if rank == 0 else None

    baseline_ms = None
    if rank == 0 and not args.no_baseline:
        with torch.inference_mode():
            step = lambda: model.forward_packed(batch)  # noqa: E731
            baseline_ms = time_ms(step, device, warmup=1, min_runs=3, budget_s=args.budget_s)
        report.add("1 device", label, baseline_ms, peak_gib=peak_memory_gib(device))
        print(f"1 device: {baseline_ms:.2f} ms", flush=True)
    dist.barrier()

    sp = apply_sequence_parallel(model, ulysses=ulysses, ring=args.ring, cfg=args.cfg)
    with torch.inference_mode():
        sp.forward_packed(batch)  # warm up (kernels compile, NCCL connects)
        dist.barrier()
        ms = time_collective_ms(lambda: sp.forward_packed(batch), device, budget_s=args.budget_s)
    times = [torch.zeros(1, device=device) for _ in range(world)]
    dist.all_gather(times, torch.tensor([ms], device=device))  # NCCL: CUDA tensors on both sides
    slowest = max(float(t.item()) for t in times)
    if rank == 0:
        comm = comm_bytes_per_rank(tokens // args.cfg, config.hidden, config.num_layers, ulysses, args.ring,
                                   dtype.itemsize)  # fmt: skip
        extra = {"world": world, "ulysses": ulysses, "ring": args.ring, "cfg": args.cfg, **comm}
        if baseline_ms is not None:
            extra["speedup"] = round(baseline_ms / slowest, 3)
            extra["efficiency"] = round(baseline_ms / (world * slowest), 3)
        report.add(f"{world} ranks U={ulysses} R={args.ring} cfg={args.cfg}", label, slowest, **extra)
        print(report.table(), flush=True)
        print("wrote " + ", ".join(report.write(args.out)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

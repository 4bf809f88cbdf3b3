"""Memory-bound DiT glue, provider by provider: 3D RoPE on q and k, adaLN modulation, the gated
residual and the fused residual + modulation, forward and backward.

Providers: eager PyTorch written the way Wan / diffusers write it (RoPE as a complex multiply with
a precomputed per-token table; FP32 LayerNorm then ``x * (1 + scale) + shift``), the same under
torch.compile, each fastdit backend the dispatcher may pick on this device (``fastdit-<backend>``:
on CPUs the ``torch`` backend; never the reference oracle, never Triton's CPU interpreter), and
``copy``: a copy of the same bytes. All are timed in the same interleaved rounds. GB/s counts the
fewest bytes the op must move (each input read once, each output written once); ``pct_of_copy``
is the same-bytes copy's time over the provider's, so 100% is the copy's own speed and a row
above it would be a bug in the benchmark.

Sizes: every tensor is far larger than the L2 (the run records the CPU's cache sizes and, per row,
how many L2s its largest tensor spans). CUDA bf16, S = 32760 tokens (21x30x52), 24 heads x 128,
C = 3072; CPU fp32, S = 8192 tokens (8x32x32), 16 heads x 64, C = 1024 (32 MiB per tensor).
"""

import argparse

import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.benchmarks.harness import Candidate, Report, cpu_caches, measure_ceilings, selectable_backends
from fastdit.reference.rope3d import rope3d_angles, wan_axes_dim

OPS = ("rope3d_qk", "adaln_modulate", "gated_residual", "gated_residual_modulate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mem-ops", default=",".join(OPS), help=f"memory_ops: comma list of {OPS}")
    parser.add_argument("--mem-grid", default=None, help="memory_ops: T,H,W latent patch grid (default 21,30,52)")


def _wan_rope_eager(x, freqs):
    """Wan's original: complex multiply by a precomputed (S, 1, D/2) complex64 table, fp32 math."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def _rope_pair_eager(q, k, freqs):
    return _wan_rope_eager(q, freqs), _wan_rope_eager(k, freqs)


def _modulate_eager(x, shift, scale, eps=1e-6):
    return (F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale) + shift).type_as(x)


def _residual_eager(res, y, gate):
    return (res.float() + y * gate).type_as(res)


def _residual_modulate_eager(res, y, gate, shift, scale):
    r = _residual_eager(res, y, gate)
    return r, _modulate_eager(r, shift, scale)


# Relative (norm) error a provider may have against fastdit's reference op: the output's own
# rounding (bf16: 2^-9 relative RMS) with room for the fp32 statistics' summation order.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def run(args: argparse.Namespace, device: torch.device) -> Report:
    # Timing a backward repeatedly needs retain_graph=True, which compiled graphs with donated
    # buffers refuse; donation saves memory, not time, so turn it off for the measurement.
    import torch._functorch.config as functorch_config

    with functorch_config.patch(donated_buffer=False):
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> Report:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = tuple(int(v) for v in args.mem_grid.split(",")) if args.mem_grid else ((21, 30, 52) if cuda else (8, 32, 32))
    heads, head_dim = (24, 128) if cuda else (16, 64)
    channels = heads * head_dim
    seqlen = grid[0] * grid[1] * grid[2]
    size = dtype.itemsize
    report = Report("memory_ops", device, measure_ceilings(device, quick=args.quick))
    wanted = [o.strip() for o in args.mem_ops.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown memory ops {unknown}; choose from {OPS}")
    tensor_bytes = seqlen * channels * size
    l2 = cpu_caches().get("L2") if not cuda else torch.cuda.get_device_properties(device).L2_cache_size
    l2_multiple = round(tensor_bytes / l2, 1) if l2 else None
    if l2 and tensor_bytes < 8 * l2:
        print(f"  memory_ops: note: tensors of {tensor_bytes / 2**20:.1f} MiB are within 8x the L2 ({l2 / 2**20:.1f} "
              "MiB): rows compare cache-resident work (each against a copy of its own bytes)")  # fmt: skip

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=gen).to(device, dt).requires_grad_(grad)

    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    grid_thw = torch.tensor([grid], dtype=torch.int32, device=device)
    base = {"device": device, "dtype": dtype, "y_dtype": dtype, "head_dim": head_dim, "interleaved": True,
            "channels": channels, "norm": "layer", "per_token": False}  # fmt: skip
    timing = {"budget_s": 0.3 if args.quick else 2.0}
    tolerance = TOLERANCE[dtype]
    extra = {"l2_multiple": l2_multiple}

    def compare(op, shape, providers, nbytes_fwd, nbytes_bwd, grads, inputs):
        """The forward of every provider in one interleaved run (checked against fastdit's
        reference op, float32 math), then the backward of the same graphs (gradients checked too)."""
        want_out, want_grads = _reference(op, inputs, grads)
        fwd = [Candidate(name, fn, nbytes=nbytes_fwd, extra=extra) for name, fn in providers.items()]
        rows = report.compare(f"{op} fwd {shape}", fwd, reference=want_out, tolerance=tolerance, timing=timing,
                              copy_bytes=nbytes_fwd)  # fmt: skip
        bwd = []
        grads = grads if isinstance(grads, tuple) else (grads,)
        for name, fn in providers.items():
            if rows[name]["status"] != "ok":
                continue
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            backward = lambda outs=outs: torch.autograd.grad(outs, inputs, grads, retain_graph=True)  # noqa: E731
            bwd.append(Candidate(name, backward, nbytes=nbytes_bwd, extra=extra))
        report.compare(f"{op} bwd {shape}", bwd, reference=want_grads, tolerance=tolerance, timing=timing,
                       copy_bytes=nbytes_bwd)  # fmt: skip
        for name, row in rows.items():
            if row["status"] == "ok":
                print(f"  {op} {name}: fwd {row['ms']:.3f} ms, {row['pct_of_copy']}% of a same-bytes copy", flush=True)

    def _reference(op, inputs, grads):
        leaves = [t.detach().requires_grad_() for t in inputs]
        if op == "rope3d_qk":
            outs = ops.rope3d_qk(*leaves, grid_thw, cu, backend="reference")
        elif op == "adaln_modulate":
            outs = (ops.adaln_modulate(*leaves, cu, backend="reference"),)
        elif op == "gated_residual":
            outs = (ops.gated_residual(*leaves, cu, backend="reference"),)
        else:
            outs = ops.gated_residual_modulate(*leaves, cu, backend="reference")
        grads = grads if isinstance(grads, tuple) else (grads,)
        want_grads = torch.autograd.grad(outs, leaves, grads)
        return tuple(o.detach() for o in outs), want_grads

    def fastdit(op, call):
        return {f"fastdit-{name}": (lambda name=name: call(name)) for name in selectable_backends(op, base)}

    if "rope3d_qk" in wanted:
        q, k = rand(seqlen, heads, head_dim), rand(seqlen, heads, head_dim)
        angle = rope3d_angles(grid_thw, cu, seqlen, theta=10000.0, axes_dim=wan_axes_dim(head_dim))
        freqs = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[:, None, :]
        shape = f"S={seqlen} H={heads} D={head_dim}"
        nbytes = 4 * seqlen * channels * size
        grads = (torch.randn_like(q), torch.randn_like(k))
        compiled = torch.compile(_rope_pair_eager)
        providers = {"eager": lambda: _rope_pair_eager(q, k, freqs), "torch.compile": lambda: compiled(q, k, freqs),
                     **fastdit("rope3d_qk", lambda b: ops.rope3d_qk(q, k, grid_thw, cu, backend=b))}  # fmt: skip
        compare("rope3d_qk", shape, providers, nbytes, nbytes, grads, (q, k))

    x, y = rand(seqlen, channels), rand(seqlen, channels)
    shift, scale, gate = (rand(1, channels, dt=torch.float32) for _ in range(3))
    g1, g2 = torch.randn_like(x), torch.randn_like(x)
    shape = f"S={seqlen} C={channels}"
    row = seqlen * channels * size

    if "adaln_modulate" in wanted:
        compiled = torch.compile(_modulate_eager)
        args3 = (x, shift, scale)
        ours = fastdit("adaln_modulate", lambda b: ops.adaln_modulate(x, shift, scale, cu, backend=b))
        providers = {"eager": lambda: _modulate_eager(*args3), "torch.compile": lambda: compiled(*args3), **ours}
        compare("adaln_modulate", shape, providers, 2 * row, 3 * row, g1, args3)

    if "gated_residual" in wanted:
        compiled = torch.compile(_residual_eager)
        args3 = (x, y, gate)
        # backward: read g and y, write dy (dres is g itself): 3 passes
        providers = {"eager": lambda: _residual_eager(*args3), "torch.compile": lambda: compiled(*args3),
                     **fastdit("gated_residual", lambda b: ops.gated_residual(x, y, gate, cu, backend=b))}  # fmt: skip
        compare("gated_residual", shape, providers, 3 * row, 3 * row, g1, args3)

    if "gated_residual_modulate" in wanted:
        compiled = torch.compile(_residual_modulate_eager)
        args5 = (x, y, gate, shift, scale)
        # fwd: read res, y; write r, modulated. bwd: read g_r, g_mod, r, y; write dres, dy.
        providers = {
            "eager": lambda: _residual_modulate_eager(*args5),
            "torch.compile": lambda: compiled(*args5),
            **fastdit("gated_residual_modulate",
                      lambda b: ops.gated_residual_modulate(x, y, gate, shift, scale, cu, backend=b)),
        }  # fmt: skip
        compare("gated_residual_modulate", shape, providers, 4 * row, 6 * row, (g1, g2), args5)
    return report

"""Memory-bound DiT glue, provider by provider: 3D RoPE on q and k, adaLN modulation, the gated
residual and the fused residual + modulation, forward and backward.

Providers: eager PyTorch written the way Wan / diffusers write it (RoPE as a complex multiply with
a precomputed per-token table; FP32 LayerNorm then ``x * (1 + scale) + shift``), the same under
torch.compile, and each fastdit backend that can run (reference excluded: it is the oracle, not a
contender). GB/s counts the fewest bytes the op must move (each input read once, each output
written once) over the measured time; % is of the device copy bandwidth measured in the same run.
Every tensor at the default sizes is far larger than L2, so no input rotation is needed.

Defaults: CUDA bf16, S = 32760 tokens (21x30x52), 24 heads x 128, C = 3072; CPU fp32 small shapes.
"""

import argparse

import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.benchmarks.harness import Report, measure_ceilings, runnable_backends
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
    grid = tuple(int(v) for v in args.mem_grid.split(",")) if args.mem_grid else ((21, 30, 52) if cuda else (4, 8, 8))
    heads, head_dim = (24, 128) if cuda else (4, 64)
    channels = heads * head_dim
    seqlen = grid[0] * grid[1] * grid[2]
    size = dtype.itemsize
    report = Report("memory_ops", device, measure_ceilings(device, quick=args.quick))
    wanted = [o.strip() for o in args.mem_ops.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in OPS]
    if unknown:
        raise SystemExit(f"unknown memory ops {unknown}; choose from {OPS}")

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype, grad=True):
        return torch.randn(*shape, generator=gen).to(device, dt).requires_grad_(grad)

    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    grid_thw = torch.tensor([grid], dtype=torch.int32, device=device)
    base = {"device": device, "dtype": dtype, "y_dtype": dtype, "head_dim": head_dim, "interleaved": True}

    budget_s = 0.2 if args.quick and not cuda else 2.0
    tolerance = TOLERANCE[dtype]
    references: dict[str, tuple] = {}

    def record(op, provider, shape, fwd, nbytes_fwd, nbytes_bwd, grads, inputs):
        """Check the forward against fastdit's reference op (float32 math), time it, then time
        the backward of the same graph (its gradients checked against the reference's too)."""
        if op not in references:
            references[op] = _reference(op, inputs, grads)
        want_out, want_grads = references[op]
        row = report.measure(provider, f"{op} fwd {shape}", fwd, reference=want_out, tolerance=tolerance,
                             timing={"budget_s": budget_s}, nbytes=nbytes_fwd)  # fmt: skip
        if row["status"] != "ok":
            return
        outs = fwd()
        outs = outs if isinstance(outs, tuple) else (outs,)
        backward = lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)  # noqa: E731
        report.measure(provider, f"{op} bwd {shape}", backward, reference=want_grads, tolerance=tolerance,
                       timing={"budget_s": budget_s}, nbytes=nbytes_bwd)  # fmt: skip
        print(f"  {op} {provider}: fwd {row['ms']:.3f} ms", flush=True)

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

    if "rope3d_qk" in wanted:
        q, k = rand(seqlen, heads, head_dim), rand(seqlen, heads, head_dim)
        angle = rope3d_angles(grid_thw, cu, seqlen, theta=10000.0, axes_dim=wan_axes_dim(head_dim))
        freqs = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[:, None, :]
        shape = f"S={seqlen} H={heads} D={head_dim}"
        nbytes = 4 * seqlen * channels * size
        grads = (torch.randn_like(q), torch.randn_like(k))
        eager = lambda: _rope_pair_eager(q, k, freqs)
        compiled = torch.compile(_rope_pair_eager)
        record("rope3d_qk", "eager", shape, eager, nbytes, nbytes, grads, (q, k))
        record("rope3d_qk", "torch.compile", shape, lambda: compiled(q, k, freqs), nbytes, nbytes, grads, (q, k))
        for name in runnable_backends("rope3d_qk", base):
            fwd = lambda name=name: ops.rope3d_qk(q, k, grid_thw, cu, backend=name)
            record("rope3d_qk", f"fastdit-{name}", shape, fwd, nbytes, nbytes, grads, (q, k))

    x, y = rand(seqlen, channels), rand(seqlen, channels)
    shift, scale, gate = (rand(1, channels, dt=torch.float32) for _ in range(3))
    g1, g2 = torch.randn_like(x), torch.randn_like(x)
    shape = f"S={seqlen} C={channels}"
    row = seqlen * channels * size

    if "adaln_modulate" in wanted:
        compiled = torch.compile(_modulate_eager)
        args3 = (x, shift, scale)
        record("adaln_modulate", "eager", shape, lambda: _modulate_eager(*args3), 2 * row, 3 * row, g1, args3)
        record("adaln_modulate", "torch.compile", shape, lambda: compiled(*args3), 2 * row, 3 * row, g1, args3)
        for name in runnable_backends("adaln_modulate", base):
            fwd = lambda name=name: ops.adaln_modulate(x, shift, scale, cu, backend=name)
            record("adaln_modulate", f"fastdit-{name}", shape, fwd, 2 * row, 3 * row, g1, args3)

    if "gated_residual" in wanted:
        compiled = torch.compile(_residual_eager)
        args3 = (x, y, gate)
        # backward: read g and y, write dy (dres is g itself): 3 passes
        record("gated_residual", "eager", shape, lambda: _residual_eager(*args3), 3 * row, 3 * row, g1, args3)
        record("gated_residual", "torch.compile", shape, lambda: compiled(*args3), 3 * row, 3 * row, g1, args3)
        for name in runnable_backends("gated_residual", base):
            fwd = lambda name=name: ops.gated_residual(x, y, gate, cu, backend=name)
            record("gated_residual", f"fastdit-{name}", shape, fwd, 3 * row, 3 * row, g1, args3)

    if "gated_residual_modulate" in wanted:
        compiled = torch.compile(_residual_modulate_eager)
        args5 = (x, y, gate, shift, scale)
        # fwd: read res, y; write r, modulated. bwd: read g_r, g_mod, r, y; write dres, dy.
        fb, bb, grads = 4 * row, 6 * row, (g1, g2)
        record(
            "gated_residual_modulate", "eager", shape, lambda: _residual_modulate_eager(*args5), fb, bb, grads, args5
        )
        record("gated_residual_modulate", "torch.compile", shape, lambda: compiled(*args5), fb, bb, grads, args5)
        for name in runnable_backends("gated_residual_modulate", base):
            fwd = lambda name=name: ops.gated_residual_modulate(x, y, gate, shift, scale, cu, backend=name)
            record("gated_residual_modulate", f"fastdit-{name}", shape, fwd, fb, bb, grads, args5)
    return report

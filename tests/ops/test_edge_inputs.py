"""Inputs at the edge of the contract, on every backend: zero-size dims get the empty result (and
empty gradients) everywhere or a named error everywhere; meta tensors propagate shapes without a
value check reading them; the public attention backward validates its boundaries like the
forward, in a subprocess where a regression would corrupt memory (it once aborted the process).
"""

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdit import ops
from tests.conftest import CPU_BACKENDS, packed_cu

pytestmark = pytest.mark.bad_input

needs_triton = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]

CU = packed_cu([3, 2])
GRID = torch.tensor([[1, 1, 3], [1, 1, 2]], dtype=torch.int32)

# (id, call(backend) -> outputs, differentiable inputs); each input has a zero-size dim.
ZERO_SIZE = {
    "adaln_C0": (lambda b, x: ops.adaln_modulate(x, torch.randn(2, 0), torch.randn(2, 0), CU, backend=b), (5, 0)),
    "adaln_rms_C0": (
        lambda b, x: ops.adaln_modulate(x, torch.randn(2, 0), torch.randn(2, 0), CU, norm="rms", backend=b),
        (5, 0),
    ),
    "gated_residual_C0": (lambda b, x: ops.gated_residual(x, x * 2, torch.randn(2, 0), CU, backend=b), (5, 0)),
    "gated_residual_modulate_C0": (
        lambda b, x: ops.gated_residual_modulate(
            x, x * 2, torch.randn(2, 0), torch.randn(2, 0), torch.randn(2, 0), CU, backend=b
        ),
        (5, 0),
    ),
    "rope3d_0_heads": (lambda b, x: ops.rope3d(x, GRID, CU, backend=b), (5, 0, 8)),
    "rope3d_D0": (lambda b, x: ops.rope3d(x, GRID, CU, backend=b), (5, 2, 0)),
    "rope3d_qk_0_kv_heads": (lambda b, x: ops.rope3d_qk(torch.randn(5, 2, 8), x, GRID, CU, backend=b), (5, 0, 8)),
    "rope3d_qk_norm_0_heads": (
        lambda b, x: ops.rope3d_qk(
            x, x * 2, GRID, CU, q_norm_weight=torch.ones(0), k_norm_weight=torch.ones(0), backend=b
        ),
        (5, 0, 8),
    ),
    "attention_B0": (lambda b, x: ops.attention(x, x, x, backend=b), (0, 3, 2, 8)),
    "rms_norm_silu_C0": (lambda b, x: ops.rms_norm_silu(x, torch.ones(0), backend=b), (1, 0, 2, 3, 3)),
    "rms_norm_silu_B0": (lambda b, x: ops.rms_norm_silu(x, torch.ones(4), backend=b), (0, 4, 2, 3, 3)),
    "causal_conv3d_B0": (
        lambda b, x: ops.causal_conv3d(x, torch.randn(4, 3, 3, 3, 3), torch.randn(4), padding=(1, 1), backend=b),
        (0, 3, 2, 4, 4),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ZERO_SIZE))
def test_zero_size_dims_give_the_empty_result_on_every_backend(case, backend):
    call, shape = ZERO_SIZE[case]
    x = torch.randn(shape, requires_grad=True)
    outs = call(backend, x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    want = call("reference", x.detach())
    want = want if isinstance(want, tuple) else (want,)
    for got, ref in zip(outs, want, strict=True):
        assert got.shape == ref.shape
        assert got.dtype == ref.dtype
    grad = torch.autograd.grad(sum(o.sum() for o in outs if o.requires_grad), x, allow_unused=True)[0]
    assert grad is None or (grad.shape == x.shape and torch.all(grad == 0))


@pytest.mark.parametrize("backend", ["reference", "cudnn", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "weight, bias, error, match",
    [
        ((0, 3, 3, 3, 3), None, ValueError, r"weight .* every dim >= 1"),  # Cout = 0
        ((4, 0, 3, 3, 3), None, ValueError, r"weight .* every dim >= 1"),  # Cin = 0: torch returned 0 channels
        ((4, 3, 3, 3, 3), torch.float64, TypeError, "x and bias must share one dtype"),
    ],
)
def test_conv_degenerate_weights_and_bias_dtype_are_named(backend, weight, bias, error, match):
    x = torch.randn(1, weight[1], 2, 4, 4)
    b = None if bias is None else torch.randn(weight[0], dtype=bias)
    with pytest.raises(error, match=match):
        ops.causal_conv3d(x, torch.randn(weight), b, padding=(1, 1), backend=backend)


def _meta(*shape):
    return torch.empty(*shape, device="meta")


META_CALLS = {
    "rope3d": lambda: ops.rope3d(_meta(5, 2, 8), GRID.to("meta"), CU.to("meta")),
    "rope3d_qk": lambda: ops.rope3d_qk(_meta(5, 2, 8), _meta(5, 1, 8), GRID.to("meta"), CU.to("meta")),
    "adaln_modulate": lambda: ops.adaln_modulate(_meta(5, 4), _meta(2, 4), _meta(2, 4), CU.to("meta")),
    "gated_residual": lambda: ops.gated_residual(_meta(5, 4), _meta(5, 4), _meta(2, 4), CU.to("meta")),
    "gated_residual_modulate": lambda: ops.gated_residual_modulate(
        _meta(5, 4), _meta(5, 4), _meta(2, 4), _meta(2, 4), _meta(2, 4), CU.to("meta")
    ),
    "varlen_attention": lambda: ops.varlen_attention(
        _meta(5, 2, 8), _meta(5, 2, 8), _meta(5, 2, 8), CU.to("meta"), CU.to("meta"), 3, 3
    ),
    "varlen_attention_backward": lambda: ops.varlen_attention_backward(
        *(_meta(5, 2, 8) for _ in range(5)), _meta(2, 5), CU.to("meta"), CU.to("meta"), 3, 3
    ),
    "attention": lambda: ops.attention(_meta(1, 3, 2, 8), _meta(1, 3, 2, 8), _meta(1, 3, 2, 8)),
    "causal_conv3d": lambda: ops.causal_conv3d(_meta(1, 3, 2, 4, 4), _meta(4, 3, 3, 3, 3), _meta(4), padding=(1, 1)),
    "rms_norm_silu": lambda: ops.rms_norm_silu(_meta(1, 4, 2, 4, 4), _meta(4)),
}


@pytest.mark.parametrize("op", sorted(META_CALLS))
def test_meta_tensors_propagate_shapes_without_reading_values(op):
    outs = META_CALLS[op]()
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert all(o.device.type == "meta" for o in outs)
    assert outs[0].shape[-1] in (8, 4)


def test_meta_tensors_still_get_shape_checks():
    with pytest.raises(ValueError, match="grid_thw must have shape"):
        ops.rope3d(_meta(5, 2, 8), GRID[:1].to("meta"), CU.to("meta"))


# ---- varlen_attention_backward validates like the forward ----------------------------------------------

BAD_CU = {
    "decreasing": ([0, 4, 3], ValueError, "non-decreasing"),
    "last_too_large": ([0, 4, 30], ValueError, r"cu_seqlens_q\[-1\] must equal"),
    "last_too_small": ([0, 4, 8], ValueError, r"cu_seqlens_q\[-1\] must equal"),
    "first_not_zero": ([1, 4, 10], ValueError, r"cu_seqlens_q\[0\] must be 0"),
    "empty_sample": ([0, 0, 10], ValueError, "sample lengths >= 1"),
}

_BACKWARD_SCRIPT = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
from fastdit import ops
cu_k = torch.tensor([0, 4, 10], dtype=torch.int32)
q, k, v, out, dout = (torch.randn(10, 2, 8) for _ in range(5))
lse = torch.randn(2, 10)
for case, cu in {cases}.items():
    try:
        ops.varlen_attention_backward(dout, q, k, v, out, lse, torch.tensor(cu, dtype=torch.int32), cu_k, 30, 30,
                                      backend="{backend}")
        print(case, "no error", flush=True)
    except Exception as err:
        print(case, "raised", type(err).__name__, err, flush=True)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backward_validates_cu_seqlens_in_a_subprocess(backend):
    """One process per backend tries every bad cu_seqlens_q: a regression that reached the
    kernel would corrupt memory (it once aborted the process), so it must not be this one."""
    cases = {case: cu for case, (cu, _, _) in BAD_CU.items()}
    script = textwrap.dedent(_BACKWARD_SCRIPT.format(cases=cases, backend=backend))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for case, (_, error, match) in BAD_CU.items():
        assert lines.get(case, "").startswith(f"raised {error.__name__}"), (case, proc.stdout, proc.stderr[-2000:])
        assert re.search(match, lines[case]), (case, lines[case])


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(max_seqlen_q=2), ValueError, "max_seqlen_q=2 is smaller"),
        (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "same number of samples"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens_q must have dtype"),
        (dict(dout=torch.randn(10, 2, 8, dtype=torch.float64)), TypeError, "q, dout and out must share one dtype"),
    ],
)
def test_attention_backward_names_bad_arguments(changes, error, match):
    args = dict(
        dout=torch.randn(10, 2, 8), q=torch.randn(10, 2, 8), k=torch.randn(10, 2, 8), v=torch.randn(10, 2, 8),
        out=torch.randn(10, 2, 8), lse=torch.randn(2, 10), cu_seqlens_q=packed_cu([4, 6]),
        cu_seqlens_k=packed_cu([4, 6]), max_seqlen_q=6, max_seqlen_k=6,
    )  # fmt: skip
    args.update(changes)
    with pytest.raises(error, match=match):
        ops.varlen_attention_backward(**args)

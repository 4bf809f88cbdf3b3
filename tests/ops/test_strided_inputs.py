"""Every tensor argument of every public op, on every backend, as a view the kernels must not
misread: a strided view (every other element of a larger buffer, along the first and along the
last dim), a view at a storage offset, and (floating point, where a row repeats legally) an
expanded stride-0 view. The result and the gradients must equal those of the same values passed
contiguous: a launcher that assumes contiguity reads the wrong elements and fails here.
"""

import pytest
import torch

from fastdit import ops
from tests import cuda_emulation
from tests.conftest import CPU_BACKENDS, packed_cu

pytestmark = pytest.mark.bad_input

needs_triton = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not installed"),
    pytest.mark.triton_cpu,
]
MARKS = {
    "triton": needs_triton,
    "cuda": pytest.mark.skipif(cuda_emulation.unavailable() is not None, reason=str(cuda_emulation.unavailable())),
}
CUDA = ("cuda",)  # the csrc/ kernels, run on the CPU through tests/cuda_emulation.py


def strided_first(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in every other slice of a buffer twice as long in dim 0."""
    base = torch.full((2 * t.shape[0], *t.shape[1:]), -7, dtype=t.dtype, device=t.device)
    view = base[::2]
    view.copy_(t)
    return view


def strided_last(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in every other element of a buffer twice as wide in the last dim."""
    base = torch.full((*t.shape[:-1], 2 * t.shape[-1]), -7, dtype=t.dtype, device=t.device)
    view = base[..., ::2]
    view.copy_(t)
    return view


def offset(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values at storage offset 1 (also misaligned for 16-byte loads)."""
    base = torch.full((t.numel() + 1,), -7, dtype=t.dtype, device=t.device)
    view = base[1:].view(t.shape)
    view.copy_(t)
    return view


VIEWS = {"strided_first": strided_first, "strided_last": strided_last, "offset": offset}


def expanded(t: torch.Tensor) -> torch.Tensor:
    """Dim 0 broadcast from its first slice (stride 0)."""
    return t[:1].expand(t.shape)


# ---- op cases: (name, inputs, call, floating arguments that may be expanded) ---------------------------
# Each call takes the inputs dict and a backend and returns a tuple of tensors. Inputs hold
# contiguous tensors; the float ones that require grad are differentiated.

CU = [6, 5]  # two samples, 11 tokens
GRID = [[1, 2, 3], [1, 1, 5]]


def _rope_inputs():
    return {
        "x": torch.randn(11, 2, 8),
        "grid_thw": torch.tensor(GRID, dtype=torch.int32),
        "cu_seqlens": packed_cu(CU),
        "token_offset": torch.tensor([0, 2], dtype=torch.int64),
    }


def _rope3d(a, backend):
    return (ops.rope3d(a["x"], a["grid_thw"], a["cu_seqlens"], token_offset=a["token_offset"], backend=backend),)


def _rope_qk_inputs(norm):
    a = _rope_inputs()
    a["q"] = a.pop("x")
    a["k"] = torch.randn(11, 1, 8)
    if norm:
        a["q_norm_weight"] = torch.rand(16) + 0.5
        a["k_norm_weight"] = torch.rand(8) + 0.5
    return a


def _rope3d_qk(a, backend):
    return ops.rope3d_qk(
        a["q"], a["k"], a["grid_thw"], a["cu_seqlens"], token_offset=a["token_offset"],
        q_norm_weight=a.get("q_norm_weight"), k_norm_weight=a.get("k_norm_weight"), backend=backend,
    )  # fmt: skip


def _adaln_inputs(norm, per_token=False):
    rows = 11 if per_token else 2
    a = {
        "x": torch.randn(11, 12),
        "shift": torch.randn(rows, 12),
        "scale": torch.randn(rows, 12),
        "cu_seqlens": packed_cu(CU),
        "weight": torch.rand(12) + 0.5,
    }
    if norm == "layer":
        a["bias"] = torch.randn(12)
    return a


def _adaln(norm):
    def call(a, backend):
        return (
            ops.adaln_modulate(
                a["x"], a["shift"], a["scale"], a["cu_seqlens"], norm=norm, weight=a["weight"], bias=a.get("bias"),
                backend=backend,
            ),
        )  # fmt: skip

    return call


def _residual_inputs():
    return {
        "res": torch.randn(11, 12),
        "y": torch.randn(11, 12),
        "gate": torch.randn(2, 12),
        "shift": torch.randn(2, 12),
        "scale": torch.randn(2, 12),
        "cu_seqlens": packed_cu(CU),
    }


def _gated_residual(a, backend):
    return (ops.gated_residual(a["res"], a["y"], a["gate"], a["cu_seqlens"], backend=backend),)


def _gated_residual_modulate(a, backend):
    return ops.gated_residual_modulate(
        a["res"], a["y"], a["gate"], a["shift"], a["scale"], a["cu_seqlens"], backend=backend
    )


def _attention_inputs():
    return {
        "q": torch.randn(11, 2, 8),
        "k": torch.randn(7, 2, 8),
        "v": torch.randn(7, 2, 8),
        "cu_seqlens_q": packed_cu(CU),
        "cu_seqlens_k": packed_cu([3, 4]),
    }


def _varlen_attention(a, backend):
    out, lse = ops.varlen_attention(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 4, return_lse=True, backend=backend
    )
    return out, lse


def _attention_backward_inputs():
    a = _attention_inputs()
    out, lse = ops.varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 4, return_lse=True)
    a.update(dout=torch.randn(11, 2, 8), out=out, lse=lse)
    return a


def _varlen_attention_backward(a, backend):
    return ops.varlen_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 4,
        backend=backend,
    )  # fmt: skip


def _dense_attention_inputs():
    return {"q": torch.randn(2, 5, 2, 8), "k": torch.randn(2, 3, 1, 8), "v": torch.randn(2, 3, 1, 8)}


def _attention(a, backend):
    return (ops.attention(a["q"], a["k"], a["v"], backend=backend),)


def _conv_inputs():
    return {
        "x": torch.randn(2, 3, 3, 4, 5),
        "weight": torch.randn(4, 3, 3, 3, 3) / 4,
        "bias": torch.randn(4),
        "cache": torch.randn(2, 3, 2, 4, 5),
        "residual": torch.randn(2, 4, 3, 4, 5),
    }


def _causal_conv3d(a, backend):
    y, cache = ops.causal_conv3d(
        a["x"], a["weight"], a["bias"], padding=(1, 1), cache=a["cache"], residual=a["residual"], backend=backend
    )
    return y, cache


def _norm_silu_inputs():
    return {"x": torch.randn(2, 6, 3, 4, 5), "weight": torch.rand(6) + 0.5}


def _rms_norm_silu(a, backend):
    return (ops.rms_norm_silu(a["x"], a["weight"], backend=backend),)


def _rms_norm_inputs():
    return {"x": torch.randn(6, 16), "weight": torch.randn(16)}


def _rms_norm(a, backend):
    return (ops.rms_norm(a["x"], a["weight"], backend=backend),)


# (case id, make inputs, call, differentiable args, extra backends)
CASES = [
    ("rope3d", _rope_inputs, _rope3d, ("x",), CUDA),
    ("rope3d_qk", lambda: _rope_qk_inputs(False), _rope3d_qk, ("q", "k"), CUDA),
    ("rope3d_qk_norm", lambda: _rope_qk_inputs(True), _rope3d_qk, ("q", "k", "q_norm_weight", "k_norm_weight"), ()),
    ("adaln_layer", lambda: _adaln_inputs("layer"), _adaln("layer"), ("x", "shift", "scale", "weight", "bias"), CUDA),
    ("adaln_rms", lambda: _adaln_inputs("rms"), _adaln("rms"), ("x", "shift", "scale", "weight"), CUDA),
    ("adaln_per_token", lambda: _adaln_inputs("layer", True), _adaln("layer"), ("x", "shift", "scale", "weight"), CUDA),
    ("gated_residual", _residual_inputs, _gated_residual, ("res", "y", "gate"), CUDA),
    ("gated_residual_modulate", _residual_inputs, _gated_residual_modulate, ("res", "y", "gate", "shift", "scale"), ()),
    ("varlen_attention", _attention_inputs, _varlen_attention, ("q", "k", "v"), ()),
    ("varlen_attention_backward", _attention_backward_inputs, _varlen_attention_backward, (), ()),
    ("attention", _dense_attention_inputs, _attention, ("q", "k", "v"), ()),
    ("causal_conv3d", _conv_inputs, _causal_conv3d, ("x", "weight", "bias", "residual"), ("cudnn",)),
    ("rms_norm_silu", _norm_silu_inputs, _rms_norm_silu, ("x", "weight"), ()),
    ("rms_norm", _rms_norm_inputs, _rms_norm, ("x", "weight"), ()),
]

# Arguments whose rows must differ for the input to be legal (no expanded form): boundaries and grids.
NOT_EXPANDABLE = {"cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "grid_thw", "token_offset", "lse", "out"}


def _run(call, inputs, grad_args, backend):
    """Outputs and the gradients of a fixed random projection of them w.r.t. ``grad_args``."""
    leaves = {}
    args = dict(inputs)
    for name in grad_args:
        leaves[name] = inputs[name].detach().requires_grad_()
        args[name] = leaves[name]
    outs = call(args, backend)
    grads = ()
    float_outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if leaves and float_outs:
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in float_outs)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [o.detach() for o in outs], [g for g in grads if g is not None]


def _variants(name, t):
    for view_name, view in VIEWS.items():
        if t.dim() == 0 or (view_name == "strided_last" and t.dim() < 2):
            continue  # a 1-D tensor's first dim is its last
        yield view_name, view
    if t.is_floating_point() and name not in NOT_EXPANDABLE and t.shape[0] > 1:
        yield "expanded", expanded


def _params():
    for case_id, make, call, grad_args, extra in CASES:
        # every op but the conv (whose PyTorch path is "cudnn") has a torch backend: the CPU default
        native = () if case_id == "causal_conv3d" else ("torch",)
        for backend in ("reference", *native, "triton", *extra):
            yield pytest.param(make, call, grad_args, backend, id=f"{case_id}-{backend}", marks=MARKS.get(backend, ()))


@pytest.mark.parametrize("make, call, grad_args, backend", list(_params()))
def test_every_argument_as_a_view(make, call, grad_args, backend, request):
    if backend == "cuda":
        request.getfixturevalue("emulated_cuda_on_cpu")
    torch.manual_seed(0)
    inputs = make()
    contiguous = _run(call, inputs, grad_args, backend)
    checked = 0
    for name, tensor in inputs.items():
        for view_name, view in _variants(name, tensor):
            viewed = view(tensor)
            # a view of the same values wants the contiguous result; an expanded one has new values
            baseline = dict(inputs, **{name: viewed.contiguous()})
            want_out, want_grad = _run(call, baseline, grad_args, backend) if view_name == "expanded" else contiguous
            got_out, got_grad = _run(call, dict(inputs, **{name: viewed}), grad_args, backend)
            for got, want in zip(got_out + got_grad, want_out + want_grad, strict=True):
                torch.testing.assert_close(
                    got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name, v=view_name: f"{n} as {v}: {m}"
                )
            checked += 1
    assert checked >= len(inputs)

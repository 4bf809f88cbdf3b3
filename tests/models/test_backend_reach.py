"""A model-wide backend reaches every op: ``DiT(backend=...)``, ``CausalVAE(backend=...)`` and
``fastdit.patch(..., backend=...)`` run each op that has that backend on it, and every other op
on the dispatcher's own choice (docs/design.md, "Dispatch"). Checked from the dispatcher's trace."""

import pytest
import torch

import fastdit
from fastdit.models import DiT, PackedBatch, preset
from fastdit.models.wan.dit import MODEL_OPS
from fastdit.models.wan.vae import CausalVAE
from fastdit.ops import dispatch
from tests import cuda_emulation
from tests.conftest import TRITON_ON_CPU

BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU needs the interpreter")),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(cuda_emulation.unavailable() is not None, reason=str(cuda_emulation.unavailable())),
    ),
    "cudnn",
    "torch",
]


@pytest.fixture
def on_cpu(request, backend):
    """``backend`` dispatchable on CPU tensors (the cuda one through the emulated kernels)."""
    if backend == "cuda":
        request.getfixturevalue("emulated_cuda_on_cpu")
    return backend


def check_reach(log: list[tuple[str, str]], backend: str, expect_ops) -> None:
    """Every expected op ran; each on ``backend`` where it has one, else on what the dispatcher
    picks by itself for a CPU fp32 call (PyTorch's own ops: ``torch``, ``cudnn`` for the conv;
    never the reference oracle)."""
    ran = {op for op, _ in log}
    assert set(expect_ops) <= ran, sorted(set(expect_ops) - ran)
    cpu = torch.device("cpu")
    for op, name in log:
        if backend in dispatch.backends(op):
            assert name == backend, (op, name)
        else:
            assert name == dispatch.device_choice(op, cpu, torch.float32) != "reference", (op, name)


def _forced_where_it_cannot_run(backend: str) -> bool:
    """``cudnn`` names torch's cuDNN attention as well as the conv: a CPU torch has no cuDNN
    attention, and a model forced onto it there must say so, not run something else."""
    impl = dispatch.backends("attention").get(backend)
    return impl is not None and impl.unavailable is not None


def tiny_dit(backend):
    model = DiT(preset("tiny"), backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_dit_backend_reaches_every_op_forward_and_backward(on_cpu, backend):
    model = tiny_dit(on_cpu)
    latents = [torch.randn(16, 3, 4, 6), torch.randn(16, 1, 4, 4)]
    batch = PackedBatch.from_samples(latents, [10.0, 900.0], [torch.randn(4, 32), torch.randn(6, 32)])
    if _forced_where_it_cannot_run(backend):
        with pytest.raises(dispatch.BackendNotSupportedError, match=f"backend '{backend}'.*without CUDA"):
            model.forward_packed(batch)
        return
    with dispatch.trace() as log:
        out = model.forward_packed(batch)
        out.square().mean().backward()  # every backward runs the forward's backend (declared together)
    check_reach(log, backend, MODEL_OPS)
    assert all(p.grad is not None for p in model.blocks[0].parameters())


# Triton's reach through the VAE and the patched transformer is checked on the interpreted runs of
# test_vae_on_triton_matches_reference_fp32_and_fp16 and test_patched_transformer_fp16_on_triton
# (the same trace, without interpreting a second run).
WITHOUT_TRITON = [b for b in BACKENDS if b != "triton" and getattr(b, "values", None) != ("triton",)]


@pytest.mark.parametrize("backend", WITHOUT_TRITON)
def test_vae_backend_reaches_every_op(on_cpu, backend):
    vae = CausalVAE.from_preset("tiny").set_backend(on_cpu).eval()
    with dispatch.trace() as log, torch.no_grad():
        vae.decode(torch.randn(1, 16, 1, 2, 2))  # one latent frame: every conv and norm, the least interpreter time
    check_reach(log, backend, ("causal_conv3d", "rms_norm_silu"))


@pytest.mark.parametrize("backend", WITHOUT_TRITON)
def test_patch_backend_reaches_every_op(on_cpu, backend):
    pytest.importorskip("diffusers", reason="the drop-in tests need `pip install -e .[diffusers]`")
    from tests.models.test_dit_diffusers_parity import make_wan

    wan = make_wan()
    x, t, text = torch.randn(1, 4, 3, 6, 10), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        expect = wan(x, t, text).sample
        fastdit.patch(wan, backend=on_cpu)
        try:
            if _forced_where_it_cannot_run(backend):
                with pytest.raises(dispatch.BackendNotSupportedError, match=f"backend '{backend}'.*without CUDA"):
                    wan(x, t, text)
                return
            with dispatch.trace() as log:
                got = wan(x, t, text).sample
        finally:
            fastdit.unpatch(wan)
    ops = {"attention", "rope3d_qk_norm", "adaln_modulate", "gated_residual", "gated_residual_modulate"}
    if not any(backend in dispatch.backends(op) for op in ops):
        # nothing forced (cudnn is the conv's alone): on a CPU the blocks run diffusers' own code,
        # the dispatcher's torch choice recorded for the block, the rope and attention
        ops -= {"gated_residual", "gated_residual_modulate"}
    check_reach(log, backend, ops)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.bad_input
def test_an_unknown_model_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        DiT(preset("tiny"), backend="fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        CausalVAE.from_preset("tiny").set_backend("fastest")

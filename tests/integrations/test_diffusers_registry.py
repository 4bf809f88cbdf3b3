"""The one module that touches diffusers' private attention registry
(fastdit/integrations/_diffusers_registry.py), the switch a user writes, and the environment
variable diffusers reads. CI runs this file on the newest diffusers and on 0.36.0."""

import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("diffusers", reason="needs `pip install -e .[diffusers]`")

import fastdit  # noqa: E402
from fastdit.integrations import _diffusers_registry as registry  # noqa: E402
from fastdit.integrations.diffusers import enable, register_attention_backend  # noqa: E402
from tests.integrations.tiny_diffusers import MODELS, build, inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


def test_registration_is_idempotent_and_adds_one_member():
    """Catches a second enum member (or a second registration) per call, and a backend registered
    without context-parallel support."""
    first = register_attention_backend("reference")
    names = list(registry.attention_dispatch().AttentionBackendName._member_names_)
    assert register_attention_backend("reference") is first and enable("reference") == "fastdit_reference"
    assert list(registry.attention_dispatch().AttentionBackendName._member_names_) == names
    assert registry.is_registered(first) and registry.supports_context_parallel(first)
    assert registry.attention_dispatch().AttentionBackendName("fastdit_reference") is first


def test_the_default_context_restores_the_previous_default():
    """Catches the fastdit default leaking out of a routed module's call (every later diffusers
    model in the process would run fastdit unasked)."""
    before = registry.default_backend()
    member = register_attention_backend("torch")
    with registry.default(member):
        assert registry.default_backend() is member
    assert registry.default_backend() is before
    with pytest.raises(RuntimeError), registry.default(member):
        raise RuntimeError("inside")
    assert registry.default_backend() is before


def test_diffusers_attn_backend_fastdit_works_when_fastdit_imports_first():
    """Catches `import diffusers` broken by the variable (diffusers evaluates it at import), and
    the variable ignored: the default backend must be fastdit's and serve a dispatcher call."""
    proc = _python(
        "import fastdit, torch\n"
        "from diffusers.models.attention_dispatch import dispatch_attention_fn, _AttentionBackendRegistry as R\n"
        "from fastdit.ops import dispatch\n"
        "q = torch.randn(1, 4, 2, 8)\n"
        "with dispatch.trace() as log: dispatch_attention_fn(q, q, q)\n"
        "print(R._active_backend.value, log)\n",
        DIFFUSERS_ATTN_BACKEND="fastdit_reference",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "fastdit_reference" and "('attention', 'reference')" in proc.stdout


@pytest.mark.bad_input
def test_diffusers_attn_backend_with_a_bad_fastdit_name_or_the_wrong_order_is_refused_with_a_message():
    """Catches an unknown suffix accepted (failing at the first forward) and the import order's
    failure left unexplained: diffusers imported first refuses the name itself."""
    proc = _python("import fastdit", DIFFUSERS_ATTN_BACKEND="fastdit_bogus")
    assert proc.returncode != 0 and "unknown fastdit attention backend 'fastdit_bogus'" in proc.stderr
    proc = _python("import diffusers.models.attention_dispatch", DIFFUSERS_ATTN_BACKEND="fastdit")
    assert proc.returncode != 0 and "'fastdit' is not a valid AttentionBackendName" in proc.stderr


def _spec(cls):
    return next(m for m in MODELS if m.cls == cls)


def test_patch_on_a_wan_derivative_pipeline_patches_its_transformer_and_says_what_it_left():
    """Catches a pipeline whose transformer is a Wan derivative (SkyReels V2 here) getting only its
    VAE patched, silently: the transformer's attention must run on fastdit, and the lines must
    name the RoPE / adaLN it left and why."""
    from diffusers import AutoencoderKLWan

    from fastdit.ops import dispatch

    spec = _spec("SkyReelsV2Transformer3DModel")
    transformer = build(spec)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    pipe = types.SimpleNamespace(transformer=transformer, vae=vae)  # what patch reads of a pipeline
    lines = fastdit.patch(pipe, backend="reference")
    try:
        assert any(line.startswith("transformer:") and "'fastdit_reference'" in line for line in lines)
        assert any(line.startswith("transformer: left SkyReelsV2Transformer3DModel's RoPE and adaLN") for line in lines)
        assert any(line.startswith("vae:") and "CausalVAE" in line for line in lines)
        with torch.no_grad(), dispatch.trace() as log:
            transformer(**inputs(spec))
        assert ("attention", "reference") in log
    finally:
        fastdit.unpatch(pipe)


def test_patch_reports_modules_that_compute_attention_themselves():
    """Catches a processor that neither dispatches nor calls torch SDPA (diffusers' legacy
    AttnProcessor computes softmax(QK^T)V by hand) passed over in silence."""
    from diffusers.models.attention_processor import AttnProcessor

    spec = _spec("LatteTransformer3DModel")
    model = build(spec)
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())
    lines = fastdit.patch(model, backend="reference")
    fastdit.unpatch(model)
    assert any("left 1 AttnProcessor: it computes attention without torch SDPA" in line for line in lines)


def _anyflow_far():
    import diffusers

    model = diffusers.AnyFlowFARTransformer3DModel(
        patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
        attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    latents, text = torch.randn(1, 4, 4, 16, 16, generator=gen), torch.randn(1, 12, 16, generator=gen)
    return model, dict(hidden_states=latents, timestep=torch.full((1, 4), 500.0), r_timestep=torch.full((1, 4), 250.0),
                       encoder_hidden_states=text, chunk_partition=[2, 2])  # fmt: skip


def _kandinsky6_sr():
    import diffusers

    model = diffusers.Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=8, time_dim=16,
                                                     patch_size=(1, 2, 2), model_dim=24, ff_dim=32,
                                                     num_visual_blocks=2, axes_dims=(4, 4, 4))  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    return model, dict(hidden_states=torch.randn(1, 2, 16, 16, 9, generator=gen), timestep=torch.tensor([300.0]))


@pytest.mark.parametrize(
    "cls, make, processor, served",
    [("AnyFlowFARTransformer3DModel", _anyflow_far, "AnyFlowCausalAttnProcessor", True),
     ("Kandinsky6SRTransformer3DModel", _kandinsky6_sr, "Kandinsky6SRAttnProcessor", False)],
)  # fmt: skip
def test_a_processor_that_needs_its_own_backend_is_left_and_named(cls, make, processor, served):
    """AnyFlow-FAR's causal processor and Kandinsky 6 SR's sparse one pass diffusers' flex backend a
    BlockMask: catches the patch pointing them at fastdit (diffusers raises at the first forward),
    or claiming them as routed while flex runs them; the processors beside them are served and
    the output is unchanged (forward only: flex attention has no CPU backward). Where nothing is
    left to serve (Kandinsky 6 SR), the patch refuses, naming the processor and the reason."""
    import diffusers

    from fastdit.ops import dispatch

    if not hasattr(diffusers, cls):
        pytest.skip(f"diffusers {diffusers.__version__} has no {cls}")
    torch.manual_seed(0)
    model, kwargs = make()
    model.eval()
    if not served:
        with pytest.raises(ValueError, match=f"changed nothing.*left .* {processor}: .*flex"):
            fastdit.patch(model, backend="reference")
        return
    with torch.no_grad():
        expect = model(**kwargs, return_dict=False)[0]
        lines = fastdit.patch(model, backend="reference")
        try:
            with dispatch.trace() as log:
                got = model(**kwargs, return_dict=False)[0]
        finally:
            fastdit.unpatch(model)
    assert any("left" in line and processor in line and "flex" in line for line in lines), lines
    assert not any(processor in line and "->" in line for line in lines)
    assert ("attention", "reference") in log
    assert ((got - expect).norm() / expect.norm()).item() <= 1e-5


def test_xdit_processors_are_left_and_named():
    """xDiT (xfuser) replaces a model's processors with its own sequence-parallel ones; catches
    fastdit.patch routing their SDPA calls locally (each rank would attend over its own shard) or
    leaving them in silence. xfuser itself is not installable here: a stand-in processor class
    from an ``xfuser`` module plays it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    stand_in = type("xFuserAttnProcessor2_0", (AttnProcessor2_0,), {"__module__": "xfuser.model_executor.layers"})
    model = build(_spec("LatteTransformer3DModel"))
    model.transformer_blocks[0].attn1.set_processor(stand_in())
    lines = fastdit.patch(model, backend="reference")
    try:
        assert model.transformer_blocks[0].attn1.forward.__func__ is type(model.transformer_blocks[0].attn1).forward
    finally:
        fastdit.unpatch(model)
    assert any("left 1 xFuserAttnProcessor2_0: xDiT's processor runs its own" in line for line in lines)


def test_diffusers_own_attention_backend_context_runs_fastdit():
    """The README's second way in: diffusers' ``attention_backend("fastdit")`` context. Catches a
    member diffusers' context cannot look up (an enum member added wrongly) and a default left
    changed after the block."""
    from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn

    from fastdit.ops import dispatch

    enable("reference")
    before = registry.default_backend()
    q = torch.randn(1, 4, 2, 8)
    with attention_backend("fastdit_reference"), dispatch.trace() as log:
        dispatch_attention_fn(q, q, q)
    assert ("attention", "reference") in log and registry.default_backend() is before

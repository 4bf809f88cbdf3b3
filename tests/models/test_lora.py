"""LoRA: fastdit's fused adapters against diffusers' ``load_lora_weights`` (PEFT, unfused), in
diffusers / PEFT keys and the original Wan layout; unloading restores the weights bit for bit."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastdit.models import DiT, WeightLoadError
from tests.conftest import rel_err

diffusers = pytest.importorskip("diffusers", reason="the LoRA parity tests need `pip install -e .[diffusers]`")
pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (`pip install -e .[diffusers]`)")
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline  # noqa: E402

from tests.integrations.test_diffusers_patch import make_vae  # noqa: E402
from tests.models.test_dit_diffusers_parity import TINY, make_wan  # noqa: E402

HIDDEN = TINY["num_attention_heads"] * TINY["attention_head_dim"]
# diffusers module -> (in, out) of the modules the LoRAs below touch (block 0 and 1 of the tiny model)
MODULES = {
    "blocks.0.attn1.to_q": (HIDDEN, HIDDEN),
    "blocks.0.attn1.to_out.0": (HIDDEN, HIDDEN),
    "blocks.1.attn2.to_k": (HIDDEN, HIDDEN),
    "blocks.1.attn2.to_v": (HIDDEN, HIDDEN),
    "blocks.0.ffn.net.0.proj": (HIDDEN, TINY["ffn_dim"]),
    "blocks.1.ffn.net.2": (TINY["ffn_dim"], HIDDEN),
    "proj_out": (HIDDEN, TINY["out_channels"] * 4),
}
# the same modules in the original Wan checkpoint's names
WAN_NAMES = {
    "blocks.0.attn1.to_q": "blocks.0.self_attn.q",
    "blocks.0.attn1.to_out.0": "blocks.0.self_attn.o",
    "blocks.1.attn2.to_k": "blocks.1.cross_attn.k",
    "blocks.1.attn2.to_v": "blocks.1.cross_attn.v",
    "blocks.0.ffn.net.0.proj": "blocks.0.ffn.0",
    "blocks.1.ffn.net.2": "blocks.1.ffn.2",
    "proj_out": "head.head",
}


def diffusers_lora(rank=3, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (fan_in, fan_out) in MODULES.items():
        out[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.3
        out[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.3
        if bias:
            out[f"transformer.{module}.lora_B.bias"] = torch.randn(fan_out, generator=gen) * 0.3
    return out


def wan_lora(rank=4, alpha=2.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (fan_in, fan_out) in MODULES.items():
        name = f"diffusion_model.{WAN_NAMES[module]}"
        out[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.3
        if module != "proj_out":  # diffusers' converter reads no alpha for the head
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def pipeline(wan):
    return WanPipeline(tokenizer=None, text_encoder=None, vae=make_vae(), transformer=wan,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip


def inputs():
    gen = torch.Generator().manual_seed(5)
    return (torch.randn(1, 4, 3, 6, 8, generator=gen), torch.tensor([700.0]),
            torch.randn(1, 5, TINY["text_dim"], generator=gen))  # fmt: skip


def outputs(wan, dit):
    x, t, text = inputs()
    with torch.no_grad():
        return wan(x, t, text)[0], dit(x, t, text)


@pytest.mark.parametrize("layout", ["diffusers", "diffusers_metadata", "diffusers_alpha", "diffusers_bias",
                                    "original_wan"])  # fmt: skip
def test_lora_matches_diffusers_load_lora_weights(tmp_path, layout):
    """Every key style with alpha != rank where the style carries an alpha (metadata 6 / 3, a
    per-module ``.alpha`` tensor 6 at rank 3, the Wan layout's 2 at rank 4) and a user scale of
    0.75: catches alpha / rank inverted or either scale dropped at its site."""
    wan = make_wan()
    dit = DiT.from_diffusers(wan).eval()
    base_out, _ = outputs(wan, dit)
    path = tmp_path / "lora.safetensors"
    metadata = None
    if layout == "original_wan":
        state = wan_lora()
    else:
        state = diffusers_lora(bias=layout == "diffusers_bias")
    if layout in ("diffusers_metadata", "diffusers_alpha"):  # what save_lora_weights writes: lora_alpha / r = 2
        adapter = {"transformer.r": 3, "transformer.lora_alpha": 6, "transformer.target_modules": list(MODULES),
                   "transformer.rank_pattern": {}, "transformer.alpha_pattern": {}}  # fmt: skip
        metadata = {"lora_adapter_metadata": json.dumps(adapter)}
    save_file(state, str(path), metadata=metadata)
    pipe = pipeline(wan)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], [0.75])
    if layout == "diffusers_alpha":  # fastdit reads the same scale from per-module alpha tensors instead
        path = tmp_path / "lora_alpha.safetensors"
        save_file({**state, **{f"transformer.{m}.alpha": torch.tensor(6.0) for m in MODULES}}, str(path))
    name = dit.load_lora(path, scale=0.75, name="style")
    assert name == "style" and dit.loras == {"style": 0.75}
    expect, got = outputs(wan, dit)
    assert rel_err(expect, base_out) > 1e-2  # the adapter changes the output
    assert rel_err(got, expect) <= 1e-5


def test_two_loras_add_and_unload_restores_bitwise():
    wan = make_wan()
    dit = DiT.from_diffusers(wan).eval()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    pipe = pipeline(wan)
    pipe.load_lora_weights(diffusers_lora(seed=0), adapter_name="a")
    pipe.load_lora_weights(wan_lora(seed=1), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    dit.load_lora(diffusers_lora(seed=0), name="a")
    dit.load_lora(wan_lora(seed=1), scale=0.5, name="b")
    expect, got = outputs(wan, dit)
    assert rel_err(got, expect) <= 1e-5
    dit.unload_lora("a")
    pipe.delete_adapters("a")
    expect, got = outputs(wan, dit)
    assert rel_err(got, expect) <= 1e-5
    dit.unload_lora()
    assert dit.loras == {}
    after = dit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_in_bf16_is_fused_in_float32_and_unloads_bitwise():
    wan = make_wan()
    dit = DiT.from_diffusers(wan).eval().to(torch.bfloat16)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    dit.load_lora(diffusers_lora())
    weight = dit.blocks[0].self_attn.q.weight
    lora = diffusers_lora()
    a, b = lora["transformer.blocks.0.attn1.to_q.lora_A.weight"], lora["transformer.blocks.0.attn1.to_q.lora_B.weight"]
    expect = (before["blocks.0.self_attn.q.weight"].float() + b @ a).to(torch.bfloat16)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expect)
    dit.unload_lora()
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_patched_transformer_keeps_the_diffusers_adapter():
    import fastdit

    wan = make_wan()
    pipe = pipeline(wan)
    pipe.load_lora_weights(diffusers_lora(), adapter_name="style")
    x, t, text = inputs()
    with torch.no_grad():
        expect = wan(x, t, text)[0]
        pipe.disable_lora()
        without = wan(x, t, text)[0]
        pipe.enable_lora()
        fastdit.patch(pipe, backend="torch")  # fastdit's ops (a CPU's default patch runs diffusers' code)
        try:
            got = wan(x, t, text)[0]
        finally:
            fastdit.unpatch(pipe)
    assert rel_err(expect, without) > 1e-2
    assert rel_err(got, expect) <= 1e-5


@pytest.mark.bad_input
def test_bad_loras_are_refused_before_any_weight_changes(tmp_path):
    dit = DiT.from_diffusers(make_wan()).eval()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    good = diffusers_lora()
    cases = {
        "unknown module": (
            {
                **good,
                "transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(3, HIDDEN),
                "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(HIDDEN, 3),
            },
            "name no module of this DiT",
        ),  # fmt: skip
        "stray key": ({**good, "transformer.something": torch.zeros(1)}, "name no module"),
        "only A": ({k: v for k, v in good.items() if "proj_out.lora_B" not in k}, "only one of its down"),
        "rank mismatch": ({**good, "transformer.proj_out.lora_A.weight": torch.zeros(2, HIDDEN)}, "are not"),
        "wrong shape": ({**good, "transformer.proj_out.lora_A.weight": torch.zeros(3, HIDDEN + 1)}, "does not fit"),
        "bad bias": ({**good, "transformer.proj_out.lora_B.bias": torch.zeros(5)}, "fits no bias"),
        "empty": ({}, "has no lora_A"),
    }
    for label, (state, match) in cases.items():
        with pytest.raises(WeightLoadError, match=match):
            dit.load_lora(state)
        assert dit.loras == {}, label
    bad_meta = tmp_path / "meta.safetensors"
    save_file(good, str(bad_meta), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(WeightLoadError, match="is not JSON"):
        dit.load_lora(bad_meta)
    pickle = tmp_path / "lora.safetensors"
    pickle.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(WeightLoadError, match="pickled"):
        dit.load_lora(pickle)
    with pytest.raises(ValueError, match="finite"):
        dit.load_lora(good, scale=float("nan"))
    dit.load_lora(good, name="x")
    with pytest.raises(ValueError, match="already loaded"):
        dit.load_lora(good, name="x")
    with pytest.raises(KeyError, match="no LoRA named 'y'"):
        dit.unload_lora("y")
    dit.unload_lora("x")
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_adversarial_loras_are_refused_by_name_and_leave_the_model_as_it_was(tmp_path):
    """Each case is one defect a probe found: accepted when it should be refused (transposed A and
    B passed the element count, NaN / inf tensors and alpha, a key present with and without its
    prefix kept one silently) or refused with a raw IndexError / ZeroDivisionError /
    AttributeError / OverflowError. Catches any check removed, and a failed load (a meta tensor
    found after an earlier module was fused) that leaves the adapter listed or a weight changed."""
    dit = DiT.from_diffusers(make_wan()).eval()
    dit.load_lora(diffusers_lora(seed=5), scale=0.5, name="kept")  # an adapter already fused
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    good = diffusers_lora()
    a, b = "transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight"
    q = "transformer.blocks.0.attn1.to_q"
    nan = good[a].clone()
    nan[0, 0] = float("nan")
    cases = {
        "A and B transposed": ({**good, a: good[b].T.contiguous(), b: good[a].T.contiguous()}, "swapped or transposed"),
        "A and B exchanged": (
            {**good, a: torch.randn(3, TINY["out_channels"] * 4), b: torch.randn(HIDDEN, 3)},
            "does not fit",
        ),  # fmt: skip
        "NaN in A": ({**good, a: nan}, "NaN or inf"),
        "inf in B": ({**good, b: torch.full_like(good[b], float("inf"))}, "NaN or inf"),
        "NaN alpha": ({**good, f"{q}.alpha": torch.tensor(float("nan"))}, "NaN or inf"),
        "inf alpha": ({**good, f"{q}.alpha": torch.tensor(float("inf"))}, "NaN or inf"),
        "alpha of two numbers": ({**good, f"{q}.alpha": torch.tensor([1.0, 2.0])}, "one number"),
        "1-D A": ({**good, a: torch.zeros(HIDDEN)}, "are not"),
        "0-d B": ({**good, b: torch.tensor(1.0)}, "are not"),
        "rank 0": ({**good, a: torch.zeros(0, HIDDEN), b: torch.zeros(TINY["out_channels"] * 4, 0)}, "rank 0"),
        "integer A": ({**good, a: torch.ones(3, HIDDEN, dtype=torch.int64)}, "floating point"),
        "not a tensor": ({**good, a: [[1.0]]}, "not a tensor"),
        "prefixed and not": ({**good, a.removeprefix("transformer."): good[a]}, "name the same tensor"),
        "A and lora_down": ({**good, f"{q}.lora_down.weight": good[f"{q}.lora_A.weight"]}, "keep one pair"),
        "meta B, after fused modules": ({**good, b: torch.empty(TINY["out_channels"] * 4, 3, device="meta")}, "meta"),
    }
    for label, (state, match) in cases.items():
        with pytest.raises(WeightLoadError, match=match):
            dit.load_lora(state)
        assert dit.loras == {"kept": 0.5}, label
        assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items()), label
    for scale in (10**400, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="finite number"):
            dit.load_lora(good, scale=scale)
    metadata_cases = {
        "a list": ([3, 6], "must be a JSON object"),
        "negative rank": ({"r": -3, "lora_alpha": 6}, "positive int"),
        "rank 0": ({"r": 0, "lora_alpha": 6}, "positive int"),
        "string rank": ({"r": "3", "lora_alpha": 6}, "positive int"),
        "NaN alpha": ({"r": 3, "lora_alpha": float("nan")}, "finite number"),
        "list alpha": ({"r": 3, "lora_alpha": [6]}, "finite number"),
    }
    for label, (adapter, match) in metadata_cases.items():
        path = tmp_path / "meta.safetensors"
        save_file(good, str(path), metadata={"lora_adapter_metadata": json.dumps(adapter)})
        with pytest.raises(WeightLoadError, match=match):
            dit.load_lora(path)
        assert dit.loras == {"kept": 0.5}, label
    dit.unload_lora("kept")
    assert dit.loras == {}


def test_i2v_lora_on_the_image_projections_matches_diffusers():
    from tests.models.test_dit_diffusers_parity import I2V

    wan = make_wan(**I2V)
    dit = DiT.from_diffusers(wan).eval()
    gen = torch.Generator().manual_seed(3)
    state = {}
    for module in (
        "blocks.0.attn2.add_k_proj",
        "blocks.1.attn2.add_v_proj",
        "condition_embedder.image_embedder.ff.net.2",
    ):
        fan_in = 8 if "image_embedder" in module else HIDDEN
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(2, fan_in, generator=gen) * 0.3
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(HIDDEN, 2, generator=gen) * 0.3
    pipe = pipeline(wan)
    pipe.load_lora_weights(state, adapter_name="i2v")
    dit.load_lora(state)
    x, t, text, image = (
        torch.randn(1, 12, 2, 4, 4),
        torch.tensor([600.0]),
        torch.randn(1, 512, 16),
        torch.randn(1, 3, 8),
    )
    with torch.no_grad():
        expect = wan(x, t, text, encoder_hidden_states_image=image)[0]
        pipe.disable_lora()
        without = wan(x, t, text, encoder_hidden_states_image=image)[0]
        got = dit(x, t, text, image)
    assert rel_err(expect, without) > 1e-2
    assert rel_err(got, expect) <= 1e-5

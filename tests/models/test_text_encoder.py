"""Prompt encoding: fastdit's PromptEncoder against diffusers' ``WanPipeline.encode_prompt``."""

import pytest
import torch

pytest.importorskip("transformers", reason="prompt encoding needs `pip install -e .[text]`")
from fastdit.models.wan.text_encoder import MAX_LENGTH, PromptEncoder, clean_prompt  # noqa: E402

PROMPTS = ["a red fox running through snow", "  two   cats &amp;amp; a dog\n\tat dusk ", "x" * 700, ""]


@pytest.fixture(scope="module")
def tiny():
    return PromptEncoder.tiny(16, seed=3)


def test_tiny_encoder_needs_no_files_and_is_seeded(tiny):
    again = PromptEncoder.tiny(16, seed=3)
    other = PromptEncoder.tiny(16, seed=4)
    a, b, c = (e.encode(PROMPTS[0]) for e in (tiny, again, other))
    assert a.shape == (1, MAX_LENGTH, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    used = int((a[0].abs().sum(-1) > 0).sum())
    assert used == len(PROMPTS[0].encode()) + 1  # one token per byte, then </s>; zeros after


def test_encoding_matches_wan_pipeline_encode_prompt(tiny):
    pytest.importorskip("diffusers", reason="the parity test needs `pip install -e .[diffusers]`")
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=None, transformer=None,
                       scheduler=None)  # fmt: skip
    with torch.no_grad():  # as in WanPipeline.__call__ (grad mode changes the encoder's attention kernel)
        expect, negative = pipe.encode_prompt(PROMPTS, negative_prompt=["blurry"] * len(PROMPTS),
                                              max_sequence_length=MAX_LENGTH, device=torch.device("cpu"))  # fmt: skip
    assert torch.equal(tiny.encode(PROMPTS), expect)
    assert torch.equal(tiny.encode(["blurry"] * len(PROMPTS)), negative)
    assert int((expect[2].abs().sum(-1) > 0).sum()) == MAX_LENGTH  # 700 bytes truncated to 512 tokens


def test_from_pretrained_reads_a_checkpoints_folders(tmp_path, tiny):
    tiny.tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny.text_encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = PromptEncoder.from_pretrained(str(tmp_path))
    assert loaded.text_dim == 16
    assert torch.equal(loaded.encode(PROMPTS[:2]), tiny.encode(PROMPTS[:2]))


@pytest.mark.bad_input
def test_bad_prompts_and_folders(tmp_path, tiny):
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tiny.encode([])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tiny.encode([3])
    with pytest.raises(FileNotFoundError, match="no text_encoder/ folder"):
        PromptEncoder.from_pretrained(str(tmp_path))


def test_clean_prompt_is_diffusers_prompt_clean():
    pytest.importorskip("diffusers", reason="the comparison needs `pip install -e .[diffusers]`")
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in PROMPTS + ["caf\u00e9 &lt;b&gt;", "\u00a0non\u2009breaking  spaces"]:
        assert clean_prompt(text) == prompt_clean(text)

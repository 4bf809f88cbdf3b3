"""Prompt encoding for Wan: the checkpoint's UMT5 encoder and tokenizer, through transformers.

:class:`PromptEncoder` encodes exactly as diffusers' ``WanPipeline.encode_prompt`` does: the
prompt cleaned (ftfy when installed, HTML entities unescaped twice, whitespace collapsed),
tokenized with padding to ``max_length`` (512) and truncation, encoded with the attention mask,
then the states past each prompt's own length replaced by zeros. The result is what the DiT's
cross-attention takes, ``(max_length, text_dim)`` per prompt.

:meth:`PromptEncoder.tiny` builds a randomly initialised UMT5 with a byte-level tokenizer made in
code (no downloaded files), for the tiny preset and tests.
"""

import html
import importlib.util
import os
import re
from collections.abc import Sequence

import torch

MAX_LENGTH = 512  # WanPipeline's max_sequence_length


def transformers_missing() -> str | None:
    """Why prompts cannot be encoded here (None when transformers is installed)."""
    if importlib.util.find_spec("transformers") is None:
        return 'encoding prompts needs transformers: pip install "fastdit[text]" (or -e ".[text]" in a checkout)'
    return None


def checkpoint_folders(directory: str, folders: Sequence[str], kind: str) -> list[str]:
    """The paths of ``folders`` inside a diffusers checkpoint ``directory`` (transformers must be
    installed); an ``ImportError`` / ``FileNotFoundError`` naming what is missing."""
    reason = transformers_missing()
    if reason:
        raise ImportError(reason)
    paths = [os.path.join(directory, folder) for folder in folders]
    for folder, path in zip(folders, paths):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{directory} has no {folder}/ folder (a {kind} checkpoint has one)")
    return paths


def clean_prompt(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ftfy's fixes (if installed), HTML unescaped twice, one space."""
    if importlib.util.find_spec("ftfy") is not None:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptEncoder:
    """A UMT5 encoder and its tokenizer; ``encode(prompts) -> (B, max_length, text_dim)``.

    Args:
        tokenizer: a transformers tokenizer (T5 / UMT5's, or :meth:`tiny`'s).
        text_encoder: a transformers ``UMT5EncoderModel`` (anything returning ``last_hidden_state``).
        max_length: tokens per prompt, padded or truncated to (512 for Wan).
    """

    def __init__(self, tokenizer, text_encoder, max_length: int = MAX_LENGTH):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer, self.text_encoder, self.max_length = tokenizer, text_encoder.eval(), max_length

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.d_model)

    @classmethod
    def from_pretrained(cls, directory: str, *, dtype: torch.dtype | None = None, device=None) -> "PromptEncoder":
        """The ``text_encoder/`` and ``tokenizer/`` folders of a diffusers Wan checkpoint ``directory``."""
        encoder_path, tokenizer_path = checkpoint_folders(directory, ("text_encoder", "tokenizer"), "diffusers Wan")
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        encoder = UMT5EncoderModel.from_pretrained(encoder_path, dtype=dtype)
        return cls(tokenizer, encoder.to(device) if device is not None else encoder)

    @classmethod
    def tiny(cls, text_dim: int, seed: int = 0, max_length: int = MAX_LENGTH) -> "PromptEncoder":
        """A random two-layer UMT5 of width ``text_dim`` and a byte-level tokenizer built in code."""
        reason = transformers_missing()
        if reason:
            raise ImportError(reason)
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = byte_tokenizer()
        config = UMT5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2,
                            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                            dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = UMT5EncoderModel(config)
        return cls(tokenizer, encoder, max_length=max_length)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PromptEncoder":
        self.text_encoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, max_length, text_dim)`` in the encoder's dtype, zeros past each prompt's tokens."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        states = self.text_encoder(ids, mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None]
        return states.masked_fill(~keep[..., None], 0.0)


def byte_tokenizer():
    """A T5-style tokenizer with no files: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the 256
    byte-level symbols (BPE without merges), ``</s>`` appended to every sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

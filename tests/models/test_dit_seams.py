"""The DiT's public seams for the runtime: forward_validated and attention_hook."""

import pytest
import torch

from fastdit.models import DiT, PackedBatch


def _batch(model):
    cfg = model.config
    latents = [torch.randn(cfg.in_channels, 2, 4, 4), torch.randn(cfg.in_channels, 1, 4, 6)]
    return PackedBatch.from_samples(latents, torch.tensor([10.0, 500.0]), [torch.randn(3, cfg.text_dim)] * 2,
                                    cfg.patch_size)  # fmt: skip


def test_attention_hook_routes_self_attention_and_is_removed_by_its_owner():
    """Catches a hook left installed after the call that set it (the model on its own would keep
    calling a sequence-parallel wrapper), or one that survives an exception."""
    torch.manual_seed(0)
    model = DiT.from_preset("tiny").eval()
    batch = _batch(model)
    seen = []

    def hook(q, k, v, local):
        seen.append(q.shape)
        return None  # plain attention

    with torch.no_grad():
        plain = model.forward_packed(batch)
        with model.attention_hook(hook):
            hooked = model.forward_packed(batch)
            with pytest.raises(RuntimeError, match="do not nest"), model.attention_hook(hook):
                pass
        assert len(seen) == len(model.blocks) and torch.equal(hooked, plain)
        with pytest.raises(ZeroDivisionError), model.attention_hook(lambda *a: 1 / 0):
            model.forward_packed(batch)
        assert all(block.self_attn.sequence_parallel is None for block in model.blocks)
        model.forward_packed(batch)  # no hook left behind


def test_forward_validated_is_forward_packed_without_its_checks():
    """Catches the public unchecked forward drifting from the checked one."""
    from fastdit.ops.validation import values_checked

    torch.manual_seed(0)
    model = DiT.from_preset("tiny").eval()
    batch = _batch(model)
    with torch.no_grad(), values_checked():
        assert torch.equal(model.forward_validated(batch), model.forward_packed(batch))

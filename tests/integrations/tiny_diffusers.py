"""Tiny random configurations of diffusers' video transformers (and the image ones that share
their attention code), with inputs for one forward: the fixtures of the drop-in survey
(tests/integrations/test_diffusers_models.py and scripts/diffusers_support.py, which writes the
README's support table).

Sizes are the smallest each model accepts; where a model takes a text mask, sample 1 of the
batch is padded (its last text tokens masked), so the key-padding path is exercised and checked.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyModel:
    name: str  # the README row
    cls: str  # the diffusers class
    init: dict
    inputs: Callable[[torch.Generator], dict]
    grads: tuple[str, ...] = ("hidden_states", "encoder_hidden_states")  # the inputs whose gradients are compared


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _text_mask(batch: int, length: int, dtype=torch.bool) -> torch.Tensor:
    """Sample 0 keeps every token, sample 1 its first ``length - 3``."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1:, length - 3 :] = False
    return mask.to(dtype)


def _t(gen, batch):
    return torch.randint(1, 1000, (batch,), generator=gen).float()


WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)  # fmt: skip


def _wan_inputs(gen, channels=4):
    return dict(hidden_states=_randn(gen, 2, channels, 2, 8, 8), timestep=_t(gen, 2),
                encoder_hidden_states=_randn(gen, 2, 6, 16))  # fmt: skip


def _hunyuan_inputs(gen):
    return dict(hidden_states=_randn(gen, 2, 4, 2, 8, 8), timestep=_t(gen, 2),
                encoder_hidden_states=_randn(gen, 2, 12, 16), pooled_projections=_randn(gen, 2, 8),
                encoder_attention_mask=_text_mask(2, 12, torch.float32), guidance=_t(gen, 2))  # fmt: skip


def _hunyuan15_inputs(gen):
    return dict(hidden_states=_randn(gen, 2, 4, 2, 8, 8), timestep=_t(gen, 2),
                encoder_hidden_states=_randn(gen, 2, 6, 16), encoder_hidden_states_2=_randn(gen, 2, 4, 8),
                encoder_attention_mask=_text_mask(2, 6, torch.float32),
                encoder_attention_mask_2=torch.ones(2, 4), image_embeds=torch.zeros(2, 3, 12))  # fmt: skip


def _framepack_inputs(gen):
    frames = 3
    return dict(
        hidden_states=_randn(gen, 2, 4, frames, 4, 4), timestep=_t(gen, 2),
        encoder_hidden_states=_randn(gen, 2, 12, 16), pooled_projections=_randn(gen, 2, 8),
        encoder_attention_mask=_text_mask(2, 12, torch.float32), guidance=_t(gen, 2),
        image_embeds=_randn(gen, 2, 12, 16), indices_latents=torch.arange(frames),
        latents_clean=_randn(gen, 2, 4, frames - 1, 4, 4), indices_latents_clean=torch.arange(frames - 1),
        latents_history_2x=_randn(gen, 2, 4, frames - 1, 4, 4), indices_latents_history_2x=torch.arange(frames - 1),
        latents_history_4x=_randn(gen, 2, 4, (frames - 1) * 4, 4, 4),
        indices_latents_history_4x=torch.arange((frames - 1) * 4),
    )  # fmt: skip


def _ltx_inputs(gen):
    return dict(hidden_states=_randn(gen, 2, 2 * 4 * 4, 4), encoder_hidden_states=_randn(gen, 2, 8, 16),
                timestep=_t(gen, 2), encoder_attention_mask=_text_mask(2, 8), num_frames=2, height=4,
                width=4)  # fmt: skip


def _ltx2_inputs(gen):
    return dict(hidden_states=_randn(gen, 2, 2 * 4 * 4, 4), audio_hidden_states=_randn(gen, 2, 5, 4),
                encoder_hidden_states=_randn(gen, 2, 8, 16), audio_encoder_hidden_states=_randn(gen, 2, 8, 16),
                timestep=_t(gen, 2), encoder_attention_mask=_text_mask(2, 8), num_frames=2, height=4, width=4,
                audio_num_frames=5, fps=25.0)  # fmt: skip


def _minimax_inputs(gen):
    text, audio, video = 4, 6, 8
    length = text + audio + video
    text_idx, audio_idx = torch.arange(text), torch.arange(text, text + audio)
    video_idx = torch.arange(text + audio, length)
    tags = torch.zeros(length, dtype=torch.long)
    tags[text_idx], tags[audio_idx] = 1, 2
    t_idx = torch.zeros(length, dtype=torch.long)
    t_idx[audio_idx] = 1
    pos = torch.zeros(length, 3)
    pos[:, 0] = torch.arange(length, dtype=torch.float32)
    pos[video_idx, 1] = torch.arange(video, dtype=torch.float32) % 4
    pos[video_idx, 2] = torch.arange(video, dtype=torch.float32) % 2
    return dict(hidden_states=_randn(gen, 2, video, 16), audio_hidden_states=_randn(gen, 2, audio, 6),
                encoder_hidden_states=_randn(gen, 2, text, 8), timestep=torch.tensor([0.7, 0.3]),
                timestep_indices=t_idx, token_tags=tags, position_ids=pos, video_indices=video_idx,
                audio_indices=audio_idx, text_indices=text_idx)  # fmt: skip


def _helios_inputs(gen):
    frames = 2
    return dict(
        hidden_states=_randn(gen, 1, 4, frames, 8, 8), timestep=_t(gen, 1), encoder_hidden_states=_randn(gen, 1, 6, 16),
        indices_hidden_states=torch.ones(1, frames), indices_latents_history_short=torch.ones(1, frames - 1),
        indices_latents_history_mid=torch.ones(1, frames - 1), indices_latents_history_long=torch.ones(1, 4),
        latents_history_short=_randn(gen, 1, 4, frames - 1, 8, 8), latents_history_mid=_randn(gen, 1, 4, 1, 8, 8),
        latents_history_long=_randn(gen, 1, 4, 4, 8, 8),
    )  # fmt: skip


def _qwen_inputs(gen):
    import inspect

    import diffusers

    found = dict(hidden_states=_randn(gen, 2, 16, 16), encoder_hidden_states=_randn(gen, 2, 7, 16),
                 encoder_hidden_states_mask=_text_mask(2, 7, torch.float32), timestep=torch.rand(2, generator=gen),
                 img_shapes=[[(1, 4, 4)]] * 2)  # fmt: skip
    if "txt_seq_lens" in inspect.signature(diffusers.QwenImageTransformer2DModel.forward).parameters:
        found["txt_seq_lens"] = [7, 4]  # diffusers <= 0.36 took the text lengths beside the mask
    return found


def _kandinsky6_inputs(gen):
    return dict(hidden_states=_randn(gen, 1, 2, 4, 4, 9), encoder_hidden_states=_randn(gen, 1, 6, 8),
                pooled_projections=_randn(gen, 1, 8), timestep=_t(gen, 1),
                visual_rope_pos=[torch.arange(2), torch.arange(2), torch.arange(2)])  # fmt: skip


def _sana_wm_inputs(gen):
    frames, size = 4, 8
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1
    intrinsics = torch.tensor([float(size), float(size), size / 2, size / 2]).expand(1, frames, 4)
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 12:] = 0
    return dict(hidden_states=_randn(gen, 1, 4, frames, size, size), timestep=torch.full((1, 1, frames), 400.0),
                encoder_hidden_states=_randn(gen, 1, 1, 16, 8), encoder_attention_mask=mask,
                camera_conditions=torch.cat([c2w.flatten(start_dim=-2), intrinsics], dim=-1),
                chunk_plucker=_randn(gen, 1, 8, frames, size, size))  # fmt: skip


def _sana_wm_refiner_inputs(gen):
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed

    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=16, patch_size=1, patch_size_t=1, base_num_frames=20,
                                              base_height=2048, base_width=2048, scale_factors=(8, 32, 32),
                                              modality="video", double_precision=False,
                                              num_attention_heads=2)  # fmt: skip
    coords = rope.prepare_video_coords(2, 2, 4, 4, device="cpu", fps=24.0)
    return dict(hidden_states=_randn(gen, 2, 32, 4), encoder_hidden_states=_randn(gen, 2, 8, 16),
                timestep=torch.rand(2, 32, generator=gen) * 1000, video_rotary_emb=rope(coords, device="cpu"),
                encoder_attention_mask=_text_mask(2, 8, torch.float32))  # fmt: skip


def _flux_inputs(gen):
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=_randn(gen, 1, 16, 4), encoder_hidden_states=_randn(gen, 1, 6, 8),
                pooled_projections=_randn(gen, 1, 8), timestep=torch.rand(1, generator=gen), img_ids=ids,
                txt_ids=torch.zeros(6, 3))  # fmt: skip


# fmt: off
MODELS = [
    TinyModel("Wan 2.1 / 2.2", "WanTransformer3DModel", WAN, _wan_inputs),
    TinyModel("Wan VACE", "WanVACETransformer3DModel", {**WAN, "num_layers": 4, "vace_layers": [0, 2],
              "vace_in_channels": 12},
              lambda gen: {**_wan_inputs(gen), "control_hidden_states": _randn(gen, 2, 12, 2, 8, 8)}),
    TinyModel("SkyReels V2", "SkyReelsV2Transformer3DModel", WAN, _wan_inputs),
    TinyModel("ChronoEdit", "ChronoEditTransformer3DModel", WAN, _wan_inputs),
    TinyModel("Wan Animate", "WanAnimateTransformer3DModel",
              {**WAN, "in_channels": 12, "latent_channels": 4, "image_dim": 16, "freq_dim": 256,
               "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16}, "motion_encoder_size": 16,
               "motion_style_dim": 8, "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16,
               "face_encoder_num_heads": 2, "inject_face_latents_blocks": 2},
              lambda gen: dict(hidden_states=_randn(gen, 1, 12, 21, 4, 4), timestep=_t(gen, 1),
                               encoder_hidden_states=_randn(gen, 1, 6, 16),
                               encoder_hidden_states_image=_randn(gen, 1, 4, 16),
                               pose_hidden_states=_randn(gen, 1, 4, 20, 4, 4),
                               face_pixel_values=_randn(gen, 1, 3, 77, 16, 16))),
    TinyModel("HunyuanVideo", "HunyuanVideoTransformer3DModel",
              dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                   num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                   text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)), _hunyuan_inputs),
    TinyModel("HunyuanVideo 1.5", "HunyuanVideo15Transformer3DModel",
              dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                   num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                   text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
              _hunyuan15_inputs),
    TinyModel("HunyuanVideo Framepack", "HunyuanVideoFramepackTransformer3DModel",
              dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                   num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                   text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True,
                   image_proj_dim=16, has_clean_x_embedder=True), _framepack_inputs),
    TinyModel("CogVideoX", "CogVideoXTransformer3DModel",
              dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                   text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                   temporal_compression_ratio=4, max_text_seq_length=8),
              lambda gen: dict(hidden_states=_randn(gen, 2, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 8, 8),
                               timestep=_t(gen, 2))),
    TinyModel("ConsisID", "ConsisIDTransformer3DModel",
              dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                   text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                   temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False,
                   is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
                   LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1,
                   LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1),
              lambda gen: dict(hidden_states=_randn(gen, 2, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 8, 8),
                               timestep=_t(gen, 2), id_vit_hidden=[_randn(gen, 2, 2, 2)], id_cond=_randn(gen, 2, 2))),
    TinyModel("Mochi", "MochiTransformer3DModel",
              dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                   in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
                   activation_fn="swiglu", max_sequence_length=16),
              lambda gen: dict(hidden_states=_randn(gen, 2, 4, 2, 8, 8), encoder_hidden_states=_randn(gen, 2, 16, 16),
                               timestep=_t(gen, 2), encoder_attention_mask=_text_mask(2, 16))),
    TinyModel("Allegro", "AllegroTransformer3DModel",
              dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
                   cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
              lambda gen: dict(hidden_states=_randn(gen, 2, 4, 8, 8, 8), encoder_hidden_states=_randn(gen, 2, 16, 8),
                               timestep=_t(gen, 2), encoder_attention_mask=_text_mask(2, 16, torch.float32))),
    TinyModel("Latte", "LatteTransformer3DModel",
              dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                   caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
              lambda gen: dict(hidden_states=_randn(gen, 2, 4, 2, 8, 8), encoder_hidden_states=_randn(gen, 2, 8, 8),
                               timestep=_t(gen, 2), enable_temporal_attentions=True)),
    TinyModel("EasyAnimate", "EasyAnimateTransformer3DModel",
              dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
                   out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16,
                   time_embed_dim=8, time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
              lambda gen: dict(hidden_states=_randn(gen, 2, 4, 2, 8, 8), timestep=_t(gen, 2),
                               encoder_hidden_states=_randn(gen, 2, 8, 16))),
    TinyModel("LTX-Video", "LTXVideoTransformer3DModel",
              dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                   num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16), _ltx_inputs),
    TinyModel("LTX-2", "LTX2VideoTransformer3DModel",
              dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                   attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                   audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                   qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False), _ltx2_inputs),
    TinyModel("Cosmos", "CosmosTransformer3DModel",
              dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                   mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
                   rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
              lambda gen: dict(hidden_states=_randn(gen, 1, 4, 1, 16, 16), timestep=_t(gen, 1),
                               encoder_hidden_states=_randn(gen, 1, 12, 16), attention_mask=torch.ones(1, 12), fps=30,
                               padding_mask=torch.zeros(1, 1, 16, 16))),
    TinyModel("SanaVideo", "SanaVideoTransformer3DModel",
              dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                   num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
                   caption_channels=16, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8,
                   patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads",
                   rope_max_seq_len=32),
              lambda gen: dict(hidden_states=_randn(gen, 2, 16, 2, 8, 8), encoder_hidden_states=_randn(gen, 2, 12, 16),
                               timestep=_t(gen, 2), encoder_attention_mask=_text_mask(2, 12, torch.float32))),
    TinyModel("MotifVideo", "MotifVideoTransformer3DModel",
              dict(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
                   num_single_layers=1, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                   qk_norm="rms_norm", norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0,
                   rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=False,
                   enable_text_cross_attention_single=False),
              lambda gen: dict(hidden_states=_randn(gen, 2, 33, 3, 4, 4), encoder_hidden_states=_randn(gen, 2, 12, 32),
                               timestep=_t(gen, 2), encoder_attention_mask=_text_mask(2, 12, torch.float32))),
    TinyModel("MiniMax-H3", "MiniMaxH3Transformer3DModel",
              dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=2,
                   ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
                   time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2), _minimax_inputs),
    TinyModel("Helios", "HeliosTransformer3DModel",
              dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                   text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
                   guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False), _helios_inputs),
    TinyModel("Kandinsky 5", "Kandinsky5Transformer3DModel",
              dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
                   model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
              lambda gen: dict(hidden_states=_randn(gen, 1, 2, 8, 8, 4), encoder_hidden_states=_randn(gen, 1, 6, 16),
                               timestep=_t(gen, 1), pooled_projections=_randn(gen, 1, 8),
                               visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                               text_rope_pos=torch.arange(6))),
    TinyModel("AnyFlow", "AnyFlowTransformer3DModel",
              {**WAN, "cross_attn_norm": True, "freq_dim": 256, "gate_value": 0.25, "deltatime_type": "r"},
              lambda gen: dict(hidden_states=_randn(gen, 1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                               r_timestep=torch.full((1, 2), 250.0), encoder_hidden_states=_randn(gen, 1, 6, 16))),
    TinyModel("Kandinsky 6", "Kandinsky6Transformer3DModel",
              dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
                   model_dim=48, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4),
                   visual_cond=True, in_audio_dim=4, out_audio_dim=4),
              _kandinsky6_inputs),
    TinyModel("Sana-WM", "SanaWMTransformer3DModel",
              dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1),
                   softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=8,
                   mlp_ratio=2.0, chunk_plucker_channels=8, chunk_plucker_post_attn_blocks=2, image_size=64),
              _sana_wm_inputs),
    TinyModel("JoyImage Edit", "JoyImageEditTransformer3DModel",
              dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16,
                   num_layers=2, rope_dim_list=[4, 6, 6], theta=256),
              lambda gen: dict(hidden_states=_randn(gen, 1, 16, 1, 4, 4), encoder_hidden_states=_randn(gen, 1, 12, 16),
                               timestep=torch.tensor([1.0]))),
    TinyModel("JoyImage Edit Plus", "JoyImageEditPlusTransformer3DModel",
              dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16,
                   num_layers=2, rope_dim_list=[4, 6, 6], theta=256),
              lambda gen: dict(hidden_states=_randn(gen, 1, 2, 16, 1, 2, 2), timestep=torch.tensor([1.0]),
                               encoder_hidden_states=_randn(gen, 1, 12, 16), shape_list=[[(1, 1, 1), (1, 1, 1)]])),
    TinyModel("Sana-WM LTX-2 refiner", "SanaWMLTX2RefinerTransformer3DModel",
              dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                   attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                   audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                   qk_norm="rms_norm_across_heads", caption_channels=16, rope_double_precision=False),
              _sana_wm_refiner_inputs),
    TinyModel("Flux (image)", "FluxTransformer2DModel",
              dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(4, 4, 8)),
              _flux_inputs),
    TinyModel("QwenImage (image)", "QwenImageTransformer2DModel",
              dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)), _qwen_inputs),
    TinyModel("SD3 (image)", "SD3Transformer2DModel",
              dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
                   out_channels=4, pos_embed_max_size=16),
              lambda gen: dict(hidden_states=_randn(gen, 2, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 6, 16),
                               pooled_projections=_randn(gen, 2, 8), timestep=_t(gen, 2))),
]
# fmt: on


def build(spec: TinyModel):
    """The model on CPU in float32, eval mode, every weight random (diffusers zero-initialises
    output projections and gates, which would make an output identically 0 and a parity check
    vacuous)."""
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, spec.cls)(**spec.init).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.abs().any():
                p.normal_(0.0, 0.05)
    return model


def inputs(spec: TinyModel) -> dict:
    return spec.inputs(torch.Generator().manual_seed(1))


class CountSDPA(torch.overrides.TorchFunctionMode):
    """Counts the ``F.scaled_dot_product_attention`` calls that reach torch inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = self.masked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
            self.masked += (args[3] if len(args) > 3 else kwargs.get("attn_mask")) is not None
        return func(*args, **kwargs)


class ExactSDPA(torch.overrides.TorchFunctionMode):
    """Inside the block, torch SDPA computes in float64 and casts back: exact attention, the
    baseline for a model that amplifies each attention's float32 rounding."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        dtype = (args[0] if args else kwargs["query"]).dtype
        wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        kwargs = {n: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for n, v in kwargs.items()}  # fmt: skip
        return func(*wide, **kwargs).to(dtype)


@dataclass
class Survey:
    """One transformer run by diffusers' default attention and patched by fastdit."""

    spec: TinyModel
    changes: list[str]  # what fastdit.patch changed and left
    native_sdpa_calls: int  # torch SDPA calls of the unpatched forward
    native_masked: int  # of those, calls with an attn_mask
    served: int  # attention ops fastdit dispatched in the patched forward
    varlen: int  # of those, masked calls run on the packed varlen kernel
    escaped: int  # torch SDPA calls in the patched forward that fastdit did not serve
    fallbacks: int  # calls fastdit reported and ran elsewhere
    out_err: float
    grad_err: float  # the largest over the compared inputs
    error: str | None = None  # a refusal (BackendNotSupportedError / ValueError) instead of a result
    # Where the two fp32 runs differ by more than 1e-5: (forward, input-gradient) errors of diffusers'
    # default and of fastdit against the model run with exact attention (torch SDPA in float64, cast
    # back): a model that amplifies fp32 rounding (Sana-WM) is judged by whose attention is closer.
    against_exact: tuple[tuple[float, float], tuple[float, float]] | None = None

    def accurate(self, tolerance: float = 1e-5, slack: float = 1.5) -> bool:
        """Equal to diffusers' default within ``tolerance``, or its attention no farther from exact
        attention than the default's (within ``slack``)."""
        if self.out_err <= tolerance and self.grad_err <= tolerance:
            return True
        if self.against_exact is None:
            return False
        (native_out, native_grad), (fast_out, fast_grad) = self.against_exact
        return fast_out <= slack * native_out and fast_grad <= slack * native_grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def survey(spec: TinyModel, backend: str | None = "torch") -> Survey:
    """Forward and input gradients of ``spec``'s model with diffusers' default attention, then
    patched by ``fastdit.patch(model, backend=backend)``: the errors, and who ran each call."""
    import fastdit
    from fastdit.ops import dispatch

    model, kwargs = build(spec), inputs(spec)

    def run(model=model, kwargs=kwargs):
        leaves = {n: kwargs[n].clone().requires_grad_() for n in spec.grads if isinstance(kwargs.get(n), torch.Tensor)}
        with CountSDPA() as count, dispatch.trace() as log:
            out = model(**{**kwargs, **leaves}, return_dict=False)[0]
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        (out * weight).sum().backward()
        return out.detach(), {n: t.grad for n, t in leaves.items()}, count, log

    expect, expect_grads, native, _ = run()
    before = sum(dispatch.fallbacks().values())
    changes = fastdit.patch(model, backend=backend)
    try:
        got, grads, patched, log = run()
    except (ValueError, TypeError) as refused:
        return Survey(spec, changes, native.calls, native.masked, 0, 0, 0, 0, float("nan"), float("nan"),
                      f"{refused}")  # fmt: skip
    finally:
        fastdit.unpatch(model)
    ops = [op for op, ran in log if op in ("attention", "varlen_attention") and not ran.startswith("fallback")]
    fallbacks = sum(dispatch.fallbacks().values()) - before  # each ran torch SDPA once, reported
    grad_err = max((_rel(grads[n], expect_grads[n]) for n in grads), default=0.0)
    result = Survey(spec, changes, native.calls, native.masked, len(ops), ops.count("varlen_attention"),
                    patched.calls - fallbacks, fallbacks, _rel(got, expect), grad_err)  # fmt: skip
    if not result.accurate():
        with ExactSDPA():
            exact, exact_grads, *_ = run()

        def errors(out, out_grads):
            return _rel(out, exact), max((_rel(out_grads[n], exact_grads[n]) for n in out_grads), default=0.0)

        result.against_exact = (errors(expect, expect_grads), errors(got, grads))
    return result

"""LoRA adapters fused into a :class:`fastdit.models.DiT`'s weights, exactly reversibly.

Formats read (a ``.safetensors`` file or a state dict):

- diffusers / PEFT keys: ``[transformer.|base_model.model.]<diffusers module>.lora_A.weight``,
  ``.lora_B.weight`` and optionally ``.lora_B.bias``; the scale ``lora_alpha / r`` comes from the
  file's ``lora_adapter_metadata`` (what diffusers' ``save_lora_weights`` writes), 1 without it;
- every layout diffusers' ``WanLoraLoaderMixin.lora_state_dict`` converts (the original Wan
  layout ``diffusion_model.<wan module>.lora_down / lora_up / alpha / diff_b``, musubi's
  ``lora_unet_*``): diffusers' own converter is used, so those need diffusers installed.

A module's update is ``delta W = scale * s * B @ A`` (``s`` the file's alpha / rank scale,
``scale`` the user's) and ``delta b = scale * s * b_B``, what PEFT's unfused forward adds. Fusing
computes ``W0 + sum of the loaded adapters' deltas`` in float32 from the original weight ``W0``
(kept on the CPU the first time an adapter touches it) and casts once, so loading costs no
step-time and unloading writes ``W0`` back bit for bit. The weights are updated in place: CUDA
graphs captured before keep reading them.
"""

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from fastdit.models.wan.weights import diffusers_key_to_fastdit
from fastdit.models.weights import WeightLoadError, read_safetensors

_PREFIXES = ("transformer.", "base_model.model.", "unet.")
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_down\.weight|"
                   r"lora_up\.weight|alpha)$")  # fmt: skip


@dataclass
class _Update:
    """One module's low-rank update: ``down (r, in...)``, ``up (out, r...)``, optional bias, scale."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    bias: torch.Tensor | None
    scale: float

    def weight_delta(self, shape: torch.Size) -> torch.Tensor:
        # (out, r) @ (r, in...): the product must be the weight's own (out, in...) matrix, not just
        # as many elements (A and B each transposed give (in, out), which a reshape would accept)
        want = (shape[0], shape[1:].numel())
        got = (self.up.shape[0], self.down.flatten(1).shape[1])
        if got != want:
            raise WeightLoadError(
                f"a LoRA update of up {tuple(self.up.shape)} x down {tuple(self.down.shape)} = {got} does not fit a "
                f"weight of {tuple(shape)} (out, in...): are lora_A / lora_B swapped or transposed?"
            )
        delta = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return delta.reshape(shape) * self.scale


def _check_lora_tensor(module: str, part: str, value) -> None:
    """A LoRA tensor must be a real floating tensor with data and finite values."""
    where = f"LoRA module {module}: {part}"
    if not isinstance(value, torch.Tensor):
        raise WeightLoadError(f"{where} is a {type(value).__name__}, not a tensor")
    if value.is_meta:
        raise WeightLoadError(f"{where} is a meta tensor (no data)")
    if not value.is_floating_point():
        raise WeightLoadError(f"{where} must be floating point, got {value.dtype}")
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise WeightLoadError(f"{where} holds NaN or inf")


def read_lora(source) -> tuple[dict[str, torch.Tensor], float | None]:
    """(state dict, alpha / r from the file's adapter metadata or None) of a path or a state dict."""
    if isinstance(source, dict):
        return dict(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a LoRA is a .safetensors path or a state dict, got {type(source).__name__}")
    path = os.fspath(source)
    state_dict = read_safetensors(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return state_dict, None
    return state_dict, _metadata_scale(path, raw)


def _metadata_scale(path: str, raw: str) -> float:
    """``lora_alpha / r`` of a file's ``lora_adapter_metadata`` JSON, every field checked."""
    try:
        adapter = json.loads(raw)
    except ValueError as err:
        raise WeightLoadError(f"{path}: lora_adapter_metadata is not JSON ({err})") from err
    if not isinstance(adapter, dict):
        raise WeightLoadError(f"{path}: lora_adapter_metadata must be a JSON object, got {type(adapter).__name__}")
    adapter = {str(k).removeprefix("transformer."): v for k, v in adapter.items()}  # a pipeline's save prefixes
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern"):
        raise WeightLoadError(f"{path}: per-module rank_pattern / alpha_pattern adapters are not supported")
    alpha, rank = adapter.get("lora_alpha"), adapter.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise WeightLoadError(f"{path}: lora_adapter_metadata's r must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise WeightLoadError(f"{path}: lora_adapter_metadata's lora_alpha must be a finite number, got {alpha!r}")
    return float(alpha) / rank


def to_diffusers_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys in diffusers' module names (prefix dropped), converting other layouts with diffusers."""
    if any(k.startswith(("diffusion_model.", "lora_unet_")) for k in state_dict):
        try:
            from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
        except ImportError as err:
            raise WeightLoadError(
                "this LoRA is in the original Wan (or musubi) layout; fastdit converts it with diffusers' own "
                'converter: pip install "fastdit[diffusers]"'
            ) from err
        try:
            state_dict = WanLoraLoaderMixin.lora_state_dict(dict(state_dict))
        except (ValueError, KeyError) as err:
            raise WeightLoadError(f"diffusers' Wan LoRA converter cannot read this LoRA: {err}") from err
    out, source = {}, {}
    for original in state_dict:
        if not isinstance(original, str):
            raise WeightLoadError(f"LoRA keys must be strings, got {original!r}")
        key = original
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key in out:
            raise WeightLoadError(f"LoRA keys {source[key]!r} and {original!r} name the same tensor: keep one")
        out[key], source[key] = state_dict[original], original
    return out


def parse_lora(state_dict: dict[str, torch.Tensor], file_scale: float | None, model_params: dict | None) -> dict:
    """fastdit parameter name -> :class:`_Update` for a diffusers-layout LoRA; every key must name a
    module of the model, or a :class:`WeightLoadError` lists those that do not. With
    ``model_params=None`` only what needs no model is checked (names, tensors, ranks, alphas)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        found = _PART.match(key)
        if found is None:
            unknown.append(key)
            continue
        modules.setdefault(found["module"], {})[found["part"]] = value
    updates = {}
    for module, parts in sorted(modules.items()):
        target = diffusers_key_to_fastdit(module + ".weight")
        if target is None or (model_params is not None and target not in model_params):
            unknown.append(f"{module}.*")
            continue
        if ("lora_A.weight" in parts and "lora_down.weight" in parts) or (
            "lora_B.weight" in parts and "lora_up.weight" in parts
        ):
            raise WeightLoadError(f"LoRA module {module}: has both lora_A/B and lora_down/up matrices: keep one pair")
        for part, value in parts.items():
            _check_lora_tensor(module, part, value)
        down = parts.get("lora_A.weight", parts.get("lora_down.weight"))
        up = parts.get("lora_B.weight", parts.get("lora_up.weight"))
        if (down is None) != (up is None):
            raise WeightLoadError(f"LoRA module {module}: has only one of its down (A) and up (B) matrices")
        if down is not None and (down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1]):
            raise WeightLoadError(
                f"LoRA module {module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not (r, in) and (out, r)"
            )
        if down is not None and down.shape[0] == 0:
            raise WeightLoadError(f"LoRA module {module}: rank 0 (down {tuple(down.shape)})")
        scale = 1.0 if file_scale is None else file_scale
        if "alpha" in parts:
            if down is None:
                raise WeightLoadError(f"LoRA module {module}: an alpha without its matrices")
            if parts["alpha"].numel() != 1:
                raise WeightLoadError(
                    f"LoRA module {module}: alpha must be one number, got {tuple(parts['alpha'].shape)}"
                )
            scale = float(parts["alpha"]) / down.shape[0]
        update = _Update(down, up, parts.get("lora_B.bias"), scale)
        updates[target] = update
        if model_params is None:
            continue
        if down is not None:
            update.weight_delta(model_params[target].shape)  # the shape check, before any weight changes
        if update.bias is not None:
            bias_name = target[: -len("weight")] + "bias"
            if bias_name not in model_params or model_params[bias_name].shape != update.bias.shape:
                raise WeightLoadError(f"LoRA module {module}: lora_B.bias {tuple(update.bias.shape)} fits no bias")
    if unknown:
        raise WeightLoadError(f"LoRA keys that name no module of this DiT ({len(unknown)}): {sorted(unknown)[:20]}")
    if not updates:
        raise WeightLoadError("this LoRA has no lora_A / lora_B (or lora_down / lora_up) tensors")
    return updates


def check_lora_file(path: str) -> None:
    """Everything about a LoRA file that needs no model (readable, its keys, tensors, ranks, alphas
    and metadata), so a command line refuses a bad ``--lora`` before it builds anything."""
    state_dict, file_scale = read_lora(path)
    parse_lora(to_diffusers_layout(state_dict), file_scale, None)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past float's range (10**400)
        return False


class LoraStack:
    """The adapters fused into one model: their updates and the original weights they replaced."""

    def __init__(self):
        self.adapters: dict[str, tuple[float, dict[str, _Update]]] = {}
        self.originals: dict[str, torch.Tensor] = {}  # parameter name -> its weight before any adapter, on CPU

    def load(self, model: torch.nn.Module, source, scale: float, name: str | None) -> str:
        """Fuse one adapter, all or nothing: on any error the model and the stack are as before."""
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not _finite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if name is None:
            name = f"lora_{len(self.adapters)}"
            while name in self.adapters:
                name += "_"
        if name in self.adapters:
            raise ValueError(f"a LoRA named {name!r} is already loaded; unload it first or pass another name")
        state_dict, file_scale = read_lora(source)
        params = dict(model.named_parameters())
        updates = parse_lora(to_diffusers_layout(state_dict), file_scale, params)
        names = set(self._names(updates))
        self.adapters[name] = (float(scale), updates)
        try:
            self._refuse(model, names)
        except BaseException:
            del self.adapters[name]
            self._refuse(model, names)  # the other adapters' weights again, from the originals
            raise
        return name

    def unload(self, model: torch.nn.Module, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise KeyError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self.adapters)}")
        names = list(self.adapters) if name is None else [name]
        touched = set()
        for n in names:
            touched |= set(self._names(self.adapters.pop(n)[1]))
        self._refuse(model, touched)

    @staticmethod
    def _names(updates: dict[str, _Update]):
        for target, update in updates.items():
            if update.down is not None:
                yield target
            if update.bias is not None:
                yield target[: -len("weight")] + "bias"

    def _refuse(self, model: torch.nn.Module, names: set[str]) -> None:
        """Rewrite each named parameter as its original plus every loaded adapter's delta."""
        params = dict(model.named_parameters())
        for pname in sorted(names):
            param = params[pname]
            if pname not in self.originals:
                self.originals[pname] = param.detach().to("cpu", copy=True)
            original = self.originals[pname]
            deltas = []
            for scale, updates in self.adapters.values():
                if pname.endswith(".bias"):
                    update = updates.get(pname[: -len("bias")] + "weight")
                    if update is not None and update.bias is not None:
                        deltas.append(update.bias.float() * (update.scale * scale))
                else:
                    update = updates.get(pname)
                    if update is not None and update.down is not None:
                        deltas.append(update.weight_delta(param.shape) * scale)
            with torch.no_grad():
                if not deltas:
                    param.copy_(original)
                    del self.originals[pname]
                    continue
                fused = original.to(param.device, torch.float32)
                for delta in deltas:
                    fused = fused + delta.to(param.device)
                param.copy_(fused.to(param.dtype))

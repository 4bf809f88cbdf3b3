"""The body of ``POST /v1/videos`` checked into a job's spec, before anything is queued.

OpenAI's fields: ``model``, ``prompt``, ``seconds``, ``size`` (``"WIDTHxHEIGHT"``, OpenAI's order),
``input_reference`` (an uploaded image: image-to-video). fastdit's: ``frames`` (1 + 4k; instead of
or agreeing with ``seconds``), ``seed``, ``steps``, ``guidance``, ``shift``, ``negative_prompt``.
Anything else is refused by name, as OpenAI refuses an unknown parameter. Every check is cheap
and runs before the request is stored: a bad request never reaches the batch.
"""

import io
import math
from dataclasses import dataclass

from fastdit.models import VAEFacts
from fastdit.runtime.generate import FPS  # frames = 1 + seconds * FPS (rounded to the VAE's 1 + temporal k)

FIELDS = ("model", "prompt", "seconds", "size", "input_reference", "frames", "seed", "steps", "guidance", "shift",
          "negative_prompt")  # fmt: skip


class RequestError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object
    (``{"error": {"message", "type", "param", "code"}}``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """What a request is checked against: the served model's name, its VAE's ratios, the DiT's
    patch, whether it needs an image, the default size and the batcher's token budget."""

    name: str
    vae_facts: VAEFacts
    patch: tuple[int, int, int]
    image_conditioned: bool
    default_size: tuple[int, int]  # (width, height)
    max_tokens: int

    def tokens(self, frames: int, height: int, width: int, guidance: float) -> int:
        """Packed tokens one request adds to a forward (both samples of classifier-free guidance)."""
        _, t, h, w = self.vae_facts.latent_shape(frames, height, width)
        pt, ph, pw = self.patch
        return (t // pt) * (h // ph) * (w // pw) * (2 if guidance != 1.0 else 1)


@dataclass(frozen=True)
class Limits:
    """Ceilings a request must stay under (a server's own, beside the token budget)."""

    max_side: int = 4096  # pixels
    max_frames: int = 1 + 4 * 64
    max_steps: int = 500
    max_prompt_chars: int = 20_000
    max_image_pixels: int = 4096 * 4096


def _shown(value) -> str:
    """A field's value as an error message quotes it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(fields: dict, name: str, limit: int, default: str | None = None) -> str | None:
    value = fields.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"'{name}' must be a string", name)
    if len(value) > limit:
        raise RequestError(400, f"'{name}' is {len(value)} characters; the limit is {limit}", name)
    return value


def _number(fields: dict, name: str, default, kind, low, high):
    """An int or float field (form fields arrive as strings), in [low, high]."""
    value = fields.get(name)
    if value is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RequestError(400, f"'{name}' must be {what}", name)
    try:
        if kind is float:
            number = float(value)
        elif isinstance(value, float):
            number = int(value) if value.is_integer() else None
        else:
            number = int(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        number = None
    if number is None:
        raise RequestError(400, f"'{name}' must be {what}, got {_shown(value)}", name)
    if (kind is float and not math.isfinite(number)) or not low <= number <= high:
        raise RequestError(400, f"'{name}' must be in [{low}, {high}], got {_shown(value)}", name)
    return number


def _size(fields: dict, served: ServedModel, limits: Limits) -> tuple[int, int]:
    """``(width, height)`` of ``size`` ("WIDTHxHEIGHT")."""
    text = fields.get("size")
    if text is None:
        return served.default_size
    parts = text.strip().lower().split("x") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 6 for p in parts):
        raise RequestError(400, f"'size' must be WIDTHxHEIGHT in pixels (e.g. 832x480), got {_shown(text)}", "size")
    width, height = int(parts[0]), int(parts[1])
    factor = served.vae_facts.spatial * max(served.patch[1:])
    if not (0 < width <= limits.max_side and 0 < height <= limits.max_side):
        raise RequestError(400, f"'size' {width}x{height}: each side must be in [1, {limits.max_side}]", "size")
    if width % factor or height % factor:
        raise RequestError(400, f"'size' {width}x{height}: width and height must be multiples of {factor}", "size")
    return width, height


def _frames(fields: dict, served: ServedModel, limits: Limits) -> tuple[int, str]:
    """``(frames, seconds as the video object says them)`` from ``seconds`` and / or ``frames``."""
    temporal = served.vae_facts.temporal
    frames = _number(fields, "frames", None, int, 1, limits.max_frames)
    if frames is not None and (frames - 1) % temporal:
        raise RequestError(400, f"'frames' must be 1 + {temporal}k (the VAE keeps the first frame alone), got {frames}",
                           "frames")  # fmt: skip
    seconds = _number(fields, "seconds", None, float, 0.0, (limits.max_frames - 1) / FPS)
    if seconds is not None:
        if seconds <= 0:
            raise RequestError(400, f"'seconds' must be > 0, got {_shown(fields['seconds'])}", "seconds")
        from_seconds = 1 + temporal * max(1, round(seconds * FPS / temporal))
        if frames is not None and frames != from_seconds:
            raise RequestError(400, f"'seconds' {seconds:g} makes {from_seconds} frames and 'frames' says "
                               f"{frames}: give one", "frames")  # fmt: skip
        return from_seconds, f"{seconds:g}"
    if frames is None:
        frames = 1 + FPS * 4  # OpenAI's default: 4 seconds
    return frames, f"{(frames - 1) / FPS:g}"


def read_image(data: bytes, limits: Limits):
    """An uploaded image as a ``(H, W, 3)`` uint8 array: one still image, 8-bit, under the pixel
    ceiling (read from the header before the pixels are decoded)."""
    import imageio.v3 as iio
    import numpy as np

    if not data:
        raise RequestError(400, "'input_reference' is empty", "input_reference")
    try:
        props = iio.improps(data)
        if props.is_batch or len(props.shape) not in (2, 3):
            raise RequestError(400, "'input_reference' must be one image, not a video or an animation",
                               "input_reference")  # fmt: skip
        if math.prod(props.shape[:2]) > limits.max_image_pixels:
            raise RequestError(400, f"'input_reference' is {props.shape[1]}x{props.shape[0]} pixels; the limit is "
                               f"{limits.max_image_pixels} pixels", "input_reference")  # fmt: skip
        pixels = np.asarray(iio.imread(data))
    except RequestError:
        raise
    except Exception as err:  # noqa: BLE001 - imageio raises many kinds for bytes it cannot decode
        raise RequestError(400, f"'input_reference' is not a readable image ({type(err).__name__})",
                           "input_reference") from None  # fmt: skip
    channels = pixels.shape[-1] if pixels.ndim == 3 else 1
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise RequestError(400, f"'input_reference' must be an 8-bit gray, RGB or RGBA image, got {pixels.dtype} "
                           f"{pixels.shape}", "input_reference")  # fmt: skip
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def png_bytes(pixels) -> bytes:
    """Lossless PNG of an (H, W, 3) uint8 array (what the job reads back, as ``fastdit generate``
    reads its ``--input``)."""
    import imageio.v3 as iio

    buffer = io.BytesIO()
    iio.imwrite(buffer, pixels, extension=".png")
    return buffer.getvalue()


def parse_create(fields: dict, has_image: bool, served: ServedModel, limits: Limits) -> dict:
    """The job's spec (JSON-able) from the request's fields; ``has_image``: an ``input_reference``
    file came with them (checked by :func:`read_image`). A :class:`RequestError` names the field."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"Unknown parameter: '{unknown[0][:60]}' (this server takes {', '.join(FIELDS)})",
                           unknown[0][:60], "unknown_parameter")  # fmt: skip
    if "input_reference" in fields:
        raise RequestError(400, "'input_reference' must be an uploaded image file (multipart/form-data); "
                           "URLs and ids are not fetched", "input_reference")  # fmt: skip
    model = _text(fields, "model", 200, served.name)
    if model != served.name:
        raise RequestError(400, f"model '{model}' is not served here; this server runs '{served.name}'", "model",
                           "model_not_found")  # fmt: skip
    prompt = _text(fields, "prompt", limits.max_prompt_chars)
    if prompt is None or not prompt.strip():
        raise RequestError(400, "'prompt' is required and must not be empty", "prompt")
    negative = _text(fields, "negative_prompt", limits.max_prompt_chars)
    width, height = _size(fields, served, limits)
    frames, seconds = _frames(fields, served, limits)
    seed = _number(fields, "seed", 0, int, 0, 2**63 - 1)
    steps = _number(fields, "steps", 30, int, 1, limits.max_steps)
    guidance = _number(fields, "guidance", 5.0, float, 0.0, 100.0)
    shift = _number(fields, "shift", 5.0, float, 1e-3, 100.0)
    if negative is not None and guidance == 1.0:
        raise RequestError(400, "'negative_prompt' has no effect with guidance 1 (no unconditional pass runs)",
                           "negative_prompt")  # fmt: skip
    if served.image_conditioned and not has_image:
        raise RequestError(400, f"'{served.name}' is an image-to-video model: send 'input_reference'",
                           "input_reference")  # fmt: skip
    tokens = served.tokens(frames, height, width, guidance)
    if tokens > served.max_tokens:
        raise RequestError(400, f"{width}x{height} with {frames} frames needs {tokens} tokens per forward; this "
                           f"server's budget (--max-batch-tokens) is {served.max_tokens}", "size")  # fmt: skip
    return {"model": model, "prompt": prompt, "negative_prompt": negative, "width": width, "height": height,
            "frames": frames, "seconds": seconds, "seed": seed, "steps": steps, "guidance": guidance, "shift": shift,
            "mode": "i2v" if has_image else "t2v", "input": None}  # fmt: skip

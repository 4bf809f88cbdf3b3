"""The one size syntax of every command (``generate --size``, ``bench --size / --vae-size``,
``export tensorrt --profile``): ``HEIGHTxWIDTH`` in pixels, then ``xFRAMES`` where frames apply,
e.g. ``480x832x81`` (81 frames of 480 x 832), the order of diffusers' ``height, width, num_frames``."""

SIZE_SYNTAX = "HEIGHTxWIDTH[xFRAMES] in pixels (e.g. 480x832x81)"


def parse_size(text: str, *, frames: str = "optional") -> tuple[int, int, int | None]:
    """``(height, width, frames)`` of ``"HxW"`` or ``"HxWxF"``; frames is None when absent.

    ``frames``: ``"optional"``, ``"required"`` (``HxWxF`` only) or ``"forbidden"`` (``HxW`` only).
    A ``ValueError`` saying the syntax for anything else (wrong count, non-integers, sizes < 1).
    """
    if frames not in ("optional", "required", "forbidden"):
        raise ValueError(f"frames must be 'optional', 'required' or 'forbidden', got {frames!r}")
    syntax = {"optional": "HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES", "required": "HEIGHTxWIDTHxFRAMES",
              "forbidden": "HEIGHTxWIDTH"}[frames]  # fmt: skip
    parts = text.strip().lower().split("x") if isinstance(text, str) else []
    counts = {"optional": (2, 3), "required": (3,), "forbidden": (2,)}[frames]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in counts or min(values) < 1:
        raise ValueError(f"size must be {syntax} in pixels, positive integers (e.g. 480x832x81), got {text!r}")
    return values[0], values[1], values[2] if len(values) == 3 else None

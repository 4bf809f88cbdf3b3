"""TensorRT engines from fastdit's ONNX graphs (TensorRT 10 / 11 Python API), and a runner.

Written against the TensorRT 10 API: ``OnnxParser``, ``create_network(0)`` (explicit batch is
the only mode), ``IBuilderConfig`` precision flags and memory pool limits, one optimization
profile per size bucket, ``build_serialized_network``, and on the runtime side
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``. **Not run in this
project's tests**: its machines cannot install TensorRT (no network on the GPU machine, multi-GB
wheels); the tests that need it skip with that reason. What is verified instead: the ONNX
graphs use only standard ops in TensorRT's supported list and no float64 (``check_onnx``).
"""

import os
from dataclasses import dataclass

import torch

from fastdit.sizes import parse_size

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# Wan 2.1's VAE, the default; a checkpoint's own (its VAEFacts: Wan 2.2's VAE is 16x) replace them.
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def tensorrt_missing() -> str | None:
    """None when ``tensorrt`` imports, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # ImportError, or a broken install (missing libnvinfer)
        return f"tensorrt cannot be imported: {err}"
    return None


@dataclass(frozen=True)
class Profile:
    """A size bucket of video pixels: ``HEIGHTxWIDTHxFRAMES`` (``480x832x81``), for a VAE of
    ``spatial`` pixels per latent row and ``temporal`` frames per latent frame (a checkpoint's
    ``open_checkpoint(path).vae_facts``; Wan 2.1's 8 and 4 by default)."""

    height: int
    width: int
    frames: int
    spatial: int = VAE_SPATIAL
    temporal: int = VAE_TEMPORAL

    @classmethod
    def parse(cls, text: str, spatial: int = VAE_SPATIAL, temporal: int = VAE_TEMPORAL) -> "Profile":
        try:
            height, width, frames = parse_size(text, frames="required")
        except ValueError as err:
            raise ValueError(f"profile {err}") from None
        step = 2 * spatial  # the VAE's ratio times the DiT's 2x2 patches
        if height % step or width % step or height < step or width < step:
            raise ValueError(f"profile {text}: height and width must be positive multiples of {step}")
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(f"profile {text}: frames must be 1 + {temporal}k")
        return cls(height, width, frames, spatial, temporal)

    def latent(self, channels: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of this bucket's latent."""
        return (channels, 1 + (self.frames - 1) // self.temporal, self.height // self.spatial,
                self.width // self.spatial)  # fmt: skip


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    profiles: list[Profile],
    *,
    precision: str = "bf16",
    latent_channels: int | None = None,
    text_dim: int = 4096,
    text_len: int = 512,
    max_batch: int = 2,
    workspace_gib: float = 16.0,
) -> str:
    """Parse a DiT ONNX graph (from :func:`fastdit.export.to_onnx`) and serialise an engine.

    One optimization profile per size bucket: the latent's shape fixed to the bucket, the batch
    from 1 to ``max_batch`` (a CFG pair), the text from 1 to ``text_len`` tokens. The latent's
    channels are the graph's own (its ``latents`` input); ``latent_channels``, when given, must agree.
    ``fp8`` needs a graph carrying Q/DQ nodes (an explicitly quantized ONNX, e.g. from NVIDIA
    ModelOpt); a plain graph is refused rather than silently built in higher precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not profiles:
        raise ValueError("give at least one profile (size bucket)")
    missing = tensorrt_missing()
    if missing:
        raise RuntimeError(missing)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if "latents" not in inputs:
        raise ValueError(f"{onnx_path}: no 'latents' input (inputs: {sorted(inputs)}): not a fastdit DiT graph")
    graph_channels = inputs["latents"].shape[1]
    if graph_channels > 0 and latent_channels not in (None, graph_channels):
        raise ValueError(f"latent_channels={latent_channels}, but {onnx_path} takes {graph_channels}-channel latents")
    if graph_channels <= 0 and latent_channels is None:
        raise ValueError(f"{onnx_path} leaves the latent channels dynamic: pass latent_channels")
    latent_channels = graph_channels if graph_channels > 0 else latent_channels
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "fp8":
        layers = [network.get_layer(i).type for i in range(network.num_layers)]
        if trt.LayerType.QUANTIZE not in layers:
            raise ValueError("fp8 needs an ONNX graph with QuantizeLinear / DequantizeLinear nodes (explicit "
                             "quantization, e.g. NVIDIA ModelOpt); this one has none")  # fmt: skip
        config.set_flag(trt.BuilderFlag.FP8)
        config.set_flag(trt.BuilderFlag.BF16)
    for bucket in profiles:
        profile = builder.create_optimization_profile()
        c, t, h, w = bucket.latent(latent_channels)
        profile.set_shape("latents", (1, c, t, h, w), (max_batch, c, t, h, w), (max_batch, c, t, h, w))
        profile.set_shape("timestep", (1,), (max_batch,), (max_batch,))
        profile.set_shape("text", (1, 1, text_dim), (max_batch, text_len, text_dim), (max_batch, text_len, text_dim))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    return os.fspath(engine_path)


class TensorRTDiT:
    """Runs a serialized DiT engine like ``DiT.forward(latents, timestep, text)`` on CUDA tensors,
    choosing the optimization profile whose bucket matches the latent's shape."""

    def __init__(self, engine_path: str | os.PathLike):
        missing = tensorrt_missing()
        if missing:
            raise RuntimeError(missing)
        import tensorrt as trt

        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        self.profile = -1

    def _profile_for(self, shape) -> int:
        for index in range(self.engine.num_optimization_profiles):
            low, _, high = self.engine.get_tensor_profile_shape("latents", index)
            if all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
                return index
        raise ValueError(f"no optimization profile of this engine fits latents {tuple(shape)}")

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        index = self._profile_for(latents.shape)
        if index != self.profile:
            self.context.set_optimization_profile_async(index, stream.cuda_stream)
            self.profile = index
        inputs = {"latents": latents.float().contiguous(), "timestep": timestep.float().contiguous(),
                  "text": text.float().contiguous()}  # fmt: skip
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("prediction")), device=latents.device)
        self.context.set_tensor_address("prediction", out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out


def euler_cfg_step(model, latents, sigma: float, sigma_next: float, text, negative_text, guidance: float):
    """One flow-matching Euler step with classifier-free guidance through any dense DiT callable
    (a :class:`TensorRTDiT`, or ``DiT`` itself): the conditional and unconditional branches as a
    batch of two, as :class:`fastdit.runtime.FlowMatchSampler` does in its packed batch."""
    x = torch.cat([latents, latents])
    texts = torch.cat([text, negative_text])
    timestep = torch.full((x.shape[0],), sigma * 1000.0, device=latents.device)
    cond, uncond = model(x, timestep, texts).float().chunk(2)
    velocity = uncond + guidance * (cond - uncond)
    return latents + (sigma_next - sigma) * velocity

"""What the runtime, export, the diffusers patch and sequence parallelism need from a model family.

A family is a package under ``fastdit/models/`` (``fastdit/models/wan/`` is the first). It
registers one :class:`ModelFamily`, which recognises its checkpoints and opens them as a
:class:`FamilyCheckpoint`: the directory read once, every fact its consumers ask for (the VAE's
ratios and channels as :class:`VAEFacts`, the text width, the parts present) and the loaders of
its models. The runtime asks :func:`open_checkpoint` for whatever directory a user gives and never
branches on the family; a second family adds a package and a :func:`register_family` call, not
branches elsewhere. See docs/design.md, "Model families".

What a family's DiT must offer (the runtime calls these public methods only):
``config``, ``forward_packed(batch)``, ``forward_validated(batch)`` (trusted, already checked),
``check_batch(batch)``, ``dense_batch`` / ``dense_output``, ``attention_hook(fn)`` (a context
manager routing its self-attention through ``fn`` for one call) and
``sequence_parallel_plan()`` (a :class:`SequenceParallelPlan`). Its VAE: ``encode``, ``decode``,
``decode_tiles``, ``decode_patchified``, ``normalize`` / ``denormalize`` and ``facts``.
"""

import abc
import os
from dataclasses import dataclass

from fastdit.models.weights import WeightLoadError
from fastdit.ops.dispatch import backends_for


class UnknownCheckpointError(WeightLoadError):
    """A directory no registered family runs; the message lists the families fastdit supports."""


@dataclass(frozen=True)
class VAEFacts:
    """A video VAE's geometry, as its checkpoint states it.

    ``spatial``: pixels per latent row / column (Wan 2.1: 8, Wan 2.2: 16); ``temporal``: frames per
    latent frame after the first (4: a video of ``1 + 4k`` frames has ``1 + k`` latent frames);
    ``latent_channels``: the latent's channels; ``patch``: the pixel patch folded into channels
    before the encoder (Wan 2.2: 2, else 1); ``pixel_channels``: channels of the video (3, RGB).
    """

    spatial: int
    temporal: int
    latent_channels: int
    patch: int = 1
    pixel_channels: int = 3

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latent of a ``frames x height x width`` video; a ValueError
        naming the rule when the video does not divide (``1 + temporal k`` frames, sides multiples
        of ``spatial``)."""
        if frames < 1 or (frames - 1) % self.temporal:
            raise ValueError(f"frames must be 1 + {self.temporal}k (the VAE keeps the first frame alone), got {frames}")
        if height < 1 or width < 1 or height % self.spatial or width % self.spatial:
            raise ValueError(f"height and width must be positive multiples of {self.spatial}, got {height}x{width}")
        return (self.latent_channels, 1 + (frames - 1) // self.temporal, height // self.spatial, width // self.spatial)


@dataclass(frozen=True)
class SequenceParallelPlan:
    """What a DiT declares for sequence parallelism (:mod:`fastdit.runtime.parallel`): every token-wise
    op runs on a rank's slice of the packed tokens, with each piece keeping its sample's grid,
    timestep and global position; only the self-attention routed by ``attention_hook`` needs the
    other ranks, and Ulysses splits its ``heads`` heads over them. Conditioning (text, image
    states) is replicated on every rank."""

    heads: int


class BackendChoice:
    """What every family's models share for a model-wide backend: ``backend`` (None: the
    dispatcher's choice per op), :meth:`set_backend` and the :attr:`op_backends` view over the ops
    the model calls (``BACKEND_OPS``). The model runs its public methods inside
    ``dispatch.model_backend(self.backend)`` (``@dispatch.on_model_backend``)."""

    BACKEND_OPS: tuple[str, ...] = ()
    backend: str | None = None

    def set_backend(self, backend: str | None):
        """Run every op of ``BACKEND_OPS`` that has ``backend`` on it from now on, the others on the
        dispatcher's choice (None: the dispatcher's choice everywhere); a ValueError for a name no
        backend has. Returns the model."""
        backends_for(backend, self.BACKEND_OPS)  # checks the name
        self.backend = backend
        return self

    @property
    def op_backends(self) -> dict[str, str | None]:
        """The backend each op the model calls is forced onto (None: the dispatcher's choice)."""
        return backends_for(self.backend, self.BACKEND_OPS)


class FamilyCheckpoint(abc.ABC):
    """A checkpoint directory of one family, read once (configs parsed and checked when opened)."""

    family: "ModelFamily"
    path: str
    parts: tuple[str, ...]

    def has(self, *parts: str) -> bool:
        return all(p in self.parts for p in parts)

    @property
    @abc.abstractmethod
    def vae_facts(self) -> VAEFacts:
        """The VAE's geometry from its own config."""

    @property
    @abc.abstractmethod
    def text_dim(self) -> int:
        """The width of the text states the DiT reads."""

    @abc.abstractmethod
    def load_dit(self, part: str = "transformer", *, dtype=None, device=None, backend: str | None = None):
        """The DiT of sub-folder ``part``, loaded in place (meta-built, read straight into its
        storage in ``dtype`` on ``device``)."""

    @abc.abstractmethod
    def load_vae(self, *, dtype=None, device=None, backend: str | None = None):
        """The VAE, loaded in place the same way."""


class ModelFamily(abc.ABC):
    """One model family: its name, the checkpoints it recognises, how it opens them."""

    name: str  # a short id: "wan"
    description: str  # what it runs, for error messages and ``fastdit info``

    @abc.abstractmethod
    def why_not(self, path: str) -> str | None:
        """None when ``path`` (a directory) looks like this family's checkpoint, else why not, in a
        few words. Cheap: folder names and config class names only, no weight is read."""

    @abc.abstractmethod
    def open(self, path: str) -> FamilyCheckpoint:
        """The checkpoint at ``path``, read once; a WeightLoadError naming what is wrong."""


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to those :func:`open_checkpoint` tries (a name may be registered once)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {type(family).__name__}")
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, ModelFamily]:
    """The registered families by name (a copy)."""
    return dict(_FAMILIES)


def supported() -> str:
    """One line naming every registered family, for error messages."""
    return "; ".join(f"{f.name}: {f.description}" for f in _FAMILIES.values())


def open_checkpoint(path: str | os.PathLike) -> FamilyCheckpoint:
    """The checkpoint at ``path`` opened by the family that recognises it; an
    :class:`UnknownCheckpointError` listing the supported families when none does."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise WeightLoadError(f"{path}: no such directory")
    reasons = []
    for family in _FAMILIES.values():
        reason = family.why_not(path)
        if reason is None:
            return family.open(path)
        reasons.append(f"not {family.name}: {reason}")
    raise UnknownCheckpointError(f"{path} is not a checkpoint fastdit runs ({'; '.join(reasons)}); "
                                 f"fastdit runs {supported()}")  # fmt: skip

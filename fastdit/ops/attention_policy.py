"""Which attention provider ``auto`` runs: a measured per-device policy, never a hope.

A policy is a JSON file that ``fastdit bench --suite attention --policy-out FILE`` writes from one
run on one device: for each measured (op, dtype, head dim, sequence-length bucket, causal) the
fastest provider, with the timings it was chosen from and where they came from::

    {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3",
     "source": {"command": "fastdit bench --suite attention ...", "torch": "2.11.0+cu130", "date": "..."},
     "choices": {"varlen_attention/bfloat16-d128-s32768-full": "cudnn", ...},
     "ms": {"varlen_attention/bfloat16-d128-s32768-full": {"cudnn": 3.1, "triton": 4.2}}}

The dispatcher consults it for every attention call (:func:`fastdit.ops.dispatch.set_shape_policy`):

- the ``attn_policy`` setting (``FASTDIT_ATTN_POLICY``) names a file, else the packaged
  ``fastdit/ops/policies/attention-<device>.json`` for this device's name is used when one exists;
- a policy measured on another device than the one a call runs on is not used (reported once);
- a shape it does not cover goes to the priority list
  (:data:`fastdit.ops.attention_providers.ATTENTION_PRIORITY`: the vendor kernels first, then
  fastdit's Triton kernel), and so does a provider it names that cannot run the call (said once
  per op, provider, file and reason).

Only a real GPU run may ship a policy: the packaged files carry their run's ``source``, and a test
refuses one without it. ``fastdit info`` prints the policy in force, and :func:`fastdit.ops.dispatch.trace`
records for each choice whether a policy file or the priority list made it.
"""

import functools
import json
import logging
import os
import re

import torch

from fastdit import settings
from fastdit.ops.dispatch import BACKEND_NAMES, set_shape_policy

logger = logging.getLogger("fastdit")

POLICY_DIR = os.path.join(os.path.dirname(__file__), "policies")
OPS = ("attention", "varlen_attention")


class AttentionPolicyError(ValueError):
    """A policy file that cannot be used: missing, unreadable, or not in the policy's form."""


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The name a policy is measured on and matched against: the GPU's name, or the device type."""
    if device.type == "cuda":
        if not torch.cuda.is_available():  # a summary of a call that cannot run here (tests of the dispatcher)
            return "cuda (not available)"
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def packaged_file(name: str) -> str:
    """Where the packaged policy of the device called ``name`` lives."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.path.join(POLICY_DIR, f"attention-{slug}.json")


def policy_key(op: str, dtype: torch.dtype, head_dim: int, seq_bucket: int, causal: bool) -> str:
    return f"{op}/{str(dtype).replace('torch.', '')}-d{head_dim}-s{seq_bucket}-{'causal' if causal else 'full'}"


def check_policy(policy, where: str) -> dict:
    """``policy`` if it has the form above, else :class:`AttentionPolicyError` naming ``where``."""
    if not isinstance(policy, dict):
        raise AttentionPolicyError(f"{where}: an attention policy is a JSON object, got {type(policy).__name__}")
    for field in ("device_type", "device", "source", "choices"):
        if field not in policy:
            raise AttentionPolicyError(f"{where}: an attention policy needs {field!r} (fastdit.ops.attention_policy)")
    choices = policy["choices"]
    if not isinstance(choices, dict):
        raise AttentionPolicyError(f"{where}: 'choices' must map shape keys to provider names")
    for key, name in choices.items():
        if not isinstance(key, str) or key.split("/", 1)[0] not in OPS:
            raise AttentionPolicyError(f"{where}: shape key {key!r} does not start with one of {list(OPS)}")
        if name not in BACKEND_NAMES:
            raise AttentionPolicyError(f"{where}: {key!r} names {name!r}, not a provider ({', '.join(BACKEND_NAMES)})")
    return policy


def load_policy(path: str) -> dict:
    """The policy in the file at ``path`` (checked)."""
    try:
        with open(path) as f:
            policy = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise AttentionPolicyError(f"attention policy {path}: {err}") from err
    return check_policy(policy, path)


@functools.lru_cache(maxsize=64)
def _report_other_device(where: str, measured_on: str, here: str) -> None:
    logger.warning("fastdit attention policy %s was measured on %s, not on this %s: it is not used here; "
                   "the priority list decides", where, measured_on, here)  # fmt: skip


def _chooser(policy: dict, where: str):
    device_type, measured_on, choices = policy["device_type"], policy["device"], policy["choices"]

    def choose(op: str, inputs: dict) -> str | None:
        device = inputs["device"]
        if device.type != device_type:
            return None
        here = device_name(device)
        if here != measured_on:
            _report_other_device(where, measured_on, here)
            return None
        key = policy_key(op, inputs["dtype"], inputs["head_dim"], inputs["seq_bucket"], inputs["causal"])
        name = choices.get(key)
        return None if name is None else (name, where)

    choose.where = where
    return choose


# (path) -> its chooser, or None where no packaged file exists; filled in eager mode only, since
# torch.compile cannot trace file reads (a graph compiled before a file is read uses the priority list).
_LOADED: dict = {}
_INSTALLED: list = []  # a policy given to use_policy(), which wins over the files


def _policy_path(device: torch.device) -> tuple[str, bool]:
    """(the file for ``device``, whether the setting named it)."""
    named = settings.get().attn_policy
    if named:
        return named, True
    return packaged_file(device_name(device)), False


def _file_chooser(device: torch.device):
    """The chooser of the file in force for ``device``: read again when the file changes (the
    dispatcher remembers its choices per settings, so this runs once per kind of call)."""
    path, named = _policy_path(device)
    if torch.compiler.is_compiling():
        return next((chooser for (p, _), chooser in _LOADED.items() if p == path), None)
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        key = (path, None)
    if key not in _LOADED:
        if not named and key[1] is None:
            _LOADED[key] = None
        else:  # a file the setting names must exist: no silent fallback to the priority list
            _LOADED[key] = _chooser(load_policy(path), path)
    return _LOADED[key]


def _choose_for(op: str):
    def choose(inputs: dict) -> str | None:
        chooser = _INSTALLED[0] if _INSTALLED else _file_chooser(inputs["device"])
        return None if chooser is None else chooser(op, inputs)

    return choose


def use_policy(policy: dict | None, where: str = "use_policy()") -> None:
    """Install a policy (a dict in the file's form) for this process; None goes back to the file
    the settings name, else the packaged file for the device."""
    _INSTALLED.clear()
    if policy is not None:
        _INSTALLED.append(_chooser(check_policy(policy, where), where))
    for op in OPS:
        set_shape_policy(op, _choose_for(op), source="attention policy")


def describe(device: torch.device) -> str:
    """One line for ``fastdit info``: the policy that decides on ``device``, or that none does."""
    if _INSTALLED:
        return f"attention policy: {_INSTALLED[0].where} (installed in this process)"
    path, named = _policy_path(device)
    if not named and not os.path.exists(path):
        return (f"attention policy: none for {device_name(device)} (no {os.path.relpath(path)}); "
                "auto takes the first provider of the priority list that can run a call")  # fmt: skip
    try:
        policy = load_policy(path)
    except AttentionPolicyError as err:
        return f"attention policy: unusable: {err}"
    here = device_name(device)
    if policy["device_type"] != device.type or policy["device"] != here:
        return f"attention policy: {path} was measured on {policy['device']}, not this {here}: not used"
    return f"attention policy: {path} ({len(policy['choices'])} measured shapes on {policy['device']})"


use_policy(None)

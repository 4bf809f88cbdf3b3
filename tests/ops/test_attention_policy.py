"""``auto`` for attention: a measured per-device policy file, else the vendor providers first."""

import dataclasses
import glob
import json
import logging

import pytest
import torch

from fastdit import ops, settings
from fastdit.ops import attention_policy, dispatch
from fastdit.ops.attention import seq_bucket
from fastdit.ops.attention_policy import AttentionPolicyError, policy_key


def _policy(choices, device="cpu", device_type="cpu"):
    return {"device_type": device_type, "device": device, "source": {"command": "test"}, "choices": choices}


@pytest.fixture
def policy_file(tmp_path):
    def write(policy):
        path = tmp_path / "attention.json"
        path.write_text(json.dumps(policy))
        return str(path)

    return write


def _qkv(seq, dim=16):
    q = torch.randn(1, seq, 2, dim)
    return q, q.clone(), q.clone()


def test_a_policy_file_decides_the_shapes_it_measured_and_the_trace_names_it(policy_file):
    """Catches: the setting's file never read, writer and reader keys that differ (the bucket,
    dtype spelling), or a policy applied to shapes it did not measure."""
    key = policy_key("attention", torch.float32, 16, seq_bucket(40), False)
    assert key == "attention/float32-d16-s64-full"
    path = policy_file(_policy({key: "reference"}))
    with settings.override(attn_policy=path), dispatch.trace() as log:
        ops.attention(*_qkv(40))  # bucket 64: in the policy
        ops.attention(*_qkv(200))  # bucket 256: not in it
        ops.attention(*_qkv(40), causal=True)  # causal: not in it
    assert list(log) == [("attention", "reference"), ("attention", "torch"), ("attention", "torch")]
    assert log.sources[("attention", "reference")] == f"policy: {path}"
    assert log.sources[("attention", "torch")] == "priority"


def test_use_policy_installs_one_for_the_process():
    """Catches use_policy() being ignored while a file (or none) is in force, or not undone by None."""
    key = policy_key("varlen_attention", torch.float32, 16, 64, False)
    q = torch.randn(40, 2, 16)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    try:
        attention_policy.use_policy(_policy({key: "reference"}))
        with dispatch.trace() as log:
            ops.varlen_attention(q, q, q, cu, cu, 40, 40)
        assert list(log) == [("varlen_attention", "reference")]
        assert log.sources[("varlen_attention", "reference")] == "policy: use_policy()"
    finally:
        attention_policy.use_policy(None)
    with dispatch.trace() as log:
        ops.varlen_attention(q, q, q, cu, cu, 40, 40)
    assert list(log) == [("varlen_attention", "torch")]


def test_a_policy_measured_on_another_device_is_not_used(policy_file, caplog):
    """Catches an H100 policy steering an H200 (or a CPU) by its shape keys alone."""
    key = policy_key("attention", torch.float32, 16, 64, False)
    path = policy_file(_policy({key: "reference"}, device="NVIDIA H100 80GB HBM3", device_type="cuda"))
    with settings.override(attn_policy=path), dispatch.trace() as log:
        ops.attention(*_qkv(40))
    assert list(log) == [("attention", "torch")]
    path = policy_file(_policy({key: "reference"}, device="another cpu"))
    with settings.override(attn_policy=path), dispatch.trace() as log, caplog.at_level(logging.WARNING, "fastdit"):
        ops.attention(*_qkv(40))
    assert list(log) == [("attention", "torch")]
    assert "measured on another cpu" in caplog.text


def test_a_provider_the_policy_names_that_cannot_run_goes_to_the_priority_list(policy_file, caplog):
    """Catches a policy naming a provider missing here (flash-attn not installed) breaking the
    call, or being passed over without a word."""
    key = policy_key("attention", torch.float32, 16, 64, False)
    path = policy_file(_policy({key: "flash_attn"}))
    with settings.override(attn_policy=path), dispatch.trace() as log, caplog.at_level(logging.WARNING, "fastdit"):
        out = ops.attention(*_qkv(40))
    assert list(log) == [("attention", "torch")] and torch.isfinite(out).all()
    assert log.sources[("attention", "torch")] == "priority"
    assert f"the policy ({path}) names flash_attn, which cannot run this call" in caplog.text


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "policy, message",
    [
        ([], "is a JSON object"),
        ({"device_type": "cpu", "device": "cpu", "choices": {}}, "needs 'source'"),
        (_policy({"attention/float32-d16-s64-full": "fastest"}), "not a provider"),
        (_policy({"conv/float32": "torch"}), "does not start with one of"),
        (_policy(["torch"]), "'choices' must map"),
    ],
)
def test_malformed_policies_are_refused_by_name(policy_file, policy, message):
    """Catches a malformed policy being half-used (a typo'd provider silently never chosen)."""
    with settings.override(attn_policy=policy_file(policy)), pytest.raises(AttentionPolicyError, match=message):
        ops.attention(*_qkv(40))


@pytest.mark.bad_input
def test_a_named_policy_file_that_does_not_exist_raises(tmp_path):
    """Catches FASTDIT_ATTN_POLICY with a typo'd path quietly meaning "no policy"."""
    missing = str(tmp_path / "nope.json")
    with settings.override(attn_policy=missing), pytest.raises(AttentionPolicyError, match="nope.json"):
        ops.attention(*_qkv(40))


def test_packaged_policies_carry_the_run_that_measured_them():
    """Catches a shipped policy that no recorded run produced (a GPU claim by hand)."""
    files = glob.glob(f"{attention_policy.POLICY_DIR}/attention-*.json")
    for path in files:
        policy = attention_policy.load_policy(path)
        assert policy["device_type"] == "cuda" and {"command", "torch", "date"} <= set(policy["source"]), path
        assert policy["ms"].keys() >= policy["choices"].keys(), path
    assert not any(path.endswith("attention-cpu.json") for path in files)


def _with_available(monkeypatch, names):
    """Pretend the vendor providers ``names`` are installed (this CPU has none)."""
    for op in ("attention", "varlen_attention"):
        for name in names:
            backend = dispatch.backends(op)[name]
            monkeypatch.setitem(dispatch._BACKENDS[op], name, dataclasses.replace(backend, unavailable=None))
    dispatch._CHOICES.clear()
    monkeypatch.setattr(dispatch, "_CHOICES", {})


def _gpu_inputs(head_dim=128, causal=False, square=True, dtype=torch.float16):
    return {"device": torch.device("cuda"), "dtype": dtype, "head_dim": head_dim, "causal": causal,
            "square": square, "seq_bucket": 4096}  # fmt: skip


def test_without_a_policy_a_gpu_runs_the_first_vendor_provider_that_fits(monkeypatch):
    """Catches Triton (never measured on a GPU) or the reference being the GPU default, and a
    provider's limits ignored (cuDNN's head dim, the top-left causal kernels with Lq != Lk)."""
    _with_available(monkeypatch, ["sdpa_flash", "cudnn", "sdpa_efficient"])
    select = dispatch.select_backend
    assert select("attention", _gpu_inputs()).name == "sdpa_flash"
    assert select("attention", _gpu_inputs(dtype=torch.float32)).name == "sdpa_efficient"  # no fp32 flash / cuDNN
    assert select("attention", _gpu_inputs(head_dim=100)).name == "triton"  # not a multiple of 8: no vendor
    _with_available(monkeypatch, ["cudnn", "sdpa_efficient"])
    flash = dispatch.backends("attention")["sdpa_flash"]
    monkeypatch.setitem(dispatch._BACKENDS["attention"], "sdpa_flash", dataclasses.replace(flash, unavailable="no"))
    assert select("attention", _gpu_inputs()).name == "cudnn"
    assert select("attention", _gpu_inputs(head_dim=192)).name == "sdpa_efficient"  # cuDNN stops at 128
    assert select("attention", _gpu_inputs(causal=True, square=False)).name == "triton"  # bottom-right only


def test_a_policy_ranks_providers_on_a_gpu(monkeypatch):
    """Catches the policy consulted after the priority list instead of before it."""
    _with_available(monkeypatch, ["sdpa_flash", "cudnn"])
    key = policy_key("attention", torch.float16, 128, 4096, False)
    try:
        attention_policy.use_policy(_policy({key: "cudnn"}, device="cuda (not available)", device_type="cuda"))
        assert dispatch.select_backend("attention", _gpu_inputs()).name == "cudnn"
        assert dispatch.select_backend("attention", _gpu_inputs(head_dim=64)).name == "sdpa_flash"
    finally:
        attention_policy.use_policy(None)


def test_providers_that_read_cu_seqlens_on_the_host_step_aside_while_a_cuda_graph_is_captured(monkeypatch):
    """Catches a per-sample-loop provider (cuDNN, memory-efficient, xformers' block mask) chosen
    inside a CUDA graph capture, where its host read of cu_seqlens fails the capture."""
    _with_available(monkeypatch, ["cudnn", "sdpa_efficient"])
    inputs = {**_gpu_inputs(), "capturing": False}
    assert dispatch.select_backend("varlen_attention", inputs).name == "cudnn"
    inputs["capturing"] = True
    assert dispatch.select_backend("varlen_attention", inputs).name == "triton"

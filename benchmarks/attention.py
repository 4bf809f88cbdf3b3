"""Attention, provider by provider: dense sequences and the packed mixed-size batch of Sora-style
serving, forward and backward, in (useful) TFLOP/s and % of the bf16 matmul rate measured now.

Providers: SDPA with each backend forced (flash, cuDNN, efficient), FlexAttention (compiled; a
document mask for the packed batch), torch's varlen_attn, a Python loop of per-sample cuDNN
calls, padded + boolean mask (efficient kernel), flash-attn and xformers called directly where
installed, and every fastdit provider the dispatcher may pick here (``fastdit-<provider>``: the
vendor kernels through fastdit's op, and fastdit's Triton kernel). ``--policy-out FILE`` writes the
fastest fastdit provider per measured (op, dtype, head dim, length bucket) as the attention policy
that ``auto`` follows on this device (fastdit.ops.attention_policy; forward time decides). fastdit's triton backend
also runs its opt-in variants in the same run (the ``attn_*`` settings, FASTDIT_ATTN_* in the environment):
``fastdit-triton+tma``, ``+persistent``, ``+ws``, ``+ws+persistent`` change the forward and are
timed forward only; ``+bwd-ws`` (warp-specialized backward) is timed both ways. One GPU call
A/Bs them all. fastdit rows are the backends the dispatcher may pick on this device (on CPUs the
``torch`` backend; never the reference oracle or Triton's CPU interpreter). A provider that cannot
run here (missing API) is skipped with its reason printed; every output is checked against a
float32 reference before it is timed, a provider that raises or is wrong gets a failed row, and
the providers of one shape are timed in one interleaved run.

FLOPs: forward 4 * S_q * S_k * H * D per sample (half of it when causal), backward 2.5x the
forward (the flash-attn convention); "useful" counts only real tokens, never padding.
Defaults: CUDA bf16, H = 24, D = 128 and 64, S = 4096 .. 75600, plus anchors.md's six-sample
batch (32760, 32760, 23400, 4096, 4080, 10800 tokens); CPU: small shapes.
"""

import argparse

import torch
import torch.nn.functional as F

from fastdit import ops
from fastdit.benchmarks.harness import Candidate, Report, measure_ceilings, selectable_backends, switches

MIXED = (32760, 32760, 23400, 4096, 4080, 10800)
# The triton backend's opt-in variants: fastdit.settings fields, which the dispatcher passes to
# kernels/attention.py's launchers.
TRITON_VARIANTS = {
    "tma": {"attn_tma": True},
    "persistent": {"attn_persistent": True},
    "ws": {"attn_ws": True},
    "ws+persistent": {"attn_ws": True, "attn_persistent": True},
    "bwd-ws": {"attn_bwd_ws": True},
}
BACKWARD_VARIANTS = {"bwd-ws"}  # the variants that change the backward: timed forward and backward
VARIANT_KEYS = sorted({key for env in TRITON_VARIANTS.values() for key in env})


def variant_environment(values: dict):
    """Run with exactly ``values`` among the attention variant settings; restore them after."""
    return switches(values, VARIANT_KEYS)


def with_variants(providers: dict) -> dict:
    """name -> (fn, environment, backward): every provider as given (with the variant switches
    cleared, so a stray attn_* setting cannot relabel the baseline) plus, after fastdit-triton,
    its forward variants."""
    out = {}
    for name, fn in providers.items():
        out[name] = (fn, {}, True)
        if name == "fastdit-triton":
            for variant, env in TRITON_VARIANTS.items():
                out[f"{name}+{variant}"] = (fn, env, variant in BACKWARD_VARIANTS)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attn-seqlens", default=None, help="attention: comma list of dense lengths")
    parser.add_argument("--attn-head-dims", default=None, help="attention: comma list of head dims (default 128,64)")
    parser.add_argument("--attn-heads", type=int, default=None, help="attention: heads (default 24)")
    parser.add_argument("--attn-no-backward", action="store_true", help="attention: forward only")
    parser.add_argument("--policy-out", default=None,
                        help="attention: write the fastest fastdit provider per measured shape as this device's "
                        "attention policy (JSON; FASTDIT_ATTN_POLICY reads it)")  # fmt: skip
    parser.add_argument("--attn-mask-seqlen", type=int, default=None,
                        help="attention: tokens per sample of the key-padding-mask rows (30%% padded; default "
                        "16384, 2048 with --quick)")  # fmt: skip


def _flops(lengths_q, lengths_k, heads, head_dim, causal=False):
    total = sum(4 * lq * lk * heads * head_dim for lq, lk in zip(lengths_q, lengths_k))
    return total / 2 if causal else total


def _cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend_name]  # fmt: skip

    def run(q, k, v):  # (B, S, H, D) through SDPA's (B, H, S, D) and back
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                1, 2
            )

    return run


def _providers_dense(device, quick, head_dim):
    names = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient"] if device.type == "cuda" else ["sdpa-math"]
    if device.type == "cuda" and not quick:  # FlexAttention compiles per shape: full runs only
        names.append("flex-attention")
    providers = {}
    for name in names:
        if name.startswith("sdpa-"):
            providers[name] = _sdpa(name.removeprefix("sdpa-"))
        else:
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention)
            providers[name] = lambda q, k, v, f=compiled: f(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
    providers.update(_vendor_packages_dense(device))
    for backend in _fastdit_backends("attention", device, head_dim):
        providers[f"fastdit-{backend}"] = lambda q, k, v, b=backend: ops.attention(q, k, v, backend=b)
    return providers


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _vendor_packages_dense(device):
    """flash-attn's and xformers' own dense calls, where installed (on CUDA)."""
    providers = {}
    if device.type != "cuda":
        return providers
    if _installed("flash_attn"):
        from flash_attn import flash_attn_func

        providers["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v)
    else:
        print("  attention: flash-attn skipped: not installed")
    if _installed("xformers"):
        from xformers.ops import memory_efficient_attention

        providers["xformers"] = lambda q, k, v: memory_efficient_attention(q, k, v)
    else:
        print("  attention: xformers skipped: not installed")
    return providers


def _vendor_packages_packed(lengths, device):
    """flash-attn's varlen call and xformers' block-diagonal mask over the packed batch, where installed."""
    providers = {}
    if device.type != "cuda":
        return providers
    cu, longest = _cu(lengths, device), max(lengths)
    if _installed("flash_attn"):
        from flash_attn import flash_attn_varlen_func

        providers["flash-attn-varlen"] = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
    if _installed("xformers"):
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        mask = BlockDiagonalMask.from_seqlens(list(lengths))
        providers["xformers-block-diagonal"] = lambda q, k, v: memory_efficient_attention(
            q[None], k[None], v[None], attn_bias=mask
        )[0]
    return providers


def _fastdit_backends(op, device, head_dim):
    """The backends the dispatcher may pick here (on CPUs: torch; Triton's variants only where
    Triton runs for real)."""
    cuda = device.type == "cuda"
    inputs = {
        "device": device,
        "dtype": torch.bfloat16 if cuda else torch.float32,
        "head_dim": head_dim,
        "causal": False,
        "square": True,
        "seq_bucket": 1,
    }
    return selectable_backends(op, inputs)


def _providers_packed(lengths, heads, head_dim, device):
    """name -> fn(q, k, v) over packed (total, H, D) tensors of the samples ``lengths``."""
    cu = _cu(lengths, device)
    longest = max(lengths)
    providers = {}
    if device.type == "cuda":
        cudnn = _sdpa("cudnn")
        bounds = [(sum(lengths[:i]), n) for i, n in enumerate(lengths)]

        def loop(q, k, v):
            return torch.cat([cudnn(q[None, s : s + n], k[None, s : s + n], v[None, s : s + n])[0]
                              for s, n in bounds])  # fmt: skip

        providers["cudnn-per-sample-loop"] = loop
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            doc = torch.repeat_interleave(
                torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
            )
            mask = create_block_mask(
                lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, len(doc), len(doc), device=device
            )
            compiled = torch.compile(flex_attention)
            providers["flex-attention-document-mask"] = lambda q, k, v: compiled(
                *(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask
            )[0].transpose(0, 1)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"  attention: flex-attention skipped: {type(err).__name__}: {err}")
        try:
            from torch.nn.attention.varlen import varlen_attn

            providers["torch-varlen-attn"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest)
        except Exception as err:  # noqa: BLE001
            print(f"  attention: torch varlen_attn skipped: {type(err).__name__}: {err}")

        def padded(q, k, v):
            batch = len(lengths)
            index = torch.cat([torch.arange(n, device=device) + i * longest for i, n in enumerate(lengths)])
            pads = [torch.zeros(batch * longest, heads, head_dim, device=device, dtype=q.dtype) for _ in range(3)]
            for p, t in zip(pads, (q, k, v)):
                p[index] = t
            keep = torch.zeros(batch * longest, dtype=torch.bool, device=device)
            keep[index] = True
            keep = keep.view(batch, 1, 1, longest)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
                out = F.scaled_dot_product_attention(*(p.view(batch, longest, heads, head_dim).transpose(1, 2)
                                                       for p in pads), attn_mask=keep)  # fmt: skip
            return out.transpose(1, 2).reshape(batch * longest, heads, head_dim)[index]

        providers["padded-masked-sdpa"] = padded
    providers.update(_vendor_packages_packed(lengths, device))
    for backend in _fastdit_backends("varlen_attention", device, head_dim):
        providers[f"fastdit-{backend}"] = lambda q, k, v, b=backend: ops.varlen_attention(
            q, k, v, cu, cu, longest, longest, backend=b
        )
    return providers


# Relative (norm) error a provider's output may have against the float32 reference: bf16 inputs
# and output round at 2^-9 relative; P is rounded to bf16 before P.V in every flash kernel.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def attention_reference(q, k, v, lengths=None):
    """Float32 attention of (B, S, H, D) tensors, or of packed (total, H, D) ones split into
    ``lengths``: SDPA's memory-efficient kernel on CUDA (the math kernel would hold S x S
    scores: 550 GB at S = 75600), the math one on CPU. Independent of every provider timed."""

    def dense(q, k, v):  # (B, S, H, D)
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
        else:
            out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2)

    with torch.no_grad():
        if lengths is None:
            return dense(q, k, v)
        outs, start = [], 0
        for n in lengths:
            outs.append(dense(*(t[None, start : start + n] for t in (q, k, v)))[0])
            start += n
        return torch.cat(outs)


def _in_environment(fn, env):
    """``fn`` run with exactly the variant settings ``env`` (each call: variants are interleaved)."""
    if not env:
        return fn
    return lambda *tensors: _call_in(env, fn, tensors)


def _call_in(env, fn, tensors):
    with variant_environment(env):
        return fn(*tensors)


def _compare(report, shape, providers, tensors, flops, backward, reference, timing=None):
    """Every provider's forward in one interleaved run, then the backward of those that have one."""
    fwd = []
    for name, (fn, env, _) in providers.items():
        run = _in_environment(fn, env)
        fwd.append(Candidate(name, lambda run=run: run(*tensors), flops=flops))
    rows = report.compare(f"fwd {shape}", fwd, reference=reference, tolerance=TOLERANCE[tensors[0].dtype],
                          timing=timing)  # fmt: skip
    bwd = []
    if backward:
        for name, (fn, env, with_backward) in providers.items():
            if not with_backward or rows[name]["status"] != "ok":
                continue
            out = _in_environment(fn, env)(*tensors)
            grad = torch.randn_like(out)

            def grads(out=out, grad=grad):
                return torch.autograd.grad(out, tensors, grad, retain_graph=True)

            bwd.append(Candidate(name, grads, flops=2.5 * flops))
        report.compare(f"bwd {shape}", bwd, timing=timing)
    for name, row in rows.items():
        if row["status"] == "ok":
            print(f"  {name} {shape}: fwd {row['ms']:.3f} ms ({row['tflops']} TFLOP/s)", flush=True)
    return rows


def _fastdit_ms(rows: dict) -> dict:
    """provider -> forward ms of the fastdit providers measured correct (variants are settings of
    the triton provider, not providers a policy can name: left out)."""
    return {name.removeprefix("fastdit-"): row["ms"] for name, row in rows.items()
            if name.startswith("fastdit-") and "+" not in name and row["status"] == "ok"}  # fmt: skip


def write_policy(path: str, measured: dict, device: torch.device) -> dict:
    """The fastest provider per policy key, as the JSON fastdit.ops.attention_policy reads."""
    import json
    import os

    from fastdit.benchmarks.harness import environment
    from fastdit.ops import attention_policy

    measured = {key: per for key, per in sorted(measured.items()) if per}
    env = environment(device)
    policy = {
        "device_type": device.type,
        "device": attention_policy.device_name(device),
        "source": {key: env[key] for key in ("command", "torch", "cuda", "triton", "date", "versions")},
        "ms": {key: {name: round(ms, 4) for name, ms in per.items()} for key, per in measured.items()},
        "choices": {key: min(per, key=per.get) for key, per in measured.items()},
    }
    attention_policy.check_policy(policy, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(policy, f, indent=2)
        f.write("\n")
    print(f"  wrote the attention policy {path}: {policy['choices']}", flush=True)
    return policy


def run(args: argparse.Namespace, device: torch.device) -> Report:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads = args.attn_heads or (24 if cuda else 2)
    default_dims = ("128" if args.quick else "128,64") if cuda else "32"
    head_dims = [int(d) for d in (args.attn_head_dims or default_dims).split(",")]
    if args.attn_seqlens:
        seqlens = [int(s) for s in args.attn_seqlens.split(",")]
    elif cuda:
        seqlens = [4096, 16384] if args.quick else [4096, 16384, 32760, 75600]
    else:
        seqlens = [64, 256]
    backward = not args.attn_no_backward
    timing = {"budget_s": 0.2} if args.quick and not cuda else None  # CPU smoke runs: a few calls each
    report = Report("attention", device, measure_ceilings(device, quick=args.quick))
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(backward)

    from fastdit.ops.attention import seq_bucket
    from fastdit.ops.attention_policy import policy_key

    measured = {}  # policy key -> {fastdit provider: forward ms}, summed over the shapes of a key
    for head_dim in head_dims:
        providers = with_variants(_providers_dense(device, args.quick, head_dim))
        for seqlen in seqlens:
            tensors = tuple(rand(1, seqlen, heads, head_dim) for _ in range(3))
            flops = _flops([seqlen], [seqlen], heads, head_dim)
            shape = f"dense S={seqlen} H={heads} D={head_dim}"
            reference = attention_reference(*tensors)
            rows = _compare(report, shape, providers, tensors, flops, backward, reference, timing)
            _add_ms(measured, policy_key("attention", dtype, head_dim, seq_bucket(seqlen), False), rows)
            del tensors, reference
    lengths = list(MIXED) if cuda and not args.quick else ([16384, 4096, 1024] if cuda else [96, 17, 40])
    head_dim = head_dims[0]
    tensors = tuple(rand(sum(lengths), heads, head_dim) for _ in range(3))
    flops = _flops(lengths, lengths, heads, head_dim)
    shape = f"packed {'+'.join(map(str, lengths))} H={heads} D={head_dim}"
    reference = attention_reference(*tensors, lengths=lengths)
    providers = with_variants(_providers_packed(lengths, heads, head_dim, device))
    rows = _compare(report, shape, providers, tensors, flops, backward, reference, timing)
    _add_ms(measured, policy_key("varlen_attention", dtype, head_dim, seq_bucket(max(lengths)), False), rows)
    del tensors, reference
    _compare_key_padding(report, args, device, dtype, heads, head_dim, gen, timing)
    if args.policy_out:
        write_policy(args.policy_out, measured, device)
    return report


def _add_ms(measured: dict, key: str, rows: dict) -> None:
    """Add one shape's forward times to its policy key (a provider must run every shape of a key)."""
    ms = _fastdit_ms(rows)
    per = measured.get(key)
    if per is None:
        measured[key] = ms
    else:  # providers missing from one of the key's shapes drop out of it
        measured[key] = {name: per[name] + ms[name] for name in per if name in ms}


def _compare_key_padding(report, args, device, dtype, heads, head_dim, gen, timing):
    """Two samples whose keys are 30% padding (at the end of one, at the start of the other, as
    text-first layouts pad), through a diffusers attention backend: torch SDPA computing every key
    and masking (diffusers' native backend) against fastdit's backend, which packs the kept keys
    and runs the varlen kernel. Two mask forms: the key-padding ``[B,1,1,S]`` most models pass, and
    HunyuanVideo 1.5's ``valid_q & valid_k`` ``[B,1,S,S]`` (padded queries see nothing). FLOPs
    count the kept queries and keys only, for both providers."""
    seqlen = args.attn_mask_seqlen or (2048 if args.quick else 16384)
    cut = int(seqlen * 0.3)
    keep = torch.ones(2, seqlen, dtype=torch.bool, device=device)
    keep[0, seqlen - cut :] = False
    keep[1, :cut] = False
    tensors = tuple(torch.randn(2, seqlen, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastdit.integrations.diffusers import fastdit_attention

    key_mask = keep[:, None, None, :]
    with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in tensors),
                                                   attn_mask=key_mask).transpose(1, 2)  # fmt: skip
    forms = [
        ("key-padding mask [B,1,1,S]", key_mask, reference, seqlen),
        # padded query rows see no key: SDPA gives them 0, the rest is the key-padding result
        ("valid_q & valid_k mask [B,1,S,S] (HunyuanVideo 1.5)", keep[:, None, :, None] & key_mask,
         reference * keep[:, :, None, None], seqlen - cut),
    ]  # fmt: skip
    for name, mask, want, queries in forms:

        def sdpa_masked(q, k, v, mask=mask):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask).transpose(1, 2)  # fmt: skip

        def fastdit_masked(q, k, v, mask=mask):
            return fastdit_attention(q, k, v, attn_mask=mask)

        providers = {"sdpa-masked": (sdpa_masked, {}, False), "fastdit-varlen-from-mask": (fastdit_masked, {}, False)}
        flops = _flops([queries, queries], [seqlen - cut, seqlen - cut], heads, head_dim)
        shape = f"{name} 2x{seqlen} (30% padded) H={heads} D={head_dim}"
        with torch.no_grad():
            _compare(report, shape, providers, tensors, flops, False, want, timing)

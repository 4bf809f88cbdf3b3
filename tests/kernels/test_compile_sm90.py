"""Every Triton kernel compiles for the H100 (sm_90) at the configurations the launchers use.

Triton compiles ahead of time without a GPU (its bundled ptxas builds the cubin), so kernels
that would not compile on the GPU machine fail here, in CI, before any GPU session. The PTX is
also checked for what matters on Hopper: the attention kernels must issue wgmma (tensor cores).
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from fastdit.kernels.launch import interpreting  # noqa: E402

# Under TRITON_INTERPRET=1 (CPU test runs) kernels are interpreted functions that cannot be
# compiled: the compile tests then run in a child process with the interpreter off.
compiles = pytest.mark.skipif(interpreting(), reason="run by test_compile_in_subprocess")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdit.kernels import attention, modulation, rope3d, rotary  # noqa: E402
from fastdit.kernels import causal_conv3d as conv3d  # noqa: E402
from fastdit.kernels import rms_norm_silu as norm_silu  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(compiled) -> dict:
    """Registers and stack bytes (spills, call frames) per thread, from the cubin."""
    import re
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", text)
    return {"registers": int(match.group(1)), "stack": int(match.group(2))}


def strides_and_sizes(kernel, extra=()):
    """Integer args that are multiples of 16 at real shapes (Triton's launcher marks those)."""
    return [n for n in kernel.arg_names if n.startswith("stride")] + list(extra)


def compile_for_h100(kernel, pointers: dict, scalars: dict, constexprs: dict, num_warps=4, num_stages=3, divisible=()):
    """Compile ``kernel``: pointer args -> element type, scalar args -> type, constexpr values.

    Pointers, and the integer args named in ``divisible`` (strides and sizes that are multiples
    of 16 at real shapes), carry the divisibility hint Triton's launcher adds at run time, so the
    PTX shows the vector widths real launches get.
    """
    signature, attrs = {}, {}
    # constexprs left out take their defaults (as a launch would)
    constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **constexprs}
    # optional pointer args left out are None at launch, which Triton specializes as a constexpr
    for p in kernel.params:
        if p.has_default and p.default is None and p.name not in pointers:
            constexprs.setdefault(p.name, None)
    for index, name in enumerate(kernel.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = scalars.get(name, "i32")
            if name in divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


@compiles
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("norm", [False, True])
def test_rope3d_kernel_compiles(dtype, interleaved, norm):
    pointers = dict.fromkeys(["Q", "K", "Q_OUT", "K_OUT"], dtype)
    pointers.update(CU_SEQLENS="i32", GRID_THW="i32", TOKEN_OFFSET="i32", INV_FREQ="fp64", Q_W="fp32", K_W="fp32")
    constexprs = dict(HALF_D=64, T_PAIRS=22, TH_PAIRS=43, BLOCK_H=rope3d.ROPE_BLOCK_H, BLOCK_P=64, HAS_K=True,
                      HAS_OFFSET=True, INTERLEAVED=interleaved, CONJUGATE=False, NORM=norm)  # fmt: skip
    kernel = rope3d.rope3d_kernel
    compiled = compile_for_h100(kernel, pointers, {"eps": "fp32"}, constexprs, divisible=strides_and_sizes(kernel))
    assert "fma.rn.f64" in compiled.asm["ptx"]  # the angles are float64
    used = resources(compiled)
    # the only stack is the float64 sin/cos call frame; 32 heads at once used to spill 944 bytes
    assert used["stack"] <= 64, used


@compiles
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rest", [0, 32])
def test_rotary_kernel_compiles(dtype, interleaved, rest):
    """The table-driven rotation at HunyuanVideo's head (128 features, 24 heads a program at most),
    with and without pass-through features: no spills."""
    pointers = {"X": dtype, "OUT": dtype, "COS": "fp32", "SIN": "fp32"}
    constexprs = dict(SIGN=1, PAIRS=(128 - rest) // 2, DIM=128, BLOCK_P=64, BLOCK_REST=rest, BLOCK_H=32,
                      INTERLEAVED=interleaved)  # fmt: skip
    kernel = rotary.rotary_kernel
    compiled = compile_for_h100(kernel, pointers, {}, constexprs, divisible=strides_and_sizes(kernel))
    assert resources(compiled)["stack"] == 0


@compiles
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("residual, mod, per_token", [(False, True, False), (True, False, False), (True, True, True)])
def test_modulation_kernels_compile(dtype, residual, mod, per_token):
    rows = ["X", "Y", "R_OUT", "OUT"]
    pointers = {**dict.fromkeys(rows, dtype), **dict.fromkeys(["GATE", "SHIFT", "SCALE", "WEIGHT", "BIAS"], "fp32")}
    pointers["CU_SEQLENS"] = "i32"
    flags = dict(PER_TOKEN=per_token, HAS_RESIDUAL=residual, HAS_MOD=mod, IS_RMS=False, HAS_WEIGHT=mod,
                 HAS_BIAS=mod)  # fmt: skip
    sizes = ("n_cols",)
    kernel = modulation.modulation_fwd_kernel
    compiled = compile_for_h100(
        kernel, pointers, {"eps": "fp32"}, dict(BLOCK_C=4096, **flags), num_warps=8,
        divisible=strides_and_sizes(kernel, sizes),
    )  # fmt: skip
    assert resources(compiled)["stack"] == 0
    if dtype == "bf16":
        assert "ld.global.v4" in compiled.asm["ptx"]  # 16-byte row loads
    bwd_pointers = {**dict.fromkeys(["G_OUT", "G_R", "X", "Y", "DX", "DY"], dtype), "CU_SEQLENS": "i32"}
    bwd_pointers.update(dict.fromkeys(["GATE", "SCALE", "WEIGHT", "BIAS", "DSHIFT", "DSCALE", "DGATE", "DWEIGHT",
                                       "DBIAS"], "fp32"))  # fmt: skip
    kernel = modulation.modulation_bwd_kernel
    compiled = compile_for_h100(
        kernel, bwd_pointers, {"eps": "fp32"}, dict(BLOCK_C=4096, **flags), num_warps=8,
        divisible=strides_and_sizes(kernel, sizes),
    )  # fmt: skip
    assert resources(compiled)["stack"] == 0
    if not per_token:
        assert "atom.global" in compiled.asm["ptx"] or "red.global" in compiled.asm["ptx"]


ATTN_SCALARS = {"scale_log2": "fp32", "scale": "fp32"}


@compiles
@pytest.mark.parametrize("head_dim, dtype", [(128, "bf16"), (64, "bf16"), (72, "fp16")])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_kernels_compile_to_wgmma_without_spills(head_dim, dtype, causal):
    """At the launcher's tiles every attention kernel issues wgmma; the forward and dQ kernels
    spill nothing; dK/dV at most 32 bytes at D = 64 / 128 (24 measured, causal, D = 128) and
    160 at the padded D = 72 (72 / 152 measured); other tile shapes spill more or lose wgmma."""
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ"], dtype),
                "LSE": "fp32", "DELTA": "fp32", "CU_Q": "i32", "CU_K": "i32", "ORDER": "i32"}  # fmt: skip
    limits = {"fwd": 0, "dkdv": 32 if head_dim % 16 == 0 else 160, "dq": 0}
    kernels = {
        "fwd": attention.attn_fwd_kernel,
        "dkdv": attention.attn_bwd_dkdv_kernel,
        "dq": attention.attn_bwd_dq_kernel,
    }
    for name, kernel in kernels.items():
        block_m, block_n, block_d, opts = attention._tiles(head_dim, name)
        tile = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal, PRECISION="tf32")
        if name == "fwd":
            tile["SEQLEN_BUCKET"] = 15
        divisible = strides_and_sizes(kernel, ("head_dim",) if head_dim % 16 == 0 else ())
        compiled = compile_for_h100(kernel, pointers, ATTN_SCALARS, tile, divisible=divisible, **opts)
        assert "wgmma" in compiled.asm["ptx"], f"{name} does not use Hopper's warpgroup MMA"
        used = resources(compiled)
        assert used["stack"] <= limits[name], (name, used)
    block_d = max(16, triton.next_power_of_2(head_dim))
    kernel = attention.attn_bwd_preprocess_kernel
    divisible = strides_and_sizes(kernel, ("head_dim",) if head_dim % 16 == 0 else ())
    pre = compile_for_h100(kernel, pointers, {}, dict(BLOCK_M=64, BLOCK_D=block_d), divisible=divisible)
    assert resources(pre)["stack"] == 0


@compiles
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", range(len(attention.FWD_CONFIGS)))
def test_every_autotuned_forward_config_keeps_wgmma_without_spills(head_dim, config):
    tune = attention.FWD_CONFIGS[config]
    kept = tune in attention._prune_fwd(attention.FWD_CONFIGS, {"BLOCK_D": head_dim})
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT"], "bf16"), "LSE": "fp32", "CU_Q": "i32", "CU_K": "i32",
                "ORDER": "i32"}  # fmt: skip
    constexprs = dict(**tune.kwargs, BLOCK_D=head_dim, CAUSAL=True, PRECISION="tf32", SEQLEN_BUCKET=15)
    kernel = attention.attn_fwd_kernel
    compiled = compile_for_h100(
        kernel, pointers, ATTN_SCALARS, constexprs, num_warps=tune.num_warps, num_stages=tune.num_stages,
        divisible=strides_and_sizes(kernel, ("head_dim",)),
    )  # fmt: skip
    assert "wgmma" in compiled.asm["ptx"]
    # the tiles the autotuner keeps spill nothing; the one it prunes at this head dim does spill
    assert (resources(compiled)["stack"] == 0) == kept, (_tune_key(tune), resources(compiled))
    assert compiled.metadata.shared <= 232448  # the H100's shared memory per block


@compiles
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel_name", ["dkdv", "dq"])
def test_every_autotuned_backward_config_keeps_wgmma_without_spills(head_dim, kernel_name):
    kernel = attention.attn_bwd_dkdv_kernel if kernel_name == "dkdv" else attention.attn_bwd_dq_kernel
    configs = attention.DKDV_CONFIGS if kernel_name == "dkdv" else attention.DQ_CONFIGS
    if kernel_name == "dkdv":
        configs = attention._prune_dkdv(configs, {"BLOCK_D": head_dim})
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ"], "bf16"),
                "LSE": "fp32", "DELTA": "fp32", "CU_Q": "i32", "CU_K": "i32", "ORDER": "i32"}  # fmt: skip
    assert configs
    for tune in configs:
        constexprs = dict(**tune.kwargs, BLOCK_D=head_dim, CAUSAL=True, PRECISION="tf32", SEQLEN_BUCKET=15)
        compiled = compile_for_h100(
            kernel, pointers, ATTN_SCALARS, constexprs, num_warps=tune.num_warps, num_stages=tune.num_stages,
            divisible=strides_and_sizes(kernel, ("head_dim",)),
        )  # fmt: skip
        assert "wgmma" in compiled.asm["ptx"], tune
        # causal dK/dV keeps a little stack (24-32 B, as the fixed tiles); dQ none
        limit = 32 if kernel_name == "dkdv" else 0
        assert resources(compiled)["stack"] <= limit, (_tune_key(tune), resources(compiled))
        assert compiled.metadata.shared <= 232448


def _tune_key(tune):
    return (*tune.kwargs.values(), tune.num_warps, tune.num_stages)


@compiles
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_forward_tma_variant_issues_bulk_tensor_copies(head_dim):
    """USE_TMA (FASTDIT_ATTN_TMA=1): K / V arrive by cp.async.bulk.tensor, still wgmma, no spills."""
    block_m, block_n, block_d, opts = attention._tiles(head_dim, "fwd")
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT"], "bf16"), "LSE": "fp32", "CU_Q": "i32", "CU_K": "i32",
                "ORDER": "i32"}  # fmt: skip
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=False, PRECISION="tf32",
                      SEQLEN_BUCKET=15, USE_TMA=True)  # fmt: skip
    kernel = attention.attn_fwd_kernel
    compiled = compile_for_h100(kernel, pointers, ATTN_SCALARS, constexprs,
                                divisible=strides_and_sizes(kernel, ("head_dim", "kv_width")), **opts)  # fmt: skip
    ptx = compiled.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma" in ptx
    assert resources(compiled)["stack"] == 0


@compiles
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tma", [False, True])
def test_persistent_attention_forward_compiles_to_wgmma_without_spills(head_dim, tma):
    block_m, block_n, block_d, opts = attention._tiles(head_dim, "fwd")
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT"], "bf16"), "LSE": "fp32", "CU_Q": "i32", "CU_K": "i32",
                "ORDER": "i32"}  # fmt: skip
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=False, PRECISION="tf32", USE_TMA=tma)
    kernel = attention.attn_fwd_persistent_kernel
    compiled = compile_for_h100(kernel, pointers, ATTN_SCALARS, constexprs,
                                divisible=strides_and_sizes(kernel, ("head_dim", "kv_width")), **opts)  # fmt: skip
    assert "wgmma" in compiled.asm["ptx"]
    assert resources(compiled)["stack"] == 0, resources(compiled)


def _setmaxnreg(ptx: str) -> set[str]:
    """The register budgets a warp-specialized kernel hands its partitions (setmaxnreg.inc / .dec)."""
    return {line.split()[0] + " " + line.split()[1].rstrip(";") for line in ptx.splitlines() if "setmaxnreg" in line}


@compiles
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_warp_specialized_forward_is_specialized(head_dim, causal, persistent):
    """FASTDIT_ATTN_WS=1, at every autotune config: Triton's Hopper pass really specializes the
    key loop (12 warps: a TMA producer warpgroup and two consumer warpgroups, register budgets
    moved by setmaxnreg), still wgmma and bulk tensor copies, no spills, within shared memory."""
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT"], "bf16"), "LSE": "fp32", "CU_Q": "i32", "CU_K": "i32",
                "ORDER": "i32"}  # fmt: skip
    kernel = attention.attn_fwd_persistent_kernel if persistent else attention.attn_fwd_kernel
    configs = attention.WS_FWD_CONFIGS[:1] if persistent else attention.WS_FWD_CONFIGS
    for tune in configs:
        constexprs = dict(**tune.kwargs, BLOCK_D=head_dim, CAUSAL=causal, PRECISION="tf32", USE_TMA=True,
                          WARP_SPECIALIZE=True)  # fmt: skip
        if not persistent:
            constexprs["SEQLEN_BUCKET"] = 15
        compiled = compile_for_h100(
            kernel, pointers, ATTN_SCALARS, constexprs, num_warps=tune.num_warps, num_stages=tune.num_stages,
            divisible=strides_and_sizes(kernel, ("head_dim", "kv_width")),
        )  # fmt: skip
        ptx = compiled.asm["ptx"]
        assert compiled.metadata.num_warps == 12, _tune_key(tune)
        budgets = _setmaxnreg(ptx)
        assert any(b.startswith("setmaxnreg.dec") for b in budgets), budgets
        assert any(b.startswith("setmaxnreg.inc") for b in budgets), budgets
        assert "cp.async.bulk.tensor" in ptx and "wgmma" in ptx
        assert resources(compiled)["stack"] == 0, (_tune_key(tune), resources(compiled))
        assert compiled.metadata.shared <= 232448


@compiles
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel_name", ["dkdv", "dq"])
def test_warp_specialized_backward_is_specialized(head_dim, kernel_name):
    """FASTDIT_ATTN_BWD_WS=1, at every autotune config the pruner keeps: specialized (12 warps,
    setmaxnreg), wgmma and bulk tensor copies, causal dK/dV stack <= 8 B (0 for dQ), shared memory."""
    if kernel_name == "dkdv":
        kernel = attention.attn_bwd_dkdv_kernel
        configs = attention._prune_dkdv_ws(attention.DKDV_WS_CONFIGS, {"BLOCK_D": head_dim})
    else:
        kernel, configs = attention.attn_bwd_dq_kernel, attention.DQ_WS_CONFIGS
    pointers = {**dict.fromkeys(["Q", "K", "V", "DO", "DK", "DV", "DQ"], "bf16"), "LSE": "fp32", "DELTA": "fp32",
                "CU_Q": "i32", "CU_K": "i32", "ORDER": "i32", "CU_ALIGNED": "i32"}  # fmt: skip
    assert configs
    for tune in configs:
        for causal in (False, True):
            constexprs = dict(**tune.kwargs, BLOCK_D=head_dim, CAUSAL=causal, PRECISION="tf32", SEQLEN_BUCKET=15,
                              WARP_SPECIALIZE=True)  # fmt: skip
            compiled = compile_for_h100(
                kernel, pointers, ATTN_SCALARS, constexprs, num_warps=tune.num_warps, num_stages=tune.num_stages,
                divisible=strides_and_sizes(kernel, ("head_dim", "kv_width")),
            )  # fmt: skip
            ptx = compiled.asm["ptx"]
            assert compiled.metadata.num_warps == 12 and _setmaxnreg(ptx), (_tune_key(tune), causal)
            assert "cp.async.bulk.tensor" in ptx and "wgmma" in ptx
            limit = 8 if kernel_name == "dkdv" and causal else 0
            assert resources(compiled)["stack"] <= limit, (_tune_key(tune), causal, resources(compiled))
            assert compiled.metadata.shared <= 232448


@compiles
def test_backward_preprocess_writes_the_aligned_copies():
    kernel = attention.attn_bwd_preprocess_kernel
    pointers = {"OUT": "bf16", "DO": "bf16", "DELTA": "fp32", "CU_Q": "i32", "ORDER": "i32", "LSE": "fp32",
                "LSE_ALIGNED": "fp32", "CU_ALIGNED": "i32"}  # fmt: skip
    compiled = compile_for_h100(kernel, pointers, {}, dict(BLOCK_M=64, BLOCK_D=128),
                                divisible=strides_and_sizes(kernel, ("head_dim",)))  # fmt: skip
    assert compiled.asm["ptx"].count("st.global") >= 2 and resources(compiled)["stack"] == 0


@compiles
def test_warp_specialization_needs_four_warps():
    """At num_warps = 8 Triton 3.6 leaves the loop unspecialized: WS_FWD_CONFIGS must use 4."""
    assert {c.num_warps for c in attention.WS_FWD_CONFIGS} == {4}
    assert attention._tiles(128, "fwd_ws")[3]["num_warps"] == 4
    pointers = {**dict.fromkeys(["Q", "K", "V", "OUT"], "bf16"), "LSE": "fp32", "CU_Q": "i32", "CU_K": "i32",
                "ORDER": "i32"}  # fmt: skip
    constexprs = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=128, CAUSAL=False, PRECISION="tf32", SEQLEN_BUCKET=15,
                      USE_TMA=True, WARP_SPECIALIZE=True)  # fmt: skip
    kernel = attention.attn_fwd_kernel
    compiled = compile_for_h100(kernel, pointers, ATTN_SCALARS, constexprs, num_warps=8, num_stages=2,
                                divisible=strides_and_sizes(kernel, ("head_dim", "kv_width")))  # fmt: skip
    assert compiled.metadata.num_warps == 8 and not _setmaxnreg(compiled.asm["ptx"])


CONV_POINTERS = ["X", "CACHE", "W", "BIAS", "RES", "OUT"]
# Channels-last tensors: channel strides are 1 (Triton specializes them at launch), every
# other stride and the channel counts are multiples of 16 at the VAE's shapes.
CONV_UNIT = {name: 1 for name in ("sx_c", "sc_c", "sr_c", "so_c", "sw_i")}
CONV_DIVISIBLE = [n for n in conv3d.conv3d_fwd_kernel.arg_names if n[:2] in ("sx", "sc", "sr", "so", "sw")
                  and n not in CONV_UNIT] + ["cin", "cout"]  # fmt: skip


def compile_conv(tiles: dict, kernel=(3, 3, 3), up=1, has_res=True, num_warps=4, num_stages=3, w_tma=False):
    flags = dict(KT=kernel[0], KH=kernel[1], KW=kernel[2], ST=1, SH=1, SW=1, UP=up, HAS_CACHE=kernel[0] > 1,
                 HAS_BIAS=True, HAS_RES=has_res, PRECISION="tf32", W_TMA=w_tma, **tiles)  # fmt: skip
    return compile_for_h100(
        conv3d.conv3d_fwd_kernel, dict.fromkeys(CONV_POINTERS, "bf16"), {}, {**flags, **CONV_UNIT},
        num_warps=num_warps, num_stages=num_stages, divisible=CONV_DIVISIBLE,
    )  # fmt: skip


@compiles
@pytest.mark.parametrize("config", range(len(conv3d.FWD_CONFIGS)))
def test_every_conv3d_config_keeps_wgmma_within_shared_memory(config):
    """The implicit GEMM's tiles issue wgmma, load the A tile (channels-last rows) with 16-byte
    vectors and fit the H100's shared memory at every autotune config."""
    tune = conv3d.FWD_CONFIGS[config]
    compiled = compile_conv(tune.kwargs, num_warps=tune.num_warps, num_stages=tune.num_stages)
    ptx = compiled.asm["ptx"]
    assert "wgmma" in ptx
    assert "ld.global.v4" in ptx or "cp.async.cg.shared.global" in ptx or "cp.async.ca.shared.global" in ptx
    assert resources(compiled)["stack"] == 0
    assert compiled.metadata.shared <= 232448


@compiles
@pytest.mark.parametrize("config", range(len(conv3d.FWD_CONFIGS)))
def test_conv3d_weight_tma_variant_issues_bulk_copies_with_fewer_registers(config):
    """FASTDIT_CONV_TMA=1 at every autotune config: weight tiles by cp.async.bulk.tensor, still
    wgmma, no spills, within shared memory, and never more registers than the gathered weights
    (measured: 250 -> 200 at 128x128x64, 240 -> 181 at 128x64x32)."""
    tune = conv3d.FWD_CONFIGS[config]
    plain = compile_conv(tune.kwargs, num_warps=tune.num_warps, num_stages=tune.num_stages)
    tma = compile_conv(tune.kwargs, num_warps=tune.num_warps, num_stages=tune.num_stages, w_tma=True)
    ptx = tma.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma" in ptx
    assert resources(tma)["stack"] == 0 and tma.metadata.shared <= 232448
    assert resources(tma)["registers"] <= resources(plain)["registers"]


@compiles
@pytest.mark.parametrize("cin, cout, kernel, up", [(384, 384, (3, 3, 3), 1), (16, 384, (3, 3, 3), 1),
                                                   (96, 96, (3, 3, 3), 1), (192, 96, (1, 3, 3), 2)])  # fmt: skip
def test_conv3d_fixed_tiles_compile(cin, cout, kernel, up):
    tiles = conv3d._tiles(cin, cout)
    opts = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
    compiled = compile_conv(tiles, kernel=kernel, up=up, **opts)
    assert "wgmma" in compiled.asm["ptx"]
    assert resources(compiled)["stack"] == 0


@compiles
@pytest.mark.parametrize("channels", [96, 384])
def test_rms_norm_silu_kernel_compiles(channels):
    block_c = triton.next_power_of_2(channels)
    kernel = norm_silu.rms_norm_silu_kernel
    compiled = compile_for_h100(
        kernel, dict.fromkeys(["X", "GAMMA", "OUT"], "bf16"), {"eps": "fp32", "scale": "fp32"},
        dict(BLOCK_R=max(1, 4096 // block_c), BLOCK_C=block_c, SILU=True), divisible=("n_cols",),
    )  # fmt: skip
    assert resources(compiled)["stack"] == 0


@pytest.mark.skipif(not interpreting(), reason="the compile tests above run directly")
def test_compile_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout

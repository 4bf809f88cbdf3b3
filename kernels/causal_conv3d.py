"""Causal 3D convolution as an implicit GEMM, reading the causal padding and the stream cache in place.

The GEMM: M = output pixels (B * T' * H' * W'), N = Cout, K = kt * kh * kw * Cin. One program
computes a BLOCK_M x BLOCK_N output tile, looping over K in steps of one tap (dt, dh, dw) and
BLOCK_K input channels; the A tile is gathered from x with masks, so nothing is ever padded,
concatenated or im2col'd in memory:

- time: output frame t reads input frame ``t * st + dt - p_t``. Frames >= 0 come from x; the
  ``cached`` frames just before them from ``cache`` (the previous chunk's tail); earlier ones are
  the causal zeros (masked out).
- space: rows and columns outside ``[0, H * up)`` are the zero padding (per side: top / left
  offsets here, bottom / right implied by the output size); ``up = 2`` reads x through a nearest
  2x upsampling (``x[h // 2]``), the VAE's upsampler fused into the following conv.
- epilogue: fp32 accumulator, plus bias, plus an optional residual (``y = conv(x) + bias + res``,
  the residual block's shortcut add), rounded once to the output dtype.

Channels-last-3d tensors (channel stride 1) give contiguous 16-byte loads of the A tile and
coalesced stores; any other layout runs, through its strides, slower. Offsets are int64.
fp32 runs IEEE fp32 dots (tests), fp16 / bf16 the tensor cores (wgmma on sm_90).
"""

import torch
import triton
import triton.language as tl

from fastdit.kernels.launch import contiguous, interpreting, launcher, use_device_tma_descriptors


@triton.jit
def conv3d_fwd_kernel(
    # pointers
    X, CACHE, W, BIAS, RES, OUT,
    # sizes
    t_in, h_in, w_in, cin, cached, cout, t_out, h_out, w_out, n_pix,
    p_t, p_top, p_left,
    # strides in elements: (b, c, t, h, w) of x, cache, residual, out; (co, ci, t, h, w) of the weight
    sx_b, sx_c, sx_t, sx_h, sx_w,
    sc_b, sc_c, sc_t, sc_h, sc_w,
    sw_o, sw_i, sw_t, sw_h, sw_w,
    sr_b, sr_c, sr_t, sr_h, sr_w,
    so_b, so_c, so_t, so_h, so_w,
    # constexprs
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, UP: tl.constexpr,
    HAS_CACHE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    W_TMA: tl.constexpr = False,  # weight tiles by TMA (weight_tma=True; see use_weight_tma)
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pix = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pix_ok = pix < n_pix
    wo = pix % w_out
    rest = pix // w_out
    ho = rest % h_out
    rest = rest // h_out
    to = rest % t_out
    b = rest // t_out
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < cout
    ck = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(cin, BLOCK_K)
    if W_TMA:
        # The channels-last weight as a (Cout, taps * Cin) matrix: the tile of tap t and channels
        # c0.. is the box at column t * Cin + c0. Its columns past Cin are the next tap's weights,
        # which meet the A tile's zeroed channels; rows past Cout and columns past the last tap
        # are zero-filled.
        w_desc = tl.make_tensor_descriptor(W, shape=[cout, KT * KH * KW * cin], strides=[sw_o, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])  # fmt: skip
    for step in range(0, KT * KH * KW * c_blocks):
        tap = step // c_blocks
        c0 = (step % c_blocks) * BLOCK_K
        dt = tap // (KH * KW)
        dh = (tap // KW) % KH
        dw = tap % KW
        # Where this tap reads, per output pixel.
        ti = to * ST + dt - p_t
        hu = ho * SH + dh - p_top  # on the (upsampled) input grid
        wu = wo * SW + dw - p_left
        inside = pix_ok & (hu >= 0) & (hu < h_in * UP) & (wu >= 0) & (wu < w_in * UP)
        hi = tl.where(inside, hu, 0) // UP
        wi = tl.where(inside, wu, 0) // UP
        ci = c0 + ck
        ci_ok = ci < cin
        from_x = inside & (ti >= 0)
        a_ptr = X + (b * sx_b + tl.where(from_x, ti, 0) * sx_t + hi * sx_h + wi * sx_w)[:, None] + ci[None, :] * sx_c
        a = tl.load(a_ptr, mask=from_x[:, None] & ci_ok[None, :], other=0.0)
        if HAS_CACHE:
            from_cache = inside & (ti < 0) & (ti >= -cached)
            tc = tl.where(from_cache, ti + cached, 0)
            c_ptr = CACHE + (b * sc_b + tc * sc_t + hi * sc_h + wi * sc_w)[:, None] + ci[None, :] * sc_c
            a += tl.load(c_ptr, mask=from_cache[:, None] & ci_ok[None, :], other=0.0)
        if W_TMA:
            wt = tl.trans(w_desc.load([pid_n * BLOCK_N, tap * cin + c0]))
        else:
            w_ptr = W + co[None, :] * sw_o + ci[:, None] * sw_i + dt * sw_t + dh * sw_h + dw * sw_w
            wt = tl.load(w_ptr, mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    mask = pix_ok[:, None] & co_ok[None, :]
    if HAS_RES:
        r_ptr = RES + (b * sr_b + to * sr_t + ho * sr_h + wo * sr_w)[:, None] + co[None, :] * sr_c
        acc += tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)
    o_ptr = OUT + (b * so_b + to * so_t + ho * so_h + wo * so_w)[:, None] + co[None, :] * so_c
    tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=mask)


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem: BLOCK_K above the channels, BLOCK_N above Cout."""
    cin, cout = named_args["cin"], named_args["cout"]
    k_cap = max(16, triton.next_power_of_2(cin))
    n_cap = max(32, triton.next_power_of_2(cout))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= k_cap and c.kwargs["BLOCK_N"] <= n_cap]
    return kept or configs[:1]


# Implicit-GEMM tiles for sm_90 (wgmma wants BLOCK_M >= 64 per warpgroup). Each one compiles to
# wgmma with no spills (tests/kernels/test_compile_sm90.py); 256-row tiles and 128 x 64 on four
# warps spilled 144-584 bytes and were dropped. Autotuned per (Cin, Cout, kernel, stride,
# upsample) on GPUs; autotune=False (the conv_autotune setting) keeps _tiles.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, n, k, w, s in (
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4),
        (128, 32, 16, 4, 4),
        (128, 128, 16, 8, 4),
        (128, 64, 16, 4, 4),
    )
]
conv3d_fwd_autotuned = triton.autotune(
    configs=FWD_CONFIGS,
    key=["cin", "cout", "KT", "KH", "KW", "ST", "SH", "SW", "UP", "HAS_RES", "W_TMA"],
    prune_configs_by={"early_config_prune": _prune},
)(conv3d_fwd_kernel)


def use_weight_tma(weight: torch.Tensor, requested: bool = True) -> bool:
    """Weight tiles by TMA instead of cp.async gathers when asked (``requested``: the conv_tma
    setting) and the layout allows it (in the sm_90 compile
    registers drop from 240-250 to 176-200 per thread at the wide tiles). Needs the weight
    channels-last and dense ((Cout, kt, kh, kw, Cin) in memory, as CausalVAE stores it) with a
    16-byte aligned base, row and tap offsets (Cin * element size a multiple of 16). Off until an
    H100 run shows it pays."""
    if not requested:
        return False
    cout, cin, kt, kh, kw = weight.shape
    size = weight.element_size()
    want = (kt * kh * kw * cin, 1, kh * kw * cin, kw * cin, cin)
    dense_channels_last = all(n == 1 or got == w for n, got, w in zip(weight.shape, weight.stride(), want))
    return dense_channels_last and weight.data_ptr() % 16 == 0 and (cin * size) % 16 == 0


def _tiles(cin: int, cout: int) -> dict:
    """Fixed tiles (interpreter, or autotuning off): small ones under the interpreter."""
    block_k = min(64, max(16, triton.next_power_of_2(cin)))
    block_n = min(128, max(16 if interpreting() else 32, triton.next_power_of_2(cout)))
    if interpreting():
        return dict(BLOCK_M=128, BLOCK_N=min(block_n, 64), BLOCK_K=min(block_k, 32))
    return dict(
        BLOCK_M=128,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=8 if block_n >= 128 or block_n * block_k >= 4096 else 4,
        num_stages=3,
    )


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0, 0)


def causal_conv3d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    cache: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    time_padding: int,
    upsample: int,
    out_shape: tuple[int, int, int, int, int],
    *,
    autotune: bool = True,
    weight_tma: bool = False,
) -> torch.Tensor:
    """y ``out_shape`` (B, Cout, T', H', W'), channels-last-3d, in x's dtype.

    ``padding`` is (top, bottom, left, right); bottom / right only set the output size the
    caller computed. ``cache`` holds the last <= ``time_padding`` frames before x. ``autotune``:
    autotuned tiles (GPUs only); ``weight_tma``: weight tiles by TMA where use_weight_tma allows.
    """
    batch, cin, t_in, h_in, w_in = x.shape
    cout, _, kt, kh, kw = weight.shape
    if weight.stride(1) != 1:
        # Cin innermost, so each (Cin block, Cout block) weight tile loads as contiguous rows
        # (a default-layout (Cout, Cin, kt, kh, kw) weight would be gathered 27 elements apart).
        # A copy per call (<= 8 MB at the VAE's shapes); CausalVAE stores its weights this way.
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    n_pix = batch * out_shape[2] * out_shape[3] * out_shape[4]
    if n_pix == 0:
        return out
    (bias,) = contiguous(bias)
    w_tma = use_weight_tma(weight, weight_tma)
    if w_tma:
        use_device_tma_descriptors()
    args = (
        x, cache, weight, bias, residual, out,
        t_in, h_in, w_in, cin, 0 if cache is None else cache.shape[2], cout, *out_shape[2:], n_pix,
        time_padding, padding[0], padding[2],
        *x.stride(), *_strides(cache), *weight.stride(), *_strides(residual), *out.stride(),
    )  # fmt: skip
    flags = dict(
        KT=kt, KH=kh, KW=kw, ST=stride[0], SH=stride[1], SW=stride[2], UP=upsample,
        HAS_CACHE=cache is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", W_TMA=w_tma,
    )  # fmt: skip
    if autotune and not interpreting():
        grid = lambda meta: (triton.cdiv(n_pix, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))  # noqa: E731
        launcher(conv3d_fwd_autotuned)[grid](*args, **flags)
    else:
        tiles = _tiles(cin, cout)
        grid = (triton.cdiv(n_pix, tiles["BLOCK_M"]), triton.cdiv(cout, tiles["BLOCK_N"]))
        launcher(conv3d_fwd_kernel)[grid](*args, **flags, **tiles)
    return out

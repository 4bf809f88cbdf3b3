"""adaLN modulation and gated residual kernels, shared by ``adaln_modulate``, ``gated_residual``
and the fused ``gated_residual_modulate`` (``HAS_RESIDUAL`` / ``HAS_MOD`` select the parts).

Forward, one row (token) per program: ``r = res + y * gate`` (stored, rounded to res.dtype), then
``norm(r) * (1 + scale) + shift`` with LayerNorm or RMSNorm statistics in fp32. Each row is read
once and each output written once: 2 reads + 2 writes per element for the fused op (8 bytes in
bf16) against 5 passes for the unfused pair.

Backward, a chunk of consecutive rows per program: dx (or dres), dy per row; the per-sample
reductions (dshift, dscale, dgate) and the affine ones (dweight, dbias) are summed in registers
over the chunk and flushed with one fp32 atomic add per sample boundary, so contention is one
add per program and element, not one per token. Atomics make those reductions' last bits depend
on scheduling (dx and dy are deterministic).
"""

import torch
import triton
import triton.language as tl

from fastdit.kernels.launch import contiguous, launcher


@triton.jit
def _sample_of(CU_SEQLENS, num_samples, row):
    """Sample of packed row ``row``: the number of samples after the first that start <= row."""
    seg = 0
    for b in range(1, num_samples):
        seg += (tl.load(CU_SEQLENS + b) <= row).to(tl.int32)
    return seg


@triton.jit
def _normalize(x, mask, n_cols, eps, IS_RMS: tl.constexpr):
    """(x_hat, rstd) of one fp32 row; masked lanes give 0."""
    if IS_RMS:
        centred = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    return centred * rstd, rstd


@triton.jit
def modulation_fwd_kernel(
    # pointers
    X,  # res (HAS_RESIDUAL) or x: (N, C) rows
    Y,  # (N, C) rows, HAS_RESIDUAL
    GATE,  # (rows_mod, C) fp32, HAS_RESIDUAL
    R_OUT,  # (N, C) r = res + y * gate, HAS_RESIDUAL
    SHIFT,  # (rows_mod, C), HAS_MOD
    SCALE,
    WEIGHT,  # (C,) or unused
    BIAS,
    OUT,  # (N, C) modulated, HAS_MOD
    CU_SEQLENS,  # (B+1,) int32; unused when PER_TOKEN
    # sizes
    num_samples,
    n_cols,
    eps,
    # strides of rows, in elements (columns are contiguous)
    stride_x,
    stride_y,
    stride_r,
    stride_out,
    stride_mod,
    # constexprs
    BLOCK_C: tl.constexpr,  # next power of two >= C: the whole row in registers for the statistics
    PER_TOKEN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_MOD: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if PER_TOKEN:
        mod_row = row
    else:
        mod_row = _sample_of(CU_SEQLENS, num_samples, row).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        r = (x + y * gate).to(R_OUT.dtype.element_ty)
        tl.store(R_OUT + row * stride_r + cols, r, mask=mask)
        x = r.to(tl.float32)  # the norm reads r as stored, like the unfused pair
    if HAS_MOD:
        x_hat, _ = _normalize(x, mask, n_cols, eps, IS_RMS)
        if HAS_WEIGHT:
            x_hat = x_hat * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x_hat = x_hat + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        out = x_hat * (1.0 + scale) + shift
        tl.store(OUT + row * stride_out + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def modulation_bwd_kernel(
    # pointers
    G_OUT,  # (N, C) grad of the modulated output, HAS_MOD
    G_R,  # (N, C) grad of r, HAS_RESIDUAL
    X,  # (N, C) the normalized input: x, or the stored r of the fused op
    Y,  # (N, C), HAS_RESIDUAL
    GATE,  # (rows_mod, C), HAS_RESIDUAL
    SCALE,  # (rows_mod, C), HAS_MOD
    WEIGHT,
    BIAS,
    DX,  # (N, C): dx (adaln) or dres (fused); written when HAS_MOD
    DY,  # (N, C), HAS_RESIDUAL
    DSHIFT,  # (rows_mod, C) fp32 accumulators, zeroed (per sample) or written (per token)
    DSCALE,
    DGATE,
    DWEIGHT,  # (C,) fp32 accumulators, zeroed
    DBIAS,
    CU_SEQLENS,
    # sizes
    num_rows,
    num_samples,
    n_cols,
    eps,
    rows_per_program,
    # strides of rows, in elements
    stride_g,
    stride_gr,
    stride_x,
    stride_y,
    stride_dx,
    stride_dy,
    stride_mod,
    # constexprs
    BLOCK_C: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_MOD: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_weight = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    current = _sample_of(CU_SEQLENS, num_samples, row_start).to(tl.int64)
    for row in range(row_start, row_end):
        if PER_TOKEN:
            mod_row = row
        else:
            mod_row = _sample_of(CU_SEQLENS, num_samples, row).to(tl.int64)
            if mod_row != current:  # a sample boundary inside the chunk: flush its sums
                if HAS_MOD:
                    tl.atomic_add(DSHIFT + current * n_cols + cols, acc_shift, mask=mask)
                    tl.atomic_add(DSCALE + current * n_cols + cols, acc_scale, mask=mask)
                if HAS_RESIDUAL:
                    tl.atomic_add(DGATE + current * n_cols + cols, acc_gate, mask=mask)
                acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
                acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
                acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
                current = mod_row
        dr = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_MOD:
            g = tl.load(G_OUT + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat, rstd = _normalize(x, mask, n_cols, eps, IS_RMS)
            normed = x_hat
            if HAS_WEIGHT:
                normed = normed * weight
            if HAS_BIAS:
                normed = normed + bias
            scale = tl.load(SCALE + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
            d_normed = g * (1.0 + scale)
            if HAS_WEIGHT:
                acc_weight += d_normed * x_hat
                d_xhat = d_normed * weight
            else:
                d_xhat = d_normed
            if HAS_BIAS:
                acc_bias += d_normed
            proj = tl.sum(d_xhat * x_hat, axis=0) / n_cols
            if IS_RMS:
                dx = rstd * (d_xhat - x_hat * proj)
            else:
                dx = rstd * (d_xhat - tl.sum(d_xhat, axis=0) / n_cols - x_hat * proj)
            dx = tl.where(mask, dx, 0.0)
            if PER_TOKEN:
                tl.store(DSHIFT + row * n_cols + cols, g, mask=mask)
                tl.store(DSCALE + row * n_cols + cols, g * normed, mask=mask)
            else:
                acc_shift += g
                acc_scale += g * normed
            dr = dx
        if HAS_RESIDUAL:
            dr += tl.load(G_R + row * stride_gr + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(GATE + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + row * stride_dy + cols, (dr * gate).to(DY.dtype.element_ty), mask=mask)
            if PER_TOKEN:
                tl.store(DGATE + row * n_cols + cols, dr * y, mask=mask)
            else:
                acc_gate += dr * y
        if HAS_MOD:
            tl.store(DX + row * stride_dx + cols, dr.to(DX.dtype.element_ty), mask=mask)
    if not PER_TOKEN:
        if HAS_MOD:
            tl.atomic_add(DSHIFT + current * n_cols + cols, acc_shift, mask=mask)
            tl.atomic_add(DSCALE + current * n_cols + cols, acc_scale, mask=mask)
        if HAS_RESIDUAL:
            tl.atomic_add(DGATE + current * n_cols + cols, acc_gate, mask=mask)
    if HAS_WEIGHT:
        tl.atomic_add(DWEIGHT + cols, acc_weight, mask=mask)
    if HAS_BIAS:
        tl.atomic_add(DBIAS + cols, acc_bias, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(block_c: int) -> int:
    return 4 if block_c <= 1024 else 8 if block_c <= 4096 else 16


def modulation_forward(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    norm: str,
    eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward. ``y``/``gate`` present: residual part; ``shift``/``scale``: modulation.

    Returns ``(r, modulated)`` with None for a part not computed. Modulation rows are per sample
    with ``cu_seqlens`` or per token without.
    """
    has_residual, has_mod = y is not None, shift is not None
    x = _rows(x)
    rows, n_cols = x.shape
    r = torch.empty_like(x) if has_residual else None
    out = torch.empty_like(x) if has_mod else None
    if rows == 0 or n_cols == 0:  # nothing to compute (and no zero-width tile to launch)
        return r, out
    mods = [m.contiguous() for m in (gate, shift, scale) if m is not None]
    weight, bias, cu_seqlens = contiguous(weight, bias, cu_seqlens)
    dummy = x
    block_c = triton.next_power_of_2(n_cols)
    y = _rows(y) if has_residual else dummy
    launcher(modulation_fwd_kernel)[(rows,)](
        x, y, mods[0] if has_residual else dummy, r if has_residual else dummy,
        mods[-2] if has_mod else dummy, mods[-1] if has_mod else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        out if has_mod else dummy, cu_seqlens if cu_seqlens is not None else dummy,
        1 if cu_seqlens is None else cu_seqlens.shape[0] - 1, n_cols, eps,
        x.stride(0), y.stride(0), r.stride(0) if has_residual else 0, out.stride(0) if has_mod else 0,
        n_cols,
        BLOCK_C=block_c, PER_TOKEN=cu_seqlens is None, HAS_RESIDUAL=has_residual, HAS_MOD=has_mod,
        IS_RMS=norm == "rms", HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        num_warps=_num_warps(block_c),
    )  # fmt: skip
    return r, out


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))


def modulation_backward(
    grad_out: torch.Tensor | None,
    grad_r: torch.Tensor | None,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    norm: str,
    eps: float,
    num_mod_rows: int,
) -> dict[str, torch.Tensor]:
    """Launch the backward; returns the gradients it computed by name (fp32 for the reductions):
    ``dx`` (HAS_MOD), ``dy``, ``dgate`` (HAS_RESIDUAL), ``dshift``, ``dscale``, ``dweight``, ``dbias``."""
    has_residual, has_mod = grad_r is not None, grad_out is not None
    ref = grad_out if has_mod else grad_r
    rows, n_cols = ref.shape
    device = ref.device
    grads: dict[str, torch.Tensor] = {}
    per_token = cu_seqlens is None
    make = torch.empty if per_token else torch.zeros
    if has_mod:
        grads["dx"] = torch.empty(ref.shape, dtype=x.dtype, device=device)
        grads["dshift"] = make((num_mod_rows, n_cols), dtype=torch.float32, device=device)
        grads["dscale"] = make((num_mod_rows, n_cols), dtype=torch.float32, device=device)
    if has_residual:
        grads["dy"] = torch.empty(ref.shape, dtype=y.dtype, device=device)
        grads["dgate"] = make((num_mod_rows, n_cols), dtype=torch.float32, device=device)
    if weight is not None:
        grads["dweight"] = torch.zeros(n_cols, dtype=torch.float32, device=device)
    if bias is not None:
        grads["dbias"] = torch.zeros(n_cols, dtype=torch.float32, device=device)
    if rows == 0 or n_cols == 0:
        return grads
    dummy = ref
    weight, bias, cu_seqlens = contiguous(weight, bias, cu_seqlens)
    grad_out = _rows(grad_out) if has_mod else dummy
    grad_r = _rows(grad_r) if has_residual else dummy
    x = _rows(x) if has_mod else dummy
    y = _rows(y) if has_residual else dummy
    programs = _programs(rows, device)
    rows_per_program = triton.cdiv(rows, programs)
    block_c = triton.next_power_of_2(n_cols)
    dx, dy = grads.get("dx", dummy), grads.get("dy", dummy)
    launcher(modulation_bwd_kernel)[(triton.cdiv(rows, rows_per_program),)](
        grad_out, grad_r, x, y,
        gate.contiguous() if has_residual else dummy, scale.contiguous() if has_mod else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        dx, dy,
        grads.get("dshift", dummy), grads.get("dscale", dummy), grads.get("dgate", dummy),
        grads.get("dweight", dummy), grads.get("dbias", dummy),
        cu_seqlens if cu_seqlens is not None else dummy,
        rows, 1 if per_token else cu_seqlens.shape[0] - 1, n_cols, eps, rows_per_program,
        grad_out.stride(0), grad_r.stride(0), x.stride(0), y.stride(0), dx.stride(0), dy.stride(0), n_cols,
        BLOCK_C=block_c, PER_TOKEN=per_token, HAS_RESIDUAL=has_residual, HAS_MOD=has_mod,
        IS_RMS=norm == "rms", HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        num_warps=_num_warps(block_c),
    )  # fmt: skip
    return grads

"""The selective scan in Triton: forward and backward kernels for CUDA tensors.

Same recurrence, arguments and layouts as ``selective_scan`` (see there): ``u, delta, z``
[b, d, l], ``A`` [d, n], ``B, C`` [b, n, l] or grouped [b, g, n, l], ``D, delta_bias`` [d].
Any strides are read in place; everything is computed in fp32 (the state too) whatever the
inputs' dtype, and ``y`` comes back in ``u``'s dtype.

One program owns a block of channels of one group of one sample, about ``BLOCK`` channel x
state pairs, and keeps their ``[block_d, n]`` state in registers while it walks the sequence
one token at a time; the programs run in parallel over batch x channel blocks. Each decay
``exp(dt * A)`` is computed on the fly and only multiplies (a product of numbers in [0, 1]),
so no length or decay rate overflows.

The backward keeps the op's contract (only the inputs are saved): a first pass of the forward
kernel writes the state entering every chunk of ``CHUNK`` tokens (``[b, d, chunks, n]`` fp32,
nothing else), then the backward kernel takes the chunks last to first: it recomputes the
chunk's states from its entering state into a per-program work buffer, then walks them back
with the adjoint state ``dh`` (``dh_{t-1} = exp(dt_t A) dh_t + gy_{t-1} C_{t-1}``), carried
across chunks, and reads every gradient off the two. ``exp(dt_t A) h_{t-1}`` is taken as
``h_t - dt_t u_t B_t``, never as a quotient. ``dB``, ``dC`` (summed over a group's channels),
``dA``, ``dD`` and ``d delta_bias`` (summed over the batch) are written as one partial sum per
program and added up afterwards, so the result does not depend on scheduling (no atomics).

With ``TRITON_INTERPRET=1`` in the environment before this module is imported, Triton's
interpreter runs the same kernels on CPU tensors: that is how the tests check them without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 64  # tokens whose states the backward recomputes at once, from the state saved where they start
BLOCK = 512  # channels x states held per program: block_d is sized to stay near it
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels run on CPU tensors (read at import by Triton)


@triton.jit
def _softplus(x):
    """torch's softplus (x above 20 passes through), with log1p(e) = log(1 + e) * e / ((1 + e) - 1) exact near 0."""
    e = tl.exp(-tl.abs(x))
    v = 1.0 + e
    log1p = tl.where(v == 1.0, e, tl.log(v) * e / (v - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def _program(A_ptr, D_ptr, bias_ptr, dim_group, d_state, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's block (channel block, group, sample), its channels and states with their masks, A, bias and D.

    Sample and group come back as int64, so every offset derived from them is too (tensors past 2**31 elements).
    """
    pid_d, grp, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    local = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ch = grp * dim_group + local  # global channel index
    ch_ok = local < dim_group
    n = tl.arange(0, BLOCK_N)
    n_ok = n < d_state
    A = tl.load(A_ptr + ch[:, None] * d_state + n[None, :], mask=ch_ok[:, None] & n_ok[None, :], other=0.0)
    bias = tl.load(bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros([BLOCK_D], tl.float32)
    Dv = tl.load(D_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
    return pid_d, grp, b, ch, ch_ok, n, n_ok, A.to(tl.float32), bias, Dv


@triton.jit
def _step(u_ptr, delta_ptr, B_ptr, t, su_l, sd_l, sB_l, A, bias, ch_ok, n_ok, SOFTPLUS: tl.constexpr):
    """One token's inputs ([block_d] u, dt and delta + bias, [n] B) and its decay exp(dt A) [block_d, n]."""
    u = tl.load(u_ptr + t * su_l, mask=ch_ok, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + t * sd_l, mask=ch_ok, other=0.0).to(tl.float32) + bias
    dt = _softplus(raw) if SOFTPLUS else raw
    Bt = tl.load(B_ptr + t * sB_l, mask=n_ok, other=0.0).to(tl.float32)
    return u, dt, raw, Bt, tl.exp(dt[:, None] * A)


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, states_ptr,
                     su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l,
                     sC_b, sC_g, sC_n, sC_l, length, dim_group, d_state, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     STORE_Y: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr):
    """y [b, d, l] (contiguous, when STORE_Y), else the fp32 state entering each chunk: states [b, d, chunks, n]."""
    pid_d, grp, b, ch, ch_ok, n, n_ok, A, bias, Dv = _program(A_ptr, D_ptr, bias_ptr, dim_group, d_state, HAS_D,
                                                              HAS_BIAS, BLOCK_D, BLOCK_N)
    cn_ok = ch_ok[:, None] & n_ok[None, :]
    dim = dim_group * tl.num_programs(1)
    u_ptr += b * su_b + ch * su_d
    delta_ptr += b * sd_b + ch * sd_d
    z_ptr += b * sz_b + ch * sz_d
    B_ptr += b * sB_b + grp * sB_g + n * sB_n
    C_ptr += b * sC_b + grp * sC_g + n * sC_n
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for c in range(n_chunks):
        if not STORE_Y:
            tl.store(states_ptr + ((b * dim + ch[:, None]) * n_chunks + c) * d_state + n[None, :], h, mask=cn_ok)
        for t in range(c * T, tl.minimum(c * T + T, length)):
            u, dt, _, Bt, decay = _step(u_ptr, delta_ptr, B_ptr, t, su_l, sd_l, sB_l, A, bias, ch_ok, n_ok, SOFTPLUS)
            h = decay * h + (dt * u)[:, None] * Bt[None, :]
            if STORE_Y:
                Ct = tl.load(C_ptr + t * sC_l, mask=n_ok, other=0.0).to(tl.float32)
                y = tl.sum(h * Ct[None, :], 1) + u * Dv
                if HAS_Z:
                    z = tl.load(z_ptr + t * sz_l, mask=ch_ok, other=0.0).to(tl.float32)
                    y = y * z * tl.sigmoid(z)
                tl.store(y_ptr + (b * dim + ch) * length + t, y.to(y_ptr.dtype.element_ty), mask=ch_ok)


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, g_ptr, states_ptr, work_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                     su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l,
                     sC_b, sC_g, sC_n, sC_l, sg_b, sg_d, sg_l, batch, length, dim_group, d_state, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr):
    """All gradients: du, ddelta, dz [b, d, l]; partial sums dB, dC [channel blocks, b, g, n, l], dA [b, d, n],
    dD, dbias [b, d].

    ``work`` holds one chunk's states per program, [programs, T, BLOCK_D, BLOCK_N], written
    forward from the chunk's saved entering state and read back last token first.
    """
    pid_d, grp, b, ch, ch_ok, n, n_ok, A, bias, Dv = _program(A_ptr, D_ptr, bias_ptr, dim_group, d_state, HAS_D,
                                                              HAS_BIAS, BLOCK_D, BLOCK_N)
    cn_ok = ch_ok[:, None] & n_ok[None, :]
    groups = tl.num_programs(1)
    dim = dim_group * groups
    u_ptr += b * su_b + ch * su_d
    delta_ptr += b * sd_b + ch * sd_d
    z_ptr += b * sz_b + ch * sz_d
    g_ptr += b * sg_b + ch * sg_d
    B_ptr += b * sB_b + grp * sB_g + n * sB_n
    C_ptr += b * sC_b + grp * sC_g + n * sC_n
    out = (b * dim + ch) * length  # + t: du, ddelta, dz
    part = ((pid_d * batch + b) * groups + grp) * d_state + n  # * length + t: dB, dC
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    work_ptr += ((b * groups + grp) * tl.num_programs(0) + pid_d) * T * BLOCK_D * BLOCK_N + tile
    dh = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # d loss / d h_t, carried from the last token back
    dA = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dD = tl.zeros([BLOCK_D], tl.float32)
    dbias = tl.zeros([BLOCK_D], tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * T
        steps = tl.minimum(t0 + T, length) - t0
        h = tl.load(states_ptr + ((b * dim + ch[:, None]) * n_chunks + c) * d_state + n[None, :], mask=cn_ok, other=0.0)
        for s in range(steps):  # the chunk's states again
            u, dt, _, Bt, decay = _step(u_ptr, delta_ptr, B_ptr, t0 + s, su_l, sd_l, sB_l, A, bias, ch_ok, n_ok,
                                        SOFTPLUS)
            h = decay * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(work_ptr + s * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        for r in range(steps):  # then back, last token first
            s = steps - 1 - r
            t = t0 + s
            h = tl.load(work_ptr + s * BLOCK_D * BLOCK_N)
            u, dt, raw, Bt, decay = _step(u_ptr, delta_ptr, B_ptr, t, su_l, sd_l, sB_l, A, bias, ch_ok, n_ok,
                                          SOFTPLUS)
            Ct = tl.load(C_ptr + t * sC_l, mask=n_ok, other=0.0).to(tl.float32)
            gy = tl.load(g_ptr + t * sg_l, mask=ch_ok, other=0.0).to(tl.float32)
            if HAS_Z:  # through the gate y * silu(z), with y recomputed
                z = tl.load(z_ptr + t * sz_l, mask=ch_ok, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                y = tl.sum(h * Ct[None, :], 1) + u * Dv
                tl.store(dz_ptr + out + t, gy * y * sig * (1.0 + z * (1.0 - sig)), mask=ch_ok)
                gy = gy * z * sig
            gy = tl.where(ch_ok, gy, 0.0)
            dh += gy[:, None] * Ct[None, :]
            x = (dt * u)[:, None] * Bt[None, :]
            a_h = h - x  # exp(dt_t A) h_{t-1}, without a division
            dhB = tl.sum(dh * Bt[None, :], 1)
            ddt = tl.sum(dh * a_h * A, 1) + u * dhB
            dA += dh * a_h * dt[:, None]
            dD += gy * u
            tl.store(dB_ptr + part * length + t, tl.sum(dh * (dt * u)[:, None], 0), mask=n_ok)
            tl.store(dC_ptr + part * length + t, tl.sum(h * gy[:, None], 0), mask=n_ok)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(ch_ok, ddt, 0.0)
            dbias += ddt
            tl.store(du_ptr + out + t, dt * dhB + gy * Dv, mask=ch_ok)
            tl.store(ddelta_ptr + out + t, ddt, mask=ch_ok)
            dh = dh * decay  # on to h_{t-1}
        tl.debug_barrier()
    tl.store(dA_ptr + (b * dim + ch[:, None]) * d_state + n[None, :], dA, mask=cn_ok)
    tl.store(dD_ptr + b * dim + ch, dD, mask=ch_ok)
    tl.store(dbias_ptr + b * dim + ch, dbias, mask=ch_ok)


def check_device(u: Tensor) -> None:
    """Raise unless the kernels can run on ``u``'s device: CUDA, or any device under the interpreter."""
    if not (u.is_cuda or INTERPRETED):
        raise ValueError(f"the Triton selective scan runs on CUDA tensors, got a {u.device.type} tensor; set "
                         "ARENA_SCAN_KERNEL=auto or torch, or TRITON_INTERPRET=1 before importing triton to run "
                         "it in Triton's interpreter")


def _grouped(t: Tensor) -> Tensor:
    """B or C as [b, g, n, l] (a view: without groups, one group of size 1)."""
    return t[:, None] if t.ndim == 3 else t


def _on_device(u: Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``u``'s GPU: Triton launches on the current CUDA device, which may be another one."""
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _launch(u: Tensor, A: Tensor, B: Tensor) -> tuple[dict, tuple[int, int, int]]:
    """Block sizes and grid (channel blocks, groups, batch) for a scan."""
    b, d, l = u.shape
    g, n = _grouped(B).shape[1:3]
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(128, triton.next_power_of_2(d // g), BLOCK // block_n))
    meta = {"BLOCK_D": block_d, "BLOCK_N": block_n, "T": CHUNK}
    return meta, (triton.cdiv(d // g, block_d), g, b)


def _common(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
            delta_bias: Tensor | None) -> list:
    """The arguments both kernels start with: pointers, then strides, then sizes."""
    B, C = _grouped(B), _grouped(C)
    b, d, l = u.shape
    g, n = B.shape[1:3]
    return [u, delta, A.float().contiguous(), B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u], \
        [*u.stride(), *delta.stride(), *(z if z is not None else u).stride(), *B.stride(), *C.stride()], \
        [l, d // g, n, triton.cdiv(l, CHUNK)]


def _flags(D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> dict:
    return {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": delta_softplus}


def _run_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, delta_softplus: bool, *, states: bool) -> Tensor:
    """``y`` in ``u``'s dtype, or (``states``) the fp32 state entering every chunk, [b, d, chunks, n]."""
    check_device(u)
    pointers, strides, (l, dg, n, chunks) = _common(u, delta, A, B, C, D, z, delta_bias)
    meta, grid = _launch(u, A, B)
    b, d, _ = u.shape
    out = torch.empty(b, d, chunks, n, device=u.device) if states else torch.empty(b, d, l, device=u.device,
                                                                                   dtype=u.dtype)
    with _on_device(u):
        _scan_fwd_kernel[grid](*pointers, out, out, *strides, l, dg, n, chunks,
                               **_flags(D, z, delta_bias, delta_softplus), STORE_Y=not states, **meta)
    return out


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
    """The selective scan's output, [b, d, l] in ``u``'s dtype (arguments as ``selective_scan``'s)."""
    return _run_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states=False)


def scan_backward(grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                  z: Tensor | None = None, delta_bias: Tensor | None = None,
                  delta_softplus: bool = False) -> list[Tensor | None]:
    """Gradients of ``scan`` given the output's ``grad``: one per input (u, delta, A, B, C, D, z, delta_bias), in
    its dtype, None for an absent one."""
    states = _run_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states=True)
    pointers, strides, (l, dg, n, chunks) = _common(u, delta, A, B, C, D, z, delta_bias)
    meta, grid = _launch(u, A, B)
    b, d, _ = u.shape
    g = d // dg
    new = dict(device=u.device, dtype=torch.float32)
    du, ddelta = torch.empty(b, d, l, **new), torch.empty(b, d, l, **new)
    dz = torch.empty(b, d, l, **new) if z is not None else du  # written only with a gate
    dB, dC = (torch.empty(grid[0], b, g, n, l, **new) for _ in range(2))
    dA, dD, dbias = torch.empty(b, d, n, **new), torch.empty(b, d, **new), torch.empty(b, d, **new)
    work = torch.empty(math.prod(grid), CHUNK, meta["BLOCK_D"], meta["BLOCK_N"], **new)
    with _on_device(u):
        _scan_bwd_kernel[grid](*pointers, grad, states, work, du, ddelta, dz, dB, dC, dA, dD, dbias, *strides,
                               *grad.stride(), b, l, dg, n, chunks, **_flags(D, z, delta_bias, delta_softplus), **meta)
    grads = {"u": du, "delta": ddelta, "A": dA.sum(0), "B": dB.sum(0).view(B.shape), "C": dC.sum(0).view(C.shape),
             "D": dD.sum(0), "z": dz, "delta_bias": dbias.sum(0)}
    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    return [None if t is None else grads[k].to(t.dtype) for k, t in inputs.items()]


__all__ = ["scan", "scan_backward", "check_device", "CHUNK", "INTERPRETED"]

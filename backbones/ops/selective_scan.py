"""The Mamba-1 selective scan: a sequential reference, a fast blocked scan in PyTorch, a fused CPU kernel.

For every channel ``d`` and state ``n`` the scan runs the input-dependent linear recurrence

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t + D[d] * u_t          (then y_t * silu(z_t) when a gate z is given)

with ``delta = softplus(delta + delta_bias)`` when asked. Shapes follow ``mamba_ssm``:
``u, delta, z: [b, d, l]``, ``A: [d, n]``, ``B, C: [b, n, l]`` or grouped ``[b, g, n, l]``
(channel ``d`` uses group ``d // (d / g)``, as VMamba's four scan directions do), ``D,
delta_bias: [d]``.

``selective_scan`` needs no CUDA build and runs wherever PyTorch does. On a CPU, forward and
backward are the fused C kernels of ``scan_cpu`` when they build (``ARENA_SCAN_KERNEL=torch``
turns them off; d_state above ``scan_cpu.MAX_STATE`` does not fit them); on CUDA tensors they
are the Triton kernels of ``selective_scan_triton`` when triton imports (``torch`` turns them
off, ``triton`` asks for them on any device Triton runs on); elsewhere it is the blocked scan
below. The sequence is cut into
blocks of ``SCAN_BLOCK`` tokens carried one after the other (memory stays bounded at any
resolution); inside a block, tensors are time-major and cut into chunks of ``SCAN_CHUNK`` tokens
that are all advanced together, one step at a time, while the state entering each chunk comes
from the same scan run over the chunks' end states. Python thus loops ``SCAN_CHUNK`` times per
block, not once per token, and every decay factor is a product of numbers in ``[0, 1]``, never
a quotient, so the scan cannot overflow whatever the decay rates (the log-space trick
``exp(S_t) * cumsum(exp(-S_k) x_k)`` overflows once ``delta * A`` sums past ~88 inside a chunk).
It computes in fp32 whatever the input dtype (also under bf16 autocast) and returns ``u``'s
dtype.

It is a ``torch.library`` custom op, so ``FlopCounterMode`` sees one op with a registered FLOP
formula (9 MACs per element of the state, as the VMamba authors count it, plus the skip and gate)
and meta tensors get shapes without running it. Its backward saves only the inputs and
recomputes the states (the CPU kernel in registers, a segment at a time; elsewhere the blocked
scan under autograd), which keeps training memory at the size of the inputs.

>>> u = torch.randn(2, 8, 33)
>>> A = -torch.rand(8, 4)
>>> args = (u, torch.rand(2, 8, 33), A, torch.randn(2, 4, 33), torch.randn(2, 4, 33), torch.ones(8))
>>> torch.allclose(selective_scan(*args), selective_scan_ref(*args), atol=1e-5)
True
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import scan_cpu

SCAN_CHUNK = 16  # steps per chunk: one pass over them runs every chunk in parallel
SCAN_BLOCK = 256  # tokens held in memory at once; the state is carried between blocks


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
           delta_bias: Tensor | None) -> None:
    if u.ndim != 3:
        raise ValueError(f"selective_scan takes u of shape [batch, channels, length], got {tuple(u.shape)}")
    b, d, l = u.shape
    if l == 0:
        raise ValueError(f"selective_scan needs at least one token, got u of shape {tuple(u.shape)}")
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"delta and z must have u's shape {tuple(u.shape)}, got delta {tuple(delta.shape)}"
                         f"{'' if z is None else f' and z {tuple(z.shape)}'}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must be [channels={d}, d_state], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.ndim == 3 and t.shape == (b, n, l)) or (
            t.ndim == 4 and t.shape[0] == b and t.shape[2:] == (n, l) and d % t.shape[1] == 0)
        if not ok:
            raise ValueError(f"{name} must be [batch={b}, d_state={n}, length={l}] or [batch, groups dividing "
                             f"{d}, d_state, length], got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be [channels={d}], got {tuple(t.shape)}")


def _prepare(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
             delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 inputs in grouped form: u, delta [b, g, d/g, l]; B, C [b, g, n, l]."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.float() if B.ndim == 4 else B.float()[:, None]
    C = C.float() if C.ndim == 4 else C.float()[:, None]
    b, d, l = u.shape
    g = B.shape[1]
    return u.float().view(b, g, d // g, l), delta.view(b, g, d // g, l), B, C


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    y = y.reshape(u.shape)
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False) -> Tensor:
    """The scan one token at a time, structured as ``mamba_ssm``'s pure-PyTorch reference.

    The discretized decay and input are built for every token first ([b, d, l, n] each), then a
    Python loop advances the state and reads it out with ``C``. Kept for tests and as the
    baseline of ``benchmarks/selective_scan.py``.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    uf, dt, Bf, Cf = _prepare(u, delta, B, C, delta_bias, delta_softplus)
    b, g, dg, l = uf.shape
    dt, uf = dt.reshape(b, g * dg, l), uf.reshape(b, g * dg, l)
    Bd, Cd = Bf.repeat_interleave(dg, dim=1), Cf.repeat_interleave(dg, dim=1)  # [b, d, n, l]
    decay = torch.exp(torch.einsum("bdl,dn->bdln", dt, A.float()))
    inp = torch.einsum("bdl,bdnl,bdl->bdln", dt, Bd, uf)
    h = uf.new_zeros(b, g * dg, A.shape[1])
    ys = []
    for t in range(l):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", h, Cd[..., t]))
    return _finish(torch.stack(ys, -1), u, D, z)


def _walk(decays: Sequence[Tensor], inputs: Sequence[Tensor], h: Tensor | None) -> list[Tensor]:
    """h_j = decay_j * h_{j-1} + input_j, one step at a time from ``h`` (zero when None)."""
    states = []
    for a, x in zip(decays, inputs):
        h = x if h is None else torch.addcmul(x, a, h)
        states.append(h)
    return states


def _scan(dt: Tensor, A: Tensor, x: Tensor, C: Tensor | None, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """h_t = exp(dt_t * A) * h_{t-1} + x_t along dim 0 (time-major), from ``h0`` (zero when None).

    ``dt`` is [L, *batch], ``x`` [L, *batch, n], ``A`` broadcasts against ``dt[..., None]``,
    ``C`` is [L, *batch, n, 1] up to broadcasting. Returns the readout ``sum_n C_t h_t``
    [L, *batch] (all states [L, *batch, n] when ``C`` is None) and the last state.

    The steps are cut into chunks of ``SCAN_CHUNK``: a first walk over the steps, all chunks at
    once, gives each chunk's end state from zero; the same scan over those (decay: the chunk's
    total, ``exp(A * sum(dt))``) gives the state entering each chunk; a second walk from there
    gives every state.
    """
    L = x.shape[0]
    if L > SCAN_CHUNK and L % SCAN_CHUNK:  # whole chunks, then the last few steps from where they end
        cut = L - L % SCAN_CHUNK
        head, h = _scan(dt[:cut], A, x[:cut], None if C is None else C[:cut], h0)
        tail, h = _scan(dt[cut:], A, x[cut:], None if C is None else C[cut:], h)
        return torch.cat([head, tail]), h
    chunk = min(SCAN_CHUNK, L)
    nc = L // chunk
    dt_c = dt.view(nc, chunk, *dt.shape[1:])
    decays = torch.exp(dt_c[..., None] * A).unbind(1)  # per step: [chunks, *batch, n]
    inputs = x.view(nc, chunk, *x.shape[1:]).unbind(1)
    if nc == 1:
        entering = None if h0 is None else h0[None]
    else:
        ends = _walk(decays, inputs, None)[-1]
        carried, _ = _scan(dt_c.sum(1), A, ends, None, h0)  # the state at the end of every chunk
        first = ends.new_zeros(ends[:1].shape) if h0 is None else h0[None]
        entering = torch.cat([first, carried[:-1]])
    states = _walk(decays, inputs, entering)
    last = states[-1][-1]
    if C is not None:  # C [L, *batch, n, 1] (batch broadcast): the readout is a batched matmul
        states = [(h @ c)[..., 0] for h, c in zip(states, C.view(nc, chunk, *C.shape[1:]).unbind(1))]
    return torch.stack(states, 1).flatten(0, 1), last


def _scan_blocks(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """The whole scan, ``SCAN_BLOCK`` tokens at a time, in time-major layout [l, b, g, d/g(, n)]."""
    with torch.autocast(u.device.type, enabled=False):
        uf, dt, Bf, Cf = _prepare(u, delta, B, C, delta_bias, delta_softplus)
        b, g, dg, l = uf.shape
        dt_t, du_t = dt.permute(3, 0, 1, 2).contiguous(), (dt * uf).permute(3, 0, 1, 2).contiguous()
        B_t = Bf.permute(3, 0, 1, 2)[:, :, :, None]  # [l, b, g, 1, n]
        C_t = Cf.permute(3, 0, 1, 2)[..., None]  # [l, b, g, n, 1]
        Ag = A.float().view(g, dg, -1)
        state, ys = None, []
        for t0 in range(0, l, SCAN_BLOCK):
            blk = slice(t0, t0 + SCAN_BLOCK)
            y, state = _scan(dt_t[blk], Ag, du_t[blk, ..., None] * B_t[blk], C_t[blk], state)
            ys.append(y)
        y = torch.cat(ys).permute(1, 2, 3, 0).reshape(b, g * dg, l)
        return _finish(y, u, D, z)


def _time_major(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None) -> dict[str, Tensor | None]:
    """Views of the op's inputs in the CPU kernel's layouts: ``u, delta, z`` [b, l, d], ``B, C`` [b, l, g, n]."""
    B, C = (t[:, None] if t.ndim == 3 else t for t in (B, C))
    return {"u": u.transpose(1, 2), "delta": delta.transpose(1, 2), "B": B.permute(0, 3, 1, 2),
            "C": C.permute(0, 3, 1, 2), "z": None if z is None else z.transpose(1, 2)}


def _scan_fused(lib, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """The whole scan from a zero state by the compiled CPU kernel."""
    b, d, l = u.shape
    y = scan_cpu.scan(lib, **_time_major(u, delta, B, C, z), A=A, h=torch.zeros(b, A.shape[1], d), D=D,
                      delta_bias=delta_bias, delta_softplus=delta_softplus)
    return y.transpose(1, 2).to(u.dtype)


def _fused_kernel(u: Tensor, A: Tensor):
    """The compiled kernel when it can run this scan (CPU tensors, a state that fits its registers), else None."""
    return scan_cpu.kernel() if u.device.type == "cpu" and A.shape[1] <= scan_cpu.MAX_STATE else None


@functools.cache
def _import_triton():
    """``selective_scan_triton``, or the ImportError that stops it (no triton installed)."""
    try:
        from . import selective_scan_triton
    except ImportError as err:
        return err
    return selective_scan_triton


def _triton_kernel(u: Tensor):
    """The Triton kernels' module when they run this scan (``auto`` on CUDA, or ``triton`` asked for), else None."""
    choice = scan_cpu.kernel_choice()
    if choice == "torch" or (choice == "auto" and not u.is_cuda):
        return None
    module = _import_triton()
    if isinstance(module, ImportError):
        if choice == "triton":
            raise ValueError(f"ARENA_SCAN_KERNEL=triton needs the triton package ({module}): pip install triton, "
                             "or set ARENA_SCAN_KERNEL=auto or torch")
        warnings.warn(f"selective scan: no Triton ({module}); using the slower pure-PyTorch scan on CUDA",
                      RuntimeWarning, stacklevel=3)
        return None
    module.check_device(u)
    return module


@torch.library.custom_op("backbone_arena::selective_scan", mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    triton_kernel = _triton_kernel(u)
    if triton_kernel is not None:
        return triton_kernel.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    lib = _fused_kernel(u, A)
    if lib is not None:
        return _scan_fused(lib, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _scan_blocks(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, ctx.delta_softplus = inputs
    ctx.present = [t is not None for t in tensors]
    ctx.triton = _triton_kernel(tensors[0])  # the backward takes the forward's path
    ctx.lib = None if ctx.triton is not None else _fused_kernel(tensors[0], tensors[2])
    ctx.save_for_backward(*[t for t in tensors if t is not None])


_TENSOR_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")  # the op's tensor inputs, in its order


def _op_layouts(g: dict[str, Tensor], *tensors: Tensor | None) -> list[Tensor]:
    """The kernel's gradients ``g`` (time-major ``u, delta, z`` [b, l, d], ``B, C`` [b, l, g, n], ``A`` [d, n], ``D``,
    ``delta_bias``) as views in the layouts and dtypes of the op's inputs ``tensors``, one per given input."""
    inputs = dict(zip(_TENSOR_INPUTS, tensors))
    for k in ("u", "delta", "z"):
        if k in g:
            g[k] = g[k].transpose(1, 2)
    for k in ("B", "C"):  # [b, l, g, n] -> [b, g, n, l], without the group dim when B had none
        g[k] = g[k].permute(0, 2, 3, 1).reshape(inputs[k].shape)
    return [g[k].to(t.dtype) for k, t in inputs.items() if t is not None]


@torch.library.custom_op("backbone_arena::selective_scan_backward", mutates_args=())
def _backward_fused(grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                    z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> list[Tensor]:
    """Every given input's gradient by the compiled CPU kernel, in the op's layouts and dtypes. An op of its
    own, so that tracing the backward (``torch.compile``) sees it whole and never reaches its raw pointers."""
    g = scan_cpu.scan_backward(scan_cpu.built(), grad.transpose(1, 2), **_time_major(u, delta, B, C, z), A=A, D=D,
                               delta_bias=delta_bias, delta_softplus=delta_softplus)
    return _op_layouts(g, u, delta, A, B, C, D, z, delta_bias)


@_backward_fused.register_fake
def _(grad, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    b, d, l = u.shape
    n, groups = A.shape[1], B.shape[1] if B.ndim == 4 else 1
    empty = functools.partial(u.new_empty, dtype=torch.float32)
    g = {"u": empty(b, l, d), "delta": empty(b, l, d), "z": empty(b, l, d), "B": empty(b, l, groups, n),
         "C": empty(b, l, groups, n), "A": empty(n, d).t(), "D": empty(d), "delta_bias": empty(d)}
    return _op_layouts(g, u, delta, A, B, C, D, z, delta_bias)


def _backward(ctx, grad: Tensor):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    if ctx.triton is not None:
        return (*ctx.triton.scan_backward(grad, *tensors, ctx.delta_softplus), None)
    if ctx.lib is not None:
        grads = iter(_backward_fused(grad, *tensors, ctx.delta_softplus))
        return (*[None if t is None else next(grads) for t in tensors], None)
    wanted = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(tensors)]
        out = _scan_blocks(*leaves, ctx.delta_softplus)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
    result: list[Tensor | None] = [None] * (len(tensors) + 1)
    for i, g in zip(wanted, grads):  # None: the input did not reach the output (A for a single token)
        result[i] = torch.zeros_like(tensors[i]) if g is None else g
    return tuple(result)


_selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_macs(batch: int, channels: int, length: int, d_state: int, *, with_D: bool = True,
                        with_z: bool = False) -> int:
    """Multiply-adds of one scan as the VMamba authors count them: 9 per state element, +1 per skip / gate."""
    return (9 * d_state + int(with_D) + int(with_z)) * batch * channels * length


@register_flop_formula(torch.ops.backbone_arena.selective_scan)
def _scan_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, *args, **kwargs) -> int:
    b, d, l = u_shape
    return 2 * selective_scan_macs(b, d, l, A_shape[1], with_D=D_shape is not None, with_z=z_shape is not None)


def init_dt_bias(*shape: int, dt_min: float = 0.001, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """Mamba's delta bias: softplus(bias) log-uniform in [dt_min, dt_max], so early steps keep some memory."""
    dt = torch.exp(torch.rand(*shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


def init_a_log(channels: int, d_state: int) -> Tensor:
    """S4D-real initialization: A[d, n] = -(n + 1), stored as log(-A)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(channels, 1)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None,
                   delta_softplus: bool = False) -> Tensor:
    """The selective scan (``mamba_ssm.selective_scan_fn``'s arguments and result), fast and differentiable."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    return _selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_macs", "init_dt_bias", "init_a_log"]

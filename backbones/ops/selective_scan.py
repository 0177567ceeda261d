"""The Mamba-1 selective scan in pure PyTorch: a sequential reference and a fast blocked scan.

For every channel ``d`` and state ``n`` the scan runs the input-dependent linear recurrence

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t + D[d] * u_t          (then y_t * silu(z_t) when a gate z is given)

with ``delta = softplus(delta + delta_bias)`` when asked. Shapes follow ``mamba_ssm``:
``u, delta, z: [b, d, l]``, ``A: [d, n]``, ``B, C: [b, n, l]`` or grouped ``[b, g, n, l]``
(channel ``d`` uses group ``d // (d / g)``, as VMamba's four scan directions do), ``D,
delta_bias: [d]``.

``selective_scan`` needs no CUDA build and runs wherever PyTorch does: the sequence is cut into
blocks of ``SCAN_BLOCK`` tokens carried one after the other (so memory stays bounded at any
resolution), and each block is cut into chunks of ``SCAN_CHUNK`` tokens that are all advanced
together, one step at a time, while the state entering each chunk comes from the same scan run
over the chunks' end states. Python thus loops ``SCAN_CHUNK`` times, not once per token, and
every decay factor is a product of numbers in ``[0, 1]``, never a quotient, so the scan cannot
overflow whatever the decay rates (the cumulative-sum-in-log-space trick
``exp(S_t) * cumsum(exp(-S_k) x_k)`` overflows once ``delta * A`` sums past ~88 inside a chunk). It computes in fp32 whatever the input dtype
(also under bf16 autocast) and returns ``u``'s dtype.

It is a ``torch.library`` custom op, so ``FlopCounterMode`` sees one op with a registered FLOP
formula (9 MACs per element of the state, as the VMamba authors count it, plus the skip and gate)
and meta tensors get shapes without running it. Its backward recomputes the forward with
autograd, which keeps training memory at the size of the inputs.

>>> u = torch.randn(2, 8, 33)
>>> A = -torch.rand(8, 4)
>>> args = (u, torch.rand(2, 8, 33), A, torch.randn(2, 4, 33), torch.randn(2, 4, 33), torch.ones(8))
>>> torch.allclose(selective_scan(*args), selective_scan_ref(*args), atol=1e-5)
True
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

SCAN_CHUNK = 16  # steps per chunk: one pass over them runs every chunk in parallel
SCAN_BLOCK = 256  # tokens held in memory at once; the state is carried between blocks


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
           delta_bias: Tensor | None) -> None:
    if u.ndim != 3:
        raise ValueError(f"selective_scan takes u of shape [batch, channels, length], got {tuple(u.shape)}")
    b, d, l = u.shape
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
    """The scan one token at a time: the reference the fast scan is tested against."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    uf, dt, Bf, Cf = _prepare(u, delta, B, C, delta_bias, delta_softplus)
    Ag = A.float().view(uf.shape[1], uf.shape[2], -1)  # [g, d/g, n]
    h = uf.new_zeros(*uf.shape[:3], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt_t = dt[..., t, None]
        h = torch.exp(dt_t * Ag) * h + (dt_t * uf[..., t, None]) * Bf[:, :, None, :, t]
        ys.append((h * Cf[:, :, None, :, t]).sum(-1))
    return _finish(torch.stack(ys, -1), u, D, z)


def _to_chunks(x: Tensor, chunk: int) -> Tensor:
    """[..., L] -> [..., chunk, L / chunk] (zero-padded), so step j of every chunk is one contiguous slice."""
    x = F.pad(x, (0, -x.shape[-1] % chunk))
    return x.unflatten(-1, (-1, chunk)).transpose(-1, -2).contiguous()


def _from_chunks(x: Tensor, length: int) -> Tensor:
    return x.transpose(-1, -2).flatten(-2)[..., :length]


def _steps(decay: Tensor, inp: Tensor, h: Tensor | None) -> list[Tensor]:
    """h_j = decay_j * h_{j-1} + inp_j one step at a time along dim -2, every chunk (last dim) at once."""
    out = []
    for a, x in zip(decay.unbind(-2), inp.unbind(-2)):
        h = x if h is None else torch.addcmul(x, a, h)
        out.append(h)
    return out


def _chunked_scan(log_decay: Tensor, scale: Tensor, inp: Tensor, chunk: int) -> Tensor:
    """States of h_t = exp(log_decay_t * scale) * h_{t-1} + inp_t (h_{-1} = 0) along the last dim of ``inp``.

    ``log_decay`` [..., 1, L] is shared by the ``scale`` [..., n, 1] rows of ``inp`` [..., n, L]
    (delta and A in the scan). The sequence is cut into chunks of ``chunk`` steps; one pass over the
    steps, every chunk in parallel, gives each chunk's end state from zero; the same scan over chunk
    ends (decay: the chunk's total, ``exp(scale * sum(log_decay))``) gives the state entering each
    chunk; a second pass from those states gives every state. Decays are always products of
    factors in [0, 1], so nothing can overflow.
    """
    L = inp.shape[-1]
    if L <= chunk:
        decay = torch.exp(log_decay * scale)
        return torch.stack(_steps(decay[..., None], inp[..., None], None), -2)[..., 0]
    ld, x = _to_chunks(log_decay, chunk), _to_chunks(inp, chunk)  # [..., chunk, L / chunk]
    decay = torch.exp(ld * scale[..., None])
    ends = _steps(decay, x, None)[-1]
    entering = _chunked_scan(ld.sum(-2), scale, ends, chunk)  # state at the end of each chunk
    entering = F.pad(entering[..., :-1], (1, 0))
    return _from_chunks(torch.stack(_steps(decay, x, entering), -2), L)


def _scan_block(dt: Tensor, u: Tensor, B: Tensor, C: Tensor, A: Tensor,
                state: Tensor | None) -> tuple[Tensor, Tensor]:
    """One block: dt, u [b, g, d/g, t]; B, C [b, g, n, t]; A [g, d/g, n, 1]; state [b, g, d/g, n] or None.

    Returns y = sum_n C h [b, g, d/g, t] and the last state. Everything full-size (d x n per
    token) is built directly in chunk layout and never stacked: each step's state is reduced
    against C at once.
    """
    t = dt.shape[-1]
    dt_c, u_c = _to_chunks(dt, SCAN_CHUNK)[..., None, :, :], _to_chunks(u, SCAN_CHUNK)[..., None, :, :]
    B_c, C_c = _to_chunks(B, SCAN_CHUNK)[:, :, None], _to_chunks(C, SCAN_CHUNK)[:, :, None]
    decay = torch.exp(dt_c * A[..., None])  # [b, g, d/g, n, chunk, t / chunk]
    x = (dt_c * u_c) * B_c
    ends = _steps(decay, x, None)[-1]
    total = dt_c.sum(-2)  # [b, g, d/g, 1, t / chunk]: each chunk's log-decay, over A
    if state is not None:
        ends = torch.cat([ends[..., :1] + torch.exp(total[..., :1] * A) * state[..., None], ends[..., 1:]], -1)
    h_end = _chunked_scan(total, A, ends, SCAN_CHUNK)
    first = h_end.new_zeros(h_end.shape[:-1]) if state is None else state
    entering = torch.cat([first[..., None], h_end[..., :-1]], -1)  # the state each chunk starts from
    ys = [(h * c).sum(-2) for h, c in zip(_steps(decay, x, entering), C_c.unbind(-2))]
    return _from_chunks(torch.stack(ys, -2), t), h_end[..., -1]


def _scan_blocks(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    with torch.autocast(u.device.type, enabled=False):
        uf, dt, Bf, Cf = _prepare(u, delta, B, C, delta_bias, delta_softplus)
        Ag = A.float().view(uf.shape[1], uf.shape[2], -1, 1)  # [g, d/g, n, 1]
        state = None
        ys = []
        for t0 in range(0, u.shape[-1], SCAN_BLOCK):
            blk = slice(t0, t0 + SCAN_BLOCK)
            y, state = _scan_block(dt[..., blk], uf[..., blk], Bf[..., blk], Cf[..., blk], Ag, state)
            ys.append(y)
        return _finish(torch.cat(ys, -1), u, D, z)


@torch.library.custom_op("backbone_arena::selective_scan", mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    return _scan_blocks(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, ctx.delta_softplus = inputs
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])


def _backward(ctx, grad: Tensor):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    wanted = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(tensors)]
        out = _scan_blocks(*leaves, ctx.delta_softplus)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad, allow_unused=True)
    result: list[Tensor | None] = [None] * (len(tensors) + 1)
    for i, g in zip(wanted, grads):
        result[i] = g
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

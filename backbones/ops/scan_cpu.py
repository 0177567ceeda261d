"""The fused CPU selective scan: ``selective_scan_cpu.c``, compiled on first use with the system C compiler.

The pure-PyTorch scan streams ``[tokens, channels, d_state]`` tensors through memory, several
passes each; this kernel keeps the state of 16 channels in vector registers and makes one pass
over the inputs, computing each decay ``exp(dt * A)`` on the fly; its gradient (``scan_backward``)
recomputes the states a segment at a time and walks them backwards. It needs only a C compiler
(``$CC``, else ``cc``), no PyTorch headers: it is built in a few seconds into
``$XDG_CACHE_HOME/backbone-arena`` (``~/.cache`` by default), keyed by its source, flags and
the CPU (``-march=native``), and loaded with ``ctypes``. Without a compiler, or with
``ARENA_SCAN_KERNEL=torch``, ``kernel()`` is None and the scan stays pure PyTorch.
The same library holds the native models' other CPU loops: Vim's token conv, gate and RMSNorm,
VMamba's cross-scan routes, UniRepLKNet's inference GRN (``grn_``); each has a PyTorch fallback.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("selective_scan_cpu.c")
MAX_STATE = 64  # the largest d_state it holds in registers (its NMAX)
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math")


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return platform.machine()


def _build(compiler: str) -> Path:
    """Compile the kernel (OpenMP when the compiler has it) into the cache, atomically; return the library."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_identity().encode()]))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backbone-arena"
    lib = cache / f"selective_scan_cpu-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        run = subprocess.run([compiler, *_FLAGS, *extra, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if run.returncode == 0:
            os.replace(tmp, lib)  # concurrent builders each write their own file; the last rename wins
            return lib
        os.unlink(tmp)
        errors.append(run.stderr.strip())
    raise RuntimeError("\n".join(errors))


@functools.cache
def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        warnings.warn("selective scan: no C compiler (set CC or install gcc) to build the fused CPU kernel; "
                      "using the slower pure-PyTorch scan", RuntimeWarning, stacklevel=3)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"selective scan: building the fused CPU kernel with {compiler} failed ({err}); "
                      "using the slower pure-PyTorch scan", RuntimeWarning, stacklevel=3)
        return None
    lib.arena_selective_scan.argtypes = ([ctypes.c_void_p] * 10 + [ctypes.POINTER(ctypes.c_long)]
                                         + [ctypes.c_long] * 5 + [ctypes.c_int] * 3)
    lib.arena_selective_scan_grid.argtypes = ([ctypes.c_void_p] * 10 + [ctypes.POINTER(ctypes.c_long)]
                                              + [ctypes.c_long] * 6 + [ctypes.c_int] * 3)
    lib.arena_thin_matmul.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
                                      + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
                                      + [ctypes.c_int])
    lib.arena_thin_matmul.restype = ctypes.c_int
    lib.arena_token_conv.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 3
                                     + [ctypes.c_long] * 8 + [ctypes.c_int] * 3)
    lib.arena_token_conv_bwd.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 4
                                         + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 6
                                         + [ctypes.c_int] * 3)
    lib.arena_token_conv_bwd.restype = ctypes.c_int
    lib.arena_gate.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_long] + [ctypes.c_void_p] * 3
                               + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_int])
    lib.arena_rms_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.arena_rms_norm_bwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 2 + [ctypes.c_int]
    lib.arena_token_conv.restype = lib.arena_gate.restype = None
    lib.arena_rms_norm.restype = lib.arena_rms_norm_bwd.restype = None
    lib.arena_grn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_float] + [ctypes.c_int] * 2
    lib.arena_dwconv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 5 + [ctypes.c_int]
    lib.arena_dwconv.restype = ctypes.c_int
    lib.arena_grn.restype = None
    lib.arena_gelu.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_int]
    lib.arena_gelu.restype = None
    lib.arena_block_width.argtypes, lib.arena_block_width.restype = [], ctypes.c_int
    lib.arena_cross_scan.argtypes = lib.arena_cross_merge.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4 + [ctypes.c_int]
    lib.arena_cross_scan.restype = lib.arena_cross_merge.restype = None
    lib.arena_selective_scan_bwd.argtypes = ([ctypes.c_void_p] * 17 + [ctypes.POINTER(ctypes.c_long)]
                                             + [ctypes.c_long] * 6 + [ctypes.c_int] * 2)
    lib.arena_selective_scan.restype = lib.arena_selective_scan_bwd.restype = ctypes.c_int
    lib.arena_selective_scan_grid.restype = ctypes.c_int
    return lib


def kernel_choice() -> str:
    """``ARENA_SCAN_KERNEL``: 'auto' (the fused kernel for the device), 'torch' (pure PyTorch) or 'triton'."""
    choice = os.environ.get("ARENA_SCAN_KERNEL", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"ARENA_SCAN_KERNEL must be 'auto' (fused kernel: C on CPU when it builds, Triton on CUDA), "
                         f"'torch' (pure PyTorch) or 'triton', got {choice!r}")
    return choice


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built or ``ARENA_SCAN_KERNEL`` asks for another scan."""
    return _load() if kernel_choice() == "auto" else None


def built() -> ctypes.CDLL | None:
    """The compiled kernel whatever ``ARENA_SCAN_KERNEL`` now says (a backward takes its forward's path), or None."""
    return _load()


def kernel_for(x: Tensor) -> ctypes.CDLL | None:
    """``kernel()`` when ``x`` is an fp32 CPU tensor (what the fused kernels read in place), else None."""
    return kernel() if x.device.type == "cpu" and x.dtype == torch.float32 else None


def _rows(t: Tensor, inner: int) -> Tensor:
    """``t`` as fp32 with its last ``inner`` dims contiguous (a copy only when they are not)."""
    if t.dtype != torch.float32:
        t = t.float()
    step = 1
    for i in range(1, inner + 1):  # checked in plain Python: this runs for every input of every kernel call
        if t.stride(-i) != step:
            return t.contiguous()
        step *= t.shape[-i]
    return t


def _walk(seqs: list[Tensor | None], tokens: Sequence[int], reverse: bool) -> tuple[list[int | None], ctypes.Array]:
    """Each sequence's pointer at the scan's first step and its batch and token strides (one per token dim:
    ``tokens`` are their sizes), as the kernels take them: a reversed scan starts at the last token and steps back."""
    pointers, strides = [], []
    for t in seqs:
        if t is None:
            pointers.append(None)
            strides += [0] * (1 + len(tokens))
            continue
        steps = t.stride()[1:1 + len(tokens)]
        first = sum((k - 1) * s for k, s in zip(tokens, steps)) if reverse else 0
        pointers.append(t.data_ptr() + 4 * first)
        strides += [t.stride(0), *(-s if reverse else s for s in steps)]
    return pointers, (ctypes.c_long * len(strides))(*strides)


def _vectors(A: Tensor, D: Tensor | None, delta_bias: Tensor | None) -> list[Tensor | None]:
    """A transposed to [n, d], D and the delta bias, as contiguous fp32."""
    return [_rows(A.t(), 2)] + [None if t is None else _rows(t, 1) for t in (D, delta_bias)]


def scan(lib: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, *,
         D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
         delta_softplus: bool = False, reverse: bool = False, out: Tensor | None = None,
         accumulate: bool = False) -> Tensor:
    """The selective scan on time-major CPU tensors: ``u, delta, z`` [b, l, d], ``B, C`` [b, l, g, n], ``A`` [d, n].

    ``h`` [b, n, d] (contiguous fp32) is the state entering the scan and is overwritten by the
    last one, so a long sequence can be scanned piece by piece; ``reverse`` scans from the last
    token to the first. Tokens and batches may be strided (views into wider tensors are read in
    place). Returns fp32 [b, l, d], written into ``out`` when given; with ``accumulate`` what
    ``out`` holds is added to every token's output before the gate ``silu(z)`` (the other
    direction of a bidirectional scan, summed and gated in the same pass).
    """
    return _launch(lib.arena_selective_scan, 1, u, delta, A, B, C, h, D=D, z=z, delta_bias=delta_bias,
                   delta_softplus=delta_softplus, reverse=reverse, out=out, accumulate=accumulate)


def scan_grid(lib: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, *,
              D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
              delta_softplus: bool = False, reverse: bool = False, out: Tensor | None = None,
              accumulate: bool = False) -> Tensor:
    """``scan`` over tokens laid out on a grid: ``u, delta, z`` [b, rows, cols, d], ``B, C`` [b, rows, cols, g, n].

    The sequence is the grid read row after row (token ``t`` is row ``t // cols``, column
    ``t % cols``), each dim with its own stride, so a route through a feature map is a view of
    it: a channels-last map [b, H, W, d] gives the row-major route, its ``transpose(1, 2)`` the
    column-major one, and ``reverse`` either backwards, all read in place. Otherwise as ``scan``;
    returns fp32 [b, rows, cols, d].
    """
    return _launch(lib.arena_selective_scan_grid, 2, u, delta, A, B, C, h, D=D, z=z, delta_bias=delta_bias,
                   delta_softplus=delta_softplus, reverse=reverse, out=out, accumulate=accumulate)


def _launch(entry, token_dims: int, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, *,
            D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, reverse: bool,
            out: Tensor | None, accumulate: bool) -> Tensor:
    """Check the buffers and call the kernel ``entry`` on tensors with ``token_dims`` token dims after the batch."""
    b, *tokens, d = u.shape
    g, n = B.shape[-2], B.shape[-1]
    if not (h.is_contiguous() and h.shape == (b, n, d) and h.dtype == torch.float32):
        raise ValueError(f"h must be a contiguous fp32 [batch, d_state, channels] = {(b, n, d)} tensor, "
                         f"got {tuple(h.shape)} {h.dtype}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate adds to out: pass the tensor to add to as out")
        out = torch.empty(u.shape)
    elif out.shape != u.shape or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out must be fp32 [batch, {'length' if token_dims == 1 else 'rows, cols'}, channels] = "
                         f"{tuple(u.shape)} with contiguous channels, got {tuple(out.shape)} {out.dtype}")
    seqs = [_rows(u, 1), _rows(delta, 1), None if z is None else _rows(z, 1), _rows(B, 2), _rows(C, 2), out]
    pointers, strides = _walk(seqs, tokens, reverse)
    vectors = _vectors(A, D, delta_bias)  # held here: the kernel reads them through raw pointers
    rc = entry(*pointers[:5], *map(_ptr, vectors), pointers[5], h.data_ptr(), strides, b, *tokens, d, n, g,
               int(delta_softplus), int(accumulate), torch.get_num_threads())
    _check_rc(rc, n, d, g)
    return out


def _conv_input(x: Tensor, k: int) -> tuple[int, int, int]:
    """``x``'s shape after checking what the conv kernels read: fp32 [b, t, d], contiguous channels, k <= MAX_STATE."""
    if x.dtype != torch.float32 or x.ndim != 3 or x.stride(2) != 1 or not 0 < k <= MAX_STATE:
        raise ValueError(f"the fused token conv takes fp32 [b, t, d] inputs with contiguous channels and at most "
                         f"{MAX_STATE} taps, got {tuple(x.shape)} {x.dtype} (strides {x.stride()}), {k} taps")
    return x.shape


def token_conv(lib: ctypes.CDLL, x: Tensor, weight: Tensor, bias: Tensor, *, pad: int = 0, length: int | None = None,
               silu: bool = False, out: Tensor | None = None, accumulate: bool = False) -> Tensor:
    """Mamba's depthwise conv along the tokens of time-major ``x`` [b, t, d], then SiLU when asked, in one pass.

    Output token ``i`` is ``bias + sum_j weight[:, j] * x[:, i + j - pad]`` with ``x`` zero outside
    its tokens: ``pad`` tokens of zeros before ``x`` and as many after as ``length`` (default
    ``t + pad - k + 1``: none) needs. ``x`` is read in place (any batch and token strides,
    contiguous channels), so no padded copy is made. The result, fp32 [b, length, d], is written
    into ``out`` when given (a view with contiguous channels, e.g. half of a wider tensor), added
    to what it holds with ``accumulate``, and returned.
    """
    b, t, d = _conv_input(x, weight.shape[-1])
    k = weight.shape[-1]
    length = t + pad - k + 1 if length is None else length
    out = _conv_out(out, accumulate, (b, length, d), x.device, "token_conv")
    taps, bias = _rows(weight.reshape(d, k).t(), 2), _rows(bias, 1)
    lib.arena_token_conv(x.data_ptr(), x.stride(0), x.stride(1), taps.data_ptr(), bias.data_ptr(), out.data_ptr(),
                         out.stride(0), out.stride(1), b, t, length, d, k, pad, int(silu), int(accumulate),
                         torch.get_num_threads())
    return out


def token_conv_backward(lib: ctypes.CDLL, x: Tensor, weight: Tensor, grad: Tensor, *, pad: int = 0,
                        silu_bias: Tensor | None = None, out: Tensor | None = None,
                        accumulate: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``token_conv(lib, x, weight, bias, pad=pad, length=grad.shape[1])`` from its output's
    ``grad`` [b, length, d], in one pass over the tokens; with ``silu_bias`` (the conv's bias), of the conv
    with ``silu=True`` (the SiLU's input recomputed, not saved). Returns ``x``'s [b, t, d] (written into
    ``out`` when given, a view with contiguous channels, added to what it holds with ``accumulate``),
    ``weight``'s [d, k] and the bias's [d]."""
    b, t, d = _conv_input(x, weight.shape[-1])
    k = weight.shape[-1]
    out = _conv_out(out, accumulate, (b, t, d), x.device, "token_conv_backward")
    if grad.ndim != 3 or grad.shape[0] != b or grad.shape[2] != d:
        raise ValueError(f"token_conv_backward: grad must be [{b}, length, {d}], got {tuple(grad.shape)}")
    taps, grad = _rows(weight.reshape(d, k).t(), 2), _rows(grad, 3)
    bias = None if silu_bias is None else _rows(silu_bias, 1)
    grad_taps, grad_bias = torch.empty(k, d), torch.empty(d)
    rc = lib.arena_token_conv_bwd(x.data_ptr(), x.stride(0), x.stride(1), taps.data_ptr(), _ptr(bias),
                                  grad.data_ptr(), out.data_ptr(), out.stride(0), out.stride(1), grad_taps.data_ptr(),
                                  grad_bias.data_ptr(), b, t, grad.shape[1], d, k, pad, int(bias is not None),
                                  int(accumulate), torch.get_num_threads())
    if rc:
        raise MemoryError("token_conv_backward: the fused kernel could not allocate its working memory")
    return out, grad_taps.t(), grad_bias


def _conv_out(out: Tensor | None, accumulate: bool, shape: tuple[int, int, int], device: torch.device,
              name: str) -> Tensor:
    """``out``, checked to be an fp32 ``shape`` view with contiguous channels, or a new tensor."""
    if out is None:
        if accumulate:
            raise ValueError(f"{name}: accumulate=True adds into out; pass the tensor to add to as out")
        return torch.empty(shape)
    if out.shape != shape or out.dtype != torch.float32 or out.stride(2) != 1 or out.device != device:
        raise ValueError(f"{name}: out must be fp32 {list(shape)} with contiguous channels on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} (strides {out.stride()})")
    return out


THIN_VECTORS = 8  # the widest output of thin_matmul, in vectors of block_width(lib) floats (its THIN_MAX)


def block_width(lib: ctypes.CDLL) -> int:
    """The floats per vector register the kernels were compiled for (8 with AVX2, 16 with AVX-512)."""
    return lib.arena_block_width()


def thin_fits(lib: ctypes.CDLL, n: int) -> bool:
    """Whether ``thin_matmul`` computes outputs ``n`` wide on this build (at most ``THIN_VECTORS`` vectors)."""
    return n <= THIN_VECTORS * block_width(lib)


def thin_weight(lib: ctypes.CDLL, weight: Tensor) -> Tensor:
    """A Linear ``weight`` [n, k] as ``thin_matmul`` reads it: transposed, zero-padded to whole vectors [k, n']."""
    n, k = weight.shape
    w = block_width(lib)
    if not thin_fits(lib, n):
        raise ValueError(f"thin_matmul computes outputs up to {THIN_VECTORS * w} wide, got a weight of {n} rows")
    wt = weight.new_zeros(k, -(-n // w) * w, dtype=torch.float32)
    wt[:, :n] = weight.detach().t()
    return wt


def thin_matmul(lib: ctypes.CDLL, x: Tensor, wt: Tensor, n: int,
                then: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``y = x @ W.t()`` for fp32 rows ``x`` [..., k] and a Linear weight W [n, k] given as ``thin_weight(W)``:
    the output a few vectors wide (Mamba's x projection, n = dt_rank + 2 * d_state), where BLAS runs far
    below its square-matrix rate and this kernel keeps every output vector of two rows in registers.
    With ``then`` [r, m] (contiguous fp32, r <= n), also ``y[..., :r] @ then`` from the same pass over the
    rows (Mamba's dt: dt_proj's weight transposed); returns ``(y, that)``."""
    k = x.shape[-1]
    rows = _rows(x, 1).reshape(-1, k)
    if wt.dtype != torch.float32 or not wt.is_contiguous() or wt.shape[0] != k or not 0 < n <= wt.shape[1]:
        raise ValueError(f"thin_matmul: wt must be thin_weight's contiguous fp32 [{k}, >= {n}], "
                         f"got {wt.dtype} {tuple(wt.shape)}")
    if then is not None and not (then.dtype == torch.float32 and then.is_contiguous() and then.ndim == 2
                                 and then.shape[0] <= n):
        raise ValueError(f"thin_matmul: then must be contiguous fp32 [r <= {n}, m], got {then.dtype} "
                         f"{tuple(then.shape)}")
    y = x.new_empty(rows.shape[0], n)
    z = None if then is None else x.new_empty(rows.shape[0], then.shape[1])
    r, m = (0, 0) if then is None else then.shape
    if lib.arena_thin_matmul(rows.data_ptr(), rows.stride(0), wt.data_ptr(), y.data_ptr(), n, rows.shape[0], k, n,
                             _ptr(then), _ptr(z), m, r, m, torch.get_num_threads()):
        raise ValueError(f"thin_matmul: {n} outputs need {-(-n // block_width(lib))} vectors, at most {THIN_VECTORS}")
    y = y.view(*x.shape[:-1], n)
    return y if z is None else (y, z.view(*x.shape[:-1], m))


def _gate_rows(s: Tensor, z: Tensor) -> tuple[int, int, int]:
    """Rows, channels and z's row stride, after checking the gate's layouts: [b, l, d] with contiguous s, strided z rows."""
    b, l, d = s.shape
    if not (s.is_contiguous() and s.dtype == z.dtype == torch.float32 and z.shape == s.shape and z.stride(2) == 1
            and z.stride(0) == l * z.stride(1)):
        raise ValueError(f"the fused gate takes a contiguous fp32 s [b, l, d] and z of its shape with contiguous "
                         f"channels and evenly strided rows, got {tuple(s.shape)} and {tuple(z.shape)} "
                         f"(strides {z.stride()})")
    return b * l, d, z.stride(1)


def gate(lib: ctypes.CDLL, s: Tensor, z: Tensor, *, scale: float = 1.0) -> Tensor:
    """``scale * s * silu(z)`` in one pass: Mamba's output gate (``z`` may be a view into wider rows)."""
    rows, d, z_stride = _gate_rows(s, z)
    y = torch.empty_like(s)
    lib.arena_gate(s.data_ptr(), z.data_ptr(), z_stride, None, y.data_ptr(), None, 0, rows, d, scale,
                   torch.get_num_threads())
    return y


def gate_backward(lib: ctypes.CDLL, grad: Tensor, s: Tensor, z: Tensor, dz: Tensor, *, scale: float = 1.0) -> Tensor:
    """The gradients of ``gate`` from its output's ``grad``: returns that of ``s``; that of ``z`` goes into ``dz``
    (a tensor of ``z``'s layout, e.g. a view into the input projection's gradient)."""
    rows, d, z_stride = _gate_rows(s, z)
    _, _, dz_stride = _gate_rows(s, dz)
    grad = grad.float().contiguous()
    ds = torch.empty_like(s)
    lib.arena_gate(s.data_ptr(), z.data_ptr(), z_stride, grad.data_ptr(), ds.data_ptr(), dz.data_ptr(), dz_stride,
                   rows, d, scale, torch.get_num_threads())
    return ds


def rms_norm(lib: ctypes.CDLL, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of fp32 ``x`` with ``weight``, one pass per row: returns y and each row's 1 / rms."""
    x = x.contiguous()
    d = x.shape[-1]
    if weight.shape != (d,) or weight.dtype != torch.float32:
        raise ValueError(f"rms_norm: weight must be fp32 [{d}], got {weight.dtype} {tuple(weight.shape)}")
    weight = weight.contiguous()
    y, rstd = torch.empty_like(x), x.new_empty(x.shape[:-1])
    lib.arena_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rstd.numel(), d, eps,
                       torch.get_num_threads())
    return y, rstd


def grn_(lib: ctypes.CDLL, x: Tensor, gamma: Tensor, eps: float = 1e-6, *, bias: Tensor | None = None,
         gelu: bool = False) -> Tensor:
    """ConvNeXt-V2's GRN without bias in place on fp32 channels-last rows ``x`` [B, ..., C] (contiguous):
    ``x * (gamma * g / (mean_c g + eps) + 1)``, ``g`` each image's per-channel L2 norm over the pixels;
    of ``x + bias`` (a GEMM's bias [C], so that the GEMM need not copy it into its output first) and with
    ``gelu`` of ``GELU(x (+ bias))`` (exact, erf form), computed in the same pass."""
    c = x.shape[-1]
    if (not x.is_contiguous() or gamma.numel() != c or gamma.dtype != torch.float32
            or (bias is not None and (bias.shape != (c,) or bias.dtype != torch.float32))):
        raise ValueError(f"grn_: x must be contiguous with channels last, gamma and bias fp32 [{c}], got x strides "
                         f"{x.stride()}, gamma {gamma.dtype} {tuple(gamma.shape)}"
                         + ("" if bias is None else f", bias {bias.dtype} {tuple(bias.shape)}"))
    gamma, bias = gamma.contiguous(), None if bias is None else bias.contiguous()
    scale = x.new_empty(x.shape[0], c)
    lib.arena_grn(x.data_ptr(), gamma.data_ptr(), _ptr(bias), scale.data_ptr(), x.shape[0], x[0].numel() // c, c,
                  eps, int(gelu), torch.get_num_threads())
    return x


def depthwise_conv(lib: ctypes.CDLL, x: Tensor, taps: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The stride-1 'same' depthwise conv of an fp32 channels-last map ``x`` [B, C, H, W] with ``taps``
    [k * k, C] (the [C, 1, k, k] weight transposed, k odd) for inference, and each image's per-channel sum
    of the output [B, C] from the same pass (a squeeze-excite's pooling). The output is channels-last.
    Register tiles of 8 outputs by 4 taps load an input vector once for all the outputs it reaches; taps
    over the zero padding are skipped (``arena_dwconv``)."""
    b, c, h, w = x.shape
    k = math.isqrt(taps.shape[0])
    if (x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last)
            or taps.shape != (k * k, c) or k % 2 == 0 or taps.dtype != torch.float32 or not taps.is_contiguous()
            or (bias is not None and (bias.shape != (c,) or bias.dtype != torch.float32))):
        raise ValueError(f"depthwise_conv: x must be an fp32 channels-last [B, C, H, W] map, taps contiguous fp32 "
                         f"[k * k, C] with k odd and bias fp32 [C], got x {x.dtype} {tuple(x.shape)} (strides "
                         f"{x.stride()}), taps {taps.dtype} {tuple(taps.shape)}"
                         + ("" if bias is None else f", bias {bias.dtype} {tuple(bias.shape)}"))
    bias = None if bias is None else bias.contiguous()
    y, sums = x.new_empty(b, h, w, c), x.new_empty(b, c)
    if lib.arena_dwconv(x.data_ptr(), taps.data_ptr(), _ptr(bias), y.data_ptr(), sums.data_ptr(), b, h, w, c, k,
                        torch.get_num_threads()):
        raise MemoryError(f"depthwise_conv: no memory for the padded buffers of a {h}x{w} map")
    return y.permute(0, 3, 1, 2), sums


def dense(x: Tensor) -> bool:
    """Whether ``x`` fills its memory in order or channels-last (what an elementwise kernel can walk flat)."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def gelu(lib: ctypes.CDLL, x: Tensor, grad: Tensor | None = None) -> Tensor:
    """GELU (exact, erf form) of fp32 ``x``, or with ``grad`` (its output's gradient) the gradient of ``x``, in
    one pass over memory; the result keeps ``x``'s layout (contiguous or channels-last, see ``dense``)."""
    if x.dtype != torch.float32 or not dense(x):
        raise ValueError(f"gelu: x must be fp32, contiguous or channels-last, got {x.dtype} with strides {x.stride()}")
    out = torch.empty_like(x)
    if grad is not None and (grad.stride() != x.stride() or grad.dtype != torch.float32):
        grad = out.copy_(grad)  # x's layout (then overwritten in place)
    lib.arena_gelu(x.data_ptr(), _ptr(grad), out.data_ptr(), x.numel(), torch.get_num_threads())
    return out


def rms_norm_backward(lib: ctypes.CDLL, grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of ``rms_norm``'s ``x`` and ``weight`` from its output's ``grad`` (``rstd`` as it returned)."""
    x, grad, weight = x.contiguous(), grad.float().contiguous(), weight.contiguous()
    threads = torch.get_num_threads()
    dx, parts = torch.empty_like(x), x.new_zeros(threads, x.shape[-1])
    lib.arena_rms_norm_bwd(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(), dx.data_ptr(),
                           parts.data_ptr(), rstd.numel(), x.shape[-1], threads)
    return dx, parts.sum(0)


def cross_scan(lib: ctypes.CDLL, x: Tensor) -> Tensor:
    """A map [b, h, w, c] in VMamba's four route orders, time-major [b, h * w, 4, c] (fp32, one pass):
    row-major, column-major, and both backwards."""
    b, h, w, c = x.shape
    x = x.float().contiguous()
    seq = torch.empty(b, h * w, 4, c)
    lib.arena_cross_scan(x.data_ptr(), seq.data_ptr(), b, h, w, c, torch.get_num_threads())
    return seq


def cross_merge(lib: ctypes.CDLL, seq: Tensor, h: int, w: int) -> Tensor:
    """The four routes of ``seq`` [b, h * w, 4, c] summed back onto the map [b, h, w, c] (fp32, one pass):
    ``cross_scan``'s adjoint, summed (route 0 + route 2) + (route 1 + route 3) per cell."""
    b, _, _, c = seq.shape
    seq = seq.float().contiguous()
    out = torch.empty(b, h, w, c)
    lib.arena_cross_merge(seq.data_ptr(), out.data_ptr(), b, h, w, c, torch.get_num_threads())
    return out


def _check_rc(rc: int, n: int, d: int, g: int) -> None:
    if rc == 1:
        raise ValueError(f"the fused CPU scan takes d_state <= {MAX_STATE} and channels divisible by groups, "
                         f"got d_state {n}, {d} channels, {g} groups")
    if rc:
        raise MemoryError("the fused CPU scan could not allocate its working memory")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def scan_backward(lib: ctypes.CDLL, grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                  D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                  delta_softplus: bool = False, reverse: bool = False) -> dict[str, Tensor]:
    """The gradient of ``scan`` from a zero state, in its layouts: ``grad`` is the output's, [b, l, d].

    Inputs may be strided like ``scan``'s (views are read in place); ``reverse`` differentiates a
    reversed scan. Returns fp32 gradients keyed by argument name (``D``, ``z``, ``delta_bias``
    only when given): ``u, delta, z`` [b, l, d], ``B, C`` [b, l, g, n], ``A`` [d, n], ``D,
    delta_bias`` [d]. The kernel recomputes the states, so nothing from the forward is needed.
    """
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    # dB and dC: the kernel sums a group's channel blocks in `parts` runs, as many as keep the threads busy
    threads = torch.get_num_threads()
    parts = min(-(-d // g // lib.arena_block_width()), -(-threads // (b * g)))
    shapes = {"u": (b, l, d), "delta": (b, l, d), "z": (b, l, d), "B": (parts, b, l, g, n), "C": (parts, b, l, g, n),
              "A": (b, n, d), "D": (b, d), "delta_bias": (b, d)}
    given = {"z": z is not None, "D": D is not None, "delta_bias": delta_bias is not None}
    out = {k: torch.empty(shape) if given.get(k, True) else None for k, shape in shapes.items()}
    seqs = [_rows(u, 1), _rows(delta, 1), None if z is None else _rows(z, 1), _rows(B, 2), _rows(C, 2),
            _rows(grad, 1), out["u"], out["delta"], out["z"], out["B"][0]]
    pointers, strides = _walk(seqs, (l,), reverse)
    vectors = _vectors(A, D, delta_bias)  # held here: the kernel reads them through raw pointers
    rc = lib.arena_selective_scan_bwd(*pointers[:5], *map(_ptr, vectors), *pointers[5:9],
                                      pointers[9], pointers[9] - out["B"].data_ptr() + out["C"].data_ptr(),
                                      *map(_ptr, [out[k] for k in ("A", "D", "delta_bias")]), strides,
                                      b, l, d, n, g, parts, int(delta_softplus), threads)
    _check_rc(rc, n, d, g)
    out["B"], out["C"] = (t[0] if parts == 1 else t.sum(0) for t in (out["B"], out["C"]))
    out["A"] = out["A"].sum(0).t()
    for k in ("D", "delta_bias"):
        if out[k] is not None:
            out[k] = out[k].sum(0)
    return {k: t for k, t in out.items() if t is not None}

"""The Triton selective scan against the sequential reference, run by Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before the kernels are defined and changes how Triton runs
in that process, so the comparisons run in one child process (this file as a script) and the
tests here read its results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from backbones.ops import selective_scan as scan_module  # noqa: E402
from backbones.ops.selective_scan import selective_scan, selective_scan_ref  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
# The kernels' chunk under the interpreter, set before the cases run: a quarter of the default 64 tokens to
# interpret (the interpreter runs every op of every token in Python), with the same chunk boundaries crossed.
# The default chunk is what the GPU check (benchmarks/gpu_check.py) runs.
CHUNK = 16
# name: (batch, channels, length, d_state, groups (0: B, C without a group axis), D, z, delta_bias, softplus, dtype)
CASES = {
    "all_options_2_chunks_grouped": (2, 16, CHUNK + 6, 4, 2, True, True, True, True, "float32"),
    "bare_one_whole_chunk": (2, 8, CHUNK, 16, 0, False, False, False, False, "float32"),
    "one_token_d_state_1": (2, 16, 1, 1, 2, True, False, True, True, "float32"),
    "odd_sizes_gate_no_skip": (1, 12, 33, 3, 0, False, True, True, False, "float32"),
    "bfloat16_inputs": (2, 16, 24, 8, 2, True, True, True, True, "bfloat16"),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _inputs(b: int, d: int, l: int, n: int, groups: int, with_D: bool, with_z: bool, with_bias: bool,
            softplus: bool, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Random scan inputs; without softplus the steps are drawn positive, as softplus would make them."""
    g = torch.Generator().manual_seed(0)
    bc = (b, groups, n, l) if groups else (b, n, l)
    delta = 0.5 * torch.randn(b, d, l, generator=g) if softplus else torch.rand(b, d, l, generator=g)
    t = {"u": torch.randn(b, d, l, generator=g), "delta": delta,
         "A": -torch.exp(torch.randn(d, n, generator=g)), "B": torch.randn(*bc, generator=g),
         "C": torch.randn(*bc, generator=g), "D": torch.randn(d, generator=g) if with_D else None,
         "z": torch.randn(b, d, l, generator=g) if with_z else None,
         "delta_bias": (torch.rand(d, generator=g) - float(softplus)) if with_bias else None}
    return {k: None if v is None else v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in t.items()}


def _errors(case: tuple) -> dict[str, float]:
    """Relative errors of the output and every gradient, ``selective_scan`` (Triton) vs the reference."""
    from backbones.ops import selective_scan_triton

    *shape, softplus, dtype = case
    inputs = _inputs(*shape, softplus, getattr(torch, dtype))
    runs = []
    for fn in (selective_scan, selective_scan_ref):
        leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
        y = fn(**leaves, delta_softplus=softplus)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        given = {k: v for k, v in leaves.items() if v is not None}
        runs.append((y, dict(zip(given, torch.autograd.grad(y, list(given.values()), grad)))))
    (y, grads), (y_ref, grads_ref) = runs
    direct = selective_scan_triton.scan(**inputs, delta_softplus=softplus)
    errors = {"y": _rel(y, y_ref), **{f"d{k}": _rel(grads[k], grads_ref[k]) for k in grads},
              "dispatched_to_triton": float(not torch.equal(direct, y.detach()))}
    errors["dtype_kept"] = float(any(grads[k].dtype != inputs[k].dtype for k in grads) or y.dtype != inputs["u"].dtype)
    return errors


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, float]]:
    """Every case's errors, computed by this file run as a script under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "ARENA_SCAN_KERNEL": "triton",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(interpreted, name):
    """Output and all gradients within 1e-5 relative (fp32) or 1e-2 (bf16 inputs, fp32 state)."""
    errors = dict(interpreted[name])
    assert errors.pop("dispatched_to_triton") == 0.0, "ARENA_SCAN_KERNEL=triton did not run the Triton kernel"
    assert errors.pop("dtype_kept") == 0.0, "outputs and gradients must keep their inputs' dtypes"
    *_, with_D, with_z, with_bias, _, dtype = CASES[name]
    expected = {"y", "du", "ddelta", "dA", "dB", "dC"} | {k for k, on in (("dD", with_D), ("dz", with_z),
                                                                            ("ddelta_bias", with_bias)) if on}
    assert set(errors) == expected
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"{name}: relative errors above {TOLERANCE[dtype]}: {bad}"


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    """Asked for on CPU tensors outside the interpreter, the Triton scan says how to run it instead."""
    from backbones.ops import selective_scan_triton

    monkeypatch.setattr(selective_scan_triton, "INTERPRETED", False)
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "triton")
    inputs = _inputs(1, 4, 5, 2, 0, True, False, False, True, torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        selective_scan(**inputs)
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "auto")  # on CPU, auto never picks Triton
    assert _rel(selective_scan(**inputs), selective_scan_ref(**inputs)) < 1e-5


def test_missing_triton_is_named(monkeypatch):
    """Without the triton package, asking for it names the fix; the CPU paths are unaffected."""
    monkeypatch.setattr(scan_module, "_import_triton", lambda: ImportError("No module named 'triton'"))
    monkeypatch.setenv("ARENA_SCAN_KERNEL", "triton")
    inputs = _inputs(1, 4, 5, 2, 0, True, False, False, True, torch.float32)
    with pytest.raises(ValueError, match="pip install triton"):
        selective_scan(**inputs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_a_cuda_gpu(dtype):
    """The interpreter runs Python, not Triton's compiler: compile both kernels to an sm_90 binary too (no GPU needed)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from backbones.ops import selective_scan_triton as kernels

    flags = {"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "BLOCK_D": 32, "BLOCK_N": 16,
             "T": kernels.CHUNK}
    inputs = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "g_ptr", "y_ptr"}
    for fn, constants in ((kernels._scan_fwd_kernel, {**flags, "STORE_Y": True}),
                          (kernels._scan_fwd_kernel, {**flags, "STORE_Y": False}),
                          (kernels._scan_bwd_kernel, flags)):
        names = inspect.signature(fn.fn).parameters
        signature = {k: "constexpr" if k in constants else (f"*{dtype if k in inputs else 'fp32'}"
                                                            if k.endswith("_ptr") else "i32") for k in names}
        if not constants.get("STORE_Y", True):
            signature["y_ptr"] = "*fp32"
        try:
            binary = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))
        except RuntimeError as err:  # no ptxas in this triton install: nothing to compile with
            if "ptxas" in str(err):
                pytest.skip(str(err))
            raise
        assert binary.asm["cubin"], fn


if __name__ == "__main__":
    from backbones.ops import selective_scan_triton

    selective_scan_triton.CHUNK = CHUNK
    print(json.dumps({name: _errors(case) for name, case in CASES.items()}))

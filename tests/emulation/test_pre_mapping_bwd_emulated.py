"""The whole CUDA pre-mapping backward of mhc/_cuda.py (pre_finalize_bwd -> sinkhorn_bwd -> pre_proj_bwd ->
pre_reduce_bwd) with every launch run by the CPU emulation of its generated source (cuda_emu.py): the wrapper's
wiring (argument order, partial shapes, dynamic sizes, the one-split and several-split tails) against the float64
reference, with the tolerances of the GPU check (profiling/families.py, ``check_pre_mapping``). Also: four launches
and no torch op between them, and the result bitwise reproducible.
"""

from __future__ import annotations

import pytest
import torch

import tl_kernels.pre_reduce  # noqa: F401  (the backward launches it)
from mhc import _cuda  # noqa: E402
from mhc import reference as ref  # noqa: E402
from profiling import families  # noqa: E402
from profiling.model.bounds import _bind  # noqa: E402
from tl_kernels import pre_proj

from .cuda_emu import EmulatedKernel

_SOURCES: dict[int, EmulatedKernel] = {}


def _emulate(log):
    def launch(device, kernel, *args):
        emu = _SOURCES.setdefault(id(kernel), EmulatedKernel(kernel))
        scalars, grid, _ = _bind(kernel, args)
        named = dict(scalars)
        pf = kernel.prim_func
        for param, arg in zip(pf.params, args, strict=True):
            named[pf.buffer_map[param].name if param in pf.buffer_map else param.name] = arg
        log.append(kernel.prim_func.attrs["global_symbol"])
        emu(**{k: v for k, v in named.items() if k in emu.names}, grid=grid[:2] if grid[1] > 1 else grid[0])

    return launch


@pytest.mark.parametrize("n,C,T,sms,want_splits", [(4, 64, 70, 132, 2), (4, 128, 200, 1, 1), (2, 64, 9, 132, 1)],
                         ids=["n4-two-splits", "n4-one-split", "n2-partial-tile"])  # fmt: skip
def test_cuda_pre_mapping_bwd_emulated_against_float64(monkeypatch, n, C, T, sms, want_splits):
    log: list[str] = []
    monkeypatch.setattr(_cuda, "_launch", _emulate(log))
    monkeypatch.setattr(_cuda, "_num_sms", lambda device: sms)
    monkeypatch.setattr(_cuda, "DISABLED", set())
    dt, iters, eps, post_mult = torch.bfloat16, 20, 0.0, 2.0
    gen = torch.Generator().manual_seed(T)
    x, phi, alpha, bias = families.pre_site(n, C, dt, T, gen)
    li, hq, hr, hp, proj, rinv = ref.pre_mapping(x.float(), phi, alpha, bias, iters, post_mult, 1e-6, eps)
    saved = (hp.float(), hq.float(), proj.float(), rinv.float())
    grads = (torch.randn(T, C, generator=gen).to(dt), torch.randn(T, n, generator=gen),
             torch.randn(T, n, n, generator=gen), torch.randn(T, n, generator=gen))  # fmt: skip
    got = _cuda.pre_mapping_bwd(*grads, x, phi, alpha, bias, *saved, iters, post_mult, eps)
    splits = pre_proj.choose_splits(T, n, C, sms, "bwd")
    assert splits == want_splits
    tail = "pre_reduce_bwd" if splits > 1 else "pre_reduce_bwd_coef"
    assert log == ["pre_finalize_bwd", "sinkhorn_bwd", "pre_proj_bwd", tail], log
    d64 = [t.double() for t in (*grads, x, phi, alpha, bias, *saved)]
    want = ref.pre_mapping_backward(*d64, iters, post_mult, eps)
    mag_x, mag_phi = families.backward_magnitudes(grads, x, phi, alpha, bias, saved, iters, eps, post_mult)
    errs = dict(
        d_residual=families.budget(got[0], want[0], mag_x, families.PRE_TF32[dt] + families.ACT_RTOL[dt]),
        d_phi=families.budget(got[1], want[1], mag_phi, families.PRE_TF32[dt]),
        d_alpha=families.compare(got[2], want[2], atol=1e-4 * float(want[2].abs().max()), rtol=1e-4),
        d_bias=families.compare(got[3], want[3], atol=1e-4 * float(want[3].abs().max()), rtol=1e-4),
    )
    assert all(e.ok for e in errs.values()), errs
    again = _cuda.pre_mapping_bwd(*grads, x, phi, alpha, bias, *saved, iters, post_mult, eps)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True)), "not bitwise reproducible"

"""The performance model (:mod:`profiling.model`) of the residual boundary's CUDA backward, fully fused against
unfused, without a GPU: the launches of ``mhc.boundary._boundary_bwd_cuda`` (pre_finalize_bwd, sinkhorn_bwd,
boundary_bwd_fused, pre_reduce_bwd, the d_h reduction) and of ``_boundary_bwd_unfused_cuda`` (mhc::pre_mapping_bwd's
four kernels, then post_res(l)'s backward on the summed gradient), recorded through ``mhc._cuda._launch`` on fake
tensors, each through :func:`profiling.model.bounds.launch_model`. Prints, per launch, the bytes of its tensor
arguments per token in units of C (``bytes / (T * C)``; 8C is one ``[n = 4, C]`` bf16 residual) and the predicted
time; then the totals. Estimates: no GPU has run these kernels.

    python -m profiling.boundary_model [--n 4] [--C 7168] [--T 16384] [--dtype bfloat16] [--gpu H100]
"""

from __future__ import annotations

import argparse

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def backward_launches(path: str, n: int, C: int, dtype: torch.dtype, T: int, sms: int):
    """The TileLang launches of one backward ``path`` (``fused`` or ``unfused``) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mhc import _cuda
    from mhc import boundary as mb

    from .model import capture

    m = n * n + 2 * n
    fn = {"fused": mb._boundary_bwd_cuda, "unfused": mb._boundary_bwd_unfused_cuda}[path]
    saved_disabled = _cuda.DISABLED
    with FakeTensorMode(), capture._recording(sms) as launches:
        _cuda.DISABLED = set()
        try:
            e = torch.empty
            act = dict(dtype=dtype)
            args = (
                e(T, n, C, **act), e(T, C, **act), e(T, n), e(T, n, n), e(T, n),  # grad_x_next, g_li, g_post, g_res, g_pre
                e(T, C, **act), e(T, n, C, **act), e(T, n), e(T, n, n), e(T, n, C, **act),  # y, x, h_post, h_res, x_next
                e(n * C, m), e(3), e(m), e(T, n), e(T, n), e(T, m), e(T),  # phi, alpha, bias, h_pre', h_post', proj, rinv
            )  # fmt: skip
            fn(*args, 20, 2.0, 0.0)
        finally:
            _cuda.DISABLED = saved_disabled
    return launches


def table(n: int, C: int, dtype: str, T: int, gpu: str) -> list[dict]:
    from .model import bounds, gpus

    g = gpus.gpu(gpu)
    rows = []
    for path in ("unfused", "fused"):
        for launch in backward_launches(path, n, C, _DTYPES[dtype], T, g.sms):
            lm = bounds.launch_model(launch, g)
            rows.append(dict(path=path, kernel=lm.name, bytes_per_token_C=lm.bytes / (T * C), t_pred_us=lm.t_pred_us,
                             t_dram_us=lm.t_dram_us, registers=lm.detail["registers"],
                             blocks_per_sm=lm.detail["occupancy"]["blocks_per_sm"], grid=lm.detail["grid"]))  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--C", type=int, default=7168)
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16", choices=tuple(_DTYPES))
    ap.add_argument("--gpu", default="H100")
    a = ap.parse_args(argv)
    rows = table(a.n, a.C, a.dtype, a.T, a.gpu)
    print(f"boundary backward, n={a.n} C={a.C} {a.dtype} T={a.T} on {a.gpu} (model estimates)")
    print(
        f"{'path':8} {'kernel':28} {'bytes/token':>12} {'t_pred us':>10} {'t_dram us':>10} {'regs':>5} {'blk/SM':>6}  grid"
    )
    for r in rows:
        print(f"{r['path']:8} {r['kernel']:28} {r['bytes_per_token_C']:11.2f}C {r['t_pred_us']:10.1f} "
              f"{r['t_dram_us']:10.1f} {r['registers']:5d} {r['blocks_per_sm']:6d}  {r['grid']}")  # fmt: skip
    for path in ("unfused", "fused"):
        sel = [r for r in rows if r["path"] == path]
        print(
            f"{path:8} total: {len(sel)} launches, {sum(r['bytes_per_token_C'] for r in sel):.2f}C a token, "
            f"{sum(r['t_pred_us'] for r in sel):.1f} us predicted"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

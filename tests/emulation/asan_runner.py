"""Run by tests/emulation/test_asan_pre_mapping.py in a python process with AddressSanitizer preloaded: launches the
emulated pre-mapping kernels (generated sources, launch shared-memory sizes and flush-to-zero flags read from a JSON
file written with cuda_emu.kernel_sources, so this process never imports TileLang, whose z3 does not survive ASan) on
tensors allocated to their exact sizes (shared memory too), so any out-of-bounds access of the generated code lands
in an ASan redzone and aborts the process. ``--plant`` makes one input a row short (the check must fire).
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from tests.emulation.cuda_emu import EmulatedKernel  # noqa: E402


def main(path: str, plant: bool) -> None:
    src = json.loads(pathlib.Path(path).read_text())
    torch.manual_seed(0)
    bf, f32 = torch.bfloat16, torch.float32
    # pre_proj fwd: n=4, C=128, bf16, T=3 (one partial tile), 2 splits
    n, C, T, S = 4, 128, 3, 2
    m, K = n * n + 2 * n, n * C
    x = torch.randn(T - 1 if plant else T, K).to(bf)
    EmulatedKernel(src["pre_proj_fwd"])(
        x=x, phi=torch.randn(K, m), proj_part=torch.empty(S, T, m), sq_part=torch.empty(S, T),
        num_tokens=T, num_splits=S, grid=(1, S),
    )  # fmt: skip
    # pre_proj bwd with accumulate: the same shape, one split
    EmulatedKernel(src["pre_proj_bwd"])(
        x=torch.randn(T, K).to(bf), phi=torch.randn(K, m), d_pp=torch.randn(T, 2 * n), d_res=torch.randn(T, n * n),
        proj=torch.randn(T, m),
        rinv=torch.rand(T) + 0.5, alpha=torch.ones(3), h_pre=torch.rand(T, n), g_li=torch.randn(T, C).to(bf),
        d_x_in=torch.randn(T, K).to(bf), d_x=torch.empty(T, K, dtype=bf), d_phi_part=torch.empty(1, K, m),
        d_coef_part=torch.empty(1, 2 * m), num_tokens=T, num_splits=1, grid=(K // 64, 1),
    )  # fmt: skip
    # pre_finalize fwd: n=4, C=1280, bf16, T=33 (a partial second block), 2 splits
    n, C, T, S = 4, 1280, 33, 2
    m = n * n + 2 * n
    EmulatedKernel(src["pre_finalize_fwd"])(
        proj_part=torch.randn(S, T, m), sq_part=torch.rand(S, T) + 1, alpha=torch.ones(3), bias=torch.randn(m),
        x=torch.randn(T, n, C).to(bf), layer_input=torch.empty(T, C, dtype=bf), h_post=torch.empty(T, n),
        h_res=torch.empty(T, n, n), h_pre=torch.empty(T, n), proj=torch.empty(T, m), rinv=torch.empty(T),
        rms_eps=1e-6, post_mult=2.0, num_slices=1, num_tokens=T, num_splits=S, grid=(2, 1),
    )  # fmt: skip
    # pre_finalize bwd: n=4, C=64, fp32, T=19 (16 tokens a block: a partial second block)
    n, C, T = 4, 64, 19
    EmulatedKernel(src["pre_finalize_bwd"])(
        g_li=torch.randn(T, C), x=torch.randn(T, n, C), grad_h_pre=torch.randn(T, n), grad_h_post=torch.randn(T, n),
        h_pre=torch.rand(T, n), h_post=torch.rand(T, n), proj=torch.randn(T, m), rinv=torch.rand(T) + 0.5,
        alpha=torch.ones(3), bias=torch.randn(m), d_pp=torch.empty(T, 2 * n, dtype=f32),
        res_logits=torch.empty(T, n, n), post_mult=2.0, num_tokens=T, grid=int(src["pre_finalize_bwd_blocks"]),
    )  # fmt: skip
    # pre_reduce bwd, both variants: n=4, K = 512 (kq = 3072: 6 d_phi blocks of 512 threads and the coefficient
    # block), 3 splits; 5 tiles of coefficient partials (fewer rows than parts: some parts have none)
    n, K, S, R = 4, 512, 3, 5
    m = n * n + 2 * n
    kq = K * m // 4
    EmulatedKernel(src["pre_reduce_bwd"])(
        d_phi_part=torch.randn(S, kq, 4), d_coef_part=torch.randn(R, 2 * m), d_phi=torch.empty(kq, 4),
        d_alpha=torch.empty(3), d_bias=torch.empty(m), kq=kq, num_splits=S, rows=R, grid=kq // 512 + 1,
    )  # fmt: skip
    EmulatedKernel(src["pre_reduce_bwd_coef"])(
        d_coef_part=torch.randn(R, 2 * m), d_alpha=torch.empty(3), d_bias=torch.empty(m), rows=R, grid=1
    )
    # Sinkhorn fwd/bwd (exp domain with its log-domain fallback): a partial last block; token 1 underflows (a row 200
    # below the rest: the fallback), token 2 has a NaN logit
    for n in (4, 7, 16):
        T = int(src[f"sinkhorn_{n}_threads"]) + 3
        L = torch.randn(T, n, n) * 2
        L[1, 0, :] -= 200.0
        L[2, 1, 1] = float("nan")
        grid = int(src[f"sinkhorn_{n}_blocks"])
        EmulatedKernel(src[f"sinkhorn_fwd_{n}"])(
            logits=L, out=torch.empty(T, n, n), num_tokens=T, grid=int(src[f"sinkhorn_fwd_{n}_blocks"])
        )
        EmulatedKernel(src[f"sinkhorn_bwd_{n}"])(
            grad_out=torch.randn(T, n, n), logits=L, grad_logits=torch.empty(T, n, n), num_tokens=T, grid=grid
        )
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--plant" in sys.argv[2:])

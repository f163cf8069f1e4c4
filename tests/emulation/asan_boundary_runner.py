"""Run by tests/emulation/test_asan_boundary.py in a python process with AddressSanitizer preloaded: launches the
emulated boundary forward, backward and fully fused backward (generated sources read from a JSON file, so this
process never imports TileLang; the fused backward's thread block clusters run together, cuda_emu.py) on
tensors allocated to their exact sizes, so any out-of-bounds access of the generated code lands in an ASan redzone
and aborts the process. ``--plant`` makes the residual a row short (the check must fire).
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from tests.emulation.cuda_emu import EmulatedKernel  # noqa: E402

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(path: str, plant: bool) -> None:
    src = json.loads(pathlib.Path(path).read_text())
    torch.manual_seed(0)
    for case in src["cases"]:
        n, C, dtype, T, S = case["n"], case["C"], case["dtype"], case["T"], case["S"]
        dt, m = DT[dtype], n * n + 2 * n
        short = plant and case is src["cases"][0]
        EmulatedKernel(case["source"])(
            layer_output=torch.randn(T, C).to(dt), residual=torch.randn(T - 1 if short else T, n, C).to(dt),
            h_post=torch.rand(T, n), h_res=torch.rand(T, n, n), phi=torch.randn(n * C, m),
            out=torch.empty(T, n, C, dtype=dt), proj_part=torch.empty(S, T, m), sq_part=torch.empty(S, T),
            num_tokens=T, num_splits=S, grid=(-(-T // 64), S),
        )  # fmt: skip
    for case in src["bwd_cases"]:  # post_res(l)'s backward on the summed gradient
        n, C, dtype, T = case["n"], case["C"], case["dtype"], case["T"]
        dt = DT[dtype]
        EmulatedKernel(case["source"])(
            grad_x_next=torch.randn(T, n, C).to(dt), d_x_next=torch.randn(T, n, C).to(dt),
            layer_output=torch.randn(T, C).to(dt), residual=torch.randn(T, n, C).to(dt), h_post=torch.rand(T, n),
            h_res=torch.rand(T, n, n), d_layer_output=torch.empty(T, C, dtype=dt),
            d_residual=torch.empty(T, n, C, dtype=dt), d_h_post=torch.empty(T, n), d_h_res=torch.empty(T, n, n),
            num_tokens=T, grid=case["blocks"],
        )  # fmt: skip
    for case in src.get("fused_cases", []):  # the fully fused backward and its reduction (d_phi, d_coef, d_h)
        n, C, dtype, T, S, R = case["n"], case["C"], case["dtype"], case["T"], case["S"], case["R"]
        cb, groups = case["cb"], case["groups"]  # channel blocks (the grid), clusters of them (dh_part's rows)
        dt, m, q = DT[dtype], n * n + 2 * n, n * n + n
        dh_part, d_phi_part, d_coef_part = torch.empty(groups, T, q), torch.empty(S, n * C, m), torch.empty(R, 2 * m)
        EmulatedKernel(case["source"])(
            grad_x_next=torch.randn(T, n, C).to(dt), layer_output=torch.randn(T, C).to(dt),
            residual=torch.randn(T, n, C).to(dt), h_post=torch.rand(T, n), h_res=torch.rand(T, n, n),
            phi=torch.randn(n * C, m), d_pp=torch.randn(T, 2 * n), d_res=torch.randn(T, n * n),
            proj=torch.randn(T, m), rinv=torch.rand(T) + 0.5, alpha=torch.rand(3), h_pre=torch.rand(T, n),
            g_li=torch.randn(T, C).to(dt), d_layer_output=torch.empty(T, C, dtype=dt),
            d_residual=torch.empty(T, n, C, dtype=dt), dh_part=dh_part, d_phi_part=d_phi_part,
            d_coef_part=d_coef_part, num_tokens=T, num_splits=S, num_coef_tiles=R, grid=(cb, S),
        )  # fmt: skip
        kq = n * C * m // 4
        EmulatedKernel(case["reduce_source"])(
            d_phi_part=d_phi_part.view(S, kq, 4), d_coef_part=d_coef_part, dh_part=dh_part,
            d_phi=torch.empty(kq, 4), d_alpha=torch.empty(3), d_bias=torch.empty(m), d_h_res=torch.empty(T, n, n),
            d_h_post=torch.empty(T, n), num_tokens=T, num_cb=groups, num_splits=S, kq=kq, rows=R,
            grid=case["reduce_blocks"],
        )  # fmt: skip
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--plant" in sys.argv[2:])

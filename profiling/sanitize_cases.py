"""A small set of kernel launches for compute-sanitizer (memcheck, racecheck): every kernel family, both
directions, with token counts that leave partial thread blocks. Run as

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m profiling.sanitize_cases
"""

from __future__ import annotations

import torch

import mhc


def main() -> None:
    dev = "cuda"
    for n, C, dtype, T in [(4, 1280, torch.bfloat16, 37), (8, 7168, torch.float16, 3), (2, 64, torch.float32, 129)]:
        y = torch.randn(T, C, device=dev, dtype=dtype, requires_grad=True)
        x = torch.randn(T, n, C, device=dev, dtype=dtype, requires_grad=True)
        h_post = torch.rand(T, n, device=dev, requires_grad=True)
        h_res = torch.rand(T, n, n, device=dev, requires_grad=True)
        mhc.post_res(y, x, h_post, h_res).float().square().sum().backward()
    for n, T in [(4, 37), (16, 5), (3, 300)]:
        L = torch.randn(T, n, n, device=dev, requires_grad=True)
        mhc.sinkhorn(L).square().sum().backward()
    torch.cuda.synchronize()
    print("sanitize cases ran")


if __name__ == "__main__":
    main()

"""Run by tests/emulation/test_asan_pre_decode.py in a python process with AddressSanitizer preloaded: launches the
emulated decode pre-mapping (generated sources read from a JSON file, so this process never imports TileLang) on
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
        dt, m, K = DT[dtype], n * n + 2 * n, n * C
        short = plant and case is src["cases"][0]
        ticket = torch.zeros(case["max_groups"], dtype=torch.int32)
        EmulatedKernel(case["source"])(
            x=torch.randn(T - 1 if short else T, K).to(dt), phi=torch.randn(K, m) / K**0.5,
            alpha=torch.tensor([0.8, 0.6, 1.5]), bias=torch.randn(m), layer_input=torch.empty(T, C, dtype=dt),
            h_post=torch.empty(T, n), h_res=torch.empty(T, n, n), h_pre=torch.empty(T, n), proj=torch.empty(T, m),
            rinv=torch.empty(T), proj_part=torch.empty(S, T, m), sq_part=torch.empty(S, T), ticket=ticket,
            rms_eps=1e-6, post_mult=2.0, num_tokens=T, num_splits=S, grid=(case["groups"], S),
        )  # fmt: skip
        assert ticket.eq(0).all()
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--plant" in sys.argv[2:])

"""The generated CUDA source of the one-launch decode pre-mapping (tl_kernels/pre_decode.py), executed on the CPU
(see cuda_emu.py): against the float64 reference, against the two-kernel path (pre_proj_fwd + pre_finalize_fwd,
both emulated), in every block order, and relaunched on the same ticket buffer as a CUDA-graph replay does.

Blocks run one after another in the emulator, so the block that takes a group's last ticket is the last one run
of that group; the block orders (forward, reverse, shuffled) vary which split that is. What this cannot check:
memory ordering between blocks that run concurrently on a GPU (the fence/ticket pattern is argued in the module
docstring and docs/design.md, "Decode").
"""

from __future__ import annotations

import pytest
import torch

from mhc import reference as ref
from tl_kernels import pre_decode, pre_finalize, pre_proj

from .cuda_emu import EmulatedKernel

pytestmark = pytest.mark.usefixtures("approx_mode")

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {"bfloat16": 2**-7, "float16": 2**-10, "float32": 2e-6}
# The pre-mapping's TF32 budget (tl_kernels/pre_proj.py): |proj - exact| <= 2**-11 * sum_k |x_k phi_kj|, asserted
# at 2**-10 there. The decode kernel multiplies in fp32 (no TF32 rounding), so it must sit well inside it.
PROJ_BUDGET = 2**-10
COEF_ATOL = 2e-6  # as tests/emulation/test_pre_finalize_emulated.py (20 Sinkhorn iterations, approximate math)
CASES = [  # (n, C, dtype, T, splits, iters, eps, block_order)
    (4, 256, "bfloat16", 1, 5, 20, 0.0, "forward"),
    (4, 256, "bfloat16", 8, 16, 20, 0.0, "reverse"),
    (4, 128, "float16", 9, 3, 20, 0.0, "shuffle"),  # two groups, the second with one token
    (4, 64, "float32", 64, 2, 20, 0.3, "shuffle"),  # the largest T: eight groups; eps > 0
    (1, 64, "bfloat16", 3, 1, 20, 0.0, "forward"),  # one split: its only block is the last
    (2, 128, "float32", 5, 4, 20, 0.0, "reverse"),
    (6, 128, "bfloat16", 4, 6, 3, 1e-6, "shuffle"),
    (8, 64, "float16", 2, 8, 20, 0.0, "forward"),
]


def _inputs(T, n, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, K = n * n + 2 * n, n * C
    x = torch.randn(T, n, C, generator=g).to(DT[dtype])
    phi = torch.randn(K, m, generator=g) * 0.5 / K**0.5
    alpha = torch.tensor([0.8, 0.6, 1.5])
    bias = torch.randn(m, generator=g)
    return x, phi, alpha, bias


def _run(kernel, x, phi, alpha, bias, splits, *, ticket=None, block_order="forward", seed=0, pad=3):
    T, n, C = x.shape
    m = n * n + 2 * n
    nan = float("nan")
    outs = {
        "layer_input": torch.full((T + pad, C), nan, dtype=x.dtype),
        "h_post": torch.full((T + pad, n), nan),
        "h_res": torch.full((T + pad, n, n), nan),
        "h_pre": torch.full((T + pad, n), nan),
        "proj": torch.full((T + pad, m), nan),
        "rinv": torch.full((T + pad,), nan),
    }
    xp = torch.cat([x, torch.full((pad, n, C), nan).to(x.dtype)]).reshape(T + pad, n * C)
    ticket = torch.zeros(pre_decode.MAX_GROUPS, dtype=torch.int32) if ticket is None else ticket
    kernel(
        x=xp, phi=phi, alpha=alpha, bias=bias, **outs,
        proj_part=torch.full((splits, T, m), nan), sq_part=torch.full((splits, T), nan), ticket=ticket,
        rms_eps=1e-6, post_mult=2.0, num_tokens=T, num_splits=splits,
        grid=(-(-T // pre_decode.TB), splits), block_order=block_order, seed=seed,
    )  # fmt: skip
    for name, t in outs.items():
        assert t[T:].isnan().all(), f"{name} written past num_tokens"
        assert not t[:T].isnan().any(), f"{name}: some outputs never written"
    return {k: v[:T] for k, v in outs.items()}, ticket


def _check_against_reference(out, x, phi, alpha, bias, iters, eps, dtype, splits):
    T, n, C = x.shape
    want = ref.pre_mapping(x.double(), phi.double(), alpha.double(), bias.double(), iters, 2.0, 1e-6, eps)
    li, hq, hr, hp, pr, ri = want
    mag = x.double().reshape(T, n * C).abs() @ phi.double().abs()
    proj_err = ((out["proj"].double() - pr).abs() / (mag + 1e-30)).max().item()
    # fp32 FMA: one rounding per product and per sum along a split's K / S terms, then S partial sums
    assert proj_err <= (n * C // splits + splits + 2) * 2**-24 < PROJ_BUDGET, proj_err
    torch.testing.assert_close(out["rinv"].double(), ri, rtol=1e-6, atol=0)
    coef_err = max((out[k].double() - w).abs().max().item() for k, w in (("h_pre", hp), ("h_post", hq), ("h_res", hr)))
    assert coef_err <= COEF_ATOL, coef_err
    err = ((out["layer_input"].double() - li).abs() / (ref.pre_apply(x.double().abs(), hp) + 1e-30)).max().item()
    assert err <= ULP[dtype], f"layer_input: max relative error {err:.3g} > {ULP[dtype]:.3g}"
    print(f"proj {proj_err:.2g} x sum|x phi|, coefficients {coef_err:.2g}, layer_input {err:.2g} of its magnitude")


@pytest.mark.parametrize(
    "n,C,dtype,T,splits,iters,eps,order", CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}-T{c[3]}-S{c[4]}" for c in CASES]
)
def test_pre_decode_fwd_generated_source_on_cpu(n, C, dtype, T, splits, iters, eps, order):
    kernel = EmulatedKernel(pre_decode.pre_decode_fwd_kernel(n, C, dtype, iters, eps))
    x, phi, alpha, bias = _inputs(T, n, C, dtype)
    out, ticket = _run(kernel, x, phi, alpha, bias, splits, block_order=order, seed=T)
    assert ticket.eq(0).all(), f"the ticket buffer is not reset after the launch: {ticket.tolist()}"
    _check_against_reference(out, x, phi, alpha, bias, iters, eps, dtype, splits)
    if eps >= 0.01:  # the test can tell eps from no eps
        no_eps = ref.pre_mapping(x.double(), phi.double(), alpha.double(), bias.double(), iters, 2.0, 1e-6, 0.0)
        assert (no_eps[2] - out["h_res"].double()).abs().max() > 100 * COEF_ATOL


def test_pre_decode_replay_on_one_ticket_buffer_is_bitwise_and_order_independent():
    """A CUDA graph replays the launch with the same ticket buffer: each launch must leave it zeroed, and the fixed
    split order makes every output bitwise independent of which block arrives last."""
    n, C, dtype, T, splits = 4, 128, "bfloat16", 17, 5
    kernel = EmulatedKernel(pre_decode.pre_decode_fwd_kernel(n, C, dtype, 20, 0.0))
    x, phi, alpha, bias = _inputs(T, n, C, dtype, seed=3)
    ticket = torch.zeros(pre_decode.MAX_GROUPS, dtype=torch.int32)
    first, _ = _run(kernel, x, phi, alpha, bias, splits, ticket=ticket)
    for order, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2), ("forward", 0)):
        again, _ = _run(kernel, x, phi, alpha, bias, splits, ticket=ticket, block_order=order, seed=seed)
        assert ticket.eq(0).all()
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs in block order {order}/{seed}"


def test_pre_decode_a_stale_ticket_is_seen():
    """The ticket decides which block finalises: with a buffer that was not zero no block of that group takes the
    last ticket and its outputs stay unwritten (the test's NaN poison), so the reset above is load-bearing."""
    n, C, dtype, T, splits = 2, 64, "float32", 3, 2
    kernel = EmulatedKernel(pre_decode.pre_decode_fwd_kernel(n, C, dtype, 20, 0.0))
    x, phi, alpha, bias = _inputs(T, n, C, dtype)
    ticket = torch.zeros(pre_decode.MAX_GROUPS, dtype=torch.int32)
    ticket[0] = 1
    with pytest.raises(AssertionError, match="never written"):
        _run(kernel, x, phi, alpha, bias, splits, ticket=ticket)


@pytest.mark.parametrize("n,C,dtype,T", [(4, 256, "bfloat16", 8), (2, 128, "float32", 3)])
def test_pre_decode_matches_the_two_kernel_path(n, C, dtype, T):
    """Against pre_proj_fwd (TF32 tensor cores) + pre_finalize_fwd, both emulated: the projections differ by the
    TF32 rounding of the two-kernel path only, so everything agrees within the pre-mapping's TF32 budget."""
    iters = 20
    x, phi, alpha, bias = _inputs(T, n, C, dtype, seed=5)
    out, _ = _run(EmulatedKernel(pre_decode.pre_decode_fwd_kernel(n, C, dtype, iters, 0.0)), x, phi, alpha, bias, 3)
    m, K = n * n + 2 * n, n * C
    splits = 2
    proj_part, sq_part = torch.full((splits, T, m), float("nan")), torch.full((splits, T), float("nan"))
    EmulatedKernel(pre_proj.pre_proj_fwd_kernel(n, C, dtype))(
        x=x.reshape(T, K).contiguous(), phi=phi, proj_part=proj_part, sq_part=sq_part, num_tokens=T,
        num_splits=splits, grid=(pre_proj.fwd_tiles(T), splits),
    )  # fmt: skip
    two = {
        "layer_input": torch.empty(T, C, dtype=x.dtype), "h_post": torch.empty(T, n), "h_res": torch.empty(T, n, n),
        "h_pre": torch.empty(T, n), "proj": torch.empty(T, m), "rinv": torch.empty(T),
    }  # fmt: skip
    EmulatedKernel(pre_finalize.pre_finalize_fwd_kernel(n, C, dtype, iters, 0.0))(
        proj_part=proj_part, sq_part=sq_part, alpha=alpha, bias=bias, x=x, **two, rms_eps=1e-6, post_mult=2.0,
        num_slices=1, num_tokens=T, num_splits=splits, grid=(-(-T // pre_finalize.token_block(splits, n)), 1),
    )  # fmt: skip
    mag = x.double().reshape(T, K).abs() @ phi.double().abs()
    assert ((out["proj"].double() - two["proj"].double()).abs() / (mag + 1e-30)).max().item() <= PROJ_BUDGET
    torch.testing.assert_close(out["rinv"], two["rinv"], rtol=2e-6, atol=0)
    # Coefficients: |d logit| <= alpha * rinv * budget * sum|x phi| (< 1e-3 here); sigmoid and Sinkhorn are
    # contractions of the logits at these sizes, so 2e-3 bounds them.
    for name in ("h_pre", "h_post", "h_res"):
        torch.testing.assert_close(out[name], two[name], rtol=0, atol=2e-3, msg=name)
    torch.testing.assert_close(out["layer_input"].float(), two["layer_input"].float(), rtol=2e-2, atol=2e-2)

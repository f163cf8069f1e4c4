"""The generated CUDA source of the fused boundary forward (tl_kernels/boundary.py), TF32 tensor-core GEMM included,
executed on the CPU (see cuda_emu.py; ``shim.h`` emulates ``mma.sync.m16n8k8`` TF32 with the PTX ISA's fragment
layouts and truncates MMA operands to TF32 as the hardware does).

Checks:

* ``x_next`` bit for bit the output of the emulated ``post_res`` forward kernel (same arithmetic), and within one
  output ulp of the float64 reference;
* every split's projection partial within the TF32 budget of the module docstring (``2**-11 * sum_k |x_k phi_kj|``,
  asserted at 2**-10; fp32 activations 2**-9) against float64 on the *rounded* x_next, over exactly the channel
  blocks the split owns in every stream; the sums of squares to fp32 rounding;
* inputs past T poisoned with NaN and never read into a result, outputs past T never written;
* the next site's ``pre_finalize`` run unchanged on the boundary's partials gives the layer input and coefficients
  of ``pre_proj`` + ``pre_finalize`` on the same x_next within the TF32 budget.

Several split counts (including splits of one channel block), partial token tiles, every n, the three dtypes, both
designs (the register design, 16-channel blocks for fp32; the shared-tile design at n = 8, 16-bit). Not covered: the real tensor cores' accumulation order and speed.
"""

from __future__ import annotations

import pytest
import torch

from mhc import reference as ref
from tl_kernels import boundary, boundary_bwd, post_res, pre_reduce

from .cuda_emu import EmulatedKernel

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {"bfloat16": 2**-8, "float16": 2**-11, "float32": 2**-24}  # half an ulp: the rounding of one store
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
BM = boundary.BM


def _budget(dtype: str) -> float:
    return 2**-9 if dtype == "float32" else 2**-10


def _inputs(n, C, dtype, T, extra, seed=0):
    """Inputs with ``extra`` rows past T poisoned with NaN (the kernel sees ``num_tokens = T``)."""
    g = torch.Generator().manual_seed(seed)
    dt, m = DT[dtype], n * n + 2 * n
    y = torch.randn(T + extra, C, generator=g).to(dt)
    x = torch.randn(T + extra, n, C, generator=g).to(dt)
    h_post = torch.rand(T + extra, n, generator=g) * 2
    h_res = torch.rand(T + extra, n, n, generator=g)
    for t in (y, x, h_post, h_res):
        t[T:] = float("nan")
    phi = torch.randn(n * C, m, generator=g) / (n * C) ** 0.5
    return y, x, h_post, h_res, phi


def _run_boundary(n, C, dtype, T, S, y, x, h_post, h_res, phi, extra_out=3):
    m = n * n + 2 * n
    out = torch.full((T + extra_out, n, C), float("nan")).to(DT[dtype])
    proj_part, sq_part = torch.full((S, T, m), float("nan")), torch.full((S, T), float("nan"))
    kernel = EmulatedKernel(boundary.boundary_fwd_kernel(n, C, dtype))
    kernel(layer_output=y, residual=x, h_post=h_post, h_res=h_res, phi=phi, out=out, proj_part=proj_part,
           sq_part=sq_part, num_tokens=T, num_splits=S, grid=(-(-T // BM), S))  # fmt: skip
    assert out[T:].isnan().all(), "out written past num_tokens"
    return out[:T], proj_part, sq_part


CASES = [  # (n, C, dtype, T, splits)
    (4, 256, "bfloat16", 70, 2),  # two token tiles, the second partial
    (1, 64, "float32", 5, 1),
    (8, 128, "float32", 3, 2),  # 16-channel blocks
    (8, 128, "bfloat16", 70, 2),  # the shared-tile design
    (6, 192, "float16", 65, 3),  # one channel block a split
    (2, 192, "bfloat16", 1, 3),  # decode: one token
]


@pytest.mark.parametrize("n,C,dtype,T,splits", CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}-T{c[3]}-S{c[4]}" for c in CASES])
def test_boundary_fwd_generated_source_on_cpu(n, C, dtype, T, splits):
    y, x, h_post, h_res, phi = _inputs(n, C, dtype, T, extra=2)
    out, proj_part, sq_part = _run_boundary(n, C, dtype, T, splits, y, x, h_post, h_res, phi)

    # x_next: bit for bit post_res's kernel, and one rounding from the float64 reference
    plan = post_res._plan(n, C, dtype)
    want = torch.full((T, n, C), float("nan")).to(DT[dtype])
    EmulatedKernel(post_res.post_res_fwd_kernel(n, C, dtype))(
        layer_output=y[:T].contiguous(), residual=x[:T].contiguous(), h_post=h_post[:T].contiguous(),
        h_res=h_res[:T].contiguous(), out=want, num_tokens=T, grid=-(-T // plan.tpb),
    )  # fmt: skip
    assert torch.equal(out.view(BITS[out.dtype]), want.view(BITS[out.dtype])), "x_next differs from post_res's"
    exact = ref.post_res(y[:T].double(), x[:T].double(), h_post[:T].double(), h_res[:T].double())
    mag = torch.einsum("tij,tjc->tic", h_res[:T].double(), x[:T].double().abs()) + (
        h_post[:T].double()[..., None] * y[:T].double().abs()[:, None, :]
    )
    assert ((out.double() - exact).abs() <= ULP[dtype] * exact.abs() + 1e-6 * mag).all()

    # the partials: split s owns channel blocks [s * per, (s + 1) * per) of every stream
    p = boundary.plan(n, C, dtype)
    per = -(-p.blocks // splits)
    xv, pv = out.double().reshape(T, n * C), phi.double()
    for s in range(splits):
        cols = torch.zeros(C, dtype=torch.bool)
        cols[s * per * p.bc : min((s + 1) * per, p.blocks) * p.bc] = True
        k = cols.repeat(n)
        want_p, mag_p = xv[:, k] @ pv[k], xv[:, k].abs() @ pv[k].abs()
        err = ((proj_part[s].double() - want_p).abs() / (mag_p + 1e-30)).max().item()
        assert err <= _budget(dtype), f"split {s}: projection error {err:.3g} outside the TF32 budget"
        torch.testing.assert_close(sq_part[s].double(), xv[:, k].square().sum(-1), rtol=2e-6, atol=0)


def test_next_site_pre_finalize_runs_unchanged():
    """pre_finalize on the boundary's partials vs pre_proj's partials of the same x_next: the layer input and the
    coefficients agree within the TF32 budget (the only difference is the order of the fp32 sums)."""
    from tl_kernels import pre_finalize, pre_proj

    n, C, dtype, T, S = 4, 128, "bfloat16", 40, 2
    y, x, h_post, h_res, phi = _inputs(n, C, dtype, T, extra=0, seed=3)
    x_next, proj_part, sq_part = _run_boundary(n, C, dtype, T, S, y, x, h_post, h_res, phi, extra_out=0)
    m = n * n + 2 * n
    pp2, sq2 = torch.empty(S, T, m), torch.empty(S, T)
    EmulatedKernel(pre_proj.pre_proj_fwd_kernel(n, C, dtype))(
        x=x_next.reshape(T, n * C), phi=phi, proj_part=pp2, sq_part=sq2, num_tokens=T, num_splits=S,
        grid=(-(-T // pre_proj.BM), S),
    )  # fmt: skip
    fin = EmulatedKernel(pre_finalize.pre_finalize_fwd_kernel(n, C, dtype, 20, 0.0))
    alpha, bias = torch.tensor([0.8, 0.6, 1.1]), torch.randn(m, generator=torch.Generator().manual_seed(4)) * 0.5
    results = []
    for parts in ((proj_part, sq_part), (pp2, sq2)):
        o = dict(layer_input=torch.empty(T, C).to(DT[dtype]), h_post=torch.empty(T, n), h_res=torch.empty(T, n, n),
                 h_pre=torch.empty(T, n), proj=torch.empty(T, m), rinv=torch.empty(T))  # fmt: skip
        fin(proj_part=parts[0], sq_part=parts[1], alpha=alpha, bias=bias, x=x_next, **o, rms_eps=1e-6,
            post_mult=2.0, num_slices=1, num_tokens=T, num_splits=S, grid=(-(-T // pre_finalize.TOKENS), 1))  # fmt: skip
        results.append(o)
    fused, plain = results
    mag = x_next.double().reshape(T, n * C).abs() @ phi.double().abs()
    assert ((fused["proj"].double() - plain["proj"].double()).abs() <= 2 * _budget(dtype) * mag).all()
    torch.testing.assert_close(fused["rinv"], plain["rinv"], rtol=1e-6, atol=0)
    # measured: proj 2.4e-6 apart (magnitudes up to 36), coefficients 3e-7, layer_input bit-equal; asserted with
    # ~30x margin, and the layer input within one bf16 rounding
    for name in ("h_pre", "h_post", "h_res"):
        torch.testing.assert_close(fused[name], plain[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(fused["layer_input"].float(), plain["layer_input"].float(), rtol=2**-8, atol=0)


BWD_CASES = [  # (n, C, dtype, T): post_res's mappings (one token a block, several, guarded chunk loops)
    (4, 1280, "bfloat16", 3),
    (2, 64, "float16", 17),  # 16 tokens a block, partial last block
    (1, 1920, "bfloat16", 2),  # guarded last chunk
    (8, 2560, "float32", 1),
    (6, 192, "bfloat16", 5),
]


@pytest.mark.parametrize("n,C,dtype,T", BWD_CASES, ids=[f"n{c[0]}-C{c[1]}-{c[2]}-T{c[3]}" for c in BWD_CASES])
def test_boundary_bwd_generated_source_on_cpu(n, C, dtype, T):
    """post_res(l)'s backward on grad_x_next + d_x_next: bit for bit the unfused add (rounded to the dtype, as
    autograd's accumulation) followed by the emulated post_res backward kernel, outputs past T never written; and
    within one output ulp / fp32 accumulation of float64."""
    dt, extra = DT[dtype], 2
    g = torch.Generator().manual_seed(5)
    g1, g2 = (torch.randn(T + extra, n, C, generator=g).to(dt) for _ in range(2))
    y, x = torch.randn(T + extra, C, generator=g).to(dt), torch.randn(T + extra, n, C, generator=g).to(dt)
    h_post, h_res = torch.rand(T + extra, n, generator=g) * 2, torch.rand(T + extra, n, n, generator=g)
    for t in (g1, g2, y, x, h_post, h_res):
        t[T:] = float("nan")

    def outputs():
        return [torch.full((T + extra, C), float("nan")).to(dt), torch.full((T + extra, n, C), float("nan")).to(dt),
                torch.full((T + extra, n), float("nan")), torch.full((T + extra, n, n), float("nan"))]  # fmt: skip

    grid = -(-T // post_res._plan(n, C, dtype).tpb)
    fused, plain = outputs(), outputs()
    EmulatedKernel(boundary.boundary_bwd_kernel(n, C, dtype))(
        grad_x_next=g1, d_x_next=g2, layer_output=y, residual=x, h_post=h_post, h_res=h_res, d_layer_output=fused[0],
        d_residual=fused[1], d_h_post=fused[2], d_h_res=fused[3], num_tokens=T, grid=grid,
    )  # fmt: skip
    EmulatedKernel(post_res.post_res_bwd_kernel(n, C, dtype))(
        grad_out=g1 + g2, layer_output=y, residual=x, h_post=h_post, h_res=h_res, d_layer_output=plain[0],
        d_residual=plain[1], d_h_post=plain[2], d_h_res=plain[3], num_tokens=T, grid=grid,
    )  # fmt: skip
    for a, b in zip(fused, plain, strict=True):
        assert a[T:].isnan().all(), "written past num_tokens"
        bits = BITS.get(a.dtype, torch.int32)
        assert torch.equal(a[:T].view(bits), b[:T].view(bits)), "differs from the unfused add + post_res backward"
    want = ref.post_res_backward((g1 + g2)[:T].double(), y[:T].double(), x[:T].double(), h_post[:T].double(),
                                 h_res[:T].double())  # fmt: skip
    gm = (g1 + g2)[:T].double().abs()
    mags = (
        (h_post[:T].double()[..., None] * gm).sum(1),
        torch.einsum("tij,tic->tjc", h_res[:T].double(), gm),
        (gm * y[:T].double().abs()[:, None, :]).sum(-1),
        torch.einsum("tic,tjc->tij", gm, x[:T].double().abs()),
    )
    tols = (ULP[dtype] * 2 + 1e-6, ULP[dtype] * 2 + 1e-6, 1e-5, 1e-5)
    for got, exact, mag, tol in zip(fused, want, mags, tols, strict=True):
        err = ((got[:T].double() - exact).abs() / (mag + 1e-30)).max().item()
        assert err <= tol, f"error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------ the fully fused backward (boundary_bwd_fused)


def fused_bwd_inputs(n, C, dtype, T, extra, seed=11):
    """Site l's (y, x, h_post, h_res, grad_x_next) and site l+1's pre-mapping backward inputs (phi, the coefficient
    gradients d_pp | d_res, proj, rinv, alpha, h_pre, g_li), ``extra`` rows past T poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    dt, m = DT[dtype], n * n + 2 * n
    rows = T + extra
    ins = dict(
        grad_x_next=torch.randn(rows, n, C, generator=g).to(dt),
        layer_output=torch.randn(rows, C, generator=g).to(dt),
        residual=torch.randn(rows, n, C, generator=g).to(dt),
        h_post=torch.rand(rows, n, generator=g) * 2,
        h_res=torch.rand(rows, n, n, generator=g),
        d_pp=torch.randn(rows, 2 * n, generator=g),
        d_res=torch.randn(rows, n * n, generator=g),
        proj=torch.randn(rows, m, generator=g),
        rinv=torch.rand(rows, generator=g) + 0.5,
        h_pre=torch.rand(rows, n, generator=g),
        g_li=torch.randn(rows, C, generator=g).to(dt),
    )
    for t in ins.values():
        t[T:] = float("nan")
    ins["phi"] = torch.randn(n * C, m, generator=g) / (n * C) ** 0.5
    ins["alpha"] = torch.tensor([0.7, 0.5, 1.3])
    return ins


def run_fused_bwd(n, C, dtype, T, S, ins, extra_out=2, schedule=None, block_order=None, clusters=False):
    """The fused kernel and the d_h reduction, emulated: (d_layer_output, d_residual, d_h_post, d_h_res, d_phi_part,
    d_coef_part), outputs past T checked unwritten. ``clusters``: the opt-in thread block cluster variant, whose
    cluster's blocks the emulator runs together (cuda_emu.py); ``block_order`` orders the blocks or clusters."""
    dt, m, p = DT[dtype], n * n + 2 * n, boundary_bwd.fused_plan(n, C, dtype, clusters)
    R = -(-T // boundary_bwd.COEF_BM)
    outs = dict(
        d_layer_output=torch.full((T + extra_out, C), float("nan")).to(dt),
        d_residual=torch.full((T + extra_out, n, C), float("nan")).to(dt),
        dh_part=torch.full((p.groups, T, n * n + n), float("nan")),
        d_phi_part=torch.full((S, n * C, m), float("nan")),
        d_coef_part=torch.full((R, 2 * m), float("nan")),
    )
    EmulatedKernel(boundary_bwd.boundary_bwd_fused_kernel(n, C, dtype, clusters))(
        **ins,
        **outs,
        num_tokens=T,
        num_splits=S,
        num_coef_tiles=R,
        grid=(p.blocks, S),
        schedule=schedule,
        block_order=block_order,
    )
    for name in ("d_layer_output", "d_residual"):
        assert outs[name][T:].isnan().all(), f"{name} written past num_tokens"
    d_hp, d_hr = torch.full((T, n), float("nan")), torch.full((T, n, n), float("nan"))
    kq, nan = n * C * m // pre_reduce.VEC, float("nan")
    d_phi, d_alpha, d_bias = torch.full((n * C, m), nan), torch.full((3,), nan), torch.full((m,), nan)
    EmulatedKernel(boundary_bwd.boundary_reduce_bwd_kernel(n))(
        d_phi_part=outs["d_phi_part"].view(S, kq, pre_reduce.VEC), d_coef_part=outs["d_coef_part"],
        dh_part=outs["dh_part"], d_phi=d_phi.view(kq, pre_reduce.VEC), d_alpha=d_alpha, d_bias=d_bias, d_h_res=d_hr,
        d_h_post=d_hp, num_tokens=T, num_cb=p.groups, num_splits=S, kq=kq, rows=R,
        grid=1 + -(-T * (n * n + n) // pre_reduce.THREADS) + -(-kq // pre_reduce.THREADS),
    )  # fmt: skip
    return (outs["d_layer_output"][:T], outs["d_residual"][:T], d_hp, d_hr, outs["d_phi_part"], outs["d_coef_part"],
            (d_phi, d_alpha, d_bias))  # fmt: skip


def run_unfused_bwd(n, C, dtype, T, S, ins):
    """Today's path, every kernel emulated: post_res_fwd (x_next), pre_proj_bwd (d x_next, d_phi, d_coef partials),
    boundary_bwd (post_res's backward on grad_x_next + d x_next)."""
    from tl_kernels import pre_proj

    dt, m, K = DT[dtype], n * n + 2 * n, n * C
    a = {k: v[:T].contiguous() if k not in ("phi", "alpha") else v for k, v in ins.items()}
    tpb = post_res._plan(n, C, dtype).tpb
    x_next = torch.empty(T, n, C, dtype=dt)
    EmulatedKernel(post_res.post_res_fwd_kernel(n, C, dtype))(
        layer_output=a["layer_output"], residual=a["residual"], h_post=a["h_post"], h_res=a["h_res"], out=x_next,
        num_tokens=T, grid=-(-T // tpb),
    )  # fmt: skip
    d_xn, d_phi_part = torch.empty(T, K, dtype=dt), torch.empty(S, K, m)
    d_coef_part = torch.empty(-(-T // pre_proj.BM), 2 * m)
    EmulatedKernel(pre_proj.pre_proj_bwd_kernel(n, C, dtype, False))(
        x=x_next.view(T, K), phi=a["phi"], d_pp=a["d_pp"], d_res=a["d_res"], proj=a["proj"], rinv=a["rinv"],
        alpha=a["alpha"], h_pre=a["h_pre"], g_li=a["g_li"], d_x=d_xn, d_phi_part=d_phi_part,
        d_coef_part=d_coef_part, num_tokens=T, num_splits=S, grid=(K // pre_proj.BK, S),
    )  # fmt: skip
    outs = [torch.empty(T, C, dtype=dt), torch.empty(T, n, C, dtype=dt), torch.empty(T, n), torch.empty(T, n, n)]
    EmulatedKernel(boundary.boundary_bwd_kernel(n, C, dtype))(
        grad_x_next=a["grad_x_next"], d_x_next=d_xn.view(T, n, C), layer_output=a["layer_output"],
        residual=a["residual"], h_post=a["h_post"], h_res=a["h_res"], d_layer_output=outs[0], d_residual=outs[1],
        d_h_post=outs[2], d_h_res=outs[3], num_tokens=T, grid=-(-T // tpb),
    )  # fmt: skip
    return (*outs, d_phi_part, d_coef_part, x_next, d_xn.view(T, n, C))


# (n, C, dtype, T, splits, clusters); with clusters, cs = the cluster size (the largest of 8, 4, 2, 1 dividing C / g;
# 1 at n = 2); the default (clusters False) writes one d_h partial a channel block
FUSED_CASES = [
    (4, 256, "bfloat16", 70, 2, True),  # three token tiles of 32 over two splits, the last partial; two coef rows; cs 4
    (1, 128, "float32", 5, 1, True),  # two passes of the elementwise phases; cs 2
    (8, 64, "bfloat16", 33, 2, True),  # g = 32: rows past the tile idle in the elementwise phases; cs 2 (2 x 288)
    (8, 128, "float32", 3, 1, True),  # cs 4
    (6, 192, "float16", 65, 3, True),  # g = 32: six channel blocks, clusters of 2
    (2, 128, "bfloat16", 1, 1, True),  # decode: one token; n = 2 has no cluster (cs 1)
    (4, 1024, "bfloat16", 200, 2, True),  # two clusters of 8 (cs 8); 4 + 3 tiles, the last partial: a d_h slot reused
    (4, 192, "bfloat16", 40, 1, True),  # three channel blocks: no cluster (cs 1), one partial a channel block
    (4, 256, "bfloat16", 70, 2, False),  # the default variant on the shapes above with several channel blocks
    (1, 128, "float32", 5, 1, False),
    (8, 64, "bfloat16", 33, 2, False),
    (6, 192, "float16", 65, 3, False),
]


@pytest.mark.parametrize(
    "n,C,dtype,T,splits,clusters",
    FUSED_CASES,
    ids=[f"n{c[0]}-C{c[1]}-{c[2]}-T{c[3]}-S{c[4]}" + ("-clusters" if c[5] else "") for c in FUSED_CASES],
)
def test_boundary_bwd_fused_generated_source_on_cpu(n, C, dtype, T, splits, clusters):
    """The fused backward against today's three emulated kernels on the same inputs: d_layer_output, d_residual and
    the d_bias / d_scale rows bit for bit; d_h_post, d_h_res within fp32 summation order (their partials one per
    channel block by default, and with the opt-in clusters summed over thread block clusters of 2, 4 and 8 channel
    blocks through distributed shared memory); d_phi within the TF32 budget of float64 on the rounded x_next (and of
    the unfused d_phi); d_residual, d_layer_output within one output rounding of float64
    (mhc.boundary.boundary_backward_reference's post_res part on the unfused g)."""
    ins = fused_bwd_inputs(n, C, dtype, T, extra=2)
    fused = run_fused_bwd(n, C, dtype, T, splits, ins, clusters=clusters)
    plain = run_unfused_bwd(n, C, dtype, T, splits, ins)
    for k, name in ((0, "d_layer_output"), (1, "d_residual")):
        bits = BITS[fused[k].dtype]
        assert torch.equal(fused[k].view(bits), plain[k].view(bits)), f"{name} differs from the unfused kernels"
    assert torch.equal(fused[5], plain[5]), "d_coef_part differs from pre_proj_bwd's"
    # the reduction's d_phi, d_alpha, d_bias: pre_reduce_bwd's bits on the same partials
    kq, m = n * C * (n * n + 2 * n) // pre_reduce.VEC, n * n + 2 * n
    want = (torch.empty(n * C, m), torch.empty(3), torch.empty(m))
    EmulatedKernel(pre_reduce.pre_reduce_bwd_kernel(n, True))(
        d_phi_part=fused[4].view(splits, kq, pre_reduce.VEC), d_coef_part=fused[5],
        d_phi=want[0].view(kq, pre_reduce.VEC), d_alpha=want[1], d_bias=want[2], kq=kq, num_splits=splits,
        rows=fused[5].shape[0], grid=pre_reduce.phi_blocks(n * C * m) + 1,
    )  # fmt: skip
    for got, exp, name in zip(fused[6], want, ("d_phi", "d_alpha", "d_bias"), strict=True):
        assert torch.equal(got, exp), f"{name} differs from pre_reduce_bwd's"
    for k in (2, 3):  # d_h_post, d_h_res: fp32 sums over C in another order
        scale = plain[k].abs().max().item()
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-5, atol=1e-6 * scale)
    # d_phi = x_next^T d_proj against float64 on the rounded x_next (TF32: d_proj rounded to nearest, fp32 x_next
    # truncated by the MMA)
    x_next, d_xn = plain[6], plain[7]
    a = {k: v[:T].double() for k, v in ins.items() if k not in ("phi", "alpha")}
    alpha = ins["alpha"].double()
    groups = torch.cat([alpha[0].repeat(n), alpha[1].repeat(n), alpha[2].repeat(n * n)])
    d_proj = torch.cat([a["d_pp"], a["d_res"]], 1) * groups * a["rinv"][:, None]
    xv = x_next.double().reshape(T, n * C)
    want, mag = xv.T @ d_proj, xv.abs().T @ d_proj.abs()
    for got in (fused[4].sum(0), plain[4].sum(0)):
        err = ((got.double() - want).abs() / (mag + 1e-30)).max().item()
        assert err <= _budget(dtype), f"d_phi error {err:.3g} outside the TF32 budget"
    # and the post_res part against float64 on the same g = round(grad_x_next + d x_next)
    gsum = (ins["grad_x_next"][:T] + d_xn).double()
    want = ref.post_res_backward(gsum, a["layer_output"], a["residual"], a["h_post"], a["h_res"])
    for got, exact in zip(fused[:4], want, strict=True):
        scale = exact.abs().max().item()
        assert ((got.double() - exact).abs() <= ULP[dtype] * 2 * exact.abs() + 1e-5 * scale).all()

"""The four pre-mapping kernels (tl_kernels/pre_proj.py, tl_kernels/pre_finalize.py) called directly on a GPU, one
at a time, against float64 (marked `gpu`, skipped without CUDA).

The emulator (tests/emulation) calls the generated CUDA by parameter name with a grid the test computes; here the
kernels are called exactly as mhc/_cuda.py calls them: TileLang's positional argument binding, the split count
``num_splits`` taken from the leading dimension of the partials (a dynamic shape), ``num_slices`` passed as a
scalar, and the grid computed on the host by TileLang's stub from those. The call contract lives in the four
``_launch_*`` helpers below (the only place to change when a kernel's signature changes). Every output starts as
NaN, so an element never written fails the test.

Tolerances (the budgets of the kernels' docstrings):

* ``proj`` and the backward's ``d_x``, ``d_phi`` (TF32 tensor cores, operands rounded to nearest TF32): within
  ``2**-10`` (bf16/fp16 activations; ``2**-9`` for fp32) of ``sum_k |a_k b_k|``, the sum of the absolute products
  behind each element: twice the 2**-11 per-product budget, for the fp32 accumulation; ``d_x`` also one output ulp;
* ``sq`` (fp32 FMA, no TF32): rtol 2e-5, ``rinv`` (rsqrt.approx of the fp32 sums): rtol 1e-6 against float64 of
  the kernel's own ``proj`` and ``sq`` sums;
* the coefficients, recomputed in float64 from the kernel's own ``proj`` and ``rinv``: the atol of the GPU run's
  stage 2 (profiling/families.py, ``PRE_COEF_ATOL``; twice that for ``h_post = 2 sigmoid``);
* ``layer_input``: one output ulp of ``sum_i h_pre[i] |x[i]|`` with the kernel's ``h_pre``;
* ``d_pp`` (fp32 sums over C of rounded products): rtol 1e-4 plus 1e-6 sqrt(C) times the largest product;
  ``res_logits``: 1e-6 relative to the largest logit.
"""

from __future__ import annotations

import math

import pytest
import torch

from mhc import reference as ref
from profiling.families import PRE_COEF_ATOL, PRE_TF32

pytestmark = pytest.mark.gpu

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2e-6}
TOKENS = (1, 137, 16385)
#: (n, C, dtype), all shipped (tl_kernels/registry.py: in the carried kernel cache): the target shape first (the
#: largest T runs only for it: memory and time), n = 1, the 256-thread backward (n = 6, 8), fp16, and fp32 at
#: C = 1920 (30 K-chunks per stream: splits that do not divide the chunks)
SHAPES = [(4, 2560, "bfloat16"), (1, 1280, "bfloat16"), (6, 1280, "bfloat16"), (8, 7168, "bfloat16"),
          (4, 1280, "float16"), (4, 1920, "float32")]  # fmt: skip
IDS = [f"n{n}-C{C}-{dt}" for n, C, dt in SHAPES]


def _tokens_fit(T, shape):
    if T == 16385 and shape != SHAPES[0]:
        pytest.skip("the largest T runs for the target shape only")


def _num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


# ---------------------------------------------------------------------------------------------------- the contract


def _launch_proj_fwd(x, phi, splits):
    """``pre_proj_fwd_kernel(n, C, dt)(x [T, K], phi [K, m], proj_part [S, T, m], sq_part [S, T])``."""
    from tl_kernels import pre_proj

    T, n, C = x.shape
    m = n * n + 2 * n
    proj_part, sq_part = _nan(splits, T, m), _nan(splits, T)
    kernel = pre_proj.pre_proj_fwd_kernel(n, C, str(x.dtype).removeprefix("torch."))
    kernel(x.view(T, n * C), phi, proj_part, sq_part)
    return proj_part, sq_part


def _launch_finalize_fwd(proj_part, sq_part, alpha, bias, x, iters, eps, rms_eps, post_mult, slices):
    """``pre_finalize_fwd_kernel(n, C, dt, iters, eps)(proj_part, sq_part, alpha, bias, x, layer_input, h_post,
    h_res, h_pre, proj, rinv, rms_eps, post_mult, num_slices)``."""
    from tl_kernels import pre_finalize

    T, n, C = x.shape
    m = n * n + 2 * n
    li = _nan(T, C, dtype=x.dtype)
    h_post, h_res, h_pre, proj, rinv = _nan(T, n), _nan(T, n, n), _nan(T, n), _nan(T, m), _nan(T)
    kernel = pre_finalize.pre_finalize_fwd_kernel(n, C, str(x.dtype).removeprefix("torch."), iters, float(eps))
    kernel(proj_part, sq_part, alpha, bias, x, li, h_post, h_res, h_pre, proj, rinv, float(rms_eps),
           float(post_mult), slices)  # fmt: skip
    return li, h_post, h_res, h_pre, proj, rinv


def _launch_finalize_bwd(g_li, x, g_pre, g_post, h_pre, h_post, proj, rinv, alpha, bias, post_mult):
    """``pre_finalize_bwd_kernel(n, C, dt)(g_li, x, grad_h_pre, grad_h_post, h_pre, h_post, proj, rinv, alpha, bias,
    d_pp [T, 2n], res_logits [T, n, n], post_mult)``."""
    from tl_kernels import pre_finalize

    T, n, C = x.shape
    d_pp, res_logits = _nan(T, 2 * n), _nan(T, n, n)
    kernel = pre_finalize.pre_finalize_bwd_kernel(n, C, str(x.dtype).removeprefix("torch."))
    kernel(g_li, x, g_pre, g_post, h_pre, h_post, proj, rinv, alpha, bias, d_pp, res_logits, float(post_mult))
    return d_pp, res_logits


def _launch_proj_bwd(x, phi, d_logits, proj, rinv, alpha, h_pre, g_li, splits, d_x_in=None):
    """``pre_proj_bwd_kernel(n, C, dt, accumulate)(x [T, K], phi, d_pp [T, 2n], d_res [T, n*n], proj, rinv, alpha,
    h_pre, g_li, [d_x_in,] d_x [T, K], d_phi_part [S, K, m], d_coef_part [ceil(T / BM), 2m])``, with
    ``d_logits = [d_pp | d_res]``."""
    from tl_kernels import pre_proj

    T, n, C = x.shape
    K, m = n * C, n * n + 2 * n
    d_x, d_phi_part = _nan(T, K, dtype=x.dtype), _nan(splits, K, m)
    d_coef_part = _nan(-(-T // pre_proj.BM), 2 * m)
    kernel = pre_proj.pre_proj_bwd_kernel(n, C, str(x.dtype).removeprefix("torch."), d_x_in is not None)
    extra = [] if d_x_in is None else [d_x_in]
    d_pp, d_res = d_logits[:, : 2 * n].contiguous(), d_logits[:, 2 * n :].contiguous()
    kernel(x.view(T, K), phi, d_pp, d_res, proj, rinv, alpha, h_pre, g_li, *extra, d_x, d_phi_part, d_coef_part)
    return d_x.view(T, n, C), d_phi_part, d_coef_part


def _splits(T, n, C, direction):
    from tl_kernels import pre_proj

    return pre_proj.choose_splits(T, n, C, _num_sms(), direction)


def _slices(T, C, dtype):
    from tl_kernels import pre_finalize

    return pre_finalize.choose_slices(T, C, str(dtype).removeprefix("torch."), _num_sms())


# ---------------------------------------------------------------------------------------------------- inputs, checks


def _site(T, n, C, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    m, K = n * n + 2 * n, n * C
    x = torch.randn(T, n, C, device="cuda", generator=g).to(dtype)
    phi = torch.randn(K, m, device="cuda", generator=g) / K**0.5
    bias = torch.randn(m, device="cuda", generator=g) * 0.5
    return x, phi, torch.tensor([0.7, 0.5, 1.2], device="cuda"), bias


def _within(got, want, mag, frac, what):
    """``|got - want| <= frac * mag`` everywhere (NaN fails)."""
    err = ((got.double() - want).abs() / (frac * mag + 1e-30)).max() if got.numel() else torch.zeros(())
    assert float(err) <= 1.0, f"{what}: max |err| / budget = {float(err):.3g}"


def _scale(alpha64, n):
    return torch.cat([alpha64[:1].expand(n), alpha64[1:2].expand(n), alpha64[2:].expand(n * n)])


# ---------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n,C,dtype", SHAPES, ids=IDS)
def test_pre_proj_fwd(T, n, C, dtype):
    """Every split count from choose_splits (the one _cuda.py launches) and one split: each sum within the TF32
    budget; the partials of a split past its K-range never exist (every split is non-empty)."""
    _tokens_fit(T, (n, C, dtype))
    x, phi, _, _ = _site(T, n, C, DT[dtype])
    xv, phi64 = x.double().flatten(1), phi.double()
    want, mag = xv @ phi64, xv.abs() @ phi64.abs()
    sq_want = xv.square().sum(1)
    chosen = _splits(T, n, C, "fwd")
    for splits in sorted({chosen, 1}):
        proj_part, sq_part = _launch_proj_fwd(x, phi, splits)
        assert not proj_part.isnan().any() and not sq_part.isnan().any(), f"partials not written (S={splits})"
        _within(proj_part.sum(0), want, mag, PRE_TF32[x.dtype], f"proj (S={splits})")
        torch.testing.assert_close(sq_part.double().sum(0), sq_want, rtol=2e-5, atol=0)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n,C,dtype", SHAPES, ids=IDS)
def test_pre_finalize_fwd(T, n, C, dtype):
    """Partials from the projection kernel with the split count _cuda.py uses; the slice count from choose_slices
    and a single slice give bitwise-equal outputs (a slice only splits the C range of the apply)."""
    _tokens_fit(T, (n, C, dtype))
    iters, eps, rms_eps, post_mult = 20, 0.0, 1e-6, 2.0
    x, phi, alpha, bias = _site(T, n, C, DT[dtype])
    proj_part, sq_part = _launch_proj_fwd(x, phi, _splits(T, n, C, "fwd"))
    chosen = _slices(T, C, x.dtype)
    outs = {s: _launch_finalize_fwd(proj_part, sq_part, alpha, bias, x, iters, eps, rms_eps, post_mult, s)
            for s in sorted({chosen, 1})}  # fmt: skip
    li, h_post, h_res, h_pre, proj, rinv = outs[chosen]
    for name, t in zip(("layer_input", "h_post", "h_res", "h_pre", "proj", "rinv"), outs[chosen], strict=True):
        assert not t.isnan().any(), f"{name} not written"
    for u, v in zip(outs[chosen], outs[1], strict=True):
        assert torch.equal(u, v), f"num_slices={chosen} differs from num_slices=1"
    # the kernel reduces the partials in split order in fp32: the same adds on the host give the same bits
    p, r = proj_part[0].clone(), sq_part[0].clone()
    for s in range(1, proj_part.shape[0]):
        p, r = p + proj_part[s], r + sq_part[s]
    assert torch.equal(proj, p), "proj is not the split-ordered sum of the partials"
    torch.testing.assert_close(rinv.double(), torch.rsqrt(r.double() / (n * C) + rms_eps), rtol=1e-6, atol=0)
    logits = ref.coefficient_logits(proj.double(), rinv.double(), alpha.double(), bias.double(), n)
    pre, post, res = ref.split_coefficients(logits, n)
    torch.testing.assert_close(h_pre.double(), torch.sigmoid(pre), rtol=0, atol=PRE_COEF_ATOL)
    torch.testing.assert_close(h_post.double(), post_mult * torch.sigmoid(post), rtol=0, atol=2 * PRE_COEF_ATOL)
    torch.testing.assert_close(h_res.double(), ref.sinkhorn(res, iters, eps), rtol=0, atol=PRE_COEF_ATOL)
    x64 = x.double()
    _within(li, ref.pre_apply(x64, h_pre.double()), ref.pre_apply(x64.abs(), h_pre.double()), ULP[x.dtype],
            "layer_input")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- backward


def _saved(x, phi, alpha, bias, rms_eps=1e-6):
    """h_pre, h_post, proj, rinv of the forward, from the float64 reference rounded to fp32 (as the kernels save)."""
    n = x.shape[1]
    proj = ref.projection(x.double(), phi.double())
    rinv = ref.rms_inv(x.double(), rms_eps)
    pre, post, _ = ref.split_coefficients(ref.coefficient_logits(proj, rinv, alpha.double(), bias.double(), n), n)
    return torch.sigmoid(pre).float(), (2.0 * torch.sigmoid(post)).float(), proj.float(), rinv.float()


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n,C,dtype", SHAPES, ids=IDS)
def test_pre_finalize_bwd(T, n, C, dtype):
    _tokens_fit(T, (n, C, dtype))
    post_mult = 2.0
    x, phi, alpha, bias = _site(T, n, C, DT[dtype])
    h_pre, h_post, proj, rinv = _saved(x, phi, alpha, bias)
    g = torch.Generator(device="cuda").manual_seed(1)
    g_li = torch.randn(T, C, device="cuda", generator=g).to(x.dtype)
    g_pre, g_post = torch.randn(T, n, device="cuda", generator=g), torch.randn(T, n, device="cuda", generator=g)
    d_pp, res_logits = _launch_finalize_bwd(g_li, x, g_pre, g_post, h_pre, h_post, proj, rinv, alpha, bias, post_mult)
    assert not d_pp.isnan().any() and not res_logits.isnan().any(), "outputs not written"
    x64, gl64, hp64, hq64 = x.double(), g_li.double(), h_pre.double(), h_post.double()
    inner = (gl64[:, None, :] * x64).sum(-1)
    want_pre = (inner + g_pre.double()) * hp64 * (1 - hp64)
    want_post = g_post.double() * hq64 * (1 - hq64 / post_mult)
    scale = float(gl64.abs().max() * x64.abs().max()) if T else 0.0
    atol = 1e-6 * math.sqrt(C) * scale
    torch.testing.assert_close(d_pp[:, :n].double(), want_pre, rtol=1e-4, atol=atol)
    torch.testing.assert_close(d_pp[:, n:].double(), want_post, rtol=1e-4, atol=1e-6)
    logits = ref.coefficient_logits(proj.double(), rinv.double(), alpha.double(), bias.double(), n)
    want_res = ref.split_coefficients(logits, n)[2]
    torch.testing.assert_close(res_logits.double(), want_res, rtol=0, atol=1e-6 * float(want_res.abs().max()))


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n,C,dtype", SHAPES, ids=IDS)
def test_pre_proj_bwd(T, n, C, dtype):
    """d_x and d_phi (= d_phi_part.sum(0)) against the float64 chain of the pre_proj docstring, with the split count
    _cuda.py uses and one split (d_x bitwise equal: each token tile is owned by one block whatever the split), then
    the ``accumulate`` variant against the plain one plus the incoming gradient."""
    _tokens_fit(T, (n, C, dtype))
    x, phi, alpha, bias = _site(T, n, C, DT[dtype])
    h_pre, _h_post, proj, rinv = _saved(x, phi, alpha, bias)
    m, K = n * n + 2 * n, n * C
    g = torch.Generator(device="cuda").manual_seed(2)
    d_logits = torch.randn(T, m, device="cuda", generator=g)
    g_li = torch.randn(T, C, device="cuda", generator=g).to(x.dtype)
    x64, phi64, gl64 = x.double(), phi.double(), g_li.double()
    sc = _scale(alpha.double(), n)
    d_proj = d_logits.double() * sc * rinv.double()[:, None]
    prod = d_logits.double() * sc * proj.double()
    cx = -(rinv.double() ** 3) / K * prod.sum(1)
    want_x = (d_proj @ phi64.T).view(T, n, C) + cx[:, None, None] * x64 + h_pre.double()[..., None] * gl64[:, None]
    mag_x = (d_proj.abs() @ phi64.abs().T).view(T, n, C)
    mag_x = mag_x + (rinv.double() ** 3 / K * prod.abs().sum(1))[:, None, None] * x64.abs()
    mag_x = mag_x + h_pre.double()[..., None] * gl64.abs()[:, None]
    want_phi, mag_phi = x64.flatten(1).T @ d_proj, x64.flatten(1).abs().T @ d_proj.abs()
    tf32 = PRE_TF32[x.dtype]
    chosen = _splits(T, n, C, "bwd")
    d_xs = {}
    for splits in sorted({chosen, 1}):
        d_x, part, coef = _launch_proj_bwd(x, phi, d_logits, proj, rinv, alpha, h_pre, g_li, splits)
        assert not d_x.isnan().any() and not part.isnan().any(), f"outputs not written (S={splits})"
        assert not coef.isnan().any(), f"d_coef_part not written (S={splits})"
        _within(d_x, want_x, mag_x, tf32 + ULP[x.dtype], f"d_x (S={splits})")
        _within(part.sum(0), want_phi, mag_phi, tf32, f"d_phi (S={splits})")
        # per token tile (d_bias | d_scale): fp32 sums of at most BM products, checked summed over the tiles
        rs = d_logits.double() * proj.double() * rinv.double()[:, None]
        want_coef = torch.cat([d_logits.double().sum(0), rs.sum(0)])
        mag_coef = torch.cat([d_logits.double().abs().sum(0), rs.abs().sum(0)])
        _within(coef.double().sum(0), want_coef, mag_coef, 2**-16, f"d_bias | d_scale partials (S={splits})")
        d_xs[splits] = d_x
    assert torch.equal(d_xs[chosen], d_xs[1]), "d_x depends on the split count"
    if (n, dtype) != (4, "bfloat16"):
        return  # the accumulate variant ships for n = 4, bf16 only (tl_kernels/registry.py)
    d_x_in = torch.randn(T, n, C, device="cuda", generator=g).to(x.dtype)
    acc, _, _ = _launch_proj_bwd(x, phi, d_logits, proj, rinv, alpha, h_pre, g_li, chosen, d_x_in=d_x_in.view(T, K))
    assert not acc.isnan().any(), "accumulate: d_x not written"
    # one rounding of (v + d_x_in) against round(v) + d_x_in: within an ulp of |v| + |d_x_in| twice over
    plain, incoming = d_xs[chosen].double(), d_x_in.double()
    _within(acc, plain + incoming, plain.abs() + incoming.abs(), 2 * ULP[x.dtype], "d_x with accumulate")

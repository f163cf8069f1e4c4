"""Sinkhorn-Knopp projection of the mHC residual mixing matrix (arXiv 2512.24880 Eq. 9): forward and backward.

Math (fp32 throughout; the same loop as ``mhc/reference.py``)
-------------------------------------------------------------
Per token, with L the n x n logits (rows i, columns j)::

    z = L
    for t in 1..iters:
        z[:, j] -= log(sum_i exp(z[i, j]) + eps)      # columns first ...
        z[i, :] -= log(sum_j exp(z[i, j]) + eps)      # ... then rows
    out = exp(z)

eps = 0 is exactly the paper's Eq. 9 (M0 = exp(L), then iters x (divide columns by their sums, then rows)), so
every row of ``out`` sums to 1. eps > 0 only changes each divisor from S to S + eps (rows then sum to S/(S + eps)).

Every log(sum exp + eps) is a shifted log-sum-exp (``normalize``): exp(x) = ex2(x * log2 e) and log = lg2 * ln 2,
one MUFU instruction each, with arguments kept in natural units until that multiply. All exp arguments are <= ~0.35
and the largest >= ~-0.35, so no exp of an unnormalised value is ever formed. For eps > 0 the shift is K = k ln 2
with the integer k = round(max(max z, ln eps) / ln 2) (1.5 * 2**23 rounding trick), so eps * exp(-K) = eps * 2**-k
is built from exponent bits: the eps term costs no MUFU op (shifts >= 2**20, i.e. logits >= ~1e6, use the exact
max; eps is negligible there). Finite logits of any size give no Inf/NaN; NaN propagates to its token.

Forward: z itself is kept (registers, or the thread's shared tile row for n >= 11) and updated in place, as the
fp32 reference does. Measured in a CPU emulation of the generated CUDA (below): max |out - fp64| = 2-4e-7 for
N(0, 4) logits; 8e-8 (the same as torch's fp32 loop) for logits of scale 1e4, 3e6 and 1e30.

Backward: the exact derivative of the truncated iteration (the paper's choice). A half-step z' = z - log(sum_d
exp(z) + eps) along d has the VJP g <- g - exp(z') * sum_d(g), and out = exp(z) gives g = grad_out * out. The
recompute keeps z factorised as z[i, j] = L[i, j] + a[i] + b[j] (a column step rewrites b, a row step a), so with
a_t, b_t the offsets after iteration t (a_0 = b_0 = 0), P_t = exp(L + a_t[i] + b_t[j]) (after row step t) and
Q_t = exp(L + a_{t-1}[i] + b_t[j]) (after column step t)::

    g = grad_out * P_R
    for t = R..1:  g -= P_t * rowsum(g)[i];  g -= Q_t * colsum(g)[j]

Only the logits are read: the forward is recomputed on chip, recording a_t, b_t for t < R (2 * (iters - 1) * n
floats per token, not 2 * iters * n * n; a_R, b_R stay in registers). Q_t = P_t * exp(a_{t-1} - a_t)[i], and that
row factor equals rowsum(Q_t) + eps <= n + eps, so the product cannot overflow and an underflow costs at most
(n + eps) * 2**-149: one exp per row instead of n. The offsets carry an absolute error ~ulp(max |L|), so gradients
are as accurate as the fp32 reference for moderate logits (max |err| 3e-8..1e-7 * max|grad_out| measured) and
degrade to ~1e-4 relative only for |L| ~ 1e4 (where Sinkhorn is saturated and the gradient is ~0 anyway).

Layouts and call contracts
--------------------------
All tensors are contiguous float32 ``[T, n, n]`` (row-major n x n per token) on the GPU; T = ``num_tokens`` is
dynamic (one binary per (n, iters, eps)); T = 0 must not be launched (zero-size grid), any T >= 1 is safe.

* ``sinkhorn_fwd_kernel(n, iters, eps)(logits, out)``
* ``sinkhorn_bwd_kernel(n, iters, eps)(grad_out, logits, grad_logits)``

Supported: 1 <= n <= 16, finite eps >= 0, iters >= 1 as long as one token's backward state fits the shared-memory
budget, i.e. iters - 1 <= (SMEM_BUDGET_BYTES / 4 - 2 * pitch) / (2n) (iters <= 3164 for n = 4, 776 for n = 16;
the forward alone has no limit); anything else raises ValueError in the ``*_program`` functions.

Design
------
One token per thread, ``tpb`` tokens (threads) per block, tpb = min(128, SMEM_BUDGET_BYTES // bytes per token)
rounded down to whole warps when >= 32 (TileKernels runs one token per CTA in its forward). A block owns tpb * n * n
contiguous floats: they are copied global -> shared coalesced (thread tx moves elements k * tpb + tx, guarded by
``token < T``, missing tokens zero-filled and never stored) into a tile whose token pitch is n * n rounded up to an
odd number, so that thread tx reading element q of its own token hits bank (tx * pitch + q) % 32: conflict-free.
The output leaves the same way. Everything per token uses local arrays indexed by compile-time constants only
(all loops over n are unrolled), so it stays in registers; the iteration loops stay rolled. Barriers are explicit
(two per kernel), see _PASS_CONFIGS.

* Forward: with eps = 0 and z in registers, the exp-domain iteration (see Performance) with a register copy of the
  logits for the log-domain fallback; otherwise z (n * n), two delta vectors and a scratch vector per thread; z moves to the thread's tile row (updated
  in place there) when the estimate n * n + 3n + 24 exceeds REG_BUDGET = 168 live values (n >= 11). Shared memory
  = tpb * pitch * 4 B.
* Backward: two staging tiles (logits, grad_out; the latter also carries the result out) plus the offset history
  ``hist[((t * 2 + v) * n + i) * tpb + tx]`` (token-minor: conflict-free): (2 * pitch + 2 * (iters - 1) * n) * 4 B
  per token. The sweep loop fuses "column VJP of step t+1" and "row VJP of step t" into one pass over the rows, so
  each element of g is read and written once per iteration. P (kept from the previous sweep), L and g are placed
  greedily in registers while 7n + 24 + (matrices in registers) * n * n <= 168; otherwise L/g live in the tile
  rows and Q_t is recomputed with exp (2 * n * n exp per iteration instead of n * n + n).
* Shared-memory matrices get a block-scope fence per row/column (see _CSE_NOTE) so that only one row or column is
  live in registers.

Verification without a GPU: the generated CUDA source was compiled for the CPU (one std::thread per CUDA thread,
std::barrier for __syncthreads, AddressSanitizer) and compared with an fp64 torch reference/autograd for n = 1..16,
iters in {1, 2, 20}, eps in {0, 1e-6, 0.3}, T in {1, tpb - 1, tpb + 3, 2 tpb + 1}: no out-of-bounds access, every
output written, max |err| <= 4.2e-7 (forward) and <= 1.3e-7 * max|grad_out| (backward). This caught a real race
(see _PASS_CONFIGS). It cannot check timing, ex2/lg2.approx rounding or GPU memory-model subtleties.

Configurations at iters = 20 (R/S = registers/shared memory; registers from ``ptxas -v --gpu-name sm_90a``
(CUDA 13.0) for eps = 0 / eps = 1e-6; every kernel listed has 0 B stack frame, 0 B spill stores/loads and no
``.local`` in its PTX):

    n   kernel  tpb  shared B  z/L g  P           registers
    2   fwd     128     2560   R   -  -            22 / 24
    2   bwd     128    44032   R   R  R            40 / 40
    4   fwd     128     8704   R   -  -            56 / 61
    4   bwd     128    95232   R   R  R            96 / 96
    8   fwd     128    33280   R   -  -           138 / 158
    8   bwd      32    55552   S   S  R           168 / 168
    16  fwd      96    98688   S   -  -           168 / 167
    16  bwd      22    98736   S   S  recompute   255 / 255

All of n = 1..16 x eps in {0, 1e-6} at iters = 20, and n in {1, 2, 3, 4, 6, 8, 16} x iters in {1, 20} x eps in
{0, 1e-6}, compile with 0 spills and no local memory. The 228-255 register counts (n >= 9 backward, n = 10
forward) are ptxas' choice under ``__launch_bounds__(tpb, 1)``: with ``.maxnreg 168`` they still have 0 spills
(n = 12, 16 backward even at 128). Shared memory never exceeds SMEM_BUDGET_BYTES = 99 KiB per block. Cold compile
(TileLang -> nvcc -> cubin, on 2 cores shared with other jobs): 4-7.5 s for n <= 8, 4-10 s (up to 17 s under
load) for n >= 9; warm: from TileLang's disk cache in ~0.1-0.3 s.

Performance (n = 4, iters = 20, T = 16384, H100 SXM; estimated, NOT measured: no GPU on the build machine)
----------------------------------------------------------------------------------------------------------
Since the kernels compile with flush-to-zero (:data:`COMPILE_CONFIGS`) and the register-resident forward iterates
in the exp domain for eps = 0 (:func:`_forward_iteration`: one shifted exp per entry in the first column step, then
a sum, one ``rcp.approx`` and n multiplies per row or column; a tiny or NaN sum sends the token to the log-domain
path), the SASS per token at n = 4 is 2.0k forward (6.6k before both changes) and 7.8k backward (11.7k before
flush-to-zero; the backward still recomputes in the log domain). ``python -m tl_kernels.sinkhorn_sass`` (iters =
20, eps = 0, sm_90a, CUDA 13.0 ptxas; loop bodies as instructions / iterations per pass, ptxas unrolls some by 2
or 4; the forward's second loop is the log-domain fallback, not run on the normal path; "issue-bound" is one warp
instruction per scheduler per cycle at 1.755 GHz on 132 SMs: an estimate, and a lower bound on time only when every
scheduler has work; at ~1 warp per scheduler latency dominates)::

    n  kernel SASS/token  loop bodies      regs  smem B  tokens/block  warps/scheduler  issue-bound us
                                                                       T=4096, 16384    T=4096, 16384
    2  fwd        673  93/4 + 99/2        29    2560  128           0.24, 0.97       0.1, 0.4
    2  bwd       3117  111/2 + 95/1       40   44032  128           0.24, 0.97       0.4, 1.7
    4  fwd       2042  157/2 + 195/1      72    8704  128           0.24, 0.97       0.3, 1.1
    4  bwd       7848  208/1 + 168/1      94   95232  128           0.24, 0.97       1.1, 4.3
    6  fwd       4761  166/1 + 435/1     143   18944  128           0.24, 0.97       0.7, 2.6
    6  bwd      19932  456/1 + 450/1     157   77312  64            0.24, 0.97       2.8, 11.0
    8  fwd       6557  284/1 + 771/1     167   33280  128           0.24, 0.97       0.9, 3.6
    8  bwd      36175  937/1 + 842/1     168   55552  32            0.24, 0.97       5.0, 20.0
    16 fwd      84265  4131/1             91   98688  96            0.24, 0.97       11.6, 46.6
    16 bwd     148680  3680/1 + 3636/1   255   98736  22            0.35, 0.50       20.5, 82.2

The exp-domain forward agrees with the log-domain one to fp32 rounding in the emulation (same tolerances as
before); on the GPU its reciprocals are ``rcp.approx`` (1 ulp), which the emulation replaces by division. At n = 4
the issue-bound floor is now ~5.4 us for forward + backward at T = 16384; with one warp per scheduler the kernels
are latency-bound above it, so the next levers are the backward's recompute in the exp domain and several threads
per token.
The estimate
below predates the flush-to-zero change.

Both kernels are bound by the MUFU pipe (16 ex2/lg2 per clock per SM) and by latency, not by memory (1 MB in,
1 MB out). Forward: 816 MUFU ops per token (16 ex2 + 4 lg2 per half-step; the eps trick keeps eps > 0 at the same
count; + 16 for the output); backward: 1200 (recompute 800, sweeps 19 * (16 + 4) + 16 + 4); counts read off the
PTX. MUFU floor at ~1.75 GHz: 16384 * 816 / (132 * 16) clk = 3.6 us forward, 5.3 us backward. 16384 tokens are
512 warps, about one per SM sub-partition, so each half-step also exposes its dependency chain (max tree -> exp ->
sum tree -> lg2, ~60-90 clk on top of ~160 clk of MUFU issue); estimate ~5-6.5 us forward and ~7.5-9 us backward
including ~1 us of memory prologue/epilogue each: 13-15.5 us in total, i.e. the 15 us target is met only if the
MUFU pipe stays >= ~65% busy. If a measurement misses it, the next lever is two threads per token (row halves,
column partials exchanged with one shfl.xor each) to put two warps on every sub-partition and hide that chain; a
second one is evaluating part of the exps with an FMA-pipe polynomial (the MUFU pipe is the bottleneck).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import tilelang.language as T

from . import _common

__all__ = [
    "COMPILE_CONFIGS",
    "forward_in_registers",
    "sinkhorn_bwd_kernel",
    "sinkhorn_bwd_program",
    "sinkhorn_fwd_kernel",
    "sinkhorn_fwd_program",
]

MAX_N = 16
SMEM_BUDGET_BYTES = 99 * 1024  # per block; the brief's ceiling is 100 KB
MAX_TOKENS_PER_BLOCK = 128
# Estimated live fp32 values per thread above which a per-token matrix is moved from registers to shared memory.
REG_BUDGET = 168
# Unroll factor of the staging copies (global <-> shared) when a tile has more than that many entries per token.
_TILE_UNROLL = 32

# Barriers are placed by hand: TileLang's automatic pass cannot prove that thread tx only touches its own tile row
# and hist column, and would put a __syncthreads() inside the unrolled per-row loops. Shared-memory reuse must then
# be off as well: the lifetime-based merge may overlay hist on the logits tile (it did for iters = 1), which is
# only race-free behind the barrier the automatic pass would have added. The budget never assumes any reuse.
_PASS_CONFIGS = {"tl.disable_thread_storage_sync": True, "tl.disable_shared_memory_reuse": True}
# _CSE_NOTE: when a matrix lives in shared memory, nvcc merges the column step's n*n loads with the row step's
# (nothing writes the logits after the prologue) and ptxas hoists later rows' loads to the top of the huge unrolled
# basic block: all n*n values end up live (255 registers and spills at n = 16). A block-scope fence (membar.cta)
# before each row/column of a shared-memory matrix stops both, so only one row or column is live at a time.

# Flush-to-zero for the whole kernel (nvcc -ftz=true): ex2/lg2 become ex2.approx.ftz / lg2.approx.ftz, and ptxas
# drops the denormal range fixups it wraps around the non-ftz forms (38% of an iteration's instructions). Measured
# from the SASS (ptxas + cuobjdump 13.x, sm_90a), n = 4, iters = 20, eps = 0: forward loop body 315 -> 195
# instructions (6.6k -> 4.2k per token), backward loops 328 + 240 -> 208 + 168 (11.7k -> 7.8k per token). Accuracy:
# only results below 2**-126 (1.2e-38) change, to 0; every normalising sum is >= 0.7 by construction. Kernels that
# embed this device code (tl_kernels/pre_finalize.py) compile with the same flags.
COMPILE_CONFIGS = {"tl.device_compile_flags": ["-ftz=true"]}

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Round-to-integer trick: for |x| < 2**22, (x + 1.5 * 2**23) has round(x) in its low mantissa bits.
_MAGIC = 12582912.0
_MAGIC_BITS = 0x4B400000
_BIG = 2.0**20  # above this shift the eps term is negligible and the trick above is not needed (nor valid)


@dataclass(frozen=True)
class _Plan:
    """Compile-time decisions for one (kind, n, iters, eps); all sizes in fp32 elements unless named *_bytes."""

    n: int
    iters: int
    eps: float
    tokens_per_block: int  # = threads per block: one token per thread
    pitch: int  # floats between consecutive tokens in a staging tile (odd => bank-conflict-free row access)
    logits_in_regs: bool  # logits in registers (else read from the thread's row of the logits tile)
    grad_in_regs: bool  # bwd: running gradient in registers (else in the thread's row of the grad tile)
    p_in_regs: bool  # bwd: keep P_t in registers and get Q_t = P_t * row factor (else recompute Q_t with exp2)
    smem_bytes: int
    est_regs: int  # the estimate the placement was decided with (ptxas numbers are in the module docstring)


def _check_args(n, iters, eps) -> tuple[int, int, float]:
    """Validate and normalise the compile-time arguments (numpy integers and int eps are accepted)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_N:
        raise ValueError(f"sinkhorn: n must be an int in [1, {MAX_N}], got {n!r}")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"sinkhorn: iters must be an int >= 1, got {iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"sinkhorn: eps must be a finite float >= 0, got {eps!r}")
    return int(n), int(iters), float(eps)


def _pitch(n: int) -> int:
    """Odd token stride (in floats) of a staging tile: thread t reading element q of its own token touches bank
    (t * pitch + q) % 32, which is a permutation of the 32 banks across a warp when pitch is odd."""
    return n * n + (1 - (n * n) % 2)


def _tokens_per_block(bytes_per_token: int, kind: str, n: int, iters: int) -> int:
    fit = SMEM_BUDGET_BYTES // bytes_per_token
    if fit < 1:
        raise ValueError(
            f"sinkhorn {kind}: n={n}, iters={iters} needs {bytes_per_token} B of shared memory per token, "
            f"more than the {SMEM_BUDGET_BYTES} B per-block budget; use fewer iterations"
        )
    tpb = min(MAX_TOKENS_PER_BLOCK, fit)
    return tpb - tpb % 32 if tpb >= 32 else tpb  # whole warps when possible


def _fwd_plan(n: int, iters: int, eps: float) -> _Plan:
    n, iters, eps = _check_args(n, iters, eps)
    pitch = _pitch(n)
    base = 3 * n + 24  # offset vectors a, b, one temporary vector, scalars
    logits_in_regs = base + n * n <= REG_BUDGET
    tpb = _tokens_per_block(4 * pitch, "fwd", n, iters)
    return _Plan(
        n=n,
        iters=iters,
        eps=eps,
        tokens_per_block=tpb,
        pitch=pitch,
        logits_in_regs=logits_in_regs,
        grad_in_regs=False,
        p_in_regs=False,
        smem_bytes=4 * pitch * tpb,
        est_regs=base + (n * n if logits_in_regs else 0),
    )


def _bwd_plan(n: int, iters: int, eps: float) -> _Plan:
    n, iters, eps = _check_args(n, iters, eps)
    pitch = _pitch(n)
    # Peak register pressure is in the backward sweep: up to three n*n matrices (P, logits, gradient) plus seven
    # n-vectors. Greedy placement by value: a register-resident P saves n*n exp2 per iteration (the MUFU pipe is
    # the bottleneck), register-resident logits save 3*n*n shared loads per iteration, the gradient 2*n*n.
    est = 7 * n + 24
    placed = []
    for _name in ("p", "logits", "grad"):
        fits = est + n * n <= REG_BUDGET
        placed.append(fits)
        est += n * n if fits else 0
    p_in_regs, logits_in_regs, grad_in_regs = placed
    # Two staging tiles (logits, grad) plus the offset history a_t, b_t for t = 1..iters-1 (a_R, b_R stay in
    # registers) of every token.
    per_token = 2 * pitch + 2 * (iters - 1) * n
    tpb = _tokens_per_block(4 * per_token, "bwd", n, iters)
    return _Plan(
        n=n,
        iters=iters,
        eps=eps,
        tokens_per_block=tpb,
        pitch=pitch,
        logits_in_regs=logits_in_regs,
        grad_in_regs=grad_in_regs,
        p_in_regs=p_in_regs,
        smem_bytes=4 * per_token * tpb,
        est_regs=est,
    )


class _Matrix:
    """A per-thread n x n fp32 matrix that lives either in registers (a local array indexed by compile-time
    constants only, so it never touches local memory) or in the thread's own row of a shared staging tile."""

    def __init__(self, n: int, regs, tile, row_base):
        self.n = n
        self.regs = regs
        self.tile = tile
        self.row_base = row_base  # tx * pitch (PrimExpr) for the shared variant

    @property
    def buf(self):
        return self.regs if self.regs is not None else self.tile

    def idx(self, i, j):
        q = i * self.n + j
        return q if self.regs is not None else self.row_base + q


def _emitters(plan: _Plan):
    """TileLang macros shared by the forward and backward programs, specialised on ``plan``'s constants."""
    n, nn, tpb, pitch = plan.n, plan.n * plan.n, plan.tokens_per_block, plan.pitch
    # Staging copies: fully unrolled for small tiles; otherwise #pragma unroll _TILE_UNROLL keeps that many loads
    # in flight per thread.
    tile_loop = T.unroll if nn <= _TILE_UNROLL else functools.partial(T.unroll, unroll_factor=_TILE_UNROLL)
    with_eps = plan.eps > 0.0
    if with_eps:
        # eps = eps_m * 2**eps_e exactly, eps_m in [1, 2): eps * 2**-k is then built from the exponent bits.
        mant, expo = math.frexp(plan.eps)
        eps_m, eps_e = 2.0 * mant, expo - 1
        ln_eps = math.log(plan.eps)

    @T.macro
    def load_tile(src, tile, bx, tx, num_tokens):
        # The block owns tokens [bx * tpb, bx * tpb + tpb): tpb * n * n contiguous floats. Thread tx moves elements
        # e = k * tpb + tx (coalesced) into the padded tile; tokens past the end are zero-filled, never read.
        for k in tile_loop(nn):
            e = k * tpb + tx
            tok = e // nn
            q = e % nn
            if bx * tpb + tok < num_tokens:
                tile[tok * pitch + q] = src[bx * tpb + tok, q // n, q % n]
            else:
                tile[tok * pitch + q] = T.float32(0)

    @T.macro
    def store_tile(tile, dst, bx, tx, num_tokens):
        for k in tile_loop(nn):
            e = k * tpb + tx
            tok = e // nn
            q = e % nn
            if bx * tpb + tok < num_tokens:
                dst[bx * tpb + tok, q // n, q % n] = tile[tok * pitch + q]

    @T.macro
    def normalize(w, own, dst, d):
        """dst[d] <- own - log(sum_k exp(w[k] + own) + eps): one Sinkhorn half-step for one row or column whose
        entries are z_k = w[k] + own (own = the offset being updated). Shift-invariant log-sum-exp with shift
        K ~ max z: every exp argument is <= ~0.35 and the largest >= ~-0.35, so s is in [0.7, 2n + 2] and nothing
        over/underflows. Max and sum are balanced trees (depth ceil(log2 n)): this chain is the critical path."""
        c = T.alloc_var(T.float32)  # -K + own: z_k - K = w[k] + c
        mx = _tree(T.max, [w[k] for k in range(n)])
        if with_eps:
            # K = k * ln 2 with the integer k = round(max(max z, ln eps) / ln 2), so that eps * exp(-K) = eps * 2**-k
            # is built from exponent bits and costs no MUFU op. Only the first column step can see a shift above
            # 2**20 (logits above ~1e6); eps is negligible there and the exact max is used instead.
            mm = T.max(mx + own, T.float32(ln_eps))
            rnd = T.alloc_var(T.float32)
            rnd = mm * T.float32(LOG2E) + T.float32(_MAGIC)  # own statement: must not be folded with the "- _MAGIC"
            ki = T.reinterpret(rnd, T.int32) - T.int32(_MAGIC_BITS)  # k (exact while |mm / ln 2| < 2**22)
            e2 = T.max(T.int32(eps_e) - ki, T.int32(-127))  # <= 0 because k >= round(log2 eps) >= eps_e
            eps_term = T.float32(eps_m) * T.reinterpret(T.shift_left(e2 + T.int32(127), T.int32(23)), T.float32)
            big = mm >= T.float32(_BIG)
            c = own - T.Select(big, mm, (rnd - T.float32(_MAGIC)) * T.float32(LN2))
            extra = [T.Select(big, T.float32(0), eps_term)]
        else:
            c = -mx  # eps = 0: the result does not depend on own
            extra = []
        s = _tree(_add, [_exp(w[k] + c) for k in range(n)] + extra)
        dst[d] = c - T.__log2(s) * T.float32(LN2)

    @T.macro
    def col_step(lg, a, b, w, fold):
        """Normalise every column j of z[i, j] = lg[i, j] + a[i] + b[j] by updating b[j]. fold (forward): lg holds
        z itself and a = b = 0; each column's update is added into z instead. That is the fp32 reference's own form:
        z keeps its small normalised magnitudes, so huge logits lose no accuracy to big offsets a, b."""
        for j in T.unroll(n):
            if lg.regs is None:
                _fence()  # see _CSE_NOTE
            for i in T.unroll(n):
                w[i] = lg.buf[lg.idx(i, j)] if fold else lg.buf[lg.idx(i, j)] + a[i]
            normalize(w, b[j], b, j)
            if fold:
                for i in T.unroll(n):
                    lg.buf[lg.idx(i, j)] += b[j]
                b[j] = T.float32(0)

    @T.macro
    def row_step(lg, a, b, w, fold):
        """Normalise every row i by updating a[i] (uses the b of the column step just done); fold as above."""
        for i in T.unroll(n):
            if lg.regs is None:
                _fence()  # see _CSE_NOTE
            for j in T.unroll(n):
                w[j] = lg.buf[lg.idx(i, j)] if fold else lg.buf[lg.idx(i, j)] + b[j]
            normalize(w, a[i], a, i)
            if fold:
                for j in T.unroll(n):
                    lg.buf[lg.idx(i, j)] += a[i]
                a[i] = T.float32(0)

    return load_tile, store_tile, col_step, row_step


def _exp(x):
    """exp(x) as one MUFU ex2. The argument stays in natural units until this multiply, so differences of large
    logits (|L| ~ 1e4) are formed exactly as in the fp32 reference instead of after a lossy log2(e) scaling."""
    return T.exp2(x * T.float32(LOG2E))


def _add(x, y):
    return x + y


def _tree(op, values: list):
    """op-reduce a Python list of PrimExprs as a balanced tree (shorter dependency chain than a left fold)."""
    while len(values) > 1:
        values = [op(values[k], values[k + 1]) if k + 1 < len(values) else values[k] for k in range(0, len(values), 2)]
    return values[0]


def _fence():
    """membar.cta: orders this thread's shared-memory accesses, so ptxas cannot hoist the next row's loads above
    it (see _CSE_NOTE). Nothing is outstanding at that point, so it costs a few cycles."""
    T.evaluate(T.call_extern("void", "__threadfence_block"))


# Exp-domain forward (registers, eps = 0): a normalising sum below this sends the token to the log-domain path.
_EXP_DOMAIN_TINY = 2.0**-64


def _uses_exp_domain(plan: _Plan) -> bool:
    return plan.logits_in_regs and plan.eps == 0.0


def _forward_iteration(plan: _Plan, exp_domain: bool = True):
    """The forward iteration as one macro ``(lg, a, b, w)`` on the _Matrix lg (registers or the thread's tile row),
    which holds the logits before and ``h_res`` after; a, b, w are n-vectors of scratch.

    Register plans with eps = 0 iterate in the exp domain: the first column step is the shifted log-sum-exp of the
    log domain (exact differences of large logits), after which every half-step is a sum, one reciprocal
    (``__fdividef``: rcp.approx, 1 ulp) and n multiplies, no exp or log: at n = 4 an iteration is ~100 SASS instructions instead of 195.
    Every entry stays in [0, 1]; a normalising sum below 2**-64 (a row or column that underflowed, or NaN/Inf in the
    logits) marks the token, which is then recomputed in the log domain from a register copy of its logits, so
    extreme logits behave exactly as before. Other plans run the log-domain iteration in fold mode and exponentiate
    at the end."""
    n = plan.n
    _, _, col_step, row_step = _emitters(plan)

    @T.macro
    def log_domain(lg, a, b, w):
        for i in T.unroll(n):
            a[i] = T.float32(0)
            b[i] = T.float32(0)
        for _t in T.serial(plan.iters):
            col_step(lg, a, b, w, True)
            row_step(lg, a, b, w, True)
        for i in T.unroll(n):
            if lg.regs is None:
                _fence()  # see _CSE_NOTE
            for j in T.unroll(n):
                lg.buf[lg.idx(i, j)] = _exp(lg.buf[lg.idx(i, j)])

    if not (exp_domain and _uses_exp_domain(plan)):
        return log_domain

    @T.macro
    def normalise(z, idx, ok):
        """z[idx(k)] /= sum_k z[idx(k)] (k < n) with one reciprocal; a tiny or NaN sum clears ok[0]."""
        s = _tree(_add, [z[idx(k)] for k in range(n)])
        ok[0] = T.if_then_else(s >= T.float32(_EXP_DOMAIN_TINY), ok[0], T.int32(0))
        rc = T.call_extern("float32", "__fdividef", T.float32(1), s)
        for k in T.unroll(n):
            z[idx(k)] = z[idx(k)] * rc

    @T.macro
    def iterate(lg, a, b, w):
        z = lg.regs
        z0 = T.alloc_local((n * n,), T.float32)
        ok = T.alloc_local((1,), T.int32)
        ok[0] = T.int32(1)
        for q in T.unroll(n * n):
            z0[q] = z[q]
        # First column step: shifted exps (every entry <= 1, the column's largest is 1) and the column sums.
        for j in T.unroll(n):
            mx = _tree(T.max, [z[i * n + j] for i in range(n)])
            for i in T.unroll(n):
                z[i * n + j] = _exp(z[i * n + j] - mx)
            normalise(z, lambda k, j=j: k * n + j, ok)
        for i in T.unroll(n):
            normalise(z, lambda k, i=i: i * n + k, ok)
        for _t in T.serial(plan.iters - 1):
            for j in T.unroll(n):
                normalise(z, lambda k, j=j: k * n + j, ok)
            for i in T.unroll(n):
                normalise(z, lambda k, i=i: i * n + k, ok)
        if ok[0] == 0:  # underflow or NaN/Inf: the log-domain path from the saved logits
            for q in T.unroll(n * n):
                z[q] = z0[q]
            log_domain(lg, a, b, w)

    return iterate


def forward_in_registers(n: int, iters: int, eps: float):
    """The Sinkhorn forward device code of :func:`sinkhorn_fwd_program`, for other kernels (the fused pre-mapping):
    a macro ``(z, a, b, w)`` where ``z`` is a thread-local ``(n * n,)`` fp32 array holding one token's logits
    (row-major); afterwards ``z`` holds h_res. Needs the register variant of the plan (n <= 10); a, b, w are local
    ``(n,)`` scratch arrays."""
    plan = _fwd_plan(n, iters, eps)
    if not plan.logits_in_regs:
        raise ValueError(f"sinkhorn: forward_in_registers supports n <= 10, got n={n}")
    iterate = _forward_iteration(plan)

    @T.macro
    def run(z, a, b, w):
        iterate(_Matrix(n, z, None, None), a, b, w)

    return run


def sinkhorn_fwd_program(n: int, iters: int, eps: float, exp_domain: bool = True):
    """TileLang program ``kernel(logits[T, n, n] fp32, out[T, n, n] fp32)``; see the module docstring.
    ``exp_domain=False`` builds the previous log-domain forward, kept for timing comparisons on a GPU."""
    plan = _fwd_plan(n, iters, eps)
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch
    load_tile, store_tile, _, _ = _emitters(plan)
    iterate = _forward_iteration(plan, exp_domain)
    num_tokens = T.dynamic("num_tokens")

    @T.prim_func
    def sinkhorn_fwd(
        logits: T.Tensor((num_tokens, n, n), T.float32),
        out: T.Tensor((num_tokens, n, n), T.float32),
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=tpb) as bx:
            tx = T.get_thread_binding()
            tile = T.alloc_shared((tpb * pitch,), T.float32)
            a = T.alloc_local((n,), T.float32)
            b = T.alloc_local((n,), T.float32)
            w = T.alloc_local((n,), T.float32)
            lg_regs = T.alloc_local((n * n,), T.float32) if plan.logits_in_regs else None
            lg = _Matrix(n, lg_regs, tile, tx * pitch)  # the iterate z, initialised with the logits

            load_tile(logits, tile, bx, tx, num_tokens)
            T.sync_threads()  # from here on every thread touches only its own tile row until the store
            if plan.logits_in_regs:
                for q in T.unroll(n * n):
                    lg_regs[q] = tile[tx * pitch + q]
            iterate(lg, a, b, w)
            if plan.logits_in_regs:  # h_res into the thread's own tile row (the shared variant has it there already)
                for q in T.unroll(n * n):
                    tile[tx * pitch + q] = lg_regs[q]
            T.sync_threads()
            store_tile(tile, out, bx, tx, num_tokens)

    return sinkhorn_fwd


def sinkhorn_bwd_program(n: int, iters: int, eps: float):
    """TileLang program ``kernel(grad_out[T, n, n], logits[T, n, n], grad_logits[T, n, n])``, all fp32."""
    plan = _bwd_plan(n, iters, eps)
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch
    load_tile, store_tile, col_step, row_step = _emitters(plan)
    num_tokens = T.dynamic("num_tokens")

    @T.macro
    def record(hist, tx, t, v, vec):
        # Offsets after iteration t + 1 (v = 0: a, v = 1: b), kept for t + 1 < iters only.
        if t < iters - 1:
            for i in T.unroll(n):
                hist[((t * 2 + v) * n + i) * tpb + tx] = vec[i]

    @T.macro
    def sweep(lg, g, p, a_cur, b_cur, a_nxt, b_nxt, cs, cs_nxt, prow, col_vjp, row_vjp, init):
        """One sweep over the rows of the token, for backward step t (a_cur = a_t, b_cur = b_t; a_nxt = a_{t+1},
        b_nxt = b_{t+1}, cs_nxt = colsum of dL/dz after the column step t+1):
          col_vjp: g -= Q_{t+1} * cs_nxt[j]   with Q_{t+1} = exp(lg + a_t[i] + b_{t+1}[j])  (column step t+1)
          row_vjp: g -= P_t * rowsum_i(g)     with P_t = exp(lg + a_t[i] + b_t[j])          (row step t)
                   and cs[j] += g (the column sums the next sweep's col_vjp needs)
          init:    g = grad_out * P_R first (t = R)."""
        for i in T.unroll(n):
            if lg.regs is None or g.regs is None:
                _fence()  # see _CSE_NOTE
            if col_vjp:
                if plan.p_in_regs:
                    # p holds P_{t+1}; Q_{t+1} = P_{t+1} * exp(a_t - a_{t+1}) and that row factor is
                    # rowsum(Q_{t+1}) + eps <= n + eps, so the product cannot overflow.
                    rf = _exp(a_cur[i] - a_nxt[i])
                    for j in T.unroll(n):
                        g.buf[g.idx(i, j)] -= p[i * n + j] * rf * cs_nxt[j]
                else:
                    for j in T.unroll(n):
                        qv = _exp(lg.buf[lg.idx(i, j)] + a_cur[i] + b_nxt[j])
                        g.buf[g.idx(i, j)] -= qv * cs_nxt[j]
            if row_vjp:
                for j in T.unroll(n):
                    prow[j] = _exp(lg.buf[lg.idx(i, j)] + a_cur[i] + b_cur[j])
                if init:
                    for j in T.unroll(n):
                        g.buf[g.idx(i, j)] = g.tile[g.row_base + i * n + j] * prow[j]
                rs = _tree(_add, [g.buf[g.idx(i, j)] for j in range(n)])
                for j in T.unroll(n):
                    g.buf[g.idx(i, j)] -= prow[j] * rs
                    cs[j] += g.buf[g.idx(i, j)]
                if plan.p_in_regs:
                    for j in T.unroll(n):
                        p[i * n + j] = prow[j]

    @T.prim_func
    def sinkhorn_bwd(
        grad_out: T.Tensor((num_tokens, n, n), T.float32),
        logits: T.Tensor((num_tokens, n, n), T.float32),
        grad_logits: T.Tensor((num_tokens, n, n), T.float32),
    ):
        T.annotate_pass_configs(_PASS_CONFIGS)
        with T.Kernel(T.ceildiv(num_tokens, tpb), threads=tpb) as bx:
            tx = T.get_thread_binding()
            tile_l = T.alloc_shared((tpb * pitch,), T.float32)
            tile_g = T.alloc_shared((tpb * pitch,), T.float32)
            # hist[((t * 2 + v) * n + i) * tpb + tx], t < iters - 1: a_{t+1}[i] (v = 0) and b_{t+1}[j] (v = 1) of
            # thread tx's token, token-minor so that a warp's accesses hit 32 consecutive banks.
            hist = T.alloc_shared(((iters - 1) * 2 * n * tpb,), T.float32) if iters > 1 else None
            a = T.alloc_local((n,), T.float32)
            b = T.alloc_local((n,), T.float32)
            w = T.alloc_local((n,), T.float32)
            a_nxt = T.alloc_local((n,), T.float32)
            b_nxt = T.alloc_local((n,), T.float32)
            cs = T.alloc_local((n,), T.float32)
            cs_nxt = T.alloc_local((n,), T.float32)
            prow = T.alloc_local((n,), T.float32)
            p = T.alloc_local((n * n,), T.float32) if plan.p_in_regs else None
            lg_regs = T.alloc_local((n * n,), T.float32) if plan.logits_in_regs else None
            g_regs = T.alloc_local((n * n,), T.float32) if plan.grad_in_regs else None
            lg = _Matrix(n, lg_regs, tile_l, tx * pitch)  # the logits
            g = _Matrix(n, g_regs, tile_g, tx * pitch)  # running gradient; tile_g holds grad_out until the init sweep

            load_tile(logits, tile_l, bx, tx, num_tokens)
            load_tile(grad_out, tile_g, bx, tx, num_tokens)
            T.sync_threads()  # from here on every thread touches only its own tile rows and hist column
            if plan.logits_in_regs:
                for q in T.unroll(n * n):
                    lg_regs[q] = tile_l[tx * pitch + q]
            for i in T.unroll(n):
                a[i] = T.float32(0)
                b[i] = T.float32(0)

            # Forward recompute, recording the cumulative offsets after every half-step but the last two.
            for t in T.serial(iters):
                col_step(lg, a, b, w, False)
                if iters > 1:
                    record(hist, tx, t, 1, b)
                row_step(lg, a, b, w, False)
                if iters > 1:
                    record(hist, tx, t, 0, a)

            # Backward. a, b now hold a_R, b_R and play a_cur, b_cur: sweep t = R (init + row VJP of step R).
            for j in T.unroll(n):
                cs[j] = T.float32(0)
            sweep(lg, g, p, a, b, a_nxt, b_nxt, cs, cs_nxt, prow, False, True, True)
            # Sweeps t = R-1 .. 1: column VJP of step t+1, then row VJP of step t.
            if iters > 1:
                for k in T.serial(iters - 1):
                    t = iters - 2 - k  # hist slot of a_{t'}, b_{t'} with t' = iters - 1 - k
                    for i in T.unroll(n):
                        a_nxt[i] = a[i]
                        b_nxt[i] = b[i]
                        cs_nxt[i] = cs[i]
                        cs[i] = T.float32(0)
                        a[i] = hist[((t * 2) * n + i) * tpb + tx]
                        b[i] = hist[((t * 2 + 1) * n + i) * tpb + tx]
                    sweep(lg, g, p, a, b, a_nxt, b_nxt, cs, cs_nxt, prow, True, True, False)
            # Last sweep: column VJP of step 1, with a_0 = 0.
            for i in T.unroll(n):
                a_nxt[i] = a[i]
                b_nxt[i] = b[i]
                cs_nxt[i] = cs[i]
                a[i] = T.float32(0)
            sweep(lg, g, p, a, b, a_nxt, b_nxt, cs, cs_nxt, prow, True, False, False)

            if plan.grad_in_regs:
                for i in T.unroll(n):
                    for j in T.unroll(n):
                        tile_g[tx * pitch + i * n + j] = g.buf[g.idx(i, j)]
            T.sync_threads()
            store_tile(tile_g, grad_logits, bx, tx, num_tokens)

    return sinkhorn_bwd


@functools.cache
def sinkhorn_fwd_kernel(n: int, iters: int, eps: float, exp_domain: bool = True):
    """Compiled forward kernel (memoised here and in TileLang's disk cache)."""
    return _common.compile_program(sinkhorn_fwd_program(n, iters, eps, exp_domain), pass_configs=COMPILE_CONFIGS)


@functools.cache
def sinkhorn_bwd_kernel(n: int, iters: int, eps: float):
    """Compiled backward kernel (memoised here and in TileLang's disk cache)."""
    return _common.compile_program(sinkhorn_bwd_program(n, iters, eps), pass_configs=COMPILE_CONFIGS)

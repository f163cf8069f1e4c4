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

Forward, log domain (eps > 0, and the fallback of the factored exp domain below): z itself is kept (registers, or
the thread's shared tile row for n >= 11) and updated in place, as the fp32 reference does. Measured in a CPU
emulation of the generated CUDA (below): max |out - fp64| = 2-4e-7 for N(0, 4) logits; 8e-8 (the same as torch's
fp32 loop) for logits of scale 1e4, 3e6 and 1e30.

Backward (both domains): the exact derivative of the truncated iteration (the paper's choice). A half-step z' = z -
log(sum_d exp(z) + eps) along d has the VJP g <- g - exp(z') * sum_d(g), and out = exp(z) gives g = grad_out * out.
The log-domain recompute keeps z factorised as z[i, j] = L[i, j] + a[i] + b[j] (a column step rewrites b, a row step
a), so with a_t, b_t the offsets after iteration t (a_0 = b_0 = 0), P_t = exp(L + a_t[i] + b_t[j]) (after row step
t) and
Q_t = exp(L + a_{t-1}[i] + b_t[j]) (after column step t)::

    g = grad_out * P_R
    for t = R..1:  g -= P_t * rowsum(g)[i];  g -= Q_t * colsum(g)[j]

Only the logits are read: the forward is recomputed on chip, recording a_t, b_t for t < R (2 * (iters - 1) * n
floats per token, not 2 * iters * n * n; a_R, b_R stay in registers). Q_t = P_t * exp(a_{t-1} - a_t)[i], and that
row factor equals rowsum(Q_t) + eps <= n + eps, so the product cannot overflow and an underflow costs at most
(n + eps) * 2**-149: one exp per row instead of n. The offsets carry an absolute error ~ulp(max |L|), so gradients
are as accurate as the fp32 reference for moderate logits (max |err| 3e-8..1e-7 * max|grad_out| measured) and
degrade to ~1e-4 relative only for |L| ~ 1e4 (where Sinkhorn is saturated and the gradient is ~0 anyway).

Factored exp domain (eps = 0: the default, forward and backward, every n)
-------------------------------------------------------------------------
With K = exp(L - colmax(L)) (entries in [0, 1], every column's largest exactly 1; the shift cancels in the first
column step), the iterates are Q_t = diag(u_{t-1}) K diag(v_t) and P_t = diag(u_t) K diag(v_t) with u_0 = 1::

    v_t = 1 / (K^T u_{t-1})        u_t = 1 / (K v_t)        out = diag(u_R) K diag(v_R)

so a half-step is n dot products of length n (n * n FFMA) and n reciprocals (``__fdividef(1, s)``: MUFU.RCP,
rcp.approx, 1 ulp), and K is never rewritten. The backward works on H = G / K (entrywise): G = grad_out * P_R
becomes H = grad_out * u_R[i] * v_R[j], and the two VJPs of step t become rank-one updates that need no exp::

    H -= (u_t[i] * sum_j K H) v_t[j]          (row step t)
    H -= u_{t-1}[i] (v_t[j] * sum_i K H)      (column step t)

with G = K * H at the end: 4 FFMA per entry and iteration, no MUFU. The recompute records u_t, v_t for t < R
(2 * (iters - 1) * n floats per token, the same history as the log domain's a_t, b_t). The iteration is the fp32
reference's up to rounding; it is not a reformulation of the gradient. The scalings are recomputed from K at every
half-step, so rounding does not accumulate across iterations the way in-place scaling or log-domain offsets do.

Fallback: each normalising sum is tracked in a running minimum (one FMNMX). A token whose sums fall below 2**-64
(e.g. a row whose logits all sit more than ~44 below their columns' maxima), whose final scalings are not finite
(NaN or Inf logits), or whose backward result overflows or is not finite (huge or NaN grad_out), is recomputed in
the log domain from the staged logits: the same code as ``exp_domain=False`` builds, which is bit for bit what
such a token gets (tested in the emulation). Above 2**-64 a term flushed to zero (< 2**-126) changes its sum by
< 2**-62.

Accuracy, measured in the CPU emulation (exact division in place of rcp.approx), 256-512 tokens, 20 iterations, n
in {2, 4, 7, 8, 10, 12, 16}, against float64 (the backward's errors in units of max|grad_out|):

    logits        forward exp / log domain     backward exp / log domain
    N(0, 4)       1.3-2.8e-7 / 1.3-2.3e-7      2.1-4.4e-8 / 2.6-5.3e-8
    N(0, 100)     2.0-3.6e-7 / 2.3-4.2e-7      3.4-4.7e-8 / 4.8-15e-8
    N(0, 1e8)     0.4-21e-6  / 0.1-51e-6       2.0-201e-6 / 1.2-260e-6

At |L| ~ 1e4 the errors come from the problem's conditioning (torch's own fp32 loop: 0.1-51e-6 on the same forward
cases), and some tokens take the fallback.

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

* Forward: with eps = 0 the factored exp-domain iteration (above) on K in place of z (registers while the
  estimate n * n + 3n + 24 fits REG_BUDGET = 168 live values, n <= 10, with a register copy of the logits for the
  fallback; else the thread's tile row, and the fallback reloads the token from global memory), u and v in the two
  offset vectors; eps > 0: the log domain, z (n * n), two delta vectors and a scratch vector per thread, z in the
  tile row for n >= 11. Shared memory = tpb * pitch * 4 B.
* Backward: two staging tiles (logits, grad_out; the latter also carries the result out) plus the history
  ``hist[((t * 2 + v) * n + i) * tpb + tx]`` (token-minor: conflict-free) of u_t, v_t (exp domain) or a_t, b_t (log
  domain): (2 * pitch + 2 * (iters - 1) * n) * 4 B per token. Exp domain (eps = 0): K and H in registers for
  n <= EXP_DOMAIN_REGS_MAX_N = 10, else in the rows of the two tiles (the fallback then reloads logits and grad_out
  from global memory); the recompute with its first and last iterations peeled (the last records nothing), then
  one pass over the rows per step (the pending column VJP of step t + 1 and the row VJP of step t share u_t). Log
  domain (eps > 0, and the fallback): the sweep loop fuses "column VJP of step t+1" and "row VJP of step t" into
  one pass over the rows, so each element of g is read and written once per iteration. P (kept from the previous
  sweep), L and g are placed greedily in registers while 7n + 24 + (matrices in registers) * n * n <= 168;
  otherwise L/g live in the tile rows and Q_t is recomputed with exp (2 * n * n exp per iteration instead of
  n * n + n).
* Shared-memory matrices get a block-scope fence per row/column (see _CSE_NOTE) so that only one row or column is
  live in registers.

Verification without a GPU: the generated CUDA source was compiled for the CPU (tests/emulation: one std::thread
per CUDA thread, run one at a time between barriers; AddressSanitizer) and compared with an fp64 torch
reference/autograd for n = 1..16, iters in {1, 2, 20}, eps in {0, 1e-6, 0.3}, T in {1, tpb - 1, tpb + 3,
2 tpb + 1}: no out-of-bounds access, every output written, max |err| <= 4.2e-7 (forward) and <= 1.3e-7 *
max|grad_out| (backward) with exact libm math. With every ex2/lg2/rcp.approx result moved by its documented
worst-case error (2 ulp, 2**-22, 2 ulp; ``EmulatedKernel(kernel, approx="up" / "down")``, flush-to-zero), 256
tokens of N(0, 4) and N(0, 100) logits, n in {2, 4, 7, 8, 10, 12, 16}, eps = 0: forward max |err| 5.4e-7, backward
7.7e-8 * max|grad_out| (the emulation tests assert 1e-6 and 4e-7 in both directions). This caught a real race
(see _PASS_CONFIGS); deleting either barrier of either kernel is detected (tests/emulation/
test_barrier_mutations.py). It cannot check timing or GPU memory-model subtleties.

Logits spanning 160 or more within a token (exp underflows in fp32; a plain exp-domain Sinkhorn then returns a hard
permutation whose gradient is zero): the row or column sums drop below 2**-64, the token takes the log-domain
fallback, and outputs and gradients stay finite and match the fp64 reference (tested in the emulation at spans 160,
200 and 1000 over N(0, 4) noise, gradients within 4e-7 * max|grad_out| * max(1, span / 50)). The
emulation tests also check that moderate logits take the exp-domain path and that a fallback token is the
log-domain kernels' result bit for bit.

Configurations at iters = 20 (R/S = registers/shared memory; registers from ``ptxas -v --gpu-name sm_90a``
(CUDA 13.0) for eps = 0 / eps = 1e-6; every kernel listed has 0 B stack frame, 0 B spill stores/loads and no
``.local`` in its PTX):

    n   kernel  tpb  shared B  path (eps = 0)              registers
    2   fwd     128     2560   exp (fallback: z in R)      77 / 23   (ptxas unrolls the n = 2 fallback fully)
    2   bwd     128    44032   exp: K, H in R              64 / 40
    4   fwd     128     8704   exp                         72 / 59
    4   bwd     128    95232   exp: K, H in R              83 / 96
    7   fwd     128    25088   exp                        128 / 116
    7   bwd      64    93184   exp: K, H in R             128 / 127
    8   fwd     128    33280   exp                        168 / 154
    8   bwd      32    55552   exp: K, H in R             168 / 168
    10  fwd     128    51712   exp                        254 / 221
    10  bwd      32    74496   exp: K, H in R             255 / 168
    16  fwd      96    98688   exp: K in S                254 / 91
    16  bwd      22    98736   exp: K, H in S             255 / 255

All of n = 1..16 x eps in {0, 1e-6} at iters = 20, and n in {1, 2, 3, 4, 6, 8, 16} x iters in {1, 2, 20} x eps in
{0, 1e-6}, compile with 0 spills and no local memory. The 221-255 register counts (n >= 9 at eps = 0, where K and
H, or K beside the fallback's copy of the logits, fill the registers; n = 12-16 backward at eps > 0) are ptxas'
choice under ``__launch_bounds__(tpb, 1)``; the log-domain ones had 0 spills even under ``.maxnreg 168`` (n = 12,
16 backward at 128). Shared memory never exceeds SMEM_BUDGET_BYTES = 99 KiB per block. Cold compile
(TileLang -> nvcc -> cubin, on 2 cores shared with other jobs): 4-7.5 s for n <= 8, 4-10 s (up to 17 s under
load) for n >= 9; warm: from TileLang's disk cache in ~0.1-0.3 s.

Performance (n = 4, iters = 20, H100 SXM; estimated, NOT measured: no GPU on the build machine)
------------------------------------------------------------------------------------------------
All kernels compile with flush-to-zero (:data:`COMPILE_CONFIGS`). SASS instructions per token, from
``python -m tl_kernels.sinkhorn_sass --n 2 4 6 7 8 10 11 16`` (iters = 20, eps = 0, sm_90a, CUDA 13.0 ptxas; the
iteration loops' bodies as instructions / iterations per pass, ptxas unrolls some by 2 or 3; the normal path
counts the exp-domain loops and, once, the fallback's straight-line code, so it is a slight overestimate;
"issue-bound" is one warp instruction per scheduler per cycle at 1.755 GHz on 132 SMs, a lower bound on time only
when every scheduler has work)::

    n  kernel SASS/token  loop bodies                       regs  smem B  tokens/block  warps/scheduler  issue-bound us
                                                                                        T=4096, 16384    T=4096, 16384
    2  fwd       1435*  99/2                                77    2560  128           0.24, 0.97       0.2, 0.8
    2  bwd       3833   196/8 + 150/1 + 110/2 + 93/1        64   44032  128           0.24, 0.97       0.5, 2.1
    4  fwd       1528   107/2 + 195/1                       72    8704  128           0.24, 0.97       0.2, 0.8
    4  bwd       3614   196/3 + 84/1 + 206/1 + 168/1        83   95232  128           0.24, 0.97       0.5, 2.0
    6  fwd       3623   105/1 + 435/1                      143   18944  128           0.24, 0.97       0.5, 2.0
    6  bwd       8544   124/1 + 172/1 + 450/1 + 450/1      157   77312  64            0.24, 0.97       1.2, 4.7
    7  fwd       3833   136/1 + 591/1                      128   25088  128           0.24, 0.97       0.5, 2.1
    7  bwd       9923   158/1 + 228/1 + 722/1 + 657/1      128   93184  64            0.24, 0.97       1.4, 5.5
    8  fwd       4435   171/1 + 771/1                      168   33280  128           0.24, 0.97       0.6, 2.5
    8  bwd      11857   196/1 + 292/1 + 937/1 + 842/1      168   55552  32            0.24, 0.97       1.6, 6.6
    10 fwd       7223   253/1 + 1203/1                     254   51712  128           0.24, 0.97       1.0, 4.0
    10 bwd      19217   284/1 + 444/1 + 1457/1 + 1434/1    255   74496  32            0.24, 0.75       2.7, 10.6
    11 fwd      13849   569/1 + 1961/1                     167   61952  128           0.24, 0.97       1.9, 7.7
    11 bwd      35550   601/1 + 906/1 + 1756/1 + 1731/1    255   84480  32            0.24, 0.50       4.9, 19.6
    16 fwd      27355   1143/1 + 4131/1                    254   98688  96            0.24, 0.97       3.8, 15.1
    16 bwd      71942   1192/1 + 1876/1 + 3670/1 + 3636/1  255   98736  22            0.35, 0.50       9.9, 39.8

    * ptxas unrolled the n = 2 forward's fallback loop completely; its 20 iterations are counted once.

The loops in order: forward = factored iteration, log-domain fallback (0 trips normally); backward = factored
recompute, sweep on H, then the fallback's log-domain recompute and sweep (0 trips normally). At n = 4 that is 1.5k
forward and 3.6k backward per token, against 6.6k and 11.7k when the latency issue was filed (log domain without
flush-to-zero): 4.3x and 3.2x fewer. An iteration is 53 instructions forward (16 FFMA of dot products and 4 MUFU.RCP
per half-step, plus the FMNMX of the fallback test) and 65 + 84 backward, against 315 and 328 + 240 before. In the
log domain with flush-to-zero the n = 8 backward was 36k per token and n = 16 84k forward, 149k backward; with K
(and H) in the tile rows n >= 11 now costs 2 shared-memory accesses and 1-4 FFMA per entry and half-step instead of
an ex2 and its arithmetic.

Time: at T = 16384 there are 512 warps, about one per scheduler, so the kernels are latency-bound above the
issue-bound floor (0.8 + 2.0 us). The chain of a forward half-step is a dot product (4 dependent FFMA, ~16 cycles)
and a MUFU.RCP (~20 cycles including its dependency), ~40 cycles, so 40 half-steps are ~1600 cycles (0.9 us); the
backward's recompute the same, and its sweep ~50 cycles an iteration (1000 cycles). With ~1 us of staging each way
per kernel, the estimate is ~2-2.5 us forward and ~3-3.5 us backward: ~5-6 us for forward + backward at T = 16384
and ~4-5 us at T = 4096 (the same chains with a quarter of the warps; the floor is latency, not issue). The
latency issue's goal (<= 6 us and <= 4 us) is therefore plausible at T = 16384 and likely missed by ~1 us at
T = 4096. There the time is one warp's chain of 40 dependent half-steps per kernel, not instruction issue: several
threads per token (a row per thread) would add warps but not shorten that chain, because the column sums then need a
shuffle exchange (~25 cycles) per half-step; overlapping the launches (programmatic dependent launch) or fusing the
Sinkhorn into its neighbours (as pre_finalize does for the forward) are the levers left.
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


def _hist_vectors_contiguous(n: int) -> bool:
    """Whether the backward's history keeps each thread's n-vector contiguous (``vector-major``) instead of
    token-minor. Contiguous vectors let nvcc load and store a vector with 64- or 128-bit shared accesses (n = 4: one
    LDS.128 instead of four LDS), and they stay conflict-free when the thread stride, in units of the access width,
    is odd: n odd (32-bit), n = 2 mod 4 (64-bit), n = 4 mod 8 (128-bit). For n = 0 mod 8 a 128-bit access would
    conflict 2- or 4-way, so those keep the token-minor layout (32-bit accesses, 32 consecutive banks per warp)."""
    return n % 8 != 0


def _hist_index(n: int, tpb: int, t, v: int, i: int, tx):
    """Index of entry i of history vector (t, v) (v = 0: u_t or a_t, v = 1: v_t or b_t) of thread tx's token."""
    if _hist_vectors_contiguous(n):
        return ((t * 2 + v) * tpb + tx) * n + i
    return ((t * 2 + v) * n + i) * tpb + tx


def _fence():
    """membar.cta: orders this thread's shared-memory accesses, so ptxas cannot hoist the next row's loads above
    it (see _CSE_NOTE). Nothing is outstanding at that point, so it costs a few cycles."""
    T.evaluate(T.call_extern("void", "__threadfence_block"))


# Factored exp-domain iteration (registers, eps = 0): a normalising sum below this sends the token to the log-domain
# path. Above it, a term flushed to zero (< 2**-126) changes its sum by less than 2**-62 relative.
_EXP_DOMAIN_TINY = 2.0**-64
_FLT_MAX = 3.4028234663852886e38


def _rcp(x):
    """1 / x as ``__fdividef(1, x)``: one MUFU.RCP (rcp.approx.ftz, 1 ulp) under -ftz=true."""
    return T.call_extern("float32", "__fdividef", T.float32(1), x)


def _dot(xs: list, ys: list):
    """sum_k xs[k] * ys[k] as a left fold: nvcc contracts it into one FMUL and n - 1 dependent FFMAs (the n rows or
    columns of a half-step are independent, which is the ILP)."""
    acc = xs[0] * ys[0]
    for x, y in zip(xs[1:], ys[1:], strict=True):
        acc = acc + x * y
    return acc


def _factored_emitters(plan: _Plan):
    """Device code of the factored exp-domain Sinkhorn (eps = 0), shared by the forward and the backward, on _Matrix
    accessors (registers, or the thread's tile row with a fence per row or column, see _CSE_NOTE).

    With K = exp(L - colmax(L)) (every entry in [0, 1], every column's largest exactly 1) the iterate after column
    step t is Q_t = diag(u_{t-1}) K diag(v_t) and after row step t P_t = diag(u_t) K diag(v_t), u_0 = 1, with
    v_t = 1 / (K^T u_{t-1}) and u_t = 1 / (K v_t) (eps = 0 makes the divisor the plain sum). A half-step is n dot
    products of length n and n reciprocals: n * n FFMA + n MUFU.RCP, and K itself is never rewritten. The smallest
    normalising sum is tracked (one FMNMX per sum); the caller's ``factored_ok`` test then sends a token whose sums
    got tiny, or whose scalings are not finite (NaN/Inf logits), to the log-domain path."""
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch

    @T.macro
    def first_column_step(m, v):
        """m: logits -> K; v <- v_1 = 1 / colsum(K) (colsum >= 1: no test needed)."""
        for j in T.unroll(n):
            if m.regs is None:
                _fence()  # see _CSE_NOTE
            mx = _tree(T.max, [m.buf[m.idx(i, j)] for i in range(n)])
            for i in T.unroll(n):
                m.buf[m.idx(i, j)] = _exp(m.buf[m.idx(i, j)] - mx)
            v[j] = _rcp(_tree(_add, [m.buf[m.idx(i, j)] for i in range(n)]))

    @T.macro
    def scale(m, src, dst, mn, cols):
        """A half-step: dst[k] <- 1 / sum_l m[l, k] src[l] (cols: v from u) or 1 / sum_l m[k, l] src[l] (rows: u
        from v); the running minimum mn[0] takes every sum."""
        for k in T.unroll(n):
            if m.regs is None:
                _fence()  # see _CSE_NOTE
            s = _dot([m.buf[m.idx(l, k) if cols else m.idx(k, l)] for l in range(n)], [src[l] for l in range(n)])
            mn[0] = T.min(mn[0], s)
            dst[k] = _rcp(s)

    @T.macro
    def record_uv(hist, tx, slot, u, v):
        for i in T.unroll(n):
            hist[_hist_index(n, tpb, slot, 0, i, tx)] = u[i]
            hist[_hist_index(n, tpb, slot, 1, i, tx)] = v[i]

    @T.macro
    def iterate_scalings(m, u, v, mn, hist, tx):
        """The whole forward iteration: m: logits -> K, u, v <- u_R, v_R, mn[0] <- the smallest normalising sum.
        With ``hist`` (the backward's recompute) u_t, v_t of every t < R are recorded in slot t - 1, the first and
        last iterations peeled so that the loop records unconditionally."""
        first_column_step(m, v)
        mn[0] = T.float32(_FLT_MAX)
        scale(m, v, u, mn, False)
        if hist is None:
            for _t in T.serial(iters - 1):
                scale(m, u, v, mn, True)
                scale(m, v, u, mn, False)
        elif iters > 1:
            record_uv(hist, tx, 0, u, v)
            for t in T.serial(iters - 2):
                scale(m, u, v, mn, True)
                scale(m, v, u, mn, False)
                record_uv(hist, tx, t + 1, u, v)
            scale(m, u, v, mn, True)
            scale(m, v, u, mn, False)

    @T.macro
    def apply_scalings(m, u, v):
        """m: K -> diag(u) K diag(v)."""
        for i in T.unroll(n):
            if m.regs is None:
                _fence()  # see _CSE_NOTE
            for j in T.unroll(n):
                m.buf[m.idx(i, j)] = m.buf[m.idx(i, j)] * u[i] * v[j]

    @T.macro
    def sweep(kk, hh, u, v, cc, cs, pending):
        """Backward step t on H = G / K (u = u_t, v = v_t), one pass over the rows: first the column VJP of step
        t + 1 (``pending``; cc = v_{t+1} * colsum(K * H) from the previous sweep, and u_t is its row factor too),
        then the row VJP of step t; leaves cc = v_t * colsum(K * H) for the next sweep::

            H -= u_t[i] cc[j];   H -= (u_t[i] sum_j K H) v_t[j];   cs[j] += K H

        4 FFMA per entry, no MUFU."""
        for j in T.unroll(n):
            cs[j] = T.float32(0)
        for i in T.unroll(n):
            if kk.regs is None:
                _fence()  # see _CSE_NOTE
            if pending:
                for j in T.unroll(n):
                    hh.buf[hh.idx(i, j)] = hh.buf[hh.idx(i, j)] - u[i] * cc[j]
            r = u[i] * _dot([kk.buf[kk.idx(i, j)] for j in range(n)], [hh.buf[hh.idx(i, j)] for j in range(n)])
            for j in T.unroll(n):
                hh.buf[hh.idx(i, j)] = hh.buf[hh.idx(i, j)] - r * v[j]
                cs[j] = cs[j] + kk.buf[kk.idx(i, j)] * hh.buf[hh.idx(i, j)]
        for j in T.unroll(n):
            cc[j] = v[j] * cs[j]

    @T.macro
    def reload_row(src, tile, bx, tx, num_tokens):
        """The thread's own token from global memory into its tile row: the fallback of a shared-memory plan, whose
        K (and H) overwrote the staged inputs. Rare, so the uncoalesced loads do not matter."""
        if bx * tpb + tx < num_tokens:
            for i in T.unroll(n):
                _fence()  # see _CSE_NOTE
                for j in T.unroll(n):
                    tile[tx * pitch + i * n + j] = src[bx * tpb + tx, i, j]

    def factored_ok(u, v, mn):
        """True when every sum was >= 2**-64 and the final scalings are finite (NaN fails both comparisons; fminf
        ignores NaN, hence the second test: a NaN anywhere reaches every u and v)."""
        scal = _tree(_add, [u[k] for k in range(n)] + [v[k] for k in range(n)])
        return T.And(mn[0] >= T.float32(_EXP_DOMAIN_TINY), scal <= T.float32(_FLT_MAX))

    return iterate_scalings, apply_scalings, sweep, reload_row, factored_ok


def _uses_exp_domain(plan: _Plan) -> bool:
    """The factored exp domain serves eps = 0 (every n; eps > 0 stays in the log domain)."""
    return plan.eps == 0.0


#: Largest n whose factored exp-domain backward keeps K and H (2 n * n floats) and four n-vectors in registers:
#: ptxas gives n = 8, 9, 10 168, 236, 248 registers with 0 spills (32 tokens per block there). Above it K and H
#: live in the thread's rows of the two staging tiles.
EXP_DOMAIN_REGS_MAX_N = 10


def _forward_iteration(plan: _Plan, exp_domain: bool = True):
    """The forward iteration as one macro ``(lg, a, b, w)`` on the _Matrix lg (registers or the thread's tile row),
    which holds the logits before and ``h_res`` after; a, b, w are n-vectors of scratch.

    Register plans with eps = 0 run the factored exp-domain iteration (module docstring): K = exp(L - colmax)
    replaces the logits in lg, a and b hold the row and column scalings u, v, and every half-step is n dot products
    and n reciprocals (``__fdividef``: rcp.approx, 1 ulp): at n = 4 an iteration is 53 SASS instructions instead of
    195. A normalising sum below 2**-64 or non-finite scalings (underflow, NaN/Inf logits) mark the token, which is
    then recomputed in the log domain from a register copy of its logits, so extreme logits behave exactly as with
    ``exp_domain=False``. Other plans run the log-domain iteration in fold mode and exponentiate at the end."""
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

        @T.macro
        def log_only(lg, a, b, w, src, bx, tx, num_tokens):
            log_domain(lg, a, b, w)

        return log_only
    iterate_scalings, apply_scalings, _, reload_row, factored_ok = _factored_emitters(plan)

    @T.macro
    def iterate(lg, a, b, w, src, bx, tx, num_tokens):
        u, v = a, b  # row and column scalings: P_t = diag(u_t) K diag(v_t); lg: the logits, then K, then h_res
        z0 = T.alloc_local((n * n,), T.float32) if lg.regs is not None else None
        if lg.regs is not None:
            for q in T.unroll(n * n):
                z0[q] = lg.regs[q]
        mn = T.alloc_local((1,), T.float32)
        iterate_scalings(lg, u, v, mn, None, None)
        apply_scalings(lg, u, v)
        # ok as an int first: TVM rewrites not(a >= b and c <= d) as (a < b or d < c), which is false for NaN
        ok = T.alloc_local((1,), T.int32)
        ok[0] = T.if_then_else(factored_ok(u, v, mn), T.int32(1), T.int32(0))
        if ok[0] == 0:  # underflow or NaN/Inf: the log-domain path from the logits
            if lg.regs is not None:
                for q in T.unroll(n * n):
                    lg.regs[q] = z0[q]
            else:
                reload_row(src, lg.tile, bx, tx, num_tokens)
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
        iterate(_Matrix(n, z, None, None), a, b, w, None, None, None, None)

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
            iterate(lg, a, b, w, logits, bx, tx, num_tokens)
            if plan.logits_in_regs:  # h_res into the thread's own tile row (the shared variant has it there already)
                for q in T.unroll(n * n):
                    tile[tx * pitch + q] = lg_regs[q]
            T.sync_threads()
            store_tile(tile, out, bx, tx, num_tokens)

    return sinkhorn_fwd


def sinkhorn_bwd_program(n: int, iters: int, eps: float, exp_domain: bool = True):
    """TileLang program ``kernel(grad_out[T, n, n], logits[T, n, n], grad_logits[T, n, n])``, all fp32.
    ``exp_domain=False`` builds the previous log-domain-only backward, kept for timing comparisons on a GPU."""
    plan = _bwd_plan(n, iters, eps)
    n, iters, tpb, pitch = plan.n, plan.iters, plan.tokens_per_block, plan.pitch
    use_exp = exp_domain and _uses_exp_domain(plan)
    iterate_scalings, _, exp_sweep, reload_row, factored_ok = _factored_emitters(plan)
    load_tile, store_tile, col_step, row_step = _emitters(plan)
    num_tokens = T.dynamic("num_tokens")

    @T.macro
    def record(hist, tx, t, v, vec):
        # Offsets after iteration t + 1 (v = 0: a, v = 1: b), kept for t + 1 < iters only.
        if t < iters - 1:
            for i in T.unroll(n):
                hist[_hist_index(n, tpb, t, v, i, tx)] = vec[i]

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

    @T.macro
    def exp_domain_backward(kk, hh, tile_g, hist, tx, u, v, cc, cs, mn, acc, ok):
        """The factored exp-domain backward (eps = 0). kk holds the logits and becomes K; hh becomes H = G / K (from
        grad_out in tile_g's row) and then the gradient G. Registers (n <= EXP_DOMAIN_REGS_MAX_N): the result goes to
        tile_g's row only when ok; tile rows otherwise (kk, hh = the rows of tile_l, tile_g). ok[0] = 0 sends the
        token to the log-domain path."""
        iterate_scalings(kk, u, v, mn, hist, tx)  # the forward recompute, recording u_t, v_t for t < R
        ok[0] = T.if_then_else(factored_ok(u, v, mn), T.int32(1), T.int32(0))
        if ok[0] != 0:
            # H = G / K with G = grad_out * P_R = grad_out * K * u_R v_R^T.
            for i in T.unroll(n):
                if hh.regs is None:
                    _fence()  # see _CSE_NOTE
                for j in T.unroll(n):
                    hh.buf[hh.idx(i, j)] = tile_g[tx * pitch + i * n + j] * u[i] * v[j]
            exp_sweep(kk, hh, u, v, cc, cs, False)  # step R
            if iters > 1:
                for k in T.serial(iters - 1):  # steps t = R - 1 .. 1: u_t, v_t sit in slot t - 1 = R - 2 - k
                    slot = iters - 2 - k
                    for i in T.unroll(n):
                        u[i] = hist[_hist_index(n, tpb, slot, 0, i, tx)]
                        v[i] = hist[_hist_index(n, tpb, slot, 1, i, tx)]
                    exp_sweep(kk, hh, u, v, cc, cs, True)
            # The column VJP of step 1 (u_0 = 1), then G = K * H; |G| summed to catch an overflow or NaN.
            acc[0] = T.float32(0)
            for i in T.unroll(n):
                if hh.regs is None:
                    _fence()  # see _CSE_NOTE
                for j in T.unroll(n):
                    hh.buf[hh.idx(i, j)] = kk.buf[kk.idx(i, j)] * (hh.buf[hh.idx(i, j)] - cc[j])
                    acc[0] = acc[0] + T.abs(hh.buf[hh.idx(i, j)])
            if acc[0] <= T.float32(_FLT_MAX):
                if hh.regs is not None:
                    for q in T.unroll(n * n):
                        tile_g[tx * pitch + q] = hh.regs[q]
            else:  # an overflow in H (or NaN/Inf in grad_out): the log-domain path decides
                ok[0] = T.int32(0)

    @T.macro
    def log_domain_backward(lg, g, p, lg_regs, tile_l, tile_g, hist, tx, a, b, w, a_nxt, b_nxt, cs, cs_nxt, prow):
        """The log-domain backward (every plan; the fallback of the exp-domain one): result in tile_g's row."""
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
                    a[i] = hist[_hist_index(n, tpb, t, 0, i, tx)]
                    b[i] = hist[_hist_index(n, tpb, t, 1, i, tx)]
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
            ok = T.alloc_local((1,), T.int32)

            load_tile(logits, tile_l, bx, tx, num_tokens)
            load_tile(grad_out, tile_g, bx, tx, num_tokens)
            T.sync_threads()  # from here on every thread touches only its own tile rows and hist column
            ok[0] = T.int32(0)
            if use_exp:
                mn = T.alloc_local((1,), T.float32)
                acc = T.alloc_local((1,), T.float32)
                if n <= EXP_DOMAIN_REGS_MAX_N:
                    k_ = T.alloc_local((n * n,), T.float32)
                    h = T.alloc_local((n * n,), T.float32)
                    for q in T.unroll(n * n):
                        k_[q] = tile_l[tx * pitch + q]
                    kk, hh = _Matrix(n, k_, None, None), _Matrix(n, h, None, None)
                else:  # K and H overwrite the thread's tile rows; the fallback reloads them
                    kk, hh = _Matrix(n, None, tile_l, tx * pitch), _Matrix(n, None, tile_g, tx * pitch)
                exp_domain_backward(kk, hh, tile_g, hist, tx, a, b, a_nxt, cs, mn, acc, ok)
                if n > EXP_DOMAIN_REGS_MAX_N:  # noqa: SIM102 - compile-time test, then the token's run-time one
                    if ok[0] == 0:
                        reload_row(logits, tile_l, bx, tx, num_tokens)
                        reload_row(grad_out, tile_g, bx, tx, num_tokens)
            if ok[0] == 0:
                log_domain_backward(
                    lg, g, p, lg_regs, tile_l, tile_g, hist, tx, a, b, w, a_nxt, b_nxt, cs, cs_nxt, prow
                )
            T.sync_threads()
            store_tile(tile_g, grad_logits, bx, tx, num_tokens)

    return sinkhorn_bwd


@functools.cache
def sinkhorn_fwd_kernel(n: int, iters: int, eps: float, exp_domain: bool = True):
    """Compiled forward kernel (memoised here and in TileLang's disk cache)."""
    return _common.compile_program(sinkhorn_fwd_program(n, iters, eps, exp_domain), pass_configs=COMPILE_CONFIGS)


@functools.cache
def sinkhorn_bwd_kernel(n: int, iters: int, eps: float, exp_domain: bool = True):
    """Compiled backward kernel (memoised here and in TileLang's disk cache)."""
    return _common.compile_program(sinkhorn_bwd_program(n, iters, eps, exp_domain), pass_configs=COMPILE_CONFIGS)

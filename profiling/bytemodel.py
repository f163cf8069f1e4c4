"""The one byte model of the benchmarks (``docs/spec.md`` §10): minimum DRAM traffic per kernel, the floor time
``bytes / bandwidth`` (TransformerEngine calls it t_min) and the analytic floor tables for H100 and H200.

Every input is read once and every output written once; activations count in their dtype, coefficients in fp32;
``phi`` (``n*C x (n*n + 2n)`` fp32, a few MB) stays in L2 and is not counted. ``mode`` is ``"fwd"``, ``"bwd"`` or
``"fwd+bwd"``. Per token (bf16, n=4): post_res fwd 18C + 80 B, bwd 28C + 160 B; pre_mapping fwd 18C and bwd 28C plus
a few hundred bytes of coefficients; Sinkhorn 4n² B in and out.

Nominal HBM bandwidths are the datasheet numbers; what a GPU can actually move is lower. ``ACHIEVABLE`` (0.9) is an
**assumption** for the printed tables only: a benchmark run measures the copy bandwidth of its own GPU and uses that.
"""

from __future__ import annotations

#: Datasheet HBM bandwidth in GB/s (H100 SXM5 HBM3, H200 HBM3e).
NOMINAL_GBPS = {"H100 SXM": 3350.0, "H200": 4800.0}
#: Assumed fraction of the nominal bandwidth a copy achieves (typical, not measured here).
ACHIEVABLE = 0.9
#: The paper's measured end-to-end training overhead of mHC at n=4 (with DualPipe overlap; docs/spec.md §11).
PAPER_OVERHEAD_PCT = 6.7


def _pick(fwd: int, bwd: int, mode: str) -> int:
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def post_res_bytes(T: int, n: int, C: int, esize: int, mode: str) -> int:
    """F_post,res (Eq. 3). fwd reads layer_output and the n streams, h_post and h_res, writes n streams; bwd reads
    the gradient, layer_output and the streams and the coefficients, writes d_layer_output, d_residual and the two
    coefficient gradients."""
    coef = 4 * (n * n + n)
    fwd = T * ((n + 1) * C * esize + coef + n * C * esize)
    bwd = T * ((2 * n + 1) * C * esize + coef + (n + 1) * C * esize + coef)
    return _pick(fwd, bwd, mode)


def sinkhorn_bytes(T: int, n: int, mode: str) -> int:
    """Sinkhorn (Eq. 9), fp32: fwd reads the logits and writes h_res; bwd reads the gradient and the logits.
    ``fwd-log``, ``bwd-log``: the previous log-domain kernels (same bytes), timed beside the defaults."""
    return _pick(T * 8 * n * n, T * 12 * n * n, {"fwd-log": "fwd", "bwd-log": "bwd"}.get(mode, mode))


def pre_mapping_bytes(T: int, n: int, C: int, esize: int, mode: str, splits: int = 1) -> int:
    """The two-read design (``docs/spec.md`` §10): fwd reads x twice (projection, then F_pre) and writes layer_input, plus the
    coefficient outputs and split partials; bwd reads x and g_li twice (the <g_li, x_i> pass, then the d_x/d_phi
    pass) and writes d_x, plus the small per-token vectors. phi stays in L2 and is not counted."""
    m = n * n + 2 * n
    small_fwd = 4 * (2 * n + n * n + m + 1) + 2 * 4 * splits * (m + 1)
    small_bwd = 4 * (3 * n + n * n + 2 * n + m + 1 + 2 * m + 2 * n * n)
    fwd = T * (2 * n * C * esize + C * esize + small_fwd)
    bwd = T * (2 * (n * C + C) * esize + n * C * esize + small_bwd)
    return _pick(fwd, bwd, mode)


def residual_add_bytes(T: int, C: int, esize: int, mode: str) -> int:
    """A plain residual ``x + F(x)``: fwd reads two, writes one (6C per token in bf16); bwd adds the incoming
    gradient into the sublayer's input gradient (reads two, writes one)."""
    one = T * 3 * C * esize
    return _pick(one, one, mode)


def site_bytes(T: int, n: int, C: int, esize: int, mode: str) -> int:
    """One mHC residual site as this package runs it: the fused pre-mapping (which includes the Sinkhorn) and
    F_post,res."""
    return pre_mapping_bytes(T, n, C, esize, mode) + post_res_bytes(T, n, C, esize, mode)


def boundary_bytes(T: int, n: int, C: int, esize: int, mode: str, design: str = "fused") -> int:
    """The fused boundary of issue 18 (``mhc::boundary_*``): site l's F_post,res with site l+1's pre-mapping.

    * fwd: the boundary kernel reads y_l and x_l and writes x_{l+1}, accumulating the next projection from the
      registers ((2n + 1) C), then the finalize reads x_{l+1} and writes layer_input ((n + 1) C): (3n + 2) C, 28C
      a token at n = 4 in bf16 (36C as post_res then pre_mapping);
    * bwd, ``design="fused"`` (the target): one pass for <g_li, x_{l+1}> (reads g_li and x_{l+1}: (n + 1) C),
      then one pass recomputing x_{l+1} in registers, adding the incoming residual gradient and running post_res's
      backward (reads x_l, y_l, g_li, g_{x_{l+1}}; writes d_y, d_x_l: (3n + 3) C): (4n + 4) C, 40C at n = 4, bf16;
    * bwd, ``design="summed"``: the pre-mapping backward (writes d x_{l+1}), then post_res's backward on
      g_{x_{l+1}} + d x_{l+1} summed in registers (reads both, y_l, x_l; writes d_y, d_x_l: (4n + 2) C): 64C.

    Plus the coefficients: those of :func:`post_res_bytes` and :func:`pre_mapping_bytes`."""
    m = n * n + 2 * n
    coef_post = 4 * (n * n + n)
    small_fwd = 4 * (2 * n + n * n + m + 1)
    small_bwd = 4 * (3 * n + n * n + 2 * n + m + 1 + 2 * m + 2 * n * n)
    fwd = T * ((3 * n + 2) * C * esize + coef_post + small_fwd)
    if design == "fused":
        bwd = T * ((4 * n + 4) * C * esize + 2 * coef_post + small_bwd)
    elif design == "summed":
        bwd = pre_mapping_bytes(T, n, C, esize, "bwd") + T * ((4 * n + 2) * C * esize + 2 * coef_post)
    else:
        raise ValueError(f"boundary_bytes: design must be 'fused' or 'summed', got {design!r}")
    return _pick(fwd, bwd, mode)


def boundary_dh_partial_bytes(T: int, n: int, groups: int) -> int:
    """The d_h partials of the shipped fused backward, which :func:`boundary_bytes`'s design leaves out: ``groups``
    rows of ``n * n + n`` fp32 (d_h_res | d_h_post) per token, written by ``boundary_bwd_fused`` and read back by
    ``boundary_reduce_bwd``. ``groups`` is the fused kernel's channel blocks over its thread block cluster size
    (``tl_kernels.boundary_bwd.fused_plan(n, C, dtype).groups``: C / 64 / 8 at n = 4, C = 7168, 14 rows, 2240 bytes
    a token; per channel block, without the cluster, 112 rows, 17920 bytes); the sum over a cluster's blocks goes
    through distributed shared memory, not DRAM."""
    return 2 * groups * T * (n * n + n) * 4


def chain_site_bytes(T: int, n: int, C: int, esize: int, mode: str) -> int:
    """One site of a chain of fused sites (``mhc.MHCStack``): one fused boundary per site (its F_post,res and the
    next site's pre-mapping), the target design."""
    return boundary_bytes(T, n, C, esize, mode, "fused")


def block_extra_bytes(T: int, n: int, C: int, esize: int, mode: str = "fwd+bwd") -> int:
    """Bytes a Transformer block (two sites: attention and FFN) moves with mHC beyond a plain residual."""
    return 2 * (site_bytes(T, n, C, esize, mode) - residual_add_bytes(T, C, esize, mode))


def residual_grad_bytes(T: int, n: int, C: int, esize: int, mode: str) -> int:
    """The d_x pass of the pre-mapping backward (``pre_proj_bwd``) and the sum with the residual gradient that
    post_res produced: ``separate`` = the kernel (x, g_li in; d_x out: (n + 1) C + n C) then autograd's add (two
    [T, n, C] reads, one write); ``accumulate`` = the kernel reading the given gradient itself (one extra n C read)."""
    kernel = T * ((n + 1) * C + n * C) * esize
    add = T * 3 * n * C * esize
    return {"separate": kernel + add, "accumulate": kernel + T * n * C * esize}[mode]


def op_bytes(op: str, mode: str, T: int, n: int, C: int, esize: int) -> int:
    """Dispatch by the benchmark's op name (``post_res``, ``sinkhorn``, ``pre_mapping``, ``pre_proj_bwd``)."""
    if op == "pre_proj_bwd":
        return residual_grad_bytes(T, n, C, esize, mode)
    if op == "post_res":
        return post_res_bytes(T, n, C, esize, mode)
    if op == "sinkhorn":
        return sinkhorn_bytes(T, n, mode)
    if op == "pre_mapping":
        return pre_mapping_bytes(T, n, C, esize, mode)
    raise ValueError(f"byte model: unknown op {op!r}")


def floor_us(nbytes: float, gbps: float) -> float:
    """The floor time ``bytes / bandwidth`` in microseconds (t_min)."""
    return nbytes / (gbps * 1e9) * 1e6


# ---------------------------------------------------------------------------------------------------- tables

TABLE_HIDDEN = (1280, 1920, 2560, 4096, 7168)
TABLE_TOKENS = (4096, 16384, 65536)
TABLE_COLUMNS = (
    ("pre fwd", "pre_mapping", "fwd"),
    ("post fwd", "post_res", "fwd"),
    ("pre bwd", "pre_mapping", "bwd"),
    ("post bwd", "post_res", "bwd"),
    ("sinkhorn fwd+bwd", "sinkhorn", "fwd+bwd"),
)


def floor_rows(gbps: float, n: int = 4, esize: int = 2, hidden=TABLE_HIDDEN, tokens=TABLE_TOKENS) -> list[dict]:
    """One row per (C, T): floor µs per kernel at ``gbps``, the site's fwd+bwd and the plain residual's."""
    rows = []
    for C in hidden:
        for T in tokens:
            row = {"C": C, "T": T}
            for label, op, mode in TABLE_COLUMNS:
                row[label] = floor_us(op_bytes(op, mode, T, n, C, esize), gbps)
            row["site fwd+bwd"] = floor_us(site_bytes(T, n, C, esize, "fwd+bwd"), gbps)
            row["plain add fwd+bwd"] = floor_us(residual_add_bytes(T, C, esize, "fwd+bwd"), gbps)
            rows.append(row)
    return rows


def floor_markdown(n: int = 4, esize: int = 2, achievable: float = ACHIEVABLE) -> str:
    """The analytic floor tables (µs) for H100 SXM and H200 at ``achievable`` x nominal bandwidth."""
    lines = [
        f"Analytic floor times in µs (byte model of docs/spec.md §10, n={n}, {8 * esize}-bit activations): bytes / bandwidth, "
        f"at {achievable:.0%} of nominal HBM bandwidth. The {achievable:.0%} is an ASSUMPTION (a typical copy "
        "efficiency), not a measurement; a GPU run measures its own copy bandwidth and uses that instead.",
    ]
    labels = [c[0] for c in TABLE_COLUMNS] + ["site fwd+bwd", "plain add fwd+bwd"]
    for gpu, nominal in NOMINAL_GBPS.items():
        gbps = nominal * achievable
        lines += [
            "",
            f"**{gpu}**: nominal {nominal / 1000:.2f} TB/s, assumed achievable {gbps / 1000:.2f} TB/s",
            "",
            "| C | T | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for row in floor_rows(gbps, n, esize):
            cells = " | ".join(f"{row[k]:.1f}" for k in labels)
            lines.append(f"| {row['C']} | {row['T']} | {cells} |")
    return "\n".join(lines) + "\n"

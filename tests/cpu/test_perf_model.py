"""The performance model (profiling/model) on cases whose answer is known by hand, and its record format.

No GPU: kernels are compiled for the pinned target (sm_90a) through TileLang's cache and read as SASS; the launches
of a site are found on fake tensors. The probe kernels (profiling/model/probes.py) take ~15 s each to compile cold.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("tilelang")

import profiling.model as model  # noqa: E402
from profiling import bytemodel  # noqa: E402
from profiling.model import bounds, capture, cexpr, cli, counts, gpus, probes, sass, sites, source  # noqa: E402

H100 = gpus.gpu("H100")
ROWS = 1 << 14


def _model(kernel, rows=ROWS, gpu=H100):
    return bounds.launch_model(probes.launch(kernel, rows), gpu)


# ------------------------------------------------------------------------------------------------ pieces


def test_c_expressions_follow_c_semantics():
    env = {"a": -7, "b": 2, "n": 5}.__getitem__
    assert int(cexpr.compile_expr("a / b")(env)) == -3  # truncation toward zero, not floor
    assert int(cexpr.compile_expr("a % b")(env)) == -1
    assert int(cexpr.compile_expr("((0 <= n) && (n < 4)) ? 10 : min(n, 3)")(env)) == 3
    assert int(cexpr.compile_expr("(((int)n) >> 1) + (int64_t)2")(env)) == 4
    with pytest.raises(cexpr.Unknown):
        cexpr.compile_expr("x[0] < 1.5f")(env)


def test_source_scopes_and_shared_accesses():
    src = """extern "C" __global__ void __launch_bounds__(64, 1) k(float* __restrict__ y, int num_tokens) {
  extern __shared__ __align__(1024) float buf[];
  int t = (((int)blockIdx.x) * 64);
  for (int i = 0; i < min(num_tokens, 8); ++i) {
    if (t < num_tokens) {
      buf[((((int)threadIdx.x) * 2) + i)] = 0x0p+0f;
    } else {
      y[i] = buf[(int)threadIdx.x];
    }
  }
}
"""
    ks = source.parse(src)
    assert (ks.name, ks.threads) == ("k", 64)
    chain = [s.kind for s in ks.line_scope[6].chain()]
    assert chain == ["root", "for", "if"]
    assert [s.kind for s in ks.line_scope[8].chain()] == ["root", "for", "else"]
    (write,) = ks.shared[6]
    assert write.write and write.index.endswith("+ i)") and write.element_bytes == 4
    assert not ks.shared[8][0].write


def test_occupancy_by_hand():
    occ = bounds.occupancy(H100, threads=128, registers=94, smem_bytes=12288)
    # 94 registers -> 3072 per warp (units of 256) -> 12288 per 4-warp block -> 5 blocks in 65536
    assert (occ["blocks_per_sm"], occ["limited_by"]) == (5, "registers")
    occ = bounds.occupancy(H100, threads=128, registers=32, smem_bytes=100 * 1024)
    assert (occ["blocks_per_sm"], occ["limited_by"]) == (2, "shared_memory")  # 228 KB / (100 KB + 1 KB)
    occ = bounds.occupancy(H100, threads=1024, registers=16, smem_bytes=0)
    assert (occ["blocks_per_sm"], occ["limited_by"]) == (2, "threads")


@pytest.mark.parametrize(
    ("index", "ctype", "sass_width", "wavefronts"),
    [
        ("((int)threadIdx.x)", "float", 4, 1),  # 32 consecutive words
        ("(((int)threadIdx.x) * 2)", "float", 4, 2),  # even words: 2 per bank
        ("((((int)threadIdx.x) & 3) + ((((int)threadIdx.x) >> 2) * 64))", "bfloat16_t", 2, 8),  # pre_proj's tile
        ("(((int)threadIdx.x) * 4)", "float", 16, 4),  # 16 bytes a lane: 4 phases of 8 lanes, conflict-free
        ("(((int)threadIdx.x) * 8)", "float", 16, 8),  # 32-byte stride: 2 words per bank in each phase
        ("0", "float", 4, 1),  # broadcast
    ],
)
def test_shared_wavefronts_by_hand(index, ctype, sass_width, wavefronts):
    src = (
        'extern "C" __global__ void __launch_bounds__(32, 1) k(float* __restrict__ y) {\n'
        "  extern __shared__ __align__(1024) uchar buf_dyn_shmem[];\n"
        "  void* s = ((void*)((char*)buf_dyn_shmem + 0));\n"
        f"  y[0] = (float)(({ctype}*)s)[{index}];\n"
        "}\n"
    )
    (access,) = source.parse(src).shared[4]
    info = counts.KernelInfo("k", source.parse(src), [], [], [], [], 32, 0, 0)
    assert counts._access_wavefronts(info, access, {}, {}, 32, sass_width) == wavefronts


# ------------------------------------------------------------------------------------------ known by hand


def test_copy_kernel_predicts_copy_bandwidth():
    """A plain copy moves exactly its bytes and nothing else: about 100% of copy bandwidth (DRAM-bound)."""
    m = _model(probes.copy_kernel(), rows=1 << 17)
    assert m.bytes == 2 * (1 << 17) * probes.COLS * 2
    assert m.t_dram_us == pytest.approx(m.bytes / H100.copy_gbps / 1e3)
    assert max(m.t_issue_us, m.t_smem_us, m.t_latency_us) < m.t_dram_us
    assert 0.97 <= m.t_dram_us / m.t_pred_us <= 1.0


def test_planted_8way_bank_conflict_predicts_8x_shared_time():
    free, conflict = _model(probes.smem_kernel(1)), _model(probes.smem_kernel(8))
    assert not free.detail["bank_conflicts"]
    assert [c["wavefronts"] for c in conflict.detail["bank_conflicts"]] == [8.0]
    # every warp fills the buffer with two 16-byte stores per thread (4 wavefronts each), then reads one word per
    # lane and iteration: 1 wavefront, or 8 with the conflict
    warps = ROWS * 256 // 32
    fill = 2 * 4
    assert free.detail["smem_wavefronts"] == pytest.approx(warps * (probes.ITERS + fill), rel=0.01)
    assert conflict.detail["smem_wavefronts"] == pytest.approx(warps * (8 * probes.ITERS + fill), rel=0.01)
    assert conflict.t_smem_us / free.t_smem_us == pytest.approx(
        (8 * probes.ITERS + fill) / (probes.ITERS + fill), rel=0.01
    )
    assert conflict.t_pred_us / free.t_pred_us > 4.0  # shared-memory bound: the conflict is the slowdown


def test_division_in_loop_predicts_its_slowdown():
    plain, div = _model(probes.div_kernel(False)), _model(probes.div_kernel(True))
    warps = ROWS * 256 // 32
    assert plain.detail["division_sequences"] == 0
    assert div.detail["division_sequences"] == warps * probes.ITERS  # one 64-bit division per iteration and warp
    assert div.detail["int64_instructions"] > plain.detail["int64_instructions"]
    assert div.t_issue_us / plain.t_issue_us > 3.0
    assert div.t_pred_us / plain.t_pred_us > 2.0


def _ins(*texts, loop_back_to=None):
    """Instructions at addresses 0x10, 0x20, ...; ``loop_back_to`` turns the last one into a backward branch."""
    out = []
    for k, t in enumerate(texts):
        op = t.split()[1] if t.startswith("@") else t.split()[0]
        out.append(sass.Instruction(0x10 * (k + 1), t, None, op, sass.classify(op)))
    if loop_back_to is not None:
        out[-1].branch_to = 0x10 * (loop_back_to + 1)
    return out


def test_sass_operands_by_hand():
    assert bounds._dests_sources("IADD3 R4, P1, R39, UR4, RZ") == (["R4", "P1"], ["R39", "UR4"])
    assert bounds._dests_sources("@!P0 LDG.E.64 R4, desc[UR4][R6.64+0x10]") == (["R4", "R5"], ["P0", "UR4", "R6", "R7"])
    assert bounds._dests_sources("STS.128 [R2+0x10], R8") == ([], ["R2", "R8", "R9", "R10", "R11"])
    assert bounds._dests_sources("FFMA.FTZ R1, -R2.reuse, R3, RZ") == (["R1"], ["R2", "R3"])
    assert bounds._dests_sources("ISETP.GE.AND P0, PT, R7, UR6, PT") == (["P0"], ["R7", "UR6"])


def test_warp_cycles_by_hand():
    """The lone-warp scoreboard on chains whose cycle counts are known by hand (H100 parameters: FP32 latency 4,
    MUFU latency 18 and 8 cycles per warp instruction on a quarter-SM's 4 MUFU lanes, DRAM latency 0.7 us)."""
    g = H100
    chain = _ins(*["FFMA R1, R1, R2, R3"] * 4)
    assert bounds.warp_cycles(chain, [1] * 4, g) == 1 + 3 * g.dependent_cpi  # 13: each waits for the previous
    independent = _ins("FFMA R1, R5, R2, R3", "FFMA R6, R5, R2, R3", "FFMA R7, R5, R2, R3", "FFMA R8, R5, R2, R3")
    assert bounds.warp_cycles(independent, [1] * 4, g) == 4  # one per cycle: the old model charged 4 x 4 = 16
    rcp = _ins("MUFU.RCP R1, R5", "MUFU.RCP R2, R6", "MUFU.RCP R3, R7", "MUFU.RCP R4, R8")
    assert bounds.warp_cycles(rcp, [1] * 4, g) == 1 + 3 * 8  # the MUFU pipe, not the dependences
    use = _ins("MUFU.RCP R1, R5", "FMUL R2, R1, R1")
    assert bounds.warp_cycles(use, [1, 1], g) == 1 + g.mufu_latency_cycles
    load = _ins("LDG.E R4, desc[UR4][R6.64]", "FADD R5, R4, R4")
    assert bounds.warp_cycles(load, [1, 1], g) == 1 + g.dram_latency_us * 1e-6 * g.clock_hz
    # a loop-carried chain: per pass the FFMA waits 4 cycles after the previous pass's (the branch fills one)
    loop = _ins("FFMA R1, R1, R2, R3", "@P0 BRA `(.L_x_0)", loop_back_to=0)
    assert bounds.warp_cycles(loop, [10, 10], g) == 10 * g.dependent_cpi
    # an instruction no warp executes does not count and does not delay the others
    assert bounds.warp_cycles(_ins("MUFU.RCP R1, R5", "FMUL R2, R1, R1"), [0, 1], g) == 1


# ------------------------------------------------------------------------------------------ records


FIELDS = {
    "kernel": str, "n": int, "C": int, "dtype": str, "T": int, "gpu": str, "bytes": int, "launches": int,
    "t_dram_us": float, "t_issue_us": float, "t_smem_us": float, "t_latency_us": float, "t_pred_us": float,
    "pct_copy_bw": float, "parts": list,
}  # fmt: skip


@pytest.fixture(scope="module")
def site_records():
    out = {}
    for gpu in ("H100", "H200"):
        for kernel in ("post_res_fwd", "pre_mapping_fwd", "sinkhorn_fwd", "site_fwd"):
            out[kernel, gpu] = model.predict(kernel, 4, 2560, "bfloat16", 16384, gpu, site="single")
    return out


def test_record_schema(site_records):
    for (kernel, gpu), r in site_records.items():
        for key, kind in FIELDS.items():
            assert isinstance(r[key], kind), (kernel, key, r[key])
        assert (r["kernel"], r["gpu"], r["n"], r["C"], r["T"]) == (kernel, gpu, 4, 2560, 16384)
        assert r["t_pred_us"] >= max(r["t_dram_us"], r["t_issue_us"], r["t_smem_us"], r["t_latency_us"]) * 0.999
        copy = gpus.GPUS[gpu].copy_gbps
        floor = r.get("bytes_floor", r["bytes"])  # site records: bytes = their launches' traffic, floor apart
        assert r["pct_copy_bw"] == pytest.approx(100 * floor / (copy * 1e3) / r["t_pred_us"])
        assert r["launches"] == len(r["parts"]) >= 1
        for part in r["parts"]:
            if not part.get("torch_glue"):
                assert part["registers"] > 0 and part["occupancy"]["blocks_per_sm"] >= 1
                assert part["warp_instructions_total"] > 0
        json.dumps(r)  # JSON-ready
    # a site's forward is its pre-mapping and post_res forwards, launch by launch
    for gpu in ("H100", "H200"):
        site, pre, post = (site_records[k, gpu] for k in ("site_fwd", "pre_mapping_fwd", "post_res_fwd"))
        assert site["launches"] == pre["launches"] + post["launches"]
        assert math.isclose(site["t_pred_us"], pre["t_pred_us"] + post["t_pred_us"], rel_tol=1e-9)


def test_h200_faster_for_dram_bound_kernels(site_records):
    h100, h200 = site_records["post_res_fwd", "H100"], site_records["post_res_fwd", "H200"]
    assert h100["t_dram_us"] >= max(h100["t_issue_us"], h100["t_smem_us"], h100["t_latency_us"])  # DRAM-bound
    assert h200["t_pred_us"] < h100["t_pred_us"]
    assert h100["t_dram_us"] / h200["t_dram_us"] == pytest.approx(gpus.GPUS["H200"].copy_gbps / H100.copy_gbps)


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "model.json"
    assert cli.main(["--kernel", "post_res_bwd", "--C", "2560", "--gpu", "H100", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert [(r["kernel"], r["gpu"]) for r in records] == [("post_res_bwd", "H100")]
    assert "post_res_bwd" in capsys.readouterr().out


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="kernel must be one of"):
        bounds.predict("post_res", 4, 2560, "bfloat16", 16, "H100")
    with pytest.raises(ValueError, match="gpu must be one of"):
        bounds.predict("post_res_fwd", 4, 2560, "bfloat16", 16, "A100")
    with pytest.raises(ValueError, match="dtype must be one of"):
        bounds.predict("post_res_fwd", 4, 2560, "int8", 16, "H100")


def test_beside_puts_a_gpu_runs_measurement_next_to_the_prediction(tmp_path):
    """The calibration path: a GPU run's bench.json (here synthetic) against the model at the run's bandwidth."""
    meta = {"device": "NVIDIA H100 80GB HBM3", "copy_GBps": 2800.0, "dtype": "bfloat16"}
    records = [
        {"op": "post_res", "mode": "fwd", "n": 4, "C": 2560, "T": 16384, "us": 300.0, "kernel_us": 290.0},
        {"op": "pre_proj_bwd", "mode": "accumulate", "n": 4, "C": 2560, "T": 16384, "us": 1.0},  # not modelled
    ]
    path = tmp_path / "bench.json"
    chain = {"sublayer": "identity", "variant": "fused", "mode": "decode", "n": 4, "C": 2560, "T": 8, "sites": 12}
    path.write_text(json.dumps({"meta": meta, "records": records, "chain": [{**chain, "us": 700.0}]}))
    row, chain_row = cli.beside(str(path))
    decode = sites.predict_site("site_fwd", 4, 2560, "bfloat16", 8, "H100", copy_gbps=2800.0)
    assert chain_row["kernel"] == "chain_identity_decode_fused"
    assert chain_row["t_pred_us"] == pytest.approx(12 * decode["t_site_eager_us"])
    assert chain_row["measured_over_pred"] == pytest.approx(700.0 / chain_row["t_pred_us"])
    assert (row["kernel"], row["gpu"], row["copy_gbps"]) == ("post_res_fwd", "H100", 2800.0)
    assert row["t_dram_us"] == pytest.approx(row["parts"][0]["bytes"] / 2800.0 / 1e3)
    assert row["measured_over_pred"] == pytest.approx(290.0 / row["t_pred_us"])
    path.write_text(json.dumps({"meta": {**meta, "device": "NVIDIA A100"}, "records": records}))
    with pytest.raises(ValueError, match="H100 or H200"):
        cli.beside(str(path))


def test_bench_hook_annotates_rows_on_an_h100(monkeypatch):
    """What a GPU run stores beside its measurements (profiling.bench calls model.annotate after writing)."""
    import torch

    import profiling.model as model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv(model.MODEL_ENV, raising=False)
    rows = [
        {"op": "post_res", "mode": "bwd", "n": 4, "C": 2560, "T": 16384},
        {"op": "post_res", "mode": "bwd", "n": 4, "C": 2560, "T": 512},  # not the target token count: skipped
        {"op": "pre_proj_bwd", "mode": "accumulate", "n": 4, "C": 2560, "T": 16384},  # not a model kernel
    ]
    result = {"meta": {"dtype": "bfloat16", "copy_GBps": 2900.0, "n": 4}, "records": rows}
    assert model.annotate(result)
    expected = bounds.predict("post_res_bwd", 4, 2560, "bfloat16", 16384, "H100", copy_gbps=2900.0)["t_pred_us"]
    assert [r["model_us"] for r in rows] == [pytest.approx(expected), None, None]
    monkeypatch.setenv(model.MODEL_ENV, "0")
    assert not model.annotate(result) and rows[0]["model_us"] is None


# ------------------------------------------------------------------------------------------ chains of sites

TARGET_C = 7168
TOKENS = 16384
COEF_SLACK = 1024  # bytes a token beyond the C terms: coefficients, split partials, phi read once per launch


@pytest.fixture(scope="module")
def chain():
    import torch

    return capture.chain_ops(4, TARGET_C, torch.bfloat16, 64)


def _names(ops, phase):
    return [op.name for op in ops if op.phase == phase]


def test_chain_attribution(chain):
    """The captured stack runs MHCStack's default recompute_block; the record's site sits inside a block, so its
    unit (its post_res and the next site's pre-mapping) is one fused boundary in the forward, in the replay and in
    the backward, and autograd sums no residual gradient there."""
    import mhc

    assert chain.recompute_block == mhc.optimal_block(4, capture.CHAIN_SITES) >= 3
    (block,) = [b for b in chain.blocks if chain.site in b]
    assert block[0] < chain.site < block[-1]  # fused on both sides
    unit = chain.unit_ops()
    assert _names(unit, "fwd") == ["mhc::boundary_fwd"]
    assert _names(unit, "recompute") == ["mhc::boundary_fwd"]
    assert [n for n in _names(unit, "bwd") if n.startswith("mhc::")] == ["mhc::boundary_bwd"]
    assert "aten::add" not in _names(unit, "bwd")
    fwd_op, rec_op = (next(o for o in unit if o.phase == p) for p in ("fwd", "recompute"))
    assert any(a is fwd_op.args[4] for a in rec_op.args)  # the replay of the same boundary: the next site's phi
    # every op is attributed; every unit inside a block is the same steady state; a block's last site is not fused
    assert all(op.unit is not None for op in chain.ops)
    for b in chain.blocks:
        for k in b[:-1]:
            assert _names(chain.unit_ops(k), "fwd") == ["mhc::boundary_fwd"], k
        if b[-1] != capture.CHAIN_SITES - 1:
            assert _names(chain.unit_ops(b[-1]), "fwd") == ["mhc::post_res_fwd", "mhc::pre_mapping_fwd"]
    # every unit's backward is its forward's ops backwards (the backward order pins the attribution)
    for k in range(-1, capture.CHAIN_SITES):
        ops = chain.unit_ops(k)
        backwards = [n.replace("_fwd", "_bwd") for n in reversed(_names(ops, "fwd"))]
        assert [n for n in _names(ops, "bwd") if n.startswith("mhc::")] == backwards, k
    # the replay runs every forward op once more, each in its own unit
    fwd = sorted((op.unit, op.name) for op in chain.ops if op.phase == "fwd")
    assert sorted((op.unit, op.name) for op in chain.ops if op.phase == "recompute") == fwd


def test_expand_replays_the_fused_backward_through_its_cuda_code(chain):
    """mhc::boundary_bwd expands through its CUDA implementation into the fully fused backward's four launches in
    order; the first two are the pre-mapping backward's own first two (pre_finalize_bwd, sinkhorn_bwd)."""
    (op,) = [o for o in chain.unit_ops() if o.name == "mhc::boundary_bwd"]
    names = [e.kernel.prim_func.attrs["global_symbol"] for e in capture.expand(op, 132)]
    pre = [e.kernel.prim_func.attrs["global_symbol"] for e in capture.expand(_pre_mapping_bwd_op(chain), 132)]
    assert names == ["pre_finalize_bwd", "sinkhorn_bwd", "boundary_bwd_fused", "boundary_reduce_bwd"], names
    assert names[:2] == pre[:2], pre


def _pre_mapping_bwd_op(chain):
    return next(o for o in chain.ops if o.name == "mhc::pre_mapping_bwd")


@pytest.fixture(scope="module")
def chain_records():
    return {
        (k, s): model.predict(k, 4, TARGET_C, "bfloat16", TOKENS, "H100", site=s)
        for k in ("site_fwd", "site_bwd")
        for s in sites.SITE_KINDS
    }


SITE_FIELDS = {
    **FIELDS, "site": str, "bytes_floor": int, "bytes_per_token": float, "bytes_recompute": int,
    "launches_recompute": int, "t_recompute_us": float, "t_pred_with_recompute_us": float, "t_site_eager_us": float,
    "t_site_graph_us": float, "t_site_graph_pdl_us": float, "pdl_launches": int, "parts_recompute": list,
}  # fmt: skip


def test_site_record_fields(chain_records):
    for (kernel, site), r in chain_records.items():
        for key, kind in SITE_FIELDS.items():
            assert isinstance(r[key], kind), (kernel, site, key, r[key])
        assert (r["kernel"], r["site"], r["C"], r["T"]) == (kernel, site, TARGET_C, TOKENS)
        assert r["bytes"] == sum(p["bytes"] for p in r["parts"]) and r["launches"] == len(r["parts"])
        assert r["bytes_recompute"] == sum(p["bytes"] for p in r["parts_recompute"])
        assert r["launches_recompute"] == len(r["parts_recompute"])
        assert r["t_pred_us"] == pytest.approx(sum(p["t_pred_us"] for p in r["parts"]))
        assert r["t_pred_with_recompute_us"] == pytest.approx(r["t_pred_us"] + r["t_recompute_us"])
        assert r["t_pred_includes_recompute"] is False
        assert r["pct_copy_bw"] == pytest.approx(100 * r["bytes_floor"] / (H100.copy_gbps * 1e3) / r["t_pred_us"])
        json.dumps(r)


def test_chain_site_bytes_against_the_byte_model(chain_records):
    """Bytes a token of the captured launches against profiling/bytemodel.py at n = 4, C = 7168, bf16: the chain's
    forward is the fused boundary (28C), a single site's is post_res + pre-mapping (36C); the chain's backward is
    one of the boundary's two designs (64C summed today, 40C fused), without autograd's residual-gradient add
    (24C) that the single site pays; the replay re-runs exactly the forward's launches."""
    C, e = TARGET_C, 2
    fwd, bwd = chain_records["site_fwd", "chain"], chain_records["site_bwd", "chain"]
    sfwd, sbwd = chain_records["site_fwd", "single"], chain_records["site_bwd", "single"]
    floor_fwd = bytemodel.boundary_bytes(1, 4, C, e, "fwd")
    assert floor_fwd // C == 28 and floor_fwd % C < COEF_SLACK
    assert 0 <= fwd["bytes_per_token"] - floor_fwd < COEF_SLACK  # issue 18: <= 28C plus coefficients
    assert fwd["bytes_floor"] == bytemodel.boundary_bytes(TOKENS, 4, C, e, "fwd")
    single_floor = bytemodel.post_res_bytes(1, 4, C, e, "fwd") + bytemodel.pre_mapping_bytes(1, 4, C, e, "fwd")
    assert 0 <= sfwd["bytes_per_token"] - single_floor < COEF_SLACK  # 36C
    assert (sfwd["bytes_per_token"] - fwd["bytes_per_token"]) == pytest.approx(8 * C, abs=COEF_SLACK)
    designs = {d: bytemodel.boundary_bytes(1, 4, C, e, "bwd", d) for d in ("fused", "summed")}
    assert {d: v // C for d, v in designs.items()} == {"fused": 40, "summed": 64}
    # The shipped fused backward moves the 40C design plus its partials, which the design leaves out: the d_h
    # partials (one row of n * n + n floats per channel block and token, or per thread block cluster of channel
    # blocks with the opt-in clusters, written by the fused kernel and read by its reduction:
    # bytemodel.boundary_dh_partial_bytes) and the d_phi partials (S x K x m floats, written and read: per token,
    # amortised over T). "chain" is the runtime's default (no clusters), "chain_clusters" the opt-in.
    from tl_kernels import boundary_bwd as tl_boundary_bwd

    splits = tl_boundary_bwd.fused_choose_splits(TOKENS, 4, C, "bfloat16", gpus.gpu("H100").sms)
    cbwd = chain_records["site_bwd", "chain_clusters"]
    assert (bwd["boundary_clusters"], cbwd["boundary_clusters"]) == (False, True)
    for record, clusters, groups in ((bwd, False, C // 64), (cbwd, True, C // 64 // 8)):
        plan = tl_boundary_bwd.fused_plan(4, C, "bfloat16", clusters)
        assert plan.groups == groups  # 112 channel blocks; with clusters, 14 clusters of 8
        dh_partials = bytemodel.boundary_dh_partial_bytes(1, 4, plan.groups)
        dphi_partials = 2 * splits * 4 * C * plan.m * 4 / TOKENS
        extra = record["bytes_per_token"] - designs["fused"] - dh_partials
        assert 0 <= extra < COEF_SLACK + dphi_partials, (clusters, record["bytes_per_token"] / C, extra)
        assert record["bytes_floor"] == bytemodel.chain_site_bytes(TOKENS, 4, C, e, "bwd")
        assert record["launches"] == bwd["launches"]
    # the clusters save the d_h partials of all but one channel block in eight, and nothing else
    saved = bytemodel.boundary_dh_partial_bytes(1, 4, C // 64) - bytemodel.boundary_dh_partial_bytes(1, 4, C // 512)
    assert bwd["bytes_per_token"] - cbwd["bytes_per_token"] == pytest.approx(saved)
    # the forward is the same with and without the backward's clusters
    cfwd = chain_records["site_fwd", "chain_clusters"]
    assert [p["name"] for p in cfwd["parts"]] == [p["name"] for p in fwd["parts"]] and cfwd["bytes"] == fwd["bytes"]
    assert not any(p["name"] == "aten::add" for p in bwd["parts"])
    assert [p["name"] for p in sbwd["parts"]].count("aten::add") == 1  # the residual-gradient sum, 3 x n C
    # the replay: the forward's launches again
    assert (bwd["bytes_recompute"], bwd["launches_recompute"]) == (fwd["bytes"], fwd["launches"])
    assert (sbwd["bytes_recompute"], sbwd["launches_recompute"]) == (sfwd["bytes"], sfwd["launches"])
    assert fwd["launches"] == 2

    # the chain with the boundary kernels off (the benchmark's unfused row) runs a single site's kernels
    # (apart from zero fills of absent gradients: autograd fills the single site's three, the composed boundary
    # backward fills its one for the unused h_pre')
    def work(record):
        kept = [p for p in record["parts"] if not p["name"].startswith("aten::zeros")]
        return sorted(p["name"] for p in kept), sum(p["bytes"] for p in kept)

    for mode in ("fwd", "bwd"):
        assert work(chain_records[f"site_{mode}", "chain_unfused"]) == work(chain_records[f"site_{mode}", "single"])


def test_boundary_byte_model_by_hand():
    """(3n + 2) C forward, (4n + 4) C fused and pre-mapping bwd + (4n + 2) C summed backward, elements a token."""

    def c_term(n, e, mode, design="fused"):
        one = bytemodel.boundary_bytes(1, n, 1000, e, mode, design)
        return (bytemodel.boundary_bytes(1, n, 2000, e, mode, design) - one) / 1000

    for n, e in ((4, 2), (2, 4), (8, 2)):
        assert c_term(n, e, "fwd") == (3 * n + 2) * e
        assert c_term(n, e, "bwd") == (4 * n + 4) * e
        assert c_term(n, e, "bwd", "summed") == (2 * (n + 1) + n) * e + (4 * n + 2) * e
    with pytest.raises(ValueError, match="design must be"):
        bytemodel.boundary_bytes(1, 4, 64, 2, "bwd", "both")


# ------------------------------------------------------------------------------------------ decode latency


def test_launch_sequence_latency_by_hand():
    """Three dependent launches of 1.0, 3.0 (waits through PDL) and 0.2 µs of work, host 2.5 µs a launch, 1.0 µs
    between kernels in a graph, 0.3 µs with PDL."""
    parts = [{"t_exec_us": 1.0, "pdl": False}, {"t_exec_us": 3.0, "pdl": True}, {"t_exec_us": 0.2, "pdl": False}]
    lat = sites.sequence_latency(parts, gpus.LaunchOverhead(host_us=2.5, graph_gap_us=1.0, pdl_gap_us=0.3))
    assert lat["eager"] == pytest.approx(2.5 + 4.0 + 2.5)  # host-bound, GPU-bound, host-bound
    assert lat["graph"] == pytest.approx(2.0 + 4.0 + 1.2)
    assert lat["graph_pdl"] == pytest.approx(2.0 + 3.3 + 1.2)
    assert gpus.LAUNCH.host_us == gpus.GPU.launch_us  # eager agrees with the bounds' launch floor
    assert gpus.LAUNCH.pdl_gap_us < gpus.LAUNCH.graph_gap_us < gpus.LAUNCH.host_us


def test_pdl_is_read_from_the_kernel_source(monkeypatch):
    from tl_kernels.tools import codegen

    monkeypatch.setattr(codegen, "cuda_source", lambda k: k)
    assert sites.uses_pdl(capture.Launch("x; cudaGridDependencySynchronize();", ()))
    assert not sites.uses_pdl(capture.Launch("x;", ()))
    assert not sites.uses_pdl(capture.Glue("aten::zeros", 4))


def test_decode_records(tmp_path, capsys):
    """python -m profiling model --decode: site_fwd at T in {1, 8, 64}, every site kind, with the latency of the
    launch sequence; each latency is the sum over its launches by the formulas above."""
    path = tmp_path / "decode.json"
    assert cli.main(["--decode", "--C", str(TARGET_C), "--gpu", "H100", "--json", str(path)]) == 0
    recs = json.loads(path.read_text())
    want = sorted((T, s) for T in (1, 8, 64) for s in sites.DECODE_SITE_KINDS)
    assert sorted({(r["T"], r["site"]) for r in recs}) == want
    gap, pdl, host = gpus.LAUNCH.graph_gap_us, gpus.LAUNCH.pdl_gap_us, gpus.LAUNCH.host_us
    for r in recs:
        for p in r["parts"]:
            assert p["t_exec_us"] == max(p["t_dram_us"], p["t_issue_us"], p["t_smem_us"], p["t_latency_us"])
        execs = [p["t_exec_us"] for p in r["parts"]]
        waits = [p["pdl"] for p in r["parts"]]
        assert r["t_site_graph_us"] == pytest.approx(sum(execs) + gap * len(execs))
        assert r["t_site_graph_pdl_us"] == pytest.approx(
            sum(x + (pdl if w else gap) for x, w in zip(execs, waits, strict=True))
        )
        assert r["t_site_eager_us"] == pytest.approx(sum(max(x + gap, host) for x in execs))
        assert r["t_site_eager_us"] >= host * r["launches"]
    assert "graph+PDL" in capsys.readouterr().out


def test_distributed_shared_memory_loads_are_not_dram():
    """A generic ``LD.E`` whose address has the shared-memory window (``S2R SR_SWINHI``) as its high word, as ptxas
    compiles ``ld.shared::cluster``, is a peer block's shared memory: the scoreboard gives it the SM-to-SM latency,
    not DRAM's; a generic load through an ordinary pointer, or one whose high word was overwritten, stays global."""
    from profiling.model import bounds, sass

    lines = [
        "S2R R91, SR_SWINHI",
        "PRMT R16, RZ, 0x654, R15",
        "MOV R17, R91",
        "IMAD.MOV.U32 R35, RZ, RZ, R91",
        "LD.E R18, [R16]",  # window high word: a peer's shared memory
        "LD.E R19, [R34+0x10]",  # R35 is the window too
        "LD.E R20, [R40]",  # an ordinary generic pointer
        "IADD3 R17, R17, 0x1, RZ",  # the high word overwritten
        "LD.E R21, [R16]",
        "LDG.E R22, [R16]",
    ]
    ins = [sass.Instruction(16 * i, t, None, t.split()[0], sass.classify(t.split()[0])) for i, t in enumerate(lines)]
    sass.mark_dsmem(ins)
    assert [x.dsmem for x in ins] == [False] * 4 + [True, True, False, False, False, False]
    g = gpus.gpu("H100")
    latency = [bounds._latency_cycles(x, g) for x in ins if x.opcode.startswith(("LD.", "LDG."))]
    dram = g.dram_latency_us * 1e-6 * g.clock_hz
    assert latency == [g.dsmem_latency_cycles] * 2 + [dram] * 3
    assert g.smem_latency_cycles < g.dsmem_latency_cycles < dram

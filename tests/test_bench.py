"""The benchmark suite runs at a tiny size (``--quick``) and writes its JSON with the expected keys.

No timing is asserted anywhere: the machines are shared, so the figures of a test run mean
nothing. What is asserted is that each suite runs end to end, that its result has the keys
the docs and tools read, that the bare reference step does the same math as the
framework's step (same first-step loss), and that the transfer codec is exact where it
must be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fopro_kd.compression import compress_state, decompress_state, pack_for_numpy, state_nbytes, unpack_from_numpy
from simulations import bench

TARGET_KEYS = {"name", "measured", "target", "met", "note"}


def run_bench(tmp_path: Path, suite: str, *extra: str) -> dict:
    out = tmp_path / f"{suite}.json"
    argv = [suite, "--quick", "--json", str(out), "--work-dir", str(tmp_path / "work"), *extra]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == suite and result["quick"] is True
    assert {"env", "wall_s", "targets"} <= set(result)
    assert {"device", "torch", "loadavg_start", "loadavg_end"} <= set(result["env"])
    for t in result["targets"]:
        assert TARGET_KEYS <= set(t)
    return result


def federation_problem() -> str | None:
    from simulations.bench_sim import _check_federation

    return _check_federation()


# --------------------------------------------------------------------------- fast suites


@pytest.mark.timeout(300)
@pytest.mark.benchmark  # minutes on 2 cores: run with `pytest -m benchmark tests/test_bench.py`
def test_step_suite_quick(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "step")
    methods = {r["method"] for r in result["steps"]}
    assert methods == {"bsm", "ekd", "fopro-kd(fixed prompt)", "fopro-kd", "fopro-kd+akd(minmax)"}
    for row in result["steps"]:
        assert {"size", "batch", "framework_img_s", "reference_img_s", "framework_vs_reference"} <= set(row)
        assert row["framework_img_s"] > 0 and row["reference_img_s"] > 0
        # the reference does the same math: identical weights and batch give the same first-step loss
        assert row["first_step_loss_abs_diff"] < 1e-3, row
    assert {r["ratio"] for r in result["ratios"]} >= {"EKD / BSM", "FoPro-KD+AKD / EKD (AKD: minmax)"}
    assert {c["teacher"] for c in result["feature_cache"]} == {"resnet50", "mobilenetv2_100"}
    for c in result["feature_cache"]:
        assert {"recomputed_steps_s", "cached_steps_s", "speedup", "cache_build_s"} <= set(c)
    schedule = result["prompt_schedule"]
    assert schedule["prompt_every"] == 2 and schedule["scheduled_vs_ekd"] > 0 and schedule["every_batch_vs_ekd"] > 0
    assert any(t["name"].startswith("FPG cost with akd.prompt_every=2") for t in result["targets"])
    names = " ".join(t["name"] for t in result["targets"])
    assert "bare reference" in names and "FPG cost" in names and "feature cache" in names


@pytest.mark.timeout(300)
@pytest.mark.benchmark  # minutes on 2 cores: run with `pytest -m benchmark tests/test_bench.py`
def test_data_suite_quick(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "data")
    if result.get("skipped"):
        assert "HAM10000" in result["skipped"] and result["rows"] == []
        return
    (row,) = result["rows"]
    assert {"size", "pipeline_img_s", "loader_only_img_s", "step_img_s", "pipeline_vs_step", "first_load_s",
            "cached_load_s"} <= set(row)
    assert row["pipeline_img_s"] > 0 and row["step_img_s"] > 0


def test_data_suite_skips_without_ham10000(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "data", "--ham-root", str(tmp_path / "nowhere"))
    assert "not found" in result["skipped"]
    assert result["targets"][0]["met"] is None


@pytest.mark.timeout(300)
@pytest.mark.benchmark  # minutes on 2 cores: run with `pytest -m benchmark tests/test_bench.py`
def test_comm_suite_quick(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "comm")
    rows = {r["dtype"]: r for r in result["rows"]}
    assert set(rows) == {"float32", "float16", "bfloat16"}
    for row in rows.values():
        assert row["integer_buffers_exact"] is True
        assert {"record_bytes", "bytes_per_client_round", "balanced_accuracy", "same_prediction_share"} <= set(row)
    assert rows["float32"]["vs_float32"] == 1.0
    assert 0.45 < rows["float16"]["vs_float32"] < 0.55 and 0.45 < rows["bfloat16"]["vs_float32"] < 0.55
    assert "ONE compress->decompress round trip" in result["what"]


@pytest.mark.timeout(300)
@pytest.mark.benchmark  # minutes on 2 cores: run with `pytest -m benchmark tests/test_bench.py`
def test_two_stage_suite_quick(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "two_stage")
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {"bsm", "fopro-kd two-stage (cached)", "ekd (online)", "fopro-kd joint (online)"}
    assert all(r["images_s"] > 0 and r["vs_bsm"] > 0 for r in result["rows"])
    assert result["cache_build_s_per_image_view"] > 0
    assert result["targets"][0]["name"].startswith("two-stage FoPro-KD distillation epoch / BSM epoch")
    builds = result["teacher_numerics"]
    assert [r["pass"] for r in builds["rows"]] == ["no-grad", "input-grad"]
    assert all(r[f"{name}_images_s"] > 0 for r in builds["rows"] for name in ("contiguous", "channels_last", "folded"))
    assert builds["folded_batchnorms"]  # the benchmark's MobileNetV2 has conv -> BatchNorm pairs to fold
    assert max(builds["max_abs_feature_diff"].values()) < 1e-3  # the same function in every build


# --------------------------------------------------------------------------- slow suites (Ray)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.benchmark  # minutes on 2 cores: run with `pytest -m benchmark tests/test_bench.py`
def test_simulation_suite_quick(tmp_path: Path) -> None:
    problem = federation_problem()
    if problem:
        pytest.skip(problem)
    result = run_bench(tmp_path, "simulation")
    assert result["process"]["rc"] == 0
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["round_s_median"] > 0 and 0.0 <= result["outside_training_share_median"] <= 1.0
    assert result["process"]["peak_tree_pss_mb"] > 0
    assert "median_s" in result["client_overhead"] and result["client_overhead"]["client_state_file_mb"] > 0


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.benchmark  # minutes on 2 cores: run with `pytest -m benchmark tests/test_bench.py`
def test_scaling_suite_quick(tmp_path: Path) -> None:
    problem = federation_problem()
    if problem:
        pytest.skip(problem)
    result = run_bench(tmp_path, "scaling", "--hospitals", "2", "3")
    assert [r["hospitals"] for r in result["rows"]] == [2, 3]
    for row in result["rows"]:
        assert row["peak_tree_pss_mb"] > 0 and row["round_s_median"] > 0
        assert row["max_processes"] >= 2  # the Ray processes were found under the simulation process
    assert result["targets"][0]["measured"] is not None


# --------------------------------------------------------------------------- the transfer codec


def _state() -> dict[str, torch.Tensor]:
    bn = torch.nn.BatchNorm2d(3)
    bn.num_batches_tracked += 123456789
    state = {f"bn.{k}": v for k, v in bn.state_dict().items()}
    state["w"] = torch.randn(5, 7)
    state["flag"] = torch.tensor([True, False])
    return state


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", torch.float16])
def test_compression_round_trip_keeps_integers_exact(dtype) -> None:
    state = _state()
    small = compress_state(state, dtype)
    assert set(small) == set(state)
    assert small["bn.num_batches_tracked"].dtype == torch.int64 and small["flag"].dtype == torch.bool
    assert state_nbytes({"w": small["w"]}) == state["w"].numel() * 2
    back = decompress_state(unpack_from_numpy(pack_for_numpy(small), state), like=state)
    assert torch.equal(back["bn.num_batches_tracked"], state["bn.num_batches_tracked"])
    assert torch.equal(back["flag"], state["flag"])
    assert back["w"].dtype == torch.float32
    tol = 1e-3 if dtype in ("float16", torch.float16) else 1e-2
    assert torch.allclose(back["w"], state["w"], rtol=tol, atol=tol)


def test_compression_edge_cases() -> None:
    state = {"big": torch.tensor([1e6, 1.0]), "w": torch.ones(2)}
    small = compress_state(state, "float16")
    assert small["big"].dtype == torch.float32  # would overflow fp16: sent uncompressed
    assert small["w"].dtype == torch.float16
    assert compress_state(state, "bfloat16")["big"].dtype == torch.bfloat16
    packed = pack_for_numpy(compress_state(state, "bfloat16"))
    assert packed["w"].dtype == torch.int16 and packed["w"].numpy().dtype.itemsize == 2
    with pytest.raises(ValueError, match="unsupported"):
        compress_state(state, "int8")
    with pytest.raises(KeyError):
        decompress_state(small, like={"w": state["w"]})
    assert decompress_state(small)["w"].dtype == torch.float32

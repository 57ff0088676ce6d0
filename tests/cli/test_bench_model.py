"""benchmarks/bench_model.py at a tiny size, per family: every variant prefills and decodes, the
figures are positive and consistent (tokens/s from the median, eager's speedup 1), and in
float32 tpmoe and grouped_mm decode exactly eager's greedy tokens (the same model behind each)."""
import importlib.util
import io
import os
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_whole_model_bench_tiny(tmp_path, family):
    import json

    import bench_model

    json_path = tmp_path / "model.json"
    out = io.StringIO()
    # Scales that keep every family tiny (Mixtral's I = 14336 is 19x Qwen3's).
    scale = {"qwen3_moe": "0.03125", "mixtral": "0.004", "gpt_oss": "0.0223"}[family]
    rows = bench_model.main(["--family", family, "--scale", scale, "--layers", "1", "--vocab", "256",
                             "--prompt", "5", "--new", "3",
                             "--repeats", "2", "--dtype", "float32", "--json", str(json_path)], out=out)
    assert {(row["variant"], row["phase"]) for row in rows} == {
        (variant, phase) for variant in bench_model.VARIANTS for phase in ("prefill", "decode")}
    for row in rows:
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        expected_tokens = 5 if row["phase"] == "prefill" else 3
        assert row["tokens_per_s"] == pytest.approx(expected_tokens / (row["median_ms"] * 1e-3)), row
        assert 0 < row["moe_share"] < 1, row
        assert row["same_tokens_as_eager"], row
        if row["variant"] == "eager":
            assert row["speedup_vs_eager"] == 1.0
    payload = json.loads(json_path.read_text())
    assert payload["rows"] == json.loads(json.dumps(rows)) and payload["header"].endswith(" UTC")
    assert "tok/s" in out.getvalue() and "vs eager" in out.getvalue()


@pytest.mark.distributed
def test_whole_model_bench_tp2_tiny(tmp_path):
    """benchmarks/bench_model_tp.py at a tiny size: transformers' tp_plan="auto" model and the
    same model taken over by tpmoe.hf.apply both prefill and decode on 2 gloo ranks, and in float32
    decode the same greedy tokens."""
    import bench_model_tp

    rows = bench_model_tp.main(["--scale", "0.0625", "--layers", "1", "--vocab", "256", "--prompt", "5", "--new", "3",
                                "--repeats", "2", "--dtype", "float32", "--json", str(tmp_path / "tp.json")],
                               out=io.StringIO())
    assert {(row["variant"], row["phase"]) for row in rows} == {
        (variant, phase) for variant in bench_model_tp.VARIANTS for phase in ("prefill", "decode")}
    for row in rows:
        assert row["world_size"] == 2 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        assert row["same_tokens_as_hf_tp"] and 0 < row["moe_share"] < 1, row

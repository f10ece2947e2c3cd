"""`streamvlm-train bench` on a random Qwen2.5-VL checkpoint of the shape asked for (tiny here, 1 repeat)."""

from __future__ import annotations

import json

import pytest

from streamvlm.train.bench import bench_checkpoint
from streamvlm.train.cli import main


def test_bench_measures_a_qwen2_5_vl_step_on_a_random_checkpoint_made_once_in_the_cache(workdir, capsys):
    assert main(["bench", "--family", "qwen2_5_vl", "--layers", "2", "--hidden", "64", "--frames", "4",
                 "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["family"], result["layers"], result["hidden"], result["repeats"]) == ("qwen2_5_vl", 2, 64, 1)
    assert result["tokens"] > 2 * 256  # 4 frames are 2 pairs of 16 x 16 tokens, then the text
    assert result["forward_flops_fraction"] < 1
    assert result["routed_saved_bytes"] < result["dense_saved_bytes"]  # routing keeps fewer activations
    checkpoint = workdir / "cache" / "bench-train-qwen2_5_vl-2x64"
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    made = (checkpoint / "config.json").stat().st_mtime_ns
    assert bench_checkpoint("qwen2_5_vl", 2, 64) == checkpoint
    assert (checkpoint / "config.json").stat().st_mtime_ns == made  # reused, not written again


def test_bench_refuses_a_shape_with_a_model_and_a_width_the_family_cannot_split(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--model", str(workdir), "--layers", "3"])
    assert exit_.value.code == 2 and "--model names one" in capsys.readouterr().err
    assert main(["bench", "--family", "qwen2_5_vl", "--hidden", "60"]) == 2
    assert "a multiple of 8" in capsys.readouterr().err
    assert not list(workdir.glob("cache/*x60"))  # refused before anything is written

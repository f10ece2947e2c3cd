"""The configs under train/configs: every one parses, each family has a tiny CPU config that is tiny_cpu.yaml
with its family, and each tiny config trains."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from streamvlm.train.cli import main
from streamvlm.train.module import TINY_FAMILIES, export_router

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
TINY = {"llava_onevision": CONFIGS / "tiny_cpu.yaml",
        **{family: CONFIGS / f"tiny_{family}_cpu.yaml" for family in TINY_FAMILIES if family != "llava_onevision"}}


def _printed(capsys, *args: str) -> dict:
    """The configuration `streamvlm-train fit ... --print_config` prints: parsed, nothing instantiated."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err
    return yaml.safe_load(out)


def test_every_family_has_a_tiny_config_and_every_config_is_known():
    assert all(path.is_file() for path in TINY.values())
    gpu = {CONFIGS / "llava_ov_7b_gpu.yaml", CONFIGS / "qwen2_5_vl_7b_gpu.yaml"}
    world = {CONFIGS / f"world_{name}.yaml" for name in ("model", "router", "joint", "skip", "yopo")}
    assert set(CONFIGS.glob("*.yaml")) == set(TINY.values()) | gpu | world  # a new config gets a test here


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses(config, capsys):
    printed = _printed(capsys, "--config", str(CONFIGS / config))
    assert printed["trainer"]["default_root_dir"].startswith("runs/")
    assert printed["model"]["routing"] and printed["model"]["trainable"]


@pytest.mark.parametrize("family", [f for f in TINY if f != "llava_onevision"])
def test_a_family_config_is_tiny_cpu_with_its_family_and_root(family, capsys):
    base = _printed(capsys, "--config", str(TINY["llava_onevision"]))
    printed = _printed(capsys, "--config", str(TINY[family]))
    assert printed["model"].pop("tiny") == family and base["model"].pop("tiny") is True
    assert printed["trainer"].pop("default_root_dir") == f"runs/tiny_{family}_cpu"
    base["trainer"].pop("default_root_dir")
    assert printed == base  # everything else, loggers, callbacks and data included, is tiny_cpu.yaml's
    # a value given after the config still wins
    assert _printed(capsys, "--config", str(TINY[family]), "--model.lr", "0.5")["model"]["lr"] == 0.5


def test_world_yopo_is_world_skip_under_yopo_with_its_own_root(capsys):
    """The fine-tuned yopo rows and the fine-tuned skip rows differ in the policy trained under, nothing else."""
    skip = _printed(capsys, "--config", str(CONFIGS / "world_skip.yaml"))
    yopo = _printed(capsys, "--config", str(CONFIGS / "world_yopo.yaml"))
    assert (skip["model"].pop("routing"), yopo["model"].pop("routing")) == ("skip:block", "yopo:5:all:0.5")
    assert (skip["trainer"].pop("default_root_dir"), yopo["trainer"].pop("default_root_dir")) == (
        "runs/world_skip", "runs/world_yopo")
    assert yopo == skip


def test_the_qwen_gpu_config_is_lora_bf16_ddp_with_the_processors_frames(capsys):
    printed = _printed(capsys, "--config", str(CONFIGS / "qwen2_5_vl_7b_gpu.yaml"))
    trainer, model, data = printed["trainer"], printed["model"], printed["data"]
    assert (trainer["accelerator"], trainer["strategy"], trainer["precision"]) == ("gpu", "ddp", "bf16-mixed")
    assert model["trainable"] == "router+lora" and model["model_dir"] is None
    assert data["num_frames"] is None and data["fps"] is None  # FrameSampling.from_checkpoint decides


@pytest.mark.parametrize("family", list(TINY))
def test_each_tiny_config_trains_a_router_that_exports(family, workdir, capsys):
    """Each tiny config's fit, cut to 2 steps of 2 clips of 4 frames and a validation pass."""
    root = workdir / family
    assert main(["fit", "--config", str(TINY[family]), "--trainer.default_root_dir", str(root),
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--data.synthetic", '{"num_videos": 4, "val_videos": 2, "seed": 0}', "--data.batch_size", "2",
                 "--data.num_frames", "4", "--data.feature_cache", str(workdir / "features")]) == 0
    with open(root / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows if r["train/loss"]] == ["0", "1"]
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert len(val) == 1 and math.isfinite(val[0])
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert Path(ckpt["streamvlm"]["model_dir"]).name == ("train-tiny" if family == "llava_onevision"
                                                           else f"train-tiny-{family}")
    assert (export_router(root / "checkpoints" / "last.ckpt", root / "router") / "routing.json").is_file()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_checkpoint_from_init_tiny_trains_exports_and_answers(family, workdir, capsys):
    """The user's path: `streamvlm init-tiny --family F DIR`, `streamvlm-train fit --model.model_dir DIR`,
    `streamvlm-train export`, `streamvlm ask --model DIR --routing ROUTER`."""
    from streamvlm.cli import main as streamvlm

    model_dir, root = workdir / f"init-{family}", workdir / f"fit-{family}"
    assert streamvlm(["init-tiny", str(model_dir), "--family", family]) == 0
    assert main(["fit", "--config", str(TINY["llava_onevision"]), "--model.tiny", "false",
                 "--model.model_dir", str(model_dir), "--trainer.default_root_dir", str(root),
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--data.synthetic", '{"num_videos": 4, "val_videos": 2, "seed": 0}', "--data.batch_size", "2",
                 "--data.num_frames", "4", "--data.feature_cache", "null"]) == 0
    router = root / "router"
    assert main(["export", str(root / "checkpoints" / "last.ckpt"), str(router)]) == 0
    capsys.readouterr()
    assert streamvlm(["ask", "--model", str(model_dir), "--routing", str(router), "-q", "What is moving?",
                      "--max-new-tokens", "2", "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    answer, stats = events[0], events[-1]
    assert answer["type"] == "answer" and answer["stop_reason"] == "max_new_tokens"
    assert stats["type"] == "stats" and stats["flops"]["llm"] < stats["flops"]["llm_dense"]  # the router routes

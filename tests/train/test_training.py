"""Router training with Lightning: the loss falls, resume is exact, DDP runs, export loads in the runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.routers import build_router
from streamvlm.train.data import VideoDataModule
from streamvlm.train.module import RouterTrainingModule, export_router

ROUTING = "mod:0.25:all:1"


def _data(workdir, module, num_videos=12, val_videos=4, batch_size=4):
    dm = VideoDataModule(synthetic={"num_videos": num_videos, "val_videos": val_videos, "seed": 0,
                                    "out_dir": str(workdir / "synthetic")}, batch_size=batch_size, num_frames=8)
    dm.set_preprocess_config(module.vlm.adapter.preprocess_config)
    return dm


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(workdir, max_epochs, ckpt_dir=None, ckpt_path=None, **kwargs):
    L.seed_everything(0)
    module = RouterTrainingModule(tiny=True, routing=ROUTING, **kwargs)
    record = _Losses()
    callbacks = [record]
    if ckpt_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0))
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, callbacks=callbacks,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, _data(workdir, module), ckpt_path=ckpt_path)
    return module, record.losses


def _val_distill(module, dm) -> float:
    dm.setup("fit")
    with torch.no_grad():
        values = [float(module.losses(s)["distill"]) for batch in dm.val_dataloader() for s in batch]
    return sum(values) / len(values)


def test_resume_from_last_gives_the_same_losses(workdir):
    _, straight = _fit(workdir, max_epochs=4, agree_weight=1.0)
    ckpt = workdir / "ckpt_resume"
    _, first = _fit(workdir, max_epochs=2, ckpt_dir=ckpt, agree_weight=1.0)
    _, rest = _fit(workdir, max_epochs=4, ckpt_dir=ckpt, ckpt_path=str(ckpt / "last.ckpt"), agree_weight=1.0)
    assert len(straight) == 12 and len(first) == 6 and len(rest) == 6
    assert first + rest == pytest.approx(straight, abs=1e-7)
    # The checkpoint holds only what trains, plus what export needs.
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["state_dict"] and all(k.startswith("router.") for k in state["state_dict"])
    assert state["streamvlm"]["routing"]["keep_ratio"] == 0.25


def test_export_loads_in_the_runtime_with_the_trained_weights(workdir):
    module, _ = _fit(workdir, max_epochs=1, ckpt_dir=workdir / "ckpt_export", agree_weight=1.0)
    out = export_router(workdir / "ckpt_export" / "last.ckpt", workdir / "router")
    model_dir = module.hparams.model_dir
    trained = StreamVLM.from_pretrained(model_dir, routing=str(out))
    for key, value in module.router.state_dict().items():
        assert torch.equal(trained.router.state_dict()[key], value)
    untrained = StreamVLM.from_pretrained(model_dir, routing=ROUTING)
    frames = torch.randint(0, 256, (3, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kept = []
    for vlm in (trained, untrained):
        session = vlm.session()
        session.append_frames(frames)
        kept.append(session.cache.positions(2).tolist())
    assert len(kept[0]) == len(kept[1]) and kept[0] != kept[1]  # same budget, different tokens

    from streamvlm.train.cli import main

    assert main(["export", str(workdir / "ckpt_export" / "last.ckpt"), str(workdir / "router2")]) == 0
    assert (workdir / "router2" / "router.safetensors").is_file()
    assert main(["export", str(workdir / "nope.ckpt"), str(workdir / "router3")]) == 2
    # a router-only run trained no model weights: export-model refuses it
    assert main(["export-model", str(workdir / "ckpt_export" / "last.ckpt"), str(workdir / "model")]) == 2
    assert not (workdir / "model").exists()


def test_trainable_modes(workdir):
    lora = RouterTrainingModule(tiny=True, routing=ROUTING, trainable="router+lora", lora_rank=2)
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in names) and any(n.startswith("router.") for n in names)
    assert all("lora_" in n or n.startswith("router.") for n in names)
    dm = _data(workdir, lora)
    dm.prepare_data()
    dm.setup("fit")
    sample = next(iter(dm.train_dataloader()))[0]
    with torch.no_grad():  # LoRA's B starts at zero: give it weight so the student differs from the teacher
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out = lora.losses(sample)
    out["loss"].backward()
    assert out["distill"] > 0  # the teacher runs without the adapters
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n and p.requires_grad)

    everything = RouterTrainingModule(tiny=True, routing=ROUTING, trainable="all")
    trainable = {n for n, p in everything.named_parameters() if p.requires_grad}
    assert any("language_model" in n for n in trainable) and not any("vision_tower" in n for n in trainable)


def test_bad_settings_give_clear_errors():
    from streamvlm import StreamVLMError

    with pytest.raises(StreamVLMError, match="model_dir"):
        RouterTrainingModule()
    with pytest.raises(StreamVLMError, match="no weights of its own to train; .*router\\+lora or all"):
        RouterTrainingModule(tiny=True, routing="dense")
    with pytest.raises(StreamVLMError, match="no weights of its own"):
        RouterTrainingModule(tiny=True, routing="skip:block")
    with pytest.raises(StreamVLMError, match="MoD router's scorers"):
        RouterTrainingModule(tiny=True, routing="skip:block", trainable="all", rank_weight=1.0)
    with pytest.raises(StreamVLMError, match="model.tiny: choose a family"):
        RouterTrainingModule(tiny="llama")
    with pytest.raises(StreamVLMError, match="trainable"):
        RouterTrainingModule(tiny=True, trainable="some")


def test_ddp_two_processes_on_cpu_write_one_checkpoint(workdir, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 1,
                    "default_root_dir": str(tmp_path), "enable_progress_bar": False, "logger": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True,
                                                 "save_top_k": 0}}]},
        "model": {"tiny": True, "routing": ROUTING},
        "data": {"synthetic": {"num_videos": 8, "val_videos": 2, "seed": 0, "out_dir": str(workdir / "synthetic_ddp")},
                 "num_frames": 4, "batch_size": 2},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    out = subprocess.run([sys.executable, "-m", "streamvlm.train", "fit", "--config", str(path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    assert "distributed_backend=gloo" in out.stderr and "All distributed processes registered" in out.stderr
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2  # 8 videos / (2 ranks x batch 2)


def test_cli_help_lists_the_settings():
    out = subprocess.run([sys.executable, "-m", "streamvlm.train", "fit", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0
    for flag in ("--model.routing", "--model.trainable", "--data.train_file", "--data.feature_cache"):
        assert flag in out.stdout


def _random_scorers(module) -> None:
    """Start from a random ranking: the default zero init ranks every token alike, already a consistent choice."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 8)


def _quiet_fit(module, dm, max_epochs: int, **trainer_args) -> None:
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    L.Trainer(max_epochs=max_epochs, **(settings | trainer_args)).fit(module, dm)


def test_distillation_falls_and_the_trained_router_beats_a_random_one(workdir):
    L.seed_everything(0)
    module = RouterTrainingModule(tiny=True, routing=ROUTING, lr=0.03, agree_weight=1.0)
    _random_scorers(module)
    dm = _data(workdir, module)
    dm.prepare_data()
    dm.setup("fit")

    def mean_distill(loader) -> float:
        with torch.no_grad():
            values = [float(module.losses(s)["distill"]) for batch in loader for s in batch]
        return sum(values) / len(values)

    before = mean_distill(dm.train_dataloader())
    _quiet_fit(module, dm, 8)
    after = mean_distill(dm.train_dataloader())
    assert after < before

    # Held-out videos: the trained router against random choices of the same budget at every layer.
    trained_val = mean_distill(dm.val_dataloader())
    parts = module.vlm.adapter.decoder
    random_router = build_router(module.router.config.__class__.parse("random:0.25:all:1"), parts.num_layers,
                                 parts.hidden_size)
    module.student.router = random_router
    random_val = mean_distill(dm.val_dataloader())
    assert trained_val < random_val


def test_the_ranking_loss_teaches_every_scorer_the_dense_attention(workdir):
    # rank_weight alone (no distillation): each routed layer's scores should come to rank a frame's tokens
    # as the dense model's attention from the text does, on held-out videos too.
    L.seed_everything(0)
    module = RouterTrainingModule(tiny=True, routing=ROUTING, lr=0.01, distill_weight=0.0, rank_weight=1.0)
    _random_scorers(module)
    dm = _data(workdir, module)
    dm.prepare_data()
    dm.setup("fit")

    def mean_rank(loader) -> float:
        module.train()  # the router records its scores in training mode only
        with torch.no_grad():
            values = [float(module.losses(s)["rank"]) for batch in loader for s in batch]
        return sum(values) / len(values)

    before_train, before_val = mean_rank(dm.train_dataloader()), mean_rank(dm.val_dataloader())
    _quiet_fit(module, dm, 4)
    assert mean_rank(dm.train_dataloader()) < before_train
    assert mean_rank(dm.val_dataloader()) < before_val / 2


def test_the_feature_cache_never_serves_features_of_another_vision_tower(workdir):
    # Retraining the world model and then its router on the same cache folder used to reuse the old
    # tower's features: the key named the video and the preprocessing, not the encoder.
    cache = workdir / "features"

    def fit_one_step(module) -> VideoDataModule:
        dm = VideoDataModule(synthetic={"num_videos": 4, "val_videos": 0, "seed": 0,
                                        "out_dir": str(workdir / "synthetic")},
                             batch_size=2, num_frames=4, feature_cache=str(cache))
        dm.set_preprocess_config(module.vlm.adapter.preprocess_config)
        _quiet_fit(module, dm, 1, limit_train_batches=1)
        return dm

    first = RouterTrainingModule(tiny=True, routing=ROUTING)
    fit_one_step(first)
    written = set(cache.glob("*.pt"))
    assert len(written) == 2

    second = RouterTrainingModule(tiny=True, routing=ROUTING)
    with torch.no_grad():  # another tower: every frame encodes differently
        next(p for n, p in second.model.named_parameters() if "vision_tower" in n).add_(0.1)
    assert second.encoder_fingerprint() != first.encoder_fingerprint()
    dm = fit_one_step(second)
    assert len(set(cache.glob("*.pt")) - written) == 2  # its own features, not the first tower's

    dataset = dm._dataset("train", dm.train_records)
    record = next(r for r in dm.train_records if dataset.feature_path(r) not in map(str, written))
    fresh = VideoDataModule(synthetic={"num_videos": 4, "val_videos": 0, "seed": 0,
                                       "out_dir": str(workdir / "synthetic")}, batch_size=2, num_frames=4)
    fresh.set_preprocess_config(second.vlm.adapter.preprocess_config)
    fresh.setup("fit")
    index = next(i for i, r in enumerate(fresh.train_records) if r.id == record.id)
    pixels = fresh._dataset("train", fresh.train_records)[index].pixels
    adapter = second.vlm.adapter
    with torch.no_grad():
        tower = adapter.tower_features(pixels)
        assert torch.allclose(adapter.project_features(tower), adapter.encode_frames(pixels), atol=1e-6)
    cached = torch.load(dataset.feature_path(record))
    assert torch.allclose(cached, tower, atol=1e-6)  # the cache keeps the tower's output, before the projector

    # The projector is not part of the key: it runs on the cached tower output at every step, so a model
    # whose projector trains (trainable="model" with freeze_vision) still reads the cache, and its
    # features follow its own projector.
    third = RouterTrainingModule(tiny=True, routing=ROUTING)
    with torch.no_grad():
        next(p for n, p in third.model.named_parameters() if "vision_tower" in n).add_(0.1)
        next(p for n, p in third.model.named_parameters() if "multi_modal_projector" in n).add_(0.1)
    assert third.encoder_fingerprint() == second.encoder_fingerprint()
    sample = dataset[index]
    assert sample.pixels is None  # served from the cache: nothing decoded
    order = third._runs(sample)[0]
    with torch.no_grad():
        assert torch.allclose(third._features(sample, order), third.vlm.adapter.encode_frames(pixels), atol=1e-5)
        assert not torch.allclose(third._features(sample, order), second._features(sample, order), atol=1e-3)


def test_plot_and_bench_commands(tmp_path, capsys):
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.train.cli import main

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/distill,train/loss,val/loss\n0,1,0.5,0.5,\n0,3,0.3,0.3,\n0,3,,,0.4\n")
    assert main(["plot", str(metrics), str(tmp_path / "loss.svg")]) == 0
    svg = (tmp_path / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3 and "val/loss" in svg
    assert main(["plot", str(tmp_path / "missing.csv"), str(tmp_path / "x.svg")]) == 2

    # 16 tokens per frame, 6 frames: vision tokens dominate the sequence, as in real use.
    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4, image_size=56, patch_size=7))
    capsys.readouterr()
    assert main(["bench", "--model", str(model), "--frames", "6", "--repeats", "1", "--routing",
                 "mod:0.25:all:1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["routed_saved_bytes"] < result["dense_saved_bytes"]
    assert result["forward_flops_fraction"] < 1.0 and result["dense_s"] > 0 and result["routed_s"] > 0


def test_bf16_mixed_precision_and_worker_processes(workdir):
    L.seed_everything(0)
    module = RouterTrainingModule(tiny=True, routing=ROUTING)
    dm = VideoDataModule(synthetic={"num_videos": 4, "val_videos": 2, "seed": 0, "out_dir": str(workdir / "syn_bf16")},
                         batch_size=2, num_frames=4, num_workers=2)
    dm.set_preprocess_config(module.vlm.adapter.preprocess_config)
    record = _Losses()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    trainer.fit(module, dm)
    assert len(record.losses) == 2 and all(0 < x < 10 for x in record.losses)


def test_feature_cache_gives_the_same_loss_without_decoding(workdir, monkeypatch):
    module = RouterTrainingModule(tiny=True, routing=ROUTING)
    dm = VideoDataModule(synthetic={"num_videos": 4, "val_videos": 2, "seed": 0, "out_dir": str(workdir / "syn_fc")},
                         batch_size=2, num_frames=4, feature_cache=str(workdir / "features"))
    dm.set_preprocess_config(module.vlm.adapter.preprocess_config)
    dm.prepare_data()
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    assert first[0].pixels is not None
    with torch.no_grad():
        losses = [float(module.losses(s)["distill"]) for s in first]
    assert all(s.feature_path and (workdir / "features").exists() for s in first)

    import streamvlm.train.data as data

    monkeypatch.setattr(data, "read_video", lambda *a, **k: pytest.fail("decoded despite the feature cache"))
    again = next(iter(dm.train_dataloader()))
    assert [s.id for s in again] == [s.id for s in first] and all(s.pixels is None for s in again)
    with torch.no_grad():
        assert [float(module.losses(s)["distill"]) for s in again] == pytest.approx(losses, abs=1e-6)


def test_joint_training_serves_dense_and_routed_with_one_set_of_weights(workdir):
    """trainable="all" with dense_weight: the language model learns from a routed and a dense pass of every
    sample; export-model writes its weights (the frozen tower from the start) and export its router."""
    from streamvlm.train.world_model import export_model

    workdir = workdir / "joint"
    L.seed_everything(0)
    module = RouterTrainingModule(tiny=True, routing=ROUTING, trainable="all", loss="distill+lm", dense_weight=1.0,
                                  rank_weight=1.0, lr=0.01)
    dm = _data(workdir, module)
    dm.prepare_data()
    dm.setup("fit")

    def mean(loader, key) -> float:
        with torch.no_grad():
            values = [float(module.losses(s)[key]) for batch in loader for s in batch]
        return sum(values) / len(values)

    before = {key: mean(dm.train_dataloader(), key) for key in ("dense_lm", "lm")}
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    ckpt = workdir / "ckpt"
    _quiet_fit(module, dm, 6, enable_checkpointing=True,
               callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt, save_last=True, save_top_k=0)])
    after = {key: mean(dm.train_dataloader(), key) for key in ("dense_lm", "lm")}
    assert after["dense_lm"] < before["dense_lm"] and after["lm"] < before["lm"]

    trained = module.model.state_dict()
    model_dir = export_model(ckpt / "last.ckpt", workdir / "model")
    export_router(ckpt / "last.ckpt", model_dir / "router")
    dense = StreamVLM.from_pretrained(model_dir)
    for key, value in dense.adapter.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
        if "vision_tower" in key:
            assert torch.equal(value, start[key]), key  # frozen: the starting checkpoint's
    assert any(not torch.equal(trained[k], start[k]) for k in start if "language_model" in k)
    routed = StreamVLM.from_pretrained(model_dir, routing="mod:0.25")
    for key, value in module.router.state_dict().items():
        assert torch.equal(routed.router.state_dict()[key], value), key


def test_dense_weight_needs_a_trainable_language_model():
    with pytest.raises(StreamVLMError, match="dense_weight"):
        RouterTrainingModule(tiny=True, routing=ROUTING, dense_weight=1.0)
    with pytest.raises(StreamVLMError, match="dense_weight must be >= 0"):
        RouterTrainingModule(tiny=True, routing=ROUTING, trainable="all", dense_weight=-1.0)

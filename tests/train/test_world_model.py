"""Training a whole model from scratch (trainable="model") on world videos, and exporting it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.train.data import VideoDataModule
from streamvlm.train.module import RouterTrainingModule, export_router
from streamvlm.train.world_model import build_word_tokenizer, export_model


def test_word_tokenizer_knows_every_world_word_and_round_trips():
    from streamvlm import world

    tok = build_word_tokenizer()
    unk = tok.convert_tokens_to_ids("[UNK]")
    for template in world.TEMPLATES.values():
        text = template.format(shape="triangle", colour="red")
        ids = tok(text)["input_ids"]
        assert unk not in ids and tok.decode(ids) == text
    assert tok("What COLOUR is the Square?")["input_ids"] == tok("what colour is the square ?")["input_ids"]
    assert tok("a bicycle")["input_ids"] == [unk, unk]
    rendered = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "how"}]}],
                                       tokenize=False, add_generation_prompt=True)
    assert unk not in tok(rendered)["input_ids"]


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_full_training_trains_every_weight_and_exports_a_checkpoint_the_runtime_loads(workdir):
    L.seed_everything(0)
    module = RouterTrainingModule(world_model=True, trainable="model", routing="dense", loss="lm", lr=3e-3)
    assert all(p.requires_grad for p in module.model.parameters())
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    dm = VideoDataModule(world={"num_videos": 4, "seed": 0, "out_dir": str(workdir / "videos")}, num_frames=None,
                         fps=1, batch_size=4)
    dm.set_preprocess_config(module.vlm.adapter.preprocess_config)
    record = _Losses()
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[record, L.pytorch.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", save_last=True,
                                                                               save_top_k=0)])
    trainer.fit(module, dm)
    assert len(record.losses) == 12  # 8 records (LLaVA + streaming per video), 2 batches per epoch
    assert sum(record.losses[-2:]) < 0.5 * sum(record.losses[:2])  # it learns the small set
    after = module.model.state_dict()
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        assert any(part in k and not torch.equal(before[k], after[k]) for k in before), part

    out = export_model(workdir / "ckpt" / "last.ckpt", workdir / "model")
    vlm = StreamVLM.from_pretrained(out)
    for key, value in vlm.adapter.model.state_dict().items():
        assert torch.equal(value, after[key]), key
    assert (out / "tokenizer.json").is_file() and not (out / "streamvlm_tiny.json").exists()
    with pytest.raises(StreamVLMError, match="whole model"):
        export_router(workdir / "ckpt" / "last.ckpt", workdir / "router")

    from streamvlm.train.cli import main

    assert main(["export-model", str(workdir / "ckpt" / "last.ckpt"), str(workdir / "model2")]) == 0
    assert (workdir / "model2" / "config.json").is_file()


def test_full_training_settings_are_checked():
    with pytest.raises(StreamVLMError, match="freeze_vision applies to trainable='model'"):
        RouterTrainingModule(world_model=True, trainable="router", routing="mod:0.2", freeze_vision=True)
    with pytest.raises(StreamVLMError, match="loss: lm and routing: dense"):
        RouterTrainingModule(world_model=True, trainable="model", routing="mod:0.2", loss="lm")
    with pytest.raises(StreamVLMError, match="loss: lm and routing: dense"):
        RouterTrainingModule(world_model=True, trainable="model", routing="dense", loss="distill")


def test_full_training_can_keep_the_vision_tower_and_still_exports_every_weight(workdir):
    workdir = workdir / "frozen"  # the module's runs share workdir; a checkpoint folder of its own
    L.seed_everything(0)
    module = RouterTrainingModule(world_model=True, trainable="model", routing="dense", loss="lm", lr=3e-3,
                                  freeze_vision=True)
    tower = module.model.model.vision_tower
    assert not any(p.requires_grad for p in tower.parameters())
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    # The frozen tower's output is cached in the first epoch; the second reads it and runs only the projector
    # and the language model, and the projector still trains.
    dm = VideoDataModule(world={"num_videos": 2, "seed": 0, "out_dir": str(workdir / "videos")}, num_frames=None,
                         fps=1, batch_size=4, feature_cache=str(workdir / "features"))
    dm.set_preprocess_config(module.vlm.adapter.preprocess_config)
    adapter = module.vlm.adapter
    tower_calls, projector_at = [], []
    real_tower = adapter.tower_features
    adapter.tower_features = lambda pixels: tower_calls.append(len(projector_at)) or real_tower(pixels)

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            projector_at.append({k: v.clone() for k, v in pl_module.model.state_dict().items()
                                 if k.startswith("model.multi_modal_projector.")})

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[Snapshot(), L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=workdir / "ckpt", save_last=True, save_top_k=0)])
    trainer.fit(module, dm)
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.vision_tower."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.multi_modal_projector."))
    samples = len(dm.train_records)
    assert tower_calls == [0] * samples  # every sample's tower ran once, in the first epoch
    assert len(list((workdir / "features").glob("*.pt"))) == samples
    first, second = projector_at
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the projector trained on cached features
    saved = torch.load(workdir / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    out = export_model(workdir / "ckpt" / "last.ckpt", workdir / "model")
    exported = StreamVLM.from_pretrained(out).adapter.model.state_dict()
    for key, value in exported.items():
        assert torch.equal(value, saved[f"model.{key}"]), key  # the checkpoint holds every weight
        if key.startswith("model.vision_tower."):
            assert torch.equal(value, before[key]), key  # ... the frozen tower as it started

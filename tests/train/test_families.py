"""Every family the runtime serves trains: LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and SmolVLM2.

The proof that training sees what inference sees: the routed training forward at keep 1.0 (a fresh MoD
router, whose weights are all 1) gives the logits a runtime session gives running dense on the same
dialogue, frames in odd runs (Qwen-VL pairs each run's last frame with a copy of itself), answers
teacher-forced, DeepStack included.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.train.data import Exchange, Frames, Sample, VideoDataModule
from streamvlm.tiny.families import FAMILIES
from streamvlm.train.module import RouterTrainingModule, export_router, write_training_checkpoint
from streamvlm.train.world_model import export_model
from support import random_frames, tiny_family_checkpoint

DIALOGUE = [("What is moving?", "a red square"), ("Where?", "left"), ("And now?", "up")]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {family: tiny_family_checkpoint(family, root) for family in FAMILIES}


def _sample(vlm) -> Sample:
    frames = random_frames(8, seed=3)
    times = torch.tensor([0.5 * i for i in range(8)], dtype=torch.float64)
    (q1, a1), (q2, a2), (q3, a3) = DIALOGUE
    events = [Frames(0, 5), Exchange(q1, a1), Exchange(q2, a2), Frames(5, 8), Exchange(q3, a3)]
    return Sample("s", "v.mp4", vlm.preprocess(frames), times, events, None)


def _session_logits(vlm, sample: Sample, routing: str | None = "dense") -> torch.Tensor:
    """What a session gives for each answer token and the token after each answer (routing None: the
    model's own router)."""
    frames = random_frames(8, seed=3)
    times = sample.timestamps.tolist()
    session = (vlm if routing is None else vlm.with_routing(routing)).session()
    rows = []
    session.append_frames(frames[:5], times[:5])
    for question, answer in DIALOGUE[:2]:
        rows.append(session.score(question, vlm.tokenizer(answer, add_special_tokens=False)["input_ids"]))
    session.append_frames(frames[5:], times[5:])
    question, answer = DIALOGUE[2]
    rows.append(session.score(question, vlm.tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return torch.cat(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_forward_at_keep_one_gives_the_sessions_dense_logits(family, family_dirs):
    module = RouterTrainingModule(model_dir=str(family_dirs[family]), routing="mod:1.0")
    sample = _sample(module.vlm)
    chunk, rows, targets = module.sequence(sample)
    with torch.no_grad():
        trained = module._run(module.student, chunk)[rows]
    expected = _session_logits(module.vlm, sample)
    assert trained.shape == expected.shape
    torch.testing.assert_close(trained, expected, atol=2e-4, rtol=1e-4)
    assert torch.equal(expected.argmax(-1)[:-1], trained.argmax(-1)[:-1])


def _random_scorers(router) -> None:
    """Start from a random ranking (the zero init ranks every token alike, a choice training first undoes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 8)


def _fit_and_save(module, tmp_path, videos: int, frames: int, epochs: int):
    """Fit on generated videos (half as many again held out), check that the held-out distillation loss fell,
    and save the trained state as tmp_path/last.ckpt (returned)."""
    data = VideoDataModule(synthetic={"num_videos": videos, "val_videos": videos // 2, "seed": 0,
                                      "out_dir": str(tmp_path / "synthetic")}, batch_size=4, num_frames=frames)
    data.set_preprocess_config(module.vlm.adapter.preprocess_config)
    data.setup("fit")
    val = [s for batch in data.val_dataloader() for s in batch]

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(module.losses(s)["distill"]) for s in val) / len(val)

    before = held_out()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, data)
    after = held_out()
    assert after < before, (before, after)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_a_router_that_the_runtime_loads(family, tmp_path):
    L.seed_everything(0)
    model_dir = str(write_training_checkpoint(family, tmp_path / family))
    module = RouterTrainingModule(model_dir=model_dir, routing="mod:0.25:all:1", lr=0.03)
    _random_scorers(module.router)
    ckpt = _fit_and_save(module, tmp_path, videos=16, frames=8, epochs=10)
    router_dir = export_router(ckpt, tmp_path / "router")
    vlm = StreamVLM.from_pretrained(model_dir, routing=router_dir)
    loaded = dict(vlm.router.named_parameters())
    for name, value in module.router.named_parameters():
        assert torch.equal(loaded[name], value.detach())  # the trained weights, not a fresh router
    session = vlm.session(max_new_tokens=3, ignore_stop=True)
    session.append_frames(random_frames(4, seed=1))
    assert len(session.ask("What is moving?")) > 0 and len(session.turns[-1].answer_ids) == 3
    assert session.stats()["flops"]["llm"] < session.stats()["flops"]["llm_dense"]  # the router routes


def _routed_session_logits(vlm, sample: Sample) -> torch.Tensor:
    """_session_logits with the model's own router instead of dense."""
    return _session_logits(vlm, sample, routing=None)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm"])
@pytest.mark.parametrize("routing, trainable", [("mod:0.25:all:1", "router+lora"), ("mod:0.25:all:1", "all"),
                                                ("skip:block", "router+lora"), ("skip:block", "all"),
                                                ("neighbor_attention:1", "router+lora"),
                                                ("yopo:3:all:0.5:3", "all")])
def test_the_language_model_trains_with_the_router_or_under_a_training_free_policy(family, routing, trainable,
                                                                                   tmp_path):
    # router+lora and all: the language model (LoRA adapters, or all its weights) learns by distillation from
    # the dense model with the policy in the loop; export writes what the runtime loads, and the runtime's
    # logits on a dialogue are the trained module's.
    L.seed_everything(0)
    model_dir = str(write_training_checkpoint(family, tmp_path / family))
    module = RouterTrainingModule(model_dir=model_dir, routing=routing, trainable=trainable,
                                  lr=0.01 if trainable == "router+lora" else 1e-3)
    ckpt = _fit_and_save(module, tmp_path, videos=8, frames=4, epochs=6)
    model_out = export_model(ckpt, tmp_path / "model")
    router_dir = export_router(ckpt, tmp_path / "router") if routing.startswith("mod") else model_out / "router"
    if not routing.startswith("mod"):  # nothing of the policy's own to export: `export` says what to run instead
        with pytest.raises(StreamVLMError, match=f"under {routing} .*export-model CKPT OUT"):
            export_router(ckpt, tmp_path / "router")
        assert not (tmp_path / "router").exists()
    vlm = StreamVLM.from_pretrained(model_out, routing=router_dir)
    assert vlm.router.spec() == module.router.spec()
    sample = _sample(module.vlm)
    module.eval()
    chunk, rows, _ = module.sequence(sample)
    with torch.no_grad():
        trained = module._run(module.student, chunk)[rows]
    torch.testing.assert_close(_routed_session_logits(vlm, sample), trained, atol=5e-4, rtol=1e-3)
    untouched = StreamVLM.from_pretrained(model_dir, routing=router_dir)
    assert not torch.allclose(_routed_session_logits(untouched, sample), trained, atol=5e-4)  # the weights moved


@pytest.mark.parametrize("trainable", ["router+lora", "all"])
def test_the_language_model_trains_under_a_calibrated_yopo_router_folder(trainable, tmp_path):
    # YOPO fine-tuned with its masks: the head mask is in the router folder, not in any spec, and export-model
    # writes it back as the model's router (from the checkpoint's policy config).
    from streamvlm.routers import save_router
    from streamvlm.routers.yopo import YopoConfig

    L.seed_everything(0)
    model_dir = str(write_training_checkpoint("qwen2_5_vl", tmp_path / "qwen2_5_vl"))
    parts = StreamVLM.from_pretrained(model_dir).adapter.decoder
    heads = parts.num_heads
    mask = [[False] * heads, [False] * heads, [h < heads // 2 for h in range(heads)], [True] * heads]
    config = YopoConfig(window=3, head_keep=0.5, ffn=0.5, drop_layer=3, pruned=mask)
    folder = tmp_path / "yopo"
    save_router(StreamVLM.from_pretrained(model_dir, routing=config).router, folder, parts.num_layers,
                parts.hidden_size)
    module = RouterTrainingModule(model_dir=model_dir, routing=str(folder), trainable=trainable,
                                  lr=0.01 if trainable == "router+lora" else 1e-3)
    assert module.router.config == config
    ckpt = _fit_and_save(module, tmp_path, videos=8, frames=4, epochs=6)
    model_out = export_model(ckpt, tmp_path / "model")
    vlm = StreamVLM.from_pretrained(model_out, routing=model_out / "router")
    assert vlm.router.config == config  # the mask came back
    sample = _sample(module.vlm)
    module.eval()
    chunk, rows, _ = module.sequence(sample)
    with torch.no_grad():
        trained = module._run(module.student, chunk)[rows]
    torch.testing.assert_close(_routed_session_logits(vlm, sample), trained, atol=5e-4, rtol=1e-3)
    untouched = StreamVLM.from_pretrained(model_dir, routing=folder)
    assert not torch.allclose(_routed_session_logits(untouched, sample), trained, atol=5e-4)  # the weights moved


def test_export_model_refuses_a_checkpoint_that_trained_only_a_router(tmp_path):
    module = RouterTrainingModule(model_dir=str(write_training_checkpoint("smolvlm", tmp_path / "m")),
                                  routing="mod:0.25:all:1")
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "router.ckpt")
    with pytest.raises(StreamVLMError, match="did not train the model .*streamvlm-train export"):
        export_model(tmp_path / "router.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()

"""Training data: both record formats, bad videos and records, the feature cache, the sampler, synthetic videos
and the data module. Videos are made here with write_video."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from streamvlm.errors import StreamVLMError
from streamvlm.train import data, synthetic
from streamvlm.train.data import (
    EpochShuffleSampler, Exchange, Frames, FrameSampling, Sample, VideoDataModule, VideoInstructionDataset,
    collate_samples, load_records,
)
from streamvlm.video.files import read_video, write_video
from streamvlm.video.preprocess import PreprocessConfig

FPS = 8
CFG = PreprocessConfig(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def make_video(path, seconds: float = 3, fps: int = FPS):
    """A flat video whose frame i has red = 8 i (3 s at 8 fps: 24 frames at i / 8 s)."""
    count = int(seconds * fps)
    frames = np.zeros((count, 32, 32, 3), np.uint8)
    frames[..., 0] = (8 * np.arange(count)).reshape(-1, 1, 1)
    frames[..., 2] = 128
    return write_video(path, frames, fps=fps)


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


LLAVA = {
    "id": "v1", "video": "clips/a.mp4",
    "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"},
        {"from": "gpt", "value": "A man walks."},
        {"from": "human", "value": "And then? <image>"},
        {"from": "gpt", "value": "He sits."},
    ],
}

STREAM = {
    "id": "s1", "video": "clips/a.mp4",
    "conversation": [
        {"role": "user", "content": "Tell me when the light turns red.", "time": 0.0},
        {"role": "assistant", "content": "Not yet.", "time": 0.5},
        {"role": "assistant", "content": "Now.", "time": 1.0},  # same question, no new user message
        {"role": "user", "content": "<video>\nWhat colour now?", "time": 1.2},
        {"role": "assistant", "content": "Red.", "time": 2.0},
    ],
}


@pytest.fixture
def clips(tmp_path):
    make_video(tmp_path / "clips" / "a.mp4")
    return tmp_path


# ---------------------------------------------------------------- records and events


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_llava_record_frames_come_before_all_exchanges(clips, writer):
    path = writer(clips / "records.json", [LLAVA])
    (record,) = load_records(path)
    assert record.kind == "llava"
    assert record.video == str(clips / "clips" / "a.mp4")
    assert record.exchanges == (Exchange("What happens?", "A man walks."), Exchange("And then?", "He sits."))

    sample = VideoInstructionDataset([record], CFG, FrameSampling(num_frames=8))[0]
    assert sample.id == "v1" and sample.feature_path is None
    assert sample.pixels.dtype == torch.float32 and sample.pixels.shape == (8, 3, 16, 16)
    assert sample.timestamps.dtype == torch.float64 and sample.timestamps.shape == (8,)
    assert sample.events == [Frames(0, 8), *record.exchanges]


def test_video_root_resolves_relative_paths(clips, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("records")
    (record,) = load_records(write_json(elsewhere / "r.json", [LLAVA]), video_root=clips)
    assert record.video == str(clips / "clips" / "a.mp4")


def test_stream_record_interleaves_frames_by_timestamp(clips):
    (record,) = load_records(write_jsonl(clips / "stream.jsonl", [STREAM]))
    question, colour = "Tell me when the light turns red.", "What colour now?"
    assert record.kind == "stream"
    assert record.exchanges == (
        Exchange(question, "Not yet.", 0.5), Exchange(question, "Now.", 1.0), Exchange(colour, "Red.", 2.0))

    sample = VideoInstructionDataset([record], CFG, FrameSampling())[0]
    # every frame at i / 8 s up to the last exchange (2.0 s, frame 16); later frames teach nothing
    torch.testing.assert_close(sample.timestamps, torch.arange(17, dtype=torch.float64) / FPS)
    assert sample.pixels.shape[0] == 17
    assert sample.events == [
        Frames(0, 5), record.exchanges[0],  # 0 .. 0.5 s
        Frames(5, 9), record.exchanges[1],  # 0.625 .. 1.0 s
        Frames(9, 17), record.exchanges[2],  # 1.125 .. 2.0 s
    ]


def test_stream_frames_sampled_by_fps_split_at_exchange_times(clips):
    (record,) = load_records(write_jsonl(clips / "stream.jsonl", [STREAM]))
    sample = VideoInstructionDataset([record], CFG, FrameSampling(fps=2))[0]
    torch.testing.assert_close(sample.timestamps, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64))
    assert [e for e in sample.events if isinstance(e, Frames)] == [Frames(0, 2), Frames(2, 3), Frames(3, 5)]


def test_unanswered_stream_question_has_empty_answer(tmp_path):
    record = {"id": "s2", "video": "x.mp4", "conversation": [
        {"role": "user", "content": "Anything?", "time": 0.5},
        {"role": "user", "content": "Now?", "time": 1.0},
        {"role": "assistant", "content": "Yes.", "time": 1.5},
    ]}
    (parsed,) = load_records(write_jsonl(tmp_path / "s.jsonl", [record]))
    assert parsed.exchanges == (Exchange("Anything?", "", 0.5), Exchange("Now?", "Yes.", 1.5))


@pytest.mark.parametrize("record, problem", [
    ({"id": "bad1", "conversations": LLAVA["conversations"]}, "'video'"),
    ({"id": "bad2", "video": "a.mp4", "conversations": []}, "no exchanges"),
    ({"id": "bad3", "video": "a.mp4", "conversations": [{"from": "human", "value": "Hi?"}]}, "no gpt turn"),
    ({"id": "bad4", "video": "a.mp4", "conversations": [{"from": "gpt", "value": "Hi."}]}, "no human turn"),
    ({"id": "bad5", "video": "a.mp4"}, "conversations"),
    ({"id": "bad6", "video": "a.mp4", "conversation": [{"role": "assistant", "content": "Hi.", "time": 1}]},
     "no user message"),
    ({"id": "bad7", "video": "a.mp4", "conversation": [{"role": "user", "content": "Hi?"}]}, "'time'"),
])
def test_malformed_record_names_file_and_record(tmp_path, record, problem):
    path = write_json(tmp_path / "records.json", [LLAVA, record])
    with pytest.raises(StreamVLMError, match=problem) as info:
        load_records(path)
    assert str(path) in str(info.value) and "record 1" in str(info.value) and record["id"] in str(info.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(LLAVA) + "\n{not json\n")
    with pytest.raises(StreamVLMError, match="line 2"):
        load_records(path)


# ---------------------------------------------------------------- bad videos


@pytest.fixture
def mixed(clips):
    """Records of a good video, a missing one and a corrupt one (random bytes)."""
    (clips / "clips" / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    records = [dict(LLAVA, id=name, video=f"clips/{name}.mp4") for name in ("a", "missing", "corrupt")]
    return write_json(clips / "mixed.json", records)


def test_data_module_skips_missing_and_corrupt_videos(mixed, caplog):
    module = VideoDataModule(train_file=str(mixed), num_frames=2)
    module.set_preprocess_config(CFG)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        module.setup("fit")
    assert [r.id for r in module.train_dataset.records] == ["a"]
    assert module.skipped == {"missing": 1, "unreadable": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("missing.mp4" in w for w in warnings) == 1 and sum("corrupt.mp4" in w for w in warnings) == 1


def test_data_module_strict_raises_on_bad_video(mixed):
    module = VideoDataModule(train_file=str(mixed), num_frames=2, strict=True)
    module.set_preprocess_config(CFG)
    with pytest.raises(StreamVLMError, match="missing.mp4"):
        module.setup("fit")


def test_dataset_returns_none_for_undecodable_video(mixed, caplog):
    records = load_records(mixed)
    dataset = VideoInstructionDataset(records, CFG, FrameSampling(num_frames=2))
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        assert dataset[2] is None
    assert any("corrupt.mp4" in r.getMessage() for r in caplog.records)
    batch = collate_samples([dataset[0], dataset[1], dataset[2]])
    assert [s.id for s in batch] == ["a"]
    with pytest.raises(StreamVLMError, match="corrupt.mp4"):
        VideoInstructionDataset(records, CFG, FrameSampling(num_frames=2), strict=True)[2]


# ---------------------------------------------------------------- feature cache


def test_feature_cache_skips_decoding(clips, tmp_path, monkeypatch):
    (record,) = load_records(write_jsonl(clips / "stream.jsonl", [STREAM]))
    dataset = VideoInstructionDataset([record], CFG, FrameSampling(fps=4), feature_dir=tmp_path / "features")
    first = dataset[0]
    assert first.pixels is not None and first.feature_path.endswith(".pt")
    assert dataset[0].pixels is not None  # no features saved yet: decoded again

    torch.save(torch.zeros(1), first.feature_path)  # what the training module does after encoding

    def no_decoding(*args, **kwargs):
        raise AssertionError("read_video was called although the features are cached")

    monkeypatch.setattr(data, "read_video", no_decoding)
    cached = dataset[0]
    assert cached.pixels is None and cached.feature_path == first.feature_path
    assert torch.equal(cached.timestamps, first.timestamps) and cached.timestamps.dtype == torch.float64
    assert cached.events == first.events


def test_feature_path_changes_with_sampling_and_preprocessing(clips, tmp_path):
    (record,) = load_records(write_json(clips / "r.json", [LLAVA]))
    paths = {
        VideoInstructionDataset([record], cfg, FrameSampling(num_frames=n), feature_dir=tmp_path).feature_path(record)
        for cfg in (CFG, PreprocessConfig(height=8, width=8, mean=CFG.mean, std=CFG.std)) for n in (4, 8)
    }
    assert len(paths) == 4


# ---------------------------------------------------------------- sampler


def test_sampler_order_is_deterministic_per_epoch():
    def order(epoch, seed=0):
        sampler = EpochShuffleSampler(50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0)) == list(range(50))
    assert order(0) == order(0) and order(3) == order(3)
    assert order(0) != order(1) and order(0, seed=1) != order(0)
    # a sampler that lived through epochs 0..2 (an uninterrupted run) agrees with a fresh one (a resumed run)
    sampler = EpochShuffleSampler(50, 0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = list(sampler)
    assert seen == order(2)


# ---------------------------------------------------------------- synthetic videos


def _palette_name(rgb: torch.Tensor) -> str:
    return min(synthetic.PALETTE, key=lambda name: float(((rgb - torch.tensor(synthetic.PALETTE[name])) ** 2).sum()))


def _shape_pixels(frame: torch.Tensor) -> torch.Tensor:
    """bool (H, W): pixels far from the background."""
    distance = (frame.float() - torch.tensor(synthetic.BACKGROUND, dtype=torch.float32)).abs().sum(-1)
    return distance > 90


def _centroid(frame: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(_shape_pixels(frame), as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def test_synthetic_answers_are_true_to_the_frames(tmp_path):
    path = synthetic.generate(tmp_path / "syn", num_videos=8, seed=3, streaming=True)
    records = load_records(path)
    assert len(records) == 8 and len(load_records(path.with_name(synthetic.STREAM_FILE))) == 8
    seen = set()
    for record in records:
        answers = {e.question: e.answer for e in record.exchanges}
        clip = read_video(record.video)
        assert len(clip) == 32 and clip.frames.shape[1:] == (64, 64, 3)
        middle = clip.frames[len(clip) // 2]
        assert _palette_name(middle[_shape_pixels(middle)].float().mean(0)) == answers["What colour is the shape?"]
        (x0, y0), (x1, y1) = _centroid(clip.frames[0]), _centroid(clip.frames[-1])
        moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        direction = answers["Which way does it move?"]
        assert moved[direction] > 20 and max(v for k, v in moved.items() if k != direction) < 2
        # the shape is 2r = 16 pixels across: a square fills its 16 x 16 box, a circle pi / 4 of it
        fill = _shape_pixels(middle).sum().item() / 16**2
        assert ("circle" if fill < 0.9 else "square") == answers["What shape is it?"]
        seen.add((answers["What colour is the shape?"], answers["What shape is it?"], direction))
    assert len(seen) > 1


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = synthetic.generate(tmp_path / "a", num_videos=3, seed=5)
    b = synthetic.generate(tmp_path / "b", num_videos=3, seed=5)
    c = synthetic.generate(tmp_path / "c", num_videos=3, seed=6)
    strip = lambda p: [{k: v for k, v in r.items() if k != "video"} for r in json.loads(p.read_text())]  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)
    assert torch.equal(read_video(a.parent / "videos/0001.mp4").frames, read_video(b.parent / "videos/0001.mp4").frames)


# ---------------------------------------------------------------- data module


def test_data_module_with_synthetic_data_gives_lists_of_samples(tmp_path):
    module = VideoDataModule(num_frames=4, batch_size=3, synthetic={
        "num_videos": 5, "val_videos": 2, "out_dir": str(tmp_path / "syn"), "seed": 1, "streaming": True})
    module.set_preprocess_config(CFG)
    module.prepare_data()
    module.setup("fit")
    assert len(module.train_dataset) == 10 and len(module.val_dataset) == 4  # LLaVA and streaming records
    batches = list(module.train_dataloader())
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert all(isinstance(s, Sample) and s.pixels.shape[1:] == (3, 16, 16) for b in batches for s in b)
    assert {s.id for b in batches for s in b} == {r.id for r in module.train_dataset.records}
    val = [s for b in module.val_dataloader() for s in b]
    assert len(val) == 4 and all(isinstance(s, Sample) for s in val)
    assert not {s.video for s in val} & {s.video for b in batches for s in b}
    # Lightning moves a batch with each sample's `to` instead of walking into its frozen events
    moved = move_data_to_device(batches[0], torch.device("cpu"))
    assert [s.events for s in moved] == [s.events for s in batches[0]]


def test_generated_world_videos_are_checked_to_exist_but_not_probed(tmp_path, monkeypatch, caplog):
    # The generator wrote each video atomically: a deleted one is skipped at setup, a damaged one (not
    # probed there) when it fails to decode.
    module = VideoDataModule(fps=1, num_frames=None, world={
        "num_videos": 3, "out_dir": str(tmp_path / "w"), "size": 32, "dialogue": "rich"})
    module.set_preprocess_config(CFG)
    module.prepare_data()
    videos = sorted((tmp_path / "w").glob("train-0/videos/*.mp4"))
    videos[0].unlink()
    videos[1].write_bytes(b"not a video")
    probed = []
    monkeypatch.setattr(data, "probe_video", lambda path: probed.append(path))
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        module.setup("fit")
    assert probed == [] and module.skipped == {"missing": 1}
    dataset = module.train_dataset
    assert [Path(r.video).name for r in dataset.records] == [videos[1].name, videos[2].name]
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        assert dataset[0] is None and dataset[1] is not None
    assert sum(videos[1].name in r.getMessage() for r in caplog.records) == 1


def test_world_data_module_adds_short_clips_and_leaver_videos_to_the_training_set(tmp_path):
    from streamvlm import world

    module = VideoDataModule(fps=1, num_frames=None, batch_size=2, world={
        "num_videos": 2, "val_videos": 1, "clips": 3, "clip_seconds": 3, "out_dir": str(tmp_path / "w"), "size": 32})
    module.set_preprocess_config(CFG)
    module.prepare_data()
    module.setup("fit")
    train = module.train_dataset.records
    assert len(train) == 2 * (2 + 3) and len(module.val_dataset) == 2  # LLaVA and streaming records
    clips = [r for r in train if "clips-2" in str(r.video)]  # seed 0: clips are drawn with seed 2
    assert len(clips) == 6
    frames = {len(s.pixels) for b in module.train_dataloader() for s in b if "clips-2" in str(s.video)}
    assert frames <= {1, 2, 3} and 3 in frames  # 3 s at 1 fps; a mid-stream record stops at its last question
    assert world.make_video(2, 0, seconds=3.0)[0].seconds == 3.0
    module = VideoDataModule(fps=1, num_frames=None, batch_size=2, world={
        "num_videos": 2, "leavers": 2, "out_dir": str(tmp_path / "w"), "size": 32})
    module.set_preprocess_config(CFG)
    module.prepare_data()
    module.setup("fit")
    leavers = [r for r in module.train_dataset.records if "leavers-3" in str(r.video)]  # seed 0 + 3
    assert len(leavers) == 4
    meta = json.loads((tmp_path / "w" / "leavers-3" / "world.json").read_text())
    assert meta["leaver"] is True
    with pytest.raises(StreamVLMError, match="unknown world keys"):
        VideoDataModule(world={"num_videos": 2, "clip": 3})
    # rich dialogues: one streaming record per video, ending with the LLaVA record's description
    module = VideoDataModule(fps=1, num_frames=None, batch_size=2, world={
        "num_videos": 2, "val_videos": 1, "out_dir": str(tmp_path / "w"), "size": 32, "dialogue": "rich"})
    module.set_preprocess_config(CFG)
    module.prepare_data()
    module.setup("fit")
    train = module.train_dataset.records
    assert [r.kind for r in train] == ["stream"] * 2 and len(module.val_dataset) == 1
    described = [e for r in train for e in r.exchanges if e.question == world.TEMPLATES["describe"]]
    assert len(described) == 2


def test_data_module_loader_settings(tmp_path):
    module = VideoDataModule(num_workers=2, seed=4, synthetic={"num_videos": 3, "out_dir": str(tmp_path)})
    module.setup("fit")
    module.set_preprocess_config(CFG)  # after setup is early enough (the training module may do it)
    loader = module.train_dataloader()
    assert loader.persistent_workers and loader.collate_fn is collate_samples
    assert isinstance(loader.sampler, EpochShuffleSampler) and loader.sampler.seed == 4
    assert module.val_dataloader() == []
    with pytest.raises(StreamVLMError, match="unknown synthetic keys"):
        VideoDataModule(synthetic={"num_video": 3})
    unconfigured = VideoDataModule(synthetic={"num_videos": 3, "out_dir": str(tmp_path)})
    unconfigured.setup("fit")
    with pytest.raises(StreamVLMError, match="model_dir"):
        unconfigured.train_dataloader()


@pytest.mark.filterwarnings("ignore:Total length of `list`", "ignore:Checkpoint directory")
def test_resumed_run_sees_the_order_of_an_uninterrupted_run(tmp_path):
    import lightning

    class Recorder(lightning.LightningModule):
        """Records the sample ids of each training batch, per epoch."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[str]] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(s.id for s in batch)
            return (self.weight - 1).pow(2).sum()

        def validation_step(self, batch, batch_idx):
            raise AssertionError("there is no validation data")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_epochs, ckpt_path=None):
        module = VideoDataModule(num_frames=1, seed=7, synthetic={"num_videos": 6, "out_dir": str(tmp_path / "syn")})
        module.set_preprocess_config(CFG)
        recorder = Recorder()
        trainer = lightning.Trainer(
            max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])
        trainer.fit(recorder, datamodule=module, ckpt_path=ckpt_path)
        return recorder.seen

    whole = fit(3)
    assert sorted(whole[0]) == sorted(whole[1]) and whole[0] != whole[1]
    (checkpoint,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    resumed = fit(3, ckpt_path=checkpoint)
    assert resumed == {1: whole[1], 2: whole[2]}


# ---------------------------------------------------------------- frame sampling per family


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of four families: their processor configs say how each samples frames."""
    from streamvlm.tiny.families import FAMILIES, write_tiny_family

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_tiny_family(root / family, family) for family in FAMILIES}


QWEN = FrameSampling(fps=2.0, fps_rule="floor", min_frames=4, max_frames=768, multiple=2)


@pytest.mark.parametrize("family, expected", [
    ("qwen2_5_vl", QWEN),
    ("qwen2_vl", QWEN),
    ("qwen3_vl", FrameSampling(fps=2.0, fps_rule="floor", min_frames=4, max_frames=256, multiple=2)),
    ("smolvlm", FrameSampling(fps=1.0, fps_rule="round", max_frames=64)),  # its num_frames is a cap
    ("llava_onevision", None),  # its processor takes the frames it is given
])
def test_frame_sampling_is_read_from_the_checkpoints_processor(checkpoints, family, expected):
    assert FrameSampling.from_checkpoint(checkpoints[family]) == expected


def test_frame_sampling_reads_the_processor_keys_it_finds():
    qwen = {"temporal_patch_size": 2, "video_processor_type": "Qwen2VLVideoProcessor"}
    assert FrameSampling.from_processor_config(qwen) == QWEN  # qwen-vl-utils' defaults
    assert FrameSampling.from_processor_config(qwen | {"fps": 1, "min_frames": 2, "max_frames": 32}) == \
        FrameSampling(fps=1.0, fps_rule="floor", min_frames=2, max_frames=32, multiple=2)
    assert FrameSampling.from_processor_config(qwen | {"num_frames": 16}) == \
        FrameSampling(num_frames=16, max_frames=768, multiple=2)
    smol = {"processor_class": "SmolVLMProcessor", "video_sampling": {"fps": 2, "max_frames": 32}}
    assert FrameSampling.from_processor_config(smol) == FrameSampling(fps=2.0, fps_rule="round", max_frames=32)
    assert FrameSampling.from_processor_config({"num_frames": 32}) == FrameSampling(num_frames=32)
    assert FrameSampling.from_processor_config({}) is None


def test_frame_counts_round_as_the_processors_do():
    assert [QWEN.count(s) for s in (0.5, 2.0, 2.75, 3.25, 1000.0)] == [4, 4, 4, 6, 768]  # pairs, 4..768
    smol = FrameSampling(fps=1.0, fps_rule="round", max_frames=64)
    assert [smol.count(s) for s in (0.2, 2.6, 3.25, 100.0)] == [1, 3, 3, 64]
    # Qwen rounds num_frames to the nearest pair; a LLaVA style sample's count is trimmed to pairs
    assert FrameSampling(num_frames=7, multiple=2).read_args(None)["num_frames"] == 8
    assert FrameSampling(num_frames=1, multiple=2).read_args(None)["num_frames"] == 2
    assert [QWEN.trim(n) for n in (1, 2, 9)] == [1, 2, 8]
    with pytest.raises(StreamVLMError, match="fps_rule"):
        FrameSampling(fps=1.0, fps_rule="nearest")
    with pytest.raises(StreamVLMError, match="not both"):
        FrameSampling(num_frames=4, fps=1.0)


@pytest.mark.parametrize("family, seconds, frames", [
    ("qwen2_5_vl", 3.25, 6),  # 2 per second
    ("qwen2_5_vl", 2.75, 4),  # 5.5 rounded down to pairs
    ("qwen2_5_vl", 1.0, 4),  # at least min_frames
    ("qwen3_vl", 2.75, 4),
    ("smolvlm", 3.25, 3),  # 1 per second, rounded
    ("llava_onevision", 3.25, 8),  # nothing in its processor: 8 frames
])
def test_data_module_samples_frames_as_the_family_does(checkpoints, tmp_path, family, seconds, frames):
    make_video(tmp_path / "clips" / "a.mp4", seconds)
    module = VideoDataModule(train_file=str(write_json(tmp_path / "r.json", [LLAVA])),
                             model_dir=str(checkpoints[family]))
    module.set_preprocess_config(CFG)
    module.setup("fit")
    sample = module.train_dataset[0]
    assert len(sample.timestamps) == frames and sample.pixels.shape[0] == frames
    # spread evenly over the video, on its 1/8 s frame grid
    evenly = torch.arange(frames, dtype=torch.float64) * seconds / frames
    torch.testing.assert_close(sample.timestamps, evenly, atol=0.5 / FPS, rtol=0)


def test_streaming_record_counts_frames_over_its_span(checkpoints, clips):
    # the span ends at the last exchange (2 s): 4 frames at 2 per second
    (record,) = load_records(write_jsonl(clips / "stream.jsonl", [STREAM]))
    sample = VideoInstructionDataset([record], CFG, FrameSampling.from_checkpoint(checkpoints["qwen2_5_vl"]))[0]
    torch.testing.assert_close(sample.timestamps, torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64))


def test_the_users_num_frames_or_fps_win_over_the_family(checkpoints, clips):
    path = str(write_json(clips / "r.json", [LLAVA]))
    qwen = str(checkpoints["qwen2_5_vl"])

    def module(**settings):
        m = VideoDataModule(train_file=path, model_dir=qwen, **settings)
        m.set_preprocess_config(CFG)
        return m

    assert module().sampling == QWEN
    assert module(num_frames=3).sampling == FrameSampling(num_frames=3, max_frames=768, multiple=2)
    assert module(fps=3).sampling == FrameSampling(fps=3, max_frames=768, multiple=2)
    assert module(max_frames=4).sampling == replace(QWEN, max_frames=4)
    unknown = VideoDataModule(train_file=path, fps=3)
    assert unknown.sampling == FrameSampling(fps=3, max_frames=64)
    # frames still come in pairs: num_frames 3 becomes 4, 3 fps over 3 s gives 9 ticks, trimmed to 8
    for settings, frames in (({"num_frames": 3}, 4), ({"fps": 3}, 8)):
        m = module(**settings)
        m.setup("fit")
        assert len(m.train_dataset[0].timestamps) == frames
    # the training module may name the model's sampling itself
    m = module()
    m.set_frame_sampling(FrameSampling(num_frames=2))
    assert m.sampling == FrameSampling(num_frames=2)

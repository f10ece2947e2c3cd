"""The token budget: samples counted as the sequence builder lays them out, records too long for the context
split at exchange boundaries or skipped with a count, and loaded samples cut, never inside an answer."""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from streamvlm.train import data
from streamvlm.train.data import (
    Exchange, FitReport, Frames, FrameSampling, Record, TokenBudget, VideoDataModule, VideoInstructionDataset,
    fit_records, load_records,
)
from streamvlm.video.files import write_video
from streamvlm.video.preprocess import PreprocessConfig

CFG = PreprocessConfig(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
FPS = 8


def words(text: str) -> int:
    return len(text.split())


def make_video(path, seconds: float = 3):
    count = int(seconds * FPS)
    frames = np.zeros((count, 32, 32, 3), np.uint8)
    frames[..., 1] = (8 * np.arange(count)).reshape(-1, 1, 1)
    return write_video(path, frames, fps=FPS)


def stream_record(video, times, question="q", answer="a") -> dict:
    messages = [{"role": "user", "content": question, "time": 0.0}]
    messages += [{"role": "assistant", "content": answer, "time": t} for t in times]
    return {"id": "s", "video": str(video), "conversation": messages}


def test_token_budget_counts_runs_of_frames_and_exchanges():
    budget = TokenBudget(max_positions=60, tokens_per_frame=10, count_text=words, frames_per_step=2, frame_text=1,
                         video_text=3, exchange_text=2, fixed_text=5)
    events = [Frames(0, 3), Exchange("a b", "c d e"), Frames(3, 4), Exchange("f", "")]
    # fixed 5; run of 3 frames: 3 + 2 pairs x 11; exchange 2 + 3 + 2; run of 1 frame: 3 + 1 pair x 11; 1 + 0 + 2
    assert budget.tokens(events) == 5 + 25 + 7 + 14 + 3 == 54
    assert budget.fits(events) and not replace(budget, reserve=10).fits(events)
    assert budget.tokens([]) == 5 and budget.frames_tokens(0) == 0


SHORT = [Exchange(f"q{i}", "a a a") for i in range(5)]  # 1 + 3 + 2 = 6 tokens each
LONG = Exchange("q", " ".join(["w"] * 30))  # 33 tokens


def test_llava_record_too_long_is_split_frames_first_then_whole_exchanges():
    budget = TokenBudget(max_positions=100, tokens_per_frame=10, count_text=words, exchange_text=2)
    record = Record("r", "/v.mp4", "llava", (SHORT[0], SHORT[1], LONG, SHORT[2], SHORT[3], SHORT[4]), "r.json")
    lonely = Record("s", "/v.mp4", "llava", (LONG,), "r.json")
    whole = Record("t", "/v.mp4", "llava", (SHORT[0],), "r.json")
    # 8 frames take 80 tokens: 20 are left, three short exchanges' worth; the long one never fits
    fitted, report = fit_records([record, lonely, whole], budget, FrameSampling(num_frames=8))
    assert [(r.id, r.exchanges) for r in fitted] == [
        ("r#1", tuple(SHORT[:3])), ("r#2", tuple(SHORT[3:])), ("t", (SHORT[0],))]
    assert report == FitReport(records=3, split=1, samples=2, dropped_exchanges=2, skipped=1, skipped_ids=["s"])
    for part in fitted:
        assert budget.fits([Frames(0, 8), *part.exchanges])
    # a budget that holds everything changes nothing
    assert fit_records([record], replace(budget, max_positions=1000), FrameSampling(num_frames=8))[0] == [record]


def test_a_video_whose_length_sets_the_frame_count_is_probed_to_plan_it(tmp_path):
    make_video(tmp_path / "v.mp4")  # 3 s: 6 frames at Qwen's 2 per second, not max_frames' 768
    record = Record("r", str(tmp_path / "v.mp4"), "llava", tuple(SHORT[:2]), "r.json")
    qwen = FrameSampling(fps=2.0, fps_rule="floor", min_frames=4, max_frames=768, multiple=2)
    budget = TokenBudget(max_positions=100, tokens_per_frame=10, count_text=words, exchange_text=2)
    videos = {}
    assert fit_records([record], budget, qwen, videos) == ([record], FitReport(records=1))
    assert videos == {record.video: (3.0, 8.0)}


def test_streaming_record_is_cut_into_consecutive_parts_that_fit(tmp_path):
    make_video(tmp_path / "v.mp4")
    times = [0.5, 1.0, 1.5, 2.0, 2.5]
    (record,) = load_records(_write(tmp_path / "s.jsonl", [stream_record(tmp_path / "v.mp4", times)]))
    sampling = FrameSampling(fps=2)  # frames at 0, 0.5, ..., 2.5
    budget = TokenBudget(max_positions=50, tokens_per_frame=10, count_text=words, exchange_text=2)
    whole = VideoInstructionDataset([record], CFG, sampling)[0]
    assert not budget.fits(whole.events)  # 6 frames and 5 exchanges: 80 tokens

    fitted, report = fit_records([record], budget, sampling)
    assert report == FitReport(records=1, split=1, samples=3)
    assert [(p.id, p.start, [e.time for e in p.exchanges]) for p in fitted] == [
        ("s#1", None, [0.5, 1.0]), ("s#2", 1.0, [1.5, 2.0]), ("s#3", 2.0, [2.5])]
    samples = [VideoInstructionDataset(fitted, CFG, sampling, budget=budget)[i] for i in range(3)]
    for sample in samples:
        assert budget.fits(sample.events)
        frames = [e for e in sample.events if isinstance(e, Frames)]
        assert frames[0].start == 0 and frames[-1].end == len(sample.timestamps)
    # together the parts hold every frame of the whole record once, and all its exchanges, whole
    torch.testing.assert_close(torch.cat([s.timestamps for s in samples]), whole.timestamps)
    torch.testing.assert_close(torch.cat([s.pixels for s in samples]), whole.pixels)
    assert [e for s in samples for e in s.events if isinstance(e, Exchange)] == list(record.exchanges)


def test_data_module_fits_records_to_the_budget_and_logs_it_once(tmp_path, caplog):
    make_video(tmp_path / "v.mp4")
    llava = {"id": "l", "video": "v.mp4", "conversations": [
        turn for e in SHORT for turn in ({"from": "human", "value": e.question}, {"from": "gpt", "value": e.answer})]}
    too_long = {"id": "x", "video": "v.mp4", "conversations": [
        {"from": "human", "value": LONG.question}, {"from": "gpt", "value": LONG.answer}]}
    path = _write(tmp_path / "train.jsonl", [llava, too_long])
    module = VideoDataModule(train_file=str(path), num_frames=8)
    module.set_preprocess_config(CFG)
    module.setup("fit")
    assert [r.id for r in module.train_dataset.records] == ["l", "x"]  # no budget: every record whole

    module.set_token_budget(TokenBudget(max_positions=100, tokens_per_frame=10, count_text=words, exchange_text=2))
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        loader = module.train_dataloader()
        module.set_preprocess_config(CFG)  # datasets are made again, the plan is reused
        module.train_dataloader()
    assert [r.id for r in module.train_dataset.records] == ["l#1", "l#2"]
    assert module.fitted["train"] == FitReport(records=2, split=1, samples=2, dropped_exchanges=1, skipped=1,
                                               skipped_ids=["x"])
    assert module.skipped == {"too_long": 1}
    (message,) = [r.getMessage() for r in caplog.records]
    assert "1 were split into 2 samples" in message and "1 were skipped" in message and "x" in message
    batches = [s for batch in loader for s in batch]
    assert sorted(len([e for e in s.events if isinstance(e, Exchange)]) for s in batches) == [2, 3]


def test_loaded_sample_over_the_budget_is_cut_after_a_whole_exchange(tmp_path, caplog):
    make_video(tmp_path / "v.mp4")
    (stream,) = load_records(_write(tmp_path / "s.jsonl", [stream_record(tmp_path / "v.mp4", [0.5, 1.0, 2.0])]))
    llava = Record("l", str(tmp_path / "v.mp4"), "llava", tuple(SHORT[:3]), "test")
    budget = TokenBudget(max_positions=45, tokens_per_frame=10, count_text=words, exchange_text=2)
    dataset = VideoInstructionDataset([llava, stream], CFG, FrameSampling(fps=2), budget=budget,
                                      feature_dir=tmp_path / "features")
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        kept, cut = dataset[0], dataset[1]
    # LLaVA: 6 frames (60 tokens) do not fit even alone
    assert kept is None
    # streaming: frames at 0, 0.5 and 1.0 and the first two exchanges (38 tokens); the frame at 1.5 s and 2.0 s
    # and the last exchange are left out, and the shorter sample is not cached under the whole record's key
    assert [e for e in cut.events if isinstance(e, Exchange)] == list(stream.exchanges[:2])
    torch.testing.assert_close(cut.timestamps, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert cut.pixels.shape[0] == 3 and cut.feature_path is None and budget.fits(cut.events)
    messages = [r.getMessage() for r in caplog.records]
    assert any("'l'" in m and "even with only its first exchange" in m for m in messages)
    assert any("'s'" in m and "keeping 2 of its 3 exchanges" in m for m in messages)


# ---------------------------------------------------------------- the budget of a loaded model


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm"])
def adapter(request, tmp_path_factory):
    from streamvlm.runtime import StreamVLM
    from streamvlm.tiny.families import write_tiny_family

    out = write_tiny_family(tmp_path_factory.mktemp(request.param), request.param)
    return StreamVLM.from_pretrained(out, device="cpu").adapter


DIALOGUES = [
    [Frames(0, 1), Exchange("What is it?", "A cat.")],
    [Frames(0, 8), Exchange("Describe the video in detail.", "A red car drives left, then stops by a tree. " * 4),
     Exchange("Qu'est-ce qui se passe ensuite ?", "La voiture repart 🚗."), Exchange("And?", "")],
    [Frames(0, 3), Exchange("Tell me when it stops.", "Not yet."), Frames(3, 4), Exchange("Tell me when it stops.",
     "Now."), Frames(4, 9), Exchange("What colour is it?", "Green, mostly.")],
    [Exchange("Anything yet?", "No."), Frames(0, 5), Exchange("And now?", "Yes: a dog.")],
]


@pytest.mark.parametrize("events", DIALOGUES, ids=["one", "llava", "stream", "text-first"])
def test_budget_of_a_model_counts_what_the_sequence_builder_lays_out(adapter, events):
    from streamvlm.sequence import SequenceBuilder, lay_out_dialogue

    budget = TokenBudget.for_adapter(adapter)
    assert budget.max_positions == adapter.decoder.max_positions
    step, tpf = adapter.frames_per_step, adapter.vision.tokens_per_frame
    width = adapter.decoder.hidden_size * (1 + adapter.vision.deepstack)
    frames = max((e.end for e in events if isinstance(e, Frames)), default=0)
    builder = SequenceBuilder(adapter, trace=False)
    pieces = lay_out_dialogue(builder, events, [0.5 * i for i in range(frames)],
                              lambda a, b: torch.zeros(math.ceil((b - a) / step), tpf, width), set())
    exact = builder.tokens(pieces)
    estimate = budget.tokens(events)
    # never short; over by the slack per exchange and run, and Qwen3-VL's four-digit times per frame
    runs = sum(isinstance(e, Frames) for e in events)
    exchanges = len(events) - runs
    assert exact <= estimate <= exact + 2 * exchanges + 2 * runs + 4 * math.ceil(frames / step)
    # loader workers started by spawn (or DDP's) get the budget pickled with the dataset
    assert pickle.loads(pickle.dumps(budget)).tokens(events) == estimate


def _write(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path

"""Record formats: VideoChat instructions and ShareGPT4Video captions beside LLaVA and streaming records, and
malformed records skipped with a count. Videos are made here with write_video."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from streamvlm.errors import StreamVLMError
from streamvlm.train import data, records
from streamvlm.train.data import Exchange, Frames, FrameSampling, VideoDataModule, VideoInstructionDataset
from streamvlm.train.records import CAPTION_QUESTION, SEGMENT_QUESTION, load_records, read_records
from streamvlm.video.files import write_video
from streamvlm.video.preprocess import PreprocessConfig

CFG = PreprocessConfig(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

LLAVA = {"id": "l1", "video": "a.mp4", "conversations": [
    {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A man walks."}]}

# VideoChat2 instruction data: one instruction for the list, a caption task with an empty question
VIDEOCHAT = {"video": "a.mp4", "QA": [
    {"i": "Watch the video and answer briefly.", "q": "What colour is the car?", "a": "Red."},
    {"i": "Watch the video and answer briefly.", "q": "Where does it go?", "a": "Left."},
    {"i": "Describe the video in detail.", "q": "", "a": "A red car drives to the left."},
]}

# ShareGPT4Video's released sharegpt4video_40k.jsonl: keyframe captions by idx, idx "-1" the whole video
SHAREGPT4VIDEO = {
    "video_id": "pexels_123", "video_path": "a.mp4", "zip_folder": "pexels_videos_1.zip",
    "timestamp": [0.0, 1.0, 2.5], "keyframe": [0, 8, 20],
    "captions": [
        {"idx": "0", "content": "A blue square sits on the left."},
        {"idx": "1", "content": "The square slides right."},
        {"idx": "2", "content": "It stops at the right edge."},
        {"idx": "-1", "content": "A blue square slides from left to right and stops."},
    ],
}


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


def make_video(path, seconds: float = 3, fps: int = 8):
    count = int(seconds * fps)
    frames = np.zeros((count, 32, 32, 3), np.uint8)
    frames[..., 0] = (8 * np.arange(count)).reshape(-1, 1, 1)
    return write_video(path, frames, fps=fps)


def test_videochat_instruction_and_question_form_the_user_turn(tmp_path):
    (record,) = load_records(write_jsonl(tmp_path / "vc.jsonl", [VIDEOCHAT]))
    assert record.kind == "llava" and record.video == str(tmp_path / "a.mp4")
    assert record.exchanges == (
        Exchange("Watch the video and answer briefly.\nWhat colour is the car?", "Red."),
        Exchange("Where does it go?", "Left."),  # the same instruction is not repeated
        Exchange("Describe the video in detail.", "A red car drives to the left."),
    )


def test_sharegpt4video_gives_a_caption_record_and_a_keyframe_stream(tmp_path):
    make_video(tmp_path / "a.mp4")
    caption, stream = load_records(write_jsonl(tmp_path / "sg.jsonl", [SHAREGPT4VIDEO]))
    assert caption.id == "pexels_123" and caption.kind == "llava"
    assert caption.exchanges == (Exchange(CAPTION_QUESTION, "A blue square slides from left to right and stops."),)
    assert stream.id == "pexels_123#keyframes" and stream.kind == "stream"
    assert stream.exchanges == (
        Exchange(SEGMENT_QUESTION, "A blue square sits on the left.", 0.0),
        Exchange(SEGMENT_QUESTION, "The square slides right.", 1.0),
        Exchange(SEGMENT_QUESTION, "It stops at the right edge.", 2.5),
    )
    # each keyframe caption comes after the frames up to its time (8 fps, every frame)
    sample = VideoInstructionDataset([stream], CFG, FrameSampling())[0]
    assert [e for e in sample.events if isinstance(e, Frames)] == [Frames(0, 1), Frames(1, 9), Frames(9, 21)]


@pytest.mark.parametrize("obj, expected", [
    # a plain caption, the video under 'video'
    ({"id": "c1", "video": "a.mp4", "caption": "A dog runs."},
     [("c1", "llava", [(CAPTION_QUESTION, "A dog runs.", None)])]),
    # 'summary' and keyframe captions with their own times, out of order
    ({"video_id": "c2", "video_path": "a.mp4", "summary": "Two cuts.",
      "captions": [{"content": "Second.", "time": 4}, {"content": "First.", "time": 1}]},
     [("c2", "llava", [(CAPTION_QUESTION, "Two cuts.", None)]),
      ("c2#keyframes", "stream", [(SEGMENT_QUESTION, "First.", 1.0), (SEGMENT_QUESTION, "Second.", 4.0)])]),
    # keyframe captions without times and no whole caption: one description, in order
    ({"video_id": "c3", "video_path": "a.mp4", "captions": ["It opens.", "It closes."]},
     [("c3", "llava", [(CAPTION_QUESTION, "It opens. It closes.", None)])]),
    # keyframe captions without times beside a whole caption: the whole caption only
    ({"video_id": "c4", "video_path": "a.mp4",
      "captions": [{"idx": 0, "content": "x"}, {"idx": -1, "content": "All."}]},
     [("c4", "llava", [(CAPTION_QUESTION, "All.", None)])]),
])
def test_sharegpt4video_shapes(tmp_path, obj, expected):
    found = load_records(write_jsonl(tmp_path / "sg.jsonl", [obj]))
    assert [(r.id, r.kind, [(e.question, e.answer, e.time) for e in r.exchanges]) for r in found] == expected


def test_one_file_mixes_formats(tmp_path):
    stream = {"id": "s1", "video": "a.mp4", "conversation": [
        {"role": "user", "content": "Say when.", "time": 0.5}, {"role": "assistant", "content": "Now.", "time": 1}]}
    found = load_records(write_jsonl(tmp_path / "mix.jsonl", [LLAVA, stream, VIDEOCHAT, SHAREGPT4VIDEO]))
    assert [r.kind for r in found] == ["llava", "stream", "llava", "llava", "stream"]


@pytest.mark.parametrize("obj, problem", [
    ({"id": "b1", "video": "a.mp4", "QA": [{"i": "", "q": "", "a": "Yes."}]}, "neither an instruction"),
    ({"id": "b2", "video": "a.mp4", "QA": [{"q": "Why?"}]}, "no string 'a'"),
    ({"id": "b3", "video": "a.mp4", "QA": "What?"}, "'QA' must be a list"),
    ({"id": "b4", "video_path": "a.mp4", "captions": []}, "has no caption"),
    ({"id": "b5", "video_path": "a.mp4", "captions": [{"idx": "x", "content": "A."}]}, "'idx'"),
    ({"id": "b6", "video_path": "a.mp4", "captions": [{"content": "A.", "time": -1}]}, "seconds >= 0"),
    ({"id": "b7", "captions": [{"content": "A."}]}, "'video_path'"),
    ({"id": "b8", "video": "a.mp4", "question": "What?"}, "no known format"),
])
def test_malformed_records_are_named(tmp_path, obj, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [LLAVA, obj])
    found, problems = read_records(path)
    assert [r.id for r in found] == ["l1"]
    (message,) = problems
    assert problem in message and str(path) in message and "line 2" in message and obj["id"] in message
    with pytest.raises(StreamVLMError, match=problem):
        load_records(path)


def test_data_module_skips_malformed_records_with_a_count(tmp_path, caplog):
    make_video(tmp_path / "a.mp4")
    bad = [{"id": f"bad{i}", "video": "a.mp4", "QA": []} for i in range(25)]
    path = write_jsonl(tmp_path / "train.jsonl", [LLAVA, *bad, VIDEOCHAT])
    module = VideoDataModule(train_file=str(path), num_frames=2)
    module.set_preprocess_config(CFG)
    with caplog.at_level(logging.WARNING):
        module.setup("fit")
    assert [r.id for r in module.train_dataset.records] == ["l1", str(path) + " line 27"]
    assert module.skipped == {"malformed": 25}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("bad" in w and "no exchanges" in w for w in warnings) == 20 and any("5 more" in w for w in warnings)
    assert {r.name for r in caplog.records} == {records.__name__}

    strict = VideoDataModule(train_file=str(path), num_frames=2, strict=True)
    with pytest.raises(StreamVLMError, match="bad0"):
        strict.setup("fit")
    nothing = write_jsonl(tmp_path / "nothing.jsonl", bad[:2])
    with pytest.raises(StreamVLMError, match="no record of .* is well formed.*bad0"):
        VideoDataModule(train_file=str(nothing)).setup("fit")


def test_records_module_is_what_data_reexports():
    assert data.Exchange is records.Exchange and data.Record is records.Record
    assert data.load_records is records.load_records

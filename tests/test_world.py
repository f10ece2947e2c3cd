"""The procedural world: answers correct by construction, checked against the rendered frames."""

from __future__ import annotations

import json
import random

import pytest
import torch

from streamvlm import world
from streamvlm.train.data import load_records
from streamvlm.video.files import read_video

FPS = 8
SIZE = 128


def _frame(frames: torch.Tensor, t: float) -> torch.Tensor:
    """The last frame drawn at or before t."""
    return frames[min(int(t * FPS + 1e-6), len(frames) - 1)]


def _mask(frame: torch.Tensor, colour: str) -> torch.Tensor:
    target = torch.tensor(world.COLOURS[colour], dtype=torch.float32)
    return (frame.float() - target).abs().max(dim=-1).values < 40


def _blob(frame: torch.Tensor, colour: str) -> dict | None:
    """What the pixels of one colour look like: area, centre, and how much of their bounding box they fill."""
    mask = _mask(frame, colour)
    if int(mask.sum()) < 4:
        return None
    ys, xs = torch.nonzero(mask, as_tuple=True)
    height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    return {"area": int(mask.sum()), "centre": (float(xs.float().mean()), float(ys.float().mean())),
            "fill": int(mask.sum()) / (height * width), "width": width}


def _shape_from_pixels(blob: dict) -> str:
    # a square fills its bounding box, a circle pi/4 of it, a triangle half
    return "square" if blob["fill"] > 0.9 else "circle" if blob["fill"] > 0.65 else "triangle"


def _answer_from_pixels(question: world.Question, frames: torch.Tensor) -> str:
    """Work the answer out from the pixels alone, as a viewer would."""
    now = _frame(frames, question.time)
    blobs = {c: _blob(now, c) for c in world.COLOURS}
    present = {c: b for c, b in blobs.items() if b is not None}
    words = question.text.split()
    if question.template == "count":
        return world.NUMBERS[len(present)]
    if question.template == "colour":
        shape = words[words.index("the") + 1]
        return next(c for c, b in present.items() if _shape_from_pixels(b) == shape)
    colour = next((w for w in words if w in world.COLOURS), None)
    if question.template == "shape":
        return _shape_from_pixels(present[colour])
    if question.template == "size":
        # big objects are 1.6x the small ones across: split the widths at the geometric mean
        small, big = (world.SIZES[s] * 2 * SIZE for s in ("small", "big"))
        shape = _shape_from_pixels(present[colour])
        scale = {"circle": 1.0, "square": 1.0, "triangle": 1.25 * 3**0.5 / 2}[shape]
        return "big" if present[colour]["width"] > (small * big) ** 0.5 * scale else "small"
    if question.template == "motion":
        before = _blob(_frame(frames, question.time - 1.5), colour)
        dx = present[colour]["centre"][0] - before["centre"][0]
        dy = present[colour]["centre"][1] - before["centre"][1]
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    # recall: the first colour to vanish from the frames seen so far, and its shape while it was there
    seen: dict[str, dict] = {}
    for i in range(int(question.time * FPS) + 1):
        frame = frames[min(i, len(frames) - 1)]
        for c in world.COLOURS:
            blob = _blob(frame, c)
            if blob is not None:
                seen[c] = blob
            elif c in seen:
                return c if question.template == "recall_colour" else _shape_from_pixels(seen[c])
    raise AssertionError("no object left before the recall question")


@pytest.mark.parametrize("index", range(12))
def test_answers_match_the_rendered_frames(index):
    video, mid, end = world.make_video(seed=77, index=index)
    frames = world.render(video, SIZE, FPS)
    questions = mid + end
    assert questions, "every video gets questions"
    for q in questions:
        assert _answer_from_pixels(q, frames) == q.answer, q


def test_a_range_of_frames_renders_as_that_slice_of_the_whole_video():
    # the vision stage draws one frame per sample this way instead of every frame up to it
    video, _, _ = world.make_video(seed=79, index=3)
    frames = world.render(video, SIZE, FPS)
    assert torch.equal(world.render(video, SIZE, FPS, count=3, start=5), frames[5:8])
    assert torch.equal(world.render(video, SIZE, FPS, start=len(frames) - 2), frames[-2:])


@pytest.mark.parametrize("index", range(6))
def test_clip_answers_match_the_rendered_frames_and_every_object_stays(index):
    video, mid, end = world.make_video(seed=78, index=index, seconds=3.0)
    assert video.events == () and all(o.appear == 0 and o.leave is None for o in video.objects)
    frames = world.render(video, SIZE, FPS)
    questions = mid + end
    assert {q.kind for q in questions} <= {"attribute", "count", "motion"}
    # a clip is long enough to see which way each object moves
    assert sum(q.kind == "motion" for q in world.candidates(video, video.seconds)) == len(video.objects)
    for q in questions:
        assert _answer_from_pixels(q, frames) == q.answer, q


@pytest.mark.parametrize("index", range(8))
def test_descriptions_match_the_rendered_frames(index):
    seconds = 3.0 if index % 2 else 8.0
    video = world.make_video(seed=79, index=index, seconds=seconds)[0]
    frames = world.render(video, SIZE, FPS)
    summary = world.describe(video, video.seconds)
    parts = [p.split() for p in summary.answer.split(f" {world.AND} ")]
    colours = [p[1] for p in parts]
    present = [c for c in world.COLOURS if _blob(_frame(frames, video.seconds), c) is not None]
    assert colours == present  # every object in view, in the order of COLOURS
    for size, colour, shape, moving, direction in parts:
        assert moving == "moving"

        def ask(template, text, answer):
            return _answer_from_pixels(world.Question(video.seconds, template, text, answer), frames)

        assert ask("shape", f"what shape is the {colour} object ?", shape) == shape
        assert ask("size", f"what size is the {colour} {shape} ?", size) == size
        assert ask("motion", f"which way is the {colour} {shape} moving ?", direction) == direction
    # not settled right after an object appears
    newcomer = next((o for o in video.objects if o.appear > 0), None)
    if newcomer is not None:
        assert world.describe(video, newcomer.appear + 0.5) is None


def test_every_kind_and_answer_occurs():
    kinds, answers = set(), {}
    for index in range(60):
        _, mid, end = world.make_video(seed=5, index=index)
        for q in mid + end:
            kinds.add(q.kind)
            answers.setdefault(q.template, set()).add(q.answer)
    assert kinds == set(world.KINDS)
    for template, seen in answers.items():
        assert seen == set(world.ANSWERS[template]), template


def test_objects_never_overlap_and_stay_in_the_frame():
    for index in range(40):
        video = world.make_video(seed=3, index=index)[0]
        for step in range(int(video.seconds * 8)):
            t = step / 8
            shown = video.visible(t)
            for o in shown:
                x, y = o.centre(t)
                assert o.extent <= x <= 1 - o.extent and o.extent <= y <= 1 - o.extent
            for i, a in enumerate(shown):
                for b in shown[i + 1:]:
                    (ax, ay), (bx, by) = a.centre(t), b.centre(t)
                    assert ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 > a.extent + b.extent


def test_generate_writes_records_the_data_module_reads(tmp_path):
    out = world.generate(tmp_path / "w", num_videos=3, seed=11)
    llava = load_records(out / world.RECORD_FILE)
    stream = load_records(out / world.STREAM_FILE)
    assert [r.kind for r in llava] == ["llava"] * 3 and [r.kind for r in stream] == ["stream"] * 3
    raw = json.loads((out / world.RECORD_FILE).read_text())
    assert raw[0]["conversations"][0]["value"].startswith("<video>\n")
    for record, (_, mid, end) in zip(stream, (world.make_video(11, i) for i in range(3))):
        assert [(e.question, e.answer, e.time) for e in record.exchanges] == [(q.text, q.answer, q.time) for q in mid]
    for record, (video, _, _) in zip(llava, (world.make_video(11, i) for i in range(3))):
        summary = world.describe(video, video.seconds)  # the LLaVA record describes the video at its end
        assert [(e.question, e.answer) for e in record.exchanges] == [(summary.text, summary.answer)]
    clip = read_video(out / world.video_name(0), fps=1)
    assert clip.frames.shape == (8, world.SIZE, world.SIZE, 3)
    # the MP4 shows what was drawn (up to compression)
    drawn = world.render(world.make_video(11, 0)[0], world.SIZE, world.VIDEO_FPS)[::world.VIDEO_FPS]
    assert (clip.frames.float() - drawn.float()).abs().mean() < 4
    before = (out / world.video_name(0)).stat().st_mtime_ns
    assert world.generate(tmp_path / "w", num_videos=3, seed=11) == out  # complete: reused, not redrawn
    assert (out / world.video_name(0)).stat().st_mtime_ns == before
    # other parameters in the same folder: the videos are redrawn, not reused (here at 48 px, not 96)
    assert world.generate(tmp_path / "w", num_videos=2, seed=11, size=48) == out
    assert read_video(out / world.video_name(0), fps=1).frames.shape == (8, 48, 48, 3)
    assert not (out / world.video_name(2)).exists()


@pytest.mark.parametrize("index", range(6))
def test_leaver_videos_keep_their_first_leaver_for_both_recall_questions(index):
    video, mid, end = world.make_video(seed=79, index=index, leaver=True)
    leaver = video.first_leaver()
    assert 2 <= len(video.objects) and leaver is not None and leaver.leave <= 0.4 * video.seconds
    frames = world.render(video, SIZE, FPS)
    for dialogue in (mid, end):
        for q in dialogue:
            assert _answer_from_pixels(q, frames) == q.answer, q
        about_leaver = [q.template for q in dialogue if world.subject(video, q) == leaver.colour]
        assert sorted(about_leaver) == ["recall_colour", "recall_shape"]  # and nothing else about it


@pytest.mark.parametrize("index", range(8))
def test_rich_dialogues_ask_motion_last_and_end_with_the_description(index):
    leaver = index % 2 == 1
    video, mid, end, rich = world._make(seed=81, index=index, seconds=8.0, leaver=leaver)
    assert (video, mid, end) == world.make_video(81, index, leaver=leaver)  # drawn after: nothing else moves
    frames = world.render(video, SIZE, FPS)
    *questions, summary = rich
    assert summary == world.describe(video, video.seconds)  # the description ends it
    assert [q.time for q in questions] == sorted(q.time for q in questions) and questions[-1].time <= video.seconds
    held = video.first_leaver().colour if leaver else None
    asked: dict[str, list[str]] = {}
    for q in questions:
        assert _answer_from_pixels(q, frames) == q.answer, q
        who = world.subject(video, q)
        if who is None:
            continue
        before = asked.setdefault(who, [])
        if who == held:  # kept for the two recall questions
            assert q.kind == "recall" and q.template not in before, q
        else:
            assert "motion" not in before, q  # nothing about an object after its motion
            assert q.template == "motion" or not before, q  # one other question about it at most, before
        before.append(q.template)


def test_rich_dialogues_ask_about_twice_the_motion_questions():
    plain = rich = 0
    for index in range(60):
        _, mid, _, dialogue = world._make(seed=82, index=index, seconds=8.0, leaver=False)
        plain += sum(q.kind == "motion" for q in mid)
        rich += sum(q.kind == "motion" for q in dialogue)
    assert rich > 2 * plain  # measured over 300 videos: 586 against 215


def test_generate_writes_rich_dialogues_without_drawing_the_videos_again(tmp_path):
    out = world.generate(tmp_path / "w", num_videos=2, seed=11, size=48)
    before = (out / world.video_name(0)).stat().st_mtime_ns
    plain = load_records(out / world.STREAM_FILE)
    assert world.generate(tmp_path / "w", num_videos=2, seed=11, size=48, dialogue="rich") == out
    assert (out / world.video_name(0)).stat().st_mtime_ns == before  # only the records change
    rich = load_records(out / world.STREAM_FILE)
    for index, record in enumerate(rich):
        dialogue = world._make(11, index, 8.0, False)[3]
        assert [(e.question, e.answer, e.time) for e in record.exchanges] == [(q.text, q.answer, q.time)
                                                                             for q in dialogue]
    assert [r.exchanges for r in rich] != [r.exchanges for r in plain]
    assert json.loads((out / "world.json").read_text())["dialogue"] == "rich"
    with pytest.raises(world.StreamVLMError, match="dialogue must be one of"):
        world.generate(tmp_path / "w", num_videos=2, seed=11, dialogue="long")


def test_the_same_seed_gives_the_same_world_and_another_seed_another():
    assert world.make_video(9, 4) == world.make_video(9, 4)
    assert world.make_video(9, 4)[0] != world.make_video(10, 4)[0]


def _objects_mentioned(video: world.WorldVideo, q: world.Question) -> set[str]:
    """Colours of the objects a question names or answers with (by colour or by shape)."""
    words = set(q.text.split()) | {q.answer}
    if q.kind == "recall":
        words.add(video.first_leaver().colour)
    return {o.colour for o in video.objects if o.colour in words or o.shape in words}


def test_no_question_of_a_dialogue_gives_away_another_ones_answer():
    for index in range(40):
        video, mid, end = world.make_video(seed=6, index=index)
        for dialogue in (mid, end):
            assert sum(q.template == "count" for q in dialogue) <= world.MAX_COUNTS
            for i, a in enumerate(dialogue):
                assert world.subject(video, a) in _objects_mentioned(video, a) | {None}
                for b in dialogue[i + 1:]:
                    assert not _objects_mentioned(video, a) & _objects_mentioned(video, b), (a, b)


def test_questions_are_only_asked_when_settled():
    rng = random.Random(0)
    for index in range(30):
        video = world.make_video(2, index)[0]
        for q in world.stream_questions(rng, video):
            if q.template == "count":
                assert not any(q.time - 1.0 <= t <= q.time for t, _, _ in video.events)
            if q.kind == "recall":
                assert video.first_leaver().leave + 1.0 <= q.time


def test_bad_generate_arguments_are_refused(tmp_path):
    from streamvlm.errors import StreamVLMError

    with pytest.raises(StreamVLMError, match="num_videos"):
        world.generate(tmp_path, 0, seed=0)
    with pytest.raises(StreamVLMError, match="size"):
        world.generate(tmp_path, 1, seed=0, size=8)
    with pytest.raises(StreamVLMError, match="fps"):
        world.generate(tmp_path, 1, seed=0, fps=0)
    with pytest.raises(StreamVLMError, match="at least 3 seconds"):
        world.generate(tmp_path, 1, seed=0, seconds=2)
    with pytest.raises(StreamVLMError, match="leaver"):
        world.generate(tmp_path, 1, seed=0, seconds=3, leaver=True)

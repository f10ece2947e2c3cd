"""A procedural video world whose questions have exact answers: coloured shapes that move, appear and leave.

A video shows one to three objects over a plain dark background. Every object of a video has its own
colour and its own shape, is big or small, and moves left, right, up or down at constant speed. Some are
there from the start and stay, some leave (vanish) part-way, some appear part-way. Objects never overlap.
Geometry is in unit coordinates (x right, y down, the frame is [0, 1]^2) and time in seconds, so a video
can be drawn at any size and frame rate.

Questions are answered as of the moment they are asked, from the frames up to that moment:

    attribute  what colour is the triangle ?  /  what shape is the red object ?  /  what size is the red circle ?
    count      how many objects are there now ?
    motion     which way is the red circle moving ?
    recall     what colour was the first object that left ?  /  what shape was the first object that left ?
    describe   what is there now ?  ->  "big red square moving right and small green triangle moving left"

A question is only asked when its answer holds over a margin of time before it (an object asked about has
been visible for a second, two for motion; no object appeared or left in the second before a count), so
any frame rate from 1 fps up sees the same answer.

Files written under out_dir by `generate`:
    videos/NNNN.mp4   the videos (2 fps by default, drawn at `size` pixels)
    train.json        LLaVA-Video records: a description of the video, asked after it
    stream.jsonl      streaming records: questions asked mid-stream, with their times (no two about
                      the same object, so no answer can be read off an earlier question; with
                      dialogue="rich", an object's motion may follow another question about it and the
                      description of the video ends the dialogue)
    world.json        the generation parameters, written last: a folder holding it is complete
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.video.files import write_atomic, write_video

log = logging.getLogger(__name__)

COLOURS = {
    "red": (225, 45, 45),
    "green": (40, 195, 75),
    "blue": (55, 90, 240),
    "yellow": (240, 220, 50),
    "white": (240, 240, 240),
}
"""Object colours, RGB; far from each other and from the background."""
BACKGROUND = (40, 40, 48)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.075, "big": 0.12}
"""Size name -> radius (unit coordinates): a circle's radius, half a square's side, a triangle's
circumradius divided by 1.25 (so the three shapes of one size look alike in extent)."""
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction -> (dx, dy), y grows downwards."""
NUMBERS = ("zero", "one", "two", "three")
KINDS = ("attribute", "count", "motion", "recall")

TEMPLATES = {
    "colour": "what colour is the {shape} ?",
    "shape": "what shape is the {colour} object ?",
    "size": "what size is the {colour} {shape} ?",
    "count": "how many objects are there now ?",
    "motion": "which way is the {colour} {shape} moving ?",
    "recall_colour": "what colour was the first object that left ?",
    "recall_shape": "what shape was the first object that left ?",
    "describe": "what is there now ?",
}
TEMPLATE_KIND = {"colour": "attribute", "shape": "attribute", "size": "attribute", "count": "count",
                 "motion": "motion", "recall_colour": "recall", "recall_shape": "recall", "describe": "describe"}
ANSWERS = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "count": NUMBERS[1:],
    "motion": tuple(DIRECTIONS), "recall_colour": tuple(COLOURS), "recall_shape": SHAPES,
}
"""Template -> every answer it can have; chance for a template is 1 / len(its answers). (A description has
too many to list: see `describe`.)"""
AND = "and"
"""Joins the objects of a description."""

# Margins (s) that make answers independent of the frame rate the video is read at (1 fps or more).
_SEEN = 1.0      # an object asked about has been visible this long
_MOVING = 2.0    # ... this long for its motion (two frames at 1 fps)
_STEADY = 1.0    # no object appeared or left this long before a count
MAX_COUNTS = 2   # count questions in one dialogue
_EDGE = 0.02     # gap between an object and the frame's edge
_GAP = 0.05      # least gap between two objects' outlines
RECORD_FILE = "train.json"
STREAM_FILE = "stream.jsonl"
_MANIFEST = "world.json"
_DRAWN = "videos/drawn.json"
"""What the videos in a folder were drawn with: every parameter but num_videos (video i depends only on them)."""
VIDEO_FPS = 2
"""Frame rate of generated videos. The model reads them at 1 fps; 2 fps keeps the files small and the
drawing quick (the sample video, drawn for people, has 8)."""
SIZE = 96
"""Side of generated videos in pixels: the built-in model's frame size, so its frames are not resized."""
SHORT = 5.0
"""Videos shorter than this (s) are clips: every object stays from start to end (no room for events)."""


def vocabulary() -> list[str]:
    """Every word of the world's questions and answers, sorted."""
    words = set()
    for template in TEMPLATES.values():
        words.update(template.replace("{shape}", "").replace("{colour}", "").split())
    for answers in ANSWERS.values():
        words.update(answers)
    words.update(SHAPES)
    words.update(COLOURS)
    words.update(DIRECTIONS)
    words.add(AND)
    return sorted(words)


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    size: str
    direction: str
    start: tuple[float, float]
    """(x, y) centre when it appears."""
    speed: float
    """Units per second."""
    appear: float
    """Seconds; 0 for an object there from the start."""
    leave: float | None
    """Seconds it vanishes at; None when it stays to the end."""

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def extent(self) -> float:
        """Radius of a circle that holds the drawn shape."""
        return self.radius * {"circle": 1.0, "square": math.sqrt(2), "triangle": 1.25}[self.shape]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def visible(self, t: float) -> bool:
        return self.appear <= t and (self.leave is None or t < self.leave)

    def visible_over(self, start: float, end: float) -> bool:
        """Visible at every moment of [start, end]."""
        return start >= self.appear and (self.leave is None or end < self.leave)

    def centre(self, t: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        d = self.speed * (t - self.appear)
        return self.start[0] + dx * d, self.start[1] + dy * d


@dataclass(frozen=True)
class Question:
    time: float
    """Seconds into the video the question is asked at; its answer holds as of then."""
    template: str
    """A TEMPLATES key."""
    text: str
    answer: str

    @property
    def kind(self) -> str:
        return TEMPLATE_KIND[self.template]


@dataclass(frozen=True)
class WorldVideo:
    objects: tuple[WorldObject, ...]
    seconds: float
    events: tuple[tuple[float, str, str], ...] = field(default=())
    """(time, "appear" | "leave", object name), in time order."""

    @classmethod
    def of(cls, objects, seconds: float) -> WorldVideo:
        """A video of these objects, its events worked out from their appear and leave times."""
        events = sorted([(o.appear, "appear", o.name) for o in objects if o.appear > 0]
                        + [(o.leave, "leave", o.name) for o in objects if o.leave is not None])
        return cls(tuple(objects), seconds, tuple(events))

    def visible(self, t: float) -> list[WorldObject]:
        return [o for o in self.objects if o.visible(t)]

    def first_leaver(self) -> WorldObject | None:
        leavers = [o for o in self.objects if o.leave is not None]
        return min(leavers, key=lambda o: o.leave) if leavers else None


# ---------------------------------------------------------------- drawing the parameters


def draw_video(rng: random.Random, seconds: float = 8.0, leaver: bool = False) -> WorldVideo:
    """A random video: 1-3 objects (distinct colours and shapes) that never overlap; in a clip (shorter
    than SHORT) they all stay.

    leaver: two or three objects, one of which leaves early (between 2 s and 40% of the video), so the
    first-leaver questions can be asked over most of it. The default draw asks them in about one dialogue
    of eight; training sets made this way teach recall (`generate(..., leaver=True)`).
    """
    if leaver:
        _check_leaver(seconds)
    count = rng.choices((2, 3), weights=(1, 2))[0] if leaver else rng.choices((1, 2, 3), weights=(2, 3, 5))[0]
    for attempt in range(300):
        if attempt and attempt % 100 == 0:
            count = max(2 if leaver else 1, count - 1)  # a crowded draw that will not fit: one object fewer
        colours = rng.sample(sorted(COLOURS), count)
        shapes = rng.sample(SHAPES, count)
        roles = ["stay"] + rng.choices(("stay", "leave", "appear"), weights=(3, 5, 3), k=count - 1)
        if leaver:
            roles = ["stay", "early"] + roles[2:]
        rng.shuffle(roles)
        if seconds < SHORT:
            roles = ["stay"] * count
        objects = [_draw_object(rng, colour, shape, role, seconds) for colour, shape, role in zip(colours, shapes, roles)]
        if any(o is None for o in objects) or not _apart(objects, seconds) or not _events_apart(objects):
            continue
        return WorldVideo.of(objects, seconds)
    raise RuntimeError("could not place the objects of a world video")  # not reached for sane sizes


def _check_leaver(seconds: float) -> None:
    if seconds < SHORT:  # a clip's objects all stay
        raise StreamVLMError(f"world: a video with a leaver must last at least {SHORT} s, got {seconds}")


def _draw_object(rng: random.Random, colour: str, shape: str, role: str, seconds: float) -> WorldObject | None:
    appear, leave = 0.0, None
    if role == "leave":
        leave = round(rng.uniform(2.0, seconds - 2.5), 2)
    elif role == "early":
        leave = round(rng.uniform(2.0, 0.4 * seconds), 2)
    elif role == "appear":
        appear = round(rng.uniform(1.5, seconds - 3.0), 2)
    size = rng.choice(sorted(SIZES))
    direction = rng.choice(sorted(DIRECTIONS))
    probe = WorldObject(colour, shape, size, direction, (0.5, 0.5), 0.0, appear, leave)
    low, high = probe.extent + _EDGE, 1 - probe.extent - _EDGE
    duration = (leave if leave is not None else seconds) - appear
    speed = rng.uniform(0.06, 0.1)
    travel = speed * duration
    if travel > high - low:
        speed = (high - low) / duration
        travel = high - low
        if speed < 0.04:
            return None
    along = rng.uniform(low, high - travel)  # where the path starts along the motion axis
    dx, dy = DIRECTIONS[direction]
    first = along if dx + dy > 0 else along + travel
    across = rng.uniform(low, high)
    start = (first, across) if dx else (across, first)
    return WorldObject(colour, shape, size, direction, (round(start[0], 4), round(start[1], 4)),
                       round(speed, 4), appear, leave)


def _apart(objects: list[WorldObject], seconds: float) -> bool:
    """No two objects come closer than their extents plus a gap while both are visible."""
    steps = int(seconds * 16) + 1
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            for s in range(steps):
                t = s / 16
                if a.visible(t) and b.visible(t):
                    (ax, ay), (bx, by) = a.centre(t), b.centre(t)
                    if math.hypot(ax - bx, ay - by) < a.extent + b.extent + _GAP:
                        return False
    return True


def _events_apart(objects: list[WorldObject]) -> bool:
    """Appear and leave times at least 1.5 s apart, so "first to leave" and counts are clear-cut."""
    times = sorted([o.appear for o in objects if o.appear > 0] + [o.leave for o in objects if o.leave is not None])
    return all(b - a >= 1.5 for a, b in zip(times, times[1:]))


# ---------------------------------------------------------------- drawing the frames


def render(video: WorldVideo, size: int, fps: float, count: int | None = None, supersample: int = 2,
           start: int = 0) -> torch.Tensor:
    """uint8 (T, size, size, 3): frames start..start + T - 1 of the video, frame i showing the world at
    t = i / fps (by default every frame: T = seconds * fps).

    Drawn at supersample x the size and averaged down, so edges are anti-aliased the way a larger video
    resized by the preprocessing is.
    """
    count = int(round(video.seconds * fps)) - start if count is None else count
    big = size * supersample
    times = torch.arange(start, start + count, dtype=torch.float64) / fps
    frames = torch.tensor(BACKGROUND, dtype=torch.float32).expand(count, big, big, 3).clone()
    coords = (torch.arange(big, dtype=torch.float64) + 0.5) / big  # pixel centres, unit coordinates
    x, y = coords.view(1, 1, -1), coords.view(1, -1, 1)
    for obj in video.objects:
        shown = torch.tensor([obj.visible(float(t)) for t in times]).view(-1, 1, 1)
        dx, dy = DIRECTIONS[obj.direction]
        travel = obj.speed * (times - obj.appear).view(-1, 1, 1)
        cx, cy = obj.start[0] + dx * travel, obj.start[1] + dy * travel
        mask = shape_mask(obj.shape, obj.radius, x - cx, y - cy) & shown
        frames[mask] = torch.tensor(COLOURS[obj.colour], dtype=torch.float32)
    if supersample > 1:
        frames = torch.nn.functional.avg_pool2d(frames.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    return frames.round().to(torch.uint8)


def shape_mask(shape: str, radius: float, rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:
    """Whether offsets (rx, ry) from a shape's centre fall inside it."""
    if shape == "circle":
        return rx**2 + ry**2 <= radius**2
    if shape == "square":
        return (rx.abs() <= radius) & (ry.abs() <= radius)
    # triangle pointing up, circumradius 1.25 r: apex (0, -R), base corners (+-R sin 60, R / 2)
    big_r = 1.25 * radius
    half = big_r * math.sqrt(3) / 2
    base = ry <= big_r / 2
    slope = (big_r * 1.5) / half  # rise of a side per unit of x
    sides = ry >= -big_r + slope * rx.abs()
    return base & sides


# ---------------------------------------------------------------- questions


def candidates(video: WorldVideo, t: float) -> list[Question]:
    """Every question whose answer is settled at time t (see the margins above)."""
    out = []
    seen = [o for o in video.objects if o.visible_over(t - _SEEN, t)]
    for o in seen:
        out.append(Question(t, "colour", TEMPLATES["colour"].format(shape=o.shape), o.colour))
        out.append(Question(t, "shape", TEMPLATES["shape"].format(colour=o.colour), o.shape))
        out.append(Question(t, "size", TEMPLATES["size"].format(colour=o.colour, shape=o.shape), o.size))
        if o.visible_over(t - _MOVING, t):
            out.append(Question(t, "motion", TEMPLATES["motion"].format(colour=o.colour, shape=o.shape),
                                o.direction))
    recent = [e for e in video.events if t - _STEADY <= e[0] <= t + 1e-9]
    if not recent and t >= _STEADY:
        out.append(Question(t, "count", TEMPLATES["count"], NUMBERS[len(video.visible(t))]))
    leaver = video.first_leaver()
    if leaver is not None and t >= leaver.leave + _SEEN:
        out.append(Question(t, "recall_colour", TEMPLATES["recall_colour"], leaver.colour))
        out.append(Question(t, "recall_shape", TEMPLATES["recall_shape"], leaver.shape))
    return out


def subject(video: WorldVideo, question: Question) -> str | None:
    """The colour of the object a question is about (None for a count)."""
    if question.template == "count":
        return None
    if question.kind == "recall":
        return video.first_leaver().colour
    if question.template == "colour":
        return question.answer
    return next(w for w in question.text.split() if w in COLOURS)


def describe(video: WorldVideo, t: float) -> Question | None:
    """"what is there now ?" answered with every visible object, in the order of COLOURS, as "size colour
    shape moving direction", joined by "and"; None unless every visible object has been there for the
    motion margin and nothing appeared or left in the count margin before t.

    One answer that binds every attribute of every object: where separate questions each teach one fact
    about one object, a description teaches all of them at every word, and it gives the model a caption.
    """
    shown = video.visible(t)
    if not shown or not all(o.visible_over(t - _MOVING, t) for o in shown):
        return None
    if any(t - _STEADY <= e[0] <= t + 1e-9 for e in video.events):
        return None
    order = list(COLOURS)
    parts = [f"{o.size} {o.colour} {o.shape} moving {o.direction}" for o in sorted(shown, key=lambda o: order.index(o.colour))]
    return Question(t, "describe", TEMPLATES["describe"], f" {AND} ".join(parts))


def plan_questions(rng: random.Random, video: WorldVideo, times: list[float],
                   held: WorldObject | None = None, motion_last: bool = False) -> list[Question]:
    """One question per time, its kind the least asked so far among those possible then (ties at random),
    so every kind is well represented.

    One dialogue never asks two questions about the same object, and asks at most MAX_COUNTS counts:
    "what size is the red circle ?" would otherwise tell a later "what shape is the red object ?" its
    answer, and a model trained on such dialogues learns to copy from the question before instead of
    looking (the held-out benchmark asks every question on its own).

    held: the first object to leave, kept for the recall questions: nothing is asked about it while it
    is there, and after it left both recall questions may be asked (neither tells the other's answer).

    motion_last: an object already asked about may still be asked which way it moves, and nothing is
    asked about it after that. Nothing said before tells a direction, and the motion question (which
    names colour and shape) comes after every other question about its object, so it tells no later
    answer either; a dialogue then asks about twice the motion questions (training dialogues,
    `generate(..., dialogue="rich")`).
    """
    asked = {kind: 0 for kind in KINDS}
    about: set[str] = set()  # objects nothing more may be asked about
    touched: set[str] = set()  # objects asked about (motion_last: their motion may still be asked)
    out = []

    def allowed(q: Question) -> bool:
        who = subject(video, q)
        if held is not None and who == held.colour:
            return q.kind == "recall" and all(q.template != o.template for o in out)
        if motion_last and q.template != "motion" and who in touched:
            return False
        return who not in about and (q.template != "count" or asked["count"] < MAX_COUNTS)

    for t in times:
        options = [q for q in candidates(video, t) if q not in out and allowed(q)]
        if not options:
            continue
        fewest = min(asked[q.kind] for q in options)
        kind = rng.choice(sorted({q.kind for q in options if asked[q.kind] == fewest}))
        question = rng.choice([q for q in options if q.kind == kind])
        asked[kind] += 1
        if (colour := subject(video, question)) is not None:
            touched.add(colour)
            if not motion_last or question.template == "motion":
                about.add(colour)
        out.append(question)
    return out


def stream_questions(rng: random.Random, video: WorldVideo, times: int = 6, per_time: int = 2,
                     held: WorldObject | None = None, motion_last: bool = False) -> list[Question]:
    """Questions asked mid-stream: up to `per_time` different questions at each of `times` distinct
    half-second times from 1 s to the end (held, motion_last: see plan_questions)."""
    grid = [k / 2 for k in range(2, int(video.seconds * 2) + 1)]
    chosen = sorted(rng.sample(grid, min(times, len(grid))))
    return plan_questions(rng, video, [t for t in chosen for _ in range(per_time)], held, motion_last)


def end_questions(rng: random.Random, video: WorldVideo, count: int = 8,
                  held: WorldObject | None = None) -> list[Question]:
    """Up to `count` different questions about the whole video, all asked at its end (held: see
    plan_questions)."""
    return plan_questions(rng, video, [video.seconds] * count, held)


# ---------------------------------------------------------------- files


def video_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def make_video(seed: int, index: int, seconds: float = 8.0,
               leaver: bool = False) -> tuple[WorldVideo, list[Question], list[Question]]:
    """Video `index` of the set made with `seed`: the video, its mid-stream and its end questions.
    leaver: a video whose first leaver goes early and is kept for the recall questions (draw_video,
    plan_questions)."""
    return _make(seed, index, seconds, leaver, rich=False)[:3]


def _make(seed: int, index: int, seconds: float, leaver: bool, rich: bool = True):
    """make_video's video and questions, then (rich) the training dialogue (`rich_dialogue`, else None),
    drawn after them from the same generator so that adding it changed no video and no question of any set."""
    rng = random.Random(video_seed(seed, index))
    video = draw_video(rng, seconds, leaver)
    held = video.first_leaver() if leaver else None
    mid, end = stream_questions(rng, video, held=held), end_questions(rng, video, held=held)
    return video, mid, end, rich_dialogue(rng, video, held) if rich else None


def rich_dialogue(rng: random.Random, video: WorldVideo, held: WorldObject | None = None) -> list[Question]:
    """A training dialogue: mid-stream questions that ask an object's motion after another question about
    it (plan_questions' motion_last), then the description of the whole video at its end.

    Why: the model trained on plain dialogues answered motion 55% of the time, and most of its wrong motion
    answers named the direction of another object in view. This dialogue asks 2.7x the motion questions of
    a plain one (586 against 215 in 300 videos), and its last answer (the description) binds every
    object's attributes and motion; trained on it, the built-in model answers motion 99% of the time. The
    description comes last, so nothing is asked after it that it would answer. One such record per video
    carries what a plain stream record and a LLaVA record carry together, for one pass over the frames.
    """
    questions = stream_questions(rng, video, held=held, motion_last=True)
    summary = describe(video, video.seconds)
    return questions + ([summary] if summary is not None else [])


DIALOGUES = ("plain", "rich")


def generate(out_dir: str | os.PathLike, num_videos: int, seed: int, size: int = SIZE, seconds: float = 8.0,
             fps: int = VIDEO_FPS, leaver: bool = False, dialogue: str = "plain") -> Path:
    """Write num_videos world videos and their records under out_dir; returns out_dir.

    Deterministic for (num_videos, seed, size, seconds, fps, leaver, dialogue); a folder already complete
    for the same parameters is reused as it is. leaver: every video has an object that leaves early
    (draw_video). dialogue: what the streaming records ask: "plain" (make_video's mid-stream questions)
    or "rich" (`rich_dialogue`: more motion questions, then the description; a training set). Videos and
    the LLaVA records do not depend on it.
    """
    if dialogue not in DIALOGUES:
        raise StreamVLMError(f"world: dialogue must be one of {', '.join(DIALOGUES)}, got {dialogue!r}")
    if num_videos < 1:
        raise StreamVLMError(f"world: num_videos must be at least 1, got {num_videos}")
    if size < 32:
        raise StreamVLMError(f"world: size must be at least 32 pixels, got {size}")
    if seconds < 3:
        raise StreamVLMError(f"world: videos must last at least 3 seconds, got {seconds}")
    out = Path(out_dir).expanduser()
    if fps < 1:
        raise StreamVLMError(f"world: fps must be at least 1, got {fps}")
    params = {"num_videos": num_videos, "seed": seed, "size": size, "seconds": seconds, "fps": fps, "version": 4}
    if leaver:
        _check_leaver(seconds)
        params["leaver"] = True  # only when set: folders written before the option stay complete
    if dialogue != "plain":
        params["dialogue"] = dialogue  # likewise
    if _complete(out, params):
        return out
    (out / _MANIFEST).unlink(missing_ok=True)  # until rewritten at the end, the folder is incomplete
    # Videos of an interrupted run (or of fewer videos) are kept when they were drawn with these parameters
    # (the dialogue is only in the records).
    drawn = {k: v for k, v in params.items() if k not in ("num_videos", "dialogue")}
    if _read_json(out / _DRAWN) != drawn:
        for old in (out / "videos").glob("*.mp4"):
            old.unlink()
        (out / "videos").mkdir(parents=True, exist_ok=True)
        write_atomic(out / _DRAWN, lambda tmp: Path(tmp).write_text(json.dumps(drawn)))
    todo = [i for i in range(num_videos) if not (out / video_name(i)).is_file()]
    _draw_videos(out, seed, todo, size, seconds, fps, leaver)
    llava, stream = [], []
    for index in range(num_videos):
        video, mid, _, rich = _make(seed, index, seconds, leaver, rich=dialogue == "rich")
        name = video_name(index)
        meta = {"objects": [asdict(o) for o in video.objects], "seconds": seconds}
        # The LLaVA record describes the whole video at its end (settled there for any video `draw_video`
        # makes); the end questions (`make_video`) are the held-out benchmark's, asked one by one.
        summary = describe(video, video.seconds)
        turns = [{"from": "human", "value": f"<video>\n{summary.text}", "kind": summary.kind},
                 {"from": "gpt", "value": summary.answer}]
        llava.append({"id": f"world-{seed}-{index:04d}", "video": name, "conversations": turns, "meta": meta})
        messages = []
        for q in (rich if rich is not None else mid):
            messages.append({"role": "user", "content": q.text, "time": q.time, "kind": q.kind})
            messages.append({"role": "assistant", "content": q.answer, "time": q.time})
        stream.append({"id": f"world-stream-{seed}-{index:04d}", "video": name, "conversation": messages,
                       "meta": meta})
    texts = {RECORD_FILE: json.dumps(llava, indent=1), STREAM_FILE: "\n".join(json.dumps(r) for r in stream) + "\n",
             _MANIFEST: json.dumps(params)}  # the manifest last: it marks the folder complete
    for name, text in texts.items():
        write_atomic(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    log.info("wrote %d world videos to %s", num_videos, out)
    return out


def video_name(index: int) -> str:
    """A video's path inside a generated folder."""
    return f"videos/{index:04d}.mp4"


def _draw_one(out: Path, seed: int, index: int, size: int, seconds: float, fps: int, leaver: bool) -> None:
    video = make_video(seed, index, seconds, leaver)[0]
    frames = render(video, size, fps)
    write_atomic(out / video_name(index), lambda tmp: write_video(tmp, frames, fps=fps, codec="mpeg4"))


def _draw_videos(out: Path, seed: int, indices: list[int], size: int, seconds: float, fps: int,
                 leaver: bool) -> None:
    """Draw and encode the videos, on every core for a large set (a progress bar from 200 videos)."""
    from tqdm import tqdm

    bar = tqdm(total=len(indices), desc="world videos", unit="video", disable=len(indices) < 200)
    workers = min(os.cpu_count() or 1, 8)
    if workers < 2 or len(indices) < 50:
        for index in indices:
            _draw_one(out, seed, index, size, seconds, fps, leaver)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process that has run torch can deadlock in its thread pools
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            jobs = [(out, seed, i, size, seconds, fps, leaver) for i in indices]
            for _ in pool.map(_draw_one, *zip(*jobs), chunksize=16):
                bar.update()
    bar.close()


def _read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _complete(out: Path, params: dict) -> bool:
    return (_read_json(out / _MANIFEST) == params and (out / RECORD_FILE).is_file()
            and (out / STREAM_FILE).is_file())

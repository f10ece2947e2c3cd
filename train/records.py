"""Record files: video instruction records in the formats people publish them in, parsed into `Record`s.

A record file is a JSON list or a JSONL file (one object per line). Each object's format is detected on its
own, so one file may mix them:

- LLaVA-Video-178K / LLaVA-OneVision (`conversations`, turns `from` human/gpt): every frame comes before
  the first question, as transformers' processor lays out one video and a dialogue.
- VideoLLM-online streaming (`conversation`, messages with `role`, `content` and `time` in seconds):
  frames and exchanges interleave by stream time, and frames after the last exchange are not decoded.
- VideoChat / VideoChat2 instructions (`QA`, a list of `i` instruction, `q` question, `a` answer): a LLaVA
  style dialogue; an exchange's user turn is its instruction and question, the instruction only where it
  changes (VideoChat2 writes one instruction for the whole list).
- ShareGPT4Video captions (`captions`, `caption` or `summary`; the video in `video` or `video_path`, the
  id in `id` or `video_id`): the whole-video caption answers CAPTION_QUESTION as a LLaVA style record, and
  keyframe captions with times (an entry's own `time`/`timestamp`, or the record's `timestamp` list indexed
  by the entry's `idx`) become a streaming record that answers SEGMENT_QUESTION at each keyframe. One object
  may give both records. In ShareGPT4Video's released `sharegpt4video_40k.jsonl`, the entry with idx "-1"
  is the whole-video caption and the others describe keyframes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from streamvlm.errors import StreamVLMError

log = logging.getLogger(__name__)

# Float slack when comparing times (seconds).
_EPS = 1e-6
# "<video>\n" / "<image>\n" placeholders in LLaVA human turns; the video goes where the processor puts it.
_PLACEHOLDER = re.compile(r"<(?:video|image)>\n?")
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
# Roles carried by some streaming records that hold no exchange (VideoLLM-online marks frame runs "stream").
_STREAM_IGNORED = ("system", "stream")
# A caption entry's text and time keys, in the order they are looked for.
_CAPTION_TEXT = ("content", "caption", "text")
_CAPTION_TIME = ("time", "timestamp", "start")
# Bad records named one by one before the rest are only counted.
_WARN_LIMIT = 20

CAPTION_QUESTION = "Describe this video in detail."
"""What a ShareGPT4Video record's whole-video caption answers."""
SEGMENT_QUESTION = "What is happening in the video now?"
"""What each keyframe caption of a ShareGPT4Video record answers, at its keyframe's time."""


@dataclass(frozen=True)
class Exchange:
    """A user question and the assistant's answer."""

    question: str
    answer: str
    """"" when the record has none (a streaming question the assistant never answered)."""
    time: float | None = None
    """Stream time (s) the exchange happens at, for streaming records; None for LLaVA records."""


@dataclass(frozen=True)
class Record:
    """One parsed record of a record file, or a part of one (a record split to fit the model's context)."""

    id: str
    video: str
    """Absolute path of the video file (resolved against video_root or the record file's folder)."""
    kind: Literal["llava", "stream"]
    exchanges: tuple[Exchange, ...]
    """In order; for "stream" records each has a time and times never decrease."""
    source: str
    """Where the record is, for messages: "file.json record 3" or "file.jsonl line 5"."""
    start: float | None = None
    """For a later part of a split streaming record: the time (s) of the part before's last exchange. Its
    frames, those at or before this time, belong to that part. None: from the start of the video."""


class _BadRecord(Exception):
    """What is wrong with a record; read_records adds where it is."""


def load_records(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> list[Record]:
    """The records of a record file (a JSON list, or JSONL), every object in any supported format.

    Relative video paths are resolved against video_root, else the record file's folder. Raises
    StreamVLMError naming the file and the record (index or line, and id) at the first malformed one; use
    read_records to skip them instead.
    """
    records, problems = read_records(path, video_root)
    if problems:
        raise StreamVLMError(problems[0])
    return records


def read_records(path: str | os.PathLike, video_root: str | os.PathLike | None = None
                 ) -> tuple[list[Record], list[str]]:
    """(records, problems): the file's well-formed records, and for each malformed one a message naming the
    file, the record and what is wrong. Raises StreamVLMError when the file is missing, unreadable, not
    JSON or JSONL, or holds no objects at all."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StreamVLMError(f"record file not found: {path}. Check train_file / val_file.")
    root = Path(video_root).expanduser() if video_root is not None else path.parent
    records: list[Record] = []
    problems: list[str] = []
    count = 0
    for where, obj in _read_objects(path):
        count += 1
        try:
            records += _parse_record(obj, where, root)
        except StreamVLMError as e:
            problems.append(str(e))
    if not count:
        raise StreamVLMError(f"{path} holds no records; a record file is a JSON list or one JSON object per line")
    return records, problems


def warn_bad_records(problems: list[str]) -> None:
    """One warning per malformed record, the first _WARN_LIMIT of them, then one for the rest."""
    for problem in problems[:_WARN_LIMIT]:
        log.warning("skipping a malformed record: %s", problem)
    if len(problems) > _WARN_LIMIT:
        log.warning("skipping %d more malformed records", len(problems) - _WARN_LIMIT)


def _read_objects(path: Path) -> Iterator[tuple[str, object]]:
    """(where, object) for each record of a JSON list, or of a JSONL file (one object per line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte order mark
    except (OSError, UnicodeDecodeError) as e:
        raise StreamVLMError(f"cannot read the record file {path} ({e}); it must be UTF-8 JSON or JSONL") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise StreamVLMError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
        for index, obj in enumerate(items):
            yield f"{path} record {index}", obj
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StreamVLMError(
                f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno}); a JSONL file holds "
                "one record object per line, a JSON file a list of records") from e
        yield f"{path} line {number}", obj


def _parse_record(obj: object, where: str, root: Path) -> list[Record]:
    """The records one object gives (two for a ShareGPT4Video object with a summary and timed keyframes)."""
    record_id = None
    if isinstance(obj, dict):
        record_id = obj.get("id", obj.get("video_id"))
    label = where if record_id is None else f"{where} (id {record_id!r})"
    try:
        if not isinstance(obj, dict):
            raise _BadRecord(f"a record must be a JSON object, got {type(obj).__name__}")
        if "conversations" in obj:
            parts = [("", "llava", _llava_exchanges(obj["conversations"]))]
        elif "conversation" in obj:
            parts = [("", "stream", _stream_exchanges(obj["conversation"]))]
        elif "QA" in obj:
            parts = [("", "llava", _videochat_exchanges(obj["QA"]))]
        elif any(key in obj for key in ("captions", "caption", "summary")):
            parts = _caption_parts(obj)
        else:
            raise _BadRecord("is in no known format: it has none of 'conversations' (LLaVA), 'conversation' "
                             "(streaming), 'QA' (VideoChat) or 'captions' / 'caption' / 'summary' (ShareGPT4Video)")
        video = _video_path(obj)
        if not any(exchanges for _, _, exchanges in parts):
            raise _BadRecord("has no exchanges (no question with an answer)")
    except _BadRecord as e:
        raise StreamVLMError(f"{label}: {e}") from None
    base = str(record_id) if record_id is not None else where
    path = os.path.abspath(root / Path(video).expanduser())
    return [Record(id=base + suffix, video=path, kind=kind, exchanges=tuple(exchanges), source=where)
            for suffix, kind, exchanges in parts if exchanges]


def _video_path(obj: dict) -> str:
    for key in ("video", "video_path"):
        video = obj.get(key)
        if isinstance(video, str) and video:
            return video
    raise _BadRecord("missing key 'video' (or 'video_path'): the video's path, relative to video_root")


def _strip_placeholders(text: str) -> str:
    return _PLACEHOLDER.sub("", text).strip()


def _field(turn: object, index: int, key: str, what: str = "turn") -> str:
    if not isinstance(turn, dict):
        raise _BadRecord(f"{what} {index} must be an object, got {type(turn).__name__}")
    value = turn.get(key)
    if not isinstance(value, str):
        raise _BadRecord(f"{what} {index} has no string {key!r}")
    return value


def _llava_exchanges(turns: object) -> list[Exchange]:
    """Pairs of human and gpt turns, in order."""
    if not isinstance(turns, list):
        raise _BadRecord("'conversations' must be a list of turns")
    exchanges, pending = [], None  # pending: (turn index, question) of a human turn awaiting its answer
    for index, turn in enumerate(turns):
        role = _field(turn, index, "from")
        text = _field(turn, index, "value")
        if role in _HUMAN:
            if pending is not None:
                raise _BadRecord(f"human turn {pending[0]} has no gpt turn after it")
            pending = (index, _strip_placeholders(text))
        elif role in _GPT:
            if pending is None:
                raise _BadRecord(f"gpt turn {index} has no human turn before it")
            exchanges.append(Exchange(pending[1], text.strip()))
            pending = None
        elif role != "system":
            raise _BadRecord(f"turn {index} has an unknown 'from' {role!r}; expected human or gpt")
    if pending is not None:
        raise _BadRecord(f"human turn {pending[0]} has no gpt turn after it")
    return exchanges


def _stream_exchanges(messages: object) -> list[Exchange]:
    """Each assistant message with the latest user message before it; unanswered questions get answer ""."""
    if not isinstance(messages, list):
        raise _BadRecord("'conversation' must be a list of messages")
    exchanges: list[Exchange] = []
    question: tuple[str, float] | None = None  # (text, time) of the latest user message
    answered = False
    last_time = 0.0
    for index, message in enumerate(messages):
        role = _field(message, index, "role", "message")
        if role in _STREAM_IGNORED:
            continue
        if role not in ("user", "assistant"):
            raise _BadRecord(f"message {index} has an unknown role {role!r}; expected user or assistant")
        text = _field(message, index, "content", "message")
        time = _time(message.get("time"), f"message {index}'s 'time'")
        if time < last_time - _EPS:
            raise _BadRecord(f"message {index} at {time}s is earlier than the message before it ({last_time}s)")
        last_time = time
        if role == "user":
            if question is not None and not answered:
                exchanges.append(Exchange(question[0], "", question[1]))
            question, answered = (_strip_placeholders(text), time), False
        else:
            if question is None:
                raise _BadRecord(f"assistant message {index} has no user message before it")
            exchanges.append(Exchange(question[0], text.strip(), time))
            answered = True
    if question is not None and not answered:
        exchanges.append(Exchange(question[0], "", question[1]))
    return exchanges


def _time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise _BadRecord(f"{what} must be a time in seconds >= 0, got {value!r}")
    return float(value)


def _videochat_exchanges(items: object) -> list[Exchange]:
    """VideoChat's `QA` list: each {i, q, a} an exchange whose user turn is the instruction (where it differs
    from the one before) and the question, one paragraph each."""
    if not isinstance(items, list):
        raise _BadRecord("'QA' must be a list of {i, q, a} objects")
    exchanges: list[Exchange] = []
    instruction = ""
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _BadRecord(f"QA item {index} must be an object, got {type(item).__name__}")
        for key in ("i", "q"):
            if not isinstance(item.get(key, ""), str):
                raise _BadRecord(f"QA item {index} has a non-string {key!r}")
        answer = _field(item, index, "a", "QA item")
        new = _strip_placeholders(item.get("i", ""))
        question = _strip_placeholders(item.get("q", ""))
        if not new and not question:
            raise _BadRecord(f"QA item {index} has neither an instruction 'i' nor a question 'q'")
        if not answer.strip():
            raise _BadRecord(f"QA item {index} has an empty answer 'a'")
        turn = "\n".join(text for text in (new if new != instruction else "", question) if text)
        instruction = new or instruction
        exchanges.append(Exchange(turn, answer.strip()))
    return exchanges


def _caption_parts(obj: dict) -> list[tuple[str, str, list[Exchange]]]:
    """A ShareGPT4Video object's records: (id suffix, kind, exchanges) for the whole-video caption (a LLaVA
    record, suffix "") and the timed keyframe captions (a streaming record, suffix "#keyframes")."""
    summary = None
    for key in ("summary", "caption"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise _BadRecord(f"'{key}' must be a string, got {type(value).__name__}")
        if value and value.strip():
            summary = value.strip()
            break
    entries = obj.get("captions", [])
    if not isinstance(entries, list):
        raise _BadRecord("'captions' must be a list of captions (strings, or objects with 'idx' and 'content')")
    times = obj.get("timestamp", obj.get("timestamps"))
    if times is not None and not isinstance(times, list):
        raise _BadRecord("'timestamp' must be a list of keyframe times in seconds")
    timed: list[tuple[float, str]] = []
    untimed: list[str] = []
    position = 0  # keyframe index of an entry without idx: its place among the keyframe captions
    for index, entry in enumerate(entries):
        text, idx, time = _caption_entry(entry, index)
        if idx == -1:  # ShareGPT4Video: the whole-video caption
            summary = summary or text
            continue
        key = position if idx is None else idx
        position += 1
        if time is None and times is not None and 0 <= key < len(times):
            time = _time(times[key], f"'timestamp' {key}")
        (untimed.append(text) if time is None else timed.append((time, text)))
    if summary is None and untimed and not timed:
        summary = " ".join(untimed)  # keyframe captions without times read in order as one description
    parts = []
    if summary:
        parts.append(("", "llava", [Exchange(CAPTION_QUESTION, summary)]))
    if timed:
        timed.sort(key=lambda item: item[0])
        parts.append(("#keyframes", "stream", [Exchange(SEGMENT_QUESTION, text, time) for time, text in timed]))
    if not parts:
        raise _BadRecord("has no caption: 'captions' is empty and there is no 'summary' or 'caption'")
    return parts


def _caption_entry(entry: object, index: int) -> tuple[str, int | None, float | None]:
    """(text, idx or None, time or None) of one entry of 'captions'."""
    if isinstance(entry, str):
        if not entry.strip():
            raise _BadRecord(f"caption {index} is empty")
        return entry.strip(), None, None
    if not isinstance(entry, dict):
        raise _BadRecord(f"caption {index} must be a string or an object, got {type(entry).__name__}")
    text = next((entry[key] for key in _CAPTION_TEXT if isinstance(entry.get(key), str)), None)
    if text is None or not text.strip():
        raise _BadRecord(f"caption {index} has no text ('content', 'caption' or 'text')")
    idx = entry.get("idx")
    if idx is not None:
        try:
            idx = int(idx)
        except (TypeError, ValueError):
            raise _BadRecord(f"caption {index} has an 'idx' that is not a whole number: {idx!r}") from None
    key = next((key for key in _CAPTION_TIME if key in entry), None)
    time = _time(entry[key], f"caption {index}'s {key!r}") if key is not None else None
    return text.strip(), idx, time

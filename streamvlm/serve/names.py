"""What a client sees instead of the server's own paths.

The video reader and the sources name files by their absolute paths, which is what the command line
wants. A client of the server must not learn the server's folders (its home, cache, temporary, media,
model and working folders), so text the server sends on (error messages, stream figures, live events)
goes through `ClientNames` on its way out: a file in the media folder becomes its name relative to the
folder (what the client asked for), the sample video `sample`, an uploaded data: URI `the data: URI
video`, and any other path in one of those folders is named by the folder (`<cache>/...`). The
credentials in a URL (a camera's `rtsp://user:password@...`) are hidden the same way.

Answers and questions are not rewritten: the model's words are not the server's paths.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from streamvlm.paths import cache_dir
from streamvlm.serve.media import UPLOAD_PREFIX, UPLOAD_SUFFIX
from streamvlm.world.sample import SAMPLE_NAME

# user[:password]@ after a URL's scheme
_CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)

# What may follow a folder's path when the path ends there: not more of a name (a sentence's full stop may)
_END = r"(?![\w~+-]|\.[\w~+-])"


class ClientNames:
    def __init__(self, media_dir: Path | None, model_dir: Path | None = None):
        # (folder or file, what a path inside it starts with instead, what the path itself is called)
        named = [(cache_dir() / SAMPLE_NAME, "sample/", "sample"),  # a file: nothing is inside it
                 (media_dir, "", "the media folder"),
                 (model_dir, "<model>/", "the model folder"),
                 (cache_dir(), "<cache>/", "the cache folder"),
                 (Path(tempfile.gettempdir()), "<temp>/", "the temporary folder"),
                 (Path.cwd(), "./", "the server's working folder"),
                 (Path.home(), "~/", "~")]
        rules: dict[str, tuple[str, str]] = {}
        for path, inside, whole in named:
            if path is None:
                continue
            for form in {str(Path(path).expanduser().absolute()), os.path.realpath(Path(path).expanduser())}:
                if form != "/":
                    rules.setdefault(form.rstrip("/"), (inside, whole))
        # The longest first: a file in the media folder is named by the media folder, not by /tmp above it.
        self._rules = [(re.compile(re.escape(form) + rf"(?:(/)|{_END})"), inside, whole)
                       for form, (inside, whole) in sorted(rules.items(), key=lambda item: -len(item[0]))]
        uploads = {str(Path(tempfile.gettempdir()).absolute()), os.path.realpath(tempfile.gettempdir())}
        self._upload = re.compile("(?:" + "|".join(map(re.escape, sorted(uploads, key=len, reverse=True))) + ")/" +
                                  re.escape(UPLOAD_PREFIX) + r"\w+" + re.escape(UPLOAD_SUFFIX))

    def text(self, text: str) -> str:
        """`text` with every path in a known folder named as the client knows it, and the credentials of
        every URL (rtsp://user:password@host/...) hidden: every client with the key sees every stream."""
        if "/" not in text:
            return text
        text = _CREDENTIALS.sub(r"\1***@", text)
        text = self._upload.sub("the data: URI video", text)
        for pattern, inside, whole in self._rules:
            # group 1 is the "/" after a folder: what follows is a path inside it
            text = pattern.sub(lambda m, inside=inside, whole=whole: whole if m.group(1) is None else inside, text)
        return text

    def figures(self, value):
        """A JSON-like value (dicts, lists, strings, numbers) with `text` applied to every string in it."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.figures(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.figures(item) for item in value]
        return value

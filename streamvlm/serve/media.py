"""What a request may point the server at: video and image files under one folder, data: URIs, live sources.

Paths are resolved with symlinks followed and must land inside the allowed folder, so `../` and a link out
of the folder are both refused. A data: URI is decoded (base64) into a temporary file, with its size
checked before decoding.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamvlm.serve.errors import APIError
from streamvlm.video.live import NETWORK_SCHEMES

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts", ".m4v", ".flv", ".mpg", ".mpeg")
UPLOAD_PREFIX, UPLOAD_SUFFIX = "streamvlm-upload-", ".video"
"""How a data: URI's temporary file is named (in tempfile.gettempdir()), so responses can call it what the client
sent (streamvlm.serve.names)."""
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)


@dataclass(frozen=True)
class MediaPolicy:
    allowed_dir: Path | None
    """Video files a request may name, by a path relative to this folder (None: no files at all)."""
    max_data_bytes: int = 32 * 2**20
    """Largest video accepted inline as a data: URI, and largest image (inline or a file), in bytes."""
    allow_devices: bool = True
    """Whether a live stream may open /dev/videoN (a camera on the server)."""

    def file(self, ref: str, param: str, instead: str = "send the video as a data: URI") -> Path:
        """A path the client gave, relative to the media folder (or absolute inside it), as a real path."""
        if self.allowed_dir is None:
            raise APIError(400, f"{param}: this server reads no files (start it with --allowed-media-dir DIR); "
                                f"{instead}", param=param, code="media_dir_disabled")
        ref = ref.removeprefix("file://")
        root = self.allowed_dir.resolve()
        candidate = Path(ref)
        try:
            path = (candidate if candidate.is_absolute() else root / candidate).resolve()
            outside = path != root and root not in path.parents
            found = not outside and path.is_file()
        except OSError as e:  # a name over NAME_MAX/PATH_MAX (ENAMETOOLONG), a loop of links (ELOOP), ...
            raise APIError(400, f"{param}: not a usable path ({e.strerror or type(e).__name__})", param=param,
                           code="bad_path") from None
        if outside:
            raise APIError(403, f"{param}: {ref!r} is outside the allowed media folder; name a file inside it, "
                                "e.g. a path relative to it", param=param, code="path_not_allowed")
        if not found:
            raise APIError(404, f"{param}: no file {ref!r} in the media folder", param=param, code="file_not_found")
        return path

    @contextmanager
    def video(self, url: str, param: str) -> Iterator[Path]:
        """The video of a `video_url` part as a local file: a file in the media folder, or a data: URI written
        to a temporary file for as long as the context lasts."""
        if url.startswith("data:"):
            data = self.decode_data_uri(url, param)
            fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=UPLOAD_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                yield Path(name)
            finally:
                os.unlink(name)
            return
        yield self.local(url, param, "video")

    def image(self, url: str, param: str) -> bytes:
        """The bytes of an `image_url` part: a data: URI, or a file in the media folder, each at most
        max_data_bytes."""
        if url.startswith("data:"):
            return self.decode_data_uri(url, param, "image")
        path = self.local(url, param, "image")
        size = path.stat().st_size
        if size > self.max_data_bytes:
            raise APIError(413, f"{param}: the image file is {size / 2**20:.1f} MiB; the limit is "
                                f"{self.max_data_bytes / 2**20:.1f} MiB an image (--max-data-mb)", param=param,
                           code="image_too_large")
        return path.read_bytes()

    def local(self, url: str, param: str, what: str) -> Path:
        """A URL that names a file in the media folder (a path, or file://); other schemes are not fetched."""
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme and scheme != "file":
            live = " (live streams: POST /v1/streams)" if what == "video" else ""
            raise APIError(400, f"{param}: {scheme}:// URLs are not fetched; give a file in the media folder or a "
                                f"data: URI{live}", param=param, code="unsupported_url")
        return self.file(url, param, instead=f"send the {what} as a data: URI")

    def decode_data_uri(self, url: str, param: str, what: str = "video") -> bytes:
        example = {"video": "data:video/mp4;base64,...", "image": "data:image/png;base64,..."}[what]
        match = _DATA_URI.match(url)
        if match is None or not match.group("b64"):
            raise APIError(400, f"{param}: a data: URI must be base64 ({example})", param=param,
                           code="bad_data_uri")
        payload = url[match.end():]
        if len(payload) * 3 // 4 > self.max_data_bytes:  # checked before decoding anything
            raise APIError(413, f"{param}: the inline {what} is about {len(payload) * 3 // 4 / 2**20:.1f} MiB; the "
                                f"limit is {self.max_data_bytes / 2**20:.1f} MiB (--max-data-mb); put the file in "
                                "the media folder instead", param=param, code="data_uri_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data: URI is not valid base64", param=param, code="bad_data_uri") \
                from None

    def live_source(self, spec: str, param: str = "source") -> str:
        """A live source spec a client may open: `sample`, a network URL, a camera, or a file in the folder
        (played as live). lavfi graphs are refused: their `movie=` filter reads any file."""
        spec = spec.strip()
        if not spec:
            raise APIError(400, f"{param}: empty; give `sample`, a stream URL or a file in the media folder",
                           param=param)
        if spec == "sample":
            return spec
        if spec.startswith("lavfi:"):
            raise APIError(403, f"{param}: lavfi sources are not opened by the server", param=param,
                           code="source_not_allowed")
        if spec.startswith("/dev/video"):
            if not self.allow_devices:
                raise APIError(403, f"{param}: cameras are not opened by this server", param=param,
                               code="source_not_allowed")
            return spec
        if "://" in spec:
            scheme = spec.split("://", 1)[0].lower()
            if scheme not in NETWORK_SCHEMES:
                raise APIError(400, f"{param}: {scheme}:// is not a stream this server opens; use one of "
                                    f"{', '.join(NETWORK_SCHEMES)}", param=param, code="unsupported_url")
            return spec
        return str(self.file(spec, param, instead="open `sample` or a stream URL (rtsp://, udp://, ...)"))

    def listing(self) -> list[str]:
        """Video files in the media folder (relative paths, sorted), for the web page's picker."""
        if self.allowed_dir is None:
            return []
        root = self.allowed_dir.resolve()
        found = []
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                real = path.resolve()
                if root in real.parents:  # a symlink out of the folder is not offered
                    found.append(str(path.relative_to(root)))
        return found

"""The exception types for mistakes a user can make."""


class StreamVLMError(Exception):
    """A problem with the user's input (path, checkpoint, frames, prompt, URL, file).

    The message says what is wrong and what to do about it; the CLI prints it without a traceback.
    """


class FrameBudgetError(StreamVLMError):
    """A video read would give more frames than the model's context holds; nothing was decoded."""

    def __init__(self, message: str, frames: int, limit: int):
        super().__init__(message)
        self.frames = frames
        """The frames the read asked for."""
        self.limit = limit
        """The most input frames that fit."""

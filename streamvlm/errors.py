"""The one exception type for mistakes a user can make."""


class StreamVLMError(Exception):
    """A problem with the user's input (path, checkpoint, frames, prompt, URL, file).

    The message says what is wrong and what to do about it; the CLI prints it without a traceback.
    """

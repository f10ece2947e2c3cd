"""streamvlm: stream video into a video language model's KV cache, with per-layer token routing."""

from streamvlm.errors import StreamVLMError
from streamvlm.generation import SamplingConfig
from streamvlm.routers import RoutingConfig
from streamvlm.runtime import StreamVLM
from streamvlm.session import Session

__all__ = ["RoutingConfig", "SamplingConfig", "Session", "StreamVLM", "StreamVLMError"]
__version__ = "0.1.0"

"""dense: every vision token through every layer, the model as trained (DenseRouter in base.py)."""

from __future__ import annotations

from streamvlm.routers.base import DenseRouter
from streamvlm.routers.config import RoutingConfig
from streamvlm.routers.policy import Policy

POLICY = Policy(
    name="dense", grammar="dense", config=RoutingConfig, parse=RoutingConfig.parse,
    summary="every vision token through every layer: the model as trained (the default)",
    build=lambda config, num_layers, hidden_size: DenseRouter(),
    example="dense", default="dense", quality=("dense",))

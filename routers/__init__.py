"""Routers: which vision tokens each decoder layer processes (installed as streamvlm.routers).

Imports only torch and streamvlm core types: the runtime uses routers without Lightning.
"""

from streamvlm.routers.base import DenseRouter, RouteDecision, Router
from streamvlm.routers.baselines import BaselineRouter
from streamvlm.routers.config import RoutingConfig
from streamvlm.routers.mod import MoDRouter
from streamvlm.routers.pruning import FastVConfig, LayerDropConfig, PDropConfig
from streamvlm.routers.registry import build_router, load_router, parse_routing, resolve_routing, save_router

__all__ = ["BaselineRouter", "DenseRouter", "FastVConfig", "LayerDropConfig", "PDropConfig", "parse_routing", "MoDRouter", "RouteDecision", "Router", "RoutingConfig", "build_router", "load_router",
           "resolve_routing", "save_router"]

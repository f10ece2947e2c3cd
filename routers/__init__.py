"""Routers: which vision tokens each decoder layer processes (installed as streamvlm.routers)."""

from streamvlm.routers.base import DenseRouter, RouteDecision, Router

__all__ = ["DenseRouter", "RouteDecision", "Router"]

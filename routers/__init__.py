"""Routers: which vision tokens each decoder layer processes (installed as streamvlm.routers).

One file per policy (dense, mod, baselines, layer_drop, fastv, pdrop, skip, neighbor_attention, cls_knee,
schedule, head_prune, yopo), each ending with its `Policy`; `registry` loads them through the `streamvlm.routers`
entry-point group. Imports only torch and streamvlm core types: the runtime uses routers without Lightning.
"""

from streamvlm.routers.base import (DenseRouter, LayerVariant, PrunedHeads, RouteDecision, Router, VisionSkip,
                                    WindowAttention, YopoLayer)
from streamvlm.routers.baselines import BaselineRouter
from streamvlm.routers.config import RoutingConfig
from streamvlm.routers.fastv import FastVConfig
from streamvlm.routers.layer_drop import LayerDropConfig
from streamvlm.routers.mod import MoDRouter
from streamvlm.routers.pdrop import PDropConfig
from streamvlm.routers.policy import Arg, ModelSample, PerModel, Policy
from streamvlm.routers.registry import (build_router, get_policy, load_router, parse_routing, policies,
                                        resolve_routing, save_router)

__all__ = ["Arg", "BaselineRouter", "DenseRouter", "FastVConfig", "LayerDropConfig", "LayerVariant", "ModelSample", "MoDRouter",
           "PDropConfig", "PerModel", "Policy", "PrunedHeads", "RouteDecision", "Router", "RoutingConfig", "build_router",
           "get_policy", "load_router", "parse_routing", "policies", "resolve_routing", "save_router", "VisionSkip", "WindowAttention",
           "YopoLayer"]

"""Search level: hardware-aware QuadraNet search (ProxylessNAS-style) under a latency budget."""

from quadranet.models.quadranet_nas import Arch, load_arch
from quadranet.nas.space import MixedOp, SearchSpace, Supernet

__all__ = ["Arch", "MixedOp", "SearchSpace", "Supernet", "load_arch"]

"""The torch.fx rewrite: discover the block chain, plan the idle layers, rewrite the blocks."""

from .discover import ViTLayout, discover
from .plan import IdlePlan, make_plan
from .rewrite import apply_plan, idle_block

__all__ = ["ViTLayout", "discover", "IdlePlan", "make_plan", "apply_plan", "idle_block"]

"""distillm_ext: fused kernels and a lean trainer for DistiLLM knowledge distillation."""

from ._load import build_info
from .losses import LOSSES, make_loss
from .ops import skew_kl

__all__ = ["LOSSES", "build_info", "make_loss", "skew_kl"]

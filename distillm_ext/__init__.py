"""distillm_ext: fused kernels and a lean trainer for DistiLLM knowledge distillation."""

from ._load import build_info
from .losses import LOSSES, SparseTeacher, make_loss
from .ops import (fused_linear_kd, fused_linear_kd_topk, fused_linear_skew_kl, release_cached_gradients, skew_kl,
                  skew_kl_topk)
from .replay import ReplayBuffer
from .schedule import AdaptiveSGOScheduler

__all__ = ["LOSSES", "AdaptiveSGOScheduler", "ReplayBuffer", "build_info", "fused_linear_kd",
           "fused_linear_kd_topk", "fused_linear_skew_kl", "make_loss", "release_cached_gradients",
           "SparseTeacher", "skew_kl", "skew_kl_topk"]

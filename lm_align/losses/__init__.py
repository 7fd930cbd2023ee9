"""Losses: language modelling (lm), pairwise preference and listwise ranking losses.

    from lm_align.losses import lm_loss, preference, listwise
    preference.dpo(pc, pr, rc, rr, beta=0.1)      # per example [B]
    listwise.lipo_lambda(scores, labels, mask)     # per list [B]
"""

from lm_align.losses import listwise, preference
from lm_align.losses.lm import LMLoss, lm_loss

__all__ = ["LMLoss", "listwise", "lm_loss", "preference"]

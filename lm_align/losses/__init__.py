"""Losses: language modelling (lm); preference and listwise losses build on the same log-probs."""

from lm_align.losses.lm import LMLoss, lm_loss

__all__ = ["LMLoss", "lm_loss"]

"""Alignment: sequence log-probs and the pieces preference training builds on."""

from lm_align.align.logprobs import SequenceLogprobs, sequence_logprobs

__all__ = ["SequenceLogprobs", "sequence_logprobs"]

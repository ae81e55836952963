"""Speculative drafting: the edge drafts a block, the cloud verifies it in one forward pass.

The strategy (`SpeculativeStrategy`) and how many tokens to draft per round (draft-length policies).
"""

from tether.edge.speculative._strategy import SpeculativeOptions
from tether.edge.speculative._draft_length import AdaptiveDraftLength, DraftLengthPolicy, FixedDraftLength, HeuristicDraftLength, RoundObservation

__all__ = ["AdaptiveDraftLength", "DraftLengthPolicy", "FixedDraftLength", "HeuristicDraftLength", "RoundObservation", "SpeculativeOptions"]

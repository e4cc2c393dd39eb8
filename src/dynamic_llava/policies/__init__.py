"""Who decides which tokens layers >= K keep: one small interface (`TokenPolicy`), one module per method.

The engine that applies a policy (gather, cache, masks) is `decoder.py`; see `base.py` for the
questions a policy answers.
"""

from .base import PolicyContext, TextSlots, TokenPolicy, attention_probe, check_policy, layer_keys
from .cdpruner import CDPrunerPolicy
from .composed import ComposedPolicy
from .dart import DARTPolicy
from .fastv import FastVPolicy
from .h2o import H2OPolicy
from .learned import LearnedPolicy, learned_image_scores
from .random import RandomPolicy
from .streaming import StreamingLLMPolicy

__all__ = [
    "CDPrunerPolicy",
    "ComposedPolicy",
    "DARTPolicy",
    "FastVPolicy",
    "H2OPolicy",
    "LearnedPolicy",
    "PolicyContext",
    "RandomPolicy",
    "StreamingLLMPolicy",
    "TextSlots",
    "TokenPolicy",
    "check_policy",
    "attention_probe",
    "layer_keys",
    "learned_image_scores",
]

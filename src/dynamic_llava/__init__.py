"""Dynamic-LLaVA: vision-language context sparsification for LLaVA models on HuggingFace transformers."""

from .auto import from_pretrained, model_class_for
from .cache import DynamicLlavaCache, SparseLayer
from .config import DynamicLlavaConfig
from .control import SparsityController, SparsityRequest
from .llava_next import (
    DynamicLlavaNextConfig,
    DynamicLlavaNextForConditionalGeneration,
    DynamicLlavaOnevisionConfig,
    DynamicLlavaOnevisionForConditionalGeneration,
)
from .modeling import (
    DynamicLlamaModel,
    DynamicLlavaForConditionalGeneration,
    DynamicLlavaModel,
    DynamicLlavaOutput,
)
from .policies import (
    CDPrunerPolicy,
    ComposedPolicy,
    DARTPolicy,
    FastVPolicy,
    H2OPolicy,
    LearnedPolicy,
    PolicyContext,
    RandomPolicy,
    StreamingLLMPolicy,
    TextSlots,
    TokenPolicy,
)
from .predictors import ImagePredictor, TextPredictor
from .qwen2_vl import (
    DynamicQwen2_5_VLConfig,
    DynamicQwen2_5_VLForConditionalGeneration,
    DynamicQwen2VLConfig,
    DynamicQwen2VLForConditionalGeneration,
    DynamicQwen3VLConfig,
    DynamicQwen3VLForConditionalGeneration,
)
from .stats import ForwardRecord, SparsityStats

__version__ = "0.1.0"

__all__ = [
    "DynamicLlavaCache",
    "DynamicLlavaConfig",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlamaModel",
    "DynamicLlavaNextConfig",
    "DynamicLlavaNextForConditionalGeneration",
    "DynamicLlavaOnevisionConfig",
    "DynamicLlavaOnevisionForConditionalGeneration",
    "DynamicQwen2VLConfig",
    "DynamicQwen2VLForConditionalGeneration",
    "DynamicQwen2_5_VLConfig",
    "DynamicQwen2_5_VLForConditionalGeneration",
    "DynamicQwen3VLConfig",
    "DynamicQwen3VLForConditionalGeneration",
    "DynamicLlavaOutput",
    "CDPrunerPolicy",
    "ComposedPolicy",
    "DARTPolicy",
    "FastVPolicy",
    "ForwardRecord",
    "H2OPolicy",
    "ImagePredictor",
    "LearnedPolicy",
    "PolicyContext",
    "RandomPolicy",
    "SparseLayer",
    "SparsityController",
    "SparsityRequest",
    "SparsityStats",
    "StreamingLLMPolicy",
    "TextPredictor",
    "TextSlots",
    "TokenPolicy",
    "from_pretrained",
    "model_class_for",
]

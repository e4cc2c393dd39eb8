"""Converting released checkpoints (the authors' Dynamic-LLaVA, LLaVA-1.5, llava-hf) into ours."""

from .convert import (
    LLAVA_V1_SYSTEM_CHAT_TEMPLATE,
    VICUNA_SYSTEM,
    ConversionError,
    ConversionReport,
    convert,
    detect_layout,
)
from .keys import UnmappableTensor

__all__ = ["ConversionError", "ConversionReport", "LLAVA_V1_SYSTEM_CHAT_TEMPLATE", "UnmappableTensor",
           "VICUNA_SYSTEM", "convert", "detect_layout"]

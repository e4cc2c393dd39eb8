"""Training data: LLaVA conversation records turned into llava-hf model inputs."""

from .conversations import IGNORE_INDEX, LLAVA_V1_CHAT_TEMPLATE, LlavaCollator, LlavaConversationDataset

__all__ = ["IGNORE_INDEX", "LLAVA_V1_CHAT_TEMPLATE", "LlavaCollator", "LlavaConversationDataset"]

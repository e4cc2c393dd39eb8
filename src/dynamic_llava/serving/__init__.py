"""Answering requests: chat messages with images in, per-request sparsity, continuous batching, and an
OpenAI-compatible HTTP server (`server.py`, needs FastAPI and uvicorn)."""

from .batching import Job, RunningBatch, Scheduler
from .engine import POLICIES, Engine, Limits, make_policy
from .messages import ImageLimits, RequestError, load_image, to_chat

__all__ = ["Engine", "ImageLimits", "Job", "Limits", "POLICIES", "RequestError", "RunningBatch", "Scheduler",
           "load_image", "make_policy", "to_chat"]

"""The black-box inference service: a frozen backbone that answers logits and losses over HTTP."""

from fedprompt.serving.app import create_app
from fedprompt.serving.auth import parse_tokens
from fedprompt.serving.runner import serve_in_thread
from fedprompt.serving.service import InferenceService, RequestError, ServiceLimits

__all__ = [
    "InferenceService",
    "RequestError",
    "ServiceLimits",
    "create_app",
    "parse_tokens",
    "serve_in_thread",
]

"""The black-box inference service: a frozen backbone that answers logits and losses over HTTP."""

from fedprompt.serving.admission import Admission, AdmissionSettings
from fedprompt.serving.app import create_app
from fedprompt.serving.auth import parse_tokens
from fedprompt.serving.runner import serve_in_thread
from fedprompt.serving.service import (
    InferenceService,
    QueryQuotas,
    QuotaExhausted,
    RequestError,
    ServiceLimits,
)
from fedprompt.serving.tls import TLSFiles

__all__ = [
    "Admission",
    "AdmissionSettings",
    "InferenceService",
    "QueryQuotas",
    "QuotaExhausted",
    "RequestError",
    "ServiceLimits",
    "TLSFiles",
    "create_app",
    "parse_tokens",
    "serve_in_thread",
]

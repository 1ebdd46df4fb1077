"""kvservice: a distributed, paged KV-cache memory service for LLM inference.

    from kvservice import Client
    client = Client.embedded("tiny")            # or Client.ray(...), Client.grpc("host:50051")
    info = client.create_sequence(prompt_tokens)
    out = client.attend(layer, [info.seq_id], [q_len], q, k_new, v_new)
"""

from kvservice.api import SequenceInfo
from kvservice.client import AsyncClient, Client
from kvservice.core import errors
from kvservice.core.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    KVServiceError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from kvservice.core.layout import Layout

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "KVServiceError",
    "Layout",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SequenceInfo",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "errors",
]

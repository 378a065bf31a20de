"""Lazy staging (``staging="lazy"``): the tensor copy runs while training goes on, and is proven
untouched. Public path of its documented names; the code lives in asyncckpt._staging.lazy
(and ``key_paths`` in asyncckpt._staging.skeleton, ``TensorModifiedError`` in asyncckpt.errors).
"""

from ._staging.lazy import (
    EAGER_MAX_BYTES,
    STAGING_CHOICES,
    LazyCopy,
    LazyStager,
    check_staging,
    finish_all,
)
from ._staging.skeleton import key_paths
from .errors import TensorModifiedError

__all__ = [
    "EAGER_MAX_BYTES",
    "STAGING_CHOICES",
    "LazyCopy",
    "LazyStager",
    "TensorModifiedError",
    "check_staging",
    "finish_all",
    "key_paths",
]

"""Private integration helpers. Public entry points: :mod:`asyncckpt.lightning` and
:mod:`asyncckpt.pytorch_lightning`. Nothing here imports Lightning at package import time."""

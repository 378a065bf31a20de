"""Compatibility path; the code lives in :mod:`asyncckpt._storage.torch_io`.
``TorchCheckpointIO`` keeps this module as its pickled path."""

from ._storage.torch_io import TorchCheckpointIO, explain_os_error, load_on_cpu, sha256_url, torch_save_to_file

__all__ = ["TorchCheckpointIO", "explain_os_error", "load_on_cpu", "sha256_url", "torch_save_to_file"]

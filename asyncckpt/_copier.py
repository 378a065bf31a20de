"""Compatibility path; the code lives in asyncckpt._staging.copier (where the one raw byte copy,
the monkeypatch point, is ``memmove_pairs``)."""

from ._staging.copier import CopyPlan, ParallelCopier, default_staging_threads, memmove_pairs, split_shares

__all__ = ["CopyPlan", "ParallelCopier", "default_staging_threads", "memmove_pairs", "split_shares"]

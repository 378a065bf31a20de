"""Lightning's sharded strategies, saving through the asyncckpt engine.

``ModelParallelStrategy`` (``save_distributed_checkpoint=True``, its default) and
``FSDPStrategy(state_dict_type="sharded")`` write their checkpoints with
``torch.distributed.checkpoint`` inside ``Strategy.save_checkpoint`` and never call their
``CheckpointIO``. The integration point is that public method: :func:`connect` (called by
``AsyncCheckpointCallback.setup``) gives the strategy object an instance-level
``save_checkpoint`` that hands the checkpoint to the plugin's engine, and a ``load_checkpoint``
that flushes the engine before the strategy's own loader reads the folder. Only public
``Strategy`` methods are replaced, on that one object, and the folder layout is the one
Lightning's loader reads (``meta.pt`` beside the DCP files, model under ``state_dict`` or
``model``, optimizers under ``optimizer_{i}``), so a Lightning upgrade that keeps its checkpoint
format keeps working. ``remove_checkpoint`` needs no override: the base ``Strategy`` already hands
it to the ``CheckpointIO`` on global rank 0.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any, Callable, Dict, Optional

import torch

from ..._storage.local import AtomicFile
from ...errors import CheckpointLoadError
from ..dcp import BeforeCommit, DistributedCheckpointIO, committed_token, local_folder, remove_folder
from .stage import calling_strategy, sharded_model_key

META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


class LightningShardedIO(DistributedCheckpointIO):
    """:class:`DistributedCheckpointIO` writing the folder layout of Lightning's sharded strategies.

    The model and optimizer states go into the DCP files; the rest of Lightning's checkpoint
    (loops, callbacks, hyperparameters) into ``meta.pt``, written by the coordinator just before
    ``.metadata`` is committed.
    """

    def __init__(self, model_key: str = "state_dict", **options: Any) -> None:
        super().__init__(**options)
        self.model_key = model_key

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        folder, state = self.begin_save(checkpoint, path, storage_options)
        rest = dict(state)
        converted = {self.model_key: rest.pop("state_dict")}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(rest.pop("optimizer_states", []))})
        self.save_state(converted, folder, meta_writer(rest))

    remove_is_collective = False

    def remove_checkpoint(self, path: Any) -> None:
        """Not collective: Lightning's strategies remove from global rank 0 only (which is this
        IO's coordinator). Ordered after every rank's writes into the folder: this rank's earlier
        save of it ended only when every rank had written its shards."""
        remove_folder(local_folder(path))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Any] = None,
        weights_only: Optional[bool] = None,
        state: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """The whole checkpoint as one Lightning checkpoint dict (full tensors); the strategies
        load sharded folders themselves, this is for reading one elsewhere. Reads the folders
        of both strategies (model under ``state_dict`` or ``model``), whatever ``model_key``."""
        if state is not None:
            return super().load_checkpoint(path, state=state)
        folder = local_folder(path)
        settle_meta(folder)
        full = super().load_checkpoint(folder)
        checkpoint = torch.load(os.path.join(folder, META_FILE), map_location=map_location, weights_only=False)
        keys = [self.model_key] + [k for k in ("state_dict", "model") if k != self.model_key]
        model_key = next((k for k in keys if k in full), None)
        if model_key is None:
            raise CheckpointLoadError(
                f"{folder} is a DCP checkpoint but not one of Lightning's sharded strategies: it holds no "
                f"model state under 'state_dict' or 'model' (top-level keys: {sorted(full)}); read it with "
                "asyncckpt.DistributedCheckpointIO().load_checkpoint"
            )
        checkpoint["state_dict"] = full.pop(model_key)
        optimizers = sorted((k for k in full if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
        checkpoint["optimizer_states"] = [full[k] for k in optimizers]
        return checkpoint


def pending_meta_name(token: str) -> str:
    return f"{META_FILE}.{token}.pending"


def settle_meta(folder: str) -> None:
    """Finish, or undo, a ``meta.pt`` update that a crash interrupted.

    A save writes its ``meta.pt`` as ``meta.pt.<token>.pending`` before the ``.metadata`` commit
    and renames it into place right after. A crash between the two leaves the pending file: if
    its token is the committed save's, it belongs with the committed shards and is moved into
    place; otherwise (the commit never happened) it is removed, and ``meta.pt`` still matches the
    committed shards. Safe to run from several ranks at once.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    pending = [n for n in names if n.startswith(META_FILE + ".") and n.endswith(".pending")]
    if not pending:
        return
    token = committed_token(folder)
    for name in pending:
        path = os.path.join(folder, name)
        try:
            if token is not None and name == pending_meta_name(token):
                # kept if the rename fails: it belongs to the committed save, a later settle retries
                AtomicFile.adopt(path, os.path.join(folder, META_FILE), keep_on_failed_commit=True).commit()
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass  # another rank settled it


def meta_writer(meta: Dict[str, Any]) -> BeforeCommit:
    """Writes ``meta.pt`` so that it changes together with the committed shards (see settle_meta)."""

    def write(folder: str, token: str) -> Callable[[], None]:
        settle_meta(folder)  # an earlier save's crash: put the folder right before adding to it
        # Renamed after the .metadata commit (after_commit); a failed rename keeps the pending file,
        # which then belongs to the committed save and is settled later.
        meta_file = AtomicFile(
            os.path.join(folder, META_FILE), temp_name=pending_meta_name(token), keep_on_failed_commit=True
        )
        with meta_file:
            with meta_file.open() as f:
                torch.save(meta, f)
        return meta_file.commit

    return write


# The engine each connected strategy saves through (kept with the strategy, not on it).
_connected: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
# Engines that already warned that their strategy writes sharded checkpoints past them.
_warned_bypass: "weakref.WeakSet[Any]" = weakref.WeakSet()


def connected_engine(strategy: Any) -> Optional[Any]:
    """The engine :func:`connect` routed ``strategy``'s sharded saves through, or None."""
    return _connected.get(strategy)


def warn_if_bypassed(engine: Any, depth: int = 8) -> None:
    """Warn, once per engine, when the strategy calling ``engine`` writes sharded checkpoints
    past it (the plugin was given without ``AsyncCheckpointCallback``).

    Lightning never calls a ``CheckpointIO`` before a sharded strategy saves, so the plugin alone
    cannot connect itself. It is called for the strategy's removals (``ModelCheckpoint`` top-k,
    a replaced ``last``) and, by ``FSDPStrategy`` though not ``ModelParallelStrategy``, at
    teardown: there it finds the strategy on the caller's stack and says what is happening.
    """
    if engine in _warned_bypass:
        return
    strategy = calling_strategy(skip=1, depth=depth)
    if strategy is None:
        return
    if sharded_model_key(strategy) is not None and connected_engine(strategy) is not engine:
        _warned_bypass.add(engine)
        warnings.warn(
            f"asyncckpt: {type(strategy).__name__} writes its sharded checkpoints itself and does "
            "not call its CheckpointIO, so this run's checkpoints are saved synchronously. Add "
            "AsyncCheckpointCallback() to the Trainer's callbacks: it connects the strategy to the "
            "plugin and its saves go to the background (docs/distributed.md)",
            UserWarning,
            stacklevel=3,
        )


def connect(strategy: Any, engine: Any) -> bool:
    """Route ``strategy``'s sharded saves through ``engine`` (the plugin); False if it has none.

    Idempotent. The engine's wrapped IO becomes a :class:`LightningShardedIO` (a sharded strategy
    never uses the base ``CheckpointIO`` it would otherwise fill in).
    """
    key = sharded_model_key(strategy)
    if key is None:
        return False
    if connected_engine(strategy) is engine:
        return True
    io = engine.checkpoint_io
    if not isinstance(io, LightningShardedIO) or io.model_key != key:
        engine.replace_base_io(LightningShardedIO(key))  # waits for what the old IO had queued

    def save_checkpoint(checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(strategy).__name__}.save_checkpoint(..., storage_options=...) is not supported")
        # every rank writes into the folder rank 0 names, as the strategy's own save does
        engine.save_checkpoint(checkpoint, strategy.broadcast(filepath))

    strategy_load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        engine.flush()  # the strategy reads the folder itself: every earlier save first
        local = os.fspath(checkpoint_path) if isinstance(checkpoint_path, (str, os.PathLike)) else None
        if local is not None and os.path.isdir(local):
            settle_meta(local)  # a crash between the commit and meta.pt's rename, in an earlier run
        return strategy_load(checkpoint_path, *args, **kwargs)

    strategy.save_checkpoint = save_checkpoint
    strategy.load_checkpoint = load_checkpoint
    _connected[strategy] = engine
    # Every rank stages its shards at once; Lightning's launchers do not set LOCAL_WORLD_SIZE.
    engine.share_cores_among(getattr(strategy, "num_processes", 1) or 1)
    return True

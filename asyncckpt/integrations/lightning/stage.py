"""Where a call into the plugin comes from: a running Trainer stage, ``Fabric.save``, which strategy.

Why this module exists: Lightning gives a ``CheckpointIO`` no hook for "a stage (fit, validate,
test, predict) started" or "this call comes from that strategy". The plugin must still tell a
save made while training runs (queue it: there is training to overlap with; in a Fabric loop,
every ``fabric.save``) from one made after ``fit`` returns, in ``on_fit_end`` or in a
launcher's result hand-over (write it before returning, as Lightning's own plugin would). And a
sharded strategy that never calls its ``CheckpointIO`` can only be spotted from the frames
calling the plugin. Both answers come from the calling thread's stack, and this is the one
place that reads it, together with the Lightning privates the answers rest on
(``Trainer._run_stage``, ``ModelParallelStrategy._save_distributed_checkpoint``,
``FSDPStrategy._state_dict_type``; ``Fabric.save`` is public). Nothing here imports Lightning.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Callable, Optional

log = logging.getLogger("asyncckpt")


#: What :func:`call_site_finder`'s function answers: a save that overlaps with training.
TRAINER_STAGE = "trainer stage"
FABRIC_SAVE = "fabric save"
#: Also answered: inside ``Fabric.load``, which every rank calls (a load waits for the saves
#: of that path on every rank, not only its own).
FABRIC_LOAD = "fabric load"


def call_site_finder(trainer_cls: type, fabric_cls: Optional[type] = None) -> Callable[[], Optional[str]]:
    """A function that says whether the calling thread is inside a running stage of a Trainer
    (:data:`TRAINER_STAGE`), inside ``Fabric.save`` (:data:`FABRIC_SAVE`) or ``Fabric.load``
    (:data:`FABRIC_LOAD`), or none of them (None).

    Lightning runs every stage (fit, validate, test, predict) in ``Trainer._run_stage``, on the
    thread that called ``fit``/``validate``/...; the strategy's teardown, ``on_fit_end``, the
    ``ddp_spawn``/``ddp_fork`` launchers' result hand-over and any call after ``fit`` returns run
    outside it. A Fabric loop is the user's own; its saves come through ``Fabric.save``, called
    from inside it. Lightning gives a ``CheckpointIO`` no hook for either, so the plugin looks
    for those methods' frames on the calling thread's stack (a few microseconds, once per
    operation). Should a Lightning version rename them, every operation is treated as outside:
    saves become synchronous, never unsafe.
    """
    # Lightning's private method: the frame every stage runs under.
    stage = getattr(getattr(trainer_cls, "_run_stage", None), "__code__", None)
    if stage is None:
        log.warning(
            "asyncckpt: this Lightning version has no Trainer._run_stage; checkpoints are written synchronously"
        )
    fabric_save = getattr(getattr(fabric_cls, "save", None), "__code__", None)
    fabric_load = getattr(getattr(fabric_cls, "load", None), "__code__", None)
    known = ((stage, TRAINER_STAGE), (fabric_save, FABRIC_SAVE), (fabric_load, FABRIC_LOAD))
    sites = {code: name for code, name in known if code is not None}

    def call_site() -> Optional[str]:
        frame: Optional[types.FrameType] = sys._getframe(1)
        while frame is not None:
            site = sites.get(frame.f_code)
            if site is not None:
                return site
            frame = frame.f_back
        return None

    return call_site


def has_class(obj: Any, name: str) -> bool:
    """Whether ``obj``'s class or one of its bases is named ``name`` (either package family)."""
    return any(cls.__name__ == name for cls in type(obj).__mro__)


def sharded_model_key(strategy: Any) -> Optional[str]:
    """The key Lightning stores the model under in a sharded checkpoint of ``strategy``, or
    None when the strategy saves full checkpoints through its ``CheckpointIO``."""
    # Lightning's private settings: whether the strategy writes DCP folders itself.
    if has_class(strategy, "ModelParallelStrategy") and getattr(strategy, "_save_distributed_checkpoint", True):
        return "state_dict"
    if has_class(strategy, "FSDPStrategy") and getattr(strategy, "_state_dict_type", "full") == "sharded":
        return "model"
    return None


def calling_strategy(skip: int = 1, depth: int = 8) -> Optional[Any]:
    """The Lightning ``Strategy`` whose method is on the calling thread's stack, or None.

    The walk starts ``skip`` frames above the caller of this function and looks at ``depth``
    frames at most, for the nearest one whose ``self`` is a ``Strategy``.
    """
    frame: Optional[types.FrameType] = sys._getframe(skip + 1)
    for _ in range(depth):
        if frame is None:
            return None
        strategy = frame.f_locals.get("self")
        if strategy is not None and has_class(strategy, "Strategy"):
            return strategy
        frame = frame.f_back
    return None

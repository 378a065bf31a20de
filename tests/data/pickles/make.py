"""Write the golden pickles that tests/test_compat.py loads.

A user's checkpoint, or a Trainer pickled by ``ddp_spawn`` / ``torch.save(trainer)``, holds
asyncckpt objects by module path and attribute names. These files were written by the code
before the restructure of issue 22, so loading them with any later version checks that such
pickles keep loading into the same classes with the same settings.

Run from the repository root (only to re-create them on purpose, e.g. for a new object)::

    PYTHONPATH=. python tests/data/pickles/make.py
"""

from __future__ import annotations

import importlib
import os
import pickle

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOCOL = 4  # fixed, so the files do not change with the Python that writes them

FAMILIES = {"lightning": "asyncckpt.lightning", "pytorch_lightning": "asyncckpt.pytorch_lightning"}


def torch_io():
    from asyncckpt.remote import RetryPolicy
    from asyncckpt.torch_io import TorchCheckpointIO

    return TorchCheckpointIO(checksum=True, retry=RetryPolicy(3))


def objects():
    """name -> object, for every golden pickle this Python can build."""
    from asyncckpt.integrations._lightning_common import _QueueAwareFileExists

    out = {"torch_io": torch_io(), "queue_aware_file_exists": _QueueAwareFileExists(None, None)}
    for family, module in FAMILIES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out[f"{family}_plugin"] = mod.AsyncCheckpointIO(torch_io(), max_pending=3, staging="lazy")
        out[f"{family}_callback"] = mod.AsyncCheckpointCallback(log_stats=False)
    return out


def main() -> None:
    for name, obj in objects().items():
        path = os.path.join(HERE, f"{name}.pkl")
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=PROTOCOL)
        print("wrote", path)


if __name__ == "__main__":
    main()

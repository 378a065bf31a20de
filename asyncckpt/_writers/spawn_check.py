"""Checks, in the training process, that the spawned writer process can import what it needs.

The writer process is spawned, and spawn re-imports the training program's main file as
``__mp_main__`` without running its ``if __name__ == "__main__":`` block, and cannot re-import
``python -c``, a script read from standard input, or a notebook. A checkpoint that holds classes
of ``__main__`` the writer cannot import is refused at the call (:func:`check_main_references`)
instead of failing later in the background; :func:`hide_main_file` lets spawn start the writer
for a main module it could not re-run.
"""

from __future__ import annotations

import ast
import contextlib
import io
import multiprocessing
import os
import pickle
import sys
import threading
from typing import Any, Dict, Iterator, List, Tuple

from ..errors import NotSerializableError


def main_is_importable() -> bool:
    """Whether a spawned process can import this program's ``__main__`` (as ``__mp_main__``).

    ``multiprocessing``'s spawn re-imports the main module from its file, or by its module name
    for ``python -m pkg.mod``; it cannot for ``python -c``, an interactive session, a notebook, or
    ``python -m pkg`` (a package's ``__main__``, which spawn never re-runs).
    """
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:
        return not (spec_name == "__main__" or spec_name.endswith(".__main__"))
    path = getattr(main, "__file__", None)
    return path is not None and os.path.splitext(os.path.basename(path))[0] != "ipython" and _main_file_exists(path)


def _main_file_exists(path: str) -> bool:
    """Whether spawn finds the main file where it looks: a script read from standard input
    (``python - < train.py``, a heredoc) has the ``__file__`` ``'<stdin>'``, which is no file."""
    if not os.path.isabs(path) and multiprocessing.process.ORIGINAL_DIR is not None:
        path = os.path.join(multiprocessing.process.ORIGINAL_DIR, path)
    return os.path.isfile(path)


_spawn_lock = threading.Lock()


@contextlib.contextmanager
def hide_main_file() -> Iterator[None]:
    """Start the writer process without re-running a ``__main__`` that spawn cannot re-run.

    Spawn re-runs the main module from ``__main__.__file__`` when it has no module name; for a
    script read from standard input that path (``'<stdin>'``) does not exist, and the writer
    died at start. The writer needs nothing from ``__main__`` unless a checkpoint holds its
    classes, and those saves are refused at the call (:func:`check_main_references`); so while
    spawn reads what to prepare, ``__main__`` shows no file, as under ``python -c``.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if main is None or path is None or spec_name is not None or _main_file_exists(path):
        yield
        return
    with _spawn_lock:
        del main.__file__
        try:
            yield
        finally:
            main.__file__ = path


def _stand_in(name: str) -> type:
    """A class that takes any construction or state, so the probe reads on past it."""
    return type(name.split(".")[-1], (), {
        "__init__": lambda self, *args, **kwargs: None,
        "__setstate__": lambda self, state: None,
    })


class _MainProbe(pickle.Unpickler):
    """Reads a skeleton only to list the ``__main__`` names it refers to."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.main_names: List[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__":
            self.main_names.append(name)
            return _stand_in(name)  # only the name matters here
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return None


def main_names(skeleton: bytes) -> List[str]:
    probe = _MainProbe(skeleton)
    try:
        probe.load()
    except Exception:  # noqa: BLE001 - a stand-in may not rebuild; the names seen so far count
        pass
    return probe.main_names


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and any(
        isinstance(x, ast.Constant) and x.value == "__main__" for x in sides
    )


def _top_level_names(body: List[ast.stmt], guarded: bool, out: Dict[str, bool]) -> None:
    """Names bound at module level; ``out[name]`` is True while every binding is inside an
    ``if __name__ == "__main__":`` block (which spawn's re-import does not run)."""
    for node in body:
        bound: List[str] = []
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            bound = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, ast.If):
            _top_level_names(node.body, guarded or _is_main_guard(node.test), out)
            _top_level_names(node.orelse, guarded, out)
        elif isinstance(node, (ast.Try, ast.With, ast.For, ast.While)):
            for part in ("body", "orelse", "finalbody"):
                _top_level_names(getattr(node, part, []), guarded, out)
            for handler in getattr(node, "handlers", []):
                _top_level_names(handler.body, guarded, out)
        for name in bound:
            out[name] = out.get(name, True) and guarded


_GUARDED: Dict[Tuple[str, float], Dict[str, bool]] = {}


def _names_only_under_main_guard(path: str) -> Dict[str, bool]:
    """For the main file: which module-level names exist only under the ``__main__`` guard."""
    try:
        key = (path, os.stat(path).st_mtime)
        if key not in _GUARDED:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
            found: Dict[str, bool] = {}
            _top_level_names(tree.body, False, found)
            _GUARDED[key] = found
        return _GUARDED[key]
    except (OSError, SyntaxError, ValueError):
        return {}  # cannot tell: let the writer try


def _refuse_main_reference(name: str, path: str, why: str) -> NotSerializableError:
    return NotSerializableError(
        f"cannot save checkpoint {path!r} with writer='process': it holds {name!r}, defined in "
        f"__main__ {why}, which the writer process cannot import. Move the definition into a module "
        "(a .py file you import) or to the top level of the main file, or use writer='thread'",
        path,
    )


def check_main_references(skeleton: bytes, path: str) -> None:
    """Refuse, at the call, a checkpoint holding classes or functions of ``__main__`` that the
    writer process cannot import; it would otherwise fail later, in the background.

    The writer is spawned, and spawn re-imports the main file as ``__mp_main__`` without running
    its ``if __name__ == "__main__":`` block, and cannot re-import ``python -c`` or a notebook.
    """
    if b"__main__" not in skeleton:
        return
    names = main_names(skeleton)
    if not names:
        return
    if not main_is_importable():
        raise _refuse_main_reference(
            names[0],
            path,
            "of a program that spawn cannot re-import (python -c, a script read from standard input, "
            "a notebook, an interactive session)",
        ) from None
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is None:
        return
    guarded = _names_only_under_main_guard(main_file)
    for name in names:
        if guarded.get(name.split(".")[0], False):
            raise _refuse_main_reference(name, path, 'inside its `if __name__ == "__main__":` block') from None

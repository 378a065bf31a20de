"""Checks, in the training process, that the spawned writer process can import what it needs.

The writer process is spawned, and spawn would re-import the training program's main file as
``__mp_main__``: without its ``if __name__ == "__main__":`` block, but with everything else at
its top level. A training script with no such guard (common on Linux, where nothing else
spawns) then ran again in the writer: a second training run, a second ``init_process_group``,
until its own writer start failed and every save with it. So the writer starts without the main
module (:func:`start_without_main`) and imports it only when a checkpoint, or the wrapped IO,
holds one of its classes (:func:`main_source`), at the first such save. Such a save is refused
at the call (:func:`check_main_references`) where that import cannot work or would run the
training again: ``python -c``, a script read from standard input, a notebook, a name defined
only under the guard, or a main file that runs code at import (:func:`runs_code_at_import`).
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
from multiprocessing import spawn as mp_spawn
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

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


def _where_spawn_looks(path: str) -> str:
    """``path`` (the main module's ``__file__``) resolved as spawn resolves it: against the
    folder the program started in, whatever ``os.chdir`` did since."""
    if not os.path.isabs(path) and multiprocessing.process.ORIGINAL_DIR is not None:
        path = os.path.join(multiprocessing.process.ORIGINAL_DIR, path)
    return os.path.normpath(path)


def _main_file_exists(path: str) -> bool:
    """Whether spawn finds the main file where it looks: a script read from standard input
    (``python - < train.py``, a heredoc) has the ``__file__`` ``'<stdin>'``, which is no file."""
    return os.path.isfile(_where_spawn_looks(path))


def main_source() -> Optional[Tuple[str, str]]:
    """How the writer process imports this program's main module, as spawn would have:
    ``("name", "pkg.mod")`` for ``python -m pkg.mod``, ``("path", "/abs/train.py")`` for a
    script, None where it cannot (see :func:`main_is_importable`)."""
    if not main_is_importable():
        return None
    main = sys.modules["__main__"]
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None:
        return ("name", spec_name)
    return ("path", _where_spawn_looks(main.__file__))


def import_main(source: Tuple[str, str]) -> None:
    """In the writer process: import the training program's main module as spawn would have
    at start (``__mp_main__``, aliased as ``__main__``)."""
    kind, value = source
    mp_spawn.prepare({"init_main_from_name" if kind == "name" else "init_main_from_path": value})


_spawn_lock = threading.Lock()


@contextlib.contextmanager
def start_without_main() -> Iterator[None]:
    """Start the writer process without importing the training program's main module.

    While spawn reads what to prepare, ``__main__`` shows neither a module name nor a file, as
    under ``python -c``; the writer imports it later, and only if needed (:func:`import_main`).
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _spawn_lock:
        had_file = "__file__" in vars(main)
        path = vars(main).get("__file__")
        spec = getattr(main, "__spec__", None)
        if had_file:
            del main.__file__
        main.__spec__ = None
        try:
            yield
        finally:
            main.__spec__ = spec
            if had_file:
                main.__file__ = path


class _StandIn:
    """What the probe puts in place of every class and function a pickle names: it takes any
    construction, state, item or append, so the probe reads on to the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_StandIn":  # a method pickled as getattr(...)
        return _StandIn()


#: What pickle calls the main module's objects: ``__main__``, and ``__mp_main__`` in a process
#: that spawn started (training in a spawned child: its main file was imported under that name).
_MAIN_NAMES = ("__main__", "__mp_main__")


class _MainProbe(pickle.Unpickler):
    """Reads a skeleton only to list the ``__main__`` names it refers to.

    Nothing it names is looked up or called: every class and function is a :class:`_StandIn`,
    every staged tensor ``None``. (Real rebuild calls fail on ``None`` where a sparse, nested,
    quantized or attributed tensor is rebuilt, and a probe stopped there missed every
    ``__main__`` class after it.)
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.main_names: List[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if module in _MAIN_NAMES:
            self.main_names.append(name)
        return _StandIn

    def persistent_load(self, pid: Any) -> Any:
        return None


def _probe(pickled: bytes) -> Tuple[List[str], bool]:
    """The ``__main__`` names ``pickled`` refers to, and whether the probe read it to the end."""
    probe = _MainProbe(pickled)
    try:
        probe.load()
    except Exception:  # noqa: BLE001 - a pickle no stand-in fits: the names seen so far, incomplete
        return probe.main_names, False
    return probe.main_names, True


def main_names(skeleton: bytes) -> List[str]:
    """The names of the main module's classes and functions that ``skeleton`` refers to."""
    return _probe(skeleton)[0]


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


#: Calls on their own at a main file's top level that set the process up rather than train
#: (``logging.basicConfig(...)``, ``torch.manual_seed(0)``, ``seed_everything(42)``,
#: ``sys.path.insert(0, ...)``): running them again in the writer process is harmless.
_SETUP_CALLS = frozenset({
    "basicConfig", "filterwarnings", "simplefilter", "captureWarnings", "setLevel", "manual_seed", "seed",
    "seed_everything", "set_seed", "set_float32_matmul_precision", "setdefault", "insert", "append", "extend",
    "load_dotenv",
})


def _is_setup_call(value: ast.expr) -> bool:
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return name in _SETUP_CALLS


def _runs_code(body: List[ast.stmt]) -> bool:
    """Whether module-level ``body`` (outside the ``__main__`` guard) does more than define:
    a call or other expression on its own (but :data:`_SETUP_CALLS`), a loop, a ``with``.
    Imports, definitions and assignments count as definitions (``log = logging.getLogger(...)``)."""
    for node in body:
        if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant) and not _is_setup_call(node.value):
            return True  # a call on its own (trainer.fit(model), main()): a docstring is a constant
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)):
            return True
        if isinstance(node, ast.If):  # the guard's body does not run at import; its else does
            if (not _is_main_guard(node.test) and _runs_code(node.body)) or _runs_code(node.orelse):
                return True
        if isinstance(node, ast.Try):
            parts = [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
            if any(_runs_code(part) for part in parts):
                return True
    return False


def runs_code_at_import(source: bytes | str, filename: str = "<main>") -> bool:
    """Whether a main file of this ``source`` runs code when imported, beyond definitions and
    setup calls (see :func:`_runs_code`); raises ``SyntaxError`` for a file that does not parse."""
    return _runs_code(ast.parse(source, filename).body)


def _main_file() -> Optional[str]:
    """The main module's file: resolved against the folder the program started in (whatever
    ``os.chdir`` did since) for a script, the module's own file for ``python -m``."""
    source = main_source()
    if source is not None and source[0] == "path":
        return source[1]
    return getattr(sys.modules.get("__main__"), "__file__", None)


class _MainFacts(NamedTuple):
    """What the main file's source tells, read once per version of the file."""

    guarded: Dict[str, bool]  # module-level names, True where bound only under the guard
    runs_code: bool  # :func:`_runs_code` of its top level


_MAIN_FACTS: Dict[Tuple[str, float], _MainFacts] = {}


def _main_facts(path: str) -> Optional[_MainFacts]:
    """The facts of the main file at ``path``; None where it cannot be read or parsed (cannot
    tell: the writer's import decides)."""
    try:
        key = (path, os.stat(path).st_mtime)
        if key not in _MAIN_FACTS:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
            guarded: Dict[str, bool] = {}
            _top_level_names(tree.body, False, guarded)
            _MAIN_FACTS[key] = _MainFacts(guarded, _runs_code(tree.body))
        return _MAIN_FACTS[key]
    except (OSError, SyntaxError, ValueError):
        return None


def _main_is_safe_to_import() -> bool:
    """Whether importing the main file runs nothing but definitions and setup calls."""
    main_file = _main_file()
    facts = None if main_file is None else _main_facts(main_file)
    return facts is not None and not facts.runs_code


def _holder(path: str, what: str) -> str:
    """What the refused save names: the checkpoint's path, or ``what`` (the wrapped IO)."""
    return f"checkpoint {path!r}" if what == "checkpoint" else what


def mentions_main(pickled: bytes) -> bool:
    """Whether ``pickled`` may refer to the main module's objects (a quick bytes test; the
    probe, :func:`main_names`, tells for sure)."""
    return b"__main__" in pickled or b"__mp_main__" in pickled


def _refuse_main_reference(name: str, path: str, why: str, what: str = "checkpoint") -> NotSerializableError:
    return NotSerializableError(
        f"cannot save {_holder(path, what)} with writer='process': it holds {name!r}, defined in "
        f"__main__ {why}, which the writer process cannot import. Move the definition into a module "
        "(a .py file you import) or to the top level of the main file, or use writer='thread'",
        path,
    )


def check_main_references(pickled: bytes, path: str, what: str = "checkpoint") -> bool:
    """Whether ``pickled`` (a skeleton, or the wrapped IO) refers to classes or functions of
    ``__main__``, which the writer process must then import; refused, at the call, where it
    cannot import them or importing them would run the training again.

    Spawn re-imports the main file as ``__mp_main__`` without running its ``if __name__ ==
    "__main__":`` block, cannot re-import ``python -c`` or a notebook, and runs every other
    statement at the file's top level.
    """
    if not mentions_main(pickled):
        return False
    names, complete = _probe(pickled)
    if not names:
        # A probe cut short may have missed a name: the writer then imports the main module
        # where that is safe (the writer's import decides), and is refused nothing.
        return not complete and main_is_importable() and _main_is_safe_to_import()
    if not main_is_importable():
        raise _refuse_main_reference(
            names[0],
            path,
            "of a program that spawn cannot re-import (python -c, a script read from standard input, "
            "a notebook, an interactive session)",
            what,
        ) from None
    main_file = _main_file()
    facts = None if main_file is None else _main_facts(main_file)
    if facts is None:
        return True
    for name in names:
        if facts.guarded.get(name.split(".")[0], False):
            raise _refuse_main_reference(name, path, 'inside its `if __name__ == "__main__":` block', what) from None
    if facts.runs_code:
        raise NotSerializableError(
            f"cannot save {_holder(path, what)} with writer='process': it holds {names[0]!r}, defined in __main__ of a "
            'script that runs code at import (no `if __name__ == "__main__":` guard around its training); '
            "the writer process would have to import that script, and so run the training again. Put the "
            'code that trains under `if __name__ == "__main__":`, move the definition into a module (a .py '
            "file you import), or use writer='thread'",
            path,
        ) from None
    return True

"""Layout guards for the package: no import cycles, no reads of another module's privates, no
Lightning names in the framework-free core.

They read the source with ``ast`` (nothing is imported), so they are fast and see function-level
imports too. Each allowlist entry is explicit, with a one-line reason. Entries marked
``# goes with the restructure (issue 22)`` are debts of today's code: the commit that removes the
read (or the cycle) removes its entry, and a stale entry fails ``test_allowlists_are_current``.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Set, Tuple

from _subproc import ROOT

PACKAGE = os.path.join(ROOT, "asyncckpt")

# Import edges (importer, imported) that close today's two cycles; both function-level.
CYCLE_EDGES_ALLOWED: Dict[Tuple[str, str], str] = {}  # none: issue 22 removed the last two

# (module that reads, private attribute or name) -> why it may. Only third-party and
# standard-library privates are left (issue 22 removed our own); each sits in one adapter,
# with a comment there.
PRIVATE_READS_ALLOWED: Dict[Tuple[str, str], str] = {
    ("asyncckpt._engine.lifecycle", "_register_atexit"): "threading: runs before threading joins non-daemon threads",
    ("asyncckpt._writers.process", "_children"): "multiprocessing.process: forget a forked parent's writer process",
    ("asyncckpt._storage.s3", "_call_s3"): "s3fs: the raw S3 call the multipart upload is built on",
    ("asyncckpt._storage.fsspec", "_call_s3"): "s3fs: tells an S3 filesystem apart",
    ("asyncckpt._staging.layout", "_untyped_storage"): "torch TypedStorage: its untyped storage",
    ("asyncckpt._staging.layout", "_cdata"): "torch storage: identity of the underlying storage",
    ("asyncckpt._staging.arena", "_cdata"): "torch storage: its handle, for torch's count of its references",
    ("asyncckpt._staging.arena", "_C"): "torch._C._storage_Use_Count: how many tensors and storages view a storage",
    ("asyncckpt._staging.arena", "_storage_Use_Count"): "torch's count of a storage's references (kept staged memory)",
    ("asyncckpt._staging.locations", "_cdata"): "torch storage: the identity torch.save keys storages on",
    ("asyncckpt._staging.warm", "_C"): "torch._C._dynamo.guards.TensorGuards: the compiler's C tensor check",
    ("asyncckpt._staging.skeleton", "_utils"): "torch._utils: the sparse tensor rebuild torch.save's files use",
    ("asyncckpt._staging.skeleton", "_rebuild_sparse_tensor"): "torch._utils: the rebuild torch.load uses",
    ("asyncckpt._staging.skeleton", "_sparse_tensors_to_validate"): "torch._utils: the list that rebuild appends to",
    ("asyncckpt._staging.lazy", "_version"): "torch tensor version counter: the documented in-place-change check",
    ("asyncckpt._staging.copier", "_foreach_copy_"): "torch: the batched copy kernel",
    ("asyncckpt._staging.devices", "_XLAC"): "torch_xla: the batched device-to-host transfer",
    ("asyncckpt._staging.devices", "_xla_sync_multi"): "torch_xla._XLAC: sync before the transfer",
    ("asyncckpt._staging.devices", "_xla_get_cpu_tensors"): "torch_xla._XLAC: the transfer itself",
    ("asyncckpt._storage.integrity", "_C"): "torch._C.PyTorchFileReader: reads the zip the way torch.load does",
    ("asyncckpt._storage.torch_zip", "_C"): "torch._C.PyTorchFileWriter: torch.save's zip writer, CRC32 off",
    ("asyncckpt._storage.torch_zip", "_save"): "torch.serialization._save: torch.save's pickler, given that writer",
    ("asyncckpt._storage.torch_zip", "_get_storage_alignment"): "torch.serialization: torch.save's alignment",
    ("asyncckpt.integrations.dcp.commit", "_StoragePrefix"): "torch DCP: the storage data of a shard's write results",
    ("asyncckpt.integrations.dcp.io", "_cached_plans_key"): "torch DCP planner: the plan cache key of the save",
    ("asyncckpt.integrations.dcp.io", "_EmptyStateDictLoadPlanner"): "torch DCP: loading without a template state",
    ("asyncckpt.integrations.dcp.io", "_load_state_dict"): "torch DCP: loading without a template state",
    ("asyncckpt.integrations.dcp.io", "_fields"): "namedtuple's documented field list (public despite the underscore)",
    ("asyncckpt.integrations.lightning.family", "_WrappingCheckpointIO"): "Lightning's wrapper base class",
    ("asyncckpt.integrations.lightning.stage", "_run_stage"): "Lightning's Trainer: stage detection",
    ("asyncckpt.integrations.lightning.stage", "_getframe"): "sys: the frame walk of stage detection",
    ("asyncckpt.integrations.lightning.stage", "_save_distributed_checkpoint"): "Lightning ModelParallelStrategy",
    ("asyncckpt.integrations.lightning.stage", "_state_dict_type"): "Lightning FSDPStrategy",
    ("asyncckpt.integrations.lightning.callback", "_batches_that_stepped"): "Lightning's logging step",
}

# Which package may import which: the data flow runs one way. (importer prefix, imported prefix)
# pairs that must not occur; ``integrations.known_ios`` is the one leaf the engine may consult.
FORBIDDEN_DIRECTIONS: Tuple[Tuple[str, str], ...] = tuple(
    (f"asyncckpt.{low}", f"asyncckpt.{high}")
    for low, highs in {
        "_staging": ("_engine", "_writers", "_storage", "integrations"),
        "_storage": ("_engine", "_writers", "_staging", "integrations"),
        "_writers": ("_engine", "integrations"),
        "_engine": ("integrations.lightning", "integrations.dcp"),
    }.items()
    for high in highs
)

# Folders of the framework-free core: no Lightning name in code or comments.
FRAMEWORK_FREE = ("_engine", "_staging", "_writers")


# -- reading the package ---------------------------------------------------------------------


def package_modules() -> Dict[str, str]:
    """Dotted module name -> file, for every .py under asyncckpt/."""
    out = {}
    base = os.path.dirname(PACKAGE)
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except the bodies of ``if TYPE_CHECKING:`` (their ``else`` counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    function_level: bool


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _scopes(tree: ast.AST) -> Dict[int, bool]:
    """id(node) -> whether it sits inside a function."""
    inside: Dict[int, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        inside[id(node)] = in_function
        now = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, now)

    visit(tree, False)
    return inside


def import_edges() -> List[Edge]:
    """Imports of asyncckpt modules by asyncckpt modules, module- and function-level alike."""
    modules = package_modules()
    edges = []
    for module, path in modules.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        in_function = _scopes(tree)
        is_package = path.endswith("__init__.py")
        for node in _runtime_nodes(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # ``import asyncckpt.a.b`` names asyncckpt.a.b; parent packages are not edges.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and target.split(".")[0] == "asyncckpt" and "." in target:
                    edges.append(Edge(module, target, node.lineno, in_function[id(node)]))
    return edges


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle in ``graph`` as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _graph(edges: List[Edge]) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for e in edges:
        if (e.importer, e.imported) not in CYCLE_EDGES_ALLOWED:
            graph.setdefault(e.importer, set()).add(e.imported)
    return graph


# -- private reads -----------------------------------------------------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class PrivateRead:
    module: str
    name: str
    line: int
    text: str


def private_reads() -> List[PrivateRead]:
    """Reads and writes of a private attribute of anything but ``self``/``cls`` (or a class of the
    same module), ``getattr``-family calls with a private name, and ``from X import _name``."""
    modules = package_modules()
    found = []
    for module, path in modules.items():
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source, path)
        own_classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        # A module may use its own privates on any object of its own classes (an engine's exit
        # view calling the engine's method): a private it defines is not another module's.
        own_privates = {
            n.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(n.name)
        } | {
            t.attr
            for n in ast.walk(tree)
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
        }
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = node.value
                if node.attr in own_privates:
                    pass
                elif not (isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in own_classes)):
                    name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _is_private(node.args[1].value)
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))
            ):
                name = node.args[1].value
            elif (
                isinstance(node, ast.Call)
                and (getattr(node.func, "id", None) == "attrgetter" or getattr(node.func, "attr", None) == "attrgetter")
                and any(isinstance(a, ast.Constant) and isinstance(a.value, str) and _is_private(a.value)
                        for a in node.args)
            ):
                # operator.attrgetter("_x") reads ``_x`` as surely as ``obj._x`` does
                name = next(a.value for a in node.args if isinstance(a, ast.Constant) and _is_private(a.value))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, is_package, node)
                for alias in node.names:
                    # Importing a private *module* of the package is how the package is built.
                    if _is_private(alias.name) and f"{base}.{alias.name}" not in modules:
                        found.append(PrivateRead(module, alias.name, node.lineno, f"from {base} import {alias.name}"))
                # ``from torch._C._dynamo.guards import X`` reads another package's private
                # module as surely as ``torch._C._dynamo`` does.
                if not (base == "asyncckpt" or base.startswith("asyncckpt.")):
                    for part in base.split("."):
                        if _is_private(part):
                            found.append(PrivateRead(module, part, node.lineno, f"from {base} import ..."))
                            break
            if name is not None:
                found.append(PrivateRead(module, name, node.lineno, ast.get_source_segment(source, node) or name))
    return found


# -- the tests ---------------------------------------------------------------------------------


def test_graph_sees_known_edges() -> None:
    """The reader finds module-level, function-level and relative imports (guards the guard)."""
    edges = {(e.importer, e.imported, e.function_level) for e in import_edges()}
    assert ("asyncckpt.lightning", "asyncckpt.integrations.lightning.plugin", False) in edges
    assert any(a == "asyncckpt.__init__" or a == "asyncckpt" for a, _, _ in edges)
    assert any(f for _, _, f in edges), "no function-level import found"


def test_no_import_cycles() -> None:
    cycle = find_cycle(_graph(import_edges()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_check_fails_on_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_private_reads_across_modules() -> None:
    new = [r for r in private_reads() if (r.module, r.name) not in PRIVATE_READS_ALLOWED]
    assert not new, "private reads across modules (use or add a public name):\n" + "\n".join(
        f"  {r.module}:{r.line}: {r.text}" for r in new
    )


def test_the_data_flow_runs_one_way() -> None:
    """Staging and storage know nothing above them, writers know no engine, the engine knows no
    framework: each stage can be read, tested and replaced without the ones that use it."""
    wrong = [
        f"{e.importer} -> {e.imported}"
        for e in import_edges()
        for low, high in FORBIDDEN_DIRECTIONS
        if (e.importer == low or e.importer.startswith(low + "."))
        and (e.imported == high or e.imported.startswith(high + "."))
    ]
    assert not wrong, "imports running against the data flow:\n" + "\n".join(wrong)


def test_allowlists_are_current() -> None:
    """An entry whose read or edge is gone must be deleted, so the allowlists only shrink."""
    seen = {(r.module, r.name) for r in private_reads()}
    stale = [key for key in PRIVATE_READS_ALLOWED if key not in seen]
    edges = {(e.importer, e.imported) for e in import_edges()}
    stale += [key for key in CYCLE_EDGES_ALLOWED if key not in edges]
    assert not stale, f"allowlist entries no longer needed (delete them): {stale}"


def test_no_lightning_in_the_core() -> None:
    """The core packages know no framework: a framework's facts live in ``integrations``."""
    pattern = re.compile(r"lightning", re.IGNORECASE)  # also matches pytorch_lightning
    hits = []
    assert all(os.path.isdir(os.path.join(PACKAGE, folder)) for folder in FRAMEWORK_FREE)
    for folder in FRAMEWORK_FREE:
        root = os.path.join(PACKAGE, folder)
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    for number, line in enumerate(open(path, encoding="utf-8"), 1):
                        if pattern.search(line):
                            hits.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    assert not hits, "Lightning named in the framework-free core:\n" + "\n".join(hits)

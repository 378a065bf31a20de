"""Path kinds: whether a checkpoint path is a local file or an fsspec URL, and the keys the
engine orders operations by.

These are computed before any backend exists (the engine keys its queue on them), so they live
apart from the backends; :func:`asyncckpt._storage.backend.backend_for` is the only other place
that decides local versus URL.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

from ..errors import InvalidPathError
from ..redaction import shown


def is_url(path: str) -> bool:
    """True for fsspec URLs such as ``memory://x`` or ``s3://bucket/x``."""
    return "://" in path


#: fsspec URL prefixes that name files of the local filesystem, relative ones against the
#: working folder (fsspec's ``LocalFileSystem`` resolves them when it opens the file).
LOCAL_URL_PREFIXES = ("file://", "local://")


def local_path_of(path: str) -> str | None:
    """The local filesystem path for ``path``, or None when it names a remote (fsspec) location.

    A ``file://`` or ``local://`` URL names the file fsspec's ``LocalFileSystem`` would open:
    ``file://~/x`` is in the home folder (a plain ``~/x`` stays literal, as ``torch.save`` takes it).
    """
    if not is_url(path):
        return path
    for prefix in LOCAL_URL_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix):]
            return os.path.expanduser(rest) if rest.startswith("~") else rest
    return None


def absolute_path(path: str) -> str:
    """``path`` with a relative local part made absolute against the working folder now.

    A relative path, and a relative ``file://`` or ``local://`` URL (also as the last link of a
    chain such as ``simplecache::file://ckpts/x``), means the folder at the time of the call, not
    the writer's when it writes (the process writer keeps the folder it was spawned in, and a
    thread writer sees a later ``os.chdir``). Other URLs are returned as they are.
    """
    if not is_url(path):
        return path if path == "" or os.path.isabs(path) else os.path.join(os.getcwd(), path)
    head, sep, last = path.rpartition("::")
    for prefix in LOCAL_URL_PREFIXES:
        if last.startswith(prefix):
            rest = last[len(prefix):]
            if rest and not os.path.isabs(rest) and not rest.startswith("~"):  # fsspec expands '~' itself
                return f"{head}{sep}{prefix}{os.path.join(os.getcwd(), rest)}"
            break
    return path


def path_key(path: str) -> str:
    """The key under which operations on ``path`` are ordered, resolved now: for a local file (a
    plain path, or a ``file://`` / ``local://`` URL, chained or not) the folder entry it names
    (:func:`entry_of`), so that every spelling of one file shares a key; else the URL itself."""
    local = _absolute_local(path)
    return entry_of(local) if local is not None else absolute_path(path)


def path_keys(path: str) -> Tuple[str, ...]:
    """The keys whose operations a read of ``path`` must wait for: its own (:func:`path_key`) and,
    when it is a symlink (or runs through one), the key of the file it resolves to now: a load
    of ``last.ckpt`` linked to a checkpoint still being written waits for that write."""
    local = _absolute_local(path)
    if local is None:
        return (absolute_path(path),)
    entry = entry_of(local)
    resolved = _one_root(os.path.realpath(local))
    return (entry,) if resolved == entry else (entry, resolved)


def _absolute_local(path: str) -> Optional[str]:
    """The absolute local path ``path`` names now (see :func:`absolute_path`), or None for a
    remote URL and for an empty path. Not normalized: ``link/..`` is the folder above the link's
    target, which only :func:`entry_of` can tell."""
    text = absolute_path(path)
    last = text.rpartition("::")[2] if is_url(text) else text
    for prefix in LOCAL_URL_PREFIXES:
        if last.startswith(prefix) and last[len(prefix):]:
            return _absolute(os.path.expanduser(last[len(prefix):]))
    if not is_url(text) and text:
        return text
    return None


def _absolute(local: str) -> str:
    """``local`` joined to the working folder when relative, and not normalized."""
    return local if os.path.isabs(local) else os.path.join(os.getcwd(), local)


def resolved_entry(local: str) -> str:
    """The absolute folder entry the operating system finds for the local path ``local``
    (relative: against the working folder now): see :func:`entry_of`. Use it wherever a folder
    or a sibling of a path is derived: ``os.path.abspath`` would drop ``link/..`` as text."""
    return entry_of(_absolute(local))


def entry_of(path: str) -> str:
    """The folder entry that the absolute local ``path`` names, as the operating system finds it:
    its folder with every symlink resolved (``linked_folder/x.ckpt`` and ``real_folder/x.ckpt``
    are one file, and ``link/../x.ckpt`` is beside the link's target, not beside the link), and
    its own name as given, since a save replaces a symlink of that name rather than writing
    through it (docs/index.md, edge 13)."""
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        return _one_root(os.path.realpath(path))
    return _one_root(os.path.join(os.path.realpath(folder), name))


def _one_root(path: str) -> str:
    """``path`` with POSIX's two leading slashes (which ``abspath`` keeps) as one: Linux and
    macOS open ``//tmp/x`` as ``/tmp/x``, so both spellings must share a key."""
    if os.name == "posix" and path.startswith("//"):
        return "/" + path.lstrip("/")
    return path



def check_target(path: str) -> None:
    """Raise :class:`InvalidPathError` when ``path`` can never hold a checkpoint file.

    Cheap checks only, run on the caller's thread so the mistake surfaces where it was made.
    """
    if path == "":
        raise InvalidPathError("the checkpoint path is empty; pass a file path such as 'checkpoints/last.ckpt'", path)
    _check_no_nul(path)
    local = local_path_of(path)
    if local is None:
        _check_url_names_a_file(path)
        return
    if local == "":
        raise InvalidPathError(f"the checkpoint URL {path!r} has no file path after its scheme", path)
    if os.path.isdir(local):
        suggestion = os.path.join(local, "last.ckpt")
        raise InvalidPathError(
            f"checkpoint path {path!r} is an existing folder; pass a file path inside it, e.g. {suggestion!r}",
            path,
        )
    if os.path.basename(local) in ("", ".", ".."):
        name = local.rstrip("/") or local
        raise InvalidPathError(
            f"checkpoint path {path!r} names a folder (it ends with '/', '.' or '..'), not a file; "
            f"pass a file path such as {os.path.join(name, 'last.ckpt')!r}",
            path,
        )
    target = resolved_entry(local)
    parent = _nearest_existing(os.path.dirname(target))  # one walk up, for both checks below
    if not os.path.isdir(parent):
        raise InvalidPathError(
            f"cannot write checkpoint {path!r}: {parent!r} is a file, not a folder; "
            "choose a path whose parent folders are folders (missing ones are created)",
            path,
        )
    _check_lengths(path, target, parent)


def check_names(path: str) -> None:
    """Refuse a path no filesystem can hold, whatever the operation: a NUL byte, and for a
    local path a name or a whole path longer than its filesystem takes (:func:`check_target`
    makes the same checks for a save, sharing its walk up to an existing folder)."""
    _check_no_nul(path)
    local = local_path_of(path)
    if local:
        target = os.path.abspath(local)  # lengths of the names as written: no link to resolve
        _check_lengths(path, target, _nearest_existing(os.path.dirname(target)))


def _nearest_existing(folder: str) -> str:
    """``folder``, or the nearest of its parents that exists (as a file or a folder)."""
    while not os.path.lexists(folder):
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    return folder


def _check_no_nul(path: str) -> None:
    """Refuse a path holding a NUL byte (``os`` raises a bare ``ValueError`` for it, and
    ``torch.save`` silently cuts the name there)."""
    if "\x00" in path:
        raise InvalidPathError(
            f"checkpoint path {shown(path)!r} contains a NUL byte ('\\x00'), which no file name can hold; remove it",
            shown(path),
        )


def _limit(folder: str, name: str, default: int) -> int:
    """``os.pathconf(folder, name)``, or ``default`` where the system does not say."""
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value and value > 0 else default


def _check_lengths(path: str, target: str, existing: str) -> None:
    """Refuse a name, or a whole path, longer than the filesystem holding ``existing`` (the
    nearest folder of ``target`` that exists) takes: the rename would fail with ENAMETOOLONG."""
    encoded = os.fsencode(target)
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    for name in encoded.split(b"/"):
        if len(name) > name_max:
            short = os.fsdecode(name[:40]) + "..."
            raise InvalidPathError(
                f"checkpoint path {path!r} cannot exist: its name {short!r} is {len(name)} bytes long, "
                f"and names on this filesystem take at most {name_max}; choose a shorter name",
                path,
            )
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    if len(encoded) >= path_max:
        raise InvalidPathError(
            f"checkpoint path {path!r} cannot exist: it is {len(encoded)} bytes long in all, and this "
            f"system takes paths of at most {path_max - 1}; choose a shorter path",
            path,
        )


#: fsspec schemes whose first path part is a bucket (or container): the object's key follows it.
_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "r2", "b2"})


def _check_url_names_a_file(url: str) -> None:
    """Refuse a URL that names no file (nothing after its scheme, or a bucket alone) or a
    folder (a trailing '/')."""
    last = url.rpartition("::")[2]
    scheme, _, rest = last.partition("://")
    if rest == "":
        raise InvalidPathError(
            f"the checkpoint URL {shown(url)!r} names no file: nothing follows its scheme; "
            "pass one such as 's3://bucket/run/last.ckpt'",
            shown(url),
        )
    if scheme.lower() in _BUCKET_SCHEMES and "/" not in rest.split("?", 1)[0]:
        raise InvalidPathError(
            f"the checkpoint URL {shown(url)!r} names a bucket, not a file in it; "
            f"pass one such as {shown(url.rstrip('/') + '/last.ckpt')!r}",
            shown(url),
        )
    if rest.endswith("/"):
        raise InvalidPathError(
            f"the checkpoint URL {shown(url)!r} names a folder (it ends with '/'), not a file; "
            f"pass a file in it, such as {shown(url + 'last.ckpt')!r}",
            shown(url),
        )

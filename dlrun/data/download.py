"""What a failed download says (its real reason, how to copy the data here) and what it leaves behind."""

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

# Where the copy advice has the data set fetched on the other machine (relative to its home
# folder), so that the copy's source is never the folder it is copied to.
STAGING = "dlrun_download"


def _causes(err: BaseException) -> Iterator[BaseException]:
    """err, then what it wraps: URLError's .reason, __cause__, __context__ (each once)."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [
            c
            for c in (getattr(e, "reason", None), e.__cause__, e.__context__)
            if isinstance(c, BaseException)
        ]


def _unresolved(err: BaseException) -> bool:
    """The host name could not be resolved: offline, or no DNS (socket.gaierror in the chain)."""
    return any(isinstance(e, socket.gaierror) for e in _causes(err))


def _text(err: BaseException) -> str:
    """The root cause's words, on one line: the deepest non-empty text along .reason / __cause__
    (an implicit __context__ only where nothing has been said yet: it may be unrelated)."""
    text, e, depth = "", err, 0
    while e is not None and depth < 16:
        words = " ".join(str(e).split())
        if words.startswith("<urlopen error ") and words[15:-1].strip():
            words = words[15:-1]  # URLError's wrapper around its reason
        text = words or text
        reason = getattr(e, "reason", None)
        e = (
            reason
            if isinstance(reason, BaseException)
            else e.__cause__ or (None if text else e.__context__)
        )
        depth += 1
    return text or type(err).__name__


def failure_reason(tried: Sequence[tuple[str, BaseException]]) -> str:
    """Why the downloads of `tried` (url, error) failed: "no network (...)" or a real error's text."""
    hosts = list(dict.fromkeys(urlsplit(url).hostname or url for url, _ in tried))
    if tried and all(_unresolved(err) for _, err in tried):
        return f"no network (cannot resolve {' or '.join(hosts)})"
    url, err = next((u, e) for u, e in tried if not _unresolved(e))
    return f"{_text(err)} ({url})"


def copy_advice(fetch: str, staged: str, target: Path) -> str:
    """Fetch with `fetch` on a machine with a network, then copy `STAGING/<staged>` to `target`."""
    here = Path(os.path.abspath(target))
    return (
        f"on a machine with a network, run {fetch} in your home folder, then copy what it wrote to "
        f"this machine: mkdir -p {here.parent} && scp -r <that-machine>:{STAGING}/{staged} "
        f"{here.parent}/"
    )


def download_tip(download: bool) -> str:
    """The data.download=true tip, only where it is not already set."""
    return "" if download else "; or, if this machine has a network, set data.download=true"


@contextmanager
def new_folders_removed_on_failure(*paths: Path) -> Iterator[None]:
    """A failed download leaves no folder it created: those of `paths` (and their parents) that
    did not exist before are removed if the block fails and they are still empty.

    rmdir only removes empty folders, so a file anyone put there (a partial download included)
    keeps its folder: user data is never deleted.
    """
    new: set[Path] = set()
    for path in paths:
        path = Path(os.path.abspath(path))
        new.update(p for p in (path, *path.parents) if not p.exists())
    try:
        yield
    except BaseException:
        for folder in sorted(new, key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty (or gone already): kept
        raise

"""Extract a downloaded .tar, .tar.gz/.tgz or .zip archive without letting it write outside its folder.

Every member is checked before anything is written: a path that is absolute or has a `..`
component, a symbolic or hard link whose target lies outside the folder (following the archive's
own links), a path that goes through such a link, and device or FIFO members are refused with a
`UserError` naming the archive and the member; then nothing is extracted.
"""

import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from dlrun.errors import UserError

_MAX_LINK_DEPTH = 40  # as the kernel's symlink loop limit
# tarfile's extraction filters came with Python 3.10.12 / 3.11.4; older ones extract unfiltered.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def _parts(name: str) -> list[str]:
    """The components of a member name, `\\` read as a separator too (archives made on Windows)."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _is_absolute(name: str) -> bool:
    """/x, and C:/x or C:x (a Windows drive)."""
    name = name.replace("\\", "/")
    return name.startswith("/") or (len(name) > 1 and name[0].isalpha() and name[1] == ":")


def _resolve(parts: list[str], links: dict[str, str], depth: int = 0) -> list[str] | None:
    """Walk `parts` from the extraction folder, following the archive's symlinks.

    Returns the resolved components, or None when the walk leaves the folder (a `..` above it,
    an absolute link target) or loops.
    """
    out: list[str] = []
    for part in parts:
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get("/".join(out))
        if target is not None:
            if depth >= _MAX_LINK_DEPTH or _is_absolute(target):
                return None
            resolved = _resolve(out[:-1] + _parts(target), links, depth + 1)
            if resolved is None:
                return None
            out = resolved
    return out


class _Member(NamedTuple):
    """What the checks need from a tar or zip member."""

    name: str
    kind: str  # file, dir, symlink, hardlink or special (device, FIFO, socket)
    link: str = ""


def _tar_members(tf: tarfile.TarFile) -> list[_Member]:
    out = []
    for m in tf.getmembers():
        if m.issym():
            kind = "symlink"
        elif m.islnk():
            kind = "hardlink"
        elif m.isdir():
            kind = "dir"
        elif m.isreg():
            kind = "file"
        else:  # character or block device, FIFO, anything else
            kind = "special"
        out.append(_Member(m.name, kind, m.linkname))
    return out


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16  # Unix mode bits, when the archive was made on Unix
        if stat.S_ISLNK(mode):
            out.append(_Member(info.filename, "symlink", zf.read(info).decode("utf-8", "replace")))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            out.append(_Member(info.filename, "special"))
        else:
            out.append(_Member(info.filename, "dir" if info.is_dir() else "file"))
    return out


def _check(archive: Path, target: Path, members: list[_Member]) -> None:
    """Raise a UserError for the first member that could write outside `target`."""

    def refuse(member: _Member, why: str) -> UserError:
        return UserError(
            f"Refused to extract {archive}: its member '{member.name}' {why}. A genuine data "
            "set archive never holds such a member: delete the archive and download it again "
            "from the official source (or extract it by hand if you trust it)."
        )

    outside = f"which would be written outside {target}"
    for m in members:
        parts = _parts(m.name)
        if m.kind == "special":
            raise refuse(m, "is a device, FIFO or socket, which would be created on extraction")
        if _is_absolute(m.name):
            raise refuse(m, f"has an absolute path, {outside}")
        if ".." in parts:
            raise refuse(m, f"has a '..' component, {outside}")
        if not parts and m.kind != "dir":  # a "./" directory entry is the target itself
            raise refuse(m, "has an empty name")
    links = {"/".join(_parts(m.name)): m.link for m in members if m.kind == "symlink"}
    for m in members:
        parts = _parts(m.name)
        if _resolve(parts[:-1], links) is None:
            raise refuse(m, f"goes through a link that leads outside {target}")
        if m.kind == "symlink":
            if _is_absolute(m.link) or _resolve(parts[:-1] + _parts(m.link), links) is None:
                raise refuse(m, f"is a symbolic link to '{m.link}', outside {target}")
        elif m.kind == "hardlink":  # a tar hard link names another member, from the archive root
            if _is_absolute(m.link) or _resolve(_parts(m.link), links) is None:
                raise refuse(m, f"is a hard link to '{m.link}', outside {target}")


def _corrupt(archive: Path, err: BaseException) -> UserError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"Could not read the archive {archive} ({reason}): it is truncated or corrupt. "
        "Delete it and download it again (run with data.download=true on a machine with a "
        "network, or copy it again)."
    )


_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


def _open(archive: Path) -> tarfile.TarFile | zipfile.ZipFile:
    name = archive.name.lower()
    if name.endswith(".zip"):
        return zipfile.ZipFile(archive)
    if name.endswith((".tar", ".tgz", ".tar.gz")) or tarfile.is_tarfile(archive):
        return tarfile.open(archive, "r:*")
    if zipfile.is_zipfile(archive):
        return zipfile.ZipFile(archive)
    raise UserError(
        f"Cannot extract {archive}: it is not a .tar, .tar.gz, .tgz or .zip archive. "
        "Delete it and download it again."
    )


def safe_extract(archive: Path, target: Path) -> list[Path]:
    """Extract a .tar, .tar.gz/.tgz or .zip archive into `target`; return the extracted paths.

    Every member is checked first; one that could write outside `target` (see the module doc)
    raises a UserError naming the archive and the member, and then nothing is extracted.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise UserError(f"Cannot extract {archive}: there is no such file.")
    try:  # reading the member list reads every header (a .tar.gz: the whole stream)
        with _open(archive) as handle:
            members = (
                _zip_members(handle)
                if isinstance(handle, zipfile.ZipFile)
                else _tar_members(handle)
            )
    except _CORRUPT as err:
        raise _corrupt(archive, err) from err
    _check(archive, target, members)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _open(archive) as handle:
            if isinstance(handle, zipfile.ZipFile):
                handle.extractall(target)
            else:
                # The data filter re-checks each member against the disk as it is written (links
                # already there, permission bits): defence in depth after the checks above.
                handle.extractall(target, **_DATA_FILTER)
    except _FILTER_ERROR as err:
        raise UserError(
            f"Refused to extract {archive}: {err}. Delete the archive and download it again "
            "from the official source."
        ) from err
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise _corrupt(archive, err) from err
    except OSError as err:
        raise UserError(
            f"Could not extract {archive} into {target}: {err}. Free some disk space or fix "
            "the folder's permissions, then run again."
        ) from err
    return [target.joinpath(*_parts(m.name)) for m in members]

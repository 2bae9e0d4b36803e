"""Downloading dataset files and checking their MD5s.

Every write is atomic: data goes to a temporary file next to the destination and is only
moved into place (os.replace) once its MD5 matches, so a failed or corrupt download leaves
nothing behind and a half-written file can never be mistaken for a good one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable

from ..errors import PrunelabError

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class _NetworkError(PrunelabError):
    """A mirror could not be reached or returned an error (the next mirror may work)."""


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks so large files need little memory."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _md5_stamped(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    # size and times are part of the key so a file changed on disk gets hashed again.
    return md5sum(path)


def cached_md5(path: str | os.PathLike) -> str:
    """md5sum() remembered per (path, size, mtime, ctime): hashing ~180 MB of CIFAR on every load is slow.
    ctime cannot be set back by hand, so a rewritten file whose mtime was restored is hashed again."""
    path = os.path.abspath(path)
    st = os.stat(path)
    return _md5_stamped(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_md5(path: Path, expected: str, also_accept: Iterable[str] = ()) -> None:
    """Refuse a file on disk whose MD5 is neither `expected` nor in `also_accept`.

    A mismatch raises and never triggers a re-download: the file may be a user's own copy,
    and overwriting it silently would hide the problem.
    """
    try:
        got = cached_md5(path)
    except OSError as exc:
        raise PrunelabError(f"cannot read {path}: {exc.strerror or exc}") from None
    if got != expected and got not in set(also_accept):
        raise PrunelabError(
            f"checksum mismatch for {path}: expected md5 {expected}, got {got}; "
            "the file is corrupt or not the published one (delete it to download it again)"
        )


def fetch(url: str, dest: str | os.PathLike, md5: str, timeout: float = _TIMEOUT_S) -> Path:
    """Download `url` to `dest`, keeping it only if its MD5 equals `md5`.

    Raises PrunelabError on network errors and on a checksum mismatch (naming the file and both
    MD5s); in both cases nothing is left at `dest` or in its folder.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise PrunelabError(f"cannot download {url!r}: URL scheme must be http, https or file")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise PrunelabError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            got = _stream(url, out, timeout, dest.name)
        if got != md5:
            raise PrunelabError(
                f"checksum mismatch for downloaded {dest.name} from {url}: "
                f"expected md5 {md5}, got {got}; the file was not kept"
            )
        os.replace(tmp_name, dest)
    except BaseException:
        # Covers network errors, mismatches and Ctrl-C alike: never leave a partial file.
        _remove(tmp_name)
        raise
    _md5_stamped.cache_clear()  # a path we hashed before may now hold new content
    return dest


def fetch_first(urls: list[str], dest: Path, md5: str) -> Path:
    """Try mirrors in order; move on only on network errors (a checksum mismatch is final)."""
    failures = []
    for url in urls:
        try:
            return fetch(url, dest, md5)
        except _NetworkError as exc:
            failures.append(str(exc))
    raise PrunelabError(f"could not download {dest.name}; tried " + "; ".join(failures))


def _stream(url: str, out, timeout: float, label: str) -> str:
    """Copy the body of `url` into `out` chunk by chunk; return its MD5."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            bar = _progress(int(total) if total and total.isdigit() else None, label)
            try:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as exc:
        raise _NetworkError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _NetworkError(f"{url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed responses
        raise _NetworkError(f"{url}: {exc or type(exc).__name__}") from None
    return digest.hexdigest()


def _progress(total: int | None, label: str):
    # A progress bar only helps a person watching a terminal; in logs it is noise.
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def extract_members(archive: Path, members: dict[str, Path]) -> None:
    """Extract the named tar members (archive path -> destination) atomically.

    The whole archive is refused if any member has an absolute path or '..' in it, even one we
    do not need: such an archive is not the published one. We only ever write to the
    destinations we chose, so a hostile name or link cannot escape the data folder.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            infos = tar.getmembers()
            for info in infos:
                parts = Path(info.name).parts
                if info.name.startswith(("/", "\\")) or Path(info.name).is_absolute() or ".." in parts:
                    raise PrunelabError(f"refusing {archive}: unsafe member path {info.name!r}")
            by_name = {info.name: info for info in infos}
            for name, dest in members.items():
                info = by_name.get(name)
                if info is None or not info.isfile():
                    raise PrunelabError(f"{archive} has no file {name!r}; is it the right archive?")
                _extract_one(tar, info, dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PrunelabError(f"cannot extract {archive}: {exc}") from None


def _extract_one(tar: tarfile.TarFile, info: tarfile.TarInfo, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, tar.extractfile(info) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
        os.replace(tmp_name, dest)
    except BaseException:
        _remove(tmp_name)
        raise

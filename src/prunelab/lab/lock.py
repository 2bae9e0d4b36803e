"""One process at a time in a run folder: two writers would interleave checkpoints and state.json.

The lock is a file, ``LOCK``, created exclusively and holding the owner's host and process id. A lock
left by a process that is gone (killed, machine rebooted) is taken over when its owner is on this host
and no longer runs; a lock from another host cannot be checked, so the error says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from ..errors import PrunelabError

NAME = "LOCK"


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True  # cannot tell: assume the run goes on
    try:
        os.kill(owner["pid"], 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return {"gone": True}
    except (OSError, ValueError):  # being written this instant, or damaged: treat as held
        return {}
    return owner if isinstance(owner, dict) else {}


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder/LOCK`` for the duration; PrunelabError if a live process holds it."""
    path = Path(folder) / NAME
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _read_owner(path)
            if owner.get("gone"):
                continue  # released between our attempt and the read: try again
            if _owner_alive(owner):
                who = f"process {owner['pid']}" if "pid" in owner else "another process"
                who += f" on {owner['host']}" if "host" in owner else ""
                raise PrunelabError(f"run folder {folder} is in use by {who}; wait for it to finish, or "
                                    f"delete {path} if no run is using the folder") from None
            path.unlink(missing_ok=True)  # its owner is gone
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(me))
    try:
        yield
    finally:
        if _read_owner(path) == me:  # never remove a lock that another process has taken over
            path.unlink(missing_ok=True)

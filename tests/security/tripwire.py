"""A pickle that leaves a file behind if anything ever unpickles it.

Unpickling a :class:`Tripwire` calls :func:`trip`, wherever it happens (the
test process, a worker's pool child, a CLI), so its file is the proof.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


def trip(path: str) -> None:
    Path(path).write_text("unpickled")


class Tripwire:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (trip, (self.path,))


def payload(path: Path) -> bytes:
    """The pickle, in protocol 0: printable ASCII, so it reads as a string too."""
    return pickle.dumps(Tripwire(str(path)), protocol=0)

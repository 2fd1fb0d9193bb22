"""Put a benchmark's latest table into a document, between its start and end markers."""
from __future__ import annotations

from pathlib import Path


def put_between_markers(path: Path, start: str, end: str, text: str) -> None:
    """Replace what lies between ``start`` and ``end`` in ``path`` with ``text`` (the markers stay); a file
    without both markers is left as it is, with a message."""
    content = path.read_text()
    if start not in content or end not in content:
        print(f"{path.name} has no {start} / {end} markers; left as it is")
        return
    head, rest = content.split(start, 1)
    path.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")

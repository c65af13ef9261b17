"""JSON-lines files: written atomically, read with positions for error messages."""

from __future__ import annotations

import json
import os


def write_jsonl(records, path: str, sort_keys: bool = True) -> None:
    """Written to a temporary file first: a crash never leaves half a file behind.
    `sort_keys=False` keeps each record's key order (files in another tool's format)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=sort_keys, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """Records from a JSON-lines file, or from a JSON array (some benchmark files named
    .json are either)."""
    return [r for _, r in read_numbered_jsonl(path)]


def read_numbered_jsonl(path: str) -> list[tuple[str, dict]]:
    """[(where, record)] of `read_jsonl`: `where` is "path:line" (JSON lines) or "path[i]"
    (a JSON array), for error messages that point at the record."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [(f"{path}[{i}]", r) for i, r in enumerate(json.loads(text))]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
    return out

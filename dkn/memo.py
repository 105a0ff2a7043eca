"""Answering a repeated CLI request from the result store without loading the model.

Loading the default model costs seconds (torch, transformers, 500 MB of weights) and is needed only
for its fingerprint, which is part of every cache key.  This module remembers, per local model folder
and the state of its files (path, size, mtime of every file: weights, config, tokenizer), which store
key a request led to, together with the model's label and fingerprint.  A later identical request
finds that key and reads the stored result, without importing torch.  Any change to a file of the
folder, to the request or to dkn's version gives a different memo key, i.e. a miss, after which the
request is computed normally and remembered again.

Only local folders (the converted offline models and folders given with --model) are remembered; a
Hugging Face id would need the hub library to find its snapshot, so it always loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dkn import __version__, paths
from dkn.cache import ResultStore, make_key

KIND = "memo"


def local_folder(model: str) -> Path | None:
    """The folder `model` names ("default", "gemma3-270m" or a path) if it holds a config.json, else None."""
    folder = paths.model_folder(model)
    if folder is None:
        candidate = Path(model).expanduser()
        folder = candidate if candidate.is_dir() else None
    return folder.resolve() if folder is not None and (folder / "config.json").is_file() else None


def files_state(folder: Path) -> list[list]:
    """[[name, size, mtime_ns], ...] of every file in `folder` (symlinks followed), sorted by name."""
    state = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            state.append([entry.name, st.st_size, st.st_mtime_ns])
    return state


def memo_key(command: str, model: str, request: dict[str, Any]) -> str | None:
    """The memo key of one request on a local model, or None when `model` is not a local folder."""
    folder = local_folder(model)
    if folder is None:
        return None
    return make_key(
        kind=f"{KIND}:{command}",
        model=model,
        folder=str(folder),
        files=files_state(folder),
        request=request,
        version=__version__,
    )


def recall(store: ResultStore | None, command: str, model: str, request: dict[str, Any]) -> dict | None:
    """What `remember` stored for this request ({"key", "label", "fingerprint", ...}), or None."""
    if store is None:
        return None
    key = memo_key(command, model, request)
    entry = store.get(key) if key is not None else None
    return entry.meta if entry is not None else None


def remember(store: ResultStore | None, command: str, model: str, request: dict[str, Any], meta: dict) -> None:
    """Remember `meta` (it must name the result's store key as meta["key"]) for this request."""
    if store is None or "key" not in meta:
        return
    key = memo_key(command, model, request)
    if key is not None:
        store.put(key, meta, kind=KIND)

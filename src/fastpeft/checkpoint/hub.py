"""`push_to_hub`: save into a temporary folder, tag the model card, upload as one commit (or pull request)."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_in_bytes(size: int | str) -> int:
    """`max_shard_size` as bytes: an int, or digits and a unit ("50GB", "500MiB") as transformers reads it."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if match is None or match.group(2) not in _UNITS:  # e.g. "5GI"
        raise ValueError(f"max_shard_size={size!r} is not a size: an int (bytes) or e.g. '5GB', '500MiB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _check_shard_size(folder: str, max_shard_size: int | str | None) -> None:
    if max_shard_size is None:
        return
    limit = size_in_bytes(max_shard_size)
    for root, _, files in os.walk(folder):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            if name.startswith("adapter_model.") and size > limit:
                raise ValueError(f"{name} is {size:,d} bytes, over max_shard_size={max_shard_size!r}: "
                                 "adapter files are one file (as HF PEFT), not sharded: raise the limit.")


def _add_tags(folder: str, tags: list[str] | None) -> None:
    path = os.path.join(folder, "README.md")
    if not tags or not os.path.exists(path):
        return
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    card.save(path)


def push_folder(model: Any, repo_id: str, *, commit_message: str, commit_description: str | None,
                private: bool | None, token: bool | str | None, revision: str | None, create_pr: bool,
                max_shard_size: int | str | None, tags: list[str] | None):
    """The commit (or pull request) info huggingface_hub returns for the uploaded `save_pretrained` folder."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    created = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(created, "repo_id", repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        _check_shard_size(tmp, max_shard_size)
        _add_tags(tmp, tags)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision,
                                 create_pr=create_pr)

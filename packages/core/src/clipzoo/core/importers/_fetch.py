"""Fetching foreign checkpoints from the Hugging Face Hub, with errors that say what to do
offline. Only the files an importer reads are downloaded."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelFolderError

_SNAPSHOT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")


class NotOnHubError(ModelFolderError):
    """The repo or file does not exist on the Hub (as opposed to: the Hub is unreachable)."""


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, what: str) -> Iterator[None]:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"{repo_id}@{revision or 'main'}"
    try:
        yield
    except LocalEntryNotFoundError as err:
        raise ModelFolderError(
            f"{where}: {what} is not in the local Hub cache and the Hub cannot be reached (offline, or "
            f"HF_HUB_OFFLINE=1). Where there is a network run `hf download {repo_id}"
            f"{' --revision ' + revision if revision else ''} --local-dir DIR`, then import DIR. ({err})"
        ) from err
    except (EntryNotFoundError, RepositoryNotFoundError) as err:
        raise NotOnHubError(f"{where}: {what} not found on the Hub ({err})") from err
    except HfHubHTTPError as err:
        raise ModelFolderError(f"{where}: Hub download of {what} failed: {err}") from err


def download_file(repo_id: str, filename: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """One file of a Hub repo (from the cache when offline)."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id, revision, filename):
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir))


def download_open_clip_hub(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """``open_clip_config.json`` and the weights (safetensors preferred) -> the snapshot folder."""
    from .open_clip import CONFIG_NAME, WEIGHT_NAMES

    config = download_file(repo_id, CONFIG_NAME, revision, cache_dir)
    failures = []
    for name in WEIGHT_NAMES:  # safetensors first; the pickle only when there is none
        try:
            download_file(repo_id, name, revision, cache_dir)
            return config.parent
        except ModelFolderError as err:
            failures.append(str(err))
    raise ModelFolderError(f"{repo_id}@{revision or 'main'}: no weights could be fetched: " + " | ".join(failures))


def download_transformers(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A transformers model repo without pickles when it has safetensors, else with them."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    with _hub_errors(repo_id, revision, "the model snapshot"):
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[*patterns, "pytorch_model*.bin"]
            ))
    return folder


def snapshot_revision(path: Path) -> str | None:
    """The commit sha of a Hub-cache snapshot path, if it is one."""
    match = _SNAPSHOT.search(str(path))
    return match.group(1) if match else None

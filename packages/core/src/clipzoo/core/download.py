"""Fetch a model folder from the Hub for an air-gapped machine, with a sha256 manifest.

``clipzoo download org/name --revision SHA --to DIR`` copies the repo's snapshot at
``SHA`` (pickled weight files are never fetched) into ``DIR`` and writes
``DIR/clipzoo-manifest.json``::

    {"format": "clipzoo-manifest/1", "repo_id": "org/name", "revision": "<commit sha>",
     "requested_revision": "main", "created": "...", "files": {"config.json": "<sha256>", ...}}

Carry ``DIR`` to the machine without a network; :func:`clipzoo.core.load` on a folder that
holds a manifest first checks every listed file's sha256 and refuses the folder, naming
the file, when one is missing, changed, or a file that the manifest does not list was
added (hidden files, whose names start with ``.``, are ignored: loading never reads them).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import ModelFolderError
from .hub import PICKLE_PATTERNS

MANIFEST_NAME = "clipzoo-manifest.json"
MANIFEST_FORMAT = "clipzoo-manifest/1"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# -- hashing ---------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes (symlinks followed), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_pickle(relative: str) -> bool:
    """Whether a file name has a pickled-weights suffix (``.bin .pt .pth .pkl .ckpt``)."""
    name = relative.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatch(name, pattern) for pattern in PICKLE_PATTERNS)


def folder_files(folder: Path, include_hidden: bool = False) -> list[str]:
    """Relative POSIX paths of every regular file (symlinks followed) under ``folder``,
    sorted; names or folders starting with ``.`` only when ``include_hidden``."""
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if not include_hidden and any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            files.append(relative.as_posix())
    return sorted(files)


# -- the manifest ----------------------------------------------------------------------
def write_manifest(folder: Path, repo_id: str, revision: str, requested: str | None) -> Path:
    """Hash every file of ``folder`` into ``folder/clipzoo-manifest.json``."""
    files = {rel: sha256_file(folder / rel) for rel in folder_files(folder) if rel != MANIFEST_NAME}
    manifest = {
        "format": MANIFEST_FORMAT,
        "repo_id": repo_id,
        "revision": revision,
        "requested_revision": requested,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when it has none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("'files' must map relative paths to sha256 strings")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{path}: not a valid clipzoo manifest ({err})") from err
    return manifest


def verify_manifest(folder: str | Path) -> dict[str, Any] | None:
    """Check ``folder`` against its ``clipzoo-manifest.json``, if it has one.

    Raises :class:`ModelFolderError` naming every file that is missing, whose sha256
    differs, that the manifest places outside the folder, or that is in the folder but not
    in the manifest. Returns the manifest (``None`` when the folder has none)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    base = Path(os.path.normpath(folder.absolute()))
    problems = []
    for relative, expected in sorted(manifest["files"].items()):
        path = Path(os.path.normpath(base / relative))
        if not path.is_relative_to(base) or relative == MANIFEST_NAME:
            problems.append(f"{relative}: the manifest lists a path outside the folder")
        elif not path.is_file():
            problems.append(f"{relative}: missing")
        elif (actual := sha256_file(path)) != expected:
            problems.append(f"{relative}: sha256 {actual} does not match the manifest's {expected}")
    listed = set(manifest["files"])
    problems += [f"{rel}: not listed in the manifest" for rel in folder_files(folder) if rel != MANIFEST_NAME and rel not in listed]
    if problems:
        source = f"{manifest.get('repo_id', '?')}@{manifest.get('revision', '?')}"
        raise ModelFolderError(
            f"{folder}: does not match its {MANIFEST_NAME} (downloaded from {source}): " + "; ".join(problems)
            + ". Download it again; if you changed the folder on purpose, delete the manifest."
        )
    return manifest


# -- download --------------------------------------------------------------------------
def download(
    repo_id: str,
    revision: str | None = None,
    to: str | Path = ".",
    *,
    cache_dir: str | Path | None = None,
) -> Path:
    """Copy the snapshot of Hub repo ``repo_id`` at ``revision`` (a commit sha, branch or
    tag; default ``main``) into the new or empty folder ``to`` and write its manifest.

    The snapshot goes through the Hugging Face cache (``cache_dir``, default
    ``$HF_HOME/hub``), so with ``HF_HUB_OFFLINE=1`` a cached snapshot is used and nothing
    is fetched. Pickled weight files are neither fetched nor copied. Returns ``to``."""
    if not _HUB_ID.match(repo_id):
        raise ModelFolderError(f"{repo_id}: not a Hub repo id of the form 'org/name'")
    target = Path(to)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelFolderError(f"{target}: exists and is not an empty folder; download into a new folder")
    snapshot = _snapshot(repo_id, revision, cache_dir)
    commit = snapshot.name
    if not _COMMIT.match(commit):  # the cache names every snapshot folder by its commit sha
        raise ModelFolderError(f"{snapshot}: not a Hub cache snapshot folder (its name is not a commit sha)")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for relative in folder_files(snapshot):
            if is_pickle(relative):
                continue
            destination = tmp / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / relative, destination)  # follows the cache's blob symlinks
        write_manifest(tmp, repo_id, commit, revision)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id}@{revision or 'main'}"
    try:
        path = snapshot_download(
            repo_id=repo_id, revision=revision, cache_dir=cache_dir, ignore_patterns=list(PICKLE_PATTERNS)
        )
    except LocalEntryNotFoundError as err:
        raise ModelFolderError(
            f"{where}: not in the local Hub cache and the Hub cannot be reached (offline? HF_HUB_OFFLINE=1?). "
            f"Run `clipzoo download` where there is a network and carry the folder over. ({err})"
        ) from err
    except HfHubHTTPError as err:
        raise ModelFolderError(f"{where}: Hub download failed: {err}") from err
    return Path(path)


# -- command line ----------------------------------------------------------------------
def _cmd_download(args: argparse.Namespace) -> int:
    folder = download(args.repo, args.revision, args.to, cache_dir=args.cache_dir)
    manifest = read_manifest(folder) or {}
    print(f"downloaded {args.repo}@{manifest.get('revision')} ({len(manifest.get('files', {}))} files) to {folder}")
    print(f"manifest: {folder / MANIFEST_NAME}; load it offline (HF_HUB_OFFLINE=1) with "
          f"clipzoo.core.load({str(folder)!r}), which checks every file against it")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``clipzoo download REPO [--revision REV] --to DIR [--cache-dir DIR]``."""
    p = subparsers.add_parser(
        "download",
        help="fetch a model folder from the Hub with a sha256 manifest (for air-gapped machines)",
        description="Copy a Hub repo's snapshot (no pickled files) into DIR and write DIR/clipzoo-manifest.json "
        "(the resolved commit sha and every file's sha256); loading DIR verifies it.",
    )
    p.add_argument("repo", help="Hub repo id, org/name")
    p.add_argument("--revision", help="commit sha (recommended), branch or tag (default: main)")
    p.add_argument("--to", required=True, help="a new or empty folder")
    p.add_argument("--cache-dir", help="Hugging Face cache to download through (default: $HF_HOME/hub)")
    p.set_defaults(func=_cmd_download)
    return p

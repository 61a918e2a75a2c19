"""Publish a model folder to the Hugging Face Hub, after checking that it is what it claims.

``clipzoo publish DIR --repo org/name [--revision BRANCH] [--tag TAG] [--private] [--dry-run]``

:func:`validate_folder` runs first and refuses the folder unless:

- no pickled file (``.bin .pt .pth .pkl .ckpt``) lies anywhere in it;
- it loads strictly with :func:`clipzoo.core.load` (safetensors only; every tensor name and
  shape checked; a download manifest, if present, verified);
- its ``README.md`` card has metadata that :class:`huggingface_hub.ModelCard` parses
  (``model-index`` included);

and it hashes (sha256) every file that would go. ``--dry-run`` prints that list and stops,
without touching the network. Otherwise :func:`publish` creates the repo if needed
(``HfApi.create_repo(exist_ok=True)``), creates the branch if one is named, uploads exactly
the listed files with ``HfApi.upload_folder`` in one commit that also deletes remote files
not in the folder (the branch then holds the folder, nothing stale), and tags the commit
if asked. Hidden files (names starting with ``.``) and ``clipzoo-manifest.json`` are never
uploaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .download import MANIFEST_NAME, folder_files, is_pickle, sha256_file
from .errors import ClipzooError, ModelFolderError

CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_GLOB = re.compile(r"[*?\[\]]")


@dataclass
class FileEntry:
    path: str  # relative, POSIX
    size: int
    sha256: str


@dataclass
class ValidationReport:
    """What :func:`validate_folder` found: the files that would be uploaded (with sizes and
    hashes), the ones left out, the card's metadata, and warnings that do not block."""

    folder: Path
    files: list[FileEntry]
    left_out: list[str] = field(default_factory=list)
    model_name: str | None = None
    license: str | None = None
    metrics: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PublishResult:
    repo_id: str
    report: ValidationReport
    dry_run: bool
    revision: str | None = None
    commit: str | None = None
    url: str | None = None


def validate_folder(folder: str | Path) -> ValidationReport:
    """Check a model folder for publishing (see the module docstring); raises
    :class:`ModelFolderError` (or the loader's own errors) naming what is wrong."""
    from huggingface_hub import ModelCard

    from .cards import parse_card_source
    from .hub import load

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such folder")
    everything = folder_files(folder, include_hidden=True)
    pickles = [rel for rel in everything if is_pickle(rel)]
    if pickles:
        raise ModelFolderError(
            f"{folder}: refusing to publish pickled file(s) {', '.join(pickles)}: loading a pickle can run "
            "arbitrary code. clipzoo folders hold safetensors only; delete them (or convert them with a clipzoo "
            "importer) and publish again."
        )
    load(folder)  # strict: safetensors only, every tensor name and shape, manifest if any

    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelFolderError(f"{folder}: no {CARD_NAME}; render the model card first (`clipzoo card {folder}`)")
    try:
        card = ModelCard.load(card_path)
        data = card.data
    except Exception as err:  # yaml and huggingface_hub raise several types for bad metadata
        raise ModelFolderError(f"{card_path}: the card's metadata does not parse ({err})") from err

    warnings = []
    if data.library_name != "clipzoo":
        warnings.append(f"{CARD_NAME}: library_name is {data.library_name!r}, not 'clipzoo'")
    if not data.license:
        warnings.append(f"{CARD_NAME}: no license in the metadata")
    if not data.eval_results:
        warnings.append(f"{CARD_NAME}: no evaluation results (model-index); render the card from an eval JSON")
    missing = parse_card_source(card.content).missing_sections()
    if missing:
        warnings.append(f"{CARD_NAME}: no section(s) {', '.join(missing)}")

    left_out = [rel for rel in everything if rel == MANIFEST_NAME or _hidden(rel)]
    entries = []
    for rel in everything:
        if rel in left_out:
            continue
        if _GLOB.search(rel):
            raise ModelFolderError(f"{folder / rel}: file names with *, ?, [ or ] cannot be published; rename it")
        path = folder / rel
        entries.append(FileEntry(rel, path.stat().st_size, sha256_file(path)))
    return ValidationReport(
        folder=folder, files=entries, left_out=left_out, model_name=getattr(data, "model_name", None),
        license=data.license, metrics=len(data.eval_results or []), warnings=warnings,
    )


def publish(
    folder: str | Path,
    repo: str,
    revision: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    *,
    tag: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
    out: TextIO | None = None,
) -> PublishResult:
    """Validate ``folder``, then upload it to Hub repo ``repo`` (on branch ``revision``,
    default ``main``; created if missing) and optionally tag the commit. ``dry_run`` only
    prints what would go. ``api``: an ``HfApi``-like object (default ``HfApi()``)."""
    out = out or sys.stdout
    if not _HUB_ID.match(repo):
        raise ClipzooError(f"{repo}: not a Hub repo id of the form 'org/name'")
    report = validate_folder(folder)
    print(format_report(report, repo, revision, private, tag, dry_run), file=out)
    if dry_run:
        return PublishResult(repo, report, dry_run=True, revision=revision)

    if api is None:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise ClipzooError("HF_HUB_OFFLINE is set: publishing needs the network (use --dry-run to check only)")
        api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo,
        folder_path=str(report.folder),
        repo_type="model",
        revision=revision,
        allow_patterns=[f.path for f in report.files],
        delete_patterns=["*"],  # remote files not in this commit go; .gitattributes always stays
        commit_message=commit_message or f"clipzoo publish {report.model_name or report.folder.name}",
    )
    commit = getattr(info, "oid", None)
    if tag:
        api.create_tag(repo, tag=tag, revision=commit or revision, exist_ok=False, repo_type="model")
    url = getattr(info, "commit_url", None)
    print(f"published {len(report.files)} files to {repo}" + (f"@{revision}" if revision else "")
          + (f", commit {commit}" if commit else "") + (f", tag {tag}" if tag else ""), file=out)
    if commit:
        print(f"load it pinned: clipzoo.core.load({repo!r}, revision={commit!r})", file=out)
    return PublishResult(repo, report, dry_run=False, revision=revision, commit=commit, url=url)


def format_report(
    report: ValidationReport, repo: str, revision: str | None, private: bool, tag: str | None, dry_run: bool
) -> str:
    width = max((len(f.path) for f in report.files), default=4)
    verb = "would upload" if dry_run else "uploading"
    head = (f"clipzoo publish{' (dry run)' if dry_run else ''}: {report.folder} -> {repo}"
            f" (branch {revision or 'main'}{', tag ' + tag if tag else ''}, {'private' if private else 'public'})")
    lines = [head, f"checked: loads strictly from safetensors, no pickles, card metadata parses "
                   f"(model {report.model_name!r}, license {report.license!r}, {report.metrics} measured metrics)",
             f"{verb} {len(report.files)} files, {_size(report.total_size)}:"]
    lines += [f"  {f.path:<{width}}  {_size(f.size):>10}  sha256:{f.sha256}" for f in report.files]
    if report.left_out:
        lines.append("left out: " + ", ".join(report.left_out))
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append("remote files not listed above would be deleted from the branch in the same commit"
                 if dry_run else "remote files not listed above are deleted from the branch in the same commit")
    if dry_run:
        lines.append("dry run: nothing was uploaded")
    return "\n".join(lines)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# -- command line ----------------------------------------------------------------------
def _cmd_publish(args: argparse.Namespace) -> int:
    publish(args.folder, args.repo, revision=args.revision, private=args.private, dry_run=args.dry_run,
            tag=args.tag, commit_message=args.message)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``clipzoo publish DIR --repo org/name [--revision] [--tag] [--private] [--dry-run]``."""
    p = subparsers.add_parser(
        "publish",
        help="validate a model folder, then upload it to the Hub (--dry-run: list what would go)",
        description="Refuses pickles, loads the folder strictly, parses the card's metadata and hashes every "
        "file; then creates the repo if needed and uploads the folder in one commit.",
    )
    p.add_argument("folder", help="model folder (e.g. runs/x/model)")
    p.add_argument("--repo", required=True, help="Hub repo id, org/name")
    p.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    p.add_argument("--tag", help="tag the new commit (e.g. v1.0)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="validate and list the files; upload nothing")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_publish)
    return p

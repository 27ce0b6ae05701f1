"""One way to name published weights: `hf:ORG/REPO[/SUBFOLDER][@REVISION]`, resolved through huggingface_hub's cache.

Every flag or key that takes weights (`--vq`, `model.vq`, `model.text_encoder`) takes an imgen run directory, a
local model directory or file, or such a name. A name that is not cached is downloaded into the standard cache
(`HF_HUB_CACHE`, by default ~/.cache/huggingface/hub) with huggingface_hub's progress bars, exactly as diffusers
and transformers would fetch it, so a model a user already has from those libraries is not fetched again.
`HF_HUB_OFFLINE=1` (or `--offline`) reads only the cache, and a miss is one sentence naming the repository and
the cache directory. A run records what it stands on pinned to the commit it was resolved to, with the hashes of
the files read (`pin`), so it reloads the same weights whatever the repository's branch does later.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgen_cli.errors import UserError

PREFIX = "hf:"
_NAME = re.compile(r"hf:(?P<repo>[\w.-]+/[\w.-]+)(?P<sub>(/[\w.-]+)*)(@(?P<rev>[\w./-]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
# what `file_hashes` hashes: the weights and the configs that give them meaning, not READMEs and images
RECORDED = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model")
WEIGHTS_FILES = (".safetensors", ".bin", ".pt", ".pth")  # a name ending so names one file, not a folder


@dataclass(frozen=True)
class HubName:
    repo: str  # ORG/REPO
    subfolder: str  # "" = the repository's top level
    revision: str | None  # a branch, tag or commit; None = the default branch

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{PREFIX}{self.repo}{sub}" + (f"@{self.revision}" if self.revision else "")


def is_hub_name(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str, what: str) -> HubName:
    """`hf:ORG/REPO[/SUBFOLDER][@REVISION]` -> its parts; anything else with the prefix is refused."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise UserError(f"{what} {name} is not a Hugging Face name; write hf:ORG/REPO[/SUBFOLDER][@REVISION], "
                        f"e.g. hf:amused/amused-256/vqvae.")
    return HubName(match["repo"], match["sub"].strip("/"), match["rev"])


def set_offline() -> None:
    """`--offline`: from here on only the cache is read (huggingface_hub reads HF_HUB_OFFLINE once, at import, so
    its constant is set too; the environment carries it to the libraries that read it later)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def fetch(name: HubName, what: str, only: str | None = None) -> Path:
    """The local snapshot folder of `name` (its subfolder), downloaded into the cache first where it is missing;
    with `only`, a file name, just that file of the folder (a pipeline's model_index.json, not its weights). A name
    whose last part is a weights file (hf:nvidia/DiffiT/diffit_256.safetensors) is that one file."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    folder = f"{name.subfolder}/" if name.subfolder else ""
    one_file = name.subfolder.endswith(WEIGHTS_FILES)
    patterns = [name.subfolder] if one_file else [folder + only] if only else [f"{folder}*"] if folder else None
    try:
        root = Path(snapshot_download(name.repo, revision=name.revision, allow_patterns=patterns,
                                      local_files_only=offline()))
    except LocalEntryNotFoundError:
        at = f" at revision {name.revision}" if name.revision else ""
        if offline():
            raise UserError(f"{what} {name}: {name.repo}{at} is not in the Hugging Face cache {cache_dir()}, and "
                            f"downloads are off (HF_HUB_OFFLINE=1 or --offline).",
                            "Run the command once online, or point HF_HUB_CACHE at a cache that holds it.") from None
        raise UserError(f"{what} {name}: {name.repo}{at} could not be downloaded (no connection to the Hugging "
                        f"Face hub) and is not in the cache {cache_dir()}.") from None
    except GatedRepoError:
        raise UserError(f"{what} {name}: {name.repo} is gated; accept its terms on huggingface.co and log in "
                        f"(`hf auth login`) first.") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} {name}: there is no repository {name.repo} on the Hugging Face hub (or it is "
                        f"private and you are not logged in).") from None
    except RevisionNotFoundError:
        raise UserError(f"{what} {name}: {name.repo} has no revision {name.revision}.") from None
    except HfHubHTTPError as err:
        raise UserError(f"{what} {name}: the Hugging Face hub refused the download ({str(err).splitlines()[0]}).") \
            from None
    path = root / name.subfolder
    if not (path.is_file() if one_file else path.is_dir()):
        raise UserError(f"{what} {name}: {name.repo} has no {'file' if one_file else 'folder'} {name.subfolder!r}.")
    return path


def download_once(url: str, cached: Path, what: str, hint: str, hash_prefix: str | None = None) -> Path:
    """A file that lives outside the Hugging Face hub (FID's Inception weights, ADM's reference batches): `cached`
    when it is there, else fetched from `url` into it, once, unless downloads are off. torch's own downloader,
    as torchvision and torch-fidelity fetch these files; `hint` says how to supply the file by hand."""
    if cached.is_file():
        return cached
    if offline():
        raise UserError(f"there is no cached copy of {what} ({cached}), and downloads are off (HF_HUB_OFFLINE=1 or "
                        f"--offline).", hint=hint)
    import torch

    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_prefix)
    except (OSError, RuntimeError) as err:  # no connection (URLError is an OSError), or a hash mismatch
        raise UserError(f"{what} could not be downloaded from {url} ({str(err).splitlines()[0][:160]}).",
                        hint=hint) from None
    return cached


def local_path(name: str, what: str) -> Path:
    """Where the weights `name` (a hub name, or a local directory or file) are on this machine."""
    if is_hub_name(name):
        return fetch(parse(name, what), what)
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"{what} {name} does not exist; give a run, a model directory, a weights file or "
                        f"hf:ORG/REPO[/SUBFOLDER].")
    return path


def commit_of(snapshot_path: Path) -> str | None:
    """The commit a cached snapshot folder belongs to (`.../snapshots/<commit>/...`), None outside the cache."""
    parts = snapshot_path.parts
    for before, part in zip(parts, parts[1:], strict=False):
        if before == "snapshots" and COMMIT.fullmatch(part):
            return part
    return None


def pin(name: str, what: str) -> tuple[str, dict[str, Any]]:
    """A hub name pinned to the commit its revision resolves to now (fetching it if needed), and what a run records
    of it: the repository, the commit and the SHA-256 of each file of the folder. A run stores the pinned name, so
    it reloads the same weights whatever the branch does later. Other names stay as they are."""
    if not is_hub_name(name):
        return name, {"name": name}
    hub = parse(name, what)
    path = fetch(hub, what)
    commit = commit_of(path)
    revision = commit or hub.revision
    pinned = str(HubName(hub.repo, hub.subfolder, revision))
    return pinned, {"name": pinned, "repository": hub.repo, "subfolder": hub.subfolder, "revision": revision,
                    "commit": commit, "files": file_hashes(path)}


def same_weights(requested: str, pinned_name: str, what: str) -> bool:
    """Whether a pinned hub name is what `requested` asks for: the same repository and folder, and the same
    commit where `requested` names one (a branch or tag is where the pin came from)."""
    a, b = parse(requested, what), parse(pinned_name, what)
    commit = a.revision is not None and COMMIT.fullmatch(a.revision)
    return (a.repo, a.subfolder) == (b.repo, b.subfolder) and (not commit or a.revision == b.revision)


def file_hashes(path: Path) -> dict[str, str]:
    """The SHA-256 of each file of a model folder that the model is made of (weights, configs, vocabularies), by
    its path in the folder (a weights file: its own, by its name)."""
    if path.is_file():
        return {path.name: sha256_of(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(RECORDED))
    return {str(p.relative_to(path)): sha256_of(p) for p in files}


def sha256_of(path: Path) -> str:
    """A file's SHA-256 (hex), computed once per version of the file."""
    return _sha256_of(path.resolve(), path.stat().st_size, path.stat().st_mtime_ns)


def folder_digest(path: Path) -> str:
    """One short hash of a model folder: the digest of its files' digests (`file_hashes`), what identifies
    published weights in shard manifests."""
    listing = "".join(f"{file}:{sha}" for file, sha in file_hashes(path).items())
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


@functools.cache  # a run's start hashes its weights more than once (the pin, the shards' check): T5-XXL's 9 GB once
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    """(The size and time are in the cache's key, so a file rewritten in place is hashed again.)"""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kind_of(path: Path) -> str:
    """What a local model directory holds, in words, for the messages of a wrong kind of model given: an imgen
    run, a diffusers model (its class), a transformers model (its architecture), a diffusers pipeline, an
    open_clip export."""
    import json

    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (ValueError, OSError):
            return "a folder with an unreadable config.json"
        if "family" in data:
            return f"an imgen {data['family']} run"
        if "_class_name" in data:
            return f"a diffusers {data['_class_name']}"
        if "model_type" in data:
            return f"a transformers {(data.get('architectures') or [data['model_type']])[0]}"
    if (path / "model_index.json").is_file():
        return "a diffusers pipeline (name one of its component folders, e.g. /vqvae)"
    if (path / "open_clip_config.json").is_file():
        return "an open_clip model"
    return "not a model folder imgen knows"

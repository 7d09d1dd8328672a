"""Pretrained weights by timm name: looked up in the local caches first, downloaded only when that is allowed,
otherwise one clear error that names the fetch command.

Which files a name wants is timm's pretrained config (hf_hub_id and hf_hub_filename, else a URL); where they lie
is huggingface_hub's cache (its constants, try_to_load_from_cache and hf_hub_download), or torch's hub cache
for the few timm weights that only have a URL. What is left here is the project's own messages. timm is then
handed the local file (registry names) or the local snapshot folder (`hf-hub:` names), so building a model never
touches the network: only `find_pretrained(..., download=True)` may, and only when HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from dali_kd import console
from dali_kd.errors import UserError

HF_HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a model's pretrained weights lie on this machine, and how timm is to be told.

    timm_name: what timm.create_model gets (the name, or `local-dir:<snapshot>` for an `hf-hub:` name);
    file: the weights file for registry names (given to timm as pretrained_cfg_overlay file=), None otherwise;
    num_classes: the pretrained head's class count (0: no classifier head, e.g. DINOv2).
    """

    name: str
    timm_name: str
    file: Path | None
    num_classes: int
    downloaded: bool = False

    @property
    def location(self) -> Path:
        return self.file if self.file is not None else Path(self.timm_name.split(":", 1)[1])


def hf_hub_cache() -> Path:
    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class _HubFiles:
    """Weights in a hub repository: the first of `candidates` that is there; `with_config`: config.json too."""

    repo_id: str
    revision: str | None
    candidates: tuple[str, ...]
    with_config: bool

    def folder(self) -> Path:
        return hf_hub_cache() / repo_folder_name(repo_id=self.repo_id, repo_type="model")


@dataclass(frozen=True)
class _UrlFile:
    url: str

    def path(self) -> Path:  # where timm's download_cached_file puts it
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(self.url).path)


def _source(name: str, where: str) -> tuple[_HubFiles | _UrlFile, int | None]:
    """Where timm would take name's pretrained weights from, and the head's class count when known already."""
    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import _PREFERRED_FILES, _get_safe_alternatives, hf_split

    if name.startswith(HF_HUB_PREFIX):  # a local-dir snapshot: timm takes the first of its preferred files
        repo_id, revision = hf_split(name[len(HF_HUB_PREFIX) :])
        return _HubFiles(repo_id, revision, _PREFERRED_FILES, with_config=True), None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag (check_model_name normally says so first)
        raise UserError(f"{where}: {e}") from None
    if cfg is None:
        raise UserError(f"{where}: timm has no pretrained weights for '{name}'")
    num_classes = int(cfg.num_classes or 0)
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "hf-hub":
        hub_id, filename = location if isinstance(location, tuple) else (location, None)
        repo_id, revision = hf_split(hub_id)
        if filename is None:  # timm's default file, and the safetensors copy it prefers when there is one
            filename = "pytorch_model.bin"
        candidates = (*_get_safe_alternatives(filename), filename)
        return _HubFiles(repo_id, revision, candidates, with_config=False), num_classes
    if load_from == "url":
        return _UrlFile(location), num_classes
    raise UserError(f"{where}: timm has no downloadable weights for '{name}'")


def fetch_command(name: str, from_hub: bool = True) -> str:
    """The command that puts name's weights into this same cache (the hub's, or torch's for URL-only weights),
    run on a machine with network."""
    import torch.hub

    if not from_hub:
        env = f"TORCH_HOME={shlex.quote(str(Path(torch.hub.get_dir()).parent))} "
    elif hf_hub_cache() != Path(constants.HF_HOME) / "hub":
        env = f"HF_HUB_CACHE={shlex.quote(str(hf_hub_cache()))} "
    else:
        env = f"HF_HOME={shlex.quote(str(constants.HF_HOME))} "
    return f"{env}python -m dali_kd.fetch {shlex.quote(name)}"


def _cached(source: _HubFiles | _UrlFile) -> Path | None:
    """The local weights file, or None; for an hub repository that needs its config.json, both must be there."""
    if isinstance(source, _UrlFile):
        return source.path() if source.path().is_file() else None

    def cached(filename: str) -> Path | None:
        found = huggingface_hub.try_to_load_from_cache(source.repo_id, filename, revision=source.revision)
        return Path(found) if isinstance(found, str) else None  # None or a "known missing" marker otherwise

    if source.with_config and cached("config.json") is None:
        return None
    return next((found for f in source.candidates if (found := cached(f)) is not None), None)


def _download(source: _HubFiles | _UrlFile, name: str, where: str) -> Path:
    if isinstance(source, _UrlFile):
        from timm.models._hub import download_cached_file

        try:
            return Path(download_cached_file(source.url, progress=True))
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: the same one-line error
            why = f"the download from {source.url} failed: {_first(e)}"
            raise UserError(_not_found(name, where, source, why)) from None
    try:
        if source.with_config:
            huggingface_hub.hf_hub_download(source.repo_id, "config.json", revision=source.revision)
        for filename in source.candidates:
            try:
                return Path(
                    str(huggingface_hub.hf_hub_download(source.repo_id, filename, revision=source.revision))
                )
            except LocalEntryNotFoundError:  # not cached and the hub unreachable: no network
                raise
            except EntryNotFoundError:  # the repository has no such file: try the next
                continue
    except GatedRepoError:
        raise UserError(
            f"{where}: '{name}' is a gated repository on the Hugging Face hub: accept its terms on "
            f"huggingface.co/{source.repo_id} and log in (hf auth login) before fetching it"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where}: no repository {source.repo_id} on the Hugging Face hub (for '{name}')"
        ) from None
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: the same one-line error
        why = f"the download from the hub failed: {_first(e)}"
        raise UserError(_not_found(name, where, source, why)) from None
    raise UserError(
        f"{where}: the hub repository {source.repo_id} holds none of {', '.join(source.candidates)}"
    )


def _first(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _not_found(name: str, where: str, source: _HubFiles | _UrlFile, why: str) -> str:
    searched = source.path() if isinstance(source, _UrlFile) else source.folder()
    return (
        f"{where}: the weights of '{name}' are not in the local cache (searched {searched}) and {why}; fetch "
        f"them on a machine with network: {fetch_command(name, from_hub=isinstance(source, _HubFiles))}"
    )


def find_pretrained(name: str, where: str, download: bool | None = None) -> PretrainedWeights:
    """name's pretrained weights on this machine: from the cache, else downloaded into it when `download`
    (default: unless HF_HUB_OFFLINE is set); a UserError naming the model, the cache and the fetch command
    when neither works. where: what the user wrote it in, for messages (e.g. model.teacher.pretrained)."""
    download = not constants.HF_HUB_OFFLINE if download is None else download
    source, num_classes = _source(name, where)
    path = _cached(source)
    downloaded = False
    if path is None:
        if not download:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "downloads are off here"
            raise UserError(_not_found(name, where, source, why))
        console.info(f"{where}: downloading the pretrained weights of {name} into the cache")
        path, downloaded = _download(source, name, where), True
    if isinstance(source, _HubFiles) and source.with_config:
        # An `hf-hub:` name: timm reads the snapshot folder as a local model (config.json + weights).
        snapshot = path.parent
        return PretrainedWeights(name, f"local-dir:{snapshot}", None, _config_classes(snapshot), downloaded)
    assert num_classes is not None
    return PretrainedWeights(name, name, path, num_classes, downloaded)


def _config_classes(snapshot: Path) -> int:
    """The class count an `hf-hub:` model's config.json gives its pretrained head (timm's own parsing)."""
    from timm.models._hub import load_model_config_from_path

    try:
        pretrained_cfg, _, _ = load_model_config_from_path(snapshot)
    except (OSError, KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"cannot read {snapshot / 'config.json'}: {_first(e)}") from None
    return int(pretrained_cfg.get("num_classes") or 0)

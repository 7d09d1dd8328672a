"""Pretrained weights by timm name: looked up in the local caches first, downloaded only when that is allowed,
otherwise one clear error that names the fetch command.

Two caches, as timm uses them: the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub) for the weights timm takes from the hub (nearly all), and the torch hub cache
(TORCH_HOME/hub/checkpoints) for the few timm weights that only have a URL. The environment is read at each call,
not when huggingface_hub was imported, so HF_HOME set by a job script or a test is honoured.

timm itself is then handed the local file (registry names) or the local snapshot folder (`hf-hub:` names), so
building a model never touches the network: only `find_pretrained(..., download=True)` may, and only when
HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dali_kd import console
from dali_kd.errors import UserError

HF_HUB_PREFIX = "hf-hub:"
# What an `hf-hub:` repository may hold, in the order timm prefers (timm.models._hub._PREFERRED_FILES).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_TRUE = {"1", "on", "yes", "true"}


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


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/on/yes/true), read now rather than at its import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, resolved as huggingface_hub does, from the environment of now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface"


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and timm's URL downloads) keep checkpoints: TORCH_HOME/hub/checkpoints."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class _HubFiles:
    """Weights in a hub repository: the first of `candidates` that exists; `with_config`: config.json too."""

    repo_id: str
    revision: str | None
    candidates: tuple[str, ...]
    with_config: bool

    def folder(self, cache: Path) -> Path:
        return cache / f"models--{self.repo_id.replace('/', '--')}"


@dataclass(frozen=True)
class _UrlFile:
    url: str

    def path(self) -> Path:
        return torch_hub_checkpoints() / os.path.basename(urlparse(self.url).path)


def _source(name: str, where: str) -> tuple[_HubFiles | _UrlFile, int | None]:
    """Where timm would take name's pretrained weights from, and the head's class count when known already."""
    if name.startswith(HF_HUB_PREFIX):
        repo_id, _, revision = name[len(HF_HUB_PREFIX) :].partition("@")
        return _HubFiles(repo_id, revision or None, HUB_WEIGHT_FILES, with_config=True), None
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag (check_model_name normally says so first)
        raise UserError(f"{where}: {e}") from None
    if cfg is None:
        raise UserError(f"{where}: timm has no pretrained weights for '{name}'")
    num_classes = int(cfg.num_classes or 0)
    if cfg.hf_hub_id and _has_hf_hub():
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename
        if filename is None:
            candidates: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
        elif filename.endswith(".safetensors"):
            candidates = (filename,)
        else:  # timm prefers a safetensors copy of a pickled file when the repository has one
            candidates = (*_safe_alternatives(filename), filename)
        return _HubFiles(repo_id, revision or None, candidates, with_config=False), num_classes
    if isinstance(cfg.url, str) and cfg.url:
        return _UrlFile(cfg.url), num_classes
    raise UserError(f"{where}: timm has no downloadable weights for '{name}'")


def _has_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _safe_alternatives(filename: str) -> list[str]:
    # The same renames as timm.models._hub._get_safe_alternatives.
    if filename == "pytorch_model.bin":
        return ["model.safetensors"]
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    if filename.endswith(".bin"):
        return [filename[: -len(".bin")] + ".safetensors"]
    return []


def fetch_command(name: str, from_hub: bool = True) -> str:
    """The command that puts name's weights into this same cache (the hub's, or torch's for URL-only weights),
    run on a machine with network."""
    if not from_hub:
        env = f"TORCH_HOME={shlex.quote(str(torch_hub_checkpoints().parents[1]))} "
    elif os.environ.get("HF_HUB_CACHE"):
        env = f"HF_HUB_CACHE={shlex.quote(str(hf_hub_cache()))} "
    else:
        env = f"HF_HOME={shlex.quote(str(_hf_home()))} "
    return f"{env}python -m dali_kd.fetch {shlex.quote(name)}"


def _cached_hub_file(files: _HubFiles, filename: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(files.repo_id, filename, cache_dir=cache, revision=files.revision)
    return Path(found) if isinstance(found, str) else None  # None or a "known missing" marker otherwise


def _cached(source: _HubFiles | _UrlFile, cache: Path) -> Path | None:
    """The local weights file, or None; for an hub repository that needs its config.json, both must be there."""
    if isinstance(source, _UrlFile):
        path = source.path()
        return path if path.is_file() else None
    if source.with_config and _cached_hub_file(source, "config.json", cache) is None:
        return None
    for filename in source.candidates:
        if (found := _cached_hub_file(source, filename, cache)) is not None:
            return found
    return None


def _download(source: _HubFiles | _UrlFile, cache: Path, name: str, where: str) -> Path:
    if isinstance(source, _UrlFile):
        import torch.hub

        path = source.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(source.url, str(path), progress=True)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: the same one-line error
            raise UserError(
                _not_found(name, where, source, f"the download from {source.url} failed: {_first(e)}")
            ) from None
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    def get(filename: str) -> Path:
        return Path(hf_hub_download(files.repo_id, filename, revision=files.revision, cache_dir=cache))

    files = source
    try:
        if files.with_config:
            get("config.json")
        for filename in files.candidates:
            try:
                return get(filename)
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError):  # not cached and the hub unreachable: no network
                    raise
                continue  # the repository has no such file: try the next
    except GatedRepoError:
        raise UserError(
            f"{where}: '{name}' is a gated repository on the Hugging Face hub: accept its terms on "
            f"huggingface.co/{files.repo_id} and log in (hf auth login) before fetching it"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where}: no repository {files.repo_id} on the Hugging Face hub (for '{name}')"
        ) from None
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: the same one-line error
        raise UserError(
            _not_found(name, where, files, f"the download from the hub failed: {_first(e)}")
        ) from None
    raise UserError(
        f"{where}: the hub repository {files.repo_id} holds none of {', '.join(files.candidates)}"
    )


def _first(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _not_found(name: str, where: str, source: _HubFiles | _UrlFile, why: str) -> str:
    searched = source.path() if isinstance(source, _UrlFile) else source.folder(hf_hub_cache())
    return (
        f"{where}: the weights of '{name}' are not in the local cache (searched {searched}) and {why}; fetch "
        f"them on a machine with network: {fetch_command(name, from_hub=isinstance(source, _HubFiles))}"
    )


def find_pretrained(name: str, where: str, download: bool | None = None) -> PretrainedWeights:
    """name's pretrained weights on this machine: from the cache, else downloaded into it when `download`
    (default: unless HF_HUB_OFFLINE is set); a UserError naming the model, the cache and the fetch command
    when neither works. where: what the user wrote it in, for messages (e.g. model.teacher.pretrained)."""
    download = not offline() if download is None else download
    source, num_classes = _source(name, where)
    cache = hf_hub_cache()
    path = _cached(source, cache)
    downloaded = False
    if path is None:
        if not download:
            why = "HF_HUB_OFFLINE is set" if offline() else "downloads are off here"
            raise UserError(_not_found(name, where, source, why))
        console.info(f"{where}: downloading the pretrained weights of {name} into the cache")
        path, downloaded = _download(source, cache, name, where), True
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
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {snapshot / 'config.json'}: {_first(e)}") from None
    return int(pretrained_cfg.get("num_classes") or 0)

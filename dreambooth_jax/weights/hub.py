"""Fetching a diffusers pipeline from the Hugging Face Hub: only its configs, tokenizers and safetensors."""

from __future__ import annotations

import fnmatch
import logging
import os
import re

from dreambooth_jax import storage
from dreambooth_jax.errors import DownloadError, MissingFileError

log = logging.getLogger(__name__)

_CONFIG_PATTERNS = ("model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*")
# What is read of a pipeline folder in a bucket: every weight file of the components (variants included).
def _bucket_weight_patterns(folders) -> tuple[str, ...]:
    return tuple(f"{d}/*{ext}" for d in folders for ext in (".safetensors", ".json", ".bin"))


def weight_patterns(files: list[str], variant: str | None, folders) -> list[str]:
    """The safetensors files (and shard indexes) of each component folder ('': the repository's root), of
    `variant` when it has one."""
    chosen = []
    for folder in folders:
        mine = [f for f in files if os.path.dirname(f) == folder and ".safetensors" in f]
        if not mine:  # PyTorch pickles only: read without torch (`torch_pickle`)
            mine = [f for f in files if os.path.dirname(f) == folder and ".bin" in f]
        tagged = [f for f in mine if variant and re.search(rf"\.{re.escape(variant)}[.-]", f)]
        plain = [f for f in mine if not re.search(r"\.(fp16|bf16|fp32|ema|non_ema|flax)[.-]", f)]
        chosen += tagged or plain
    return chosen


def access_error(repo_id: str, revision: str | None, error: Exception) -> DownloadError:
    """Our error for a repository the Hub refuses: gated (its licence not accepted, or no token), missing,
    or without that revision; the Hub's own message kept."""
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, GatedRepoError):
        why = ("is gated: accept its licence on its Hub page, then log in (`hf auth login`) or set HF_TOKEN "
               "to a token of that account")
    elif isinstance(error, RevisionNotFoundError):
        why = f"has no revision {revision!r}"
    else:
        why = "does not exist or is private (a private one needs a token: HF_TOKEN or `hf auth login`)"
    return DownloadError(f"{repo_id} {why} ({first})")


def download_pipeline(
    repo_id: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    weights: bool = True,
    folders: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
) -> str:
    """Downloads (or finds in the cache) what `load_pipeline` reads; returns the local snapshot folder.
    `folders`: the component folders whose weights are read; `weights=False`: the configs and tokenizers only
    (a memory preflight reads nothing else); `skip`: folders whose weights are not read (e.g. 'vae' when
    another VAE replaces it).

    The token defaults to huggingface_hub's own (`HF_TOKEN` or `huggingface-cli login`). With
    `HF_HUB_OFFLINE=1` the cached snapshot is used.
    """
    # late: slow to import and only Hub ids need it (tests replace its functions)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    folders = tuple(d for d in folders if d not in skip) if weights else ()
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # a gated repo's error is one of them
        raise access_error(repo_id, revision, e) from e
    except Exception as e:  # offline, unreachable: use what the cache holds for these patterns
        log.warning("cannot list %s on the Hub (%s); trying the local cache", repo_id, e)
        dotted = "." + variant if variant else ""
        patterns = list(_CONFIG_PATTERNS) + [f"{d}/*{dotted}*.safetensors*" for d in folders]
        try:
            return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token,
                                     cache_dir=cache_dir, local_files_only=True)
        except Exception as cache_error:
            raise MissingFileError(
                f"cannot fetch {repo_id!r}: the Hub is unreachable ({e}) and it is not in the local cache "
                f"({cache_error}). Pass a local pipeline folder instead."
            ) from e
    if "model_index.json" not in files:
        raise MissingFileError(f"{repo_id} is not a diffusers pipeline repository (no model_index.json)")
    wanted = [f for f in files if any(fnmatch.fnmatch(f, p) for p in _CONFIG_PATTERNS)]
    wanted += weight_patterns(files, variant, folders)
    log.info("fetching %d files of %s", len(wanted), repo_id)
    return snapshot_download(repo_id, revision=revision, allow_patterns=wanted, token=token,
                             cache_dir=cache_dir)


# What the evaluation encoders read of a transformers model repository (ViT, CLIP).
MODEL_PATTERNS = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                  "vocab.json", "merges.txt", "special_tokens_map.json")
_SAFETENSORS_PATTERNS = ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors")
_PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin")


def download_model(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                   cache_dir: str | None = None) -> str:
    """Downloads (or finds in the cache) the config, weights and tokenizer of a transformers model repository;
    returns the local snapshot folder. Weights: safetensors, else `pytorch_model.bin` (read without torch)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        safetensors = any(f.endswith(".safetensors") for f in files)
        weights = _SAFETENSORS_PATTERNS if safetensors else _PICKLE_PATTERNS
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # a gated repo's error is one of them
        raise access_error(repo_id, revision, e) from e
    except Exception:  # offline: whatever the cache holds
        weights = _SAFETENSORS_PATTERNS + _PICKLE_PATTERNS
    kwargs = dict(revision=revision, allow_patterns=list(MODEL_PATTERNS + weights), token=token,
                  cache_dir=cache_dir)
    try:
        return snapshot_download(repo_id, **kwargs)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # a gated repo's error is one of them
        raise access_error(repo_id, revision, e) from e
    except Exception as e:
        try:
            return snapshot_download(repo_id, local_files_only=True, **kwargs)
        except Exception:
            raise MissingFileError(f"cannot fetch {repo_id!r}: the Hub is unreachable ({e}) and it is not in "
                                   "the local cache. Pass a local model folder instead.") from e


def _component_files(files: list[str], folder: str, variant: str | None, weights: bool,
                     source: str) -> list[str]:
    """The files to fetch of one diffusers model from a listing of its repository or bucket folder:
    `config.json` and diffusers' weight files, at the root or, for a whole pipeline, in `folder/`. Not other
    layouts of the same weights, which such repositories often carry too (e.g. sdxl-vae-fp16-fix's LDM-named
    `sdxl_vae.safetensors`)."""
    where = "" if "config.json" in files else folder
    if os.path.join(where, "config.json") not in files:
        raise MissingFileError(f"{source} holds no diffusers model (no config.json at its root or in "
                               f"{folder}/)")
    ours = [f for f in files if os.path.basename(f).startswith("diffusion_pytorch_model")]
    return [os.path.join(where, "config.json")] + (weight_patterns(ours, variant, (where,)) if weights
                                                   else [])


def download_component(repo_id: str, folder: str, *, revision: str | None = None, variant: str | None = None,
                       token: str | bool | None = None, cache_dir: str | None = None,
                       weights: bool = True) -> str:
    """Downloads (or finds in the cache) one diffusers model: a repository holding it at its root (e.g.
    madebyollin/sdxl-vae-fp16-fix) or a pipeline repository's `folder/`; returns the local snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # a gated repo's error is one of them
        raise access_error(repo_id, revision, e) from e
    except Exception as e:  # offline, unreachable: use what the cache holds
        log.warning("cannot list %s on the Hub (%s); trying the local cache", repo_id, e)
        patterns = ["config.json", f"{folder}/config.json"]
        if weights:
            patterns.append(f"*diffusion_pytorch_model{'.' + variant if variant else ''}*.safetensors*")
        try:
            return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token,
                                     cache_dir=cache_dir, local_files_only=True)
        except Exception as cache_error:
            raise MissingFileError(f"cannot fetch {repo_id!r}: the Hub is unreachable ({e}) and it is not in "
                                   f"the local cache ({cache_error}). Pass a local folder instead.") from e
    wanted = _component_files(files, folder, variant, weights, repo_id)
    return snapshot_download(repo_id, revision=revision, allow_patterns=wanted, token=token,
                             cache_dir=cache_dir)


def resolve_component(name_or_path: str, folder: str, *, weights: bool = True, variant: str | None = None,
                      **kwargs) -> str:
    """The local folder of one diffusers model (its `config.json` and weights, of `variant` where it has that
    variant) given as a local folder, a bucket folder or a Hub repository id; a whole pipeline stands for its
    `folder/` (e.g. 'vae')."""
    if storage.is_remote(name_or_path):
        storage.check_backend(name_or_path, "model")
        root = storage.remote_path(name_or_path)
        if not root.is_dir():
            raise MissingFileError(f"{name_or_path}: no such folder")
        below = root / folder
        files = [p.name for p in root.iterdir()]
        files += [f"{folder}/{p.name}" for p in below.iterdir()] if below.is_dir() else []
        wanted = _component_files(files, folder, variant, weights, name_or_path)
        local = storage.Folder(name_or_path).pull(tuple(wanted))
    elif os.path.isdir(name_or_path):
        local = name_or_path
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise MissingFileError(f"{name_or_path} is not a model folder (no such folder; Hub ids look like "
                               "'org/name')")
    else:
        local = download_component(name_or_path, folder, weights=weights, variant=variant, **kwargs)
    if not os.path.isfile(os.path.join(local, "config.json")) and os.path.isdir(os.path.join(local, folder)):
        local = os.path.join(local, folder)
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise MissingFileError(f"{name_or_path}: no config.json (expected a diffusers model folder, or a "
                               f"pipeline with a {folder}/ folder)")
    return local


def resolve(name_or_path: str, *, what: str = "pipeline", **kwargs) -> str:
    """A local folder as is; a bucket folder (`gs://...`) mirrored into the local cache; anything else is
    taken for a Hub repository id and downloaded (a diffusers pipeline, or with `what="model"` a transformers
    model)."""
    if storage.is_remote(name_or_path):
        storage.check_backend(name_or_path, "model")
        folders = ([d for d in kwargs.get("folders", ()) if d not in kwargs.get("skip", ())]
                   if kwargs.get("weights", True) else [])
        return storage.Folder(name_or_path).pull(_CONFIG_PATTERNS + _bucket_weight_patterns(folders))
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise MissingFileError(f"{name_or_path} is not a {what} folder (no such folder; Hub ids look like "
                                "'org/name')")
    if what == "model":
        return download_model(name_or_path, **kwargs)
    return download_pipeline(name_or_path, **kwargs)

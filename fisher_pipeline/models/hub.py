"""Models named by HuggingFace hub id (`Qwen/Qwen2.5-0.5B`), resolved through the local cache.

`model.path` may be a hub id `org/name` (with `model.revision`: a branch, tag or commit).
It resolves to the cached snapshot folder, which is then loaded like any local folder
(safetensors only, `trust_remote_code` off unless set). Runs are offline by default
(`HF_HUB_OFFLINE=1`, the Makefile's and the package's default): an id missing from the
cache is an error naming the command that fills it, `python -m fisher_pipeline
download-model ORG/NAME`, the one step that goes online. Only the files loading needs are
fetched: weights as safetensors, configs, tokenizer files; never pickles, never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelLoadError

#: `org/name` as the hub spells repository ids.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: What a model folder needs: safetensors weights (and their index), configs, tokenizer files.
FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.tiktoken"]


def is_hub_id(path: str) -> bool:
    """Whether `path` names a hub repository rather than a local folder or file."""
    return bool(HUB_ID.fullmatch(path)) and not os.path.exists(path) and not path.endswith(".gguf")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def download_command(repo_id: str, revision: str | None) -> str:
    return (f"HF_HUB_OFFLINE=0 .venv/bin/python -m fisher_pipeline download-model {repo_id}"
            + (f" --revision {revision}" if revision else ""))


def resolve(repo_id: str, revision: str | None = None, download: bool = False) -> Path:
    """The cached snapshot folder of hub model `repo_id` at `revision` (default `main`).

    Args:
        download: fetch what the cache lacks (online); otherwise only the cache is read,
            and only when `HF_HUB_OFFLINE` is off does a cache miss go online.

    Raises:
        ModelLoadError: not in the cache while offline (naming the command that fills it),
            or the hub does not know the id or revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    local_only = _offline() and not download
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=FILES, local_files_only=local_only)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelLoadError(
            f"model.path {where} is a hub id that is not in the HuggingFace cache ({HF_HUB_CACHE}), and runs are "
            f"offline (HF_HUB_OFFLINE=1): fill the cache once with `{download_command(repo_id, revision)}`, then "
            "rerun (or point model.path at a local folder)") from None
    except HfHubHTTPError as err:
        raise ModelLoadError(f"model.path {where}: the hub refused it ({str(err).splitlines()[0]}); check the id "
                             "and model.revision") from None
    return Path(folder)


def snapshot_revision(folder: Path) -> str:
    """The commit a cached snapshot folder holds (its folder name), or '' for any other folder."""
    return folder.name if folder.parent.name == "snapshots" else ""

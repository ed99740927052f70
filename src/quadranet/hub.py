"""Sharing weights the timm way: a folder in timm's Hugging Face Hub layout.

`save_for_hf(model, folder)` writes `config.json` (architecture, model arguments and the
pretrained cfg: classes, input size, normalisation) and `model.safetensors` through timm's own
`save_for_hf`. After `import quadranet`, `timm.create_model("local-dir:" + folder,
pretrained=True)` rebuilds the model with these weights; uploaded with `push_to_hub`, the
repository loads as `"hf-hub:" + repo_id`. Nothing here uses the network except `push_to_hub`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_for_hf(
    model: nn.Module,
    folder: str | Path,
    *,
    data_config: Mapping[str, Any] | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` to `folder` as config.json + model.safetensors (timm's hub layout).

    Args:
        model: a timm model (any of this package's, or timm's own).
        folder: where to write; created if missing, files of the same names replaced.
        data_config: the preprocessing the weights expect, as timm's data config keys
            (`input_size`, `mean`, `std`, `crop_pct`, `interpolation`); default: the model's
            pretrained cfg.
        model_args: constructor arguments to record beyond those timm recorded when it built
            the model (a searched network's `arch` is added as a mapping).

    Returns:
        The folder.
    """
    from timm.models import save_for_hf as timm_save_for_hf

    from quadranet.models.quadranet_nas import QuadraNetNAS

    args = dict(model_args or {})
    if isinstance(model, QuadraNetNAS):
        args.setdefault("arch", model.arch.to_dict())
    folder = Path(folder)
    timm_save_for_hf(
        model,
        str(folder),
        model_args=args,
        safe_serialization=True,
        data_config=dict(data_config) if data_config else None,
    )
    return folder


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Add QuadraNet weights",
) -> str:
    """Upload a folder written by `save_for_hf` to a Hugging Face Hub model repository
    (created if missing; the token comes from `huggingface-cli login` or HF_TOKEN).
    Returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(url)

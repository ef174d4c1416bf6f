"""The CLIP model factory: open_clip models built from architectures kept as data.

Architectures are open_clip model-config JSON files in ``model_configs/`` beside this module
(``clip-tiny.json``), registered with ``open_clip.add_model_config``; open_clip's built-in
architectures (``ViT-B-32``, ``RN50``, ...) work by name. The config files stay *pure* open_clip
configs, so any open_clip install can rebuild an mmpipe model and load an exported checkpoint::

    open_clip.add_model_config("dataprep/model_configs/clip-tiny.json")
    model = open_clip.create_model("clip-tiny", pretrained="path/to/weights.pt")

open_clip passes every key of a model config to the model constructor, so preprocessing cannot live
in the same file.  It lives in a sidecar ``<name>.preprocess.json`` with two optional sections:
``preprocess_cfg`` (open_clip ``PreprocessCfg`` fields: mean, std, interpolation, resize_mode,
fill_color) and ``aug_cfg`` (open_clip ``AugmentationCfg`` fields, for the train transform).
open_clip skips the sidecar when scanning the folder (it has no ``embed_dim``).

The embed stage (``dataprep.embed``) and training (``training.models.clip``) both build from here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

#: mmpipe's CLIP architectures, shipped inside the package (like open_clip's model_configs).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
PREPROCESS_SUFFIX = ".preprocess.json"

_registered: dict[Path, None] = {}  # insertion-ordered set


@dataclass
class ClipBundle:
    """A CLIP model with the transforms and tokenizer that belong to it."""

    model: torch.nn.Module  # open_clip CLIP; forward -> (image_features, text_features, scale)
    train_transform: Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W] float
    eval_transform: Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W] float
    tokenizer: Callable[..., torch.Tensor]  # str | list[str] -> [N, context_length] int64
    context_length: int
    name: str


def register_model_configs(path: str | Path = MODEL_CONFIG_DIR) -> None:
    """Make the open_clip configs in ``path`` (a folder or one .json file) known by name."""
    path = Path(path).resolve()
    if path not in _registered:
        open_clip.add_model_config(path)
        _registered[path] = None


def list_clip_models() -> list[str]:
    """Every architecture name ``create_clip`` accepts (mmpipe's and open_clip's built-ins)."""
    register_model_configs()
    return open_clip.list_models()


def model_preprocess(name: str) -> dict[str, dict]:
    """The sidecar ``{"preprocess_cfg": {...}, "aug_cfg": {...}}`` of ``name`` ({} if none),
    looked up next to every registered config (last registered wins, like open_clip)."""
    register_model_configs()
    for path in reversed(list(_registered)):
        sidecar = (path if path.is_dir() else path.parent) / f"{name}{PREPROCESS_SUFFIX}"
        if sidecar.is_file():
            data = json.loads(sidecar.read_text())
            return {k: data[k] for k in ("preprocess_cfg", "aug_cfg") if k in data}
    return {}


def create_clip(name: str, pretrained: str | None = None, **overrides: Any) -> ClipBundle:
    """Build model ``name`` with its transforms and tokenizer.

    ``pretrained``: None (random init) or a local weights file (an open_clip state dict, e.g. an
    exported mmpipe checkpoint); open_clip's download tags are not usable offline.
    ``overrides``: keyword arguments of ``open_clip.create_model`` (``force_image_size``,
    ``precision``, ``device``, ...) plus ``aug_cfg`` (replaces the sidecar's) and
    ``preprocess_cfg`` (merged over the sidecar's).
    """
    register_model_configs()
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown CLIP model {name!r}; known: {open_clip.list_models()}")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights not found: {pretrained}")

    sidecar = model_preprocess(name)
    aug_cfg = overrides.pop("aug_cfg", sidecar.get("aug_cfg"))
    preprocess_cfg = sidecar.get("preprocess_cfg", {}) | overrides.pop("preprocess_cfg", {})
    # open_clip stores the final preprocessing on the model (model.visual.preprocess_cfg), with
    # size taken from the architecture; force_preprocess_cfg is the one way to set fill_color.
    model = open_clip.create_model(
        name, pretrained=pretrained, force_preprocess_cfg=preprocess_cfg, **overrides
    )
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    context_length = model.context_length
    return ClipBundle(
        model=model,
        train_transform=image_transform_v2(pp_cfg, is_train=True, aug_cfg=aug_cfg),
        eval_transform=image_transform_v2(pp_cfg, is_train=False),
        # mmpipe configs name no hf_tokenizer_name, so this is the BPE SimpleTokenizer that ships
        # inside open_clip: no network.
        tokenizer=open_clip.get_tokenizer(name, context_length=context_length),
        context_length=context_length,
        name=name,
    )

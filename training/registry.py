"""The model registry: each spec's name and where its `ModelSpec` lives.

The one list of models. The CLI's choices, the configs, the deployments and the training flow
all derive from it, and it imports nothing heavy: specs are loaded when first asked for.
Other packages add models through the `mmpipe.specs` entry-point group (name = "module:Class").
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "mmpipe.specs"

_TARGETS: dict[str, str | type] = {
    "clip": "training.specs.clip:ClipSpec",
    "dvae": "training.specs.dvae:DVAESpec",
    "dalle": "training.specs.dalle:DalleSpec",
}
_plugins_loaded = False


def register_spec(name: str, target: str | type) -> None:
    """Add (or replace) a model: `target` is a ModelSpec subclass or "module:Class"."""
    if not name.replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"spec name {name!r}: use lower-case letters, digits and '-'")
    _TARGETS[name] = target


def unregister_spec(name: str) -> None:
    _TARGETS.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _TARGETS.setdefault(ep.name, ep.value)


def spec_names() -> tuple[str, ...]:
    """Every registered model, built-ins first."""
    _load_plugins()
    return tuple(_TARGETS)


def check_spec_name(name: str) -> str:
    """`name` if it is registered; a ValueError listing the registered ones if not."""
    if name not in spec_names():
        raise ValueError(f"unknown model spec {name!r}; known: {', '.join(spec_names())}")
    return name


def spec_class(name: str) -> type:
    """The ModelSpec subclass registered as `name`, imported on first use."""
    target = _TARGETS[check_spec_name(name)]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def get_spec(name: str) -> Any:
    """A fresh instance of the ModelSpec registered as `name`."""
    spec = spec_class(name)()
    spec.name = name
    return spec

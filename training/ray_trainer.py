"""Ray Train's `TorchTrainer` without the placement-group cleaner where that cannot work.

Ray Train starts a detached cleaner that asks the state API (served by the dashboard) every
second whether the controller still lives. A private local Ray has no dashboard: every query
fails with a warning and, on a busy machine, the cleaner's stop times out with a traceback. It
has nothing to clean there either, since the driver's exit takes its whole Ray with it.
"""

from __future__ import annotations

from ray._private.worker import get_dashboard_url
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)


def has_state_api() -> bool:
    """Whether the Ray this process is connected to serves the state API (a dashboard)."""
    return bool(get_dashboard_url())


class Trainer(TorchTrainer):
    """`TorchTrainer` that keeps the placement-group cleaner only on a Ray with a dashboard."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if has_state_api():
            return callbacks
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

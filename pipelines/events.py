"""Prefect events mmpipe emits: a published dataset version starts what waits for it.

`emit_dataset_published` is called by the publish stage once a version's manifest is in the
store. Training deployments served with `on_publish` (configs/serve.yaml) are triggered by it
and train on the manifest it names.
"""

from __future__ import annotations

from typing import Any

DATASET_PUBLISHED = "mmpipe.dataset.published"


def dataset_resource_id(name: str) -> str:
    return f"mmpipe.dataset.{name}"


def emit_dataset_published(name: str, version: str, manifest_url: str, **details: Any):
    """Emit `mmpipe.dataset.published` for dataset `name`; returns the Event (None if events
    are off). `details` (sample counts, stage stats) go into the payload, which must stay small."""
    from prefect.events import emit_event

    return emit_event(
        event=DATASET_PUBLISHED,
        resource={
            "prefect.resource.id": dataset_resource_id(name),
            "prefect.resource.name": name,
            "mmpipe.dataset.version": version,
        },
        payload={"dataset": name, "version": version, "manifest_url": manifest_url, **details},
    )

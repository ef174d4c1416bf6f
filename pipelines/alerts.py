"""Alerts: a failed or crashed build or training run posts to a webhook (Slack, Teams, a pager).

`apply_alerts` saves a Custom Webhook block (`mmpipe-alerts`) and a Prefect automation that
sends a notification through it when a flow run of `build-dataset` or `train-*` enters one of
the configured states. The server runs the automation, so alerts reach their hook whichever
process ran the flow (`mmpipe build`, `mmpipe serve`, a worker). Applying again replaces both.
"""

from __future__ import annotations

from pipelines.ops_config import Alerts

BLOCK_NAME = "mmpipe-alerts"
AUTOMATION_NAME = "mmpipe: alert on failed runs"
FLOWS = ["build-dataset", "train-*"]  # mmpipe's flows, whoever runs them
SUBJECT = "mmpipe: flow run {{ flow_run.name }} of {{ flow.name }} is {{ flow_run.state.name }}"
BODY = """Flow run {{ flow_run.name }} ({{ flow_run.id }}) of {{ flow.name }} \
entered state {{ flow_run.state.name }}: {{ flow_run.state.message }}
{{ flow_run|ui_url }}"""


def webhook_block(alerts: Alerts):
    """The webhook as a Prefect notification block: JSON {"text": subject and body}, the shape
    Slack's and Teams' incoming webhooks take."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(
        name=BLOCK_NAME,
        url=alerts.webhook_url,
        json_data={"text": "{{subject}}\n{{body}}"},
    )


def apply_alerts(alerts: Alerts) -> str:
    """Create or replace the webhook block and the automation; returns the automation's id."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_id = webhook_block(alerts).save(BLOCK_NAME, overwrite=True)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(old.id)
    automation = Automation(
        name=AUTOMATION_NAME,
        description=f"post to the alerts webhook when a run is {' or '.join(alerts.on)}",
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{state}" for state in alerts.on},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return str(automation.id)

"""Alerts: a build that fails on purpose reaches a webhook receiver on loopback, once."""

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from dataprep.url_list import UrlListError
from pipelines.config import BuildConfig, load_config
from pipelines.deployments import apply_deployments
from pipelines.ops_config import ServeConfig
from tests.pipelines.conftest import using_api


class Receiver(ThreadingHTTPServer):
    """Records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                length = int(handler.headers.get("Content-Length", 0))
                self.received.append(json.loads(handler.rfile.read(length)))
                handler.send_response(204)
                handler.end_headers()

            def log_message(handler, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_failed_build_notifies_the_webhook_once(prefect_server, receiver, tmp_path, monkeypatch):
    from pipelines.flows import run_build

    serve = {
        "alerts": {"webhook_url": receiver.url, "on": ["Failed", "Crashed"]},
        "builds": [{"config": "configs/demo.yaml", "overrides": ["name=alerted"]}],
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    unreadable = tmp_path / "urls.parquet"
    unreadable.write_text("this is not a parquet file")
    config = BuildConfig.model_validate(
        {
            "name": "alerted",
            "urls": str(unreadable),
            "store": {"url": f"file://{tmp_path / 'store'}"},
        }
    )
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    with using_api(prefect_server.api_url):
        apply_deployments(load_config(ServeConfig, tmp_path / "serve.yaml"))
        with pytest.raises(UrlListError):
            run_build(config)

    def about_this_run() -> list[str]:
        texts = [body["text"] for body in receiver.received]
        return [t for t in texts if "flow run build alerted of build-dataset" in t]

    deadline = time.monotonic() + 60
    while not about_this_run() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a second notification would come right behind the first
    [text] = about_this_run()
    assert "is Failed" in text and "entered state Failed" in text, text
    assert f"{prefect_server.ui_url}/runs/flow-run/" in text, text

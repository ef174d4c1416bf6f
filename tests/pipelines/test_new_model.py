"""A new model needs a model file, a spec and a config: no edit to the CLI, flows or deployments.

The toy model (toy_model.py, toy.yaml) is registered as a plugin is: an `mmpipe.specs` entry
point, here in a dist-info folder on PYTHONPATH, so Ray's workers find it too; this process,
whose plugins are already read, registers it by name.
"""

import os

import pytest
import yaml

from pipelines.cli import build_parser, train_config_from_args
from pipelines.config import ConfigError, load_config
from pipelines.ops_config import ServeConfig
from tests.training.test_engine import write_shards
from training.config import TrainConfig
from training.registry import register_spec, unregister_spec

TOY = "tests.pipelines.toy_model:ToySpec"
TOY_CONFIG = "tests/pipelines/toy.yaml"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    dist = plugins / "mmpipe_toy-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmpipe-toy\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[mmpipe.specs]\ntoy = {TOY}\n")
    paths = [str(plugins), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))  # Ray's workers
    register_spec("toy", TOY)
    yield
    unregister_spec("toy")


def serve_config(tmp_path, model: str) -> ServeConfig:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"training": [{"model": model, "config": TOY_CONFIG}]}))
    return load_config(ServeConfig, path)


def test_the_cli_and_the_ops_config_take_a_registered_model(toy, tmp_path):
    args = build_parser().parse_args(["train", "toy", "--config", TOY_CONFIG])
    cfg = train_config_from_args(args, inputs=False)
    assert (cfg.spec, cfg.name, cfg.steps) == ("toy", "toy", 2)
    assert serve_config(tmp_path, "toy").training[0].model == "toy"
    with pytest.raises(
        ConfigError, match="unknown model spec 'vqgan'; known: clip, dvae, dalle, toy"
    ):
        serve_config(tmp_path, "vqgan")


@pytest.mark.slow
def test_a_registered_model_is_deployed_and_trained_by_its_flow(
    toy, local_store, tmp_path, monkeypatch
):
    import ray
    from prefect.testing.utilities import prefect_test_harness

    from pipelines import training_flows
    from pipelines.deployments import deployments

    [deployment] = deployments(serve_config(tmp_path, "toy"))
    assert (deployment.flow_name, deployment.name) == ("train-toy", "toy")
    flow = training_flows.training_flow("toy")
    assert flow.name == "train-toy" and training_flows.train_toy is flow

    ray.shutdown()  # a fresh Ray, whose workers get this PYTHONPATH
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    write_shards(local_store, "data")
    where = [f"data.source={local_store.root_uri}/data/", f"store.url={local_store.root_uri}"]
    cfg = load_config(TrainConfig, TOY_CONFIG, where)
    with prefect_test_harness(server_startup_timeout=120):
        outcome = flow(cfg)
    ray.shutdown()
    assert outcome["final"]["step"] == 2 and "train/total" in outcome["final"]
    assert outcome["export"] == f"{local_store.root_uri}/runs/toy/export/model.pt"

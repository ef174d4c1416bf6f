"""infra/: every file parses, says what a real deployment needs, and holds no secrets."""

import importlib
import re
from pathlib import Path

import pytest
import yaml
from prefect import Flow

from pipelines.config import BuildConfig, load_config
from pipelines.ops_config import ServeConfig
from training.config import TrainConfig

INFRA = Path("infra")
IMAGE = "registry.example.com/mmpipe:0.1.0"
YAML_FILES = [
    "ray/cluster-aws.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "docker-compose.yml",
    "prefect.yaml",
    "serve.yaml",
]
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(password|secret|token)[\"']?\s*[:=]\s*[\"']?(?!\$\{)[A-Za-z0-9/+]{12,}"),
]


def load(name: str):
    return yaml.safe_load((INFRA / name).read_text())


def images(node) -> list[str]:
    """Every `image:` value anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def env_entries(node) -> list[dict]:
    """Every Kubernetes `env:` entry (name + value / valueFrom)."""
    if isinstance(node, dict):
        found = [e for e in node.get("env", []) if isinstance(e, dict)]
        return found + [e for v in node.values() for e in env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in env_entries(v)]
    return []


@pytest.mark.parametrize("name", YAML_FILES)
def test_every_file_parses(name):
    assert isinstance(load(name), dict)


@pytest.mark.parametrize("name", [*YAML_FILES, "Dockerfile", "README.md"])
def test_no_secret_looking_literals(name):
    text = (INFRA / name).read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{name}: {pattern.search(text).group(0)!r}"


def test_every_mmpipe_image_is_the_same_tag():
    found = {name: images(load(name)) for name in YAML_FILES}
    mmpipe = {i for imgs in found.values() for i in imgs if "mmpipe" in i}
    assert mmpipe == {IMAGE}
    for name in ("ray/cluster-aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        assert IMAGE in found[name], name
    assert f"docker build -f infra/Dockerfile -t {IMAGE} ." in (INFRA / "Dockerfile").read_text()


def test_ray_cluster_launcher_has_gpu_workers_and_token_auth():
    cluster = load("ray/cluster-aws.yaml")
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in cluster["available_node_types"]
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cluster["max_workers"]
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = " ".join(commands)
        assert "RAY_AUTH_MODE=token" in start and "secretsmanager" in start
    assert "--dashboard-host=0.0.0.0" in " ".join(cluster["head_start_ray_commands"])


def test_raycluster_requests_gpus_and_takes_secrets_from_kubernetes():
    cluster = load("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == "2.60.0"  # the pinned Ray
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["requests"] == head["resources"]["limits"]
    [gpu_group] = cluster["spec"]["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    for entry in env_entries(cluster):
        if re.search(r"TOKEN|SECRET|KEY|PASSWORD", entry["name"]):
            assert "secretKeyRef" in entry["valueFrom"], entry["name"]


def test_rayjob_runs_a_valid_training_command_on_the_cluster():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (
        job["spec"]["clusterSelector"]["ray.io/cluster"]
        == load("kuberay/raycluster.yaml")["metadata"]["name"]
    )
    words = job["spec"]["entrypoint"].split()
    assert words[:3] == ["mmpipe", "train", "clip"]
    config = words[words.index("--config") + 1]
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    data = words[words.index("--data") + 1]
    cfg = load_config(TrainConfig, config, [*overrides, f"data.source={data}"])
    assert cfg.scale.use_gpu and cfg.store.url.startswith("s3://")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert submitter["resources"]["requests"] and submitter["resources"]["limits"]


def test_compose_runs_prefect_on_postgres_and_minio_with_secrets_from_the_environment():
    compose = load("docker-compose.yml")
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "mmpipe-serve"} <= set(services)
    prefect = services["prefect-server"]
    assert prefect["image"] == "prefecthq/prefect:3.8.8-python3.11"  # the pinned Prefect
    db_url = prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "${POSTGRES_PASSWORD" in db_url
    assert "127.0.0.1:4200:4200" in prefect["ports"]
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    for service in services.values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", key):
                assert str(value).startswith("${"), f"{key} must come from the environment"
    serve = services["mmpipe-serve"]
    assert serve["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert serve["command"].split()[:4] == ["mmpipe", "serve", "--config", "infra/serve.yaml"]


def test_serve_config_loads_and_its_build_and_training_configs_validate():
    config = load_config(ServeConfig, INFRA / "serve.yaml")
    for build in config.builds:
        load_config(BuildConfig, build.config, build.overrides)
    for train in config.training:
        load_config(TrainConfig, train.config, [f"spec={train.model}", *train.overrides])
    assert config.training[0].on_publish.dataset == config.builds[0].overrides[0].split("=")[1]


def render_templates(node, payload):
    """Stand-in for Prefect's Jinja rendering of trigger parameters, for validation."""
    if isinstance(node, dict):
        return {k: render_templates(v, payload) for k, v in node.items()}
    if isinstance(node, str):
        return re.sub(r"\{\{\s*event\.payload\.(\w+)\s*\}\}", lambda m: payload[m.group(1)], node)
    return node


def test_prefect_yaml_entrypoints_are_flows_and_parameters_validate():
    project = load("prefect.yaml")
    assert project["prefect-version"] == "3.8.8"
    payload = {"version": "v3", "manifest_url": "s3://mmpipe/store/datasets/x/v3/manifest.json"}
    for deployment in project["deployments"]:
        path, _, function = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        flow.validate_parameters(deployment["parameters"])
        for trigger in deployment.get("triggers", []):
            assert trigger["expect"] == ["mmpipe.dataset.published"]
            flow.validate_parameters(render_templates(trigger["parameters"], payload))
        pool = deployment["work_pool"]  # the process pool the image's workers take runs from
        assert pool["name"] == "mmpipe" and pool["job_variables"]["working_dir"] == "/opt/mmpipe"
    build = project["deployments"][0]
    assert build["concurrency_limit"] == 1 and build["schedules"][0]["cron"]

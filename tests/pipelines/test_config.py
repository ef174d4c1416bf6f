"""Config loading: YAML, dotted overrides, and errors that name the field and value."""

import pytest

from pipelines.config import BuildConfig, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_defaults_filled():
    config = load_config(BuildConfig, "configs/demo.yaml")
    assert config.name == "demo"
    assert config.crawl.image_size == 64
    assert config.crawl.retries == 0  # default, not in the file
    assert config.crawl.policy.allow == ["127.0.0.1:8765"]


def test_overrides_reach_nested_fields_and_parse_as_yaml(tmp_path):
    path = write(tmp_path, "name: x\nurls: u.parquet\n")
    config = load_config(
        BuildConfig,
        path,
        [
            "crawl.threads=8",
            "crawl.policy.allow=['127.0.0.1:1', '10.0.0.0/8']",
            "store.url=s3://bucket/prefix",
            "store.s3.endpoint_url=http://127.0.0.1:9000",
            "crawl.caption_col=null",
        ],
    )
    assert config.crawl.threads == 8
    assert config.crawl.policy.allow == ["127.0.0.1:1", "10.0.0.0/8"]
    assert config.store.url == "s3://bucket/prefix"
    assert config.store.s3.endpoint_url == "http://127.0.0.1:9000"
    assert config.crawl.caption_col is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["crawl.threads=many"], "crawl.threads = 'many': Input should be a valid integer"),
        (["crawl.threds=8"], "crawl.threds: unknown field (value 8)"),
        (["crawl.resize_mode=stretch"], "crawl.resize_mode = 'stretch'"),
        (["name=Has Spaces"], "name = 'Has Spaces'"),
        (["crawl.policy.allow=['localhost']"], "allow-list entry 'localhost'"),
        (["crawl.threads"], "must look like key.sub=value"),
        (["name.sub=1"], "name is not a section"),
    ],
)
def test_errors_name_the_field_and_the_value(tmp_path, overrides, message):
    path = write(tmp_path, "name: x\nurls: u.parquet\n")
    with pytest.raises(ConfigError) as err:
        load_config(BuildConfig, path, overrides)
    assert message in str(err.value)


def test_missing_required_field_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="urls: required field is missing"):
        load_config(BuildConfig, write(tmp_path, "name: x\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(BuildConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(BuildConfig, write(tmp_path, "name: [x\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(BuildConfig, write(tmp_path, "- a\n- b\n"))

"""Pure parts of the data-plane test bed: model staging and Prometheus configuration."""

import pytest

from llmserve.testbed.prometheus import metric_labels, render_config
from llmserve.testbed.triton import TritonError, stage_model_repository


def _model(repo, name, versions, config=""):
    (repo / name).mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config or f'name: "{name}"\nbackend: "python"\n')
    for version in versions:
        (repo / name / str(version)).mkdir()
        (repo / name / str(version) / "model.py").write_text(f"VERSION = {version}\n")


def test_staging_copies_one_version_and_points_it_at_the_env(tmp_path):
    _model(tmp_path / "src", "chat", [1, 2, 3])
    stage_model_repository(tmp_path / "src", {"chat": 2}, tmp_path / "dst", tmp_path / "venv")
    staged = tmp_path / "dst" / "chat"
    assert sorted(p.name for p in staged.iterdir()) == ["2", "config.pbtxt"]
    assert (staged / "2" / "model.py").read_text() == "VERSION = 2\n"
    config = (staged / "config.pbtxt").read_text()
    assert config.startswith('name: "chat"\nbackend: "python"\n')
    assert f'key: "EXECUTION_ENV_PATH" value: {{ string_value: "{tmp_path / "venv"}" }}' in config


def test_staging_keeps_an_execution_env_the_model_chose(tmp_path):
    own = 'name: "m"\nparameters: { key: "EXECUTION_ENV_PATH" value: { string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }\n'
    _model(tmp_path / "src", "m", [1], config=own)
    stage_model_repository(tmp_path / "src", {"m": 1}, tmp_path / "dst", tmp_path / "venv")
    assert (tmp_path / "dst" / "m" / "config.pbtxt").read_text() == own


def test_staging_names_the_versions_that_exist(tmp_path):
    _model(tmp_path / "src", "chat", [1, 3])
    with pytest.raises(TritonError, match=r"no version 2 .*versions: 1, 3"):
        stage_model_repository(tmp_path / "src", {"chat": 2}, tmp_path / "dst", tmp_path / "venv")
    with pytest.raises(TritonError, match="config.pbtxt does not exist"):
        stage_model_repository(tmp_path / "src", {"missing": 1}, tmp_path / "dst", tmp_path / "venv")


def test_metric_labels_follow_kubernetes_sd_sanitizing():
    assert metric_labels({"llmserve.io/track": "canary", "app.kubernetes.io/name": "chat"}) == {
        "llmserve_io_track": "canary",
        "app_kubernetes_io_name": "chat",
    }


def test_prometheus_config_gives_each_target_its_labels():
    config = render_config(
        [
            {"target": "127.0.0.1:8002", "labels": {"llmserve_io_track": "stable"}},
            {"target": "127.0.0.1:9002"},
        ],
        scrape_interval="2s",
    )
    assert config["global"]["scrape_interval"] == config["global"]["scrape_timeout"] == "2s"
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [
        {"targets": ["127.0.0.1:8002"], "labels": {"llmserve_io_track": "stable"}},
        {"targets": ["127.0.0.1:9002"], "labels": {}},
    ]
    with pytest.raises(ValueError, match="at least one target"):
        render_config([])
    with pytest.raises(ValueError, match="host:port"):
        render_config([{"targets": ["127.0.0.1:8002"]}])

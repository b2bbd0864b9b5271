"""Manifests, verify, pull, publishing and config rendering, on small files (no torch)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.artifacts import gate
from llmserve.artifacts.manifest import ManifestError, Serving, pull, verify_version, write_manifest
from llmserve.artifacts.repository import (
    KINDS,
    SHIPPED_REPO,
    PublishError,
    ServingConfig,
    check_version_free,
    existing_versions,
    publish,
    render_config,
    staging_dir,
)


def _stage(repo, model="m", payload=b"weights"):
    staged = staging_dir(repo, model)
    (staged / "model.onnx").write_bytes(payload)
    (staged / "sub").mkdir()
    (staged / "sub" / "tokenizer.json").write_text("{}")
    (staged / "config.pbtxt").write_text(render_config(model, "embedding", ServingConfig()))
    sha = write_manifest(staged, {"model": model})
    return staged, sha


def _published(tmp_path, payload=b"weights"):
    repo = tmp_path / "repo"
    staged, sha = _stage(repo, payload=payload)
    return repo, publish(staged, repo, "m"), sha


def _cli(*args):
    """The installed `llmserve` command, as the model puller runs it."""
    return subprocess.run([str(Path(sys.executable).parent / "llmserve"), *map(str, args)],
                          capture_output=True, text=True)


def test_publish_numbers_versions_and_never_overwrites(tmp_path):
    repo, first, _ = _published(tmp_path)
    before = (repo / "m" / "1" / "model.onnx").read_bytes()
    staged, _ = _stage(repo, payload=b"other weights")
    assert (first, publish(staged, repo, "m")) == (1, 2)
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == before
    assert existing_versions(repo / "m") == [1, 2]
    # The model's config is the newest version's; no staging directory is left behind.
    assert (repo / "m" / "config.pbtxt").read_bytes() == (repo / "m" / "2" / "config.pbtxt").read_bytes()
    assert not list((repo / "m").glob(".staging-*"))

    staged, _ = _stage(repo)
    with pytest.raises(PublishError, match="already exists"):
        publish(staged, repo, "m", version=1)
    with pytest.raises(PublishError, match="already exists"):
        check_version_free(repo, "m", 2)
    (repo / "m" / "7").mkdir()  # even an empty directory is never replaced
    with pytest.raises(PublishError, match="already exists"):
        publish(staged, repo, "m", version=7)


def test_invalid_model_name_is_refused(tmp_path):
    with pytest.raises(PublishError, match="invalid model name"):
        staging_dir(tmp_path, "../escape")


def test_verify_detects_a_flipped_byte_a_missing_and_an_unlisted_file(tmp_path):
    repo, version, sha = _published(tmp_path)
    vdir = repo / "m" / str(version)
    assert verify_version(vdir, sha).sha256 == sha

    data = bytearray((vdir / "model.onnx").read_bytes())
    data[3] ^= 0x01
    (vdir / "model.onnx").write_bytes(bytes(data))
    (vdir / "sub" / "tokenizer.json").unlink()
    (vdir / "extra.py").write_text("print('injected')")
    with pytest.raises(ManifestError) as err:
        verify_version(vdir)
    message = str(err.value)
    assert "sha256 of model.onnx does not match" in message
    assert "missing sub/tokenizer.json" in message
    assert "unlisted file extra.py" in message


def test_verify_refuses_a_different_manifest_digest(tmp_path):
    repo, version, sha = _published(tmp_path)
    with pytest.raises(ManifestError, match="manifest sha256 is"):
        verify_version(repo / "m" / str(version), "0" * 64)


def test_pull_installs_the_version_and_its_own_config(tmp_path):
    repo, version, sha = _published(tmp_path)
    staged, _ = _stage(repo, payload=b"newer")  # version 2 changes the model-level config
    (staged / "config.pbtxt").write_text(render_config("m", "embedding", ServingConfig(max_batch_size=4)))
    write_manifest(staged, {"model": "m"})
    publish(staged, repo, "m")

    dest = tmp_path / "dest"
    assert pull(repo, "m", 1, dest, sha).sha256 == sha
    assert (dest / "m" / "config.pbtxt").read_bytes() == (repo / "m" / "1" / "config.pbtxt").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["m"]
    verify_version(dest / "m" / "1", sha)
    # Running again (an init container restart) keeps the intact copy.
    pull(repo, "m", 1, dest, sha)
    verify_version(dest / "m" / "1", sha)


def test_pull_configures_the_installed_copy_for_this_pod(tmp_path):
    """Instance kind and engine args reach the model-level config.pbtxt; the version stays as
    published (its manifest still verifies) and a re-run with the same settings keeps the copy."""
    repo, _, sha = _published(tmp_path)
    dest = tmp_path / "dest"
    args = {"max_model_len": 2048, "stop": 'quote " and \\ backslash'}
    serving = Serving(engine="onnxruntime", instance_kind="KIND_GPU", engine_args=args)
    pull(repo, "m", 1, dest, sha, serving)
    config = (dest / "m" / "config.pbtxt").read_text()
    assert "instance_group [{ kind: KIND_GPU, count: 1 }]" in config and "KIND_CPU" not in config
    [line] = [line for line in config.splitlines() if '"engine_args"' in line]
    escaped = json.dumps(args, sort_keys=True).replace("\\", "\\\\").replace('"', '\\"')
    assert line == f'parameters {{ key: "engine_args" value {{ string_value: "{escaped}" }} }}'
    verify_version(dest / "m" / "1", sha)
    stamp = (dest / "m" / "1" / "model.onnx").stat().st_ino
    pull(repo, "m", 1, dest, sha, serving)  # init container restart: nothing copied again
    assert (dest / "m" / "1" / "model.onnx").stat().st_ino == stamp
    # Other settings replace the earlier ones instead of adding a second parameter.
    pull(repo, "m", 1, dest, sha, Serving(instance_kind="KIND_CPU", engine_args={"max_num_seqs": 4}))
    config = (dest / "m" / "config.pbtxt").read_text()
    assert config.count("engine_args") == 1 and "max_num_seqs" in config and "KIND_CPU" in config


def test_pull_writes_the_merged_engine_args_a_multi_node_worker_reads(tmp_path):
    """A vLLM version gets engine-args.yaml beside config.pbtxt: engine.json with the pod's
    engine args over it (what model_repo/vllm merges), so `vllm serve --config` on a worker node
    runs the leader's engine settings (docs/distributed.md)."""
    repo = tmp_path / "repo"
    staged, _ = _stage(repo)
    (staged / "engine.json").write_text(json.dumps({"dtype": "bfloat16", "max_model_len": 2048}))
    sha = write_manifest(staged, {"model": "m"})
    publish(staged, repo, "m")
    dest = tmp_path / "dest"
    pull(repo, "m", 1, dest, sha, Serving(engine="vllm", engine_args={"max_model_len": 512, "nnodes": 2}))
    assert json.loads((dest / "m" / "engine-args.yaml").read_text()) == {
        "dtype": "bfloat16", "max_model_len": 512, "nnodes": 2}
    # Other settings on a re-run rewrite it; ONNX versions get none.
    pull(repo, "m", 1, dest, sha, Serving(engine="vllm", engine_args={"max_model_len": 256}))
    assert json.loads((dest / "m" / "engine-args.yaml").read_text())["max_model_len"] == 256
    onnx_repo, _, onnx_sha = _published(tmp_path / "onnx")
    pull(onnx_repo, "m", 1, tmp_path / "onnx-dest", onnx_sha)
    assert not (tmp_path / "onnx-dest" / "m" / "engine-args.yaml").exists()


def test_serving_configure_keeps_the_instance_count_and_replaces_engine_args():
    config = ('name: "v"\ninstance_group [{ kind: KIND_CPU, count: 3 }]\n'
              'parameters { key: "engine_args" value { string_value: "{\\"dtype\\": \\"auto\\"}" } }\n'
              'parameters { key: "other" value { string_value: "{}" } }\n')
    out = Serving(instance_kind="KIND_MODEL", engine_args={"dtype": "bfloat16"}).configure(config)
    assert "instance_group [{ kind: KIND_MODEL, count: 3 }]" in out
    assert out.count('"engine_args"') == 1 and "bfloat16" in out and '"other"' in out
    assert Serving().configure(config) == config


def test_pull_refuses_a_version_built_for_another_engine(tmp_path):
    repo, _, sha = _published(tmp_path)
    staged, _ = _stage(repo, payload=b"v2")
    (staged / "artifact.json").write_text("{}")  # an ONNX Runtime artifact
    write_manifest(staged, {"model": "m"})
    publish(staged, repo, "m")
    with pytest.raises(ManifestError, match="built for engine onnxruntime.*spec.runtime.engine to onnxruntime"):
        pull(repo, "m", 2, tmp_path / "dest", serving=Serving(engine="vllm"))
    pull(repo, "m", 2, tmp_path / "dest", serving=Serving(engine="onnxruntime"))


@pytest.mark.parametrize("damage", ["flip", "wrong-digest"])
def test_pull_refuses_and_leaves_nothing(tmp_path, damage):
    repo, version, sha = _published(tmp_path)
    if damage == "flip":
        path = repo / "m" / "1" / "model.onnx"
        data = bytearray(path.read_bytes())
        data[0] ^= 0x80
        path.write_bytes(bytes(data))
        expected = sha
    else:
        expected = hashlib.sha256(b"something else").hexdigest()
    dest = tmp_path / "dest"
    with pytest.raises(ManifestError):
        pull(repo, "m", 1, dest, expected)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_verify_and_pull_commands(tmp_path):
    repo, version, sha = _published(tmp_path)
    ok = _cli("verify", repo, "m", version, "--sha256", sha)
    assert ok.returncode == 0, ok.stderr
    assert sha in ok.stdout
    pulled = _cli("pull", "--source", repo, "--model", "m", "--version", 1, "--sha256", sha,
                  "--dest", tmp_path / "dest")
    assert pulled.returncode == 0, pulled.stderr
    configured = _cli("pull", "--source", repo, "--model", "m", "--version", 1, "--dest", tmp_path / "dest3",
                      "--instance-kind", "KIND_GPU", "--engine-args", '{"max_num_seqs": 8}')
    assert configured.returncode == 0, configured.stderr
    assert "KIND_GPU" in (tmp_path / "dest3" / "m" / "config.pbtxt").read_text()
    not_json = _cli("pull", "--source", repo, "--model", "m", "--version", 1, "--dest", tmp_path / "dest4",
                    "--engine-args", "[1]")
    assert not_json.returncode == 2 and "must be a JSON object" in not_json.stderr

    (repo / "m" / "1" / "model.onnx").write_bytes(b"weightz")
    bad = _cli("verify", repo, "m", version)
    assert bad.returncode == 1
    assert "sha256 of model.onnx does not match the manifest" in bad.stderr
    assert "Traceback" not in bad.stderr
    refused = _cli("pull", "--source", repo, "--model", "m", "--version", 1,
                   "--dest", tmp_path / "dest2")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "dest2" / "m").exists()
    missing = _cli("verify", repo, "m", 9)
    assert missing.returncode == 1 and "no such version directory" in missing.stderr


def test_verify_and_pull_do_not_import_torch(tmp_path):
    repo, version, sha = _published(tmp_path)
    code = (
        "import sys; from llmserve.cli import main; "
        f"rc = main(['verify', '{repo}', 'm', '1']); "
        f"rc |= main(['pull', '--source', '{repo}', '--model', 'm', '--version', '1', "
        f"'--dest', '{tmp_path / 'dest'}']); "
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'heavy import'; "
        "sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_configs_are_what_the_builder_renders(kind):
    """model_repo/<kind>/config.pbtxt documents the interface; the builder must agree."""
    shipped = (SHIPPED_REPO / kind / "config.pbtxt").read_text()
    assert shipped == render_config(kind, kind, ServingConfig())
    assert (SHIPPED_REPO / kind / "1" / "model.py").is_file()


def test_rendered_config_has_batching_instances_and_parameters():
    text = render_config("chat", "generate", ServingConfig(max_batch_size=8, instances=2,
                                                           parameters={"EXECUTION_ENV_PATH": "/env"}),
                         {"context_length": "2048"})
    assert 'name: "chat"' in text and "max_batch_size: 8" in text
    assert "count: 2" in text and "decoupled: true" in text
    assert 'key: "EXECUTION_ENV_PATH" value: { string_value: "/env" }' in text
    assert 'key: "context_length"' in text


def test_gate_metrics():
    import numpy as np

    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    cos = gate.cosine_metrics(ref, np.array([[1.0, 0.0], [1.0, 1.0]]))
    assert cos["mean_cosine"] == pytest.approx((1 + 2 ** -0.5) / 2)
    assert cos["min_cosine"] == pytest.approx(2 ** -0.5)
    agree = gate.next_token_agreement([np.array([1, 2, 3, 4])], [np.array([1, 2, 0, 4])])
    assert agree["next_token_agreement"] == 0.75
    greedy = gate.greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert greedy["greedy_agreement"] == pytest.approx((0.5 + 1.0) / 2)
    assert greedy["greedy_exact"] == "1/2"
    failures = gate.Thresholds().check({"mean_cosine": 0.95, "next_token_agreement": 0.99})
    assert failures == ["mean_cosine 0.9500 < 0.99"]


def test_confident_agreement_ignores_the_positions_where_the_reference_hesitates():
    """A flip where the reference's top-1 has p 0.3 does not count; one at p 0.9 does."""
    import numpy as np

    reference, candidate = [np.array([1, 2, 3, 4])], [np.array([1, 9, 0, 4])]
    top1 = [np.array([0.9, 0.3, 0.9, 0.6])]
    agree = gate.confident_next_token_agreement(reference, candidate, top1, confident=0.5)
    assert agree == {"confident_next_token_agreement": 2 / 3, "confident_positions": 3}
    assert gate.Thresholds().check(agree) == ["confident_next_token_agreement 0.6667 < 0.98"]
    nowhere = gate.confident_next_token_agreement(reference, candidate, [np.zeros(4)], 0.5)
    assert gate.Thresholds().check(nowhere) == ["confident_positions 0: the reference is confident nowhere in "
                                                "the evaluation texts"]


def test_manifest_lists_every_file(tmp_path):
    repo, version, _ = _published(tmp_path)
    manifest = json.loads((repo / "m" / "1" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.pbtxt", "model.onnx", "sub/tokenizer.json"]

"""Built artifacts served by the real tritonserver answer like the PyTorch models they came from;
published versions are immutable and tamper-evident; the gate refuses lossy artifacts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.models import torch_greedy
from fixtures.predictor import scraped
from llmserve.artifacts import client, gate
from llmserve.artifacts.build import BuildRequest, build
from llmserve.artifacts.manifest import list_files, pull, verify_version
from llmserve.testbed.waiting import poll

pytestmark = pytest.mark.triton

PROMPTS = ["Beautiful is", "Now is better", "Errors should", "Simple", "If the implementation is"]


def _pulled(built, tmp_path) -> Path:
    """Install the version the way the pod's init container does, and serve from there."""
    dest = tmp_path / "pulled"
    pull(built.repo, built.name, built.version, dest)
    return dest


def test_generate_matches_pytorch_through_triton(tiny_lm_artifact, triton_server, tmp_path):
    server = triton_server(_pulled(tiny_lm_artifact, tmp_path), {"tiny-lm": 1})
    expected = torch_greedy(tiny_lm_artifact.source, PROMPTS, 24)
    # Sent together: the dynamic batcher hands them to one execute(), prefilled left-padded.
    answers = client.generate(server.grpc_url, "tiny-lm",
                              [{"prompt": p, "max_tokens": 24} for p in PROMPTS])
    assert [a.error for a in answers] == [None] * len(PROMPTS)
    assert [a.text for a in answers] == expected
    assert all(a.finish_reason == "length" and a.completion_tokens == 24 for a in answers)


def test_requests_joining_a_running_batch_get_the_same_tokens(tiny_lm_artifact):
    """Continuous batching: a sequence admitted mid-generation (its cache left-padded to the
    running batch's, or the other way round) decodes exactly as it would alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shipped_generate", tiny_lm_artifact.path / "model.py")
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    lm = shipped.CausalLM(tiny_lm_artifact.path)

    def seqs():
        return [shipped.Sequence(prompt_ids=lm.encode(p), max_tokens=n)
                for p, n in (("Beautiful is", 30), ("If the implementation is hard to explain,", 12),
                             ("Now", 20))]

    alone = []
    for seq in seqs():
        lm.generate([seq])
        alone.append(seq.output_ids)
    joined = seqs()
    batch = shipped.Batch(lm)
    batch.admit(joined[:1], lambda seq: None)
    for _ in range(5):
        batch.step(lambda seq: None)
    batch.admit(joined[1:], lambda seq: None)  # a longer prompt joins a shorter running row
    while batch.seqs:
        batch.step(lambda seq: None)
    assert [s.output_ids for s in joined] == alone


def test_the_kv_budget_admits_what_fits_and_refuses_what_never_can(tiny_lm_artifact):
    """The ONNX engine's dense cache has a memory budget: rows join the batch only while every
    row, padded to the longest, fits until it finishes; a request that alone exceeds it is refused
    with the budget named (instead of growing the process until the kernel kills it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shipped_generate_budget", tiny_lm_artifact.path / "model.py")
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    per_position = shipped.CausalLM(tiny_lm_artifact.path).kv_bytes(1)
    lm = shipped.CausalLM(tiny_lm_artifact.path, kv_cache_bytes=per_position * 100)
    short = shipped.Sequence(prompt_ids=lm.encode("Now"), max_tokens=20)
    lm.check(short)
    batch = shipped.Batch(lm)
    width = len(short.prompt_ids) + short.max_tokens
    assert batch.fits([short] * (100 // width)) and not batch.fits([short] * (100 // width + 1))
    batch.admit([short], lambda seq: None)
    longer = shipped.Sequence(prompt_ids=lm.encode("Beautiful is better than ugly."), max_tokens=60)
    lm.check(longer)
    assert not batch.fits([longer])  # two rows padded to the longer one's 60+ positions
    with pytest.raises(ValueError, match="budget \\(kv_cache_memory_bytes\\)"):
        lm.check(shipped.Sequence(prompt_ids=lm.encode("x" * 50), max_tokens=80))


def test_generate_sampling_stop_streaming_and_errors(tiny_lm_artifact, triton_server, tmp_path):
    server = triton_server(_pulled(tiny_lm_artifact, tmp_path), {"tiny-lm": 1})
    url = server.grpc_url
    seeded = {"prompt": "Flat is", "max_tokens": 30, "temperature": 1.0, "top_p": 0.9, "seed": 42}
    first, second, other = client.generate(url, "tiny-lm", [seeded, seeded, {**seeded, "seed": 7}])
    assert first.text == second.text  # same seed, same text, even batched together
    assert first.completion_tokens == 30

    streamed, whole = client.generate(url, "tiny-lm", [
        {"prompt": "Beautiful is", "max_tokens": 40, "stream": True},
        {"prompt": "Beautiful is", "max_tokens": 40},
    ])
    assert len(streamed.chunks) > 3 and streamed.text == whole.text

    stopped, = client.generate(url, "tiny-lm", [{"prompt": "Beautiful is", "max_tokens": 40,
                                                  "stop": ["than"], "stream": True}])
    assert stopped.finish_reason == "stop"
    assert stopped.text == whole.text[:whole.text.index("than")]

    chat, = client.generate(url, "tiny-lm", [{"messages": [{"role": "user", "content": "Hi"}],
                                               "max_tokens": 5}])
    assert chat.error is None and chat.completion_tokens == 5
    assert chat.prompt_tokens == len("<|user|>Hi\n<|assistant|>")  # byte-level tokenizer

    bad, = client.generate(url, "tiny-lm", [{"max_tokens": 5}])
    assert "exactly one of text_input and messages" in bad.error
    too_long, = client.generate(url, "tiny-lm", [{"prompt": "x" * 600}])
    assert "context window" in too_long.error
    # The engine's own metrics, which the canary analysis and the HPA read (their end-to-end tests
    # run on vLLM): both refusals failed, the 7 generations each timed to their first token.
    expected = {"llmserve:request_failure_total": 2, "vllm:time_to_first_token_seconds_count": 7,
                "vllm:num_requests_waiting": 0}
    poll("the engine's metrics to count every request", lambda: {
        name: scraped(server.metrics_url, name) for name in expected} == expected, 30)


def test_embeddings_match_pytorch_through_triton(minilm_artifact, triton_server, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from llmserve.artifacts.build import EncoderForEmbedding

    server = triton_server(_pulled(minilm_artifact, tmp_path), {"minilm": 1})
    texts = gate.EMBEDDING_TEXTS
    embeddings, counts = client.embed(server.http_address, "minilm", texts)

    tokenizer = AutoTokenizer.from_pretrained(minilm_artifact.source)
    model = EncoderForEmbedding(AutoModel.from_pretrained(minilm_artifact.source), "mean", True)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        reference = model.eval()(**enc).numpy()
    metrics = gate.cosine_metrics(reference, embeddings)
    assert metrics["mean_cosine"] >= 0.99
    assert embeddings.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
    assert counts.tolist() == enc["attention_mask"].sum(1).tolist()


def test_an_engine_failure_under_load_is_answered_and_triton_still_stops_at_once(minilm_artifact, triton_server,
                                                                                 tmp_path):
    """The embedding model's engine fails every batch (its ONNX graph lacks the output it runs).
    Each request gets the error, and tritonserver still unloads the model at once on SIGTERM:
    when execute() raised instead (200 requests, 8 at a time), Triton 2.51 kept the model
    referenced and exited with 1 when its 30-s exit timeout expired, in 2 runs of 2."""
    import concurrent.futures

    import onnx
    import tritonclient.http as httpclient
    from onnx import TensorProto, helper

    repo = _pulled(minilm_artifact, tmp_path)
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["not_an_embedding"])], "broken",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "l"])],
                              [helper.make_tensor_value_info("not_an_embedding", TensorProto.INT64, ["n", "l"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              repo / "minilm" / "1" / "model.onnx")
    server = triton_server(repo, {"minilm": 1})

    def embed(i):
        with httpclient.InferenceServerClient(url=server.http_address, network_timeout=60) as http:
            text = httpclient.InferInput("text", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[f"text {i}".encode()]], dtype=object))
            with pytest.raises(Exception) as failed:
                http.infer("minilm", [text], model_version="1")
            return str(failed.value)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        errors = set(pool.map(embed, range(200)))
    status = server.terminate(timeout=60)
    log = server.log_tail(40)
    assert status == 0, f"tritonserver exited with {status} after SIGTERM:\n{log}"
    assert "successfully unloaded 'minilm'" in log
    assert len(errors) == 1 and "embedding failed: InvalidArgument" in errors.pop()


def test_next_version_leaves_the_previous_one_byte_identical(tiny_lm_artifact, artifact_copy):
    built = artifact_copy(tiny_lm_artifact)
    v1 = built.path
    before = {rel: (v1 / rel).read_bytes() for rel in list_files(v1)}
    result = build(BuildRequest(source=built.source, repo=built.repo, model=built.name,
                                kind="generate", variant="fp16"))
    assert result.version == 2
    assert {rel: (v1 / rel).read_bytes() for rel in list_files(v1)} == before
    verify_version(v1)
    verify_version(result.path, result.manifest_sha256)
    assert (built.repo / built.name / "config.pbtxt").read_bytes() == \
        (result.path / "config.pbtxt").read_bytes()

    with pytest.raises(Exception, match="already exists"):
        build(BuildRequest(source=built.source, repo=built.repo, model=built.name, version=1))


@pytest.mark.parametrize("artifact, weights", [("tiny_lm_artifact", "model.onnx"),
                                               ("tiny_vllm_artifact", "model.safetensors")])
def test_a_flipped_byte_is_refused_by_verify_and_pull(artifact, weights, request, artifact_copy, tmp_path):
    built = artifact_copy(request.getfixturevalue(artifact))
    weights_file = built.path / weights
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights_file.write_bytes(bytes(data))
    llmserve = str(Path(sys.executable).parent / "llmserve")
    verify = subprocess.run([llmserve, "verify", built.repo, built.name, "1"],
                            capture_output=True, text=True)
    assert verify.returncode == 1
    assert f"sha256 of {weights} does not match the manifest" in verify.stderr
    dest = tmp_path / "dest"
    pulled = subprocess.run([llmserve, "pull", "--source", built.repo, "--model", built.name,
                             "--version", "1", "--dest", dest], capture_output=True, text=True)
    assert pulled.returncode == 1 and weights in pulled.stderr
    assert not (dest / built.name).exists()


def test_build_errors_are_clear(tmp_path, tiny_lm_source, minilm_source):
    llmserve = str(Path(sys.executable).parent / "llmserve")

    def run(*args):
        return subprocess.run([llmserve, "build", *map(str, args)], capture_output=True, text=True)

    missing = run(tmp_path / "nope", "--repo", tmp_path / "repo")
    assert missing.returncode == 1 and "no such model directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run(tmp_path / "empty", "--repo", tmp_path / "repo")
    assert "not a Hugging Face model directory" in empty.stderr
    not_causal = run(minilm_source, "--repo", tmp_path / "repo", "--kind", "generate")
    assert not_causal.returncode == 1 and "is not a causal LM" in not_causal.stderr
    # An unreachable threshold: the gate refuses and nothing is published.
    refused = run(shutil.copytree(tiny_lm_source, tmp_path / "lm"), "--repo", tmp_path / "repo",
                  "--min-agreement", "1.01")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "accuracy gate failed" in refused.stderr and "nothing was published" in refused.stderr
    assert not list((tmp_path / "repo").glob("*/[0-9]*"))
    assert not list((tmp_path / "repo").glob("*/.staging-*"))


@pytest.mark.slow
def test_smollm2_fp32_serves_like_pytorch(smollm2_artifact, triton_server, tmp_path):
    """The real model's numerics end to end. (Its dynamic int8 build is refused by the gate, next-token
    agreement 0.68: a measurement of docs/artifacts.md, not repeated here at a minute and a half per
    run; the refusal path itself is test_build_errors_are_clear's.)"""
    server = triton_server(_pulled(smollm2_artifact, tmp_path), {"smollm2": 1})
    prompts = ["The capital of France is", "def add(a, b):"]
    # One at a time: batched prompts would be compared through padding, which the tiny LM test
    # already covers; here the point is the real model's numerics end to end.
    answers = [client.generate(server.grpc_url, "smollm2", [{"prompt": p, "max_tokens": 16}])[0]
               for p in prompts]
    assert [a.text for a in answers] == torch_greedy(smollm2_artifact.source, prompts, 16)

"""The vLLM side of `llmserve build --engine vllm`'s accuracy gate, run as a script in the vLLM
engine environment (which has vLLM but not llmserve):

    <engine python> vllm_gate.py REQUEST.json RESULT.json

It loads the staged version with the staged model.py's own `engine_settings` (engine.json merged
with the gate's overrides) and asks vLLM, for given token ids, (1) the most likely next token at
every prompt position (teacher-forced, from vLLM's prompt logprobs) and (2) the greedy
continuation, sampled with the parameters model.py builds for a greedy request. The builder
compares both with the PyTorch model. Results go to a file: vLLM logs to stdout.
"""

import importlib.util
import json
import sys
from pathlib import Path


def _load_model_code(version_dir: Path):
    spec = importlib.util.spec_from_file_location("llmserve_vllm_model", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    version_dir = Path(request["version_dir"])
    model_code = _load_model_code(version_dir)
    model_code.use_utf8_locale()

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    overrides = dict(request.get("engine_args", {}))
    if current_platform.is_cpu():
        overrides = {**request.get("cpu_engine_args", {}), **overrides}
    settings = model_code.engine_settings(version_dir, json.dumps(overrides))
    llm = LLM(**settings)

    teacher = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["teacher_forced"]], teacher,
                           use_tqdm=False)
    next_tokens = []
    for output in outputs:
        # Position i's entry is the distribution of token i given the tokens before it; rank 1 is
        # the most likely one (the prompt's own token is listed too when it is not).
        predicted = [next(t for t, lp in entry.items() if lp.rank == 1)
                     for entry in output.prompt_logprobs[1:]]
        next_tokens.append(predicted + [output.outputs[0].token_ids[0]])

    greedy = SamplingParams(**model_code.sampling_settings(max_tokens=request["max_new_tokens"],
                                                           temperature=0.0))
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["greedy"]], greedy, use_tqdm=False)
    continuations = [list(output.outputs[0].token_ids) for output in outputs]
    Path(result_path).write_text(json.dumps({"next_tokens": next_tokens, "greedy": continuations,
                                             "engine_args": settings}))


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Greedy generation through vLLM's engine with given engine arguments; prints the token ids.

Run by the engine environment's interpreter (it imports only vLLM and the standard library): the
distributed data-plane test starts it as the leader of a multi-node group (node rank 0, with the
engine arguments the operator renders for the leader pod) and as a single-process reference.

    python vllm_generate.py '<engine args JSON>' '<prompts JSON>' <max_tokens>
"""

import json
import sys


def main() -> None:
    engine_args, prompts, max_tokens = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_args)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()

"""llama.cpp side of benchmarks/engine.py; runs inside benchmarks/.venv-llamacpp (made by
benchmarks/setup_llamacpp.sh), never imported by the library or the tests.

It loads one GGUF file once and answers JSON requests on stdin, one per line:
    {"ids": [[...]], "new_tokens": 128, "threads": 1}
with one JSON line: {"prefill_s": ..., "decode_s": ..., "tokens": [[...]]}. Decoding is greedy
(argmax of the last logits, EOS not special), one sequence at a time: the Python bindings'
generation runs one sequence, so a batch is timed as its rows one after another.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama, llama_get_logits, llama_set_n_threads


def main() -> None:
    path, n_ctx = sys.argv[1], int(sys.argv[2])
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=1, verbose=False, logits_all=False)
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the logits of the last evaluated token
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits(llm.ctx), shape=(n_vocab,))))

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t = int(req["threads"])
        llama_set_n_threads(llm.ctx, t, t)
        prefill = decode = 0.0
        outs = []
        for ids in req["ids"]:
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            nxt = greedy()
            mid = time.perf_counter()
            out = [nxt]
            for _ in range(int(req["new_tokens"]) - 1):
                llm.eval([nxt])
                nxt = greedy()
                out.append(nxt)
            end = time.perf_counter()
            prefill += mid - start
            decode += end - mid
            outs.append(out)
        print(json.dumps({"prefill_s": prefill, "decode_s": decode, "tokens": outs}), flush=True)


if __name__ == "__main__":
    main()

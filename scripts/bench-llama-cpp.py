"""llama.cpp's side of tests/benches/engine.rs: greedy-decodes the same prompt token ids with
llama-cpp-python on the same GGUF and cores, prompt processing included, and prints one JSON
line {"tokens", "seconds", "tok_per_s", "peak_rss_mib"}.

Usage: python scripts/bench-llama-cpp.py MODEL.gguf THREADS MAX_NEW < prompts.json
(prompts.json: a JSON list of token-id lists; the bench writes it)."""
import json
import sys
import time

import numpy as np
import llama_cpp

model, threads, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompts = json.load(sys.stdin)
llm = llama_cpp.Llama(model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
stop = {0, 2, 4}
tokens = 0
start = time.perf_counter()
for ids in prompts:
    llm.reset()
    llm.eval(ids)
    for _ in range(max_new):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        nxt = int(np.argmax(logits))
        tokens += 1
        if nxt in stop:
            break
        llm.eval([nxt])
elapsed = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (the benchmark).
rss = 0.0
with open("/proc/self/status") as status:
    for line in status:
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
print(json.dumps({"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed, "peak_rss_mib": rss}))

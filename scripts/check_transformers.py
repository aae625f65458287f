"""Loads a trainer output folder with Hugging Face transformers and compares it with what our
server did on the same folder: the chat template's token ids must equal the server's prompt
ids, and transformers' greedy answer (f32, eager attention) must equal the server's answer
token for token. Prints one JSON line; exits 1 on any difference."""
import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--model", required=True, help="the trainer's --out folder")
ap.add_argument("--generations", required=True, help="JSON list of the server's generations (prompt, prompt_token_ids, completion_token_ids)")
args = ap.parse_args()

torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
model.eval()
eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) else [model.generation_config.eos_token_id])

gens = json.load(open(args.generations))
report = {"model_type": model.config.model_type, "layers": model.config.num_hidden_layers, "prompts": len(gens),
          "prompt_ids_equal": 0, "answers_equal": 0, "answer_tokens": 0, "forced_argmax_equal": 0, "mismatches": []}
for g in gens:
    ids = tok.apply_chat_template(g["request"], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    ours_prompt = g["prompt_token_ids"]
    ours_answer = [t for t in g["completion_token_ids"] if t not in eos]
    if list(ids) == ours_prompt:
        report["prompt_ids_equal"] += 1
    else:
        report["mismatches"].append({"id": g["id"], "what": "prompt ids", "transformers": list(ids)[:40], "server": ours_prompt[:40]})
    inp = torch.tensor([ours_prompt])
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=len(g["completion_token_ids"]), do_sample=False,
                             temperature=None, top_p=None, top_k=None)
        theirs = [t for t in out[0, len(ours_prompt):].tolist() if t not in eos]
        # Teacher forcing on our answer: transformers' argmax at every answer position.
        full = torch.tensor([ours_prompt + g["completion_token_ids"]])
        logits = model(full).logits[0]
        n = len(g["completion_token_ids"])
        pred = logits[len(ours_prompt) - 1: len(ours_prompt) - 1 + n].argmax(-1).tolist()
    report["answer_tokens"] += n
    report["forced_argmax_equal"] += sum(int(a == b) for a, b in zip(pred, g["completion_token_ids"]))
    if theirs[:len(ours_answer)] == ours_answer:
        report["answers_equal"] += 1
    else:
        first = next(i for i, (a, b) in enumerate(zip(theirs + [-1] * len(ours_answer), ours_answer)) if a != b)
        report["mismatches"].append({"id": g["id"], "what": "answer", "first_difference_at": first,
                                     "transformers": theirs[max(0, first - 3):first + 5], "server": ours_answer[max(0, first - 3):first + 5]})
print(json.dumps(report))
ok = report["prompt_ids_equal"] == len(gens) and report["answers_equal"] == len(gens)
sys.exit(0 if ok else 1)

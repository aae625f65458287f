"""PyTorch eager reference for `cargo bench -p trainer --bench train`: the same training step as
trainer/src/train.rs, in plain torch on the CPU, f32, on the same HF folder and batch.

Model: the Llama forward of trainer/src/model.rs op for op (RMSNorm, RoPE with HF rotate_half
from explicit positions, grouped-query attention with an additive block-diagonal causal bias
from segment ids, softmax, SwiGLU, final RMSNorm, tied or separate head). Step: masked
next-token cross-entropy averaged over the answer tokens, backward, clip_grad_norm_(1.0),
torch.optim.AdamW (weight decay on matrices only, as trainer/src/optim.rs).

Usage:
  python bench/train_torch.py --model DIR --batch BATCH.json [--steps 6] [--warmup 1]
      [--lr 1e-4] [--threads 2] [--attn math|sdpa]

DIR: config.json + model.safetensors (trainer's write_folder). BATCH: JSON object with [B, T]
int lists "input", "target", "positions", "segments" and float "mask", or a .npz with the same
keys. --attn sdpa uses F.scaled_dot_product_attention with the same bias (the same math, the
fused CPU kernel); the default, math, is the op-for-op twin of the candle model.

Prints one JSON line: tokens_per_s (non-padding input tokens, i.e. segment id > 0, per second;
median over the steps after the warmup ones), step_s, forward_s / backward_s / optimizer_s
(medians; optimizer_s includes clipping), user_cpu_s / sys_cpu_s / minor_faults (per step,
medians), peak_rss_mib (VmHWM of the steps, before any
--components; ru_maxrss would carry the parent's peak over exec), rss_after_import_mib,
cuda_libs_rss_mib (resident CUDA libraries that PyPI's CUDA build maps at import),
rss_after_load_mib, rss_after_forward_mib / rss_after_backward_mib (step 1), heap_*_mib (the
same points, in malloc'd MiB: glibc mallinfo2, which falls when memory is freed), losses (every
step's loss, before its update), components (with --components: forward/backward seconds of
each part of the model timed alone, as trainer/benches/train.rs does on the candle side).
"""
import argparse
import ctypes
import ctypes.util
import json
import math
import resource
import statistics
import sys
import time


def vm_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def mib(key):
    return vm_kib(key) / 1024.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.mallinfo2.restype = _MallInfo2


def heap_mib():
    """MiB malloc'd and not freed (glibc mallinfo2: heap + mmapped chunks); torch's CPU
    allocator is malloc, and trainer/benches/train.rs reads the same counter."""
    m = _libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / (1024.0 * 1024.0)


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--model", required=True)
ap.add_argument("--batch", required=True)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--weight-decay", type=float, default=0.01)
ap.add_argument("--max-grad-norm", type=float, default=1.0)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--attn", choices=["math", "sdpa"], default="math")
ap.add_argument("--components", action="store_true", help="after the steps, time the model's parts one by one")
ap.add_argument("--component-reps", type=int, default=3)
args = ap.parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.set_num_threads(args.threads)
rss_after_import = mib("VmRSS")
heap_after_import = heap_mib()

with open(f"{args.model}/config.json") as f:
    cfg = json.load(f)
H = cfg["hidden_size"]
NH = cfg["num_attention_heads"]
NKV = cfg.get("num_key_value_heads") or NH
D = cfg.get("head_dim") or H // NH
EPS = cfg.get("rms_norm_eps", 1e-5)
THETA = cfg.get("rope_theta", 10000.0)
TIED = cfg.get("tie_word_embeddings", False)
V = cfg["vocab_size"]

weights = load_file(f"{args.model}/model.safetensors")
# Copied out of the file mapping safetensors returns, so that the weights are malloc'd memory
# as on the candle side (the heap_* figures then compare like with like).
params = {n: torch.nn.Parameter(t.float().clone()) for n, t in sorted(weights.items())}
del weights
if TIED:
    params.pop("lm_head.weight", None)
layers = [
    {k[len(f"model.layers.{i}.") :]: p for k, p in params.items() if k.startswith(f"model.layers.{i}.")}
    for i in range(cfg["num_hidden_layers"])
]
embed = params["model.embed_tokens.weight"]
final_norm = params["model.norm.weight"]
head = embed if TIED else params["lm_head.weight"]

if args.batch.endswith(".npz"):
    z = np.load(args.batch)
    batch = {k: z[k] for k in ["input", "target", "mask", "positions", "segments"]}
else:
    with open(args.batch) as f:
        batch = json.load(f)
inp = torch.tensor(np.asarray(batch["input"], dtype=np.int64))
tgt = torch.tensor(np.asarray(batch["target"], dtype=np.int64))
mask = torch.tensor(np.asarray(batch["mask"], dtype=np.float32))
pos = torch.tensor(np.asarray(batch["positions"], dtype=np.int64))
seg = torch.tensor(np.asarray(batch["segments"], dtype=np.int64))
B, T = inp.shape
real_tokens = int((seg > 0).sum())
loss_tokens = float(mask.sum())
rss_after_load = mib("VmRSS")
heap_after_load = heap_mib()


def rms_norm(x, w):
    inv = (x.pow(2).mean(-1, keepdim=True) + EPS).sqrt().reciprocal()
    return (x * inv) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope_tables():
    # As model.rs: inv_freq in f64, cast to f32; angles pos·inv_freq in f32, both halves.
    inv = torch.tensor([1.0 / THETA ** (2 * j / D) for j in range(D // 2)], dtype=torch.float64).float()
    freqs = pos.float().unsqueeze(2) * inv.view(1, 1, -1)  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=2)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # [B, 1, T, D]


def attention_bias():
    same = seg.unsqueeze(2) == seg.unsqueeze(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = same & causal
    zero = torch.zeros(B, T, T)
    return torch.where(allowed, zero, torch.full_like(zero, float("-inf"))).unsqueeze(1)  # [B, 1, T, T]


def repeat_kv(x, rep):
    if rep == 1:
        return x
    b, kv, t, d = x.shape
    return x.unsqueeze(2).expand(b, kv, rep, t, d).reshape(b, kv * rep, t, d)


def attention(l, x, cos, sin, bias):
    def heads(y, n):
        return y.view(B, T, n, D).transpose(1, 2)

    q = heads(x @ l["self_attn.q_proj.weight"].t(), NH)
    k = heads(x @ l["self_attn.k_proj.weight"].t(), NKV)
    v = heads(x @ l["self_attn.v_proj.weight"].t(), NKV)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = repeat_kv(k, NH // NKV), repeat_kv(v, NH // NKV)
    if args.attn == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        probs = torch.softmax(scores + bias, dim=-1)
        out = probs @ v  # [B, NH, T, D]
    out = out.transpose(1, 2).reshape(B * T, NH * D)
    return out @ l["self_attn.o_proj.weight"].t()


def mlp(l, x):
    g = F.silu(x @ l["mlp.gate_proj.weight"].t())
    u = x @ l["mlp.up_proj.weight"].t()
    return (g * u) @ l["mlp.down_proj.weight"].t()


def forward():
    x = embed[inp.reshape(-1)]  # [B·T, H]
    cos, sin = rope_tables()
    bias = attention_bias()
    for l in layers:
        x = x + attention(l, rms_norm(x, l["input_layernorm.weight"]), cos, sin, bias)
        x = x + mlp(l, rms_norm(x, l["post_attention_layernorm.weight"]))
    x = rms_norm(x, final_norm)
    return (x @ head.t()).view(B, T, V)


def masked_ce_mean(logits):
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(2, tgt.unsqueeze(2)).squeeze(2)
    return -(picked * mask).sum() / max(loss_tokens, 1.0)


plist = list(params.values())
decay = [p for p in plist if p.dim() >= 2]
no_decay = [p for p in plist if p.dim() < 2]
opt = torch.optim.AdamW(
    [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=args.lr,
    betas=(0.9, 0.999),
    eps=1e-8,
)

losses, step_s, fwd_s, bwd_s, opt_s = [], [], [], [], []
user_s, sys_s, faults = [], [], []
rss_after_forward = rss_after_backward = heap_after_forward = heap_after_backward = heap_after_step = 0.0
for step in range(args.steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loss = masked_ce_mean(forward())
    t1 = time.perf_counter()
    if step == 0:
        rss_after_forward = mib("VmRSS")
        heap_after_forward = heap_mib()
    loss.backward()
    t2 = time.perf_counter()
    if step == 0:
        rss_after_backward = mib("VmRSS")
        heap_after_backward = heap_mib()
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(plist, args.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    user_s.append(r1.ru_utime - r0.ru_utime)
    sys_s.append(r1.ru_stime - r0.ru_stime)
    faults.append(r1.ru_minflt - r0.ru_minflt)
    if step == 0:
        heap_after_step = heap_mib()
    losses.append(loss.item())
    step_s.append(t3 - t0)
    fwd_s.append(t1 - t0)
    bwd_s.append(t2 - t1)
    opt_s.append(t3 - t2)
    print(f"torch step {step + 1}: loss {losses[-1]:.6f}, {t3 - t0:.2f} s", file=sys.stderr)

peak_rss = mib("VmHWM")


def cuda_libs_rss():
    """Resident MiB of the CUDA libraries PyPI's (CUDA) build maps at import; a CPU build has none."""
    total, cur = 0, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                cur = parts[5] if len(parts) > 5 else ""
            elif parts and parts[0] == "Rss:" and ("/nvidia/" in cur or "libtorch_cuda" in cur or "libc10_cuda" in cur or "/cuda" in cur):
                total += int(parts[1])
    return total / 1024.0


def time_part(inputs, fn, reps):
    """Times fn(*leaves) forward, the leaves being fresh copies of `inputs` (made untimed), then
    the backward of its output's sum; returns the medians (forward s, backward s, MiB the
    forward graph holds: malloc'd memory growth over the forward, its output included)."""
    fw, bw, held = [], [], []
    for _ in range(reps):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        heap0 = heap_mib()
        t0 = time.perf_counter()
        out = fn(*leaves)
        fw.append(time.perf_counter() - t0)
        held.append(heap_mib() - heap0)
        s = out.sum()
        t1 = time.perf_counter()
        s.backward()
        bw.append(time.perf_counter() - t1)
        del leaves, out, s
    return statistics.median(fw), statistics.median(bw), statistics.median(held)


def components(reps):
    """The parts timed by trainer/benches/train.rs (same names, inputs and ops)."""
    nl = len(layers)
    l0 = {k: p.detach() for k, p in layers[0].items()}
    rep = NH // NKV

    def heads(y, n):
        return y.view(B, T, n, D).transpose(1, 2)

    with torch.no_grad():
        e = embed.detach()
        flat = inp.reshape(-1)
        x = e[flat]
        xn = rms_norm(x, l0["input_layernorm.weight"])
        cos, sin = rope_tables()
        bias = attention_bias()
        wq, wk, wv, wo = (l0[f"self_attn.{n}.weight"] for n in ["q_proj", "k_proj", "v_proj", "o_proj"])
        wg, wu, wd = (l0[f"mlp.{n}.weight"] for n in ["gate_proj", "up_proj", "down_proj"])
        q_lin, k_lin, v_lin = xn @ wq.t(), xn @ wk.t(), xn @ wv.t()
        qh, kh = heads(q_lin, NH), heads(k_lin, NKV)
        q = (qh * cos + rotate_half(qh) * sin).contiguous()
        k = (kh * cos + rotate_half(kh) * sin).contiguous()
        v = heads(v_lin, NKV).contiguous()
        scores = (q @ repeat_kv(k, rep).transpose(-1, -2)) / math.sqrt(D)
        probs = torch.softmax(scores + bias, dim=-1)
        attn_out = (probs @ repeat_kv(v, rep)).transpose(1, 2).reshape(B * T, NH * D)
        gate_in, up_in = xn @ wg.t(), xn @ wu.t()
        hidden_final = rms_norm(x, final_norm.detach())
        logits = (hidden_final @ e.t()).view(B, T, V)

    def qkvo(x, wq, wk, wv, wo):
        return ((x @ wq.t()) @ wo.t()).sum() + (x @ wk.t()).sum() + (x @ wv.t()).sum()

    def heads_rope(ql, kl, vl):
        qq, kk = heads(ql, NH), heads(kl, NKV)
        qq = qq * cos + rotate_half(qq) * sin
        kk = kk * cos + rotate_half(kk) * sin
        return qq.sum() + kk.sum() + heads(vl, NKV).sum()

    parts = [
        ("rms_norm (x2 per layer, +1 final)", 2 * nl + 1, [x, l0["input_layernorm.weight"]], rms_norm),
        ("q/k/v/o projections", nl, [xn, wq, wk, wv, wo], qkvo),
        ("head split + RoPE (q, k) + v split", nl, [q_lin, k_lin, v_lin], heads_rope),
        ("repeat_kv + QK^T / sqrt(d)", nl, [q, k], lambda q, k: (q @ repeat_kv(k, rep).transpose(-1, -2)) / math.sqrt(D)),
        ("mask add + softmax [B,H,T,T]", nl, [scores], lambda s: torch.softmax(s + bias, dim=-1)),
        ("repeat_kv + PV + head merge", nl, [probs, v], lambda p, v: (p @ repeat_kv(v, rep)).transpose(1, 2).reshape(B * T, NH * D)),
        ("MLP projections (gate, up, down)", nl, [xn, wg, wu, wd], lambda x, g, u, d: (x @ g.t() + x @ u.t()) @ d.t()),
        ("SwiGLU silu(g)*u", nl, [gate_in, up_in], lambda g, u: F.silu(g) * u),
        ("residual adds (x2 per layer)", 2 * nl, [x, attn_out], lambda a, b: a + b),
        ("embedding gather", 1, [e], lambda e: e[flat]),
        ("lm_head matmul [B*T,H]x[H,V]", 1, [hidden_final, e], lambda h, e: h @ e.t()),
        ("masked CE (log_softmax over V)", 1, [logits], masked_ce_mean),
    ]
    if args.attn == "sdpa":
        parts.append(
            (
                "SDPA fused (QK^T, mask, softmax, PV)",
                nl,
                [q, k, v],
                lambda q, k, v: F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=bias),
            )
        )
    out = []
    for name, count, inputs, fn in parts:
        f_s, b_s, h = time_part(inputs, fn, reps)
        out.append({"part": name, "count": count, "forward_s": f_s, "backward_s": b_s, "held_mib": h})
    return out


parts = []
if args.components:
    print(f"torch: timing the model's parts ({args.component_reps} runs each)", file=sys.stderr)
    parts = components(args.component_reps)

timed = slice(min(args.warmup, args.steps - 1), None)
med = lambda v: statistics.median(v[timed])  # noqa: E731
print(
    json.dumps(
        {
            "impl": f"torch {torch.__version__} eager ({args.attn})",
            "threads": torch.get_num_threads(),
            "batch": [B, T],
            "tokens": real_tokens,
            "loss_tokens": loss_tokens,
            "tokens_per_s": real_tokens / med(step_s),
            "step_s": med(step_s),
            "forward_s": med(fwd_s),
            "backward_s": med(bwd_s),
            "optimizer_s": med(opt_s),
            "user_cpu_s": med(user_s),
            "sys_cpu_s": med(sys_s),
            "minor_faults": med(faults),
            "peak_rss_mib": peak_rss,
            "rss_after_import_mib": rss_after_import,
            "cuda_libs_rss_mib": cuda_libs_rss(),
            "rss_after_load_mib": rss_after_load,
            "rss_after_forward_mib": rss_after_forward,
            "rss_after_backward_mib": rss_after_backward,
            "heap_start_mib": heap_after_import,
            "heap_after_load_mib": heap_after_load,
            "heap_after_forward_mib": heap_after_forward,
            "heap_after_backward_mib": heap_after_backward,
            "heap_after_step_mib": heap_after_step,
            "losses": losses,
            "components": parts,
        }
    )
)

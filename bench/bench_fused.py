"""Peak memory and time of forward + backward: fused (chunked) vs naive (materialised logits), on CPU.

    python bench/bench_fused.py                        # 4,096 tokens, Qwen2.5-0.5B's head: vocab 151,936, hidden 896
    python bench/bench_fused.py --tokens 1024 --chunk-size 256 --repeats 3

Each (op, variant) runs in a fresh process, so that its peak resident memory (ru_maxrss) is its own; the number
reported is the peak minus the resident memory once the inputs are allocated (and kernels warmed up on a tiny
slice). Both variants produce the same outputs: the per-token values and the fp32 gradients of the hidden states
and of the (V, H) weight; the weight gradient alone is V x H x 4 bytes (545 MB here), and is in both peaks.
    logprobs: token_logprobs(...).sum()          vs  log_softmax(h @ W.T).gather(targets).sum()
    kl:       forward_kl(clip, reduction="sum")  vs  kl_div(log_softmax(s), log_softmax(t)).clamp(max=clip).sum()
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fused import forward_kl, token_logprobs  # noqa: E402


def rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def naive_logprobs(hidden, weight, targets):
    return F.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)


def naive_kl(hidden, teacher_hidden, weight, teacher_weight, clip):
    logp = F.log_softmax(hidden @ weight.T, dim=-1)
    with torch.no_grad():
        logp_t = F.log_softmax(teacher_hidden @ teacher_weight.T, dim=-1)
    terms = F.kl_div(logp, logp_t, log_target=True, reduction="none")
    return (terms.clamp(max=clip) if clip is not None else terms).sum(-1)


def worker(op: str, variant: str, args) -> dict:
    torch.manual_seed(0)
    N, V, H = args.tokens, args.vocab, args.hidden
    # in-place construction: no freed temporaries that would already have raised the peak before the baseline
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H).mul_(H ** -0.5).requires_grad_()  # logits ~ N(0, 1)
    targets = torch.randint(0, V, (N,))
    teacher_hidden = torch.randn(N, H).mul_(0.1).add_(hidden.detach())  # the teacher: a nearby model, frozen
    teacher_weight = torch.randn(V, H).mul_(0.01 * H ** -0.5).add_(weight.detach())

    def run(h, w, wt, n):
        t = targets[:n] % w.shape[0]
        if op == "logprobs":
            out = (token_logprobs(h[:n], w, t, args.chunk_size) if variant == "fused"
                   else naive_logprobs(h[:n], w, t)).sum()
        else:  # the OPSD loss is a sum over tokens: fused uses reduction="sum" (gradient in the forward)
            out = (forward_kl(h[:n], teacher_hidden[:n], w, wt, args.clip, args.chunk_size, reduction="sum")
                   if variant == "fused" else naive_kl(h[:n], teacher_hidden[:n], w, wt, args.clip).sum())
        out.backward()

    # warm up kernels and thread pools on a tiny slice (its own small weight: no big allocation before the baseline)
    small = weight.detach()[:1024].clone().requires_grad_()
    run(hidden, small, teacher_weight[:1024], 16)
    hidden.grad = None
    base = current_rss_mb()
    assert rss_mb() < base + 64, "the peak before the run exceeds the current RSS: the baseline would hide memory"
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        run(hidden, weight, teacher_weight, N)
        times.append(time.perf_counter() - t0)
    return {"time_s": min(times), "peak_mb": rss_mb() - base, "grad_norm": float(weight.grad.norm())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--clip", type=float, default=1.0, help="forward KL clip (OPSD's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per process (the minimum is reported)")
    p.add_argument("--ops", default="logprobs,kl")
    p.add_argument("--worker", nargs=2, metavar=("OP", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    passthrough = [f"--tokens={args.tokens}", f"--vocab={args.vocab}", f"--hidden={args.hidden}",
                   f"--chunk-size={args.chunk_size}", f"--clip={args.clip}", f"--repeats={args.repeats}"]
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    print(f"forward + backward, fp32, CPU ({torch.get_num_threads()} threads): {args.tokens} tokens, vocab "
          f"{args.vocab}, hidden {args.hidden}, chunk {args.chunk_size}; one logits tensor = {logits_mb:,.0f} MB, "
          f"the weight gradient = {args.vocab * args.hidden * 4 / 2**20:,.0f} MB")
    print(f"| {'op':<8} | {'variant':<7} | {'time (s)':>8} | {'peak RSS delta (MB)':>19} | {'time / naive':>12} | "
          f"{'peak / naive':>12} |")
    print(f"|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 21}|{'-' * 14}|{'-' * 14}|")
    for op in args.ops.split(","):
        results = {}
        for variant in ("naive", "fused"):
            proc = subprocess.run([sys.executable, __file__, "--worker", op, variant, *passthrough],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                results[variant] = None
                print(f"| {op:<8} | {variant:<7} | failed (exit {proc.returncode}): "
                      f"{(proc.stderr.strip().splitlines() or ['killed, out of memory?'])[-1]}")
                continue
            results[variant] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            naive = results.get("naive")
            ratios = (f"{r['time_s'] / naive['time_s']:>12.2f} | {r['peak_mb'] / naive['peak_mb']:>12.3f}"
                      if naive else f"{'':>12} | {'':>12}")
            print(f"| {op:<8} | {variant:<7} | {r['time_s']:>8.2f} | {r['peak_mb']:>19,.0f} | {ratios} |", flush=True)
        if all(results.values()):  # same numbers, different memory
            a, b = results["naive"]["grad_norm"], results["fused"]["grad_norm"]
            assert abs(a - b) <= 1e-4 * abs(a), f"{op}: weight gradient norms differ: naive {a}, fused {b}"


if __name__ == "__main__":
    main()

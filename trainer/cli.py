"""`lastmile <stage> --config X [key.sub=value ...]`, also `python -m lastmile` and
`deepspeed trainer/main.py`. User errors print one paragraph and exit non-zero, without a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lastmile", description="Last-mile fine-tuning: SFT, evaluation (and RL stages).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("sft", "supervised fine-tuning (MLE baseline)"),
        ("evaluate", "generate and score summaries (ROUGE, la-ROUGE, semantic similarity, bootstrap)"),
        ("reward-model", "train a reward model on synthetic failure-mode negatives; per-mode evaluation"),
        ("ppo", "RL fine-tuning with PPO against the hybrid reward (reward model + reference metric)"),
        ("best-of-n", "the RL baseline: fine-tune on the best of n samples per example by PPO's hybrid reward"),
        ("pipeline", "SFT -> reward model -> PPO -> evaluation and the MLE-vs-RL report, one MLflow parent run"),
        ("predict", "summarize unlabeled documents (JSONL/CSV/Parquet) into {id, prediction} JSONL; resumable"),
        ("compare", "compare evaluated systems: SOURCE... (evaluation folders, MLflow run ids, pipeline:<id>)"),
        ("validate", "check a config and the plan of a command (--for, default pipeline); print both"),
        ("plan", "memory per rank and time per step of a command's stages, the verdict, and what would make it fit"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--config", required=False, help="YAML preset, e.g. trainer/configs/tiny.yaml")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.lr=1e-5 output_dir=runs/x"
                       + (" (and the SOURCEs to compare)" if name == "compare" else ""))
        if name in ("validate", "plan"):
            from lastmile.plan import STAGES

            s.add_argument("--for", dest="for_command", choices=list(STAGES), default="pipeline",
                           help="check the plan of this command (default pipeline: every stage)")
        if name == "plan":
            s.add_argument("--shape", help="plan for a published shape instead of model.path's: "
                           "135m, 1b, 7b, 70b (Llama architecture)")
            s.add_argument("--gpus", type=int, help="GPUs per node (default: CPU ranks, WORLD_SIZE or 1)")
            s.add_argument("--gpu-mem", type=float, help="GiB per GPU (default 80)")
            s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
            s.add_argument("--host-mem", type=float, help="GiB of host memory per node (default: this machine's for "
                           "CPU ranks, unchecked for GPU nodes)")
            s.add_argument("--tflops", type=float, help="peak TFLOP/s per rank (default: H100 bf16 989 on GPUs, "
                           "0.089 measured on 2 CPU cores)")
    return p


def _pop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts --local_rank=N before the subcommand; take it out."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank", "--local-rank")):
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_pop_local_rank(list(sys.argv[1:] if argv is None else argv)))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s] [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    from lastmile import preemption
    from lastmile.config import load_config, to_yaml
    from lastmile.errors import UserError

    sources = [x for x in args.overrides if "=" not in x] if args.command == "compare" else []
    cfg = None
    try:
        cfg = load_config(args.config, [x for x in args.overrides if x not in sources])
        if args.command == "validate":  # world size as the launcher announces it (WORLD_SIZE), else 1
            from lastmile.plan import check_run, world_size_from_env

            plan = check_run(cfg, args.for_command, world_size_from_env())
            print(to_yaml(cfg), end="")
            print(plan.describe(), file=sys.stderr)
            print(f"OK: {args.config or 'defaults'} is valid for `lastmile {args.for_command}`.", file=sys.stderr)
            return 0
        if args.command == "plan":
            from lastmile.plan import print_memory_plan

            return print_memory_plan(cfg, args)
        from lastmile import preflight

        if args.command != "predict":  # predict writes predict.output only: no output_dir, no tracking
            preflight.check(cfg, args.command)
            preflight.lock_output_dir(cfg)
        preflight.use_environment_build_tools()
        preflight.clear_stale_build_locks()
        if args.command == "sft":
            from lastmile.stages import sft

            sft.run(cfg)
        elif args.command == "evaluate":
            from lastmile.stages import evaluate

            evaluate.run(cfg)
        elif args.command == "reward-model":
            from lastmile.stages import reward_model

            reward_model.run(cfg)
        elif args.command == "ppo":
            from lastmile.stages import ppo

            ppo.run(cfg)
        elif args.command == "best-of-n":
            from lastmile.stages import best_of_n

            best_of_n.run(cfg)
        elif args.command == "predict":
            from lastmile.stages import predict

            predict.run(cfg)
        elif args.command == "compare":
            from lastmile.stages import compare

            compare.run(cfg, sources)
        elif args.command == "pipeline":
            from lastmile import pipeline

            pipeline.run(cfg)
        return 0
    except UserError as e:
        print(f"lastmile {args.command}: error: {e}{_notes(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except preemption.Preempted as e:
        print(f"lastmile {args.command}: interrupted: {e}", file=sys.stderr, flush=True)
        return preemption.EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"lastmile {args.command}: interrupted by Ctrl-C; rerun the same command to resume.", file=sys.stderr)
        return 130
    except OSError as e:  # the environment, not the code: disk full, permissions, a vanished path
        if cfg is not None and _is_tracking_failure(e):  # requests' ConnectionError is an OSError
            return _tracking_failed(args.command, cfg, e)
        return _environment_failed(args.command, cfg, e)
    except Exception as e:
        if cfg is None or not _is_tracking_failure(e):
            raise
        return _tracking_failed(args.command, cfg, e)


def _environment_failed(command: str, cfg, e: OSError) -> int:
    import errno

    where = e.filename or (cfg.output_dir if cfg is not None else "the output dir")
    why = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
           errno.EACCES: "Permission denied", errno.EROFS: "Read-only file system"}.get(e.errno, e.strerror or str(e))
    print(f"lastmile {command}: error: {why} while writing {where}. Checkpoints are written atomically, so "
          "the last complete one is intact. Free space or fix the permissions (or move output_dir), then rerun the "
          f"same command to resume.{_notes(e)}", file=sys.stderr, flush=True)
    return 74  # EX_IOERR


def _tracking_failed(command: str, cfg, e: BaseException) -> int:
    import errno

    from lastmile.tracking import default_store, first_line, tracking_uri

    if "database or disk is full" in str(e):  # SQLite's words for ENOSPC: the disk, not the store, failed
        full = OSError(errno.ENOSPC, "No space left on device", str(default_store(cfg) or tracking_uri(cfg)))
        full.__notes__ = list(getattr(e, "__notes__", ()))
        return _environment_failed(command, cfg, full)
    print(f"lastmile {command}: error: the MLflow tracking store ({tracking_uri(cfg)}) failed during the run: "
          f"{first_line(e)}. Training state is checkpointed atomically, so nothing complete was lost. Bring the "
          "store back (or point tracking.uri elsewhere), then rerun the same command to resume in the same run."
          + _notes(e), file=sys.stderr, flush=True)
    return 69  # EX_UNAVAILABLE


def _notes(e: BaseException) -> str:
    """Notes added while the error propagated, e.g. that its MLflow run could not be ended either."""
    return "".join(" " + n for n in getattr(e, "__notes__", ()))


def _is_tracking_failure(e: BaseException) -> bool:
    """MLflow's own errors, or the HTTP client's under it (a server that went away mid-run)."""
    return type(e).__module__.split(".")[0] in ("mlflow", "requests", "urllib3")


if __name__ == "__main__":
    sys.exit(main())

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
        ("pipeline", "SFT -> reward model -> PPO -> evaluation and the MLE-vs-RL report, one MLflow parent run"),
        ("compare", "compare evaluated systems: SOURCE... (evaluation folders, MLflow run ids, pipeline:<id>)"),
        ("validate", "check a config and print it resolved"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--config", required=False, help="YAML preset, e.g. trainer/configs/tiny.yaml")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.lr=1e-5 output_dir=runs/x"
                       + (" (and the SOURCEs to compare)" if name == "compare" else ""))
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
        if args.command == "validate":
            print(to_yaml(cfg), end="")
            print(f"OK: {args.config or 'defaults'} is valid.", file=sys.stderr)
            return 0
        from lastmile import preflight

        preflight.check(cfg, args.command)
        preflight.lock_output_dir(cfg)
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
        elif args.command == "compare":
            from lastmile.stages import compare

            compare.run(cfg, sources)
        elif args.command == "pipeline":
            from lastmile import pipeline

            pipeline.run(cfg)
        return 0
    except UserError as e:
        print(f"lastmile {args.command}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except preemption.Preempted as e:
        print(f"lastmile {args.command}: interrupted: {e}", file=sys.stderr, flush=True)
        return preemption.EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"lastmile {args.command}: interrupted by Ctrl-C; rerun the same command to resume.", file=sys.stderr)
        return 130
    except OSError as e:  # the environment, not the code: disk full, permissions, a vanished path
        import errno

        if cfg is not None and _is_tracking_failure(e):  # requests' ConnectionError is an OSError
            return _tracking_failed(args.command, cfg, e)

        where = e.filename or "the output dir"
        why = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
               errno.EACCES: "Permission denied", errno.EROFS: "Read-only file system"}.get(e.errno, e.strerror or str(e))
        print(f"lastmile {args.command}: error: {why} while writing {where}. Checkpoints are written atomically, so "
              "the last complete one is intact. Free space or fix the permissions (or move output_dir), then rerun the "
              "same command to resume.", file=sys.stderr, flush=True)
        return 74  # EX_IOERR
    except Exception as e:
        if cfg is None or not _is_tracking_failure(e):
            raise
        return _tracking_failed(args.command, cfg, e)


def _tracking_failed(command: str, cfg, e: BaseException) -> int:
    from lastmile.tracking import tracking_uri

    print(f"lastmile {command}: error: the MLflow tracking store ({tracking_uri(cfg)}) failed during the run: "
          f"{_first_line(e)}. Training state is checkpointed atomically, so nothing complete was lost. Bring the "
          "store back (or point tracking.uri elsewhere), then rerun the same command to resume in the same run.",
          file=sys.stderr, flush=True)
    return 69  # EX_UNAVAILABLE


def _is_tracking_failure(e: BaseException) -> bool:
    """MLflow's own errors, or the HTTP client's under it (a server that went away mid-run)."""
    return type(e).__module__.split(".")[0] in ("mlflow", "requests", "urllib3")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


if __name__ == "__main__":
    sys.exit(main())

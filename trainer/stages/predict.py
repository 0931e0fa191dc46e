"""Predict stage: summarize unlabeled documents with any published model.

    lastmile predict --config trainer/configs/tiny.yaml predict.model=runs/tiny/ppo/model predict.input=docs.csv
    lastmile predict predict.model=smollm2-135m-instruct predict.input=papers.parquet predict.output=out.jsonl

In: a .jsonl, .csv or .parquet file with an id column (`predict.id_field`) and a document column
(`predict.document_field`). Out: one `{"id", "prediction"}` JSON line per document (ids as strings),
made with the evaluation's prompt (`prompt.*`) and decoding (`eval.generation.*`), `predict.batch_size`
documents at a time. Each finished batch is appended and fsynced, so a kill loses at most one batch;
a rerun keeps the lines written (dropping a torn last line) and generates only the missing ids.
Lines are in input order, except that a resumed run appends what it generates after the lines it
kept: match predictions to documents by id. `<output>.meta.json` records the model and settings that
produced the lines, and a rerun with other ones is refused: a prediction is reused only when what
produced it is unchanged. Under torchrun/deepspeed the ranks split each batch and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lastmile import checkpoint, distributed
from lastmile.config import OFFLINE_DEFAULT_MODEL, Config, PredictConfig, flatten, to_dict
from lastmile.data.documents import SUFFIXES, read_documents
from lastmile.data.prompts import PromptBuilder
from lastmile.data.records import Example
from lastmile.errors import ConfigError, DataError, UserError
from lastmile.generation import generate, load_generator
from lastmile.stages.common import describe_change, model_identity

log = logging.getLogger(__name__)

MAX_REPORTED = 20
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def run(cfg: Config) -> Path:
    """`lastmile predict`: every document of `predict.input` without a line in `predict.output` gets one."""
    model, source, output = check_settings(cfg.predict)
    docs = read_documents(source, cfg.predict.id_field, cfg.predict.document_field)
    dist = distributed.setup()
    cfg = replace(cfg, precision=distributed.shared_precision(cfg.precision, dist.device))  # one for all ranks
    producer = _producer(cfg, model, dist.device)
    done, keep_bytes = read_done(output, producer, {d.id for d in docs})
    todo = [d for d in docs if d.id not in done]
    if not todo:
        print(f"Predictions: {output} already holds all {len(docs)} documents of {source}.", flush=True)
        write_postprocessed(cfg.predict, output)
        return output
    tokenizer, lm, attn = load_generator(cfg, model, dist.device)
    log.info("predicting %d of %d documents with %s (attention: %s)", len(todo), len(docs), model, attn.implementation)
    distributed.barrier()  # every rank has read the output before rank 0 cuts its torn line
    with _appending(output, keep_bytes, producer | {"input": str(source)}, is_main=dist.is_main) as f:
        truncated = _generate_into(f, todo, done_before=len(done), total=len(docs), lm=lm, tokenizer=tokenizer,
                                   cfg=cfg, dist=dist)
    if dist.is_main:
        print(f"Predictions: {output} ({len(docs)} documents: {len(todo)} generated now, {len(done)} kept; "
              f"{truncated} documents cut to prompt.max_document_tokens={cfg.prompt.max_document_tokens})", flush=True)
        write_postprocessed(cfg.predict, output)
    return output


def write_postprocessed(p: PredictConfig, output: Path) -> None:
    """`predict.postprocessed_output`: every line of the finished `output` with its prediction
    post-processed as the report's `+post` systems are, written atomically."""
    if not p.postprocessed_output:
        return
    from lastmile.metrics import postprocess

    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "".join(json.dumps({"id": r["id"], "prediction": postprocess(r["prediction"])}, ensure_ascii=False) + "\n"
                   for r in rows)
    target = Path(p.postprocessed_output)
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomic(target, text)
    print(f"Post-processed predictions: {target}", flush=True)


def check_settings(p: PredictConfig) -> tuple[str, Path, Path]:
    """(model, input, output), or a ConfigError listing every problem with `predict.*`."""
    problems = []
    if not p.model:
        problems.append("predict.model (unset) is required. It is the model that writes the summaries. Set "
                        "predict.model=<model folder, .gguf file, hub id owner/name, or smollm2-135m-instruct>.")
    elif (problem := _model_problem(p.model)) is not None:
        problems.append(problem)
    source = Path(p.input) if p.input else None
    if source is None:
        problems.append("predict.input (unset) is required. It holds the documents to summarize. Set "
                        "predict.input=<file.jsonl|.csv|.parquet>.")
    elif source.suffix not in SUFFIXES:
        problems.append(f"predict.input ({source}) has an unknown extension ({source.suffix or 'none'}). The extension "
                        f"picks the reader. Use a {', '.join(SUFFIXES)} file (rename a JSON-lines file to .jsonl).")
    elif not source.is_file():
        problems.append(f"predict.input ({source}) does not exist. There are no documents to read. Check the path "
                        "(a relative one starts at the working directory).")
    output = Path(p.output) if p.output else source.with_suffix(".predictions.jsonl") if source else None
    if output is not None and output.is_dir():
        problems.append(f"predict.output ({output}) is a folder. Predictions go to one JSONL file. Name a file, "
                        f"e.g. predict.output={output / 'predictions.jsonl'}.")
    elif output is not None and source is not None and output.resolve() == source.resolve():
        problems.append(f"predict.output ({output}) is the input file. Predictions would overwrite the documents. "
                        "Name another file.")
    post = Path(p.postprocessed_output) if p.postprocessed_output else None
    if post is not None and any(post.resolve() == x.resolve() for x in (source, output) if x is not None):
        problems.append(f"predict.postprocessed_output ({post}) is the input or the output file. It would overwrite "
                        "them. Name another file, e.g. predictions+post.jsonl.")
    if p.batch_size < 1:
        problems.append(f"predict.batch_size ({p.batch_size}) must be greater than 0. It is the number of documents "
                        "generated together. Set predict.batch_size=8.")
    if problems:
        raise ConfigError("Invalid predict settings:\n" + "\n".join(f"  - {x}" for x in problems))
    return p.model, source, output


def _model_problem(model: str) -> str | None:
    """Why `model` names no model; None for a local model, the offline default or a hub id `owner/name`
    (downloaded by from_pretrained). A path-like name whose parent folder exists is a local path."""
    path = Path(model)
    fix = "Point it at a published model folder (with config.json), a .gguf file, a hub id or smollm2-135m-instruct."
    if path.is_dir() and not (path / "config.json").is_file():
        return f"predict.model ({model}) is a folder without config.json. It holds no Hugging Face model. {fix}"
    if model == OFFLINE_DEFAULT_MODEL or path.exists():
        return None
    hub_id = _HUB_ID.fullmatch(model) and not path.parent.exists() and path.suffix not in (".gguf", ".safetensors")
    return None if hub_id else f"predict.model ({model}) does not exist. There is no model to load. {fix}"


def _producer(cfg: Config, model: str, device: torch.device) -> dict:
    """What makes a prediction, recorded in `<output>.meta.json`. The batch size is left out: lowering it
    after running out of memory is the usual reason to rerun. The precision is the concrete one on
    `device` (`precision=auto` gives bf16 or fp32 by machine): a run resumed where `auto` resolves
    otherwise is refused instead of mixing the two in one file."""
    tree = to_dict(cfg)
    decoding = flatten({"prompt": tree["prompt"], "eval.generation": tree["eval"]["generation"]})
    settings = {k: v for k, v in decoding.items() if k != "eval.generation.batch_size"}
    settings |= {"precision": distributed.resolve_precision(cfg.precision, device),
                 "predict.model": f"{model} [{model_identity(model)}]", "predict.document_field": cfg.predict.document_field}
    body = json.dumps(settings, sort_keys=True, default=str)
    return {"hash": hashlib.sha256(body.encode()).hexdigest()[:16], "settings": settings}


def _legacy_auto(recorded: dict, producer: dict) -> bool:
    """A meta file from before the concrete precision was recorded (`"precision": "auto"`), equal otherwise."""
    settings = recorded.get("settings")
    return (isinstance(settings, dict) and settings.get("precision") == "auto"
            and {**settings, "precision": producer["settings"]["precision"]} == producer["settings"])


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def read_done(output: Path, producer: dict, ids: set[str]) -> tuple[dict[str, str], int]:
    """The predictions already in `output` and the byte length of its complete lines (a torn last line,
    from a kill mid-write, is dropped). Raises DataError for a file this run must not extend."""
    if not output.is_file():
        return {}, 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    done, bad = {}, []
    for n, line in enumerate(data[:keep].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("prediction"), str)
                and row["id"] not in done):
            bad.append(str(n))
            continue
        done[row["id"]] = row["prediction"]
    restart = f"delete {output} (and {meta_path(output).name}) to start over, or choose another predict.output."
    if bad:
        raise DataError(f"predict.output ({output}) has {len(bad)} line(s) that lastmile predict did not write (lines "
                        f"{', '.join(bad[:MAX_REPORTED])}): not a {{\"id\", \"prediction\"}} object, or a repeated id. "
                        f"Only its own lines are safe to extend. Fix them, or {restart}")
    if done:
        _check_reusable(output, producer, done, ids, restart)
    return done, keep


def _check_reusable(output: Path, producer: dict, done: dict[str, str], ids: set[str], restart: str) -> None:
    """The lines in `output` came from what this run would use (per its meta file) and for these documents."""
    try:
        recorded = json.loads(meta_path(output).read_text())
    except (OSError, ValueError):
        recorded = None
    reuse = "Predictions are reused only from the same model and decoding"
    if not isinstance(recorded, dict):
        raise DataError(f"predict.output ({output}) holds {len(done)} predictions without a readable "
                        f"{meta_path(output).name} beside it, so what produced them is unknown. {reuse}. To go on, "
                        f"{restart}")
    if recorded.get("hash") != producer["hash"]:
        if not _legacy_auto(recorded, producer):
            raise DataError(f"predict.output ({output}) was written with other settings: "
                            f"{describe_change(recorded, producer)}. {reuse}. Rerun with the recorded settings to "
                            f"complete it, or {restart}")
        log.warning("%s records precision=auto, written before lastmile recorded the concrete precision; its lines are "
                    "taken as made in %s, this run's precision", meta_path(output), producer["settings"]["precision"])
    unknown = [i for i in done if i not in ids]
    if unknown:
        raise DataError(f"predict.output ({output}) has predictions for {len(unknown)} ids that are not in "
                        f"predict.input (first: {', '.join(unknown[:5])}). It belongs to other documents. Check "
                        f"predict.input, or {restart}")


@contextlib.contextmanager
def _appending(output: Path, keep_bytes: int, meta: dict, *, is_main: bool):
    """Rank 0: `output` opened for appending under an exclusive lock, cut to its complete lines, with
    `<output>.meta.json` written. Other ranks get None: they never write."""
    if not is_main:
        yield None
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as f:  # closing releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"predict.output ({output}) is being written by another lastmile predict. Two runs would "
                            "write the same ids twice. Wait for it to finish, or choose another predict.output.") \
                from None
        f.truncate(keep_bytes)
        checkpoint.write_json_atomic(meta_path(output), meta)
        yield f


def _generate_into(f, todo: list[Example], *, done_before: int, total: int, lm, tokenizer, cfg: Config, dist) -> int:
    """Generate `todo` in batches of predict.batch_size per rank; rank 0 appends and fsyncs each batch.
    Returns the number of documents cut to the prompt's token budget."""
    gen = replace(cfg.eval.generation, batch_size=cfg.predict.batch_size)
    builder = PromptBuilder(tokenizer, cfg.prompt)
    autocast = distributed.autocast(cfg.precision, dist.device)
    lm.to(dist.device)
    step, truncated = cfg.predict.batch_size * dist.world_size, 0
    bar = tqdm(total=total, initial=done_before, desc="predict", unit="doc", disable=not dist.is_main)
    for start in range(0, len(todo), step):
        batch = todo[start : start + step]
        mine = batch[dist.rank :: dist.world_size]
        prompts, report = builder.tokenize(mine, with_response=False)
        texts = generate(lm, tokenizer, prompts, gen, dist.device, autocast_ctx=autocast, show_progress=False)
        pairs = distributed.gather_objects([(d.id, t) for d, t in zip(mine, texts)])
        found = {i: t for rank_pairs in pairs for i, t in rank_pairs}
        truncated += report.truncated_documents
        if f is not None:
            f.write("".join(json.dumps({"id": d.id, "prediction": found[d.id]}) + "\n" for d in batch).encode())
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(batch))
    bar.close()
    return int(distributed.all_reduce_sum(truncated))

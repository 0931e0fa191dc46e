"""Checks of a stage's model inputs against their roles, before any weights load.

A model folder given for the wrong role loads without an error and trains or scores noise:
`AutoModelForCausalLM` drops a reward model's score head and starts a random output layer;
`AutoModelForSequenceClassification` gives a causal LM a new, random score head. So every model
input is checked here first, from its files alone (config.json `architectures`, the weights'
headers, `reward_stats.json`, the tokenizer), and a problem is one message naming the setting:

    actor, reference, evaluated or sampling model   a causal LM (`*ForCausalLM`) with its weights
    reward model, and the critic started from it     a one-label `*ForSequenceClassification` with
                                                     its weights and reward_stats.json
    rm.init                                          either (a causal LM gets a new head)

Hub ids are left to `from_pretrained`; GGUF files are causal LMs (converted by `models`).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from lastmile.errors import ModelError

CAUSAL_LM = "causal LM"
REWARD_MODEL = "reward model"
ANY_LM = "model"  # rm.init: a causal LM (a new head is added) or a trained reward model
STATS_FILE = "reward_stats.json"
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
_REWARD_FIX = ("Point {field} at the model folder `lastmile reward-model` writes (<output_dir>/reward_model/model: a "
               "one-label sequence classifier with reward_stats.json).")


def check_model_input(field: str, path: str, role: str, *, gguf_file: str | None = None) -> None:
    """Raise ModelError when the model `field` names (`path`) cannot play `role` (CAUSAL_LM,
    REWARD_MODEL or ANY_LM): missing, no weights, weights cut short, another architecture, or for a
    reward model no readable reward_stats.json. Reads files only."""
    from lastmile.models import resolve_model_path

    folder = Path(resolve_model_path(path, gguf_file, field=field))
    if not folder.is_dir():
        return  # a hub id: from_pretrained fetches and checks it
    config = read_config(field, path, folder)
    _check_weights(field, path, folder)
    archs = [str(a) for a in config.get("architectures") or []]
    if role == CAUSAL_LM and archs and not any(a.endswith(_CAUSAL_HEADS) for a in archs):
        raise ModelError(
            f"{field} ({path}) is a {archs[0]}, not a causal language model. Loaded as one, its head would be dropped "
            "and a random output layer put in its place: the run would generate noise without an error. Point "
            f"{field} at a causal LM (config.json architectures ending in ForCausalLM), e.g. the sft/model folder "
            "`lastmile sft` writes.")
    if role == REWARD_MODEL:
        _check_reward_head(field, path, archs, config)
        read_reward_stats(field, path)


def read_config(field: str, path: str, folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{field} ({path}): config.json is not valid JSON ({e}). The file was cut short or edited. "
                         "Copy the model folder again.") from None
    if not isinstance(config, dict):
        raise ModelError(f"{field} ({path}): config.json holds a JSON {type(config).__name__}, not an object of model "
                         "settings. Copy the model folder again.")
    return config


def _check_reward_head(field: str, path: str, archs: list[str], config: dict) -> None:
    heads = [a for a in archs if a.endswith("ForSequenceClassification")]
    if not heads:
        what = f"a {archs[0]}" if archs else "a model whose config.json names no architecture"
        raise ModelError(
            f"{field} ({path}) is {what}, not a trained reward model. Loaded as one, it would get a new score head with "
            "random weights, and PPO would optimize noise without an error. " + _REWARD_FIX.format(field=field))
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if labels != 1:
        raise ModelError(
            f"{field} ({path}) is a {heads[0]} with {labels} labels, not a one-label reward model. PPO reads one score "
            "per summary; loading it with one label would start a new, random head. " + _REWARD_FIX.format(field=field))


def read_reward_stats(field: str, path: str) -> dict[str, float]:
    """The reference-score mean and std in a reward model's reward_stats.json (rewards are normalized
    by them); ModelError when the file is missing, not JSON, or lacks finite numbers."""
    stats_file = Path(path) / STATS_FILE
    if not stats_file.is_file():
        raise ModelError(
            f"{field} ({path}) has no {STATS_FILE}. Rewards are normalized by the mean and std of the reference "
            "summaries' scores that `lastmile reward-model` stores there; without them the reward's scale is "
            f"unknown. Point {field} at a folder `lastmile reward-model` wrote, or run it again.")
    try:
        stats = json.loads(stats_file.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{field} ({path}): {STATS_FILE} is not valid JSON ({e}). The file was cut short or edited, so "
                         "the reward's normalization is unknown. Restore it, or delete the reward model folder and "
                         "run `lastmile reward-model` again.") from None
    except (KeyError, TypeError, ValueError):
        mean = std = math.nan
    if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
        raise ModelError(f"{field} ({path}): {STATS_FILE} needs finite numbers \"mean\" and \"std\" (std >= 0), as "
                         "`lastmile reward-model` writes them. Restore the file, or run `lastmile reward-model` again.")
    return {"mean": mean, "std": std or 1.0}  # std 0: every reference scored the same; scores stay unscaled


def _check_weights(field: str, path: str, folder: Path) -> None:
    """Weights present, and every safetensors file as long as its header says (a cut copy fails here,
    not as a SafetensorError deep inside from_pretrained)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ModelError(
            f"{field} ({path}) has config.json but no weights (no *.safetensors or *.bin file). A model folder holds "
            f"what save_pretrained writes: config, weights and tokenizer. Copy the weights into it, or point {field} "
            "at a complete model folder.")
    for f in files:
        problem = safetensors_problem(f) if f.suffix == ".safetensors" else None
        if problem:
            raise ModelError(f"{field} ({path}): {f.name} {problem}. The copy or download was cut short (or the file "
                             "was damaged). Copy or download the model again.")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON header, data as long
    as the header's offsets say), or None. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"is {size} bytes, shorter than its own header ({8 + n} bytes)"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "has a header that is not valid JSON"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    return f"is {size} bytes; its header describes {need}" if size < need else None


def check_same_vocabulary(field: str, path: str, tokenizer, *, reader: str, reader_path: str) -> None:
    """The model `field` names reads token ids from `tokenizer`, the `reader`'s (e.g. "the actor", at
    `reader_path`). Refuse an embedding smaller than that vocabulary (an IndexError mid-run) and a
    tokenizer of its own that maps tokens to other ids (a silently wrong score)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    fix = (f"Use a model trained from the same base model as {reader} (rm.init), or point {field} at one that shares "
           f"{reader}'s tokenizer.")
    size = read_config(field, path, folder).get("vocab_size")
    if isinstance(size, int) and size < len(tokenizer):
        raise ModelError(
            f"{field} ({path}) has a vocabulary of {size} tokens, fewer than the {len(tokenizer)} of {reader} "
            f"({reader_path}). It reads {reader}'s token ids, and the first id past its embedding fails mid-run. {fix}")
    own = _own_tokenizer(folder)
    if own is None:
        return
    mine, theirs = own.get_vocab(), tokenizer.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ModelError(
            f"{field} ({path}) has another tokenizer than {reader} ({reader_path}): {len(mine)} vs {len(theirs)} "
            f"tokens, e.g. {', '.join(f'{t!r}={i}' for t, i in differ)}. It would read {reader}'s token ids as other "
            f"text and score it silently wrong. {fix}")


def _own_tokenizer(folder: Path):
    """The tokenizer saved in a model folder, or None when it holds none."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                  "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


def check_base_model(cfg) -> None:
    """`model.path` (a ModelConfig) as SFT's start: a causal LM with its weights, unless
    `model.random_init` builds new ones; a tokenizer (`model.tokenizer_path`, else the model's); and
    `model.config_overrides` it can take."""
    from lastmile.models import load_tokenizer, model_config

    if not cfg.random_init:
        check_model_input("model.path", cfg.path, CAUSAL_LM, gguf_file=cfg.gguf_file)
    load_tokenizer(cfg)
    model_config(cfg)

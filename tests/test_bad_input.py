"""Bad input, table-driven: each case gets one clear message naming the field, file or URI (exact
fragment asserted), exit code 2 (74 for the environment: no room on the disk), no traceback, and leaves nothing a later run could take as
complete (no DONE.json). Runs the CLI in this process (`lastmile.cli.main`), so the table is fast."""

import fcntl
import json
from pathlib import Path

import pytest
from conftest import TINY

from lastmile.cli import main

TEST_IDS = None


def _ids(n=8):
    global TEST_IDS
    if TEST_IDS is None:
        from lastmile.config import DataConfig
        from lastmile.data.records import load_split

        TEST_IDS = [e.id for e in load_split(DataConfig(), "test")[:8]]
    return TEST_IDS[:n]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _data_folder(tmp: Path, rows) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    for split in ("train", "validation", "test"):
        _jsonl(d / f"{split}.jsonl", rows)
    return d


def _ds_json(tmp: Path, text: str) -> Path:
    p = tmp / "ds.json"
    p.write_text(text)
    return p


def _latin1_json(tmp: Path) -> Path:
    p = tmp / "ds.json"
    p.write_bytes('{"comment": "caf\u00e9"}'.encode("latin-1"))
    return p


def _preds(tmp: Path, rows) -> Path:
    return _jsonl(tmp / "preds.jsonl", rows)


GOOD_ROW = {"id": "a", "document": "We study things. " * 10, "summary": "Things are studied."}
DUPLICATED = [GOOD_ROW, {**GOOD_ROW, "id": "b"}, {**GOOD_ROW, "summary": "Other things are studied."}]

# (case id, command, overrides: a function of the case's tmp folder, expected message fragment)
CASES = [
    # config
    ("unknown-key", "sft", lambda t: ["sft.lrr=1"], "sft.lrr is not a known setting. Did you mean 'sft.lr'?"),
    ("zero-batch", "sft", lambda t: ["sft.batch_size=0"], "sft.batch_size (0) must be greater than 0."),
    ("nan-lr", "sft", lambda t: ["sft.lr=nan"], "sft.lr (nan) must be a finite number."),
    ("nan-grad-norm", "sft", lambda t: ["sft.max_grad_norm=nan"], "sft.max_grad_norm (nan) must be a finite number."),
    ("negative-lr", "ppo", lambda t: ["ppo.lr=-1"], "ppo.lr (-1.0) must be greater than 0."),
    ("wrong-type-int", "sft", lambda t: ["sft.epochs=abc"], "sft.epochs ('abc') must be an integer."),
    ("wrong-type-bool", "sft", lambda t: ["sft.packing=maybe"], "sft.packing ('maybe') must be true or false."),
    ("bad-literal", "ppo", lambda t: ["ppo.kl_estimator=k9"], "ppo.kl_estimator ('k9') must be one of 'k1', 'k2', 'k3'."),
    ("top-p", "ppo", lambda t: ["ppo.top_p=1.5"], "ppo.top_p (1.5) must be in (0, 1]."),
    ("gamma", "ppo", lambda t: ["ppo.gamma=1.5"], "ppo.gamma (1.5) must be at most 1."),
    ("group-needs-samples", "ppo", lambda t: ["ppo.advantage=grpo", "ppo.samples_per_prompt=1"],
     "ppo.samples_per_prompt (1) must be at least 2 with ppo.advantage=grpo"),
    ("no-reward-term", "ppo", lambda t: ["ppo.reward.rm_weight=0", "ppo.reward.metric=none"],
     "ppo.reward has neither a reward-model term"),
    ("length-alarm", "ppo", lambda t: ["ppo.length_alarm_low=3", "ppo.length_alarm_high=1"],
     "ppo.length_alarm_low (3.0) and ppo.length_alarm_high (1.0) must satisfy 0 < low < high."),
    ("not-key-value", "sft", lambda t: ["sft.lr"], "override (sft.lr) is not of the form key.sub=value."),
    ("batch-not-multiple", "sft", lambda t: ["sft.batch_size=7"],
     "sft.batch_size (7) is not a multiple of sft.micro_batch_size (2)."),
    ("unknown-mode", "reward-model", lambda t: ["rm.mode_weights={typo: 1}"], "rm.mode_weights has unknown modes ['typo']."),
    ("no-mode", "reward-model", lambda t: ["rm.mode_weights={random_tokens: 0}"],
     "rm.mode_weights gives no mode a positive weight."),
    ("empty-output-dir", "sft", lambda t: ["output_dir="], "output_dir ('') must name a folder."),
    ("warmup-beyond-run", "sft", lambda t: ["sft.warmup_steps=500"],
     "sft.warmup_steps (500) is not below the run's 12 optimizer steps"),
    ("ppo-minibatch", "ppo", lambda t: ["ppo.minibatch_size=3"], "ppo.minibatch_size (3) does not divide the rollout"),
    ("ppo-splits", "ppo", lambda t: ["data.dev_split=test"], "data.dev_split (test) overlaps data.eval_split (test)."),
    # deepspeed JSON
    ("ds-missing", "sft", lambda t: ["deepspeed.config=nope"], "deepspeed.config (nope) does not exist."),
    ("ds-list", "sft", lambda t: [f"deepspeed.config={_ds_json(t, '[1, 2]')}"],
     "must be a JSON object of DeepSpeed settings, not an array."),
    ("ds-zero-not-object", "sft", lambda t: [f"deepspeed.config={_ds_json(t, json.dumps({'zero_optimization': 3}))}"],
     '"zero_optimization" must be an object, not a number.'),
    ("ds-not-utf8", "sft", lambda t: [f"deepspeed.config={_latin1_json(t)}"], "is not valid JSON"),
    ("ds-invalid", "sft", lambda t: [f"deepspeed.config={_ds_json(t, '{nope')}"], "is not valid JSON"),
    ("ds-contradiction", "sft", lambda t: [f"deepspeed.config={_ds_json(t, json.dumps({'train_batch_size': 3}))}"],
     "train_batch_size (3) in the DeepSpeed JSON contradicts our config (8)."),
    # data
    ("data-missing-folder", "sft", lambda t: [f"data.source={t / 'nowhere'}"], "is neither 'aclsum', 'hub:<name>' nor an existing folder."),
    ("data-no-split", "sft", lambda t: [f"data.source={t}"], "data split (train) has no file in"),
    ("data-bad-json", "sft", lambda t: [f"data.source={_data_folder(t, [GOOD_ROW, '{broken'])}"],
     "has 1 malformed line(s):\n  line 2: not valid JSON"),
    ("data-empty-summary", "sft", lambda t: [f"data.source={_data_folder(t, [GOOD_ROW, {**GOOD_ROW, 'summary': ' '}])}",
                                             "data.references_field=null"], "field 'summary' is empty"),
    ("data-not-utf8", "sft", lambda t: [f"data.source={_latin1(_data_folder(t, [GOOD_ROW]))}"], "line 2: not UTF-8 text"),
    ("tokenizer-missing", "sft", lambda t: [f"model.path={_with_weights(_sft_like(t))}", "model.random_init=false"],
     "has no usable tokenizer"),
    ("tokenizer-path-missing", "sft", lambda t: [f"model.tokenizer_path={t / 'nowhere'}"],
     "model.tokenizer_path ({case}/nowhere) does not exist."),
    ("data-wrong-field", "sft", lambda t: [f"data.source={_data_folder(t, [GOOD_ROW])}", "data.document_field=text"],
     "field 'text' is missing"),
    ("data-wrong-type", "sft", lambda t: [f"data.source={_data_folder(t, [GOOD_ROW, {**GOOD_ROW, 'summary': ['a']}])}",
                                          "data.references_field=null"], """row 2 (line 2): field 'summary' is a list (["a"]), not text"""),
    ("split-part-unknown", "sft", lambda t: ["data.eval_split=test@half"], "data.eval_split (test@half) ends in an unknown part."),
    ("eval-duplicate-ids", "evaluate", lambda t: [f"data.source={_duplicated(t)}", "data.references_field=null",
                                                 f"eval.predictions={_preds(t, [{'id': 'a', 'prediction': 'x'}])}"],
     "data.eval_split (test): {case}/data/test.jsonl has 1 duplicated example id(s): 'a' (rows 1, 3)."),
    ("dev-duplicate-ids", "sft", lambda t: [f"data.source={_duplicated(t)}", "data.references_field=null"],
     "data.dev_split (validation): {case}/data/validation.jsonl has 1 duplicated example id(s): 'a' (rows 1, 3)."),
    ("dev-fraction", "sft", lambda t: ["data.dev_fraction=1.5"], "data.dev_fraction (1.5) must be in (0, 1)"),
    ("ppo-split-parts-overlap", "ppo", lambda t: ["data.dev_split=test@dev"],
     "data.dev_split (test@dev) overlaps data.eval_split (test)."),
    ("predictions-missing", "evaluate", lambda t: [f"eval.predictions={t / 'none.jsonl'}"], "does not exist."),
    ("predictions-null", "evaluate", lambda t: [f"eval.predictions={_preds(t, [{'id': i, 'prediction': None} for i in _ids()])}"],
     'line 1: "prediction" is null, not a string.'),
    ("predictions-list", "evaluate", lambda t: [f"eval.predictions={_preds(t, [{'id': i, 'prediction': ['a']} for i in _ids()])}"],
     'line 1: "prediction" is ["a"], not a string.'),
    ("predictions-duplicate", "evaluate",
     lambda t: [f"eval.predictions={_preds(t, [{'id': i, 'prediction': 'x'} for i in _ids() + _ids(1)])}"],
     "line 9: id " + "{first} already has a prediction on line 1."),
    ("predictions-unknown-id", "evaluate",
     lambda t: [f"eval.predictions={_preds(t, [{'id': i, 'prediction': 'x'} for i in _ids() + ['zzz']])}"],
     "has predictions for 1 ids that are not evaluation examples (first: zzz)."),
    ("predictions-missing-ids", "evaluate", lambda t: [f"eval.predictions={_preds(t, [{'id': _ids(1)[0], 'prediction': 'x'}])}"],
     "has no prediction for 7 of 8 evaluation examples"),
    ("predictions-not-json", "evaluate", lambda t: [f"eval.predictions={_preds(t, ['not json'])}"], "line 1 is not valid JSON"),
    # models
    ("model-missing", "sft", lambda t: [f"model.path={t / 'nothing'}", "model.random_init=false"], "does not exist."),
    ("model-no-config", "sft", lambda t: [f"model.path={t}", "model.random_init=false"], "is a folder without config.json."),
    ("model-no-weights", "sft", lambda t: [f"model.path={_config_only(t)}", "model.random_init=false"],
     "model.path ({case}/cfg_only) has config.json but no weights (no *.safetensors or *.bin file)."),
    ("model-no-weights-no-tokenizer", "sft", lambda t: [f"model.path={_sft_like(t)}", "model.random_init=false"],
     "model.path ({case}/sft_model) has config.json but no weights"),
    ("model-weights-truncated", "sft", lambda t: [f"model.path={_cut_weights(t)}", "model.random_init=false"],
     "model.path ({case}/cfg_only): model.safetensors is 1048576 bytes; its header describes"),
    ("rm-init-missing", "reward-model", lambda t: [f"rm.init={t / 'nowhere'}"], "rm.init ({case}/nowhere) does not exist."),
    ("model-corrupt-gguf", "sft", lambda t: [f"model.path={_corrupt_gguf(t)}", "model.random_init=false"],
     "could not be read as a GGUF model"),
    ("model-override-field", "sft", lambda t: ["model.config_overrides={no_such_field: 1}"],
     "model.config_overrides.no_such_field is not a field of LlamaConfig."),
    ("model-override-type", "sft", lambda t: ["model.config_overrides={num_hidden_layers: two}"],
     "model.config_overrides.num_hidden_layers ('two') must be an int"),
    ("model-override-not-a-number", "sft", lambda t: ["model.config_overrides.hidden_size=abc"],
     "model.config_overrides.hidden_size ('abc') must be an int like the model's own value (576)."),
    ("model-override-impossible-shape", "sft", lambda t: ["model.config_overrides.num_key_value_heads=3"],
     "model.config_overrides.num_key_value_heads (3) does not divide num_attention_heads (4)."),
    ("evaluate-without-sft", "evaluate", lambda t: [], "holds no model. Run `lastmile sft` with the same output_dir first"),
    ("ppo-without-sft", "ppo", lambda t: [], "ppo.init is unset and"),
    ("ppo-without-reward-model", "ppo", lambda t: [f"ppo.init={_with_weights(_sft_like(t))}"], "holds no reward model. Run `lastmile reward-model`"),
    # tracking and environment
    ("tracking-unreachable", "sft", lambda t: ["tracking.enabled=true", "tracking.uri=http://127.0.0.1:9"],
     "tracking.uri (http://127.0.0.1:9) does not answer"),
    ("tracking-malformed", "sft", lambda t: ["tracking.enabled=true", "tracking.uri=bogus-uri"],
     "tracking.uri (bogus-uri) is not an MLflow tracking URI."),
    ("output-dir-is-file", "sft", lambda t: [f"output_dir={_a_file(t)}"], "is a file. Point output_dir at a folder"),
    ("output-dir-unwritable", "sft", lambda t: ["output_dir=/proc/lastmile-out"],
     "output_dir (/proc/lastmile-out) is not writable"),
    ("tracking-store-unwritable", "sft", lambda t: ["tracking.enabled=true", "tracking.uri=sqlite:////proc/lastmile/m.db"],
     "tracking.uri (sqlite:////proc/lastmile/m.db): /proc/lastmile is not writable."),
    ("disk-too-small", "sft", lambda t: [f"model.path={_huge_model(t)}", "model.random_init=false"],
     "GB free; this run needs about 6144.0 GB (6x the model's 1024.00 GB of weights", 74),
    ("compare-unknown-source", "compare", lambda t: [str(t / "nowhere")], "is neither an evaluation folder"),
    ("compare-cut-results", "compare", lambda t: [str(_evaluation(t, cut_results=True))],
     "SOURCE ({case}/eval) is a damaged evaluation: results.json is not valid JSON"),
    ("compare-sample-without-system", "compare", lambda t: [str(_evaluation(t, drop="model+post"))],
     "SOURCE ({case}/eval) is a damaged evaluation: samples.jsonl line 2 has no 'model+post'"),
]


def _config_only(t: Path) -> Path:
    d = t / "cfg_only"
    d.mkdir()
    from lastmile.config import load_config
    from lastmile.models import resolve_model_path

    src = Path(resolve_model_path(load_config(TINY).model.path))
    for f in src.iterdir():  # everything but the weights
        if f.is_file() and f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _duplicated(t: Path) -> Path:
    """Evaluation and dev splits where id 'a' is on rows 1 and 3; 16 distinct training examples."""
    d = _data_folder(t, DUPLICATED)
    _jsonl(d / "train.jsonl", [{**GOOD_ROW, "id": f"t{i}"} for i in range(16)])
    return d


def _with_weights(d: Path) -> Path:
    """A valid safetensors file holding no tensors: the folder has weights, and nothing else of a model."""
    (d / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    return d


def _cut_weights(t: Path) -> Path:
    """The offline model's folder with its weights cut after 1 MiB (a copy that stopped)."""
    from lastmile.config import load_config
    from lastmile.models import resolve_model_path

    d = _config_only(t)
    with open(Path(resolve_model_path(load_config(TINY).model.path)) / "model.safetensors", "rb") as f:
        (d / "model.safetensors").write_bytes(f.read(1 << 20))
    return d


def _evaluation(t: Path, *, cut_results: bool = False, drop: str | None = None) -> Path:
    """An evaluation folder as `lastmile evaluate` writes it (two systems, three examples), damaged."""
    d = t / "eval"
    d.mkdir()
    systems = ("model", "model+post")
    results = {"systems": {n: {"rougeL": 0.5} for n in systems},
               "per_example": {n: {"rougeL": [0.4, 0.5, 0.6]} for n in systems}}
    text = json.dumps(results)
    (d / "results.json").write_text(text[: len(text) // 2] if cut_results else text)
    rows = [{"id": f"p{i}", "reference": "r", **{n: f"summary {i}" for n in systems}} for i in range(3)]
    rows[1].pop(drop, None)
    _jsonl(d / "samples.jsonl", rows)
    return d


def _latin1(folder: Path) -> Path:
    for f in folder.iterdir():
        with open(f, "ab") as out:
            out.write(b'{"id": "b", "document": "caf\xe9", "summary": "x"}\n')
    return folder


def _corrupt_gguf(t: Path) -> Path:
    p = t / "broken.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 64)
    return p


def _sft_like(t: Path) -> Path:
    d = t / "sft_model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _huge_model(t: Path) -> Path:
    """A model folder whose (sparse) weights file claims 1 TiB: no disk holds 4x that for a checkpoint."""
    d = t / "huge"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(2**40)
    return d


def _a_file(t: Path) -> Path:
    p = t / "a_file"
    p.write_text("x")
    return p


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message(case, tmp_path, capsys):
    name, command, overrides, expected, *exit_code = case
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    out = tmp_path / "out"
    args = overrides(case_dir)
    if "{" in expected:
        expected = expected.format(first=_ids(1)[0] if "{first}" in expected else "", case=case_dir)
    argv = [command, "--config", str(TINY), f"output_dir={out}", "tracking.enabled=false", *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == (exit_code[0] if exit_code else 2), err[-2000:]
    assert expected in err, err[-2000:]
    assert "Traceback" not in err
    assert not list(Path(tmp_path).rglob("DONE.json"))  # nothing that looks complete


# Model inputs against their roles, in a run folder `r` as `lastmile sft` and `lastmile reward-model`
# leave it (a copy of the tiny_rm_run fixture). (case id, command, overrides: a function of r and the
# case's tmp folder, expected fragment with {r} and {case} filled in.)
CUT_STATS = '{"mean": 0.1, "st'  # reward_stats.json cut short
RUN_CASES = [
    ("reward-model-is-causal-lm", "ppo", lambda r, t: [f"ppo.reward.model={r}/sft/model"],
     "ppo.reward.model ({r}/sft/model) is a LlamaForCausalLM, not a trained reward model."),
    ("actor-is-reward-model", "ppo", lambda r, t: [f"ppo.init={r}/reward_model/model"],
     "ppo.init ({r}/reward_model/model) is a LlamaForSequenceClassification, not a causal language model."),
    ("eval-model-is-reward-model", "evaluate", lambda r, t: [f"eval.model={r}/reward_model/model"],
     "eval.model ({r}/reward_model/model) is a LlamaForSequenceClassification, not a causal language model."),
    ("reward-stats-missing", "ppo", lambda r, t: [f"ppo.reward.model={_rm_copy(r, t, stats=None)}"],
     "ppo.reward.model ({case}/rm) has no reward_stats.json."),
    ("reward-stats-not-json", "ppo", lambda r, t: [f"ppo.reward.model={_rm_copy(r, t, stats=CUT_STATS)}"],
     "ppo.reward.model ({case}/rm): reward_stats.json is not valid JSON"),
    ("reward-model-smaller-vocabulary", "ppo", lambda r, t: [f"ppo.reward.model={_rm_copy(r, t, vocab_size=1000)}"],
     "ppo.reward.model ({case}/rm) has a vocabulary of 1000 tokens, fewer than the 49152 of the actor ({r}/sft/model)."),
    ("reward-model-other-tokenizer", "ppo", lambda r, t: [f"ppo.reward.model={_rm_copy(r, t, extra_token='zqzq')}"],
     "ppo.reward.model ({case}/rm) has another tokenizer than the actor ({r}/sft/model): 49153 vs 49152 tokens"),
    ("reward-model-weights-truncated", "ppo", lambda r, t: [f"ppo.reward.model={_rm_copy(r, t, cut_weights=True)}"],
     "ppo.reward.model ({case}/rm): model.safetensors is"),
]


def _copy_run(src: Path, dest: Path) -> Path:
    import shutil

    for stage in ("sft", "reward_model"):
        shutil.copytree(src / stage, dest / stage)
    return dest


def _rm_copy(r: Path, t: Path, *, stats: str | None = "keep", vocab_size: int | None = None,
             extra_token: str | None = None, cut_weights: bool = False) -> Path:
    """A copy of r's reward model with one thing changed."""
    import shutil

    d = shutil.copytree(r / "reward_model" / "model", t / "rm")
    if stats != "keep":
        (d / "reward_stats.json").unlink()
        if stats is not None:
            (d / "reward_stats.json").write_text(stats)
    if vocab_size:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))
    if extra_token:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d)
        tok.add_tokens([extra_token])
        tok.save_pretrained(d)
    if cut_weights:
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder (but the output-dir lock) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lastmile.lock"}


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_a_model_input_in_the_wrong_role_is_refused_before_anything_is_written(case, tiny_rm_run, tmp_path, capsys):
    name, command, overrides, expected = case
    r = _copy_run(tiny_rm_run, tmp_path / "r")
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    args = overrides(r, case_dir)
    before = _tree(r)
    code = main([command, "--config", str(TINY), f"output_dir={r}", "tracking.enabled=false", *args])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert expected.format(r=r, case=case_dir) in err, err[-2000:]
    assert "Traceback" not in err
    assert _tree(r) == before  # nothing written, nothing lost: no ppo/ or eval/ folder, the inputs untouched


def test_a_done_marker_whose_model_is_gone_or_damaged_is_not_done(tiny_rm_run, tmp_path, capsys):
    """The loop of issue 21: reward_model/model deleted, DONE.json kept; PPO said "run `lastmile
    reward-model`", which answered "already complete; skipping". Now the stage says why it is not done,
    removes the marker and runs again; a model cut short (a file of another size than its manifest says)
    is treated the same."""
    import shutil

    from lastmile.config import load_config
    from lastmile.stages import common

    r = _copy_run(tiny_rm_run, tmp_path / "r")
    cfg = load_config(TINY, [f"output_dir={r}", "tracking.enabled=false"])
    shutil.rmtree(r / "reward_model" / "model")
    start = common.begin(cfg, "reward_model", "Reward model", inputs={"init": str(r / "sft" / "model")})
    out = capsys.readouterr().out
    assert not start.done and not (r / "reward_model" / "DONE.json").exists()
    assert (f"Reward model in {r / 'reward_model'} is marked complete (DONE.json), but its outputs do not verify: "
            f"{r / 'reward_model' / 'model'} is missing.") in out and "running Reward model again" in out
    weights = r / "sft" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    start = common.begin(cfg, "sft", "SFT", inputs={"base": cfg.model.path})
    out = capsys.readouterr().out
    assert not start.done and f"{weights} has 1000 bytes" in out and "running SFT again" in out
    assert not (r / "sft" / "DONE.json").exists()


def test_config_that_is_a_folder_names_the_folder(tmp_path, capsys):
    code = main(["sft", "--config", str(TINY.parent), f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"--config ({TINY.parent}) is a folder, not a YAML file." in err and "tiny.yaml" in err
    assert not (tmp_path / "out").exists()


def test_second_run_on_one_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lastmile.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        code = main(["sft", "--config", str(TINY), f"output_dir={out}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and "is in use by another lastmile run (pid 4242)" in err and "Traceback" not in err


def test_stale_torch_extension_build_lock_is_removed(tmp_path):
    """A process killed while DeepSpeed builds a CPU op leaves `<op>/lock`; torch would wait on it
    forever. An old lock is removed, a fresh one (a build in progress) is kept."""
    import os
    import time

    from lastmile.preflight import clear_stale_build_locks

    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks(tmp_path, older_than_s=600) == [stale]
    assert not stale.exists() and fresh.exists()
    assert clear_stale_build_locks(tmp_path / "absent") == []
    # the layout where TORCH_EXTENSIONS_DIR is set (what make install and runs use): no python/cpu folder
    own = tmp_path / "venv_cache"
    (own / "deepspeed_shm_comm").mkdir(parents=True)
    (own / "deepspeed_shm_comm" / "lock").touch()
    os.utime(own / "deepspeed_shm_comm" / "lock", (old, old))
    assert clear_stale_build_locks(own, older_than_s=600) == [own / "deepspeed_shm_comm" / "lock"]


def test_ops_are_built_with_the_environments_ninja_into_its_own_cache_whatever_path_a_run_has(monkeypatch):
    """torch builds DeepSpeed's CPU op with the first `ninja` on PATH, in TORCH_EXTENSIONS_DIR, and builds it
    again (1-2 min) when another ninja version or another environment's sources made the last build there:
    a run without the venv activated must use the venv's ninja and cache, those `make install` built it with."""
    import os
    import sys

    from lastmile.preflight import use_environment_build_tools

    bin_dir = str(Path(sys.executable).parent)
    if not (Path(bin_dir) / "ninja").is_file() or sys.prefix == sys.base_prefix:
        pytest.skip("not a venv with a ninja of its own")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_environment_build_tools()
    assert os.environ["PATH"] == os.pathsep.join([bin_dir, "/usr/bin", "/bin"])
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    use_environment_build_tools()  # idempotent
    assert os.environ["PATH"] == os.pathsep.join([bin_dir, "/usr/bin", "/bin"])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # a user's own choice is kept
    use_environment_build_tools()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


def test_ranks_probing_one_output_dir_at_once_do_not_trip_each_other(tmp_path):
    """Every rank checks that output_dir is writable as it starts, on the same filesystem at the same
    moment. With one shared probe name, one rank's cleanup removed the other's probe and a 2-rank Slurm
    job failed with "output_dir ... is not writable: No such file or directory" (seen 2026-12-07)."""
    import threading

    from lastmile import preflight
    from lastmile.config import load_config

    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", "tracking.enabled=false"])
    errors: list[BaseException] = []

    def rank() -> None:
        for _ in range(300):
            try:
                preflight.check(cfg)
            except BaseException as e:  # noqa: BLE001 - every failure is the finding
                errors.append(e)
                return

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not any((tmp_path / "out").iterdir())  # and no probe left behind

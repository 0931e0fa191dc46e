"""Continuing a finished stage (issue 21): a larger sft.max_steps / ppo.iterations goes on from the
stage's kept final checkpoint, in the same MLflow run, and ends where one longer run ends (constant
LR, the case where the schedule allows it); a smaller horizon or any other change is refused by name;
a continued SFT model is a new input to the stages after it.

The stages run in this process (the CLI around them is tested elsewhere), which saves a Python start
and its imports per run: the test's budget is small."""

import contextlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, make_reward_model, signals_kept
from lastmile.config import load_config
from lastmile.errors import ConfigError
from lastmile.stages import common, ppo, sft

SFT = ["sft.lr_schedule=constant", "sft.num_samples=0", "sft.eval_every=3", "sft.save_every=3", "sft.eval_examples=4"]
PPO = ["ppo.iterations=1", "ppo.eval_every=1", "ppo.save_every=1", "ppo.eval_examples=2"]


def _run(stage, out, *overrides, tracking=True):
    """stage.run on the tiny preset; returns what it printed."""
    cfg = load_config(TINY, [f"output_dir={out}", f"tracking.enabled={str(tracking).lower()}", *overrides])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stage.run(cfg)
    return printed.getvalue()


def _same_weights(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def _metric_steps(out, stage, key):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["lastmile"])
    mine = runs[runs["tags.lastmile.stage"] == stage]
    assert len(mine) == 1, f"{len(mine)} MLflow runs for {stage}"
    run = mine.iloc[0]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run["run_id"], key)]
    return run, sorted(steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT 3 steps then continued to 6 (into the second epoch), and one 6-step run; PPO 1 iteration (from
    the continued SFT model, against a reward model made from the 3-step one) then continued to 2, and
    one 2-iteration run."""
    root = tmp_path_factory.mktemp("continue")
    out, ref, later = root / "continued", root / "single", root / "later"
    with signals_kept():
        _run(sft, out, *SFT, "sft.max_steps=3")
        model = out / "sft" / "model"
        rm = make_reward_model(model, root / "rm")
        # a later stage made from the 3-step SFT model, as a pipeline's PPO would have been
        later_cfg = load_config(TINY, [f"output_dir={later}"])
        inputs = {"init": str(model), "reward_model": str(rm)}
        (later / "ppo" / "model").mkdir(parents=True)
        (later / "ppo" / "model" / "config.json").write_text("{}")
        old_identity = common.stage_identity(later_cfg, "ppo", inputs)
        (later / "ppo" / "DONE.json").write_text(json.dumps({"identity": old_identity}))
        before = common.model_identity(str(model))
        printed = _run(sft, out, *SFT, "sft.max_steps=6")
        _run(sft, ref, *SFT, "sft.max_steps=6", tracking=False)
        _run(ppo, out, *PPO, f"ppo.reward.model={rm}")
        printed_ppo = _run(ppo, out, *PPO, f"ppo.reward.model={rm}", "ppo.iterations=2")
        _run(ppo, ref, *PPO, f"ppo.reward.model={rm}", f"ppo.init={model}", "ppo.iterations=2", tracking=False)
    return SimpleNamespace(out=out, ref=ref, later=later, later_cfg=later_cfg, inputs=inputs, before=before,
                           printed=printed, printed_ppo=printed_ppo)


def test_sft_continued_ends_like_one_longer_run_in_one_mlflow_run(runs):
    assert "continuing the finished SFT run" in runs.printed and "sft.max_steps (3 -> 6)" in runs.printed
    got = json.loads((runs.out / "sft" / "metrics.json").read_text())
    want = json.loads((runs.ref / "sft" / "metrics.json").read_text())
    assert [s for s, _ in got["loss_history"]] == list(range(1, 7))
    assert [v for _, v in got["loss_history"]] == pytest.approx([v for _, v in want["loss_history"]], rel=1e-4)
    assert [s for s, _ in got["val_history"]] == [s for s, _ in want["val_history"]] == [0, 3, 6]
    assert [v for _, v in got["val_history"]] == pytest.approx([v for _, v in want["val_history"]], rel=1e-4)
    assert _same_weights(runs.out / "sft" / "model", runs.ref / "sft" / "model")
    run, steps = _metric_steps(runs.out, "sft", "sft/loss")
    assert steps == list(range(1, 7)) and run["status"] == "FINISHED"  # one run, no step twice
    assert run["tags.lastmile.resumed"] == "true"
    assert _metric_steps(runs.out, "sft", "sft/val_loss")[1] == [0, 3, 6]
    assert run["params.resume1/sft.max_steps"] == "6" and run["params.sft.max_steps"] == "3"
    # finished again: DONE with the new identity, only the final checkpoint kept
    done = json.loads((runs.out / "sft" / "DONE.json").read_text())["identity"]
    assert done["settings"]["sft.max_steps"] == 6
    assert [p.name for p in (runs.out / "sft" / "checkpoints").iterdir()] == ["step-0000006"]


def test_ppo_continued_ends_like_one_longer_run_in_one_mlflow_run(runs):
    assert "continuing the finished PPO run" in runs.printed_ppo
    got = json.loads((runs.out / "ppo" / "history.json").read_text())
    want = json.loads((runs.ref / "ppo" / "history.json").read_text())
    assert [h["iteration"] for h in got["history"]] == [1, 2]
    for key in ("reward/score_mean", "kl/seq_mean", "policy/loss", "value/loss", "policy/lr"):
        want_values = [h[key] for h in want["history"]]
        assert [h[key] for h in got["history"]] == pytest.approx(want_values, rel=1e-4, abs=1e-6), key
    assert [e["iteration"] for e in got["evals"]] == [e["iteration"] for e in want["evals"]] == [0, 1, 2]
    assert got["best"] == pytest.approx(want["best"])  # the same best iteration, metric and value
    assert got["published"].split("/")[-1] == want["published"].split("/")[-1]  # best/ or the final model
    assert _same_weights(runs.out / "ppo" / "model", runs.ref / "ppo" / "model")
    run, steps = _metric_steps(runs.out, "ppo", "reward/score_mean")
    assert steps == [1, 2] and run["status"] == "FINISHED"
    assert _metric_steps(runs.out, "ppo", "eval/policy/la_rougeL")[1] == [0, 1, 2]
    assert [p.name for p in (runs.out / "ppo" / "checkpoints").iterdir()] == ["step-0000002"]


def test_a_continued_sft_model_is_a_new_input_for_later_stages(runs):
    """The continued model's identity changed, so a stage made from the old one is refused by name."""
    assert common.model_identity(str(runs.out / "sft" / "model")) != runs.before
    with signals_kept(), pytest.raises(ConfigError, match="input init model changed"):
        common.begin(runs.later_cfg, "ppo", "PPO", inputs=runs.inputs)


def test_a_smaller_horizon_or_another_change_is_refused_by_name(runs):
    with signals_kept():
        with pytest.raises(ConfigError, match=r"sft\.max_steps \(6 -> 5\) gives 5 steps, but .* already made 6"):
            _run(sft, runs.out, *SFT, "sft.max_steps=5")
        with pytest.raises(ConfigError, match=r"sft\.lr \(0\.003 -> 0\.001\); sft\.max_steps \(6 -> 12\).*Only a "
                                              r"change of sft\.epochs / sft\.max_steps alone continues a run"):
            _run(sft, runs.out, *SFT, "sft.max_steps=12", "sft.lr=1e-3")
    assert (runs.out / "sft" / "DONE.json").is_file()  # the finished stage is left as it was
    assert json.loads((runs.out / "sft" / "identity.json").read_text())["settings"]["sft.max_steps"] == 6


def test_a_decaying_schedule_follows_the_new_horizon_after_the_old_end():
    """cosine over 10 steps, continued at step 10 to 20: the next step's LR is the 20-step cosine's,
    not the 10-step one's 0 (so a continued decaying schedule is not one longer run's: documented)."""
    from lastmile.distributed import lr_lambda

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 0, 10))
    for _ in range(10):
        opt.step()
        old.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    new = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 0, 20))
    new.load_state_dict(old.state_dict())
    common._refit_schedule(SimpleNamespace(lr_scheduler=new))
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_lambda("cosine", 0, 20)(10)) == pytest.approx(0.5)


def test_horizon_only_compares_everything_but_the_horizon():
    cfg = load_config(TINY)
    base = common.stage_identity(cfg, "sft", {"base": "m"})
    longer = common.stage_identity(load_config(TINY, ["sft.epochs=5"]), "sft", {"base": "m"})
    other = common.stage_identity(load_config(TINY, ["sft.epochs=5", "seed=1"]), "sft", {"base": "m"})
    new_input = common.stage_identity(load_config(TINY, ["sft.epochs=5"]), "sft", {"base": "n"})
    assert common.horizon_only(base, longer) and not common.same_identity(base, longer)
    assert not common.horizon_only(base, other) and not common.horizon_only(base, new_input)
    assert not common.horizon_only(base, base)
    rm = common.stage_identity(load_config(TINY, ["rm.epochs=5"]), "reward_model", {})
    assert not common.horizon_only(common.stage_identity(cfg, "reward_model", {}), rm)  # not continued


def test_a_finished_stage_without_its_final_checkpoint_is_not_continued(tmp_path):
    """Its checkpoints deleted by hand (or never kept): done and usable, but not continued."""
    def cfg(steps):
        return load_config(TINY, [f"output_dir={tmp_path}", f"sft.max_steps={steps}"])

    stage = tmp_path / "sft"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "config.json").write_text("{}")
    identity = common.stage_identity(cfg(4), "sft", {"base": cfg(4).model.path})
    (stage / "DONE.json").write_text(json.dumps({"identity": identity}))
    with signals_kept(), pytest.raises(ConfigError, match=r"sft\.max_steps \(4 -> 8\) would continue it, but its "
                                                           r"final checkpoint .* is gone"):
        common.begin(cfg(8), "sft", "SFT", inputs={"base": cfg(8).model.path})
    assert (stage / "DONE.json").is_file()

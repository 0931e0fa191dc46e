"""PPO's in-loop evaluation on the dev split, and the alarms that guard against reward hacking.

Greedy summaries of `ppo.eval_examples` dev prompts, scored with ROUGE-L and la-ROUGE-L against the
references, the reward model (normalized like the training reward), the length ratio to the
references, the KL to the reference model on those outputs (sum over tokens of log pi - log
pi_ref, nats per summary), and optionally MiniLM similarity. Every rank computes the same numbers
(the texts are gathered), so the best-checkpoint decision is the same on every rank.
"""

from __future__ import annotations

import numpy as np

from lastmile import distributed, metrics, rollout
from lastmile.config import Config, PPOConfig
from lastmile.distributed import DistInfo
from lastmile.hybrid_engine import Sampling


class Evaluator:
    def __init__(self, cfg: Config, setup, dist: DistInfo):
        self.cfg, self.setup, self.dist = cfg, setup, dist
        n = len(setup.dev_prompts)
        per_rank = -(-n // dist.world_size)
        mine = list(range(dist.rank, n, dist.world_size))
        self.real = len(mine)
        self.rows = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # equal forward counts on every rank
        self.semantic = metrics.SemanticScorer(cfg.eval.semantic_model) \
            if cfg.ppo.semantic_in_loop and cfg.eval.semantic_model != "none" else None

    def run(self, iteration: int) -> dict[str, float]:
        s, m = self.setup, self.setup.models
        sampling = Sampling(self.cfg.ppo.max_new_tokens, do_sample=False)
        greedy = rollout.sample(m, [s.dev_prompts[i] for i in self.rows], self.rows, sampling,
                                batch_size=self.cfg.eval.generation.batch_size)
        rm = (rollout.reward_model_scores(m.rm, greedy, m) - m.rm_stats["mean"]) / m.rm_stats["std"]
        kl = (self.actor_logprobs(greedy) - rollout.response_logprobs(m.ref, greedy, m)).sum(-1)
        k = self.real
        mine = list(zip(self.rows[:k], greedy.texts[:k], rm[:k].tolist(), kl[:k].tolist()))
        rows = sorted(r for part in distributed.gather_objects(mine) for r in part)
        texts = [t for _, t, _, _ in rows]
        refs = [list(s.dev_examples[i].references) for i, _, _, _ in rows]
        scores = metrics.rouge_per_example(texts, refs)
        ref_words = [np.mean([metrics.n_words(r) for r in rs]) for rs in refs]
        out = {"iteration": iteration,
               "eval/policy/rougeL": float(np.mean(scores["rougeL"])), "eval/policy/la_rougeL": float(np.mean(scores["la_rougeL"])),
               "eval/policy/reward": float(np.mean([r for _, _, r, _ in rows])),
               "eval/policy/kl": float(np.mean([x for _, _, _, x in rows])),
               "eval/policy/length_ratio": float(np.mean([metrics.n_words(t) / max(w, 1) for t, w in zip(texts, ref_words)])),
               "eval/policy/eos_fraction": float(distributed.all_reduce_sum(float(greedy.ended[:k].sum())) / len(rows))}
        if self.semantic is not None:
            out["eval/policy/semantic"] = float(np.mean(self.semantic.score(texts, refs)))
        out["samples"] = [{"id": s.dev_examples[i].id, "text": t} for i, t, _, _ in rows[:3]]
        return out

    def actor_logprobs(self, greedy: rollout.Rollout):
        """(B, R) the actor's log-probs of its greedy summaries. In fp32 these are the ones generation
        recorded: a forward gives the same numbers (the demo's `parity/mean_abs`: about 4e-6 nats a token)
        and costs as much as the reference's, a sixth of an evaluation. Under bf16 the cached decode
        rounds differently from a full forward (about 0.035 nats a token, bench/logprob_parity.py), and
        the reference's side is a full forward, so the actor's is one too."""
        m = self.setup.models
        if m.precision == "fp32":
            return greedy.gen_logprobs
        return rollout.response_logprobs(m.actor_engine, greedy, m)

    def alarms(self, result: dict, previous: dict | None) -> list[str]:
        return find_alarms(result, previous, self.cfg.ppo)


def find_alarms(result: dict, previous: dict | None, o: PPOConfig) -> list[str]:
    """Signs of reward hacking or collapse in an in-loop evaluation, as messages (empty when all is well)."""
    it, kl, ratio = result["iteration"], result["eval/policy/kl"], result["eval/policy/length_ratio"]
    found = []
    if kl > o.kl_alarm:
        found.append(f"iteration {it}: KL to the reference {kl:.2f} nats > ppo.kl_alarm {o.kl_alarm}")
    if not o.length_alarm_low <= ratio <= o.length_alarm_high:
        found.append(f"iteration {it}: summaries are {ratio:.2f}x the reference length, outside "
                     f"[{o.length_alarm_low}, {o.length_alarm_high}]")
    if previous is not None:
        reward, before = result["eval/policy/reward"], previous["eval/policy/reward"]
        name = o.best_metric if o.best_metric != "reward" else "la_rougeL"
        metric = f"eval/policy/{name}"
        if reward > before and metric in result and result[metric] < previous[metric]:
            found.append(f"iteration {it}: reward-model score rose ({before:.3f} -> {reward:.3f}) while {name} fell "
                         f"({previous[metric]:.4f} -> {result[metric]:.4f}): possible reward hacking")
    return found

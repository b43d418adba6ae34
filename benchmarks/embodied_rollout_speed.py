"""Environment steps per second of the embodied rollout path (EnvRolloutDataModule.collect_iteration).

What one DAgger iteration costs on this machine, per environment and vectorisation: ``num_envs`` environments
stepped by a gymnasium Sync/AsyncVectorEnv, the scripted expert labelling every state inside each environment, the
student policy (a ``HierarchicalPolicy`` forward per step, batched over the environments) acting, β-mixing with
the expert; optionally expert mirror rollouts. Reported: env steps/s (mirror steps included) and, for comparison,
the training side's minibatches of the same iteration (samples/s of forward + backward + AdamW on the student), so
one can see whether collection or learning is the bottleneck.

    python benchmarks/embodied_rollout_speed.py                    # BabyAI GoToLocal and Crafter, sync and async
    python benchmarks/embodied_rollout_speed.py --steps 4096 --envs 2 4 8

Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kd_lightning.data.embodied import EnvRolloutDataModule
from kd_lightning.losses.hierarchical_policy_kd import HierarchicalPolicyKDLoss
from kd_lightning.models.policy import HierarchicalPolicy

ENVIRONMENTS = {
    "BabyAI-GoToLocal-v0": ({}, dict(input_shape=(7, 7, 3), input_categories=(11, 6, 3), vocab_size=40)),
    "Crafter": (
        {"area": 32, "length": 100},
        dict(input_shape=(64, 64, 3), input_categories=None, vocab_size=27, hidden=256),
    ),
}


class StudentAgent:
    """The student acts (sampled), no teacher network: teacher-driven steps are the expert's."""

    device = torch.device("cpu")

    def __init__(self, network: HierarchicalPolicy) -> None:
        self.network = network

    @torch.no_grad()
    def act(self, observation: dict[str, torch.Tensor], role: str, greedy: bool = True) -> torch.Tensor | None:
        if role != "student":
            return None
        logits = self.network(observation)[self.network.action_key]
        return logits.argmax(-1) if greedy else torch.distributions.Categorical(logits=logits).sample()


def measure(env: str, vectorization: str, num_envs: int, steps: int, mirror_every: int) -> dict[str, float]:
    env_kwargs, net_kwargs = ENVIRONMENTS[env]
    data = EnvRolloutDataModule(
        env=env, env_kwargs=env_kwargs, num_envs=num_envs, vectorization=vectorization, steps_per_iteration=steps,
        beta_schedule="constant", beta0=0.5, mirror_every=mirror_every, mirror_horizon=8, seed=0, batch_size=128,
    )  # fmt: skip
    network = HierarchicalPolicy(data.hierarchy, **net_kwargs)
    data.trainer = SimpleNamespace(lightning_module=StudentAgent(network), global_rank=0, world_size=1, max_epochs=1)
    data.collect_iteration()  # builds the environments (resets, world generation) and warms up
    data.collect_iteration()
    stats = dict(data.collection_stats)
    data.teardown("fit")
    loss = HierarchicalPolicyKDLoss(teacher_weight=0.0, expert_weight=1.0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    names = data.factor_names
    started, batches = time.perf_counter(), 10
    for _ in range(batches):
        batch = data.buffer.sample(data.sampling_rng.integers(0, len(data.buffer), 128))
        labels = {n: batch["labels"][:, j] for j, n in enumerate(names)}
        optimizer.zero_grad()
        loss(network(batch), labels)["loss"].backward()
        optimizer.step()
    train_rate = batches * 128 / (time.perf_counter() - started)
    return {"env_steps_per_s": stats["steps_per_s"], "train_samples_per_s": train_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=2048, help="environment steps per measured iteration")
    parser.add_argument("--mirror-every", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=list(ENVIRONMENTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/embodied_rollout_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for env in args.only:
        for vectorization in ("sync", "async"):
            for num_envs in args.envs:
                result = measure(env, vectorization, num_envs, args.steps, args.mirror_every)
                rows.append({"env": env, "vectorization": vectorization, "num_envs": num_envs, **result})
                print(rows[-1], flush=True)
    machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"
    print(f"\n{machine}; student forward per step, expert labels in every env, beta 0.5\n")
    print("| env | vectorization | envs | env steps/s (collection) | training samples/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['env']} | {r['vectorization']} | {r['num_envs']} | {r['env_steps_per_s']:.0f} | "
              f"{r['train_samples_per_s']:.0f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Stage 4 of 4: closed-loop evaluation in the real environments, and the Continual-World metrics.

Reads a checkpoint (pretrain.py's, or finetune.py's). Writes <out>/results.json and <out>/results.md.
The episodes of a task run in lockstep, one env each, batched through the model; the evaluation seeds are fixed,
so every checkpoint meets the same object and goal placements.

Examples:
  python evaluate.py --ckpt runs/pretrain/ckpt.pt --tasks reach-v3,push-v3 --episodes 10
  python evaluate.py --ckpt runs/pretrain/ckpt.pt                 # every task the checkpoint knows
"""
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from collect import load_checkpoint, make_env, parse_args, resolve_tasks
from model import ActionTokenizer, DecisionTransformer, DTConfig, resolve_device

EVAL_SEED = 10_000  # episode i of every task starts from reset(seed=EVAL_SEED + i): disjoint from collection seeds


@dataclass
class Args:
    ckpt: str = field(default="runs/pretrain/ckpt.pt", metadata={"help": "checkpoint to evaluate"})
    tasks: str = field(default="", metadata={"help": "tasks to evaluate (names or list names); empty = every task the checkpoint knows"})
    episodes: int = field(default=10, metadata={"help": "episodes per task"})
    out: str = field(default="", metadata={"help": "output directory; empty = the checkpoint's directory"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})


def load_model(ckpt, device):
    """Rebuild the Decision Transformer of a checkpoint (its own config; no architecture flags needed)."""
    model = DecisionTransformer(DTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


@torch.no_grad()
def evaluate_task(model, task, episodes, device, task_id=None):
    """Roll out `episodes` episodes of one task in lockstep. task: a checkpoint task entry (name, act_dim,
    reward_scale, target_return). Returns success (any step / final step), returns, routing counts, timings."""
    cfg = model.cfg
    K, A, scale = cfg.context_len, cfg.act_dim, task["reward_scale"]
    tokenizer = ActionTokenizer(cfg.n_bins)
    envs = [make_env(task["name"], seed=EVAL_SEED + i) for i in range(episodes)]
    obs = np.stack([env.reset(seed=EVAL_SEED + i)[0] for i, env in enumerate(envs)])  # (N, obs_dim)
    horizon, N = envs[0].horizon, episodes
    # the context window of every env, left-padded: the last slot is the current timestep
    states = torch.zeros(N, K, cfg.state_dim, device=device)
    returns = torch.zeros(N, K, device=device)
    bins = torch.full((N, K, A), cfg.n_bins, dtype=torch.long, device=device)
    rewards = torch.zeros(N, K, device=device)
    timesteps = torch.zeros(N, K, dtype=torch.long, device=device)
    step_mask = torch.zeros(N, K, dtype=torch.bool, device=device)
    return_to_go = torch.full((N,), task["target_return"] / scale, device=device)
    task_ids = None if task_id is None else torch.full((N,), task_id, device=device)

    total_return, success_any, success_last = np.zeros(N), np.zeros(N, bool), np.zeros(N, bool)
    routing = np.zeros(model.pool.size if model.pool is not None else 0, np.int64)
    model_seconds = env_seconds = 0.0
    for t in range(horizon):
        # shift the window by one and write the current step (state, return-to-go, timestep) into the last slot
        for buffer, pad in ((states, 0.0), (returns, 0.0), (bins, cfg.n_bins), (rewards, 0.0), (timesteps, 0), (step_mask, False)):
            buffer[:, :-1] = buffer[:, 1:].clone()
            buffer[:, -1] = pad
        states[:, -1, : obs.shape[1]] = torch.as_tensor(obs, device=device)
        returns[:, -1], timesteps[:, -1], step_mask[:, -1] = return_to_go, t, True

        start = time.perf_counter()
        action_bins, route = model.act(states, returns, bins, rewards, timesteps, step_mask, task["act_dim"], task_ids)
        actions = tokenizer.decode(action_bins).cpu().numpy()  # (N, act_dim) bin centres
        model_seconds += time.perf_counter() - start
        if route is not None:
            routing += np.bincount(route["index"].cpu().numpy(), minlength=len(routing))

        start = time.perf_counter()
        step_rewards = np.zeros(N, np.float32)
        for i, env in enumerate(envs):
            obs[i], step_rewards[i], _, _, info = env.step(actions[i])
            success_last[i] = bool(info.get("success", False))
        env_seconds += time.perf_counter() - start
        success_any |= success_last
        total_return += step_rewards

        bins[:, -1, : task["act_dim"]] = action_bins
        rewards[:, -1] = torch.as_tensor(step_rewards, device=device) / scale
        return_to_go = return_to_go - rewards[:, -1]  # R_{t+1} = R_t - r_t / scale
    return dict(
        task=task["name"], episodes=N, success=float(success_any.mean()), success_final=float(success_last.mean()),
        mean_return=float(total_return.mean()), returns=total_return.tolist(), routing=routing.tolist(),
        env_steps=N * horizon, model_seconds=model_seconds, env_seconds=env_seconds,
    )


def evaluate_tasks(model, tasks, episodes, device, task_ids=None, desc="eval"):
    """Evaluate several tasks (a tqdm bar over tasks); task_ids only for an oracle. -> list of per-task results."""
    results = []
    for i, task in enumerate(tqdm(tasks, desc=desc, leave=False)):
        results.append(evaluate_task(model, task, episodes, device, None if task_ids is None else task_ids[i]))
    return results


def format_results(results):
    """A markdown table of per-task results, with a mean row."""
    lines = ["| task | success (any step) | success (final step) | mean return |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['task']} | {r['success']:.2f} | {r['success_final']:.2f} | {r['mean_return']:.1f} |")
    lines.append(f"| **mean** | **{np.mean([r['success'] for r in results]):.2f}** | "
                 f"{np.mean([r['success_final'] for r in results]):.2f} | |")
    return "\n".join(lines)


def main(args):
    device = resolve_device(args.device)
    try:
        if args.episodes < 1:
            raise ValueError(f"--episodes must be at least 1 (got {args.episodes})")
        ckpt = load_checkpoint(args.ckpt)
        known = {t["name"]: t for t in ckpt["tasks"]}
        names = resolve_tasks(args.tasks) if args.tasks else list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{args.ckpt} was not trained on {', '.join(unknown)} (it knows {', '.join(known)})")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    model = load_model(ckpt, device)
    start = time.perf_counter()
    results = evaluate_tasks(model, [known[n] for n in names], args.episodes, device)
    seconds = time.perf_counter() - start

    out = args.out or os.path.dirname(args.ckpt) or "."
    os.makedirs(out, exist_ok=True)
    table = format_results(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(ckpt=args.ckpt, episodes=args.episodes, results=results), f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Evaluation of `{args.ckpt}`, {args.episodes} episodes per task\n\n{table}\n")
    print(table)
    steps = sum(r["env_steps"] for r in results)
    model_s, env_s = sum(r["model_seconds"] for r in results), sum(r["env_seconds"] for r in results)
    print(f"{steps:,} env steps in {seconds:.0f} s: {steps / seconds:,.0f} env steps/s | "
          f"model {model_s / seconds:.0%}, simulator {env_s / seconds:.0%} of the time")
    print(f"wrote {out}/results.json, {out}/results.md")


if __name__ == "__main__":
    main(parse_args(Args, description=__doc__.split("\n")[0]))

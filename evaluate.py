"""Stage 4 of 4: closed-loop evaluation in the real environments, and the Continual-World metrics.

Reads a checkpoint: pretrain.py's, or finetune.py's (rebuilt from its pre-trained checkpoint plus what it trained).
Writes <out>/results.json and <out>/results.md (default out: <checkpoint's directory>/eval). finetune.py calls
write_sequence_report at the end of a run: metrics, tables, the success-matrix heatmap and each task's success
across the sequence (PNG). The episodes of a task run in lockstep, one env each, batched through
the model; the evaluation seeds are fixed, so every checkpoint meets the same object and goal placements.
No task id reaches the model unless the method is an oracle.

Examples:
  python evaluate.py --ckpt runs/pretrain/ckpt.pt --tasks reach-v3,push-v3 --episodes 10
  python evaluate.py --ckpt runs/l2m-cw10/ckpt.pt                 # the sequence's tasks, after the last task
  python evaluate.py --ckpt runs/l2m-cw10/ckpt.pt --tasks retain10 --out runs/l2m-cw10/retain10   # retention
  python evaluate.py --compare runs/ft-cw10,runs/l2m-cw10 --reference runs/l2m-oracle-cw10   # the results table
"""
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from collect import atomic_write, load_checkpoint, make_env, parse_args, resolve_tasks, write_text
from model import ActionTokenizer, DecisionTransformer, DTConfig, ModulationPool, resolve_device

EVAL_SEED = 10_000  # episode i of every task starts from reset(seed=EVAL_SEED + i): disjoint from collection seeds


@dataclass
class Args:
    ckpt: str = field(default="runs/pretrain/ckpt.pt", metadata={"help": "checkpoint to evaluate"})
    tasks: str = field(default="", metadata={"help": "tasks to evaluate (names or list names); empty = every task the checkpoint knows"})
    episodes: int = field(default=10, metadata={"help": "episodes per task"})
    out: str = field(default="", metadata={"help": "output directory; empty = <checkpoint's directory>/eval"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})
    compare: str = field(default="", metadata={"help": "comma-separated fine-tuning run directories (seeds of a method "
                         "may repeat it): instead of evaluating, write <out or runs>/comparison.md, one row per method"})
    reference: str = field(default="", metadata={"help": "with --compare: a run whose end-of-task success per task "
                           "(its diagonal, e.g. an l2m-oracle run) is the single-task reference for forward transfer"})


def build_model(ckpt, device):
    """The model of a checkpoint, in eval mode: a pre-training checkpoint as saved; a fine-tuning checkpoint as its
    pre-trained backbone (loaded from the path it points to) plus the pool or weights it trained."""
    if ckpt.get("kind") == "finetune":
        path = ckpt["pretrained"]["path"]
        base = load_checkpoint(path)
        if base["step"] != ckpt["pretrained"]["step"] or base["model_args"] != ckpt["model_args"]:
            raise ValueError(f"{path} is no longer the checkpoint this run was fine-tuned from "
                             f"(step {base['step']} vs {ckpt['pretrained']['step']}): regenerate it with the same pretrain.py command")
        model = build_model(base, device)
        if ckpt["pool_args"] is not None:
            model.pool = ModulationPool(model.cfg.n_layer, model.cfg.n_embd, **ckpt["pool_args"]).to(device)
        model.load_state_dict({**model.state_dict(), **ckpt["model"]})
        return model.eval()
    model = DecisionTransformer(DTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def known_tasks(ckpt):
    """Task name -> task entry for every task a checkpoint can be evaluated on (a fine-tuning run: the sequence
    and its pre-training tasks), and name -> oracle task id (the index in the sequence) where the method needs one."""
    if ckpt.get("kind") != "finetune":
        return {t["name"]: t for t in ckpt["tasks"]}, {}
    pretrained = load_checkpoint(ckpt["pretrained"]["path"])
    tasks = {**{t["name"]: t for t in pretrained["tasks"]}, **{t["name"]: t for t in ckpt["tasks"]}}
    oracle = {t["name"]: i for i, t in enumerate(ckpt["tasks"])} if ckpt["method"] == "l2m-oracle" else {}
    return tasks, oracle


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


# ---------------------------------------------------------------------------------------------------------
# Continual-World metrics (Wolczyk et al. 2021) and the report of a fine-tuning run


def continual_metrics(success, reference=None):
    """success[i][j]: success on task j after learning task i (a square matrix, tasks in sequence order).
    average = mean of the last row; forgetting = mean_j (S[j, j] - S[last, j]); forward transfer (with a
    single-task reference success per task) = mean_j (S[j, j] - ref_j). Continual World divides each task's gap by
    (1 - ref_j) of areas under learning curves; we have one 10-episode point per task, where ref_j is often 1.0
    (undefined) or 0.9 (one episode then counts 1.0), so the gap is left unnormalized (README deviation 11)."""
    S = np.asarray(success, dtype=float)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"the success matrix must be square (one row per learned task), got shape {S.shape}")
    metrics = dict(average=float(S[-1].mean()), forgetting=float(np.mean(np.diag(S) - S[-1])))
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        metrics["forward_transfer"] = float(np.mean(np.diag(S) - ref))
    return metrics


def routing_shares(results):
    """-> the pool entries any task used (U,), and each task's share of evaluation steps per such entry (tasks, U)."""
    counts = np.array([r["routing"] for r in results], dtype=float)  # (tasks, P)
    used = np.flatnonzero(counts.sum(0))
    return used, counts[:, used] / counts.sum(1, keepdims=True)


def routing_table(results):
    """Markdown: for each task, the share of its evaluation steps that selected each pool entry (entries used only)."""
    used, share = routing_shares(results)
    lines = ["| task | " + " | ".join(f"e{i}" for i in used) + " |", "|---|" + "---|" * len(used)]
    for r, row in zip(results, share):
        lines.append(f"| {r['task']} | " + " | ".join(f"{s:.2f}" if s > 0 else "" for s in row) + " |")
    return "\n".join(lines)


def sequence_report(ckpt):
    """The Continual-World table of a fine-tuning checkpoint: (metrics dict, markdown text)."""
    names = [t["name"] for t in ckpt["tasks"]]
    S = np.asarray(ckpt["success"])
    metrics = continual_metrics(S)
    final = ckpt["stages"][-1]["results"]
    metrics["final_step_success"] = float(np.mean([r["success_final"] for r in final]))
    header = "| after \\ on | " + " | ".join(n.removesuffix("-v3") for n in names) + " |"
    matrix = [header, "|---|" + "---|" * len(names)]
    for name, row in zip(names, S):
        matrix.append(f"| {name.removesuffix('-v3')} | " + " | ".join(f"{s:.1f}" for s in row) + " |")
    text = [f"# {ckpt['method']} on {len(names)} tasks", "",
            f"average success {metrics['average']:.2f} | forgetting {metrics['forgetting']:.2f} | "
            f"final-step success {metrics['final_step_success']:.2f} | trainable parameters {ckpt['trainable_params']:,}",
            "", "## Success matrix (row: after learning that task; column: evaluated task)", "", *matrix,
            "", "## After the last task", "", format_results(final)]
    if ckpt["pool_args"] is not None:
        text += ["", "## Routing after the last task (share of evaluation steps per pool entry)", "", routing_table(final)]
    return metrics, "\n".join(text) + "\n"


def retention(directory):
    """Mean success of `evaluate.py --tasks retain10 --out <directory>/retain10`, or None if it was not run."""
    path = os.path.join(directory, "retain10", "results.json")
    if not os.path.exists(path):
        return None
    return float(np.mean([r["success"] for r in json.load(open(path))["results"]]))


def load_run(run_dir):
    """The results.json of a finished fine-tuning run."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: is {run_dir} a finished finetune.py run?")
    return json.load(open(path))


# The paper's CW10 average success (40M model, 100k steps per task), as rendered in PSEC's Table 7 (Liu et al. 2025);
# the paper's own table was not at hand (../shared/REFERENCE.md, section 6).
PAPER_CW10_SUCCESS = {"l2m": 0.65, "l2m-oracle": 0.77, "ewc": 0.17, "l2": 0.10}
RUN_CONTROL = {"resume", "device", "run_dir"}  # finetune.py settings that place or continue a run, not its outcome
SEED_AND_PLACE = RUN_CONTROL | {"seed"}  # runs differing only in these are seeds of one setting


def compare_runs(run_dirs, reference_dir=""):
    """The results table across fine-tuning runs: one row per method and setting, mean ± std over its runs (seeds).
    Runs of one method whose settings differ get a row each, labelled with the settings that differ."""
    reference = np.diag(load_run(reference_dir)["success"]) if reference_dir else None
    runs = [(run_dir, load_run(run_dir)) for run_dir in run_dirs]

    def label(run):
        same_method = [r["args"] for _, r in runs if r["method"] == run["method"]]
        varying = sorted(k for k in set().union(*same_method)
                         if k not in SEED_AND_PLACE and len({repr(a.get(k)) for a in same_method}) > 1)
        return run["method"] + (" (" + ", ".join(f"{k}={run['args'].get(k)}" for k in varying) + ")" if varying else "")

    by_method, pretrained, commands = {}, set(), []
    for run_dir, run in runs:
        metrics = continual_metrics(run["success"], reference)
        row = dict(average=metrics["average"], forgetting=metrics["forgetting"],
                   forward_transfer=metrics.get("forward_transfer"), final_step=run["metrics"]["final_step_success"],
                   retention=retention(run_dir), params=run["trainable_params"],
                   minutes=sum(s["train_seconds"] + s["eval_seconds"] for s in run["stages"]) / 60,
                   paper=PAPER_CW10_SUCCESS.get(run["method"]) if run["args"].get("tasks") == "cw10" else None)
        name = label(run)
        by_method.setdefault(name, []).append(row)
        commands.append(f"- {name}, seed {run['args'].get('seed')}: `{run.get('command') or run_dir}`")
        pretrained.add(os.path.dirname(run["args"]["ckpt"]) or ".")

    def cell(rows, key, fmt="{:.2f}"):
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return "–"
        text = fmt.format(np.mean(values))
        text = text.lstrip("-") if float(text) == 0 else text  # -0.004 reads "0.00", not "-0.00"
        return text + (f" ± {fmt.format(np.std(values))}" if len(values) > 1 else "")

    columns = ["average success", "paper", "forgetting"] + (["forward transfer"] if reference is not None else []) + [
        "final-step success", "retention (retain10)", "trainable params", "wall time (min)"]
    lines = ["| method | runs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for method, rows in by_method.items():
        cells = [cell(rows, "average"), cell(rows[:1], "paper"), cell(rows, "forgetting")]
        cells += [cell(rows, "forward_transfer")] if reference is not None else []
        cells += [cell(rows, "final_step"), cell(rows, "retention"), f"{rows[0]['params']:,}", cell(rows, "minutes", "{:.0f}")]
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(cells) + " |")
    for directory in sorted(pretrained):
        retained = retention(directory)
        if retained is not None:
            lines.append(f"\nRetention (retain10) of the pre-trained model in {directory}: {retained:.2f}")
    return "\n".join(lines + ["", "Commands:", *commands]) + "\n"


def write_sequence_report(run_dir, ckpt):
    """results.json, results.md, success_matrix.png and success_curves.png of a (finished) fine-tuning run."""
    names = [t["name"] for t in ckpt["tasks"]]
    S = np.asarray(ckpt["success"])
    metrics, report = sequence_report(ckpt)
    write_text(os.path.join(run_dir, "results.json"), json.dumps(dict(
        method=ckpt["method"], tasks=names, success=S.tolist(), metrics=metrics, args=ckpt["args"], command=ckpt.get("command"),
        trainable_params=ckpt["trainable_params"], stages=ckpt["stages"]), indent=1))
    write_text(os.path.join(run_dir, "results.md"), report)

    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.5 * len(names)), max(4.0, 1.2 + 0.45 * len(names))))
    ax.imshow(S, vmin=0, vmax=1, cmap="viridis")
    short = [n.removesuffix("-v3") for n in names]
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), short, fontsize=7)
    ax.set_xlabel("evaluated task"), ax.set_ylabel("after learning")
    ax.set_title(f"{ckpt['method']}: success (avg {metrics['average']:.2f}, forgetting {metrics['forgetting']:.2f})", fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{S[i, j]:.1f}", ha="center", va="center", fontsize=6, color="w" if S[i, j] < 0.6 else "k")
    fig.tight_layout()
    with atomic_write(os.path.join(run_dir, "success_matrix.png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for j, name in enumerate(short):
        ax.plot(range(j, len(names)), S[j:, j], marker="o", ms=3, label=name)
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("after learning"), ax.set_ylabel("success"), ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    with atomic_write(os.path.join(run_dir, "success_curves.png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    if ckpt["pool_args"] is not None and ckpt["pool_args"]["pool_size"] > 1:  # routing after the last task
        used, share = routing_shares(ckpt["stages"][-1]["results"])
        fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.4 * len(used)), max(3.0, 1.2 + 0.35 * len(names))))
        ax.imshow(share, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(used)), [f"e{i}" for i in used], fontsize=7)
        ax.set_yticks(range(len(names)), short, fontsize=7)
        ax.set_xlabel("pool entry"), ax.set_ylabel("evaluated task")
        ax.set_title(f"{ckpt['method']}: share of evaluation steps per entry, after the last task", fontsize=8)
        for i in range(len(names)):
            for j in range(len(used)):
                if share[i, j] >= 0.005:
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="w" if share[i, j] < 0.6 else "k")
        fig.tight_layout()
        with atomic_write(os.path.join(run_dir, "routing.png")) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    return report


def main(args):
    device = resolve_device(args.device)
    if args.compare:
        try:
            table = compare_runs([d for d in args.compare.split(",") if d], args.reference)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"evaluate.py: error: {e}")
        out = args.out or "runs"
        os.makedirs(out, exist_ok=True)
        write_text(os.path.join(out, "comparison.md"), table)
        print(table + f"wrote {out}/comparison.md")
        return
    try:
        if args.episodes < 1:
            raise ValueError(f"--episodes must be at least 1 (got {args.episodes})")
        ckpt = load_checkpoint(args.ckpt)
        known, oracle_ids = known_tasks(ckpt)
        names = resolve_tasks(args.tasks) if args.tasks else [t["name"] for t in ckpt["tasks"]]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{args.ckpt} knows nothing of {', '.join(unknown)} (it knows {', '.join(known)})")
        if oracle_ids and any(n not in oracle_ids for n in names):
            raise ValueError("an l2m-oracle run needs a task id: evaluate only the tasks of its sequence")
        model = build_model(ckpt, device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    start = time.perf_counter()
    task_ids = [oracle_ids[n] for n in names] if oracle_ids else None
    results = evaluate_tasks(model, [known[n] for n in names], args.episodes, device, task_ids)
    seconds = time.perf_counter() - start

    out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "eval")
    os.makedirs(out, exist_ok=True)
    table = format_results(results)
    if model.pool is not None:
        table += "\n\nRouting (share of evaluation steps per pool entry):\n\n" + routing_table(results)
    write_text(os.path.join(out, "results.json"), json.dumps(dict(ckpt=args.ckpt, episodes=args.episodes, results=results), indent=1))
    write_text(os.path.join(out, "results.md"), f"# Evaluation of `{args.ckpt}`, {args.episodes} episodes per task\n\n{table}\n")
    if ckpt.get("kind") == "finetune":  # the run's Continual-World table, from the evaluations made during it
        print(sequence_report(ckpt)[1])
        print(f"Re-evaluated now, {args.episodes} episodes per task:\n")
    print(table)
    steps = sum(r["env_steps"] for r in results)
    model_s, env_s = sum(r["model_seconds"] for r in results), sum(r["env_seconds"] for r in results)
    print(f"{steps:,} env steps in {seconds:.0f} s: {steps / seconds:,.0f} env steps/s | "
          f"model {model_s / seconds:.0%}, simulator {env_s / seconds:.0%} of the time")
    print(f"wrote {out}/results.json, {out}/results.md")


if __name__ == "__main__":
    main(parse_args(Args, description=__doc__.split("\n")[0]))

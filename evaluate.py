"""Stage 4 of 4: closed-loop evaluation in the real environments, and the Continual-World metrics.

Reads a checkpoint: pretrain.py's, or finetune.py's (rebuilt from its pre-trained checkpoint plus what it trained).
Writes <out>/results.json and <out>/results.md (default out: <checkpoint's directory>/eval). finetune.py calls
write_sequence_report at the end of a run: metrics, tables, the success-matrix heatmap and each task's success
across the sequence (PNG). The episodes of a task run in lockstep, one env each, batched through the model, the
envs stepped in as many processes as torch has threads (EvalEnvs); the evaluation seeds are fixed, so every
checkpoint meets the same object and goal placements.
No task id reaches the model unless the method is an oracle.

Examples:
  python evaluate.py --ckpt runs/pretrain/ckpt.pt --tasks reach-v3,push-v3 --episodes 10
  python evaluate.py --ckpt runs/l2m-cw10-s0/ckpt.pt               # the sequence's tasks, after the last task
  python evaluate.py --ckpt runs/l2m-cw10-s0/ckpt.pt --tasks retain10 --out runs/l2m-cw10-s0/retain10   # retention
  python evaluate.py --compare runs/ft-cw10-s0,runs/l2m-cw10-s0 --reference runs/l2m-oracle-cw10-s0  # the table
"""

import glob
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from collect import (
    PRECISIONS,
    check_output,
    file_sha256,
    horizon,
    is_metaworld,
    keep_freed_memory,
    load_checkpoint,
    lock_folder,
    make_env,
    parse_args,
    pyplot,
    resolve_device,
    resolve_tasks,
    run_stage,
    save_figure,
    use_bf16,
    watch_parent,
    write_text,
)
from model import ActionTokenizer, DecisionTransformer

EVAL_SEED = 10_000  # episode i of every task starts from reset(seed=EVAL_SEED + i): disjoint from collection seeds


@dataclass
class Args:
    ckpt: str = "runs/pretrain/ckpt.pt"
    """checkpoint to evaluate"""
    tasks: str = ""
    """tasks to evaluate (names or list names); empty = every task the checkpoint knows"""
    episodes: int = 10
    """episodes per task [>= 1]"""
    out: str = ""
    """output directory; empty = <checkpoint's directory>/eval"""
    device: str = "auto"
    """auto (cuda, else mps, else cpu), cpu, cuda or mps"""
    precision: str = "auto"
    """auto | bf16 | fp32: the model's arithmetic while acting; auto = bf16 autocast where the hardware has it, else
    fp32 (faster, with the same success on paired episodes: docs/performance.md)"""
    backbone: str = ""
    """a fine-tuning run's pre-trained checkpoint, if it is no longer where the run found it (its hash is checked)"""
    bench: bool = False
    """time the evaluation against stepping the same envs with the same actions and no model; prints the ratio,
    writes nothing"""
    compare: str = ""
    """comma-separated fine-tuning run directories or quoted patterns ('runs/*-cw10-s*'; seeds of a method may repeat
    it): instead of evaluating, write <out or runs>/comparison.md, one row per method"""
    reference: str = ""
    """with --compare: a run of the same sequence (e.g. l2m-oracle) whose end-of-task successes each run's are
    compared to (the 'gap to' column)"""
    allow_mixed: bool = False
    """with --compare: put runs of different task sequences or backbones in one table (each row then names its
    own); without it they are refused"""
    single: str = ""
    """with --compare: comma-separated one-task runs of one method and budget, from the same backbone (e.g. 'runs/
    single/ft-*'): the per-task table gets their score beside the data's own (the ceiling of each task)"""
    scaling: str = ""
    """quoted pattern of pretrain.py --branch-from folders, each with its retain10/ evaluation and any cw10-<method>/
    runs ('runs/scale/d128/b*'): instead of evaluating, write one point file per folder to --out, and the curve of
    every point there (scaling.md, scaling.png)"""
    ms_per_step: float = 0.0
    """with --scaling: the shape's step time (pretrain.py --bench), which turns steps into pre-training hours [>= 0]"""


GROUPS = {"evaluate a checkpoint": "ckpt", "compare fine-tuning runs": "compare", "a scaling curve": "scaling"}


def backbone_path(ckpt, ckpt_path, override=""):
    """Where a fine-tuning run's pre-trained checkpoint is: `override` (--backbone) if given, else where it lies
    relative to the run (so a moved or copied project still finds it), else the absolute path it had."""
    stored = ckpt["pretrained"]
    relative = os.path.join(os.path.dirname(ckpt_path), stored["relpath"]) if "relpath" in stored else ""
    return override or (relative if os.path.exists(relative) else stored["path"])


def load_backbone(ckpt, path):
    """A fine-tuning run's pre-trained checkpoint, read from `path` and checked to be the one the run started from
    (by content: step, config and sha256)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"this run's pre-trained checkpoint {path} is missing: --backbone points to it")
    base = load_checkpoint(path, kinds=("pretrain",))
    same = base["step"] == ckpt["pretrained"]["step"] and base["model_args"] == ckpt["model_args"]
    recorded = ckpt["pretrained"].get("sha256")  # runs made before the hash was recorded: step and config only
    if not same or (recorded is not None and recorded != file_sha256(path)):
        raise ValueError(
            f"{path} is no longer the checkpoint this run was fine-tuned from (its content changed): "
            f"put that checkpoint back, or fine-tune again from this one"
        )
    return base


def build_model(ckpt, device, base=None):
    """The model of a checkpoint, in eval mode: a pre-training checkpoint as saved; a fine-tuning checkpoint as its
    pre-trained backbone (`base`, default: read from the absolute path it had) plus the pool or weights it trained."""
    if ckpt.get("kind") == "finetune":
        base = base or load_backbone(ckpt, ckpt["pretrained"]["path"])
        return DecisionTransformer.from_checkpoint(base, ckpt).to(device)
    return DecisionTransformer.from_checkpoint(ckpt).to(device)


def method_row(run):
    """A fine-tuning run's (checkpoint's or results.json's) row of finetune.METHODS: how it trains and is evaluated."""
    from finetune import METHODS  # here, not at the top: finetune.py imports this module

    return METHODS[run["method"]]


def known_tasks(ckpt, base=None):
    """Task name -> task entry for every task a checkpoint can be evaluated on (a fine-tuning run: the sequence
    and its pre-training tasks, from its backbone `base`), and name -> oracle task id (the index in the sequence)
    where the method needs one."""
    if ckpt.get("kind") != "finetune":
        return {t["name"]: t for t in ckpt["tasks"]}, {}
    base = base or load_backbone(ckpt, ckpt["pretrained"]["path"])
    tasks = {**{t["name"]: t for t in base["tasks"]}, **{t["name"]: t for t in ckpt["tasks"]}}
    oracle = {t["name"]: i for i, t in enumerate(ckpt["tasks"])} if method_row(ckpt).told_task_id else {}
    return tasks, oracle


_ENVS = {}  # (task, episode index) -> environment, built once per process and reused by every evaluation


def eval_env(name, i):
    """Episode i's environment of a task. Building a Meta-World env costs as much as hundreds of steps, so a
    fine-tuning run reuses them across its evaluations; reset(seed=...) makes a reused env equal a fresh one."""
    if (name, i) not in _ENVS:
        _ENVS[name, i] = make_env(name, seed=EVAL_SEED + i)
    return _ENVS[name, i]


def reset_envs(specs):
    """specs [(task, episode index)]: their envs (eval_env), reset to each episode's seed -> first observations."""
    return [eval_env(name, i).reset(seed=EVAL_SEED + i)[0] for name, i in specs]


def step_envs(specs, actions):
    """One step of each env with its action -> [(observation, reward, success after the step)]."""
    steps = [eval_env(name, i).step(action) for (name, i), action in zip(specs, actions)]
    return [(obs, reward, bool(info.get("success", False))) for obs, reward, _, _, info in steps]


def env_worker(conn, parent_pid):
    """A process that holds envs for evaluations: runs each (function, args) it receives, answers with the result
    (or the exception it raised); it ends with the process that started it. A forked worker inherits its parent's
    signal handlers: the defaults come back, so the SIGTERM that ends a worker at exit does not run the parent's
    handler (a finished run's log once ended in "stopped by SIGTERM"), and Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid, lambda: os._exit(1))
    while True:
        function, args = conn.recv()
        try:
            conn.send((True, function(*args)))
        except Exception as e:
            conn.send((False, e))


_WORKERS = []  # (process, connection) of the env workers started so far; they live as long as this process


def env_workers(n):
    """n env worker processes, started on first use and kept, so their envs too are reused across evaluations.
    On Linux they are forked: ready at once, where a fresh interpreter (spawn, elsewhere) spends over a second
    importing torch before it builds an env. The stages start them before running any torch computation, so no
    thread pool of torch's is forked half-way (the workers only ever step envs)."""
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    while len(_WORKERS) < n:
        here, there = ctx.Pipe()
        process = ctx.Process(target=env_worker, args=(there, os.getpid()), daemon=True)
        process.start()
        _WORKERS.append((process, here))
    return [conn for _, conn in _WORKERS[:n]]


class EvalEnvs:
    """The envs of a rollout, spread over `processes` processes that step them side by side: env n lives in
    process n % processes, this one being process 0 and the others env workers. Stepping Meta-World is mostly
    Python (its reward code), so threads would take turns on the GIL; processes do not. With 1 process, all envs
    are stepped here."""

    def __init__(self, specs, processes=1):
        self.specs = specs  # [(task, episode index)], one per env
        P = max(1, min(processes, len(specs)))
        self.shards = [list(range(p, len(specs), P)) for p in range(P)]  # the envs of each process
        self.workers = env_workers(P - 1)

    def run(self, function, values=None):
        """function(its envs' specs[, their values]) in every process at once -> one result per env, in env order."""
        jobs = [([self.specs[n] for n in shard],) for shard in self.shards]
        if values is not None:
            jobs = [(specs, [values[n] for n in shard]) for (specs,), shard in zip(jobs, self.shards)]
        for conn, job in zip(self.workers, jobs[1:]):
            conn.send((function, job))
        parts = [function(*jobs[0])]
        for conn in self.workers:
            try:
                ok, part = conn.recv()
            except (EOFError, ConnectionError):
                raise RuntimeError("an env worker process died during an evaluation") from None
            if not ok:
                raise part
            parts.append(part)
        results = [None] * len(self.specs)
        for shard, part in zip(self.shards, parts):
            for n, result in zip(shard, part):
                results[n] = result
        return results


@torch.no_grad()
def empty_window(N, cfg, device):
    """The context window of N envs, all padding: (states, returns-to-go, action bins, rewards, timesteps, step
    mask), each (N, K, ...); filled from the right, the last slot is the current timestep."""
    K = cfg.context_len
    return (
        torch.zeros(N, K, cfg.state_dim, device=device),
        torch.zeros(N, K, device=device),
        torch.full((N, K, cfg.act_dim), cfg.n_bins, dtype=torch.long, device=device),
        torch.zeros(N, K, device=device),
        torch.zeros(N, K, dtype=torch.long, device=device),
        torch.zeros(N, K, dtype=torch.bool, device=device),
    )


def slide(window, n_bins):
    """Shift every buffer of the window one slot to the left, in place, and pad the last slot."""
    for buffer, pad in zip(window, (0.0, 0.0, n_bins, 0.0, 0, False)):
        buffer[:, :-1] = buffer[:, 1:].clone()
        buffer[:, -1] = pad


def score(tasks, env_task, env_steps, success_last, success_any, total_return, routing, inferred):
    """Per task, over its envs: success at the last step and at any step (DMControl, without success: the
    data-normalized score in both), returns, routing counts and (l2m-stats) inferred task ids. -> results."""
    results = []
    for j, task in enumerate(tasks):
        mine = env_task == j
        success = float(success_last[mine].mean()), float(success_any[mine].mean())
        if not is_metaworld(task["name"]):  # no success signal: the paper's DMControl metric in both places
            span = task["data_return"] - task["random_return"]  # data no better than random: no scale, NaN
            normalized = (total_return[mine].mean() - task["random_return"]) / span if span > 0 else float("nan")
            success = float(normalized), float(normalized)
        results.append(
            dict(
                task=task["name"],
                episodes=int(mine.sum()),
                success=success[0],
                success_any=success[1],
                mean_return=float(total_return[mine].mean()),
                returns=total_return[mine].tolist(),
                routing=routing[j].tolist(),
                env_steps=env_steps,
                **(dict(inferred=inferred[j].tolist()) if inferred is not None else {}),
            )
        )
    return results


def rollout(model, tasks, episodes, device, task_ids=None, bf16=False, env_processes=1):
    """Roll out `episodes` episodes of each task, all in lockstep, one env each, batched through the model; the
    envs are stepped in `env_processes` processes side by side (EvalEnvs).
    tasks: checkpoint task entries (name, act_dim, reward_scale, target_return) of one horizon. task_ids: the
    oracle's task id per task, or None. bf16: act under bf16 autocast (task inference stays fp32). -> per task:
    success at the last step (the paper's metric) and at any step (Continual World's), returns, routing counts
    (l2m-stats: also the steps given to each inferred task id); and a timing dict: seconds spent building envs, in
    the model and stepping, and every env's actions (for --bench).
    DMControl has no success: both hold the paper's metric there, the data-normalized score
    (R - R_random) / (R_data - R_random), 0 for random actions, 1 for the data's mean."""
    cfg = model.cfg
    N = episodes * len(tasks)
    env_task = np.repeat(np.arange(len(tasks)), episodes)  # (N,): env n plays task n // episodes, episode n % episodes
    start = time.perf_counter()
    envs = EvalEnvs([(tasks[j]["name"], n % episodes) for n, j in enumerate(env_task)], env_processes)
    obs = envs.run(reset_envs)
    build_seconds = time.perf_counter() - start
    length, act_dim = horizon(tasks[0]["name"]), max(task["act_dim"] for task in tasks)
    scale = torch.tensor([tasks[j]["reward_scale"] for j in env_task], device=device)  # (N,)
    tokenizer = ActionTokenizer(cfg.n_bins)
    window = empty_window(N, cfg, device)
    states, returns, bins, rewards, timesteps, step_mask = window
    return_to_go = torch.tensor([tasks[j]["target_return"] for j in env_task], device=device) / scale  # (N,)
    dims = torch.tensor([tasks[j]["act_dim"] for j in env_task], device=device)  # (N,): each env's own action dims
    own_dims = torch.arange(act_dim, device=device) < dims[:, None]  # (N, act_dim)
    ids = None if task_ids is None else torch.as_tensor(np.asarray(task_ids)[env_task], device=device)  # (N,)
    infer = ids is None and model.pool is not None and model.pool.tasks is not None  # l2m-stats: no task id given
    if infer:
        query_sum = torch.zeros(N, cfg.n_embd, device=device)  # (N, C): the episode's queries so far, summed
        inferred = np.zeros((len(tasks), model.pool.n_groups), np.int64)  # steps of each task given to each task id

    total_return, success_any, success_last = np.zeros(N), np.zeros(N, bool), np.zeros(N, bool)
    routing = np.zeros((len(tasks), model.pool.size if model.pool is not None else 0), np.int64)
    actions_taken = np.zeros((length, N, act_dim), np.float32)
    model_seconds = env_seconds = 0.0
    merged = {}  # L2M: pool entries folded into the weights they modulate, as they come up (model.act)
    for t in range(length):
        slide(window, cfg.n_bins)  # then the current step (state, return-to-go, timestep) goes into the last slot
        for n, o in enumerate(obs):
            states[n, -1, : len(o)] = torch.from_numpy(o)
        returns[:, -1], timesteps[:, -1], step_mask[:, -1] = return_to_go, t, True

        start = time.perf_counter()
        if infer:  # l2m-stats: the task of the episode, inferred from the running mean of its queries (one per step)
            query_sum += model.query(model.embed(states, returns, bins, rewards, timesteps), step_mask)
            ids = model.pool.tasks.infer(query_sum / (t + 1))  # (N,)
            np.add.at(inferred, (env_task, ids.cpu().numpy()), 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            action_bins, route = model.act(
                states, returns, bins, rewards, timesteps, step_mask, act_dim, ids, merged=merged
            )
        actions_taken[t] = tokenizer.decode(action_bins).cpu().numpy()  # (N, act_dim) bin centres
        model_seconds += time.perf_counter() - start
        if route is not None:
            np.add.at(routing, (env_task[:, None], route["index"].view(N, -1).cpu().numpy()), 1)  # L2P: top-k each

        start = time.perf_counter()
        own_actions = [actions_taken[t, n, : tasks[j]["act_dim"]] for n, j in enumerate(env_task)]
        stepped = envs.run(step_envs, own_actions)  # [(observation, reward, success)], one per env
        obs = [o for o, _, _ in stepped]
        step_rewards = np.array([r for _, r, _ in stepped], np.float32)
        success_last = np.array([s for _, _, s in stepped])
        env_seconds += time.perf_counter() - start
        success_any |= success_last
        total_return += step_rewards

        bins[:, -1, :act_dim] = action_bins.masked_fill(
            ~own_dims, cfg.n_bins
        )  # other dims stay padding, as in the data
        rewards[:, -1] = torch.as_tensor(step_rewards, device=device) / scale
        return_to_go = return_to_go - rewards[:, -1]  # R_{t+1} = R_t - r_t / scale
    results = score(tasks, env_task, episodes * length, success_last, success_any, total_return, routing,
                    inferred if infer else None)  # fmt: skip
    timing = dict(build_seconds=build_seconds, model_seconds=model_seconds, env_seconds=env_seconds, tasks=tasks,
                  episodes=episodes, actions=actions_taken)  # fmt: skip
    return results, timing


def evaluate_tasks(model, tasks, episodes, device, task_ids=None, timings=None, bf16=False, env_processes=1):
    """Evaluate several tasks: the tasks of one horizon (Meta-World 200 steps, DMControl 1000) run in lockstep.
    task_ids only for the methods told the task id (l2m-oracle, packnet). timings: a list that receives each rollout's
    timing. bf16: act under bf16 autocast. env_processes: processes stepping the envs (EvalEnvs). -> per-task
    results."""
    if model.owners is not None and task_ids is not None:  # PackNet: each task with its own weights, one by one
        results = []
        for task, task_id in zip(tasks, task_ids):
            with model.weights_of_task(task_id):
                results += evaluate_tasks(model, [task], episodes, device, None, timings, bf16, env_processes)
        return results
    results = [None] * len(tasks)
    for length in sorted({horizon(t["name"]) for t in tasks}):
        group = [i for i, t in enumerate(tasks) if horizon(t["name"]) == length]
        ids = None if task_ids is None else [task_ids[i] for i in group]
        group_results, timing = rollout(model, [tasks[i] for i in group], episodes, device, ids, bf16, env_processes)
        for i, r in zip(group, group_results):
            results[i] = r
        if timings is not None:
            timings.append(timing)
    return results


def replay_seconds(timing):
    """Seconds to step the envs of a rollout with the actions it took, without the model: the floor that an
    evaluation's wall time is measured against (--bench)."""
    tasks, episodes, actions = timing["tasks"], timing["episodes"], timing["actions"]  # actions (horizon, N, A)
    specs = [(task["name"], i) for task in tasks for i in range(episodes)]  # the rollout's envs, in its order
    reset_envs(specs)
    envs = [eval_env(name, i) for name, i in specs]
    act_dims = [task["act_dim"] for task in tasks for _ in range(episodes)]
    start = time.perf_counter()
    for step_actions in actions:
        for env, action, act_dim in zip(envs, step_actions, act_dims):
            env.step(action[:act_dim])
    return time.perf_counter() - start


def metric_name(names):
    """What a run's "success" numbers are: success at the last step (Meta-World), the data-normalized score
    (DMControl, which has no success signal), or both."""
    domains = {is_metaworld(n) for n in names}
    if domains == {False}:
        return "normalized score"
    return "success (last step)" if domains == {True} else "success (last step) or normalized score (DMControl)"


def format_results(results):
    """A markdown table of per-task results, with a mean row. Success at the last step is the paper's metric
    (DMControl: the normalized score, with no any-step column)."""
    header = f"| task | {metric_name([r['task'] for r in results])} | success (any step) | mean return |"
    lines = [header, "|---|---|---|---|"]
    for r in results:
        any_step = f"{r['success_any']:.2f}" if is_metaworld(r["task"]) else "–"
        lines.append(f"| {r['task']} | {r['success']:.2f} | {any_step} | {r['mean_return']:.1f} |")
    lines.append(
        f"| **mean** | **{np.mean([r['success'] for r in results]):.2f}** | "
        f"{np.mean([r['success_any'] for r in results]):.2f} | |"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Continual-World metrics (Wolczyk et al. 2021) and the report of a fine-tuning run


def continual_metrics(success, reference=None):
    """success[i][j]: success on task j after learning task i (a square matrix, tasks in sequence order).
    average = mean of the last row; forgetting = mean_j (S[j, j] - S[last, j]). With a reference success per task
    (e.g. the diagonal of an l2m-oracle run): gap_to_reference = mean_j (S[j, j] - ref_j), the end-of-task gap.
    It is not Continual World's forward transfer, which needs single-task runs' learning curves
    (docs/deviations.md, 11)."""
    S = np.asarray(success, dtype=float)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"the success matrix must be square (one row per learned task), got shape {S.shape}")
    metrics = dict(average=float(S[-1].mean()), forgetting=float(np.mean(np.diag(S) - S[-1])))
    if reference is not None:
        metrics["gap_to_reference"] = float(np.mean(np.diag(S) - np.asarray(reference, dtype=float)))
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


def routing_accuracy(stages):
    """Per task j, how well its evaluation steps found what it learned, right after learning it (stage j) and after
    the last task: with task inference (l2m-stats), the share of its steps given its own task id; otherwise the
    share of its steps that went to the entries that took at least 10% of them at stage j (its own entries, as far
    as evaluation shows them: which entries a task trained is not recorded). -> (name, at stage j, at the end)."""
    rows = []
    for j, stage in enumerate(stages):
        own, final = stage["results"][j], stages[-1]["results"][j]
        if "inferred" in own:
            at_stage, at_end = (r["inferred"][j] / sum(r["inferred"]) for r in (own, final))
        else:
            mine = np.asarray(own["routing"]) >= 0.1 * sum(own["routing"])  # (P,)
            at_stage, at_end = (np.asarray(r["routing"])[mine].sum() / sum(r["routing"]) for r in (own, final))
        rows.append((own["task"], float(at_stage), float(at_end)))
    return rows


def success_matrix_table(names, S):
    header = "| after \\ on | " + " | ".join(n.removesuffix("-v3") for n in names) + " |"
    lines = [header, "|---|" + "---|" * len(names)]
    for name, row in zip(names, S):
        lines.append(f"| {name.removesuffix('-v3')} | " + " | ".join(f"{s:.1f}" for s in row) + " |")
    return "\n".join(lines)


def sequence_report(ckpt):
    """The Continual-World table of a fine-tuning checkpoint: (metrics dict, markdown text). The headline is success
    at the last step of an episode (the paper's metric); success at any step (Continual World's) is beside it."""
    names = [t["name"] for t in ckpt["tasks"]]
    S, S_any = np.asarray(ckpt["success"]), np.asarray(ckpt["success_any"])
    metrics = continual_metrics(S)
    any_step = continual_metrics(S_any)
    metrics.update(average_any=any_step["average"], forgetting_any=any_step["forgetting"])
    final = ckpt["stages"][-1]["results"]
    metric = metric_name(names)
    any_step = (
        [] if metric == "normalized score" else ["## Success at any step", "", success_matrix_table(names, S_any), ""]
    )
    text = [
        f"# {ckpt['method']} on {len(names)} tasks",
        "",
        f"average {metric} {metrics['average']:.2f} (any step {metrics['average_any']:.2f}) | "
        f"forgetting {metrics['forgetting']:.2f} (any step {metrics['forgetting_any']:.2f}) | "
        f"trainable parameters {ckpt['trainable_params']:,}",
        "",
        f"## {metric[0].upper() + metric[1:]} (row: after "
        + (
            "each 1/N of the training on all tasks (multitask); forgetting means nothing here"
            if method_row(ckpt).batches == "all"
            else "learning that task"
        )
        + "; column: evaluated task)",
        "",
        success_matrix_table(names, S),
        "",
        *any_step,
        "## After the last task",
        "",
        format_results(final),
    ]
    if ckpt["pool_args"] is not None:
        text += [
            "",
            "## Routing after the last task (share of evaluation steps per pool entry)",
            "",
            routing_table(final),
        ]
    if ckpt["pool_args"] is not None and ckpt["pool_args"]["pool_size"] > 1 and not method_row(ckpt).told_task_id:
        inferred = "inferred" in final[0]
        text += [
            "",
            "## Routing accuracy: "
            + (
                "the share of each task's evaluation steps given its own task id (inferred)"
                if inferred
                else "the share of each task's evaluation steps that went to the entries it used right after it was "
                "learned (those with at least 10% of its steps then)"
            ),
            "",
            "| task | right after learning it | after the last task |",
            "|---|---|---|",
            *(f"| {name} | {a:.2f} | {b:.2f} |" for name, a, b in routing_accuracy(ckpt["stages"])),
        ]
    return metrics, "\n".join(text) + "\n"


def read_json(path):
    """A JSON file, or an error that names it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def retention(directory, subset="retain10"):
    """Mean success (last step, any step) of `evaluate.py --tasks <subset> --out <directory>/<subset>`, or None.
    subset: retain10 (Meta-World) or retaindmc5 (DMControl, where both are the normalized score)."""
    path = os.path.join(directory, subset, "results.json")
    if not os.path.exists(path):
        return None
    results = read_json(path)["results"]
    return float(np.mean([r["success"] for r in results])), float(np.mean([r["success_any"] for r in results]))


def load_run(run_dir):
    """The results.json of a finished fine-tuning run, checked against the checkpoint beside it (if any): results
    of an earlier run that a newer one in the same folder has not yet replaced are refused."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: is {run_dir} a finished finetune.py run?")
    run = read_json(path)
    missing = {"method", "tasks", "success", "success_any", "args", "setting", "stages"} - set(run)
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(sorted(missing))}: not a results.json of this version of finetune.py"
        )
    beside = os.path.join(run_dir, "ckpt.pt")
    if run.get("ckpt_sha256") and os.path.exists(beside) and file_sha256(beside) != run["ckpt_sha256"]:
        raise ValueError(
            f"{path} belongs to an earlier checkpoint than {beside} (a newer run there has not finished): "
            "finish it with finetune.py --resume, or compare other runs"
        )
    return run


def backbone_of(run):
    """What a run modulated: its backbone's content hash (older results.json: the path it was loaded from)."""
    return run.get("backbone_sha256") or "path " + os.path.normpath(run["setting"]["ckpt"])


# The paper's CW10 average success at the last step (40M model, 100k steps per task): Schmied et al. 2023, as
# rendered in PSEC's Table 7 (Liu et al. 2025, arXiv 2502.05932); the metric is the authors' eval callback
# (src/callbacks/custom_eval_callback.py in ml-jku/L2M), which reads info["success"] when the episode ends.
RETENTION_SUBSETS = ("retain10", "retaindmc5")  # evaluate.py --tasks <subset> --out <run>/<subset>: read by --compare
PAPER_CW10_SUCCESS = {
    "l2m": 0.65,
    "l2m-oracle": 0.77,
    "l2p-pv2": 0.40,
    "l2p-pret": 0.34,
    "l2p-pt": 0.23,
    "ewc": 0.17,
    "l2": 0.10,
}


def check_comparable(runs):
    """Raise ValueError naming two runs (of [(folder, run)]) that learned different sequences or from different
    backbones (by content): their averages cannot be put side by side."""
    first_dir, first = runs[0]
    for odd_dir, odd in runs:
        if (tuple(odd["tasks"]), backbone_of(odd)) != (tuple(first["tasks"]), backbone_of(first)):
            what = "task sequence" if odd["tasks"] != first["tasks"] else "backbone"
            raise ValueError(
                f"{odd_dir} and {first_dir} differ in their {what} (put side by side only with --allow-mixed, which "
                "labels each row with its own)"
            )


def run_row(run_dir, run, reference):
    """One run's numbers for the table: Continual-World metrics (reference: the oracle's end-of-task success, for
    the gap), retention, size, time, and per task the success right after learning it and after the last task."""
    metrics = continual_metrics(run["success"], reference)
    retained = retention(run_dir) or (None, None)
    retained_dmc = retention(run_dir, "retaindmc5") or (None, None)
    by_stage = method_row(run).batches == "all"  # multitask: its rows are stages, not tasks
    return dict(
        average=metrics["average"],
        average_any=continual_metrics(run["success_any"])["average"],
        forgetting=None if by_stage else metrics["forgetting"],
        gap=metrics.get("gap_to_reference"),
        retention=retained[0],
        retention_any=retained[1],
        retention_dmc=retained_dmc[0],
        params=run["trainable_params"],
        minutes=sum(s["train_seconds"] + s["eval_seconds"] for s in run["stages"]) / 60,
        paper=PAPER_CW10_SUCCESS.get(run["method"]) if run["setting"].get("tasks") == "cw10" else None,
        end_of_task=np.diag(run["success"]),  # (tasks,): each task right after it was learned
        final=np.array(run["success"][-1]),  # (tasks,): each task after the last one
    )


def backbone_dir(run_dir, run):
    """The folder whose retention results evaluated this run's backbone (beside the run, e.g. runs/pretrain, or the
    backbone's own), or None."""
    backbone = os.path.normpath(run["setting"]["ckpt"])
    beside = os.path.join(os.path.dirname(os.path.normpath(run_dir)), "pretrain")
    for directory in (beside, os.path.dirname(backbone)):
        paths = [os.path.join(directory, subset, "results.json") for subset in RETENTION_SUBSETS]
        if any(os.path.exists(p) and os.path.normpath(read_json(p)["ckpt"]) == backbone for p in paths):
            return directory
    return None


def cell(rows, key, fmt="{:.2f}"):
    """A table cell: the mean of rows' key, ± the standard deviation over the rows (population) where several."""
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "–"
    return number(np.mean(values), fmt) + (f" ± {fmt.format(np.std(values))}" if len(values) > 1 else "")


def number(value, fmt="{:.2f}"):
    """value as text, -0.004 as "0.00", not "-0.00"."""
    text = fmt.format(value)
    return text.lstrip("-") if float(text) == 0 else text


def per_task_table(by_method, tasks, dmc_only, data_scores=None, single=None):
    """Lines of a table: per task and method, success right after learning the task → after the last task; before
    them, where known, the ceiling of each task: the data's own score (DMControl: mean / best 10% of its
    episodes, {task: [mean, best]}) and one-task runs' (single: (label, {task: score}))."""
    ceiling = (["data: mean / best 10%"] if data_scores else []) + ([single[0]] if single else [])
    lines = [
        "",
        f"Per task, {'the normalized score' if dmc_only else 'success at the last step'} (mean over runs): "
        "right after learning it | after the last task",
        "",
        "| task | " + " | ".join(ceiling + list(by_method)) + " |",
        "|---|" + "---|" * (len(ceiling) + len(by_method)),
    ]
    for i, task in enumerate(tasks):
        cells = ["{:.2f} / {:.2f}".format(*data_scores[task]) if task in data_scores else "–"] if data_scores else []
        cells += [f"{single[1][task]:.2f}" if task in single[1] else "–"] if single else []
        pairs = [np.mean([r[k][i] for r in rows]) for rows in by_method.values() for k in ("end_of_task", "final")]
        cells += [f"{number(pairs[2 * m])} → {number(pairs[2 * m + 1])}" for m in range(len(by_method))]
        lines.append(f"| {task.removesuffix('-v3')} | " + " | ".join(cells) + " |")
    return lines


def single_task_scores(run_dirs, backbone, allow_mixed):
    """--single: one-task runs of one method and budget -> (column label, {task: score, the mean over its runs})."""
    runs = [(run_dir, load_run(run_dir)) for run_dir in run_dirs]
    kinds = {(run["method"], run["setting"].get("steps_per_task")) for _, run in runs}
    for run_dir, run in runs:
        if len(run["tasks"]) != 1 or len(kinds) > 1:
            raise ValueError(f"--single {run_dir}: expected one-task runs of one method and --steps-per-task")
        if backbone_of(run) != backbone and not allow_mixed:
            raise ValueError(f"--single {run_dir} fine-tuned another backbone than the runs compared (--allow-mixed)")
    (method, steps), scores = kinds.pop(), {}
    for _, run in runs:
        scores.setdefault(run["tasks"][0], []).append(run["success"][0][0])
    label = f"single-task {method}" + (f" ({steps:,} steps)" if steps else "")
    return label, {task: float(np.mean(v)) for task, v in scores.items()}


LOST = 0.2  # a task whose score fell by more than this after it was learned is named per run (a seed's collapse)


def lost_tasks(run, row):
    """A run's forgetting and each task it lost by more than LOST: "0.08 (ball_in_cup-catch 0.78 → 0.25)"."""
    lost = [
        f"{task.removesuffix('-v3')} {number(before)} → {number(after)}"
        for task, before, after in zip(run["tasks"], row["end_of_task"], row["final"])
        if before - after > LOST
    ]
    return number(row["forgetting"]) + (f" ({', '.join(lost)})" if lost else "")


def compare_runs(run_dirs, reference_dir="", allow_mixed=False, single_dirs=()):
    """The results table across fine-tuning runs: one row per method and setting, mean ± std over its runs (seeds).
    Runs of one method whose settings differ get a row each, labelled with the settings that differ. Every run
    (and the reference) must have learned the same sequence from the same backbone (by content), unless
    allow_mixed: then runs of different sequences or backbones are never averaged together, and each row says its
    own. A run named twice counts once. single_dirs: one-task runs for the per-task table (single_task_scores)."""
    runs = [(run_dir, load_run(run_dir)) for run_dir in {os.path.realpath(d): d for d in run_dirs}.values()]
    ref_run = load_run(reference_dir) if reference_dir else None
    everything = runs + ([(f"--reference {reference_dir}", ref_run)] if ref_run else [])
    sequences = {tuple(r["tasks"]) for _, r in everything}
    backbones = {backbone_of(r) for _, r in everything}
    if not allow_mixed:
        check_comparable(everything)
    reference = np.diag(ref_run["success"]) if ref_run else None

    def label(run):
        same_method = [r["setting"] for _, r in runs if r["method"] == run["method"]]
        shared = set.intersection(*(set(s) for s in same_method))  # a flag newer than a run: it ran at its default
        varying = sorted(k for k in shared if len({repr(s[k]) for s in same_method}) > 1)
        mixed = []
        if len(sequences) > 1:
            mixed.append("tasks " + run["setting"].get("tasks", ",".join(run["tasks"])))
        if len(backbones) > 1:
            mixed.append("backbone " + backbone_of(run).removeprefix("path ")[:12])
        return (
            run["method"]
            + (" (" + ", ".join(f"{k}={run['setting'].get(k)}" for k in varying) + ")" if varying else "")
            + (" [" + "; ".join(mixed) + "]" if mixed else "")
        )

    by_method, pretrained, commands, losses = {}, set(), [], []
    for run_dir, run in runs:
        name = label(run)
        by_method.setdefault(name, []).append(run_row(run_dir, run, reference))
        commands.append(f"- {name}, seed {run['args'].get('seed')}: `{run.get('command') or run_dir}`")
        pretrained |= {backbone_dir(run_dir, run)} - {None}
        if by_method[name][-1]["forgetting"] is not None:
            losses.append(f"- {name}, seed {run['args'].get('seed')}: " + lost_tasks(run, by_method[name][-1]))

    dmc_only = metric_name([t for _, run in runs for t in run["tasks"]]) == "normalized score"
    with_dmc_retention = any(r["retention_dmc"] is not None for rows in by_method.values() for r in rows)
    columns = (
        (["normalized score", "paper"] if dmc_only else ["success (last step)", "paper", "success (any step)"])
        + ["forgetting"]
        + ([f"gap to {ref_run['method']} (end of task)"] if reference is not None else [])
        + ["retention (last step)", "retention (any step)"]
        + (["retention DMC (score)"] if with_dmc_retention else [])
        + ["trainable params", "wall time (min)"]
    )
    lines = ["| method | runs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for method, rows in by_method.items():
        cells = [cell(rows, "average"), cell(rows[:1], "paper")]
        cells += [] if dmc_only else [cell(rows, "average_any")]
        cells += [cell(rows, "forgetting")]
        cells += [cell(rows, "gap")] if reference is not None else []
        cells += [cell(rows, "retention"), cell(rows, "retention_any")]
        cells += [cell(rows, "retention_dmc")] if with_dmc_retention else []
        cells += [f"{rows[0]['params']:,}", cell(rows, "minutes", "{:.0f}")]
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(cells) + " |")
    if single_dirs and len(sequences) > 1:
        raise ValueError("--single goes with runs of one task sequence: its scores fill that sequence's per-task table")
    if len({tuple(run["tasks"]) for _, run in runs}) == 1:  # one sequence: where each method gains and loses
        data_scores = next((r["data_scores"] for _, r in runs if r.get("data_scores")), None)
        single = single_task_scores(single_dirs, backbone_of(runs[0][1]), allow_mixed) if single_dirs else None
        lines += per_task_table(by_method, runs[0][1]["tasks"], dmc_only, data_scores, single)
    for directory in sorted(pretrained):
        for subset in RETENTION_SUBSETS:
            retained = retention(directory, subset)
            if retained is not None:
                lines.append(
                    f"\nRetention ({subset}) of the pre-trained model in {directory}: {retained[0]:.2f} "
                    + ("(normalized score)" if subset == "retaindmc5" else f"(last step), {retained[1]:.2f} (any step)")
                )
    if losses:
        lines += ["", f"Forgetting per run, and the tasks it lost by more than {LOST}:", "", *losses]
    return "\n".join(lines + ["", "Commands:", *commands]) + "\n"


def plot_run(run_dir, ckpt, metrics):
    """A fine-tuning run's figures: success_matrix.png, success_curves.png, training_curves.png and (a pool of
    several entries) routing.png."""
    names, S = [t["name"] for t in ckpt["tasks"]], np.asarray(ckpt["success"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.5 * len(names)), max(4.0, 1.2 + 0.45 * len(names))))
    image = ax.imshow(S, vmin=0, vmax=1, cmap="viridis")
    metric = metric_name(names)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=metric)
    short = [n.removesuffix("-v3") for n in names]
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), short, fontsize=7)
    ax.set_xlabel("evaluated task"), ax.set_ylabel("after learning")
    ax.set_title(
        f"{ckpt['method']}: {metric} (average {metrics['average']:.2f}, forgetting {metrics['forgetting']:.2f})",
        fontsize=8,
    )
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{S[i, j]:.1f}", ha="center", va="center", fontsize=6, color="w" if S[i, j] < 0.6 else "k")
    save_figure(fig, os.path.join(run_dir, "success_matrix.png"))

    fig, ax = plt.subplots(figsize=(6, 3))
    for j, name in enumerate(short):
        ax.plot(range(j, len(names)), S[j:, j], marker="o", ms=3, label=name)
    ax.set_xticks(range(len(names)), short, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("after learning"), ax.set_ylabel(metric), ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{ckpt['method']}: each task's {metric} from the time it was learned", fontsize=8)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
    save_figure(fig, os.path.join(run_dir, "success_curves.png"))

    if all("loss_curve" in s for s in ckpt["stages"]):  # runs before this key was recorded have no curve
        fig, ax = plt.subplots(figsize=(6, 3))
        steps_per_task = ckpt["args"]["steps_per_task"]
        for j, stage in enumerate(ckpt["stages"]):
            curve = stage["loss_curve"]
            x = j * steps_per_task + (np.arange(len(curve)) + 0.5) * steps_per_task / len(curve)
            ax.plot(x, curve, lw=1, marker=".", ms=3, label=short[j])
        ax.set_xlabel("training step (tasks one after another)"), ax.set_ylabel("action loss (train)")
        ax.set_title(f"{ckpt['method']}: training loss on each task of the sequence", fontsize=8)
        ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1, 0.5))
        save_figure(fig, os.path.join(run_dir, "training_curves.png"))
    if ckpt["pool_args"] is not None and ckpt["pool_args"]["pool_size"] > 1:
        plot_routing(run_dir, ckpt)


def plot_routing(run_dir, ckpt):
    """routing.png: each task's share of evaluation steps per pool entry, after the last task."""
    plt, names = pyplot(), [t["name"] for t in ckpt["tasks"]]
    short = [n.removesuffix("-v3") for n in names]
    used, share = routing_shares(ckpt["stages"][-1]["results"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.4 * len(used)), max(3.0, 1.2 + 0.35 * len(names))))
    image = ax.imshow(np.where(share > 0, share, np.nan), vmin=0, vmax=1, cmap="magma")  # unused: blank
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the task's steps")
    ax.set_xticks(range(len(used)), [f"e{i}" for i in used], fontsize=7)
    ax.set_yticks(range(len(names)), short, fontsize=7)
    ax.set_xlabel("pool entry"), ax.set_ylabel("evaluated task")
    ax.set_title(f"{ckpt['method']}: share of evaluation steps per entry, after the last task", fontsize=8)
    for i in range(len(names)):
        for j in range(len(used)):
            if share[i, j] >= 0.005:
                color = "w" if share[i, j] < 0.6 else "k"
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=5, color=color)
    save_figure(fig, os.path.join(run_dir, "routing.png"))


def write_sequence_report(run_dir, ckpt):
    """results.json, results.md and the figures (success_matrix, success_curves, training_curves, routing) of a
    (finished) fine-tuning run."""
    names = [t["name"] for t in ckpt["tasks"]]
    S = np.asarray(ckpt["success"])
    metrics, report = sequence_report(ckpt)
    write_text(
        os.path.join(run_dir, "results.json"),
        json.dumps(
            dict(
                method=ckpt["method"],
                tasks=names,
                success=S.tolist(),
                success_any=ckpt["success_any"],
                metrics=metrics,
                args=ckpt["args"],
                setting=ckpt["setting"],  # the args that decide the outcome, seed excluded: --compare groups by them
                command=ckpt.get("command"),
                trainable_params=ckpt["trainable_params"],
                stages=ckpt["stages"],
                backbone_sha256=ckpt["pretrained"]["sha256"],  # --compare puts only runs of one backbone together
                data_scores={t["name"]: t["data_score"] for t in ckpt["tasks"] if "data_score" in t},  # DMControl
                ckpt_sha256=file_sha256(os.path.join(run_dir, "ckpt.pt")),  # these results belong to that file
            ),
            indent=1,
        ),
    )
    write_text(os.path.join(run_dir, "results.md"), report)

    plot_run(run_dir, ckpt, metrics)
    return report


def write_comparison(args):
    """--compare: the table of several fine-tuning runs, written to <out>/comparison.md."""
    try:
        check_output(args.out or "runs", "--out", is_dir=True)
        patterns = [p for p in args.compare.split(",") if p]  # a quoted 'runs/*-cw10-s*' expands here
        run_dirs = [d for p in patterns for d in sorted(glob.glob(p)) or [p]]  # no match: named in the error
        single = [d for p in args.single.split(",") if p for d in sorted(glob.glob(p)) or [p]]
        table = compare_runs(run_dirs, args.reference, args.allow_mixed, single)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    out = args.out or "runs"
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "comparison.md"), table)
    print(table + f"wrote {out}/comparison.md")


def scaling_point(branch, ms_per_step):
    """One point of the pre-training curve from a pretrain.py folder: its budget (steps x ms_per_step), held-out
    numbers at its last step, retain10 (its retain10/ evaluation) and the CW10 runs beside it (cw10-<method>/, a
    run or a link to one), each of which must have fine-tuned this point's model: its ckpt.pt or the export of it
    beside it (backbone.pt), by content."""
    ckpt = load_checkpoint(os.path.join(branch, "ckpt.pt"), kinds=("pretrain",))
    with open(os.path.join(branch, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    heldout = rows[-1]["heldout"]
    if rows[-1]["step"] != ckpt["step"]:
        raise ValueError(f"{branch}: metrics.jsonl ends at step {rows[-1]['step']}, the checkpoint at {ckpt['step']}")
    retained = read_json(os.path.join(branch, "retain10", "results.json"))["results"]
    targets = {t["name"]: t["target_return"] for t in ckpt["tasks"]}
    cw10, files = {}, [os.path.join(branch, name) for name in ("ckpt.pt", "backbone.pt")]
    shas = {file_sha256(path) for path in files if os.path.isfile(path)}
    for run in sorted(glob.glob(os.path.join(glob.escape(branch), "cw10-*", "results.json"))):
        result = read_json(run)
        if result.get("backbone_sha256") not in shas:
            raise ValueError(f"{os.path.dirname(run)} fine-tuned another model than {' or '.join(files)}: move it out")
        cw10[result["method"]] = dict(success=result["metrics"]["average"], forgetting=result["metrics"]["forgetting"])
    flags = {k: v for k, v in ckpt["args"].items() if k in ("n_layer", "n_head", "n_embd", "dropout", "batch_size")}
    return dict(
        folder=branch, steps=ckpt["step"], model=flags, params=sum(v.numel() for v in ckpt["model"].values()),
        schedule=ckpt["args"].get("schedule"), branch_from=ckpt["args"].get("branch_from"),
        ms_per_step=ms_per_step, hours=ckpt["step"] * ms_per_step / 3.6e6,
        heldout_loss=float(np.mean([v[0] for v in heldout.values()])),
        heldout_acc=float(np.mean([v[1] for v in heldout.values()])),
        retain10=float(np.mean([t["success"] for t in retained])),
        retain10_any=float(np.mean([t["success_any"] for t in retained])),
        retain10_normalized_return=float(np.mean([t["mean_return"] / targets[t["task"]] for t in retained])),
        cw10=cw10,
    )  # fmt: skip


def write_scaling(args):
    """--scaling: a point file per pretrain.py folder, then the table and figure of every point in --out."""
    out = args.out or "results/scaling"
    try:
        check_output(out, "--out", is_dir=True)
        branches = sorted(glob.glob(args.scaling))
        if not branches or not args.ms_per_step:
            raise ValueError(f"--scaling {args.scaling!r} matched no folder, or --ms-per-step was not given")
        points = [scaling_point(branch, args.ms_per_step) for branch in branches]
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    os.makedirs(out, exist_ok=True)
    for point in points:
        stem = f"d{point['model']['n_embd']}x{point['model']['n_layer']}-{point['steps']}"
        stem += "" if point["branch_from"] else "-fresh"  # a run of its own beside a branch of the same budget
        write_text(os.path.join(out, stem + ".json"), json.dumps(point, indent=1) + "\n")
        for finished in glob.glob(os.path.join(glob.escape(point["folder"]), "cw10-*", "results.json")):
            run = os.path.dirname(finished)  # the CW10 runs the point counts: their own record beside it
            copy = os.path.join(out, stem, os.path.basename(run))
            os.makedirs(copy, exist_ok=True)
            for name in ("results.json", "results.md"):
                if os.path.isfile(os.path.join(run, name)):
                    with open(os.path.join(run, name)) as f:
                        write_text(os.path.join(copy, name), f.read())
    points = [read_json(p) for p in sorted(glob.glob(os.path.join(glob.escape(out), "*.json")))]
    table = scaling_table(points)
    write_text(os.path.join(out, "scaling.md"), table)
    plot_scaling(points, os.path.join(out, "scaling.png"))
    print(table + f"wrote {len(branches)} point(s), scaling.md and scaling.png to {out}")


def by_budget(point):
    """The curve's order: pre-training time, then size, then folder (a branch and a run of one budget, in a fixed
    order)."""
    return point["hours"], point["params"], point["folder"]


def scaling_table(points):
    """The curve as a markdown table, one row per point, in order of budget."""
    points = sorted(points, key=by_budget)
    lines = [
        "| pre-training hours (2 cores, fp32) | model | steps × batch | held-out loss / acc | retain10 last step (any) "
        "| CW10 l2m | CW10 l2m-oracle | CW10 ft |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        m, cw10 = p["model"], p["cw10"]
        cells = [f"{cw10[k]['success']:.2f}" if k in cw10 else "–" for k in ("l2m", "l2m-oracle", "ft")]
        lines.append(
            f"| {p['hours']:.2f} | {m['n_layer']} × {m['n_embd']} ({p['params'] / 1e6:.2f}M) | {p['steps']:,} × "
            f"{m['batch_size']}{'' if p['branch_from'] else ', one run'} | {p['heldout_loss']:.3f} / "
            f"{p['heldout_acc']:.3f} | {p['retain10']:.2f} "
            f"({p['retain10_any']:.2f}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_scaling(points, path):
    """Success at the last step against pre-training hours (log axis), one line per shape and measure, with the
    paper's CW10 numbers as horizontal lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for shape in sorted({(p["model"]["n_layer"], p["model"]["n_embd"]) for p in points}):
        mine = sorted((p for p in points if (p["model"]["n_layer"], p["model"]["n_embd"]) == shape), key=by_budget)
        label = f"{shape[0]}×{shape[1]}"
        ax.plot([p["hours"] for p in mine], [p["retain10"] for p in mine], marker="o", label=f"retain10, {label}")
        for method in ("l2m", "l2m-oracle", "ft"):
            have = [p for p in mine if method in p["cw10"]]
            if have:
                hours, success = [p["hours"] for p in have], [p["cw10"][method]["success"] for p in have]
                ax.plot(hours, success, marker="s", ls="--", label=f"CW10 {method}, {label}")
    for method, value in (("l2m", PAPER_CW10_SUCCESS["l2m"]), ("l2m-oracle", PAPER_CW10_SUCCESS["l2m-oracle"])):
        ax.axhline(value, color="grey", lw=0.8, ls=":")
        right = max(p["hours"] for p in points)
        ax.text(right, value + 0.01, f"paper {method} {value}", fontsize=6, color="grey", ha="right")
    ax.set_xscale("log"), ax.set_ylim(-0.02, 1.0)
    ticks = sorted({round(p["hours"] * 8) / 8 or p["hours"] for p in points})  # eighths of an hour
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("pre-training hours on 2 CPU cores (fp32)"), ax.set_ylabel("success at the last step")
    ax.legend(fontsize=6, loc="upper left")
    save_figure(fig, path)


def main(args):
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"evaluate.py: error: {e}")
    keep_freed_memory()
    if args.compare and args.scaling:
        sys.exit("evaluate.py: error: --compare and --scaling are two modes: give one")
    if (args.reference or args.single or args.allow_mixed) and not args.compare:
        sys.exit("evaluate.py: error: --reference, --single and --allow-mixed go with --compare")
    if args.compare or args.scaling:
        return (write_comparison if args.compare else write_scaling)(args)
    try:
        out = args.out or os.path.join(os.path.dirname(args.ckpt) or ".", "eval")
        check_output(out, "--out", is_dir=True)
        env_processes = torch.get_num_threads()  # as many as the cores this process may use
        start = time.perf_counter()  # the evaluation's time includes loading the model and starting env workers
        env_workers(env_processes - 1)  # started first, before torch computes anything (env_workers)
        ckpt = load_checkpoint(args.ckpt)
        finetuned = ckpt.get("kind") == "finetune"  # read its backbone once, for the task list and the model
        base = load_backbone(ckpt, backbone_path(ckpt, args.ckpt, args.backbone)) if finetuned else None
        known, oracle_ids = known_tasks(ckpt, base)
        names = resolve_tasks(args.tasks) if args.tasks else [t["name"] for t in ckpt["tasks"]]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{args.ckpt} knows nothing of {', '.join(unknown)} (it knows {', '.join(known)})")
        if oracle_ids and any(n not in oracle_ids for n in names):
            raise ValueError(f"a {ckpt['method']} run needs a task id: evaluate only the tasks of its sequence")
        model = build_model(ckpt, device, base)
        if not args.bench:
            lock_folder(out, "--out")  # one evaluation writes a folder at a time
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    timings = []
    task_ids = [oracle_ids[n] for n in names] if oracle_ids else None
    bf16 = use_bf16(args.precision, device)
    results = evaluate_tasks(
        model, [known[n] for n in names], args.episodes, device, task_ids, timings, bf16, env_processes
    )
    seconds = time.perf_counter() - start
    steps = sum(r["env_steps"] for r in results)
    build_s, model_s, env_s = (sum(t[k] for t in timings) for k in ("build_seconds", "model_seconds", "env_seconds"))
    speed = (
        f"{steps:,} env steps in {seconds:.1f} s: {steps / seconds:,.0f} env steps/s | building envs "
        f"{build_s / seconds:.0%}, model {model_s / seconds:.0%}, simulator {env_s / seconds:.0%} of the time "
        f"({env_processes} process(es) stepping envs)"
    )
    if args.bench:
        pure = sum(replay_seconds(t) for t in timings)
        print(format_results(results) + "\n" + speed)
        print(
            f"bench: evaluation {seconds:.1f} s / stepping the same envs with the same actions {pure:.1f} s "
            f"= {seconds / pure:.2f} (nothing written)"
        )
        return

    os.makedirs(out, exist_ok=True)
    table = format_results(results)
    if model.pool is not None:
        table += "\n\nRouting (share of evaluation steps per pool entry):\n\n" + routing_table(results)
    write_text(
        os.path.join(out, "results.json"),
        json.dumps(dict(ckpt=args.ckpt, episodes=args.episodes, bf16=bf16, results=results), indent=1),
    )
    write_text(
        os.path.join(out, "results.md"),
        f"# Evaluation of `{args.ckpt}`, {args.episodes} episodes per task\n\n{table}\n",
    )
    if ckpt.get("kind") == "finetune":  # the run's Continual-World table, from the evaluations made during it
        print(sequence_report(ckpt)[1])
        print(f"Re-evaluated now, {args.episodes} episodes per task:\n")
    print(table + "\n" + speed)
    print(f"wrote {out}/results.json, {out}/results.md")


def cli(argv=None):
    """The command line: `python evaluate.py [flags]` (argv None = sys.argv)."""
    args = parse_args(Args, argv, description=__doc__, groups=GROUPS, choices={"precision": PRECISIONS})
    run_stage(main, args, "evaluate.py")


if __name__ == "__main__":
    cli()

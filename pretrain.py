"""Stage 2 of 4: multi-task offline pre-training of the Decision Transformer.

Reads data/<task>.npz (from collect.py) for the chosen tasks. Writes runs/pretrain/ckpt.pt: weights, model
config, arguments, the task table (dims, reward scale, target return), optimizer and RNG state, step; and
runs/pretrain/metrics.jsonl: held-out action loss and accuracy per task every --eval-every steps.

Examples:
  python pretrain.py                                  # MT40: the shipped backbone's recipe (54 min on 2 cores)
  python pretrain.py --tasks mt40,dmc10               # the paper's multi-domain run (needs collect.py --tasks dmc10)
  python pretrain.py --resume                         # continue an interrupted run
  python pretrain.py --export backbone.pt             # the finished run's weights alone, for fine-tuning
  torchrun --nproc_per_node 2 pretrain.py ...         # data-parallel (NCCL on GPUs, gloo on CPU)
"""

import functools
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from collect import (
    CHECKPOINT_KEYS,
    DMC16,
    PRECISIONS,
    check_output,
    env_dims,
    fields_from,
    file_sha256,
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
    save_atomic,
    save_figure,
    use_bf16,
    write_text,
)
from model import ActionTokenizer, DecisionTransformer, DTConfig, action_loss

REWARD_SCALE = {"metaworld": 200.0, "dmcontrol": 100.0}  # rewards and returns-to-go are divided by these (authors)
MAX_STATE_DIM = DTConfig.state_dim  # the authors' unified state space


@dataclass
class Args:
    preset: str = "cpu"
    """cpu (the defaults shown here) | paper: the paper's model, batch and schedule (PRESETS below); flags given
    on the command line still win"""
    tasks: str = "mt40"
    """tasks to pre-train on: task names and/or list names (mt40, dmc10, ...)"""
    data_dir: str = "data"
    """directory of <task>.npz files written by collect.py"""
    seed: int = 0
    """seed for initialization, sampling and dropout [>= 0]"""
    steps: int = 66240
    """optimizer steps: the shipped backbone's 66,240 take 54 min on 2 cores in bf16, 2.0 h in fp32 (times per
    machine: docs/performance.md) [>= 1]"""
    batch_size: int = 64
    """windows per step (per process); split evenly across domains [>= 1]"""
    lr: float = 1e-3
    """peak learning rate (paper: 1e-4 at batch 512) [> 0]"""
    min_lr: float = 1e-5
    """cosine decay floor (paper: 1e-6) [>= 0]"""
    warmup_steps: int = 500
    """linear warm-up steps (paper: 4000) [>= 0]"""
    schedule: str = "wsd"
    """cosine (decay over all steps after warm-up, as the authors) | wsd (warm-up, constant lr, then a decay over the
    last --decay-frac of the steps, from which shorter budgets can branch: see --snapshots and --branch-from)"""
    decay_frac: float = 0.2
    """wsd: the share of --steps spent decaying lr to --min-lr, as 1 - sqrt(progress) (Hagele et al. 2024) (0, 1]"""
    weight_decay: float = 0.01
    """AdamW weight decay on Linear weights (authors) [>= 0]"""
    grad_clip: float = 0.25
    """gradient-norm clip (authors' max_grad_norm); 0 = no clipping [>= 0]"""
    precision: str = "auto"
    """auto | bf16 | fp32; auto = bf16 autocast where the hardware has it, else fp32"""
    holdout_episodes: int = 2
    """episodes per task held out for the validation loss (0: none) [>= 0]"""
    n_layer: int = 4
    """transformer blocks (paper: 6) [>= 1]"""
    n_head: int = 4
    """attention heads (paper: 12) [>= 1]"""
    n_embd: int = 128
    """embedding width (paper: 768) [>= 1]"""
    dropout: float = 0.0
    """dropout (the authors: 0.1, HF GPT-2's default; none here: a small model trained on much less data underfits
    rather than overfits, docs/deviations.md) [0, 1)"""
    context_len: int = 5
    """K timesteps per window (authors: 5) [>= 1]"""
    act_dim: int = 0
    """action tokens per step; 0 = the largest action dim of the tasks (4 for Meta-World alone, 6 with
    DMControl) [0, 6]"""
    out: str = "runs/pretrain/ckpt.pt"
    """checkpoint path (written atomically)"""
    device: str = "auto"
    """auto (cuda, else mps, else cpu), cpu, cuda or mps"""
    eval_every: int = 1000
    """report held-out action loss/accuracy per task every N steps [>= 1]"""
    save_every: int = 1000
    """write the checkpoint every N steps (and at the end) [>= 1]"""
    snapshots: str = ""
    """comma-separated steps at which to keep a copy of the checkpoint beside --out (ckpt-step<N>.pt): the points a
    wsd run's decays branch from"""
    branch_from: str = ""
    """start from this wsd snapshot (weights, optimizer, RNG, step) and run to this run's --steps with its own decay;
    every other setting must equal the snapshot's"""
    resume: bool = False
    """continue from --out if it exists"""
    overwrite: bool = False
    """replace the run at --out (its checkpoint and metrics.jsonl)"""
    bench: int = 0
    """time N training steps (after 3 warm-up steps): ms/step, tokens/s, matmul GFLOP per step; writes nothing [>= 0]"""
    export: str = ""
    """write the finished run at --out as a backbone to this path and exit: weights, config and task table, without
    the optimizer and RNG state that only resuming needs (what fine-tuning reads, a third of the size)"""


GROUPS = {"data": "preset", "optimization": "steps", "model": "n_layer", "run control": "out"}
CHOICES = {"precision": PRECISIONS, "schedule": ("cosine", "wsd"), "preset": ("cpu", "paper")}
PRESETS = {  # the authors' pre-training (cdt_pretrain_disc.yaml, lr_sched_kwargs/cosine.yaml, mdmpdt_mtdmc.yaml)
    "paper": dict(tasks="mt40,dmc10", n_layer=6, n_head=12, n_embd=768, batch_size=512, lr=1e-4, min_lr=1e-6,
                  warmup_steps=4000, steps=500_000, schedule="cosine", dropout=0.1, act_dim=6, eval_every=10_000,
                  save_every=5_000),
}  # fmt: skip
# how a run executes and where it lives, not what it computes: these may differ between a run and its resumption
RUN_CONTROL = fields_from(Args, GROUPS["run control"])
# the behaviour of the code before a setting existed, where it differs from the setting's default: a checkpoint made
# then lacks the setting and resumes as it was made
BEFORE_IT_EXISTED = dict(schedule="cosine")


# ---------------------------------------------------------------------------------------------------------
# Data: npz files -> flat arrays + an episode table; windows sampled with vectorized numpy


def load_task(path):
    """Load and validate one data file; raises ValueError naming the file and what is wrong."""
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable npz file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
        ) from None
    missing = {"observations", "actions", "rewards", "dones"} - set(data)
    if missing:
        raise ValueError(
            f"{path}: missing keys {sorted(missing)} (the data contract needs observations, actions, rewards, dones)"
        )
    obs, act, rew, done = data["observations"], data["actions"], data["rewards"], data["dones"]
    n = len(obs)
    if obs.ndim != 2 or act.ndim != 2 or rew.shape != (n,) or done.shape != (n,) or len(act) != n or n == 0:
        raise ValueError(
            f"{path}: expected observations (N, obs_dim), actions (N, act_dim), rewards (N,), dones (N,); "
            f"got {obs.shape}, {act.shape}, {rew.shape}, {done.shape}"
        )
    if obs.shape[1] > MAX_STATE_DIM or act.shape[1] > 6:
        raise ValueError(f"{path}: obs_dim {obs.shape[1]} > {MAX_STATE_DIM} or act_dim {act.shape[1]} > 6")
    for key in ("observations", "actions", "rewards", "dones"):
        if not (np.issubdtype(data[key].dtype, np.number) or data[key].dtype == bool):
            raise ValueError(f"{path}: {key} has dtype {data[key].dtype}; the data contract needs numbers")
    for key in ("observations", "actions", "rewards"):
        if not np.isfinite(data[key]).all():
            raise ValueError(f"{path}: {key} contains NaN or inf")
    if not done[-1]:
        raise ValueError(f"{path}: the last transition must end an episode (dones[-1] is False)")
    if np.abs(act).max() > 1 + 1e-4:  # the contract's executed actions lie in [-1, 1]; clipping would hide a bug
        raise ValueError(f"{path}: actions reach {np.abs(act).max():.3g}; the data contract keeps them in [-1, 1]")
    return dict(
        observations=obs.astype(np.float32),
        actions=np.clip(act, -1, 1).astype(np.float32),
        rewards=rew.astype(np.float32),
        dones=done.astype(bool),
        **{k: float(data[k]) for k in ("random_return", "data_return") if k in data},
    )


class WindowDataset:
    """All tasks' transitions in flat arrays, and an episode table to sample K-step windows from.

    Window sampling follows the authors' Trajectory.sample: episode with probability proportional to its length,
    start uniform in [0, len), end = min(start + K, len), short windows left-padded; absolute timesteps."""

    def __init__(self, tasks, episodes, K, act_dim, n_bins, seed):
        self.tasks, self.K, self.act_dim, self.n_bins = tasks, K, act_dim, n_bins
        width = max(t["obs_dim"] for t in tasks)
        self.obs = np.concatenate(
            [np.pad(e["observations"], ((0, 0), (0, width - e["observations"].shape[1]))) for e in episodes]
        )
        tokenizer = ActionTokenizer(n_bins)
        bins = [tokenizer.encode(torch.from_numpy(e["actions"])).numpy() for e in episodes]
        self.bins = np.concatenate(
            [np.pad(b, ((0, 0), (0, act_dim - b.shape[1])), constant_values=n_bins) for b in bins]
        ).astype(np.int64)
        self.rewards = np.concatenate([e["rewards"] / tasks[e["task"]]["reward_scale"] for e in episodes]).astype(
            np.float32
        )
        self.rtg = np.concatenate(
            [np.cumsum(e["rewards"][::-1])[::-1] / tasks[e["task"]]["reward_scale"] for e in episodes]
        ).astype(np.float32)
        self.ep_len = np.array([len(e["rewards"]) for e in episodes])
        self.ep_start = np.r_[0, np.cumsum(self.ep_len)[:-1]]
        self.ep_task = np.array([e["task"] for e in episodes])
        self.task_act_dim = np.array([t["act_dim"] for t in tasks])
        self.timestep = np.concatenate([np.arange(n) for n in self.ep_len])
        self.rng = np.random.default_rng(seed)

    def windows(self, episode_ids, starts, device="cpu"):
        """Windows of K steps from (episode, start) pairs, left-padded -> (the model's inputs: a dict of tensors
        (B, K, ...) named as `DecisionTransformer.forward`'s arguments, valid (B, K, A) bool: the action tokens that
        count in the loss, task (B,): each window's task index)."""
        K = self.K
        n_valid = np.minimum(K, self.ep_len[episode_ids] - starts)  # (B,)
        offset = np.arange(K)[None, :] - (K - n_valid)[:, None]  # (B, K): < 0 on the left padding
        step_mask = offset >= 0
        index = self.ep_start[episode_ids][:, None] + starts[:, None] + np.maximum(offset, 0)  # (B, K) flat index
        task = self.ep_task[episode_ids]  # (B,)
        states = np.zeros((len(starts), K, MAX_STATE_DIM), np.float32)
        states[:, :, : self.obs.shape[1]] = self.obs[index] * step_mask[..., None]
        bins = np.where(step_mask[..., None], self.bins[index], self.n_bins)  # (B, K, A)
        valid = step_mask[..., None] & (np.arange(self.act_dim) < self.task_act_dim[task][:, None, None])  # (B, K, A)
        inputs = dict(
            states=states,
            returns=self.rtg[index] * step_mask,
            action_bins=bins,
            rewards=self.rewards[index] * step_mask,
            timesteps=self.timestep[index] * step_mask,
            step_mask=step_mask,
        )

        def tensor(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

        return {k: tensor(v) for k, v in inputs.items()}, tensor(valid), tensor(task)

    def sample(self, batch_size, episode_pool, device="cpu", rng=None):
        """Episodes from each pool in `episode_pool` (a list of arrays, one per domain), equally many per pool.
        rng: the generator to draw with (default: the dataset's own)."""
        rng = rng or self.rng
        ids = []
        for i, pool in enumerate(episode_pool):
            n = batch_size // len(episode_pool) + (i < batch_size % len(episode_pool))
            lengths = self.ep_len[pool]
            ids.append(rng.choice(pool, n, p=lengths / lengths.sum()))
        ids = np.concatenate(ids)
        starts = np.floor(rng.random(len(ids)) * self.ep_len[ids]).astype(np.int64)
        return self.windows(ids, starts, device)


def check_layout(data, name, path, data_dir):
    """A task file must have its environment's observation and action dims, and a DMControl file its values only in
    its own keys' columns of the authors' 204-column layout: anything else was collected or converted wrongly."""
    found, expected = (data["observations"].shape[1], data["actions"].shape[1]), env_dims(name)
    if found != expected:
        raise ValueError(
            f"{path} has {found[0]} observation columns and {found[1]} action dims, but the {name} "
            f"environment has {expected[0]} and {expected[1]}: collect it again with "
            f"`python collect.py --tasks {name} --data-dir {data_dir} --overwrite`"
        )
    if is_metaworld(name):
        return
    outside = np.setdiff1d(np.arange(found[0]), make_env(name).columns)
    filled = outside[np.abs(data["observations"][:, outside]).max(axis=0) > 0]
    if len(filled):
        raise ValueError(
            f"{path} has values in observation columns {filled[:5].tolist()}{'...' if len(filled) > 5 else ''}"
            f", which {name} leaves 0 in the authors' 204-column layout (DMC_SLOTS in collect.py): its "
            "columns are in the wrong slots; convert the authors' files with `collect.py --source authors`"
        )


def score_constants(data, returns, name, path, data_dir):
    """A DMControl task's normalized-score constants and the data's own score. -> dict(random_return (the score's 0),
    data_return (its 1), data_score = [mean, best 10%] of the data's episodes)."""
    if "random_return" not in data:
        raise ValueError(
            f"{path} has no random_return (the zero of DMControl's normalized score): collect it again "
            f"with `python collect.py --tasks {name} --data-dir {data_dir} --overwrite`"
        )
    # the score's 1: the file's own (the authors' data mean), else the mean of our data's best 10% episodes, the
    # trained agent's level (a 50-episode SAC buffer's mean is mostly learning; on finger-turn_easy it was below the
    # random policy's return)
    n_best = max(1, len(returns) // 10)
    data_return = data.get("data_return", float(np.sort(returns)[-n_best:].mean()))
    span = data_return - float(data["random_return"])
    scores = np.sort(returns - data["random_return"]) / span if span > 0 else np.full(len(returns), np.nan)
    return dict(random_return=data["random_return"], data_return=data_return,
                data_score=[float(scores.mean()), float(scores[-n_best:].mean())])  # fmt: skip


def load_data(names, data_dir, holdout_episodes, K, act_dim, n_bins, seed):
    """-> (task table, WindowDataset, training episode pools per domain, held-out episode ids per task)."""
    missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, f"{n}.npz"))]
    if missing:
        raise FileNotFoundError(
            f"no data for {', '.join(missing)} in {data_dir}/: make it with "
            f"`python collect.py --tasks {','.join(missing)} --data-dir {data_dir}`"
        )
    tasks, episodes, heldout = [], [], []
    for i, name in enumerate(names):
        path = os.path.join(data_dir, f"{name}.npz")
        data = load_task(path)
        check_layout(data, name, path, data_dir)
        domain = "metaworld" if is_metaworld(name) else "dmcontrol"
        ends = np.flatnonzero(data["dones"]) + 1
        starts = np.r_[0, ends[:-1]]
        returns = np.add.reduceat(data["rewards"], starts)
        if len(ends) <= holdout_episodes:
            raise ValueError(
                f"{data_dir}/{name}.npz has {len(ends)} episodes; need more than --holdout-episodes {holdout_episodes}"
            )
        tasks.append(
            dict(
                name=name,
                domain=domain,
                obs_dim=int(data["observations"].shape[1]),
                act_dim=int(data["actions"].shape[1]),
                reward_scale=REWARD_SCALE[domain],
                target_return=float(returns.max()),
                episodes=len(ends),
                transitions=len(data["rewards"]),
            )
        )
        if domain == "dmcontrol":
            tasks[-1].update(score_constants(data, returns, name, path, data_dir))
        for j, (s, e) in enumerate(zip(starts, ends)):
            if j >= len(ends) - holdout_episodes:
                heldout.append(len(episodes))
            episodes.append(dict(task=i, **{k: data[k][s:e] for k in ("observations", "actions", "rewards")}))
    for t in tasks:
        if t["act_dim"] > act_dim:
            raise ValueError(
                f"{data_dir}/{t['name']}.npz has {t['act_dim']} action dims but the model takes at most {act_dim} "
                f"(pretrain.py --act-dim sets it; 6 covers every task)"
            )
    dataset = WindowDataset(tasks, episodes, K, act_dim, n_bins, seed)
    train = np.setdiff1d(np.arange(len(episodes)), heldout)
    domains = sorted({t["domain"] for t in tasks})
    pools = [train[[tasks[dataset.ep_task[e]]["domain"] == d for e in train]] for d in domains]
    heldout_by_task = {
        i: np.array([e for e in heldout if dataset.ep_task[e] == i]) for i in range(len(tasks)) if holdout_episodes
    }
    return tasks, dataset, pools, heldout_by_task


# ---------------------------------------------------------------------------------------------------------
# Training helpers


def decay_start(args):
    """The first step of a wsd run's decay: until then lr is constant, so a longer run passes through this run."""
    return args.steps - round(args.decay_frac * args.steps)


def lr_at(step, args):
    """Linear warm-up to args.lr, then either cosine decay to args.min_lr at the last step, or (wsd) constant lr until
    decay_start and a 1 - sqrt decay to args.min_lr at the last step (warmup-stable-decay: MiniCPM, Hu et al. 2024;
    the 1 - sqrt shape from Hagele et al. 2024, which matched a cosine run of the same length)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.schedule == "wsd":
        start = max(decay_start(args), args.warmup_steps)
        progress = (step - start) / max(1, args.steps - start)
        return args.min_lr + (args.lr - args.min_lr) * (1 - math.sqrt(min(1.0, max(0.0, progress))))
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def snapshot_steps(spec, last_step):
    """'6000,12000' -> {6000, 12000}; raises ValueError on anything but integers in [1, last_step]."""
    try:
        steps = {int(s) for s in spec.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"--snapshots {spec!r}: expected comma-separated step numbers such as 6000,12000") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--snapshots {spec!r}: steps must be at least 1")
    if any(s > last_step for s in steps):
        raise ValueError(
            f"--snapshots {spec!r}: step {max(steps)} is past --steps {last_step}, so it would never be kept"
        )
    return steps


def snapshot_path(out, step):
    """Where --snapshots keeps the checkpoint of `step`: beside --out."""
    return os.path.join(os.path.dirname(out) or ".", f"ckpt-step{step}.pt")


def differing_settings(ckpt, args, what, also_allowed=()):
    """What a run with `args` would change of the settings `ckpt` was made with, as "--flag old (what) vs new (now)"
    lines; run control and `also_allowed` may differ. A setting newer than the checkpoint is taken as the older code
    ran it (BEFORE_IT_EXISTED, else its default), so an older run is not refused over it."""
    made_with = {**asdict(Args()), **BEFORE_IT_EXISTED, **ckpt["args"]}
    return [
        f"--{k.replace('_', '-')} {made_with[k]!r} ({what}) vs {v!r} (now)"
        for k, v in asdict(args).items()
        if k not in RUN_CONTROL | set(also_allowed) and made_with[k] != v
    ]


def check_trainable(ckpt, path):
    """An exported backbone has no optimizer or RNG state: training cannot continue from it."""
    if "optimizer" not in ckpt:
        raise ValueError(
            f"{path} holds weights only (an exported backbone); resume or branch from its run's checkpoint"
        )


def export_backbone(run_path, dest, overwrite):
    """--export: the finished run at run_path as a backbone file at dest (weights, config, task table, step, args).
    The optimizer's two moments are twice the weights' size and only resuming reads them; so does the RNG state."""
    ckpt = load_checkpoint(run_path, kinds=("pretrain",))
    if ckpt["step"] != ckpt["args"]["steps"]:
        raise ValueError(
            f"{run_path} is at step {ckpt['step']} of {ckpt['args']['steps']}: finish it (--resume) before exporting"
        )
    check_output(dest, "--export", is_dir=False)
    if os.path.exists(dest) and not overwrite:
        raise ValueError(f"{dest} exists: --overwrite replaces it, or --export another path")
    save_atomic({key: ckpt[key] for key in CHECKPOINT_KEYS["pretrain"]}, dest)
    print(f"{dest}: {os.path.getsize(dest) / 2**20:.1f} MiB, step {ckpt['step']}, sha256 {file_sha256(dest)}")


def check_branch(source, args):
    """Refuse a --branch-from snapshot that this run would not have passed through itself: another setting than
    --steps (and run control), not a wsd run, or a step past its own or this run's constant-lr phase."""
    differs = differing_settings(source, args, "snapshot", also_allowed=("steps",))
    if differs:
        raise ValueError(
            f"cannot branch from {args.branch_from}: it was made with other settings: {'; '.join(differs)}"
        )
    if args.schedule != "wsd":
        raise ValueError("--branch-from needs --schedule wsd (a cosine run's lr at a snapshot depends on its length)")
    snapshot_args = Args(**{**asdict(args), "steps": source["args"]["steps"]})
    if source["step"] > min(decay_start(snapshot_args), decay_start(args)):
        raise ValueError(
            f"cannot branch from {args.branch_from}: its step {source['step']} is past the constant-lr phase "
            f"(the snapshot's run decays from step {decay_start(snapshot_args)}, this one from {decay_start(args)})"
        )


@torch.no_grad()
def heldout_metrics(model, dataset, heldout_by_task, device, autocast, n_windows=128):
    """Held-out action loss and accuracy per task, on fixed windows (the same every time)."""
    model.eval()
    rng = np.random.default_rng(0)
    out = {}
    for task, episode_ids in heldout_by_task.items():
        ids = rng.choice(episode_ids, n_windows)
        starts = np.floor(rng.random(n_windows) * dataset.ep_len[ids]).astype(np.int64)
        inputs, valid, _ = dataset.windows(ids, starts, device)
        with autocast:
            logits, _ = model(**inputs)
        loss, accuracy = action_loss(logits, inputs["action_bins"], valid)
        out[dataset.tasks[task]["name"]] = (loss.item(), accuracy.item())
    model.train()
    return out


def domain_means(metrics):
    """{task: (loss, accuracy)} -> {domain: mean (loss, accuracy)}: with both domains, each reported on its own."""
    by_domain = {}
    for name, value in metrics.items():
        by_domain.setdefault("metaworld" if is_metaworld(name) else "dmcontrol", []).append(value)
    return {domain: tuple(np.mean(values, axis=0).tolist()) for domain, values in by_domain.items()}


def synchronize(device):
    """Wait for the GPU's queued kernels, so that a timer around them measures them (CUDA runs them asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflop(step_fn):
    """GFLOP of one call of step_fn, matrix products only (torch's FlopCounterMode): the work no faster kernel
    removes, so a bench's ms/step can be set against the CPU's matmul peak and two methods' steps against each
    other (L2M's frozen backbone computes no weight gradients)."""
    with FlopCounterMode(display=False) as counter:
        step_fn()
    return counter.get_total_flops() / 1e9


def start_processes(args):
    """One process, or one of torchrun's (the same code path). -> (device, world_size, rank)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = resolve_device(args.device)
    keep_freed_memory()
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, world_size, rank


def check_run(args, device, world_size, is_main):
    """The settings, and the checkpoint a run resumes or branches from, checked before any work: raises ValueError.
    -> (task names, action dims, bf16 or not, snapshot steps, that checkpoint or None, "new" / "resuming" /
    "branching from ...")."""
    if args.n_embd % args.n_head:  # each field's own range is checked by parse_args
        raise ValueError(f"--n-head {args.n_head} does not divide --n-embd {args.n_embd}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} > --lr {args.lr}: the schedule would raise lr as it decays")
    if args.schedule != "wsd" and args.decay_frac != Args.decay_frac:
        raise ValueError(f"--decay-frac {args.decay_frac} applies only to --schedule wsd (this run: {args.schedule})")
    snapshots = snapshot_steps(args.snapshots, args.steps)
    check_output(args.out, "--out", is_dir=False)
    if os.path.exists(args.out) and not (args.resume or args.overwrite or args.bench):
        raise ValueError(
            f"{args.out} exists: --resume continues that run, --overwrite replaces it, --out puts this one elsewhere"
        )
    names = resolve_tasks(args.tasks)
    act_dim = args.act_dim or max(6 if n in DMC16 else 4 for n in names)
    bf16 = use_bf16(args.precision, device)
    ckpt, origin = None, "new"
    if args.resume and not os.path.exists(args.out) and is_main:
        print(f"no checkpoint at {args.out} yet: starting a new run")
    if args.resume and os.path.exists(args.out):
        ckpt, origin = load_checkpoint(args.out, kinds=("pretrain",)), "resuming"
        check_trainable(ckpt, args.out)
        differs = differing_settings(ckpt, args, "checkpoint")
        if ckpt.get("world_size", 1) != world_size:
            differs.append(f"{ckpt.get('world_size', 1)} processes (checkpoint) vs {world_size} (now)")
        if differs:
            raise ValueError(f"cannot resume {args.out}: it was made with other settings: {'; '.join(differs)}")
    elif args.branch_from:
        ckpt, origin = load_checkpoint(args.branch_from, kinds=("pretrain",)), f"branching from {args.branch_from}"
        check_trainable(ckpt, args.branch_from)
        check_branch(ckpt, args)
        if ckpt.get("world_size", 1) != world_size:
            raise ValueError(f"{args.branch_from} was made by {ckpt.get('world_size', 1)} processes, not {world_size}")
    return names, act_dim, bf16, snapshots, ckpt, origin


def build_model(args, act_dim, ckpt, dataset, device, rank):
    """The model and its optimizer: new (the same initial weights on every rank), or where `ckpt` left them,
    sampling and dropout streams included. -> (model, optimizer, step)."""
    cfg = DTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                   context_len=args.context_len, act_dim=act_dim)  # fmt: skip
    torch.manual_seed(args.seed)
    model = DecisionTransformer(cfg).to(device)
    optimizer = model.configure_optimizer(args.lr, args.weight_decay)
    if ckpt is None:
        torch.manual_seed(args.seed + rank)  # dropout streams differ per rank
        return model, optimizer, 0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    dataset.rng.bit_generator.state = ckpt["rng"]["numpy"][rank]
    torch.set_rng_state(ckpt["rng"]["torch"][rank])
    if device.type == "cuda" and ckpt["rng"].get("cuda", [None] * (rank + 1))[rank] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"][rank], device)  # dropout on the GPU draws from this one
    return model, optimizer, ckpt["step"]


def train_step(model, train_model, optimizer, dataset, pools, args, device, autocast, lr):
    """One AdamW step on the action loss of a fresh batch at learning rate lr. -> (loss, accuracy) tensors."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    inputs, valid, _ = dataset.sample(args.batch_size, pools, device)
    with autocast:
        logits, _ = train_model(**inputs)
    loss, accuracy = action_loss(logits, inputs["action_bins"], valid)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    return loss, accuracy


def bench(step_fn, args, device, tokens_per_step, world_size, bf16, is_main):
    """--bench: time args.bench steps after 3 warm-up steps, and count one step's matmul FLOP; writes nothing."""
    for _ in range(3):
        step_fn(args.lr)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.bench):
        step_fn(args.lr)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.bench
    gflop = matmul_gflop(lambda: step_fn(args.lr))  # one more step, counted
    if is_main:
        print(
            f"bench: {seconds * 1e3:.1f} ms/step, {tokens_per_step / seconds:,.0f} tokens/s, "
            f"{gflop:.2f} GFLOP of matmuls per step ({gflop / seconds:.0f} GFLOP/s) | "
            f"batch {args.batch_size} x {world_size} process(es), {torch.get_num_threads()} threads, "
            f"{'bf16' if bf16 else 'fp32'} (nothing written)"
        )
    if world_size > 1:
        dist.destroy_process_group()


def start_log(args, origin, step, metrics_path):
    """A new run (or branch) starts a new metrics log (--overwrite: nothing of the old run stays); a resumed one
    drops what it logged after its last save, since it redoes those steps."""
    folder = os.path.dirname(args.out) or "."
    os.makedirs(folder, exist_ok=True)
    if origin != "resuming":
        earlier = [metrics_path]
        if args.overwrite:
            earlier += [args.out, os.path.join(folder, "curves.png")]
            earlier += glob.glob(os.path.join(glob.escape(folder), "ckpt-step*.pt"))  # its --snapshots
        for path in filter(os.path.exists, earlier):
            os.remove(path)
    elif os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        write_text(metrics_path, "".join(kept))


def save_checkpoint(model, optimizer, dataset, tasks, args, step, snapshots, device, world_size, is_main):
    """Weights, config, arguments, task table, optimizer and every rank's RNG state (gathered on rank 0), written
    atomically to --out, and kept as a snapshot at the --snapshots steps."""
    rng = dict(
        numpy=[dataset.rng.bit_generator.state],
        torch=[torch.get_rng_state()],
        cuda=[torch.cuda.get_rng_state(device) if device.type == "cuda" else None],
    )
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rng)
        rng = {key: [g[key][0] for g in gathered] for key in rng}
    if is_main:
        state = dict(model=model.state_dict(), model_args=asdict(model.cfg), args=asdict(args), tasks=tasks,
                     optimizer=optimizer.state_dict(), rng=rng, step=step, world_size=world_size)  # fmt: skip
        save_atomic(state, args.out)
        if step in snapshots:
            save_atomic(state, snapshot_path(args.out, step))


def log_heldout(model, dataset, heldout, device, autocast, step, metrics_path):
    """Held-out loss and accuracy per task, appended to metrics.jsonl and summed up in one line. -> the metrics."""
    metrics = heldout_metrics(model, dataset, heldout, device, autocast)
    with open(metrics_path, "a") as f:
        f.write(json.dumps(dict(step=step, heldout=metrics)) + "\n")  # per task: [loss, accuracy]
    mean_loss, mean_acc = np.mean([m[0] for m in metrics.values()]), np.mean([m[1] for m in metrics.values()])
    domains = domain_means(metrics)
    split = "".join(f" | {d} {lo:.3f} / {ac:.3f}" for d, (lo, ac) in domains.items()) if len(domains) > 1 else ""
    worst = sorted(metrics.items(), key=lambda kv: kv[1][1])[:3]
    tqdm.write(
        f"step {step} | held-out loss {mean_loss:.3f} acc {mean_acc:.3f}{split} | lowest acc: "
        + ", ".join(f"{n} {a:.2f}" for n, (_, a) in worst)
    )
    return metrics


def report(metrics, timed_steps, seconds, tokens_per_step, metrics_path, args):
    """The end of a run: held-out numbers per task and per domain, throughput, and curves.png."""
    if metrics:
        print("\nheld-out action loss / accuracy per task:")
        for name, (loss_value, acc) in metrics.items():
            print(f"  {name:<28} {loss_value:.3f} / {acc:.3f}")
        losses, accuracies = zip(*metrics.values())
        print(f"mean {np.mean(losses):.3f} / {np.mean(accuracies):.3f}")
        if len(domain_means(metrics)) > 1:
            for domain, (loss_value, acc) in domain_means(metrics).items():
                print(f"mean {domain:<23} {loss_value:.3f} / {acc:.3f}")
    if timed_steps:
        print(
            f"{timed_steps} steps in {seconds:.0f} s: {seconds / timed_steps * 1e3:.0f} ms/step, "
            f"{tokens_per_step * timed_steps / seconds:,.0f} tokens/s"
        )
    if os.path.exists(metrics_path):
        plot_pretraining(metrics_path, os.path.join(os.path.dirname(args.out) or ".", "curves.png"))
    print(f"wrote {args.out}" + (f" and {os.path.dirname(args.out) or '.'}/curves.png" if metrics else ""))


def plot_pretraining(metrics_path, png_path):
    """Held-out action loss and accuracy (mean over tasks) against the step, from pretrain.py's metrics.jsonl."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r["step"] for r in rows]
    losses, accuracies = ([np.mean([m[i] for m in r["heldout"].values()]) for r in rows] for i in (0, 1))
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(7, 2.8))
    ax_loss.plot(steps, losses, marker="o", ms=3), ax_loss.set_ylabel("held-out action loss")
    ax_acc.plot(steps, accuracies, marker="o", ms=3), ax_acc.set_ylabel("held-out action accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step")
    fig.suptitle(f"pre-training: mean over {len(rows[0]['heldout'])} tasks' held-out episodes", fontsize=9)
    save_figure(fig, png_path)


def main(args):
    # --- setup: check everything, load the data, build or restore the model ---------------------------------
    try:
        if args.export:
            return export_backbone(args.out, args.export, args.overwrite)
        device, world_size, rank = start_processes(args)
        is_main = rank == 0
        names, act_dim, bf16, snapshots, ckpt, origin = check_run(args, device, world_size, is_main)
        tasks, dataset, pools, heldout = load_data(
            names, args.data_dir, args.holdout_episodes, args.context_len, act_dim, DTConfig.n_bins, args.seed + rank
        )
        if is_main and not args.bench:  # one writer per folder: its checkpoint and metrics.jsonl are this run's
            lock_folder(os.path.dirname(args.out) or ".", "--out's folder")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"pretrain.py: error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
    model, optimizer, step = build_model(args, act_dim, ckpt, dataset, device, rank)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    step_fn = functools.partial(train_step, model, train_model, optimizer, dataset, pools, args, device, autocast)
    tokens_per_step = args.batch_size * world_size * model.cfg.tokens_per_step * model.cfg.context_len
    metrics_path = os.path.join(os.path.dirname(args.out) or ".", "metrics.jsonl")
    if args.bench:
        return bench(step_fn, args, device, tokens_per_step, world_size, bf16, is_main)
    if is_main:
        start_log(args, origin, step, metrics_path)
        n_params, transitions = sum(p.numel() for p in model.parameters()), sum(t["transitions"] for t in tasks)
        print(f"{n_params / 1e6:.2f}M parameters | {len(tasks)} tasks, {transitions:,} transitions | {world_size} "
              f"process(es) on {device} | {tokens_per_step} tokens per step | {'bf16' if bf16 else 'fp32'}"
              + (f" | {origin} at step {step}" if ckpt is not None else ""))  # fmt: skip

    # --- the training loop ----------------------------------------------------------------------------------
    bar = tqdm(total=args.steps, initial=step, disable=not (is_main and sys.stderr.isatty()), dynamic_ncols=True)
    start, timed_steps, metrics = time.perf_counter(), 0, None
    while step < args.steps:
        lr = lr_at(step, args)
        loss, accuracy = step_fn(lr)
        step, timed_steps = step + 1, timed_steps + 1
        if is_main:
            seconds = time.perf_counter() - start
            status = (
                f"loss {loss.item():.3f} acc {accuracy.item():.3f} lr {lr:.1e} "
                f"{seconds / timed_steps * 1e3:.0f} ms/step {tokens_per_step * timed_steps / seconds:,.0f} tok/s"
            )
            bar.set_postfix_str(status)
            bar.update()
            if bar.disable and step % 500 == 0:  # a log file gets a plain line instead of a progress bar
                print(f"step {step} | {status}", flush=True)
        if (step % args.eval_every == 0 or step == args.steps) and is_main and heldout:
            metrics = log_heldout(model, dataset, heldout, device, autocast, step, metrics_path)
        if step % args.save_every == 0 or step == args.steps or step in snapshots:
            save_checkpoint(model, optimizer, dataset, tasks, args, step, snapshots, device, world_size, is_main)
    bar.close()

    if is_main:
        if metrics is None and heldout:  # resumed a finished run: nothing was evaluated above
            metrics = heldout_metrics(model, dataset, heldout, device, autocast)
        report(metrics, timed_steps, time.perf_counter() - start, tokens_per_step, metrics_path, args)
    if world_size > 1:  # tear down together: rank 1 once aborted in gloo's teardown while rank 0 was still writing
        dist.barrier()
        dist.destroy_process_group()


def cli(argv=None):
    """The command line: `python pretrain.py [flags]` (argv None = sys.argv)."""
    run_stage(main, parse_args(Args, argv, __doc__, GROUPS, CHOICES, PRESETS), "pretrain.py")


if __name__ == "__main__":
    cli()

"""Stage 3 of 4: continual fine-tuning of the pre-trained model on a sequence of tasks, one method at a time.

Reads the pre-trained checkpoint (pretrain.py) and data/<task>.npz of the sequence. Learns the tasks in order,
each from its own data only; after each task evaluates every task of the sequence (a row of the success matrix).
Writes <run-dir>/ckpt.pt after each task (for frozen-backbone methods only the pool, plus a pointer to the
pre-trained checkpoint) and, at the end, the run's results through evaluate.py (results.json/.md, figures).

Methods (--method):
  ft          full fine-tuning: every weight trained
  l2, ewc     full fine-tuning + lambda * sum_i F_i (theta_i - theta*_i)^2 toward the weights after the previous
              task (F = 1 for L2; for EWC a diagonal Fisher from the previous task's data, summed over tasks)
  lora        one shared set of low-rank modulators (a pool of one entry, no matching), backbone frozen
  ia3         one shared set of (IA)3 vectors scaling keys, values and the MLP's hidden activations, backbone frozen
  adapter     one shared set of bottleneck adapters, two per layer (Houlsby et al. 2019), backbone frozen
  l2m         L2M: a pool of key-matched low-rank modulators, backbone and action head frozen
  l2m-ia3     L2M with (IA)3 vectors as the pool's entries (the authors' l2m_ia3.yaml)
  l2m-oracle  L2M with the pool split into one group per task, masked by the task id
  l2m-stats   l2m-oracle's pool and training, evaluated without the task id: the task is inferred from the running
              mean of the episode's queries, by Gaussian statistics of each task's training queries (beyond the paper)
  l2p-pv2     L2P: a pool of key-matched prompts, the top 5 prepended to every layer's input (P-tuning v2)
  l2p-pret    L2P with the prompts as every layer's attention key/value prefixes (prefix tuning)
  l2p-pt      L2P with the prompts prepended to the input only (prompt tuning)
  er          full fine-tuning with experience replay: a share of every batch from a few kept episodes of each
              earlier task
  multitask   full fine-tuning on all tasks of the sequence at once (no forgetting by construction: the reference)
  packnet     PackNet: each task trains the weights no earlier task owns, keeps the largest of them, retrains those;
              evaluation of task j uses the weights of tasks <= j (needs the task id)

Examples:
  python finetune.py                                  # L2M on CW10 with CPU defaults
  python finetune.py --method ft --tasks cw10
  python finetune.py --method l2m --resume            # continue after the last finished task
"""

import functools
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from collect import (
    PRECISIONS,
    check_output,
    fields_from,
    file_sha256,
    keep_freed_memory,
    load_checkpoint,
    lock_folder,
    parse_args,
    resolve_device,
    resolve_tasks,
    run_stage,
    save_atomic,
    use_bf16,
    watch_parent,
)
from evaluate import (
    RETENTION_SUBSETS,
    build_model,
    env_workers,
    evaluate_tasks,
    routing_accuracy,
    write_sequence_report,
)
from model import PROMPT_KINDS, action_loss, make_pool
from pretrain import load_data, matmul_gflop, synchronize

CURVE_EVERY = 50  # training steps averaged into one point of training_curves.png
LOG_EVERY = 500  # steps between the plain log lines written when stderr is not a terminal
LAUNCHER_PID = "L2M_LAUNCHER_PID"  # set by --methods/--seeds in each run's environment: the process it ends with


@dataclass(frozen=True)
class Method:
    """What a continual-learning method is, as the loop, the checkpoint and evaluate.py read it: one row of METHODS.
    Adding a method means adding a row (and, if it trains something new, its objective in train_step)."""

    frozen: bool = False  # the pre-trained weights stay fixed: only `modules` train
    modules: str = ""  # what is attached: a pool kind of model.py (lora, ia3; L2P's pt, pv2, pret) or "adapter"
    key_matched: bool = False  # entries chosen per sample by matching their keys to the query; keys pulled (L2M, L2P)
    grouped: bool = False  # the pool split into one group per task; training is told the task's index
    told_task_id: bool = False  # evaluation is told the task id (an upper bound, not continual learning proper)
    infers_task: bool = False  # the task id inferred at evaluation from per-task query statistics (l2m-stats)
    penalty: str = ""  # "l2" / "ewc": after each task, later tasks are pulled toward its weights (EWC: Fisher-weighted)
    batches: str = "task"  # a step's data: the task's; "replay": plus earlier tasks' kept episodes; "all": every task
    prunes: bool = False  # PackNet: after a task, keep its largest free weights, retrain them, freeze them


METHODS = {  # the paper's baselines, L2M and its variants; see docs/stages.md for each one's sources
    "ft":         Method(),
    "l2":         Method(penalty="l2"),
    "ewc":        Method(penalty="ewc"),
    "er":         Method(batches="replay"),
    "multitask":  Method(batches="all"),
    "packnet":    Method(prunes=True, told_task_id=True),
    "lora":       Method(frozen=True, modules="lora"),
    "ia3":        Method(frozen=True, modules="ia3"),
    "adapter":    Method(frozen=True, modules="adapter"),
    "l2m":        Method(frozen=True, modules="lora", key_matched=True),
    "l2m-ia3":    Method(frozen=True, modules="ia3", key_matched=True),
    "l2m-oracle": Method(frozen=True, modules="lora", key_matched=True, grouped=True, told_task_id=True),
    "l2m-stats":  Method(frozen=True, modules="lora", key_matched=True, grouped=True, infers_task=True),
    "l2p-pt":     Method(frozen=True, modules="pt", key_matched=True),
    "l2p-pv2":    Method(frozen=True, modules="pv2", key_matched=True),
    "l2p-pret":   Method(frozen=True, modules="pret", key_matched=True),
}  # fmt: skip
STATS_WINDOWS = 4096  # l2m-stats: training windows whose queries fit a task's statistics (our choice)


@dataclass
class Args:
    preset: str = "cpu"
    """cpu (the defaults shown here) | paper: the paper's steps per task, batch, lr and evaluation episodes (PRESETS
    below); flags given on the command line still win"""
    ckpt: str = "checkpoints/mt40-4x128.pt"
    """pre-trained checkpoint: the shipped backbone (README), or a pretrain.py run's ckpt.pt or exported backbone"""
    method: str = "l2m"
    """the method (see above)"""
    tasks: str = "cw10"
    """the task sequence, in order (names or list names: cw10, dmc6, ...)"""
    data_dir: str = "data"
    """directory of <task>.npz files written by collect.py"""
    seed: int = 0
    """seed for the pool's initialization, sampling and dropout [>= 0]"""
    steps_per_task: int = 2500
    """gradient steps per task (authors: 100k); the default fits CW10 with its evaluations in ~20 min on 2
    cores [>= 1]"""
    batch_size: int = 64
    """windows per step (authors: 256) [>= 1]"""
    lr: float = 1e-3
    """constant learning rate, AdamW (authors: 1e-4) [> 0]"""
    weight_decay: float = 0.01
    """AdamW weight decay on Linear weights (none on the pool) [>= 0]"""
    grad_clip: float = 0.25
    """gradient-norm clip (authors); 0 = no clipping [>= 0]"""
    precision: str = "auto"
    """auto | bf16 | fp32, for training and for acting in the evaluations; auto = bf16 autocast where the hardware
    has it, else fp32"""
    eval_episodes: int = 10
    """episodes per task at each evaluation (authors: 5) [>= 1]"""
    pool_size: int = 30
    """l2m, l2m-ia3, l2m-oracle, l2m-stats: pool entries (l2m_lora.yaml, l2m_ia3.yaml) [>= 1]"""
    rank: int = 8
    """rank of the low-rank modulators (l2m_lora.yaml) [>= 1]"""
    alpha: float = 16.0
    """modulator scaling numerator: scale = alpha / rank (authors: 2 * rank) [> 0]"""
    pull_coef: float = 0.5
    """l2m, l2m-ia3, l2m-oracle, l2m-stats: weight of the key-pull term (pull_constraint_coef) [>= 0]"""
    adapter_reduction: int = 16
    """adapter: bottleneck width = n_embd / this (the authors' reduction_factor) [>= 1]"""
    prompt_pool_size: int = 100
    """l2p-*: prompts in the pool (l2p.yaml) [>= 1]"""
    prompt_length: int = 5
    """l2p-*: tokens per prompt (l2p.yaml) [>= 1]"""
    prompt_top_k: int = 5
    """l2p-*: prompts chosen per window, concatenated (l2p.yaml) [>= 1]"""
    reg_lambda: float = 400.0
    """l2/ewc: penalty weight (authors' default) [>= 0]"""
    fisher_batches: int = 10
    """ewc: batches for the diagonal Fisher estimate (authors) [>= 1]"""
    replay_episodes: int = 10
    """er: episodes kept of each finished task (our choice: a tenth of a 100-episode task) [>= 1]"""
    replay_share: float = 0.5
    """er: share of each batch drawn from the kept episodes of earlier tasks (our choice) [0, 1)"""
    packnet_retrain: float = 0.2
    """packnet: share of a task's steps spent retraining the kept weights after pruning (our choice) (0, 1)"""
    frozen_dropout: bool = False
    """frozen-backbone methods: keep dropout on in the backbone (the authors' set_frozen_eval=False); off by
    default, see docs/deviations.md, 15"""
    run_dir: str = ""
    """output directory; empty = <runs-root>/<method>-<tasks>-s<seed>"""
    runs_root: str = "runs"
    """parent folder of the default --run-dir (e.g. runs/md for runs of another backbone)"""
    device: str = "auto"
    """auto (cuda, else mps, else cpu), cpu, cuda or mps"""
    resume: bool = False
    """continue after the last finished task of --run-dir"""
    overwrite: bool = False
    """replace a run that --run-dir already holds"""
    bench: int = 0
    """time N training steps of the first task and one evaluation of the sequence (ms/step, tokens/s, matmul
    GFLOP per step, model vs simulator); writes nothing [>= 0]"""
    methods: str = ""
    """several runs side by side: comma-separated methods (with --seeds); each run is its own process with
    --threads 1, logging to <run-dir>/log.txt"""
    seeds: str = ""
    """several runs side by side: comma-separated seeds (with --methods)"""
    jobs: int = os.cpu_count() or 1
    """with --methods/--seeds: runs at once (one core each) [>= 1]"""
    threads: int = 0
    """torch threads of this process; 0 = torch's default (all cores) [>= 0]"""


GROUPS = {
    "what to run": "preset",
    "optimization": "steps_per_task",
    "method settings": "pool_size",
    "run control": "run_dir",
}
CHOICES = {"method": tuple(METHODS), "precision": PRECISIONS, "preset": ("cpu", "paper")}
PRESETS = {  # the authors' fine-tuning (cdt_mpdt_disc.yaml, run_params/finetune_coff.yaml; eval: 5 episodes per task)
    "paper": dict(steps_per_task=100_000, batch_size=256, lr=1e-4, eval_episodes=5),
}
# how a run is placed, continued, timed or launched, not what it computes (its --help group)
RUN_CONTROL = fields_from(Args, GROUPS["run control"])


def fisher_diagonal(model, dataset, pools, args, device, autocast):
    """EWC: E[(d log p / d theta)^2] over a few batches of the task just learned (the authors' 10 batches)."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(args.fisher_batches):
        inputs, valid, _ = dataset.sample(args.batch_size, pools, device)
        with autocast:
            logits, _ = model(**inputs)
        loss, _ = action_loss(logits, inputs["action_bins"], valid)
        model.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / args.fisher_batches
    model.zero_grad(set_to_none=True)
    return fisher


def quadratic_penalty(model, anchor, importance):
    """sum_i F_i (theta_i - theta*_i)^2 over the trained parameters (F = 1 for L2)."""
    total = 0.0
    for n, p in model.named_parameters():
        if n in anchor:
            weight = importance[n] if importance is not None else 1.0
            total = total + (weight * (p - anchor[n]) ** 2).sum()
    return total


def command_line(args):
    """The command that reproduces a run: `python finetune.py` and the flags that differ from the defaults."""
    flags = []
    for name, value in asdict(args).items():
        if name in RUN_CONTROL - {"run_dir", "runs_root"} or value == Args.__dataclass_fields__[name].default:
            continue
        if name == "run_dir" and value == default_run_dir(args):
            continue
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else "--no-" + flag[2:] if value is False else f"{flag} {value}")
    return " ".join(["python finetune.py", *flags])


def set_training(model, frozen_eval):
    """Training mode; with frozen_eval the frozen backbone runs as at evaluation (no dropout) and only the pool
    trains, so the modulators fit the function they will modulate when acting (the authors' set_frozen_eval)."""
    model.train(not frozen_eval)
    if model.pool is not None:
        model.pool.train()  # the count penalty and the selection counts are training-time behaviour


def default_run_dir(args, method=None, seed=None):
    """<runs-root>/<method>-<tasks>-s<seed>, for args' method and seed unless others are given."""
    method, seed = method or args.method, args.seed if seed is None else seed
    return os.path.join(args.runs_root, f"{method}-{args.tasks.replace(',', '+')}-s{seed}")


def check_grid(args):
    """--methods/--seeds -> (methods, seeds), each named once, after checking every run's settings, checkpoints and
    data as its own process would: raises ValueError before any run starts (an unknown method, a seed that is not a
    number, a --run-dir: one folder cannot hold several runs)."""
    methods = list(dict.fromkeys(m.strip() for m in (args.methods or args.method).split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(
            f"--methods: unknown method {', '.join(map(repr, unknown))} (choose from {', '.join(METHODS)})"
        )
    try:
        seeds = list(dict.fromkeys(int(s) for s in (args.seeds or str(args.seed)).split(",") if s.strip()))
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2") from None
    if args.run_dir:
        raise ValueError(
            "--run-dir names one run; with --methods/--seeds each run gets <runs-root>/<method>-<tasks>-s<seed>"
        )
    for method in methods:
        for seed in seeds:
            run = replace(args, method=method, seed=seed, methods="", seeds="")
            pretrained, _ = check_inputs(run, default_run_dir(run))
    load_sequence(args, pretrained["model_args"])
    return methods, seeds


def launch(args):
    """--methods/--seeds: one process per (method, seed), --jobs at a time, each with one torch thread (runs side by
    side use the cores better than threads within one run), logging to <run-dir>/log.txt; every run checked first."""
    try:
        methods, seeds = check_grid(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"finetune.py: error: {e}")
    shared = command_line(args).split()[2:] + ["--device", args.device]  # the flags this command set, minus the grid's
    for name in ("--method", "--seed", "--run-dir"):
        while name in shared:
            i = shared.index(name)
            del shared[i : i + 2]
    runs = []
    for method in methods:
        for seed in seeds:
            run_dir = default_run_dir(args, method, seed)
            os.makedirs(run_dir, exist_ok=True)
            argv = (
                [
                    sys.executable,
                    sys.argv[0],
                    "--method",
                    method,
                    "--seed",
                    str(seed),
                    "--run-dir",
                    run_dir,
                    "--threads",
                    "1",
                    *shared,
                ]
                + (["--resume"] if args.resume else [])
                + (["--overwrite"] if args.overwrite else [])
            )
            runs.append((run_dir, argv))
    print(f"{len(runs)} runs, {min(args.jobs, len(runs))} at a time: " + ", ".join(r for r, _ in runs))
    running, failed = [], []

    def stop(signum, frame):
        """The launcher owns its runs: stopped (SIGTERM, SIGINT, SIGHUP), it stops them first."""
        for _, process, _ in running:
            process.terminate()  # each run writes "stopped" to its log
        for _, process, _ in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        sys.exit(
            f"finetune.py: stopped by {signal.Signals(signum).name}, and with it {len(running)} runs "
            f"({', '.join(r for r, _, _ in running) or 'none'}); the same command with --resume continues them"
        )

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    child_env = {**os.environ, LAUNCHER_PID: str(os.getpid())}  # a kill -9 of the launcher then ends them too
    while runs or running:
        while runs and len(running) < args.jobs:
            run_dir, argv = runs.pop(0)
            log = open(os.path.join(run_dir, "log.txt"), "a")
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env)
            running.append((run_dir, process, log))
            print(f"started {run_dir}: {' '.join(argv[1:])} > {run_dir}/log.txt")
        time.sleep(1.0)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            print(f"{'finished' if item[1].returncode == 0 else 'FAILED'} {item[0]} (see {item[0]}/log.txt)")
            if item[1].returncode != 0:
                failed.append(item[0])
    if failed:
        sys.exit(f"finetune.py: error: {len(failed)} runs failed: {', '.join(failed)}")


def build_learner(pretrained, args, n_tasks, device):
    """The pre-trained model with what the method trains attached. -> (model, pool settings, adapter settings)."""
    torch.manual_seed(args.seed)
    try:
        model = build_model(pretrained, device)
    except ValueError as e:
        sys.exit(f"finetune.py: error: {args.ckpt}: {e}")
    return model, *attach_method(model, args, n_tasks, device)


def attach_method(model, args, n_tasks, device):
    """Freeze the backbone and attach what the modulation methods train. -> (pool settings, adapter settings),
    each None where the method has none."""
    method = METHODS[args.method]
    if method.prunes:  # every weight matrix and embedding table is shared out; -1: owned by no task yet
        model.owners = {n: torch.full_like(p, -1, dtype=torch.int8) for n, p in model.named_parameters() if p.dim() > 1}
    if not method.frozen:
        return None, None
    for p in model.parameters():  # L2M: the backbone frozen, every pre-trained weight, the action head included
        p.requires_grad_(False)
    if method.modules == "adapter":
        adapter_args = dict(reduction=args.adapter_reduction)
        model.attach_adapters(**adapter_args)
        return None, adapter_args
    if method.modules in PROMPT_KINDS:
        pool_args = dict(
            pool_size=args.prompt_pool_size, length=args.prompt_length, top_k=args.prompt_top_k, kind=method.modules
        )
        model.pool = make_pool(model.cfg.n_layer, model.cfg.n_embd, **pool_args).to(device)
        return pool_args, None
    pool_args = dict(
        pool_size=args.pool_size if method.key_matched else 1,
        rank=args.rank,
        alpha=args.alpha,
        n_groups=n_tasks if method.grouped else 0,
        kind=method.modules,
        **(dict(task_stats=True) if method.infers_task else {}),
    )
    model.pool = make_pool(model.cfg.n_layer, model.cfg.n_embd, **pool_args).to(device)
    return pool_args, None


def check_inputs(args, run_dir):
    """A run's settings and checkpoints, checked before any training: -> (pre-trained ckpt, resumed ckpt or None)."""
    out = os.path.join(run_dir, "ckpt.pt")
    if args.method not in METHODS:
        raise ValueError(f"unknown --method {args.method!r}: use one of {', '.join(METHODS)}")
    names = resolve_tasks(args.tasks, repeats_allowed=False)
    check_output(run_dir, "--run-dir", is_dir=True)
    use_bf16(args.precision, resolve_device(args.device))
    if args.prompt_top_k > args.prompt_pool_size:
        raise ValueError(f"--prompt-top-k {args.prompt_top_k} > --prompt-pool-size {args.prompt_pool_size}")
    if METHODS[args.method].grouped and args.pool_size < len(names):
        raise ValueError(
            f"{args.method} splits the pool into one group per task: --pool-size {args.pool_size} < {len(names)} tasks"
        )
    pretrained = load_checkpoint(args.ckpt, kinds=("pretrain",))
    resumed = None
    if os.path.exists(out) and not args.bench and not args.overwrite:
        if not args.resume:
            raise ValueError(
                f"{run_dir} already holds a run: --resume continues it, --overwrite replaces it, "
                f"--run-dir puts this one elsewhere"
            )
        resumed = load_checkpoint(out, kinds=("finetune",))
        made_with = {**asdict(Args()), **resumed["args"]}  # a setting newer than the checkpoint: its default
        differs = [
            f"--{k.replace('_', '-')} {made_with[k]!r} (checkpoint) vs {v!r} (now)"
            for k, v in asdict(args).items()
            if k not in RUN_CONTROL | {"ckpt"} and made_with[k] != v  # the backbone: compared by content below
        ]
        if resumed["pretrained"]["sha256"] != file_sha256(args.ckpt):
            differs.append(f"--ckpt {args.ckpt} is not the pre-trained checkpoint the run started from (its content)")
        if differs:
            raise ValueError(f"cannot resume {out}: it was made with other settings: {'; '.join(differs)}")
    return pretrained, resumed


def load_sequence(args, model_args):
    """Every task's data up front, so a missing or mismatched file fails before any training. -> [(task entry,
    dataset, episode pools)] in sequence order."""
    data = []
    for name in resolve_tasks(args.tasks, repeats_allowed=False):
        tasks, dataset, pools, _ = load_data(
            [name], args.data_dir, 0, model_args["context_len"], model_args["act_dim"], model_args["n_bins"],
            args.seed + len(data),
        )  # fmt: skip
        data.append((tasks[0], dataset, pools))
    return data


def train_step(model, optimizer, sample, args, task_ids, anchor, importance, autocast):
    """One gradient step on the method's objective: the action loss, minus L2M's key pull, plus L2/EWC's penalty.
    sample() -> a batch. -> (action loss, accuracy, routing)."""
    inputs, valid, _ = sample()
    with autocast:
        logits, routing = model(**inputs, task_ids=task_ids)
    loss, accuracy = action_loss(logits, inputs["action_bins"], valid)
    objective = loss
    if METHODS[args.method].key_matched:
        objective = objective - args.pull_coef * routing["pull"]  # L2M: pull chosen keys toward queries
    if anchor is not None:
        objective = objective + args.reg_lambda * quadratic_penalty(model, anchor, importance)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
    optimizer.step()
    return loss, accuracy, routing


def sample_tasks(data, task_weights, batch_size, rng, device):
    """A batch whose windows come from several tasks: from task j about batch_size * task_weights[j] of them
    (a multinomial draw), each from that task's episode pools. data: the run's (task, dataset, pools) per task."""
    counts = rng.multinomial(batch_size, task_weights)
    parts = [data[j][1].sample(n, data[j][2], device, rng) for j, n in enumerate(counts) if n > 0]
    inputs = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
    return inputs, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def batch_source(data, task_index, args, device):
    """What a step of this task trains on. -> sample(), a batch of args.batch_size windows:
    multitask: every task of the sequence, equally; er: the task's own data, plus args.replay_share of the batch
    from args.replay_episodes kept episodes of each earlier task, equally; the others: the task's own data."""
    _, dataset, pools = data[task_index]
    rng = np.random.default_rng([args.seed, task_index])  # the task's own draws, so a resumed run draws the same
    batches = METHODS[args.method].batches
    if batches == "all":
        weights = np.full(len(data), 1.0 / len(data))
        return functools.partial(sample_tasks, data, weights, args.batch_size, rng, device)
    if batches == "task" or task_index == 0:
        return functools.partial(dataset.sample, args.batch_size, pools, device)
    kept = []  # ER's buffer: the same few episodes of each earlier task, whichever task is being learned
    for j, (task, earlier, earlier_pools) in enumerate(data[:task_index]):
        episodes = np.concatenate(earlier_pools)
        chosen = np.random.default_rng([args.seed, j, 1]).permutation(episodes)[: args.replay_episodes]
        kept.append((task, earlier, [np.sort(chosen)]))
    n_replay = round(args.batch_size * args.replay_share)
    weights = np.full(task_index, 1.0 / task_index)

    def sample():
        own = dataset.sample(args.batch_size - n_replay, pools, device, rng)
        if n_replay == 0:
            return own
        replay = sample_tasks(kept, weights, n_replay, rng, device)
        return {k: torch.cat([own[0][k], replay[0][k]]) for k in own[0]}, *(
            torch.cat(p) for p in zip(own[1:], replay[1:])
        )

    return sample


@torch.no_grad()
def fit_task_statistics(model, task_index, dataset, pools, args, device):
    """l2m-stats, after a task: the mean and covariance of its training windows' queries (TaskStatistics). Draws from
    its own generator, so the run trains exactly as l2m-oracle with the same seed."""
    rng = np.random.default_rng([args.seed, task_index, 2])
    queries = []
    for _ in range(STATS_WINDOWS // 512):
        inputs, _, _ = dataset.sample(512, pools, device, rng)
        tokens = model.embed(inputs["states"], inputs["returns"], inputs["action_bins"], inputs["rewards"],
                             inputs["timesteps"])  # fmt: skip
        queries.append(model.query(tokens, inputs["step_mask"]))  # (512, C)
    model.pool.tasks.fit(task_index, torch.cat(queries))


def packnet_prune(model, task_index, n_tasks):
    """PackNet after a task's training: of the weights no task owns yet, the task keeps the largest 1/(tasks left)
    (all of them for the last task) and the rest are zeroed, free for the tasks to come (Mallya & Lazebnik 2018)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, owner in model.owners.items():
            p, free = params[name], model.owners[name] == -1
            keep = round(int(free.sum()) / (n_tasks - task_index))
            magnitude = p.abs().masked_fill(~free, -1.0).flatten()
            owner.view(-1)[magnitude.topk(keep).indices] = task_index
            p.masked_fill_(owner == -1, 0.0)


def packnet_freezer(model, task_index, retraining):
    """PackNet's constraint, applied after every optimizer step: weights owned by earlier tasks stay as they are, so
    do (once pruned) the free ones, and every weight PackNet does not prune (biases, LayerNorms) after the first task.
    -> restore(), which writes the frozen values back."""
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {}
    for name, p in model.named_parameters():
        owner = model.owners.get(name)
        if owner is None:
            frozen[name] = torch.tensor(task_index > 0, device=p.device)
        else:
            frozen[name] = owner != task_index if retraining else owner >= 0

    def restore():
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.where(frozen[name], snapshot[name], p))

    return restore


def train_task(step_fn, steps, name, pool_size):
    """`steps` calls of step_fn with a progress bar (a plain line every 500 steps in a log). -> (losses, seconds)."""
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, disable=not sys.stderr.isatty())
    for step in bar:
        loss, accuracy, routing = step_fn()
        losses.append(loss.item())
        to_log = bar.disable and ((step + 1) % LOG_EVERY == 0 or step + 1 == steps)  # a log file: plain lines
        if to_log or (not bar.disable and step % 10 == 0):
            used = f" entries {sorted(set(routing['index'].flatten().tolist()))}" if pool_size > 1 else ""
            status = f"loss {np.mean(losses[-LOG_EVERY:]):.3f} acc {accuracy.item():.3f}{used}"
            bar.set_postfix_str(status)
            if to_log:
                ms = 1e3 * (time.perf_counter() - start) / (step + 1)
                print(f"{name} | step {step + 1} | {status} | {ms:.0f} ms/step", flush=True)
    return losses, time.perf_counter() - start


def consolidate(model, args, task_data, device, autocast, progress):
    """L2/EWC after a task: progress's anchor, the weights the next tasks are pulled toward (the weights now), and
    for EWC its importance, the Fisher diagonal summed over the tasks so far."""
    _, dataset, pools = task_data
    if METHODS[args.method].penalty == "ewc":
        fisher = fisher_diagonal(model, dataset, pools, args, device, autocast)
        importance = progress["importance"]
        progress["importance"] = fisher if importance is None else {n: importance[n] + fisher[n] for n in fisher}
    progress["anchor"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


RUN_OUTPUTS = ("ckpt.pt", "results.json", "results.md", "success_matrix.png", "success_curves.png",
               "training_curves.png", "routing.png")  # fmt: skip


def remove_outputs(run_dir):
    """--overwrite: the old run's files go before the new run writes anything, so that none of them (its results,
    its retention evaluations) can be read as the new run's if this one stops early."""
    paths = [os.path.join(run_dir, name) for name in RUN_OUTPUTS]
    paths += [
        os.path.join(run_dir, subset, name) for subset in RETENTION_SUBSETS for name in ("results.json", "results.md")
    ]
    removed = [path for path in paths if os.path.exists(path)]
    for path in removed:
        os.remove(path)
    if removed:
        print(f"--overwrite: removed the old run's {', '.join(os.path.relpath(p, run_dir) for p in removed)}")


def stop_run(signum, frame):
    """SIGTERM (or the launcher gone): end with a line in the log; the checkpoint on disk is the last finished
    task's (writes are atomic), so --resume continues from there."""
    sys.exit(f"finetune.py: stopped by {signal.Signals(signum).name}; --resume continues after the last finished task")


def end_with_launcher():
    """A run ends on SIGTERM with a line in its log, and a run started by --methods/--seeds also ends when its
    launcher is gone, even after the launcher's kill -9."""
    signal.signal(signal.SIGTERM, stop_run)
    if LAUNCHER_PID in os.environ:
        launcher = int(os.environ.pop(LAUNCHER_PID))

        def launcher_gone():
            print(f"the launcher (pid {launcher}) is gone", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

        watch_parent(launcher, launcher_gone)


def restore(model, resumed, device):
    """A resumed run's trained modules, PackNet's owners and the RNG state, back where its last finished task left
    them. -> its progress (the checkpoint's success, success_any, stages, anchor and importance)."""
    model.load_state_dict({**model.state_dict(), **resumed["model"]})
    model.owners = resumed.get("owners")
    torch.set_rng_state(resumed["rng"])
    if device.type == "cuda" and resumed.get("cuda_rng") is not None:  # dropout on the GPU draws from this one
        torch.cuda.set_rng_state(resumed["cuda_rng"], device)
    return {k: resumed.get(k) for k in ("success", "success_any", "stages", "anchor", "importance")}


def learn_task(model, method, step_fn, task_index, sequence, args):
    """One task's args.steps_per_task steps (PackNet: train the free weights, keep the largest, retrain those).
    -> (losses, seconds)."""
    n_tasks = len(sequence)
    name = f"task {task_index + 1}/{n_tasks} {sequence[task_index]['name']}"
    if method.batches == "all":
        name = f"stage {task_index + 1}/{n_tasks}, all tasks"
    if not method.prunes:
        return train_task(step_fn, args.steps_per_task, name, model.pool.size if model.pool else 0)
    retrain_steps = round(args.packnet_retrain * args.steps_per_task)
    losses, train_seconds = [], 0.0
    for retraining, steps in ((False, args.steps_per_task - retrain_steps), (True, retrain_steps)):
        restore_owned = packnet_freezer(model, task_index, retraining)
        phase_losses, seconds = train_task(lambda: (step_fn(), restore_owned())[0], steps, name, 0)  # noqa: B023
        losses, train_seconds = losses + phase_losses, train_seconds + seconds
        if not retraining:
            packnet_prune(model, task_index, n_tasks)
    return losses, train_seconds


def evaluate_stage(model, method, progress, task_index, data, losses, train_seconds, args, device, bf16):
    """After a task: every task of the sequence evaluated (success at the last and at any step), appended to
    progress with the task's training record, and one line printed."""
    task, dataset, pools = data[task_index]
    model.eval()
    if model.pool is not None and model.pool.tasks is not None:  # l2m-stats: the statistics task inference uses
        fit_task_statistics(model, task_index, dataset, pools, args, device)
    start, sequence = time.perf_counter(), [t for t, _, _ in data]
    ids = list(range(len(sequence))) if method.told_task_id else None
    results = evaluate_tasks(
        model, sequence, args.eval_episodes, device, ids, bf16=bf16, env_processes=torch.get_num_threads()
    )
    progress["success"].append([r["success"] for r in results])
    progress["success_any"].append([r["success_any"] for r in results])
    progress["stages"].append(dict(
        task=task["name"],
        train_loss=float(np.mean(losses[-100:])),
        loss_curve=[float(np.mean(losses[i : i + CURVE_EVERY])) for i in range(0, len(losses), CURVE_EVERY)],
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - start,
        results=results,
    ))  # fmt: skip
    print(
        f"after {task['name']}: loss {progress['stages'][-1]['train_loss']:.3f} | success at the last step "
        f"[{' '.join(f'{s:.1f}' for s in progress['success'][-1])}], any step "
        f"[{' '.join(f'{s:.1f}' for s in progress['success_any'][-1])}] | {train_seconds:.0f} s training "
        f"({1e3 * train_seconds / args.steps_per_task:.0f} ms/step), "
        f"{progress['stages'][-1]['eval_seconds']:.0f} s evaluating"
    )
    if "inferred" in results[0]:  # l2m-stats: how often each learned task's steps were given its own id
        right = " ".join(f"{now:.2f}" for _, _, now in routing_accuracy(progress["stages"]))
        print(f"  task inferred right (share of steps): [{right}]")


def run_record(args, method, pretrained, sequence, pool_args, adapter_args, model, run_dir):
    """What every checkpoint of a run repeats: its method and settings, the model's shape and the pre-trained file
    it modulates (identified by its hash: evaluate.py checks it)."""
    return dict(
        kind="finetune", method=args.method, args=asdict(args),
        command=command_line(args), tasks=sequence,
        setting={k: v for k, v in asdict(args).items() if k not in RUN_CONTROL | {"seed"}},  # seeds share one
        model_args=pretrained["model_args"], pool_args=pool_args, adapter_args=adapter_args,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        pretrained=dict(path=os.path.abspath(args.ckpt), relpath=os.path.relpath(args.ckpt, run_dir),
                        step=pretrained["step"], sha256=file_sha256(args.ckpt)),
    )  # fmt: skip


def run_state(model, method, progress, device):
    """What changes after each task: a frozen-backbone method's trained modules only (a full model otherwise), the
    progress so far, PackNet's owners and the RNG state, for --resume."""
    state = model.state_dict()
    return dict(
        model={n: v for n, v in state.items() if n.startswith(("pool.", "adapters."))} if method.frozen else state,
        **progress, owners=model.owners,
        rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    )  # fmt: skip


def main(args):
    if args.methods or args.seeds:
        return launch(args)
    end_with_launcher()
    if args.threads:
        torch.set_num_threads(args.threads)
    env_workers(torch.get_num_threads() - 1)  # the evaluations' env processes, forked before torch computes anything
    run_dir, method = args.run_dir or default_run_dir(args), METHODS[args.method]
    try:
        pretrained, resumed = check_inputs(args, run_dir)
        data = load_sequence(args, pretrained["model_args"])
        if not args.bench:
            lock_folder(run_dir, "--run-dir")  # one writer per run
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"finetune.py: error: {e}")
    if args.overwrite and not args.bench:
        remove_outputs(run_dir)
    device, sequence, out = resolve_device(args.device), [task for task, _, _ in data], os.path.join(run_dir, "ckpt.pt")
    keep_freed_memory()

    # --- the model: the pre-trained backbone, and what the method trains -------------------------------------
    model, pool_args, adapter_args = build_learner(pretrained, args, len(sequence), device)
    frozen_eval = method.frozen and not args.frozen_dropout  # the backbone runs as when acting (deviation 15)
    set_training(model, frozen_eval)
    progress = dict(success=[], success_any=[], stages=[], anchor=None, importance=None)  # anchor: l2/ewc's weights
    if resumed is not None:
        progress = restore(model, resumed, device)
        print(f"resuming {out} after task {len(progress['success'])}/{len(sequence)}")
    record = run_record(args, method, pretrained, sequence, pool_args, adapter_args, model, run_dir)
    trainable, total = record["trainable_params"], sum(p.numel() for p in model.parameters())
    print(f"{args.method} on {len(sequence)} tasks: {trainable:,} trainable of {total:,} parameters "
          f"({trainable / total:.1%}) | {device}, {torch.get_num_threads()} threads")  # fmt: skip
    bf16 = use_bf16(args.precision, device)  # training under bf16 autocast, and acting in the evaluations
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    start_all = time.perf_counter()

    # --- the sequence: train on each task, then evaluate every task and save -------------------------------
    for task_index in range(len(progress["success"]), len(sequence)):
        if model.pool is not None:
            model.pool.start_task(task_index)  # L2M: the task switch refreshes the count penalty
        task_ids = torch.full((args.batch_size,), task_index, device=device) if method.grouped else None
        # A fresh optimizer per task: with Adam's moments carried over, the modulators of finished tasks would keep
        # moving on their momentum while the next task trains (zero gradient, non-zero update); fresh moments leave
        # every entry the new task does not select bit-identical. The authors keep one optimizer for the sequence.
        optimizer = model.configure_optimizer(args.lr, args.weight_decay)
        step_fn = functools.partial(train_step, model, optimizer, batch_source(data, task_index, args, device), args,
                                    task_ids, progress["anchor"], progress["importance"], autocast)  # fmt: skip
        if args.bench:
            return bench(model, sequence, step_fn, args, device, method.told_task_id, bf16)
        losses, train_seconds = learn_task(model, method, step_fn, task_index, sequence, args)
        if method.penalty:  # the next tasks are pulled toward the weights after this one
            consolidate(model, args, data[task_index], device, autocast, progress)
        evaluate_stage(model, method, progress, task_index, data, losses, train_seconds, args, device, bf16)
        set_training(model, frozen_eval)
        save_atomic({**record, **run_state(model, method, progress, device)}, out)

    print(write_sequence_report(run_dir, load_checkpoint(out)))
    print(f"{time.perf_counter() - start_all:.0f} s in all | wrote {out} and {run_dir}/results.json, results.md, *.png")


def bench(model, sequence, step_fn, args, device, told_task_id, bf16):
    """--bench N: ms/step and tokens/s of N training steps (after 3 warm-up steps; one more step's matmul FLOPs
    counted), then one evaluation of the sequence with its model/simulator split. Writes nothing."""
    tokens_per_step = args.batch_size * model.cfg.context_len * model.cfg.tokens_per_step
    for _ in range(3):
        step_fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.bench):
        step_fn()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.bench
    gflop = matmul_gflop(step_fn)  # one more step, counted (L2M: grows with the entries a batch uses)
    print(
        f"bench {args.method}: {seconds * 1e3:.1f} ms/step, {tokens_per_step / seconds:,.0f} tokens/s, "
        f"{gflop:.2f} GFLOP of matmuls per step ({gflop / seconds:.0f} GFLOP/s) "
        f"(batch {args.batch_size}, {torch.get_num_threads()} threads)"
    )
    model.eval()
    timings, start = [], time.perf_counter()
    ids = list(range(len(sequence))) if told_task_id else None
    results = evaluate_tasks(model, sequence, args.eval_episodes, device, ids, timings, bf16, torch.get_num_threads())
    total = time.perf_counter() - start
    steps = sum(r["env_steps"] for r in results)
    build_s, model_s, env_s = (sum(t[k] for t in timings) for k in ("build_seconds", "model_seconds", "env_seconds"))
    print(
        f"bench evaluation: {steps:,} env steps in {total:.1f} s | building envs {build_s / total:.0%}, "
        f"model {model_s / total:.0%}, simulator {env_s / total:.0%}"
    )


def cli(argv=None):
    """The command line: `python finetune.py [flags]` (argv None = sys.argv)."""
    run_stage(main, parse_args(Args, argv, __doc__, GROUPS, CHOICES, PRESETS), "finetune.py")


if __name__ == "__main__":
    cli()

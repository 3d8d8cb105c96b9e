"""Stage 1 of 4: task lists, environments, and the offline datasets.

Reads nothing. Writes one `data/<task>.npz` per task, from one of two behaviour sources:
  scripted  metaworld's hand-written expert for the task, with Gaussian action noise whose std is drawn per
            episode from a mixture of levels, so the data spans expert and imperfect behaviour
            (Meta-World only; the default there).
  sac       Soft Actor-Critic trained online on the task; every transition it experienced (its whole replay
            buffer) is the dataset. This is how the paper's data was made, and the only way for DMControl.

Data contract (`data/<task>.npz`, flat over transitions, episodes contiguous):
  observations (N, obs_dim) float32   Meta-World: its 39 columns, not padded; DMControl: the 204-column layout
                                      of the authors' data (DMC_SLOTS below)
  actions      (N, act_dim) float32   in [-1, 1], the action that was executed
  rewards      (N,)         float32
  dones        (N,)         bool      last step of an episode (termination or time limit)
  successes    (N,)         bool      Meta-World only: info["success"] after the step
  random_return ()          float32   DMControl only: mean return of uniform-random actions (10 episodes), the
                                      zero of the data-normalized score (the paper's DMControl metric)
  data_return ()            float32   optional, DMControl: the score's 1 (the authors' files: their data's mean
                                      return); absent, pretrain.py takes the mean of the file's best 10% episodes

Examples:
  python collect.py                                   # the 50 Meta-World tasks, scripted (~5 min on 2 cores)
  python collect.py --tasks dmc16                     # SAC on the 16 DMControl tasks (~1 h on 2 cores)
  python collect.py --tasks hammer-v3,cartpole-swingup --episodes 10 --overwrite
  python collect.py --source authors --authors-dir ~/dm_control --tasks dmc16   # the authors' released files
"""

import os

os.environ.setdefault("MUJOCO_GL", "disable")  # no display on servers: physics only (Meta-World is built untextured)

import argparse
import ast
import atexit
import codecs
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import fcntl
import functools
import glob
import hashlib
import inspect
import math
import multiprocessing
import pickle
import re
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------
# Task lists (defined once; every stage imports them from here)

# fmt: off
# Continual World's CW10 sequence, in order (Wolczyk et al. 2021; the authors' configs/.../names/cw10_v2.yaml).
CW10 = [
    "hammer-v3", "push-wall-v3", "faucet-close-v3", "push-back-v3", "stick-pull-v3",
    "handle-press-side-v3", "push-v3", "shelf-place-v3", "window-close-v3", "peg-unplug-side-v3",
]
# Pre-training tasks: MT50 minus CW10, in the authors' config order (configs/.../names/mt40_v2.yaml).
MT40 = [
    "assembly-v3", "button-press-v3", "disassemble-v3", "plate-slide-side-v3", "door-lock-v3",
    "door-unlock-v3", "pick-place-v3", "drawer-close-v3", "coffee-pull-v3", "handle-pull-v3",
    "peg-insert-side-v3", "door-close-v3", "button-press-topdown-v3", "lever-pull-v3", "reach-v3",
    "door-open-v3", "sweep-v3", "box-close-v3", "button-press-wall-v3", "basketball-v3",
    "soccer-v3", "handle-press-v3", "coffee-button-v3", "faucet-open-v3", "plate-slide-v3",
    "reach-wall-v3", "handle-pull-side-v3", "drawer-open-v3", "dial-turn-v3", "sweep-into-v3",
    "bin-picking-v3", "coffee-push-v3", "pick-out-of-hole-v3", "button-press-topdown-wall-v3",
    "plate-slide-back-side-v3", "plate-slide-back-v3", "stick-push-v3", "hand-insert-v3",
    "window-open-v3", "pick-place-wall-v3",
]
MT50 = MT40 + CW10
# A fixed subset of the pre-training tasks (every 4th of MT40) on which retention is measured before and after
# fine-tuning (our choice: the paper reports retention on MT40 without naming a subset).
RETAIN10 = MT40[::4]
# DMControl pre-training tasks (configs/.../names/dmcontrol10.yaml), named <domain>-<task>.
DMC10 = [
    "cartpole-balance", "finger-turn_easy", "finger-turn_hard", "fish-upright", "hopper-stand",
    "pendulum-swingup", "point_mass-easy", "reacher-hard", "walker-stand", "walker-run",
]
# fmt: on
# DMControl fine-tuning tasks, in order. The authors' config repeats reacher-hard from DMC10 here; we use
# reacher-easy (their older list) so the 16 DMControl tasks are distinct, as the paper's dataset claims.
DMC6 = ["ball_in_cup-catch", "cartpole-swingup", "cheetah-run", "finger-spin", "reacher-easy", "walker-walk"]
DMC16 = DMC10 + DMC6
# The DMControl counterpart of RETAIN10 (every 2nd of DMC10, our choice): retention of a multi-domain backbone.
RETAIN_DMC5 = DMC10[::2]
TASK_LISTS = {
    "cw10": CW10,
    "mt40": MT40,
    "mt50": MT50,
    "dmc10": DMC10,
    "dmc6": DMC6,
    "dmc16": DMC16,
    "retain10": RETAIN10,
    "retaindmc5": RETAIN_DMC5,
}
ALL_TASKS = MT50 + DMC16  # a task's index here seeds its collection, so a file never depends on its neighbours

METAWORLD_HORIZON = 200  # Continual World's episode length (META_WORLD_TIME_HORIZON); v3 defaults to 500
DMC_HORIZON = 1000  # dmc2gym's episode_length in the authors' code


def resolve_tasks(spec, repeats_allowed=True):
    """'cw10,cartpole-swingup' -> list of task names; list names expand, duplicates are dropped, order kept.
    repeats_allowed=False (a task sequence): a task named twice raises ValueError instead of being dropped."""
    names = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.lower() in TASK_LISTS:
            names += TASK_LISTS[item.lower()]
        elif item in ALL_TASKS:
            names.append(item)
        elif item + "-v3" in MT50:  # 'hammer' is accepted for 'hammer-v3'
            names.append(item + "-v3")
        else:
            raise ValueError(
                f"unknown task {item!r}. Valid: list names {', '.join(TASK_LISTS)}; "
                f"or task names {', '.join(ALL_TASKS)}"
            )
    if not names:
        raise ValueError("no task given: pass --tasks with task names or list names")
    repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if repeated and not repeats_allowed:
        raise ValueError(
            f"--tasks {spec!r} names {', '.join(repeated)} twice: a sequence learns each task once (its own pool "
            "entries, its own column of the success matrix)"
        )
    return list(dict.fromkeys(names))


def is_metaworld(name):
    return name in MT50


def env_dims(name):
    """(observation width, action dims) of a task's environment, which its data must match."""
    if is_metaworld(name):
        return 39, 4  # Meta-World v3, goal observable: 39-d states; actions = xyz move + gripper (tested)
    env = make_env(name)
    return env.observation_space.shape[0], env.action_space.shape[0]


def horizon(name):
    """Episode length of a task: Continual World's 200 steps for Meta-World, 1000 for DMControl."""
    return METAWORLD_HORIZON if is_metaworld(name) else DMC_HORIZON


# ---------------------------------------------------------------------------------------------------------
# Environments: both domains behind the gymnasium interface (evaluate.py reuses these constructors)


@functools.lru_cache(maxsize=None)
def compiled_mujoco_model(xml_path):
    """A Meta-World XML compiled once per process, without its textures: nothing here renders, and they are 5-8 MB
    of each model that every env's copy would duplicate (and copy: docs/performance.md). Physics
    is unchanged: all 50 tasks stepped identically with and without (2 episodes of 100 random actions each)."""
    import mujoco

    spec = mujoco.MjSpec.from_file(xml_path)
    for texture in list(spec.textures):
        texture.delete()
    for material in spec.materials:
        material.textures = [""] * len(material.textures)
    return spec.compile()


@functools.lru_cache(maxsize=None)
def copying_env_class(env_class):
    """env_class, building its simulation from a copy of a once-compiled MuJoCo model. Compiling the XML is most of
    an env's construction, and evaluation builds one env per episode; the copies give the same trajectories
    (tested)."""
    import mujoco

    def _initialize_simulation(self):  # gymnasium's MujocoEnv._initialize_simulation, minus the compilation
        model = copy.copy(compiled_mujoco_model(self.fullpath))
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    return type(env_class.__name__, (env_class,), {"_initialize_simulation": _initialize_simulation})


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task: 200-step episodes, a new random object/goal placement at every reset.

    Set up as metaworld's MT1 benchmark sets up its goal-observable task (set_task with the task's env class,
    partially_observable False), then unfrozen so each reset draws a fresh placement from the env's seeded RNG:
    Continual World's `random_init_all`. The Task is built directly: MT1 itself would first draw its 50 fixed
    goals with 50 resets of another env (0.5-1 s per task), goals an unfrozen env never uses. The same
    trajectories as an env built through MT1 (tested).
    """

    def __init__(self, name, seed=0):
        import metaworld

        env_class = metaworld.ALL_V3_ENVIRONMENTS[name]
        self.env = copying_env_class(env_class)()
        placement = self.env._random_reset_space  # any placement: the first reset draws a new one
        task = dict(rand_vec=(placement.low + placement.high) / 2, env_cls=env_class, partially_observable=False)
        self.env.set_task(metaworld.Task(env_name=name, data=pickle.dumps(task)))
        self.env._freeze_rand_vec = False  # a new placement every reset ...
        self.env.seeded_rand_vec = True  # ... drawn from env.np_random, so reset(seed=s) is reproducible
        self.env.max_path_length = METAWORLD_HORIZON
        self.env.seed(seed)
        self.horizon = METAWORLD_HORIZON
        space = self.env.observation_space
        self.columns = np.arange(space.shape[0])  # the columns it fills: all 39
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, space.shape, np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, self.env.action_space.shape, np.float32)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.env.seed(seed)
        obs, info = self.env.reset()
        return obs.astype(np.float32), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(np.clip(action, -1.0, 1.0))
        return obs.astype(np.float32), float(reward), bool(terminated), bool(truncated), info


# The authors' 204-column DMControl observation (src/envs/dmcontrol_utils.py, DMC_OBSTYPE_TO_STARTIDX and
# DMC_OBSTYPE_TO_DIM): every observation key of the suite has its own columns, the same in every task; a task
# fills the columns of its keys and leaves the rest 0. Their released DMControl files are stored this way.
# fmt: off
DMC_SLOTS = {  # key: (first column, width)
    "orientations": (0, 14), "velocity": (14, 27), "position": (41, 8), "touch": (49, 5),
    "target_position": (54, 2), "dist_to_target": (56, 1), "joint_angles": (57, 21), "upright": (78, 1),
    "target": (79, 3), "head_height": (82, 1), "extremities": (83, 12), "torso_vertical": (95, 3),
    "com_velocity": (98, 3), "arm_pos": (101, 16), "arm_vel": (117, 8), "hand_pos": (125, 4),
    "object_pos": (129, 4), "object_vel": (133, 3), "target_pos": (136, 4), "orientation": (140, 2),
    "to_target": (142, 2), "joints": (144, 14), "body_velocities": (158, 45), "height": (203, 1),
}
# fmt: on
DMC_OBS_DIM = 204


class DMControlEnv(gym.Env):
    """One DMControl suite task: observations in the authors' 204-column layout (DMC_SLOTS), 1000-step episodes."""

    def __init__(self, name, seed=0):
        from dm_control import suite

        domain, task = name.split("-", 1)
        self.env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self.env.observation_spec()
        self.keys = list(spec)  # fixed order, e.g. walker: orientations, height, velocity
        # the columns this task fills, in key order: obs[self.columns] is dm_control's own flattening
        self.columns = np.concatenate(
            [np.arange(DMC_SLOTS[k][0], DMC_SLOTS[k][0] + int(np.prod(spec[k].shape))) for k in self.keys]
        )
        act_spec = self.env.action_spec()
        assert np.all(act_spec.minimum == -1) and np.all(act_spec.maximum == 1), f"{name}: actions not in [-1, 1]"
        self.horizon = DMC_HORIZON
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (DMC_OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, act_spec.shape, np.float32)
        self.t = 0

    def _observation(self, observation):
        full = np.zeros(DMC_OBS_DIM, np.float32)
        full[self.columns] = np.concatenate([np.asarray(observation[k], np.float32).ravel() for k in self.keys])
        return full

    def reset(self, *, seed=None, options=None):
        if seed is not None:  # the task draws its initial state from this RNG (dm_control.suite.base.Task)
            self.env.task._random = np.random.RandomState(seed)
        self.t = 0
        return self._observation(self.env.reset().observation), {}

    def step(self, action):
        ts = self.env.step(np.clip(action, -1.0, 1.0))
        self.t += 1
        terminated = ts.last() and ts.discount == 0
        truncated = not terminated and (ts.last() or self.t >= self.horizon)
        return self._observation(ts.observation), float(ts.reward), terminated, truncated, {}


def make_env(name, seed=0):
    """The environment of a task by name: Meta-World v3 or DMControl, both gymnasium-style."""
    return MetaWorldEnv(name, seed) if is_metaworld(name) else DMControlEnv(name, seed)


# ---------------------------------------------------------------------------------------------------------
# Soft Actor-Critic (Haarnoja et al. 2018): twin Q with targets, tanh-Gaussian actor, automatic entropy tuning


def mlp(in_dim, out_dim, hidden):
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class SAC(nn.Module):
    """A compact SAC agent; hyperparameters follow common DMControl settings (pytorch_sac, CleanRL)."""

    def __init__(self, obs_dim, act_dim, hidden=256, lr=3e-4, gamma=0.99, tau=0.005, init_alpha=0.1):
        super().__init__()
        self.actor = mlp(obs_dim, 2 * act_dim, hidden)  # -> mean and log-std of a Gaussian, squashed by tanh
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, hidden), mlp(obs_dim + act_dim, 1, hidden)
        self.q1_target, self.q2_target = mlp(obs_dim + act_dim, 1, hidden), mlp(obs_dim + act_dim, 1, hidden)
        self.q1_target.load_state_dict(self.q1.state_dict())
        self.q2_target.load_state_dict(self.q2.state_dict())
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(init_alpha))))
        self.target_entropy = -float(act_dim)
        self.gamma, self.tau = gamma, tau
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.q_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=lr)

    def policy(self, obs):
        """Sample a = tanh(u), u ~ N(mu, sigma); return a and log pi(a|s) with the tanh change of variables."""
        mean, log_std = self.actor(obs).chunk(2, dim=-1)  # (B, A) each
        log_std = log_std.clamp(-5.0, 2.0)
        u = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob -= (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1)  # log|d tanh(u)/du|, numerically stable
        return torch.tanh(u), log_prob  # (B, A), (B,)

    @torch.no_grad()
    def act(self, obs):
        return self.policy(torch.as_tensor(obs).unsqueeze(0))[0][0].numpy()

    def q(self, nets, obs, action):
        x = torch.cat([obs, action], dim=-1)
        return torch.min(nets[0](x), nets[1](x)).squeeze(-1)  # (B,) pessimistic twin estimate

    def update(self, obs, action, reward, next_obs, terminal):
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():  # soft Bellman target; no bootstrap past a true termination (time limits bootstrap)
            next_action, next_log_prob = self.policy(next_obs)
            next_q = self.q((self.q1_target, self.q2_target), next_obs, next_action) - alpha * next_log_prob
            target = reward + self.gamma * (1.0 - terminal) * next_q  # (B,)
        x = torch.cat([obs, action], dim=-1)
        q_loss = F.mse_loss(self.q1(x).squeeze(-1), target) + F.mse_loss(self.q2(x).squeeze(-1), target)
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()

        new_action, log_prob = self.policy(obs)
        actor_loss = (alpha * log_prob - self.q((self.q1, self.q2), obs, new_action)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad()
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():  # Polyak averaging of the target critics
            online = [*self.q1.parameters(), *self.q2.parameters()]
            target_params = [*self.q1_target.parameters(), *self.q2_target.parameters()]
            torch._foreach_lerp_(target_params, online, self.tau)


# ---------------------------------------------------------------------------------------------------------
# The authors' released data (huggingface.co/datasets/ml-jku/meta-world and ml-jku/dm_control), read into our
# contract. Their Meta-World files are pickled stable-baselines3 ReplayBuffers, recorded on Meta-World v2.


# The authors' normalization constants of the 16 DMControl tasks, (random-policy return, their data's mean return)
# (ENVID_TO_DNS in src/envs/dmcontrol_dn_scores.py): the 0 and 1 of the normalized score for their data.
# fmt: off
AUTHORS_DMC_SCORES = {
    "cartpole-balance": (350.391, 938.506), "finger-turn_easy": (57.8, 800.645), "finger-turn_hard": (40.6, 676.144),
    "fish-upright": (229.406, 547.962), "hopper-stand": (1.296, 266.783), "pendulum-swingup": (0.0, 614.491),
    "point_mass-easy": (1.341, 779.273), "reacher-hard": (8.0, 779.947), "walker-stand": (134.701, 816.322),
    "walker-run": (23.427, 344.794), "ball_in_cup-catch": (0.0, 926.719), "cartpole-swingup": (27.414, 766.15),
    "cheetah-run": (3.207, 324.045), "finger-spin": (0.2, 834.629), "reacher-easy": (33.0, 849.241),
    "walker-walk": (30.193, 773.174),
}
# fmt: on


def authors_file_name(name):
    """Our task name -> the authors' file name: 'hammer-v3' -> 'hammer-v2.pkl', 'walker-walk' -> 'walker_walk.npz'."""
    return name[: -len("-v3")] + "-v2.pkl" if is_metaworld(name) else name.replace("-", "_") + ".npz"


def find_authors_file(folder, name):
    """The one file of a task under `folder` (searched recursively); a ValueError says what to download if none."""
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"--source authors needs --authors-dir: the folder of the authors' files (got {folder!r})")
    found = sorted(glob.glob(os.path.join(folder, "**", authors_file_name(name)), recursive=True))
    if len(found) != 1:
        raise ValueError(
            f"{'no' if not found else 'more than one'} {authors_file_name(name)} under {folder} "
            f"{found if found else ''}: download the authors' data (`huggingface-cli download ml-jku/meta-world` "
            "or `ml-jku/dm_control --repo-type dataset`) and point --authors-dir at one copy"
        )
    return found[0]


class InertObject:
    """What a pickle's classes and functions become, apart from numpy's array builders: it takes any arguments
    and state and runs nothing, so a downloaded pickle builds arrays and attribute holders, never code."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


# (module, name) -> the numpy builder it stands for; pickles from numpy 1 say numpy.core, from numpy 2 numpy._core
ARRAY_BUILDERS = {
    (f"{package}.{module}", name): builder
    for package in ("numpy.core", "numpy._core")
    for module, name, builder in (
        ("multiarray", "_reconstruct", np._core.multiarray._reconstruct),
        ("multiarray", "scalar", np._core.multiarray.scalar),
        ("numeric", "_frombuffer", np._core.numeric._frombuffer),
    )
} | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Reads a pickled replay buffer without importing stable-baselines3 or running anything it names."""

    def find_class(self, module, name):
        return ARRAY_BUILDERS.get((module, name), InertObject)


def read_authors_file(path, name):
    """One task's file of the authors -> our contract's arrays. DMControl .npz: flat (N, 204) or buffer-shaped
    (N, 1, 204) arrays. Meta-World .pkl: an SB3 ReplayBuffer, (capacity, 1, dim) arrays valid up to its `pos`.
    Both are cut after the last done (a trailing unfinished episode is dropped)."""
    keys = ("observations", "actions", "rewards", "dones")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            try:
                buffer = ArraysOnlyUnpickler(f).load()
            except Exception as e:
                raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
        fields = vars(buffer) if isinstance(buffer, InertObject) else {}
        if not {*keys, "pos"} <= set(fields):
            raise ValueError(f"{path}: not a stable-baselines3 replay buffer (no {', '.join(keys)}, pos)")
        end = len(fields["observations"]) if fields.get("full") else int(fields["pos"])
        raw = {k: np.asarray(fields[k])[:end] for k in keys}
    else:
        with np.load(path) as f:  # allow_pickle stays off: a .npz holds arrays only
            missing = set(keys) - set(f.files)
            if missing:
                raise ValueError(f"{path}: missing {sorted(missing)}; expected the authors' DMControl arrays")
            raw = {k: f[k] for k in keys}
    n = len(raw["observations"])
    ends = np.flatnonzero(raw["dones"].reshape(n))
    if len(ends) == 0:
        raise ValueError(f"{path}: no finished episode (no done in {n} transitions)")
    cut = ends[-1] + 1
    arrays = dict(
        observations=raw["observations"].reshape(n, -1)[:cut].astype(np.float32),
        actions=raw["actions"].reshape(n, -1)[:cut].astype(np.float32),
        rewards=raw["rewards"].reshape(n)[:cut].astype(np.float32),
        dones=raw["dones"].reshape(n)[:cut].astype(bool),
    )
    if not is_metaworld(name):
        arrays["random_return"], arrays["data_return"] = map(np.float32, AUTHORS_DMC_SCORES[name])
    found, expected = (arrays["observations"].shape[1], arrays["actions"].shape[1]), env_dims(name)
    if found != expected:
        layout = "" if is_metaworld(name) else " (DMControl: the 204-column _full files)"
        raise ValueError(
            f"{path}: {found[0]} observation columns and {found[1]} action dims, but {name} has "
            f"{expected[0]} and {expected[1]}{layout}"
        )
    return arrays


# ---------------------------------------------------------------------------------------------------------
# Shared by every stage: the command line, atomic files, checkpoints, run locks, processes, device, figures


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written (its examples) and every flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line that says what is wrong, not the whole usage block."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def field_help(args_cls):
    """{field: its help}: the string literal written under each field of an Args dataclass (CleanRL's style)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(args_cls))).body[0].body
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(body, body[1:])
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }


RANGE_AT_END = re.compile(r"\[(>=|>) *(-?[0-9.e+-]+)\]$|([\[(]) *(-?[0-9.e+-]+), *([0-9.e+-]+) *([\])])$")


def allowed_range(help_text):
    """A field's range, written at the end of its help: `[>= 1]`, `[> 0]`, `[0, 1)`, ... -> (a test, its text),
    or None where the help declares none."""
    match = RANGE_AT_END.search(help_text)
    if match is None:
        return None
    op, bound, left, low, high, right = match.groups()
    if op:
        bound = float(bound)
        return (lambda x: x >= bound) if op == ">=" else (lambda x: x > bound), f"{op} {match.group(2)}"
    low, high = float(low), float(high)
    return (
        lambda x: (low <= x if left == "[" else low < x) and (x <= high if right == "]" else x < high),
        f"in {match.group(0)}",
    )


def fields_from(args_cls, first):
    """The names of args_cls's fields from `first` to the last: the --help group that closes an Args dataclass."""
    names = [f.name for f in dataclasses.fields(args_cls)]
    return set(names[names.index(first) :])


def parse_args(args_cls, argv=None, description=None, groups=None, choices=None, presets=None):
    """A stdlib argparse built from a dataclass: one flag per field (--snake-case) with its default and help.
    `groups` {heading: first field}: --help lists the flags under headings, each from its first field on;
    `choices` {field: allowed values}: anything else is rejected with one line, as is a number outside the range
    that the end of its field's help declares ([>= 1], [> 0], [0, 1), ...);
    `presets` {name: {field: value}}: `--preset name` makes those values the defaults (flags given still win)."""
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    helps, section = field_help(args_cls), parser
    starts = {first: heading for heading, first in (groups or {}).items()}
    for f in dataclasses.fields(args_cls):
        section = parser.add_argument_group(starts[f.name]) if f.name in starts else section
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            section.add_argument(
                flag, type=kind, default=f.default, help=helps[f.name], choices=(choices or {}).get(f.name)
            )
    if presets:
        preset = parser.parse_known_args(argv)[0].preset
        parser.set_defaults(**presets.get(preset, {}))
    values = vars(parser.parse_args(argv))
    for name, value in values.items():  # every number against the range its help declares, before any work
        allowed = allowed_range(helps[name])
        if allowed is None or value is None or isinstance(value, bool):
            continue
        test, text = allowed
        if not (math.isfinite(value) and test(value)):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} {value} is out of range: it must be {text} ({helps[name].rsplit(' [', 1)[0]})")
    return args_cls(**values)


UMASK = os.umask(0o022)  # read once (reading it means setting it), then put back
os.umask(UMASK)


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temp path to write; it becomes `path` only if the block succeeds, so no half-written file is left.
    The temp file is created exclusively (a planted file or symlink there is never followed); temp files that a
    killed process left beside `path` are removed first."""
    directory, name = os.path.split(path)
    prefix = f".{name}.l2m-tmp"  # a name no user file is likely to have: only this writer's litter is removed
    for stale in glob.glob(os.path.join(glob.escape(directory or "."), glob.escape(prefix) + "*")):
        os.remove(stale)
    fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=prefix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; the file gets what open() would have given it
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a folder gone read-only
        raise WriteError.of(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_output(path, flag, is_dir):
    """Fail before any work if `path` cannot be written: a file where a directory goes (or the reverse), or a
    location this user cannot create. Raises ValueError naming the flag."""
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        kind = "a directory" if os.path.isdir(path) else "a file"
        raise ValueError(f"{flag} {path!r} is {kind}: pass a {'directory' if is_dir else 'file path'}")
    if not is_dir and path.endswith(os.sep):
        raise ValueError(f"{flag} {path!r} names a directory: pass a file path such as {path}ckpt.pt")
    parent = os.path.abspath(path if is_dir else os.path.dirname(path) or ".")
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: cannot write under {parent} (not a writable directory)")


def file_sha256(path):
    """The content hash that identifies a checkpoint (a fine-tuning run records its backbone's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path, text):
    """Write a text file atomically."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_npz(path, arrays):
    """np.savez, but atomic and byte-reproducible (fixed zip timestamps)."""
    with atomic_write(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value, order="C"), allow_pickle=False)


class WriteError(OSError):
    """A file that could not be written (the earlier version, if any, is untouched): the stages end on it with
    this one line instead of a traceback."""

    @classmethod
    def of(cls, path, error):
        free_mb = shutil.disk_usage(os.path.dirname(path) or ".").free / 2**20
        first_line = (str(error).strip().splitlines() or [""])[0]
        return cls(f"could not write {path} ({first_line}); {free_mb:.0f} MiB free on that disk")


def save_atomic(obj, path):
    """torch.save, atomic: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # a full disk reads as torch's "unexpected pos ..."
            raise OSError(str(e)) from None


def run_stage(main, args, script):
    """A stage's command line: main(args), ending with one line if a write fails (full disk, quota, rights)."""
    try:
        main(args)
    except WriteError as e:
        sys.exit(f"{script}: error: {e}")


_LOCKS = {}  # folder -> the open lock file of this process: a lock lasts as long as its file stays open


def lock_folder(folder, what):
    """Make this process the only writer of `folder` until it ends (however it ends: the system drops the lock of
    a killed process) or locks the folder again: an exclusive lock on <folder>/.lock. Raises ValueError naming the
    holder (pid and command) if another process has it; a lock file left by a dead process is taken over, with a
    line saying so. `what` names the folder in messages (e.g. "--run-dir")."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.realpath(os.path.join(folder, ".lock"))
    if path in _LOCKS:  # this process again (its main called twice in one interpreter): hand over to the new call
        _LOCKS.pop(path).close()
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{what} {folder} is in use by {holder}: wait for it to end, or use another folder") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and not previous.startswith(f"pid {os.getpid()} "):
        print(f"taking over {path} from {previous}, which is no longer running")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({' '.join(sys.argv)})\n")
    handle.flush()
    _LOCKS[path] = handle


@atexit.register
def release_locks():
    """Empty this process's lock files as it exits normally, so that the next run does not report a takeover."""
    for handle in _LOCKS.values():
        handle.truncate(0)
        handle.close()


CHECKPOINT_KEYS = {  # what each script writes, so a file from elsewhere is named as such before it is used
    "pretrain": {"model", "model_args", "tasks", "step", "args"},
    "finetune": {"model", "model_args", "tasks", "pretrained", "pool_args", "success", "stages", "args"},
}


def load_checkpoint(path, kinds=("pretrain", "finetune"), map_location="cpu"):
    """Load a checkpoint of one of `kinds` (weights_only: no code is unpickled); raises an error a user can act on."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: pretrain.py (or finetune.py) writes one; check the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line})") from None
    kind = "finetune" if isinstance(ckpt, dict) and ckpt.get("kind") == "finetune" else "pretrain"
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS[kind] <= set(ckpt):
        raise ValueError(
            f"{path}: not a checkpoint of pretrain.py or finetune.py (a bare state_dict or another format)"
        )
    if kind not in kinds:
        raise ValueError(f"{path} is a {kind}.py checkpoint; this needs a {' or '.join(kinds)}.py checkpoint")
    return ckpt


def watch_parent(parent_pid, on_gone):
    """Call on_gone() once `parent_pid` is no longer this process's parent (it ended, even by `kill -9` or the
    machine's out-of-memory killer), checked every second by a daemon thread: a worker or a launched run never
    outlives the command that started it."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        on_gone()

    threading.Thread(target=watch, daemon=True).start()


def resolve_device(name):
    """'auto' -> cuda when present, else Apple's mps, else cpu (never a hard cuda default). A device this machine
    lacks is a ValueError that says so."""
    if name == "auto":
        return torch.device(
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    kind = name.split(":")[0]  # cuda:1 -> cuda
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda or mps")
    if not available[kind]:
        raise ValueError(f"--device {name}: this machine's torch has no {kind} device (use auto or cpu)")
    return torch.device(name)


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory instead of handing blocks of a few MB back to the OS: acting frees
    its activations after every pass, and glibc trimmed them, so the next pass faulted them in again page by page
    (docs/performance.md). Freed memory stays reusable by this process (as PyTorch's caching allocator keeps it on
    a GPU). No-op where libc is not glibc (macOS, Windows, musl)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the heap ...
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # ... which is not trimmed until 1 GiB of it is free


PRECISIONS = ("auto", "bf16", "fp32")  # the --precision choices of every stage


def use_bf16(precision, device):
    """precision 'auto' -> bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AVX-512 bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()


def pyplot():
    """matplotlib.pyplot, drawing to files only. Imported where figures are made, not with this module: a spawned
    env worker (macOS, Windows) imports this module again, and pyplot was 0.5 s of its start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Lay out, write atomically as a PNG, and free the figure."""
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    pyplot().close(fig)


# ---------------------------------------------------------------------------------------------------------
# Collection (one task per worker process)


# What the scripted expert does once the task is solved. The experts reach the goal and then move on and lose it
# (success at the last step 0.49 vs 0.91 at any step on CW10), while the paper scores the last step and its SAC data
# stay at the goal. No one rule keeps every task solved (docs/stages.md, Stage 1), so each task gets the rule that
# kept it solved most often on calibration episodes:
#   hold    keep the hand where it was when solved, and the grip (a P-controller, the gain of metaworld's experts)
#   stop    a zero move, keep the grip (the hand still catches up with its mocap target, often a few cm further)
#   push    repeat the action that solved it (keeps pressing a handle that springs back)
#   seek    a zero move while solved, the expert if not      expert  the expert without noise
#   none    the expert with noise, as before it was solved (the old data)
HOLD_RULES = ("hold", "stop", "push", "seek", "expert")
HOLD_CHOICES = ("auto", "none", *HOLD_RULES)
HOLD_GAIN = 25.0  # the p of metaworld's scripted policies' move(); 5 and 10 kept fewer tasks solved


@dataclass
class Args:
    tasks: str = "mt50"
    """comma-separated task names and/or list names: cw10, mt40, mt50, dmc10, dmc6, dmc16"""
    source: str = "auto"
    """behaviour source: scripted | sac | auto (scripted for Meta-World, sac for DMControl) | authors (convert
    the authors' released files in --authors-dir)"""
    authors_dir: str = ""
    """with --source authors: the folder holding the authors' downloaded files (searched recursively): Meta-World
    <task>-v2.pkl replay buffers, DMControl <domain>_<task>.npz"""
    episodes: int = None
    """episodes recorded per task; for sac also its training budget (episodes x horizon env steps).
    Default: scripted 100, sac 50 [>= 1]"""
    noise_levels: str = "0,0.1,0.3,0.5"
    """scripted: Gaussian action-noise stds, one drawn per episode"""
    hold: str = "auto"
    """scripted: what the expert does once the task is solved: auto (per task, the rule that keeps it solved most
    often), hold, stop, push, seek, expert, or none"""
    seed: int = 0
    """base seed; each task's seed is derived from it and the task's name [>= 0]"""
    data_dir: str = "data"
    """output directory for <task>.npz"""
    workers: int = os.cpu_count() or 1
    """parallel worker processes, one task each [>= 1]"""
    overwrite: bool = False
    """rewrite existing files instead of skipping them"""
    sac_warmup_steps: int = 5000
    """uniform-random actions before learning starts [>= 0]"""
    sac_utd: float = 1.0
    """gradient updates per env step (update-to-data ratio) [> 0]"""
    sac_hidden: int = 256
    """width of the two hidden layers of actor and critics [>= 1]"""
    sac_batch_size: int = 128
    """minibatch size per update [>= 1]"""
    sac_lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature [> 0]"""


GROUPS = {"what to collect": "tasks", "output": "data_dir", "sac (DMControl)": "sac_warmup_steps"}
SOURCES = ("auto", "scripted", "sac", "authors")
CHOICES = {"source": SOURCES, "hold": HOLD_CHOICES}


def task_seed(seed, name):
    return 1000 * seed + ALL_TASKS.index(name)


def scripted_episode(env, expert, rule, noise_std, reset_seed, rng):
    """One episode: the expert with Gaussian action noise until the task is solved, then the hold rule.
    -> list of (obs, executed action, reward, done, success)."""
    act_dim = env.action_space.shape[0]
    obs, _ = env.reset(seed=reset_seed)
    solved_by, solved_at, success, transitions = None, None, False, []  # the action and hand position that solved it
    for _ in range(env.horizon):
        noise = noise_std * rng.standard_normal(act_dim)  # drawn every step, so episodes stay seed-aligned
        expert_action = expert.get_action(obs)
        stand_still = None if solved_by is None else np.r_[np.zeros(act_dim - 1), solved_by[-1]]  # keep the grip
        if solved_by is None or rule == "none":
            action = expert_action + noise
        elif rule == "hold":  # obs[:3] is the hand position
            action = np.r_[HOLD_GAIN * (solved_at - obs[:3]), solved_by[-1]]
        elif rule == "stop" or (rule == "seek" and success):
            action = stand_still
        elif rule == "push":
            action = solved_by
        else:  # "expert", or "seek" after losing it
            action = expert_action
        action = np.clip(action, -1.0, 1.0).astype(np.float32)  # record what was executed
        next_obs, reward, terminated, truncated, info = env.step(action)
        success = bool(info.get("success", False))
        if success and solved_by is None:
            solved_by, solved_at = action, next_obs[:3]
        transitions.append((obs, action, reward, terminated or truncated, success))
        obs = next_obs
        if terminated or truncated:
            break
    return transitions


def choose_hold_rule(env, expert, noise_levels, seed, episodes=10):
    """The hold rule with the most episodes successful at the last step, on the same calibration episodes for
    every rule (their own seeds, not the recorded ones). -> (rule, {rule: successes})."""
    scores = {}
    for rule in HOLD_RULES:
        rng = np.random.default_rng(seed)
        scores[rule] = sum(
            scripted_episode(env, expert, rule, rng.choice(noise_levels), int(rng.integers(2**31)), rng)[-1][4]
            for _ in range(episodes)
        )
    return max(HOLD_RULES, key=scores.get), scores  # ties: the first, the simplest


def collect_scripted(env, expert, episodes, noise_levels, hold, rng, progress):
    """Roll out metaworld's scripted expert with per-episode Gaussian action noise and a hold rule once solved;
    yield transitions."""
    for _ in range(episodes):
        transitions = scripted_episode(env, expert, hold, rng.choice(noise_levels), int(rng.integers(2**31)), rng)
        yield from transitions
        progress.put(len(transitions))


def random_policy_return(env, seed, episodes=10):
    """Mean return of uniform-random actions: the zero of DMControl's data-normalized score (the authors measure it
    the same way, 10 episodes: evaluate_random_policy in src/envs/dmcontrol_dn_scores.py)."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(episodes):
        env.reset(seed=int(rng.integers(2**31)))
        done = False
        while not done:
            _, reward, terminated, truncated, _ = env.step(rng.uniform(-1.0, 1.0, env.action_space.shape))
            total, done = total + reward, terminated or truncated
    return total / episodes


def collect_sac(env, episodes, args, seed, rng, progress):
    """Train SAC online for `episodes` episodes; yield every transition it experienced (its replay buffer)."""
    torch.manual_seed(seed)
    columns = env.columns  # SAC learns from the task's own columns, not the unused ones of the 204-d layout
    obs_dim, act_dim = len(columns), env.action_space.shape[0]
    agent = SAC(obs_dim, act_dim, hidden=args.sac_hidden, lr=args.sac_lr)
    capacity = episodes * env.horizon
    buf_obs = np.zeros((capacity, obs_dim), np.float32)
    buf_next_obs = np.zeros((capacity, obs_dim), np.float32)
    buf_act = np.zeros((capacity, act_dim), np.float32)
    buf_rew = np.zeros(capacity, np.float32)
    buf_terminal = np.zeros(capacity, np.float32)
    n, updates_due = 0, 0.0
    for _ in range(episodes):
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        episode_start = n
        for _ in range(env.horizon):
            if n < args.sac_warmup_steps:
                action = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
            else:
                action = agent.act(obs[columns])
            next_obs, reward, terminated, truncated, info = env.step(action)
            buf_obs[n], buf_act[n], buf_rew[n] = obs[columns], action, reward
            buf_next_obs[n], buf_terminal[n] = next_obs[columns], terminated
            n += 1
            yield obs, action, reward, terminated or truncated, info.get("success", False)
            obs = next_obs
            if n >= args.sac_warmup_steps:
                updates_due += args.sac_utd
                while updates_due >= 1.0:
                    idx = rng.integers(0, n, args.sac_batch_size)
                    batch = (buf_obs[idx], buf_act[idx], buf_rew[idx], buf_next_obs[idx], buf_terminal[idx])
                    agent.update(*map(torch.from_numpy, batch))
                    updates_due -= 1.0
            if terminated or truncated:
                break
        progress.put(n - episode_start)


PROGRESS = None  # in a worker process: the queue it reports its env steps to (set by start_worker)


def start_worker(parent_pid, progress):
    """Worker initializer: keep the progress queue (a queue reaches a process only when it starts), and end this
    worker when collect.py's main process is gone."""
    global PROGRESS
    PROGRESS = progress
    watch_parent(parent_pid, lambda: os._exit(1))


def collect_task(name, source, args):
    """Collect one task's dataset and write data/<task>.npz; runs in a worker process, reporting its env steps to
    the worker's progress queue. Returns its summary."""
    progress = PROGRESS
    torch.set_num_threads(1)  # one core per worker; workers run side by side
    start = time.perf_counter()
    seed = task_seed(args.seed, name)
    rng = np.random.default_rng(seed)
    env = make_env(name, seed)
    hold = scores = None
    if source == "scripted":
        from metaworld.policies import ENV_POLICY_MAP

        warnings.filterwarnings("ignore", message="Constant")  # the experts' gains exceed 1 on purpose; we clip
        expert = ENV_POLICY_MAP[name]()
        noise_levels = [float(x) for x in args.noise_levels.split(",")]
        hold = args.hold
        if hold == "auto":  # calibration episodes have their own seeds, disjoint from the recorded ones
            hold, scores = choose_hold_rule(env, expert, noise_levels, seed + 10**6)
        transitions = collect_scripted(env, expert, args.episodes, noise_levels, hold, rng, progress)
    else:
        transitions = collect_sac(env, args.episodes, args, seed, rng, progress)
    obs, actions, rewards, dones, successes = map(np.array, zip(*transitions))
    arrays = dict(
        observations=obs.astype(np.float32),
        actions=actions.astype(np.float32),
        rewards=rewards.astype(np.float32),
        dones=dones.astype(bool),
    )
    if is_metaworld(name):
        arrays["successes"] = successes.astype(bool)
    else:  # episodes of its own seeds, disjoint from the recorded ones
        arrays["random_return"] = np.float32(random_policy_return(env, seed + 2 * 10**6))
    save_npz(os.path.join(args.data_dir, f"{name}.npz"), arrays)

    # SAC's starting point: the mean over its uniform-random warm-up episodes (one episode alone is too noisy)
    summary = summarize(name, source, arrays, args.sac_warmup_steps // env.horizon if source == "sac" else 0)
    summary["seconds"] = time.perf_counter() - start
    if hold is not None:
        summary["hold"] = hold if scores is None else f"{hold} ({', '.join(f'{r} {n}' for r, n in scores.items())})"
    return summary


def summarize(name, source, arrays, random_episodes=0):
    """A dataset's numbers for the summary line: episodes, returns, and for Meta-World success at the episode's
    last step (the paper's metric) and at any step (Continual World's)."""
    ends = np.flatnonzero(arrays["dones"]) + 1
    episode_returns = np.add.reduceat(arrays["rewards"], np.r_[0, ends[:-1]])
    last = max(1, len(episode_returns) // 10)
    summary = dict(
        task=name,
        source=source,
        episodes=len(ends),
        transitions=len(arrays["rewards"]),
        start_return=float(episode_returns[: max(1, random_episodes)].mean()),
        mean_return=float(episode_returns.mean()),
        last_return=float(episode_returns[-last:].mean()),
        max_return=float(episode_returns.max()),
    )
    if "successes" in arrays:
        summary["success"] = float(arrays["successes"][ends - 1].mean())
        summary["success_any"] = float(np.maximum.reduceat(arrays["successes"], np.r_[0, ends[:-1]]).mean())
    return summary


def format_summary(s):
    success = f"success last {s['success']:.2f} any {s['success_any']:.2f} | " if "success" in s else ""
    hold = f" | hold {s['hold']}" if "hold" in s else ""
    return (
        f"{s['task']:<28} {s['source']:<8} {s['episodes']:>5} episodes {s['transitions']:>8} steps | {success}"
        f"return {'random' if s['source'] == 'sac' else 'first'} {s['start_return']:8.1f} "
        f"mean {s['mean_return']:8.1f} last-10% {s['last_return']:8.1f} "
        f"max {s['max_return']:8.1f} | {s['seconds']:6.0f} s{hold}"
    )


def check_args(args):
    """Validate everything cheap before any worker starts; raises ValueError with a message a user can act on."""
    names = resolve_tasks(args.tasks)
    if args.source not in SOURCES:
        raise ValueError(f"unknown --source {args.source!r}: use {', '.join(SOURCES)}")
    if args.source == "authors":
        [find_authors_file(args.authors_dir, name) for name in names]  # every file there, before any is written
    if args.source == "scripted" and not all(map(is_metaworld, names)):
        bad = [n for n in names if not is_metaworld(n)]
        raise ValueError(
            f"--source scripted has experts only for Meta-World; use --source sac (or auto) for {', '.join(bad)}"
        )
    try:
        noise = [float(x) for x in args.noise_levels.split(",")]
    except ValueError:
        raise ValueError(f"--noise-levels must be comma-separated numbers, got {args.noise_levels!r}") from None
    if any(x < 0 for x in noise):
        raise ValueError(f"--noise-levels must be >= 0, got {args.noise_levels!r}")
    if args.hold not in HOLD_CHOICES:
        raise ValueError(f"unknown --hold {args.hold!r}: use one of {', '.join(HOLD_CHOICES)}")
    check_output(args.data_dir, "--data-dir", is_dir=True)
    return names


def main(args):
    try:
        names = check_args(args)
    except ValueError as e:
        sys.exit(f"collect.py: error: {e}")
    os.makedirs(args.data_dir, exist_ok=True)
    sources = {n: ("scripted" if is_metaworld(n) else "sac") if args.source == "auto" else args.source for n in names}
    default_episodes = {"scripted": 100, "sac": 50}
    todo = []
    for name in names:
        if os.path.isfile(os.path.join(args.data_dir, f"{name}.npz")) and not args.overwrite:
            print(f"skip {name}: {args.data_dir}/{name}.npz exists (--overwrite to rewrite)")
        else:
            todo.append(name)
    if not todo:
        return
    if args.source == "authors":  # a conversion: quick, in this process
        for name in todo:
            start = time.perf_counter()
            try:
                arrays = read_authors_file(find_authors_file(args.authors_dir, name), name)
            except ValueError as e:
                sys.exit(f"collect.py: error: {e}")
            save_npz(os.path.join(args.data_dir, f"{name}.npz"), arrays)
            print(format_summary(dict(summarize(name, "authors", arrays), seconds=time.perf_counter() - start)))
        return
    episodes = {n: args.episodes or default_episodes[sources[n]] for n in todo}
    total_steps = sum(episodes[n] * horizon(n) for n in todo)
    workers = min(args.workers, len(todo))
    print(f"collecting {len(todo)} tasks, {total_steps:,} env steps, {workers} worker processes -> {args.data_dir}/")

    start, summaries, failures = time.perf_counter(), [], {}
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/mujoco state
    progress = ctx.Queue()
    with tqdm(total=total_steps, unit="step", unit_scale=True, smoothing=0.05, disable=not sys.stderr.isatty()) as bar:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=start_worker, initargs=(os.getpid(), progress)
        )
        with pool:
            futures = {
                pool.submit(collect_task, n, sources[n], dataclasses.replace(args, episodes=episodes[n])): n
                for n in todo
            }
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.5)
                while not progress.empty():
                    bar.update(progress.get())
                for future in done:
                    name = futures[future]
                    try:
                        summaries.append(future.result())
                        tqdm.write(format_summary(summaries[-1]))
                    except concurrent.futures.process.BrokenProcessPool:
                        failures[name] = "its worker process died (out of memory or killed?)"
                    except Exception as e:  # one task's failure must not lose the others' finished files
                        failures[name] = f"{type(e).__name__}: {e}"
                    if name in failures:
                        tqdm.write(f"FAILED {name}: {failures[name]}")
    seconds = time.perf_counter() - start

    print(f"\nsummary ({len(summaries)} written, {len(failures)} failed):")
    for s in sorted(summaries, key=lambda s: names.index(s["task"])):
        print(format_summary(s))
    scored = [s for s in summaries if "success" in s]
    if scored:
        print(
            f"Meta-World mean over {len(scored)} tasks: "
            f"success at the last step {np.mean([s['success'] for s in scored]):.2f}, "
            f"at any step {np.mean([s['success_any'] for s in scored]):.2f}"
        )
    steps = sum(s["transitions"] for s in summaries)
    print(f"{steps:,} env steps in {seconds:.0f} s: {steps / seconds:,.0f} env steps/s with {workers} workers")
    if failures:
        for name, why in failures.items():
            print(f"collect.py: error: {name} failed, no file written: {why}", file=sys.stderr)
        sys.exit(1)


def cli(argv=None):
    """The command line: `python collect.py [flags]` (argv None = sys.argv)."""
    run_stage(main, parse_args(Args, argv, description=__doc__, groups=GROUPS, choices=CHOICES), "collect.py")


if __name__ == "__main__":
    cli()

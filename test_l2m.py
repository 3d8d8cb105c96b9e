"""Tests for the L2M reproduction: `pytest -q test_l2m.py` (CPU only, a few minutes).

Unit tests of each stage's behaviour that matters, plus end-to-end runs of the scripts as a user runs them.
"""

import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import metaworld
import numpy as np
import pytest
import torch

import collect

# `pytest -m "not slow" test_l2m.py` is the fast tier (seconds): it skips the tests that collect data, pre-train or
# fine-tune through the scripts (the marker is registered in pytest.ini).

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*argv, check=True):
    """Run a stage script as a user would; returns the CompletedProcess (stdout/stderr captured as text)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], capture_output=True, text=True, cwd=HERE
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def refuses(module, argv, capsys):
    """Run a script's command line in-process, expecting it to refuse. -> the one error line it printed."""
    with pytest.raises(SystemExit) as exit:
        module.cli(argv)
    code = exit.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")  # sys.exit("...") prints at exit
    assert code not in (0, None) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def listing(path):
    return sorted((str(p), p.stat().st_size) for p in path.rglob("*"))


# ---------------------------------------------------------------------------------------------------------
# collect.py: task lists


def test_task_lists_match_metaworld_and_are_disjoint():
    assert set(collect.MT50) == set(metaworld.ALL_V3_ENVIRONMENTS)
    assert len(collect.MT50) == 50 and len(collect.MT40) == 40 and not set(collect.MT40) & set(collect.CW10)
    assert collect.CW10[0] == "hammer-v3" and collect.CW10[-1] == "peg-unplug-side-v3"
    assert len(set(collect.DMC16)) == 16 and not set(collect.DMC10) & set(collect.DMC6)
    assert len(set(collect.RETAIN10)) == 10 and set(collect.RETAIN10) <= set(collect.MT40)


def test_resolve_tasks_expands_lists_aliases_and_dedupes():
    assert collect.resolve_tasks("cw10") == collect.CW10
    assert collect.resolve_tasks("hammer,dmc6,hammer-v3") == ["hammer-v3"] + collect.DMC6
    with pytest.raises(ValueError, match="unknown task 'hamer'.*cw10.*hammer-v3"):
        collect.resolve_tasks("hamer")


# ---------------------------------------------------------------------------------------------------------
# collect.py: environments


@pytest.mark.parametrize("name, horizon", [("reach-v3", 200), ("walker-walk", 1000)])
def test_env_follows_gymnasium_interface_and_episode_length(name, horizon):
    env = collect.make_env(name, seed=0)
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape and isinstance(info, dict)
    assert np.array_equal(env.action_space.low, -np.ones(env.action_space.shape))
    again, _ = env.reset(seed=3)
    assert np.array_equal(obs, again), "reset(seed=s) must reproduce the initial state"
    steps, done = 0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs.shape == env.observation_space.shape and isinstance(reward, float)
        steps, done = steps + 1, terminated or truncated
        if collect.is_metaworld(name):
            assert "success" in info
    assert steps == horizon and truncated and not terminated
    assert collect.env_dims(name) == (env.observation_space.shape[0], env.action_space.shape[0])


def test_dmcontrol_observations_use_the_authors_204_column_layout():
    """Every key in its own fixed columns (the authors' DMC_OBSTYPE_TO_STARTIDX), zeros elsewhere, for all 16 tasks."""
    starts = [start for start, _ in collect.DMC_SLOTS.values()]
    assert starts == sorted(starts) and sum(w for _, w in collect.DMC_SLOTS.values()) == collect.DMC_OBS_DIM == 204
    for name in collect.DMC16:
        env = collect.make_env(name, seed=0)
        obs, _ = env.reset(seed=1)
        raw = env.env.task.get_observation(env.env.physics)  # dm_control's own observation dict, now
        assert obs.shape == (204,) and env.observation_space.shape == (204,)
        for key, value in raw.items():
            start, width = collect.DMC_SLOTS[key]
            value = np.asarray(value, np.float32).ravel()
            assert len(value) <= width, f"{name}: {key} overflows its slot"
            np.testing.assert_array_equal(obs[start : start + len(value)], value)
        unused = np.setdiff1d(np.arange(204), env.columns)
        assert not obs[unused].any() and len(set(env.columns)) == len(env.columns)
    assert 203 in collect.make_env("walker-walk").columns  # the authors' example: walker's height, the last column


@pytest.mark.slow
def test_metaworld_env_equals_one_built_through_the_official_mt1_benchmark():
    """Our shortcut (a directly built Task, a copied compiled model) steps exactly like metaworld's own MT1 path."""
    name = "push-wall-v3"
    benchmark = metaworld.MT1(name, seed=0)
    official = benchmark.train_classes[name]()  # compiles its own XML
    official.set_task(benchmark.train_tasks[0])
    official._freeze_rand_vec, official.seeded_rand_vec, official.max_path_length = False, True, 200
    ours = collect.make_env(name, seed=5).env
    assert ours.model.ntex == 0 < official.model.ntex  # ours is built without textures: the physics must not differ
    actions = np.random.default_rng(0).uniform(-1, 1, (30, 4))
    for env in (official, ours):
        env.seed(5)
    for episode_seed in (11, 12):
        official.seed(episode_seed), ours.seed(episode_seed)
        np.testing.assert_array_equal(official.reset()[0], ours.reset()[0])
        for action in actions:
            np.testing.assert_array_equal(official.step(action)[0], ours.step(action)[0])


def test_metaworld_draws_a_new_placement_each_episode():
    env = collect.make_env("reach-v3", seed=0)
    first = [env.reset(seed=s)[0] for s in range(3)]
    second = env.reset()[0], env.reset()[0]
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(second[0], second[1])


# ---------------------------------------------------------------------------------------------------------
# collect.py: SAC


def test_sac_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    agent = collect.SAC(obs_dim=5, act_dim=3, hidden=16)
    obs = torch.randn(64, 5)
    torch.manual_seed(1)
    action, log_prob = agent.policy(obs)
    mean, log_std = agent.actor(obs).chunk(2, dim=-1)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.clamp(-5, 2).exp()), [torch.distributions.TanhTransform()]
    )
    torch.manual_seed(1)
    u = mean + log_std.clamp(-5, 2).exp() * torch.randn_like(mean)
    assert torch.allclose(action, torch.tanh(u))
    assert torch.allclose(
        log_prob,
        dist.base_dist.log_prob(u).sum(-1)
        - torch.distributions.TanhTransform().log_abs_det_jacobian(u, action).sum(-1),
        atol=1e-4,
    )


def test_sac_update_fits_the_critic_to_a_fixed_batch():
    torch.manual_seed(0)
    agent = collect.SAC(obs_dim=4, act_dim=2, hidden=32, lr=3e-3)
    obs, action = torch.randn(32, 4), torch.rand(32, 2) * 2 - 1
    reward, terminal = torch.randn(32), torch.ones(32)  # terminal: the target is the reward alone

    def q_error():
        return (agent.q1(torch.cat([obs, action], -1)).squeeze(-1) - reward).pow(2).mean().item()

    before = q_error()
    for _ in range(150):
        agent.update(obs, action, reward, obs, terminal)
    assert q_error() < 0.1 * before


def test_sac_actor_learns_the_best_action_of_a_bandit():
    """One-step episodes with reward -(a - 0.5)^2: the critic learns it from uniform actions, the actor its argmax."""
    torch.manual_seed(0)
    agent = collect.SAC(obs_dim=4, act_dim=1, hidden=32, lr=1e-2)
    obs, action = torch.randn(256, 4), torch.rand(256, 1) * 2 - 1
    reward, terminal = -((action[:, 0] - 0.5) ** 2), torch.ones(256)
    for _ in range(300):
        agent.update(obs, action, reward, obs, terminal)
    with torch.no_grad():
        mean_action = torch.tanh(agent.actor(obs[:32]).chunk(2, dim=-1)[0]).mean().item()
    assert abs(mean_action - 0.5) < 0.15, mean_action


# ---------------------------------------------------------------------------------------------------------
# collect.py: the script end to end


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """The same small collection twice (scripted Meta-World + SAC DMControl), into two directories."""
    dirs = [tmp_path_factory.mktemp(f"data{i}") for i in range(2)]
    for d in dirs:
        run_script(
            "collect.py",
            "--tasks",
            "reach-v3,cartpole-balance",
            "--episodes",
            "2",
            "--data-dir",
            str(d),
            "--noise-levels",
            "0,0.3",
            "--sac-warmup-steps",
            "1500",
            "--sac-utd",
            "0.5",
        )
    return dirs


def check_contract(path, act_dim, episodes, horizon):
    data = np.load(path)
    n = episodes * horizon
    assert (
        data["observations"].dtype == np.float32 and data["observations"].ndim == 2 and len(data["observations"]) == n
    )
    assert data["actions"].shape == (n, act_dim) and data["actions"].dtype == np.float32
    assert np.abs(data["actions"]).max() <= 1.0
    assert data["rewards"].shape == (n,) and data["rewards"].dtype == np.float32
    assert data["dones"].dtype == bool and np.array_equal(
        np.flatnonzero(data["dones"]) + 1, np.arange(1, episodes + 1) * horizon
    )
    assert np.isfinite(data["observations"]).all() and np.isfinite(data["rewards"]).all()
    return data


@pytest.mark.slow
def test_scripted_collection_writes_the_contract_with_expert_success(collected):
    data = check_contract(collected[0] / "reach-v3.npz", act_dim=4, episodes=2, horizon=200)
    assert data["successes"].dtype == bool and data["successes"].any(), "the reach expert should succeed"


@pytest.mark.slow
def test_sac_collection_writes_its_replay_buffer(collected):
    data = check_contract(collected[0] / "cartpole-balance.npz", act_dim=1, episodes=2, horizon=1000)
    assert "successes" not in data
    # stored in the 204-column layout evaluation feeds the model: the columns cartpole's env fills, zeros elsewhere
    filled = np.flatnonzero(np.abs(data["observations"]).sum(0))
    assert data["observations"].shape[1] == 204 and set(filled) == set(collect.make_env("cartpole-balance").columns)
    assert data["random_return"].shape == () and 0 < data["random_return"] < 1000  # the normalized score's zero
    warmup, learned = data["actions"][:1500], data["actions"][1500:]
    assert np.abs(warmup.mean()) < 0.1 and not np.allclose(learned, learned[0])  # uniform, then the actor


@pytest.mark.slow
def test_same_seed_gives_identical_bytes(collected):
    for name in ("reach-v3.npz", "cartpole-balance.npz"):
        assert (collected[0] / name).read_bytes() == (collected[1] / name).read_bytes()


@pytest.mark.slow
def test_existing_file_is_skipped_unless_overwrite(collected):
    before = (collected[0] / "reach-v3.npz").stat().st_mtime_ns
    proc = run_script("collect.py", "--tasks", "reach-v3", "--episodes", "1", "--data-dir", str(collected[0]))
    assert "skip reach-v3" in proc.stdout and (collected[0] / "reach-v3.npz").stat().st_mtime_ns == before


# The authors' released files, as synthetic stand-ins of both layouts (no download in tests)


class ReplayBuffer:
    """Pickles like stable-baselines3's ReplayBuffer: (capacity, n_envs, dim) arrays, valid up to `pos`, plus
    objects (a torch device, a gymnasium space) that the reader must not need to build."""

    def __init__(self, episodes, length, capacity, obs_dim=39, act_dim=4, seed=0):
        rng = np.random.default_rng(seed)
        self.pos, self.full, self.n_envs = episodes * length + length // 2, False, 1  # a half episode at the end
        self.observations = rng.standard_normal((capacity, 1, obs_dim)).astype(np.float32)
        self.next_observations = rng.standard_normal((capacity, 1, obs_dim)).astype(np.float32)
        self.actions = rng.uniform(-1, 1, (capacity, 1, act_dim)).astype(np.float32)
        self.rewards = rng.standard_normal((capacity, 1)).astype(np.float32)
        self.dones = np.zeros((capacity, 1), np.float32)
        self.dones[length - 1 : episodes * length : length] = 1.0
        self.timeouts = self.dones.copy()
        self.device = torch.device("cpu")
        self.observation_space = collect.gym.spaces.Box(-1.0, 1.0, (obs_dim,), np.float32)


class Canary:
    """A pickled object whose unpickling would delete a file: what a malicious download could hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


def authors_dmc_file(path, episodes, length, shape_prefix, width=204):
    rng = np.random.default_rng(1)
    n = episodes * length + 7  # 7 steps of an unfinished episode at the end
    dones = np.zeros(n, bool)
    dones[length - 1 : episodes * length : length] = True
    np.savez(
        path,
        observations=rng.standard_normal((n, *shape_prefix, width)).astype(np.float32),
        next_observations=rng.standard_normal((n, *shape_prefix, width)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, *shape_prefix, 1)).astype(np.float32),
        rewards=rng.standard_normal((n, *shape_prefix)).astype(np.float32),
        dones=dones.reshape(n, *shape_prefix),
    )
    return np.load(path)


@pytest.mark.parametrize("shape_prefix", [(), (1,)], ids=["flat", "buffer-shaped"])
def test_authors_dmcontrol_npz_converts_to_the_contract(tmp_path, shape_prefix):
    (tmp_path / "dm_control_1M_v3_full").mkdir()
    raw = authors_dmc_file(tmp_path / "dm_control_1M_v3_full" / "cartpole_balance.npz", 3, 20, shape_prefix)
    out = tmp_path / "data"
    argv = ["--source", "authors", "--authors-dir", str(tmp_path), "--data-dir", str(out)]
    collect.cli([*argv, "--tasks", "cartpole-balance"])
    data = check_contract(out / "cartpole-balance.npz", act_dim=1, episodes=3, horizon=20)  # the half episode: gone
    np.testing.assert_array_equal(data["observations"], raw["observations"].reshape(-1, 204)[:60])
    np.testing.assert_array_equal(data["rewards"], raw["rewards"].reshape(-1)[:60])
    assert data["observations"].shape[1] == collect.env_dims("cartpole-balance")[0] == 204
    assert (data["random_return"], data["data_return"]) == tuple(map(np.float32, (350.391, 938.506)))  # theirs


def test_authors_metaworld_replay_buffer_converts_without_running_its_code(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    buffer = ReplayBuffer(episodes=2, length=200, capacity=1000)
    buffer.callback = Canary(str(canary))
    with open(tmp_path / "reach-v2.pkl", "wb") as f:
        pickle.dump(buffer, f, protocol=pickle.HIGHEST_PROTOCOL)
    out = tmp_path / "data"
    collect.cli(["--source", "authors", "--authors-dir", str(tmp_path), "--tasks", "reach", "--data-dir", str(out)])
    assert canary.exists(), "reading a downloaded pickle ran code it named"
    data = check_contract(out / "reach-v3.npz", act_dim=4, episodes=2, horizon=200)
    np.testing.assert_array_equal(data["observations"], buffer.observations[:400, 0])
    np.testing.assert_array_equal(data["actions"], buffer.actions[:400, 0])
    assert "successes" not in data  # their buffers record none


def test_authors_files_in_the_wrong_layout_or_missing_are_refused(tmp_path, capsys):
    authors_dmc_file(tmp_path / "cartpole_balance.npz", 2, 20, (), width=5)  # dm_control's own flattening
    argv = ["--source", "authors", "--authors-dir", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    assert "204-column" in refuses(collect, [*argv, "--tasks", "cartpole-balance"], capsys)
    assert "no walker_walk.npz" in refuses(collect, [*argv, "--tasks", "walker-walk"], capsys)
    assert not (tmp_path / "data" / "cartpole-balance.npz").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "hamer"], "unknown task 'hamer'"),
        (["--tasks", "reach-v3", "--episodes", "0"], "--episodes 0 is out of range: it must be >= 1"),
        (["--tasks", "cartpole-balance", "--source", "scripted"], "experts only for Meta-World"),
        (["--tasks", "reach-v3", "--noise-levels", "a,b"], "comma-separated numbers"),
        (["--tasks", "reach-v3", "--hold", "sometimes"], "argument --hold: invalid choice: 'sometimes'"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, argv, message, capsys):
    assert message in refuses(collect, [*argv, "--data-dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_data_dir_that_is_a_file_is_rejected(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert "is a file" in refuses(collect, ["--tasks", "reach-v3", "--data-dir", str(tmp_path / "file")], capsys)


@pytest.mark.slow
def test_failed_task_leaves_no_file_and_keeps_the_others(tmp_path):
    (tmp_path / "reach-v3.npz").mkdir()  # the write of reach-v3 fails at the final rename
    proc = run_script(
        "collect.py", "--tasks", "reach-v3,push-v3", "--episodes", "1", "--data-dir", str(tmp_path), check=False
    )
    assert proc.returncode != 0 and "reach-v3 failed" in proc.stderr
    assert (tmp_path / "push-v3.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["push-v3.npz", "reach-v3.npz"]  # no temp file left
    assert not any((tmp_path / "reach-v3.npz").iterdir())


@pytest.mark.filterwarnings("ignore:Constant")  # the experts' gains exceed 1 on purpose; collect.py clips
def test_stop_rule_stands_still_once_solved_and_the_best_rule_is_chosen():
    from metaworld.policies import ENV_POLICY_MAP

    env, expert = collect.make_env("reach-v3", seed=0), ENV_POLICY_MAP["reach-v3"]()
    episode = collect.scripted_episode(env, expert, "stop", 0.3, 123, np.random.default_rng(0))
    solved = next(t for t, (*_, success) in enumerate(episode) if success)
    grip = episode[solved][1][-1]
    assert all(np.array_equal(a, [0, 0, 0, grip]) for _, a, *_ in episode[solved + 1 :]), "the arm should stand still"
    noisy = collect.scripted_episode(env, expert, "none", 0.3, 123, np.random.default_rng(0))
    assert all(np.array_equal(a, b[1]) for (_, a, *_), b in zip(episode[: solved + 1], noisy)), (
        "same episode until solved"
    )
    rule, scores = collect.choose_hold_rule(env, expert, [0.0, 0.3], seed=5, episodes=1)
    assert set(scores) == set(collect.HOLD_RULES) and scores[rule] == max(scores.values())


def test_atomic_write_removes_litter_and_never_follows_a_planted_link(tmp_path):
    target, victim = tmp_path / "ckpt.pt", tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / ".ckpt.pt.l2m-tmp123").write_text("left by a killed process")
    (tmp_path / ".ckpt.pt.l2m-tmp999").symlink_to(victim)
    (tmp_path / "ckpt.pt.tmp-notes").write_text("a user's file")
    collect.write_text(str(target), "new")
    assert target.read_text() == "new" and victim.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.tmp-notes", "victim"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~collect.UMASK  # as open() would create it, not mkstemp's 0600


def test_a_full_disk_is_named_as_such_and_leaves_no_file(tmp_path, monkeypatch):
    def disk_full(obj, path):
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 324416 vs 324308")

    monkeypatch.setattr(collect.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write .*ckpt.pt \(.*unexpected pos.*\); \d+ MiB free on that disk"):
        collect.save_atomic({"x": 1}, str(tmp_path / "ckpt.pt"))
    assert list(tmp_path.iterdir()) == []


def parent_of(pid):
    """The parent pid from /proc (Linux), or None for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def children_of(pid):
    return [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if parent_of(p) == pid]


def alive(pid):
    """Running (not ended, not a zombie) on Linux."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_collect_leaves_no_process_behind(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "collect.py"), "--tasks", "reach,push", "--episodes", "50",
         "--data-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )  # fmt: skip
    deadline, children = time.time() + 60, []
    while len(children) < 3 and time.time() < deadline:  # the resource tracker and two workers
        time.sleep(0.5)
        children = children_of(proc.pid)
    time.sleep(3.0)  # the workers are collecting
    proc.kill()  # kill -9 of the main process
    proc.wait()
    deadline = time.time() + 15
    while any(alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.5)
    assert len(children) >= 3 and not any(alive(pid) for pid in children), children


def test_save_npz_is_atomic_on_failure(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError):  # object arrays cannot be written without pickle: fails mid-write
        collect.save_npz(str(path), dict(ok=np.zeros(3), bad=np.array([object()])))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# model.py

import model as M  # noqa: E402
from pretrain import matmul_gflop  # noqa: E402


def tiny_model(act_dim=4, seed=0, **pool):
    torch.manual_seed(seed)
    net = M.DecisionTransformer(M.DTConfig(n_layer=2, n_head=2, n_embd=32, act_dim=act_dim, max_ep_len=200))
    if pool:
        net.pool = M.make_pool(2, 32, **pool)
    return net.eval()


def random_batch(B=6, K=5, act_dim=4, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    step_mask = torch.ones(B, K, dtype=torch.bool)
    if pad:
        step_mask[0, :3] = False  # left padding, as at the start of an episode
        step_mask[1, :1] = False
    return dict(
        states=torch.randn(B, K, 204, generator=g),
        returns=torch.randn(B, K, generator=g),
        action_bins=torch.randint(0, 64, (B, K, act_dim), generator=g),
        rewards=torch.randn(B, K, generator=g),
        timesteps=torch.randint(0, 200, (B, K), generator=g),
        step_mask=step_mask,
    )


def forward(net, b, **kw):
    return net(**b, **kw)


def test_later_tokens_do_not_change_earlier_outputs():
    net, b = tiny_model(), random_batch(pad=False)
    logits, _ = forward(net, b)
    changed = {k: v.clone() for k, v in b.items()}
    changed["action_bins"][:, 2, 1] = (changed["action_bins"][:, 2, 1] + 7) % 64  # token a^2 of timestep 2
    changed["states"][:, 3] += 1.0
    after, _ = forward(net, changed)
    assert torch.equal(logits[:, :2], after[:, :2]) and torch.equal(logits[:, 2, :2], after[:, 2, :2])
    assert not torch.allclose(logits[:, 2, 2:], after[:, 2, 2:])  # a^3 onwards sees the change


@pytest.mark.parametrize("pool", [{}, {"pool_size": 4}])
def test_padded_timesteps_are_invisible(pool):
    net, b = tiny_model(**pool), random_batch()
    if pool:
        with torch.no_grad():
            net.pool.q_b.normal_(0, 0.3)  # modulators that change the output
    logits, routing = forward(net, b)
    garbage = {k: v.clone() for k, v in b.items()}
    pad = ~b["step_mask"]
    garbage["states"][pad] = 5.0
    garbage["returns"][pad] = -3.0
    garbage["action_bins"][pad] = 7
    garbage["timesteps"][pad] = 99
    after, routing_after = forward(net, garbage)
    assert torch.allclose(logits[b["step_mask"]], after[b["step_mask"]], atol=1e-6)
    if pool:  # the query, and so the entry and the key similarity, see only real timesteps
        assert torch.equal(routing["index"], routing_after["index"])
        assert torch.allclose(routing["sim"], routing_after["sim"], atol=1e-6)


def test_query_is_the_mean_of_the_real_state_tokens():
    net, b = tiny_model(pool_size=4), random_batch()
    tokens = net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"])  # (B, T, C)
    query = net.query(tokens, b["step_mask"])
    state_tokens = tokens[:, :: net.cfg.tokens_per_step]  # (B, K, C)
    for i in range(len(query)):  # the reference, one sample at a time: padded timesteps left out
        assert torch.allclose(query[i], state_tokens[i][b["step_mask"][i]].mean(0), atol=1e-6)


def test_action_loss_ignores_padded_tokens():
    logits = torch.randn(2, 3, 4, 64)
    targets = torch.randint(0, 64, (2, 3, 4))
    valid = torch.zeros(2, 3, 4, dtype=torch.bool)
    valid[0, 2, :2] = True
    loss, _ = M.action_loss(logits, targets, valid)
    expected = torch.nn.functional.cross_entropy(logits[0, 2, :2], targets[0, 2, :2])
    assert torch.allclose(loss, expected)
    scrambled = logits.clone()
    scrambled[~valid] = 100.0
    assert torch.allclose(M.action_loss(scrambled, targets, valid)[0], expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_freed_memory_is_kept_so_big_temporaries_do_not_fault_in_again():
    import resource

    def burst():  # 8 x 8 MB alive at once, then freed, as acting's activations are after each pass
        held = [torch.ones(2_000_000) for _ in range(8)]
        return sum(t[0] for t in held)

    collect.keep_freed_memory()
    for _ in range(3):
        burst()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        burst()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 30000  # returned to the OS: up to 160,000


def test_dropout_mask_drops_a_share_p_and_keeps_the_mean():
    x = torch.ones(1_000_000)
    y = M.dropout(x, 0.1, training=True)
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1.0 / 0.9))  # kept entries are scaled by 1/(1-p)
    x16 = torch.randn(100_000).bfloat16()
    y16 = M.dropout(x16, 0.1, training=True)
    kept = y16 != 0
    assert y16.dtype == torch.bfloat16  # the mask does not promote x ...
    assert torch.equal(y16[kept], (x16[kept].float() * (1.0 / 0.9)).bfloat16())  # ... nor round 1/(1-p) to 1.109
    assert M.dropout(x, 0.1, training=False) is x


def test_cpu_attention_equals_scaled_dot_product_attention():
    net, b = tiny_model(), random_batch()
    attn, C = net.blocks[0].attn, net.cfg.n_embd
    x = torch.randn(6, 35, C)
    mask = net.attention_mask(b["step_mask"])
    q, k, v = (t.view(6, 35, 2, C // 2).transpose(1, 2) for t in attn.qkv(x).split(C, dim=-1))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    reference = attn.proj(reference.transpose(1, 2).reshape(6, 35, C))
    assert torch.allclose(attn(x, mask), reference, atol=1e-6)


def test_routing_runs_in_fp32_under_bf16_autocast():
    net, b = tiny_model(pool_size=30), random_batch(B=64, seed=3)
    query = net.query(
        net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"]), b["step_mask"]
    )
    index, sim = net.pool.select(query)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        index_bf16, sim_bf16 = net.pool.select(query)
    assert sim_bf16.dtype == torch.float32 and torch.equal(sim, sim_bf16) and torch.equal(index, index_bf16)


def test_a_frozen_backbone_step_computes_only_input_gradients():
    """Why L2M's step is cheaper than full fine-tuning's: with the backbone frozen, backward computes no weight
    gradients, so a step of the default batch (64) with one pool entry in use counts 0.70 of ft's matrix FLOPs (2/3
    for the dropped weight gradients plus the modulators' own work; README, Performance)."""
    b = random_batch(B=64, pad=False)

    def step_gflop(l2m):
        torch.manual_seed(0)
        net = M.DecisionTransformer(M.DTConfig(act_dim=4)).train()
        if l2m:
            net.requires_grad_(False)
            net.pool = M.make_pool(net.cfg.n_layer, net.cfg.n_embd, pool_size=30)
            net.pool.keys.data[:] = net.pool.keys.data[0]  # every sample picks the same entry

        def step():
            logits, _ = net(**b)
            M.action_loss(logits, b["action_bins"], b["step_mask"][..., None].expand_as(b["action_bins"]))[0].backward()

        return matmul_gflop(step)

    assert step_gflop(True) / step_gflop(False) == pytest.approx(0.701, abs=0.003)


def test_tokenizer_round_trip():
    tok = M.ActionTokenizer(64)
    a = torch.linspace(-1, 1, 1001)
    assert (tok.decode(tok.encode(a)) - a).abs().max() <= 1 / 64 + 1e-6  # within half a bin (width 2/64)
    bins = torch.arange(64)
    assert torch.equal(tok.encode(tok.decode(bins)), bins)
    assert tok.encode(torch.tensor([-1.0, 1.0, -5.0, 5.0])).tolist() == [0, 63, 0, 63]


@pytest.mark.parametrize("kind", ["lora", "ia3", "adapter"])
def test_zero_initialized_modulator_changes_nothing(kind):
    plain, b = tiny_model(), random_batch()
    modulated = tiny_model() if kind == "adapter" else tiny_model(pool_size=5, kind=kind)
    if kind == "adapter":
        modulated.attach_adapters()
    modulated.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(forward(plain, b)[0], forward(modulated, b)[0])


def test_ia3_entry_equals_its_vectors_folded_into_the_weights():
    """(IA)3 scales keys, values and the MLP's hidden activations: the same as scaling those weights' output rows
    (and the MLP projection's input columns), per sample with the sample's own entry."""
    net, b = tiny_model(pool_size=4, kind="ia3"), random_batch(B=8)
    with torch.no_grad():
        for p in (net.pool.k_scale, net.pool.v_scale, net.pool.mlp_scale):
            p.uniform_(0.5, 1.5)
    logits, routing = forward(net, b)
    assert len(set(routing["index"].tolist())) > 1, "the batch should mix entries"
    C = net.cfg.n_embd
    for i, entry in enumerate(routing["index"].tolist()):
        ref = tiny_model()
        ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("pool.")})
        with torch.no_grad():
            for layer, block in enumerate(ref.blocks):
                scale = torch.cat([torch.ones(C), net.pool.k_scale[entry, layer], net.pool.v_scale[entry, layer]])
                block.attn.qkv.weight.mul_(scale[:, None])
                block.attn.qkv.bias.mul_(scale)
                block.mlp.proj.weight.mul_(net.pool.mlp_scale[entry, layer][None, :])
        ref_logits, _ = forward(ref, {k: v[i : i + 1] for k, v in b.items()})
        assert torch.allclose(logits[i], ref_logits[0], atol=1e-4)


def test_adapters_act_on_both_sublayers_of_every_layer():
    net, b = tiny_model(), random_batch()
    net.attach_adapters(reduction=4)
    before = forward(net, b)[0]
    for layer in range(net.cfg.n_layer):
        for which in range(2):
            with torch.no_grad():
                net.adapters[layer][which].up.weight.normal_(0, 0.3)
            after = forward(net, b)[0]
            assert not torch.allclose(before, after), f"adapter {which} of layer {layer} changed nothing"
            before = after
    assert net.adapters[0][0].down.out_features == 32 // 4


def merged_reference(net, entry):
    """A plain model with pool entry `entry` folded into its weights: an independent reference for modulation."""
    ref = tiny_model()
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("pool.")})
    pool, C = net.pool, net.cfg.n_embd
    with torch.no_grad():
        for layer, block in enumerate(ref.blocks):
            block.attn.qkv.weight[:C] += pool.scale * (pool.q_a[entry, layer] @ pool.q_b[entry, layer]).T
            block.attn.qkv.weight[2 * C :] += pool.scale * (pool.v_a[entry, layer] @ pool.v_b[entry, layer]).T
            mix = (
                torch.eye(4 * C) + pool.scale * pool.mlp_a[entry, layer] @ pool.mlp_b[entry, layer]
            )  # u -> u (I + sAB)
            block.mlp.fc.weight.copy_(mix.T @ block.mlp.fc.weight)
            block.mlp.fc.bias.copy_(block.mlp.fc.bias @ mix)
    return ref


def test_batched_per_sample_modulation_equals_per_sample_reference():
    net, b = tiny_model(pool_size=4), random_batch(B=8)
    with torch.no_grad():
        for p in (net.pool.q_b, net.pool.v_b, net.pool.mlp_b):
            p.normal_(0, 0.3)
    logits, routing = forward(net, b)
    assert len(set(routing["index"].tolist())) > 1, "the batch should mix entries"
    for i, entry in enumerate(routing["index"].tolist()):
        ref_logits, _ = forward(merged_reference(net, entry), {k: v[i : i + 1] for k, v in b.items()})
        assert torch.allclose(logits[i], ref_logits[0], atol=1e-4)


def test_dense_and_per_sample_application_of_the_pool_agree(monkeypatch):
    net, b = tiny_model(pool_size=8), random_batch(B=8)
    query = net.query(
        net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"]), b["step_mask"]
    )
    with torch.no_grad():
        net.pool.keys.copy_(query)  # sample i routes to entry i: 8 entries in one batch
        for p in (net.pool.q_b, net.pool.v_b, net.pool.mlp_b):
            p.normal_(0, 0.3)
    results = {}
    for dense_entries in (0, 8):  # per sample (acting, no gradients), dense
        monkeypatch.setattr(M, "DENSE_ENTRIES", dense_entries)
        with torch.no_grad():
            results[dense_entries] = forward(net, b)
    assert torch.equal(results[0][1]["index"], torch.arange(8))
    assert torch.allclose(results[0][0], results[8][0], atol=1e-5)


def test_top1_routing_picks_the_key_equal_to_the_query():
    net, b = tiny_model(pool_size=6), random_batch(B=6)
    query = net.query(
        net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"]), b["step_mask"]
    )
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        net.pool.keys[order] = query * 2.0  # cosine ignores scale
    _, routing = forward(net, b)
    assert torch.equal(routing["index"], order)
    assert torch.allclose(routing["pull"], torch.tensor(1.0))


def test_count_penalty_sends_a_second_task_to_unused_entries():
    net, b = tiny_model(pool_size=6), random_batch(B=6)
    net.train()
    query = net.query(
        net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"]), b["step_mask"]
    )
    with torch.no_grad():
        net.pool.keys[2] = query.mean(0)  # task 0's windows all go to entry 2
        net.pool.keys[[0, 1, 3, 4, 5]] = -query.mean(0) + 0.1 * torch.randn(5, 32)
    net.pool.start_task(0)
    for _ in range(3):
        index, _ = net.pool.select(query)
        assert (index == 2).all()
    net.pool.start_task(1)  # the same states again: entry 2 is taken, so the penalty routes elsewhere
    index, _ = net.pool.select(query)
    assert (index != 2).all()
    net.eval()  # evaluation: plain cosine, no penalty
    assert (net.pool.select(query)[0] == 2).all()


def test_oracle_masks_entries_of_other_tasks():
    net, b = tiny_model(pool_size=6, n_groups=3), random_batch(B=6)
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    _, routing = forward(net, b, task_ids=task_ids)
    assert torch.equal(routing["index"] // 2, task_ids)


def test_task_statistics_infer_the_task_whose_gaussian_fits_best():
    gen = torch.Generator().manual_seed(0)
    tasks = [  # (mean, spread): tasks 0 and 1 differ only in their spread, as push and push-wall do
        (torch.zeros(4), 0.1),
        (torch.zeros(4), 2.0),
        (torch.tensor([5.0, 0.0, 0.0, 0.0]), 0.1),
    ]
    sample = [mu + sd * torch.randn(2000, 4, generator=gen) for mu, sd in tasks]
    stats = M.TaskStatistics(n_tasks=4, n_embd=4)
    assert not stats.fitted.any()
    for i, queries in enumerate(sample[:2]):
        stats.fit(i, queries[:1000])
    first_two = [stats.infer(q[1000:]) for q in sample[:2]]
    assert set(torch.cat(first_two).tolist()) <= {0, 1}, "only fitted tasks may be inferred"
    stats.fit(2, sample[2][:1000])
    for i, queries in enumerate(sample):  # queries it was not fitted on
        accuracy = (stats.infer(queries[1000:]) == i).float().mean().item()
        assert accuracy > 0.97, (i, accuracy)
    assert stats.infer(torch.tensor([[0.0, 0.0, 0.0, 0.05]])).item() == 0  # the tight task explains a central query


def test_routing_accuracy_follows_each_task_from_its_own_stage_to_the_end():
    def stage(*routings):
        return dict(results=[dict(task=f"t{j}", routing=r) for j, r in enumerate(routings)])

    # task 0 used entries 0 (95%) and 1 (5%, below the 10% that makes an entry its own) when learned; task 1 took
    # half of task 0's steps afterwards
    stages = [stage([95, 5, 0], [0, 0, 100]), stage([45, 5, 50], [0, 0, 100])]
    assert evaluate.routing_accuracy(stages) == [("t0", 0.95, 0.45), ("t1", 1.0, 1.0)]
    for st, inferred in zip(stages, ([[10, 0], [3, 7]], [[6, 4], [0, 10]])):  # l2m-stats: the inferred task ids
        for r, counts in zip(st["results"], inferred):
            r["inferred"] = counts
    assert evaluate.routing_accuracy(stages) == [("t0", 1.0, 0.6), ("t1", 1.0, 1.0)]


PROMPTS = [{"pool_size": 6, "length": 3, "top_k": 2, "kind": kind} for kind in M.PROMPT_KINDS]


EVERY_KIND = [{}, {"pool_size": 3}, {"pool_size": 3, "kind": "ia3"}, {"adapters": True}, *PROMPTS]


def modulated_model(pool):
    """A tiny act_dim-6 model with `pool` (or adapters) whose modulators are not the identity, and a batch."""
    pool = dict(pool)
    adapters = pool.pop("adapters", False)
    net, b = tiny_model(act_dim=6, **pool), random_batch(act_dim=6)
    if adapters:
        net.attach_adapters(reduction=4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.split(".")[-2:-1] == ["up"] or name.endswith(("q_b", "mlp_b", "k_scale", "mlp_scale")):
                p.normal_(1.0 if name.endswith("scale") else 0.0, 0.3)
    return net, b


@pytest.mark.parametrize("pool", EVERY_KIND, ids=str)
def test_training_logits_equal_those_of_every_row_computed(pool):
    """forward's last block computes only the predicting rows; the logits are those of running every row."""
    net, b = modulated_model(pool)
    logits, _ = forward(net, b)
    tokens = net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"])
    mods, _, prompt = net.modulators(tokens, b["step_mask"])
    x = net.run_blocks(tokens, net.attention_mask(b["step_mask"], prompt), mods, prompt)  # (6, [N +] 45, 32)
    x = x[:, x.shape[1] - 45 :].view(6, 5, 9, 32)[:, :, 1:7]  # R and a^1..a^5 of every timestep predict
    assert logits.shape == (6, 5, 6, 64)
    assert torch.allclose(logits, net.action_head(net.ln_f(x)), atol=1e-5)


@pytest.mark.parametrize("pool", EVERY_KIND, ids=str)
def test_cached_acting_equals_uncached(pool):
    net, b = modulated_model(pool)
    for act_dim in (1, 4, 6):
        cached, _ = net.act(**b, act_dim=act_dim)
        plain, _ = net.act(**b, act_dim=act_dim, use_cache=False)
        assert cached.shape == (6, act_dim) and torch.equal(cached, plain)


def test_acting_with_entries_folded_into_the_weights_picks_the_same_actions(monkeypatch):
    """ModulationPool.merge: each entry's LoRA folded into the frozen weights it modulates, the batch reordered so each
    entry's samples are one slice; the same actions as applying the modulators per sample, cached or not, returned
    in the batch's own order; the folded weights kept in the rollout's dict, in the autocast dtype under bf16."""
    monkeypatch.setattr(M, "DENSE_ENTRIES", 0)  # the unfolded reference: per sample, as acting on many entries
    net, b = modulated_model({"pool_size": 4})
    with torch.no_grad():
        net.pool.keys.copy_(torch.randn(4, 32))
        net.pool.v_b.normal_(0, 0.3)
        for block in net.blocks:  # biases, so folding the MLP's includes them
            block.mlp.fc.bias.normal_(0, 0.3)
    plain, routing = net.act(**b, act_dim=6)
    index = routing["index"].tolist()
    assert len(set(index)) >= 3 and index != sorted(index), "the batch should interleave several entries"
    merged, tokens, mask = {}, net.embed(*list(b.values())[:5]), net.attention_mask(b["step_mask"])
    with torch.no_grad():  # as in acting
        mods, _, _ = net.modulators(tokens, b["step_mask"], merged=merged)
        order, per_sample = mods[0]["order"], net.modulators(tokens, b["step_mask"])[0]
        assert per_sample[0]["select"] is None and mods[0]["select"] is not None  # later passes: the dense form
        folded_x = net.run_blocks(tokens[order], mask[order], [mod["first"] for mod in mods], None)  # (6, 45, 32)
        assert torch.allclose(folded_x, net.run_blocks(tokens, mask, per_sample, None)[order], atol=1e-5)
        assert not torch.allclose(folded_x, net.run_blocks(tokens, mask, None, None)[order], atol=1e-2)  # they matter
    assert sorted(e for e, _ in merged) == sorted(set(index))
    for act_dim in (1, 4, 6):
        folded, folded_routing = net.act(**b, act_dim=act_dim, merged=merged)
        uncached, _ = net.act(**b, act_dim=act_dim, use_cache=False, merged=merged)
        assert torch.equal(folded, plain[:, :act_dim]) and torch.equal(uncached, plain[:, :act_dim])
        assert torch.equal(folded_routing["index"], routing["index"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = net.act(**b, act_dim=6, merged=merged)
    assert bf16.shape == (6, 6) and {dtype for _, dtype in merged} == {torch.float32, torch.bfloat16}


@pytest.mark.parametrize("pool", PROMPTS, ids=lambda p: p["kind"])
def test_prompts_keep_causality_and_padding_invisible(pool):
    net, b = tiny_model(**pool), random_batch()
    logits, routing = forward(net, b)
    assert routing["index"].shape == (6, 2)
    changed = {k: v.clone() for k, v in b.items()}
    changed["action_bins"][:, 2, 1] = (changed["action_bins"][:, 2, 1] + 7) % 64  # a^2 of timestep 2: same query
    after, _ = forward(net, changed)
    assert torch.equal(logits[:, :2], after[:, :2]) and torch.equal(logits[:, 2, :2], after[:, 2, :2])
    assert not torch.allclose(logits[:, 2, 2:], after[:, 2, 2:])
    garbage = {k: v.clone() for k, v in b.items()}
    pad = ~b["step_mask"]
    garbage["states"][pad], garbage["action_bins"][pad], garbage["timesteps"][pad] = 5.0, 7, 99
    after, routing_after = forward(net, garbage)
    assert torch.allclose(logits[b["step_mask"]], after[b["step_mask"]], atol=1e-6)
    assert torch.equal(routing["index"], routing_after["index"])


@pytest.mark.parametrize("pool", PROMPTS, ids=lambda p: p["kind"])
def test_only_the_chosen_prompts_matter_and_every_layer_of_them(pool):
    net, b = tiny_model(**pool), random_batch()
    query = net.query(
        net.embed(b["states"], b["returns"], b["action_bins"], b["rewards"], b["timesteps"]), b["step_mask"]
    )
    with torch.no_grad():  # every window prefers entries 4, then 1: the top 2
        net.pool.keys.copy_(-query.mean(0).repeat(6, 1) + 0.01 * torch.randn(6, 32))
        net.pool.keys[4], net.pool.keys[1] = query.mean(0), query.mean(0) + 0.3 * torch.randn(32)
    logits, routing = forward(net, b)
    assert {tuple(sorted(row)) for row in routing["index"].tolist()} == {(1, 4)}
    with torch.no_grad():
        net.pool.prompts[[0, 2, 3, 5]] += torch.randn(4, *net.pool.prompts.shape[1:])  # entries no window chose
    assert torch.equal(forward(net, b)[0], logits)
    for depth in range(net.pool.prompts.shape[1]):  # pv2: each layer's prompt; pret: each layer's keys and values
        with torch.no_grad():
            net.pool.prompts[4, depth] += torch.randn_like(net.pool.prompts[4, depth])  # (a constant, LN removes)
        after = forward(net, b)[0]
        assert not torch.allclose(after, logits), f"prompt depth {depth} changed nothing"
        logits = after


def test_top_k_counts_every_chosen_entry_in_the_selection_frequency():
    pool = M.PromptPool(2, 32, pool_size=6, length=2, top_k=3).train()
    query = torch.randn(10, 32)
    index, _ = pool.select(query)
    assert index.shape == (10, 3) and pool.counts.sum().item() == pytest.approx(1.0)
    assert torch.allclose(pool.counts, torch.bincount(index.flatten(), minlength=6).float() / 30)


# ---------------------------------------------------------------------------------------------------------
# pretrain.py

import pretrain  # noqa: E402


def write_fake_task(data_dir, name, episodes=4, length=20, obs_dim=39, act_dim=4, seed=0):
    """A synthetic data file in the contract: rewards 1, 2, 3, ... within each episode, so returns are known."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    arrays = dict(
        observations=rng.standard_normal((n, obs_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        rewards=np.tile(np.arange(1, length + 1), episodes).astype(np.float32),
        dones=np.tile(np.arange(length) == length - 1, episodes),
    )
    if not collect.is_metaworld(name):
        arrays["random_return"] = np.float32(1.0)
        unused = np.setdiff1d(np.arange(obs_dim), collect.make_env(name).columns)  # 0 in the 204-column layout
        arrays["observations"][:, unused] = 0
    collect.save_npz(str(data_dir / f"{name}.npz"), arrays)
    return arrays


def test_held_out_metrics_are_also_reported_per_domain():
    metrics = {"reach-v3": (1.0, 0.5), "push-v3": (3.0, 0.7), "walker-walk": (2.0, 0.9)}
    means = pretrain.domain_means(metrics)
    assert means["metaworld"] == pytest.approx((2.0, 0.6)) and means["dmcontrol"] == pytest.approx((2.0, 0.9))
    assert collect.resolve_tasks("retaindmc5") == collect.DMC10[::2]


def test_the_data_of_a_dmcontrol_task_is_scored_as_its_rollouts_are(tmp_path):
    arrays = write_fake_task(tmp_path, "cartpole-balance", episodes=10, length=10, obs_dim=204, act_dim=1)
    arrays["rewards"] *= np.repeat(np.arange(1, 11), 10)  # episode k returns 55 k; random actions return 1
    collect.save_npz(str(tmp_path / "cartpole-balance.npz"), arrays)
    (task,), *_ = pretrain.load_data(["cartpole-balance"], str(tmp_path), 1, 5, 6, 64, 0)
    assert task["data_return"] == 550.0  # the best 10%: one episode of ten
    assert task["data_score"] == pytest.approx([(55 * 5.5 - 1) / 549, 1.0])  # mean, best 10%, as (R - 1) / (550 - 1)


def test_dataset_windows_left_pad_returns_to_go_and_timesteps(tmp_path):
    arrays = write_fake_task(tmp_path, "reach-v3", episodes=3, length=10)
    write_fake_task(tmp_path, "cartpole-balance", episodes=3, length=10, obs_dim=204, act_dim=1)
    tasks, data, pools, heldout = pretrain.load_data(["reach-v3", "cartpole-balance"], str(tmp_path), 1, 5, 6, 64, 0)
    assert tasks[0]["target_return"] == 55.0 and tasks[1]["act_dim"] == 1 and len(pools) == 2
    assert (tasks[1]["random_return"], tasks[1]["data_return"]) == (1.0, 55.0)  # the score's 0 and 1 (best 10%)
    assert tasks[1]["data_score"] == [1.0, 1.0] and "data_score" not in tasks[0]  # equal episodes: all at the best
    b, valid, task = data.windows(np.array([1, 1, 4]), np.array([0, 8, 3]))  # episode 1 of reach; of cartpole
    assert task.tolist() == [0, 0, 1]
    assert b["step_mask"][0].all() and b["step_mask"][1].tolist() == [False, False, False, True, True]
    assert b["timesteps"][1].tolist() == [0, 0, 0, 8, 9] and b["timesteps"][0].tolist() == [0, 1, 2, 3, 4]
    scale = 200.0  # Meta-World's reward scale: return-to-go at step t of rewards 1..10 is sum(t+1..10)
    assert torch.allclose(b["returns"][0] * scale, torch.tensor([55.0, 54, 52, 49, 45]))
    assert torch.allclose(b["rewards"][1, 3:] * scale, torch.tensor([9.0, 10.0]))
    assert torch.equal(b["states"][0, :, :39], torch.from_numpy(arrays["observations"][10:15]))
    assert (b["states"][:2, :, 39:] == 0).all() and (b["states"][1, :3] == 0).all()
    assert (b["action_bins"][1, :3] == 64).all() and (b["action_bins"][2, :, 1:] == 64).all()  # padding token
    assert valid[2].sum() == 5 and valid[0].sum() == 20 and valid[1].sum() == 8
    _, _, sampled_task = data.sample(64, pools)
    assert (sampled_task == 0).sum() == 32, "batches are balanced across domains"


@pytest.fixture
def fake_data(tmp_path):
    for i, name in enumerate(["reach-v3", "push-v3"]):
        write_fake_task(tmp_path, name, episodes=5, length=30, seed=i)
    return tmp_path


def pretrain_args(data_dir, **kw):
    base = dict(
        tasks="reach-v3,push-v3",
        data_dir=str(data_dir),
        out=str(data_dir / "run" / "ckpt.pt"),
        steps=6,
        batch_size=8,
        n_layer=2,
        n_head=2,
        n_embd=32,
        warmup_steps=2,
        dropout=0.1,  # the shipped recipe has none; these tests keep dropout's RNG streams in play
        eval_every=3,
        save_every=3,
    )
    return pretrain.Args(**{**base, **kw})


def test_resume_equals_an_uninterrupted_run(fake_data, monkeypatch):
    pretrain.main(pretrain_args(fake_data, out=str(fake_data / "a" / "ckpt.pt")))
    uninterrupted = torch.load(fake_data / "a" / "ckpt.pt", weights_only=True)["model"]

    real_save = pretrain.save_atomic

    def save_then_crash(obj, path):  # the run dies right after its first checkpoint (step 3)
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(pretrain_args(fake_data))
    monkeypatch.setattr(pretrain, "save_atomic", real_save)
    assert torch.load(fake_data / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    pretrain.main(pretrain_args(fake_data, resume=True))
    resumed = torch.load(fake_data / "run" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 6
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed["model"][k]), k


def test_an_exported_backbone_is_the_run_without_its_training_state(fake_data, capsys):
    run = fake_data / "a" / "ckpt.pt"
    pretrain.main(pretrain_args(fake_data, out=str(run)))
    dest = fake_data / "shipped" / "backbone.pt"
    pretrain.cli(["--out", str(run), "--export", str(dest)])
    assert f"sha256 {collect.file_sha256(str(dest))}" in capsys.readouterr().out
    full, exported = (torch.load(p, weights_only=True) for p in (run, dest))
    assert set(exported) == collect.CHECKPOINT_KEYS["pretrain"] and dest.stat().st_size < run.stat().st_size / 2
    built = [evaluate.build_model(c, torch.device("cpu")).state_dict() for c in (full, exported)]
    assert built[0].keys() == built[1].keys() and all(torch.equal(built[0][k], built[1][k]) for k in built[0])
    # training cannot continue from it, a second export does not replace it, an unfinished run is not exported
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(pretrain_args(fake_data)).items() if k != "out"]
    argv = [a for a in argv if not a.startswith(("--resume", "--overwrite", "--branch-from", "--export"))]
    assert "holds weights only" in refuses(pretrain, argv + ["--out", str(dest), "--resume"], capsys)
    assert "exists: --overwrite replaces it" in refuses(pretrain, ["--out", str(run), "--export", str(dest)], capsys)
    unfinished = fake_data / "b" / "ckpt.pt"  # as a run of 6 steps stopped at step 3 leaves it
    collect.save_atomic({**full, "step": 3}, str(unfinished))
    argv = ["--out", str(unfinished), "--export", str(fake_data / "b.pt")]
    assert "at step 3 of 6: finish it" in refuses(pretrain, argv, capsys) and not (fake_data / "b.pt").exists()


def test_the_shipped_backbone_is_the_readmes_file_made_by_pretrains_defaults():
    """`python pretrain.py` reproduces the committed backbone: the file is the one whose sha256 the README gives,
    loads without unpickling code, fits the repository's 16 MiB, and was made by today's defaults to the last step."""
    path = os.path.join(HERE, finetune.Args().ckpt)
    assert os.path.getsize(path) <= 16 * 2**20
    readme = open(os.path.join(HERE, "README.md")).read()
    assert f"`{collect.file_sha256(path)}`" in readme, "the README's sha256 is not the shipped file's"
    shipped = collect.load_checkpoint(path, kinds=("pretrain",))  # weights_only=True
    assert set(shipped) == collect.CHECKPOINT_KEYS["pretrain"], "weights and config only, no training state"
    defaults = asdict(pretrain.Args())
    recipe = {k: v for k, v in shipped["args"].items() if k not in pretrain.RUN_CONTROL}
    assert recipe == {k: v for k, v in defaults.items() if k not in pretrain.RUN_CONTROL}
    assert shipped["step"] == defaults["steps"]
    evaluate.build_model(shipped, torch.device("cpu"))  # its weights fit its config: a mismatch raises


def test_a_scaling_point_reads_its_budget_heldout_retention_and_cw10_runs(fake_data, capsys):
    branch = fake_data / "scale" / "b6"
    pretrain.main(pretrain_args(fake_data, out=str(branch / "ckpt.pt")))
    tasks = [dict(task=n, success=s, success_any=1.0, mean_return=10.0) for n, s in (("reach-v3", 0.5), ("push-v3", 0))]
    (branch / "retain10").mkdir(), (branch / "cw10-l2m-oracle").mkdir()
    collect.write_text(str(branch / "retain10" / "results.json"), json.dumps(dict(results=tasks)))
    run = dict(method="l2m-oracle", metrics=dict(average=0.4, forgetting=0.0))
    run["backbone_sha256"] = collect.file_sha256(str(branch / "ckpt.pt"))  # it fine-tuned this point's model
    collect.write_text(str(branch / "cw10-l2m-oracle" / "results.json"), json.dumps(run))
    out = fake_data / "points"
    evaluate.cli(["--scaling", str(fake_data / "scale" / "b*"), "--ms-per-step", "600", "--out", str(out)])
    point = json.loads((out / "d32x2-6-fresh.json").read_text())  # a run of its own, not a branch
    assert point["hours"] == pytest.approx(6 * 0.6 / 3600) and point["retain10"] == 0.25
    assert point["cw10"] == {"l2m-oracle": dict(success=0.4, forgetting=0.0)} and (out / "scaling.png").exists()
    record = out / "d32x2-6-fresh" / "cw10-l2m-oracle" / "results.json"  # the run's record, beside its point
    assert json.loads(record.read_text()) == run
    table = (out / "scaling.md").read_text()
    assert "| 2 × 32 (" in capsys.readouterr().out and "| 0.25 (1.00) | – | 0.40 | – |" in table
    assert ", one run |" in table  # a point not branched off a long run says so
    assert "matched no folder" in refuses(
        evaluate, ["--scaling", str(fake_data / "none*"), "--ms-per-step", "1"], capsys
    )
    (branch / "cw10-l2m").mkdir()  # a run of another backbone, put beside this point by mistake
    collect.write_text(str(branch / "cw10-l2m" / "results.json"), json.dumps({**run, "backbone_sha256": "0" * 64}))
    argv = ["--scaling", str(branch), "--ms-per-step", "600", "--out", str(out)]
    assert f"{branch / 'cw10-l2m'} fine-tuned another model than" in refuses(evaluate, argv, capsys)


@pytest.mark.slow
def test_a_kill_between_evaluation_and_save_logs_each_evaluation_once(fake_data, monkeypatch):
    pretrain.main(pretrain_args(fake_data, out=str(fake_data / "a" / "ckpt.pt")))
    real_save, saves = pretrain.save_atomic, []

    def crash_at_the_second_save(obj, path):  # step 6 was evaluated and logged, then the run died before saving
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(pretrain, "save_atomic", crash_at_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(pretrain_args(fake_data))
    monkeypatch.setattr(pretrain, "save_atomic", real_save)
    pretrain.main(pretrain_args(fake_data, resume=True))  # from step 3: steps 4-6 and their evaluation again
    logged = (fake_data / "run" / "metrics.jsonl").read_text()
    assert logged == (fake_data / "a" / "metrics.jsonl").read_text()  # steps 3 and 6, once each, as uninterrupted


def test_checkpoint_round_trip_gives_identical_actions(fake_data):
    pretrain.main(pretrain_args(fake_data))
    ckpt = collect.load_checkpoint(str(fake_data / "run" / "ckpt.pt"))
    assert ckpt["tasks"][0]["name"] == "reach-v3" and ckpt["tasks"][0]["target_return"] == sum(range(1, 31))
    torch.manual_seed(1)
    net = M.DecisionTransformer(M.DTConfig(**ckpt["model_args"])).eval()  # weights that no file holds yet
    path = str(fake_data / "round-trip.pt")
    collect.save_atomic({**ckpt, "model": net.state_dict()}, path)
    again = evaluate.build_model(collect.load_checkpoint(path), torch.device("cpu")).eval()
    b = random_batch(act_dim=4)
    assert torch.equal(net.act(**b, act_dim=4)[0], again.act(**b, act_dim=4)[0])
    trained = evaluate.build_model(ckpt, torch.device("cpu")).eval()
    assert not torch.equal(forward(trained, b)[0], forward(net, b)[0])  # the file's weights decide the actions


def test_wsd_lr_is_constant_until_its_decay_then_falls_to_min_lr():
    args = pretrain.Args(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5, schedule="wsd", decay_frac=0.2)
    lrs = [pretrain.lr_at(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warm-up
    assert all(lr == 1e-3 for lr in lrs[10:81])  # stable until step 80 = 100 - 0.2 * 100
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and lrs[99] > 1e-5  # decaying
    assert pretrain.lr_at(100, args) == pytest.approx(1e-5)
    longer = pretrain.Args(**{**asdict(args), "steps": 400})
    assert [pretrain.lr_at(s, longer) for s in range(81)] == lrs[:81]  # a longer run passes through this one


@pytest.mark.slow
def test_a_decay_branched_from_a_snapshot_equals_the_run_that_made_it(fake_data, capsys):
    wsd = dict(schedule="wsd", decay_frac=0.5, steps=8, warmup_steps=2, eval_every=4, save_every=100)
    pretrain.main(pretrain_args(fake_data, out=str(fake_data / "a" / "ckpt.pt"), snapshots="3", **wsd))
    snapshot = fake_data / "a" / "ckpt-step3.pt"
    assert torch.load(snapshot, weights_only=True)["step"] == 3
    pretrain.main(pretrain_args(fake_data, out=str(fake_data / "b" / "ckpt.pt"), branch_from=str(snapshot), **wsd))
    straight = torch.load(fake_data / "a" / "ckpt.pt", weights_only=True)
    branched = torch.load(fake_data / "b" / "ckpt.pt", weights_only=True)
    assert branched["step"] == 8
    for k, v in straight["model"].items():
        assert torch.equal(v, branched["model"][k]), k
    # a snapshot past the branch's constant-lr phase, or one made with other settings, is refused before any work
    argv = ["--branch-from", str(snapshot), "--out", str(fake_data / "c" / "ckpt.pt")]
    base = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(pretrain_args(fake_data, **wsd)).items()]
    base = [a for a in base if not a.startswith(("--out", "--resume", "--overwrite", "--branch-from", "--snapshots"))]
    assert "past the constant-lr phase" in refuses(pretrain, base + argv + ["--steps", "4"], capsys)
    assert "--lr 0.001 (snapshot) vs 0.002 (now)" in refuses(pretrain, base + argv + ["--lr", "2e-3"], capsys)
    assert not (fake_data / "c").exists()


@pytest.mark.slow
def test_grad_clip_zero_means_no_clipping(fake_data):
    pretrain.main(pretrain_args(fake_data, out=str(fake_data / "a" / "ckpt.pt"), grad_clip=0.0))
    pretrain.main(pretrain_args(fake_data, out=str(fake_data / "b" / "ckpt.pt"), grad_clip=1e9))  # never binds
    unclipped = torch.load(fake_data / "a" / "ckpt.pt", weights_only=True)["model"]
    for k, v in torch.load(fake_data / "b" / "ckpt.pt", weights_only=True)["model"].items():
        assert torch.equal(v, unclipped[k]), k


@pytest.mark.slow
def test_one_writer_per_folder_and_a_dead_holder_is_taken_over(fake_data, capsys):
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(pretrain_args(fake_data)).items() if v is not False]
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import collect; collect.lock_folder({str(fake_data / 'run')!r}, 'x'); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE,
    )  # fmt: skip
    deadline = time.time() + 30
    while not (fake_data / "run" / ".lock").exists() or not (fake_data / "run" / ".lock").read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    line = refuses(pretrain, argv, capsys)
    assert f"--out's folder {fake_data / 'run'} is in use by pid {holder.pid} (-c)" in line
    assert not (fake_data / "run" / "ckpt.pt").exists() and not (fake_data / "run" / "metrics.jsonl").exists()
    holder.kill()  # kill -9: its lock file stays behind, its lock does not
    holder.wait()
    pretrain.cli(argv)
    assert f"from pid {holder.pid} (-c), which is no longer running" in capsys.readouterr().out
    assert (fake_data / "run" / "ckpt.pt").exists()


def test_a_full_disk_ends_a_stage_with_one_line(fake_data, monkeypatch, capsys):
    def disk_full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 324416 vs 324308")

    monkeypatch.setattr(collect.torch, "save", disk_full)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(pretrain_args(fake_data)).items() if v is not False]
    line = refuses(pretrain, argv, capsys)
    assert line.startswith(f"pretrain.py: error: could not write {fake_data / 'run' / 'ckpt.pt'} (")
    assert "MiB free on that disk" in line and not (fake_data / "run" / "ckpt.pt").exists()


def test_the_paper_preset_sets_the_papers_scale_and_flags_given_still_win():
    paper = collect.parse_args(pretrain.Args, ["--preset", "paper", "--steps", "10"], presets=pretrain.PRESETS)
    assert (paper.n_layer, paper.n_head, paper.n_embd, paper.batch_size, paper.lr) == (6, 12, 768, 512, 1e-4)
    assert (paper.schedule, paper.dropout) == ("cosine", 0.1)  # the authors', whatever the cpu defaults are
    assert paper.tasks == "mt40,dmc10" and paper.steps == 10  # given on the command line
    assert collect.parse_args(pretrain.Args, [], presets=pretrain.PRESETS) == pretrain.Args()
    tuned = collect.parse_args(finetune.Args, ["--preset", "paper"], presets=finetune.PRESETS)
    assert (tuned.steps_per_task, tuned.batch_size, tuned.lr, tuned.eval_episodes) == (100_000, 256, 1e-4, 5)
    assert finetune.command_line(tuned).startswith("python finetune.py --preset paper --steps-per-task 100000")


@pytest.mark.slow
def test_a_run_from_before_a_setting_existed_resumes_as_the_older_code_ran_it(fake_data, capsys):
    pretrain.main(pretrain_args(fake_data, schedule="cosine"))
    old = torch.load(fake_data / "run" / "ckpt.pt", weights_only=True)
    old["step"] = 3  # as if it had stopped at its first save
    for newer in ("preset", "schedule", "decay_frac"):  # settings added after such a checkpoint was written
        del old["args"][newer]
    torch.save(old, fake_data / "run" / "ckpt.pt")
    # the code of then had no schedule but cosine: today's default (wsd) would change the run, so it is refused
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(pretrain_args(fake_data)).items()]
    line = refuses(pretrain, [a for a in argv if not a.startswith(("--resume", "--overwrite"))] + ["--resume"], capsys)
    assert "--schedule 'cosine' (checkpoint) vs 'wsd' (now)" in line
    pretrain.main(pretrain_args(fake_data, schedule="cosine", resume=True))
    assert torch.load(fake_data / "run" / "ckpt.pt", weights_only=True)["step"] == 6


def test_resume_with_other_settings_says_what_differs(fake_data, capsys):
    pretrain.main(pretrain_args(fake_data))
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(pretrain_args(fake_data, n_embd=64)).items()]
    line = refuses(pretrain, [a for a in argv if not a.startswith(("--resume", "--overwrite"))] + ["--resume"], capsys)
    assert "--n-embd 32 (checkpoint) vs 64 (now)" in line


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda a: a.pop("rewards"), "missing keys ['rewards']"),
        (lambda a: a["observations"].__setitem__((3, 2), np.nan), "observations contains NaN"),
        (lambda a: a.__setitem__("actions", a["actions"][:, :, None]), "expected observations (N, obs_dim)"),
    ],
)
def test_bad_data_files_are_rejected_naming_the_file(tmp_path, corrupt, message, capsys):
    arrays = write_fake_task(tmp_path, "reach-v3")
    corrupt(arrays)
    collect.save_npz(str(tmp_path / "reach-v3.npz"), arrays)
    argv = ["--tasks", "reach-v3", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x" / "c.pt")]
    line = refuses(pretrain, argv, capsys)
    assert message in line and "reach-v3.npz" in line
    assert not (tmp_path / "x").exists()


def test_missing_data_names_the_collect_command(tmp_path, capsys):
    argv = ["--tasks", "cw10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c.pt")]
    assert "python collect.py --tasks hammer-v3,push-wall-v3" in refuses(pretrain, argv, capsys)


@pytest.mark.slow
def test_two_process_gloo_ddp_run(fake_data):
    out = fake_data / "ddp" / "ckpt.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # a free port: two suites at once do not collide
            os.path.join(HERE, "pretrain.py"),
            "--tasks",
            "reach-v3,push-v3",
            "--data-dir",
            str(fake_data),
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--warmup-steps",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=HERE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]["numpy"]) == 2
    assert ckpt["rng"]["numpy"][0] != ckpt["rng"]["numpy"][1], "each rank samples its own windows"


# ---------------------------------------------------------------------------------------------------------
# finetune.py and evaluate.py

import evaluate  # noqa: E402
import finetune  # noqa: E402


def test_continual_metrics_on_a_hand_made_matrix():
    S = [[0.8, 0.0, 0.1], [0.2, 0.6, 0.0], [0.4, 0.3, 1.0]]
    m = evaluate.continual_metrics(S, reference=[0.5, 0.6, 0.0])
    assert m["average"] == pytest.approx((0.4 + 0.3 + 1.0) / 3)
    assert m["forgetting"] == pytest.approx(((0.8 - 0.4) + (0.6 - 0.3) + 0.0) / 3)
    assert m["gap_to_reference"] == pytest.approx(((0.8 - 0.5) + (0.6 - 0.6) + (1.0 - 0.0)) / 3)
    with pytest.raises(ValueError, match="square"):
        evaluate.continual_metrics([[0.1, 0.2]])


def test_compare_runs_averages_seeds_per_method(tmp_path):
    def fake_run(
        name,
        method,
        success,
        success_any,
        retained=None,
        seed=0,
        frozen_dropout=False,
        command=None,
        tasks=("hammer-v3", "push-wall-v3"),
        **extra,
    ):
        run = tmp_path / name
        run.mkdir()
        stages = [dict(train_seconds=60.0, eval_seconds=30.0)] * len(success)
        (run / "results.json").write_text(
            json.dumps(
                dict(
                    method=method,
                    tasks=list(tasks),
                    success=success,
                    success_any=success_any,
                    metrics={},
                    trainable_params=1234,
                    command=command,
                    stages=stages,
                    args=dict(seed=seed, run_dir=name),
                    setting=dict(
                        ckpt=str(tmp_path / "pretrain" / "ckpt.pt"), frozen_dropout=frozen_dropout, tasks="cw10"
                    ),
                    **extra,
                )
            )
        )
        if retained is not None:
            (run / "retain10").mkdir()
            (run / "retain10" / "results.json").write_text(
                json.dumps(dict(results=[dict(success=s, success_any=s + 0.1) for s in retained]))
            )
        return str(run)

    runs = [
        fake_run("ft0", "ft", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.2, 1.0]], retained=[0.0, 0.2]),
        fake_run(
            "ft1",
            "ft",
            [[1.0, 0.0], [0.4, 0.6]],
            [[1.0, 0.0], [0.6, 0.8]],
            retained=[0.2, 0.2],
            seed=1,
            command="python finetune.py --method ft --seed 1",
        ),
        fake_run("l2m0", "l2m", [[0.6, 0.0], [0.6, 0.8]], [[0.6, 0.0], [0.6, 0.8]]),
        fake_run("l2m-dropout", "l2m", [[0.2, 0.0], [0.2, 0.2]], [[0.2, 0.0], [0.2, 0.2]], frozen_dropout=True),
    ]
    (tmp_path / "pretrain" / "retain10").mkdir(parents=True)  # the pre-trained model's retention, beside the runs
    retain10 = dict(ckpt=str(tmp_path / "pretrain" / "ckpt.pt"), results=[dict(success=0.1, success_any=0.3)])
    (tmp_path / "pretrain" / "retain10" / "results.json").write_text(json.dumps(retain10))
    table = evaluate.compare_runs(runs, reference_dir=runs[2])
    assert f"pre-trained model in {tmp_path / 'pretrain'}: 0.10 (last step), 0.30 (any step)" in table
    retain10["ckpt"] = str(tmp_path / "another-backbone.pt")  # beside the runs, but not the model they started from
    (tmp_path / "pretrain" / "retain10" / "results.json").write_text(json.dumps(retain10))
    assert "pre-trained model in" not in evaluate.compare_runs(runs)
    assert "| success (last step) | paper | success (any step) | forgetting | gap to l2m (end of task) |" in table
    ft, l2m, dropout = [line for line in table.splitlines() if line.startswith("| ft ") or line.startswith("| l2m ")]
    # ft: last step 0.5 and 0.5, any step 0.6 and 0.7; forgetting 0.5 and 0.3; gap to the diagonal (0.6, 0.8): 0.3, 0.1;
    # retention 0.1 and 0.2 (last step), 0.2 and 0.3 (any step)
    assert ft == (
        "| ft | 2 | 0.50 ± 0.00 | – | 0.65 ± 0.05 | 0.40 ± 0.10 | 0.20 ± 0.10 | 0.15 ± 0.05 | 0.25 ± 0.05 "
        "| 1,234 | 3 ± 0 |"
    )
    assert (
        l2m == "| l2m (frozen_dropout=False) | 1 | 0.70 | 0.65 | 0.70 | 0.00 | 0.00 | – | – | 1,234 | 3 |"
    )  # paper 0.65
    assert dropout.startswith("| l2m (frozen_dropout=True) | 1 | 0.20 | 0.65 | 0.20 | 0.00 |"), (
        "another setting, another row"
    )
    assert "- ft, seed 1: `python finetune.py --method ft --seed 1`" in table
    # per run, its forgetting and the tasks it lost by more than 0.2, which a mean over seeds would hide
    assert "- ft, seed 0: 0.50 (hammer 1.00 → 0.00)\n- ft, seed 1: 0.30 (hammer 1.00 → 0.40)\n" in table
    assert "- l2m (frozen_dropout=False), seed 0: 0.00\n" in table
    with pytest.raises(FileNotFoundError, match="finished finetune.py run"):
        evaluate.compare_runs([str(tmp_path / "nowhere")])
    other = fake_run("one-task", "l2m-oracle", [[1.0]], [[1.0]], tasks=("hammer-v3",))
    with pytest.raises(ValueError, match="differ in their task sequence"):
        evaluate.compare_runs(runs[:1], reference_dir=other)
    with pytest.raises(ValueError, match="differ in their task sequence"):
        evaluate.compare_runs(runs[:1] + [other])
    assert "| ft | 2 |" in evaluate.compare_runs(runs[:2] + [runs[0], runs[1] + "/"])  # named twice: counted once


def test_compare_refuses_mixed_backbones_and_stale_results_unless_told(tmp_path):
    def fake_run(name, seed, backbone, ckpt_sha256=None):
        run = tmp_path / name
        run.mkdir()
        (run / "results.json").write_text(json.dumps(dict(
            method="ft", tasks=["hammer-v3"], success=[[seed / 2]], success_any=[[seed / 2]], metrics={},
            trainable_params=1, command=None, stages=[dict(train_seconds=60.0, eval_seconds=0.0)],
            args=dict(seed=seed), setting=dict(ckpt="runs/pretrain/ckpt.pt", tasks="hammer"),
            backbone_sha256=backbone, ckpt_sha256=ckpt_sha256,
        )))  # fmt: skip
        return str(run)

    runs = [fake_run("ft-s0", 0, "a" * 64), fake_run("ft-s1", 1, "b" * 64)]  # the backbone re-trained in between
    with pytest.raises(ValueError, match="ft-s1 and .*ft-s0 differ in their backbone"):
        evaluate.compare_runs(runs)
    table = evaluate.compare_runs(runs, allow_mixed=True)
    assert "| ft [backbone aaaaaaaaaaaa] | 1 | 0.00 |" in table and "| ft [backbone bbbbbbbbbbbb] | 1 | 0.50 |" in table
    with pytest.raises(ValueError, match="differ in their backbone"):
        evaluate.compare_runs(runs[:1], reference_dir=runs[1])
    (tmp_path / "ft-s0" / "ckpt.pt").write_bytes(b"a newer run's first checkpoint")
    (tmp_path / "ft-s0" / "results.json").write_text(
        (tmp_path / "ft-s0" / "results.json")
        .read_text()
        .replace('"ckpt_sha256": null', '"ckpt_sha256": "' + "c" * 64 + '"')
    )
    with pytest.raises(ValueError, match="belongs to an earlier checkpoint than"):
        evaluate.compare_runs(runs[:1])


def test_the_per_task_table_puts_each_tasks_ceiling_beside_the_methods(tmp_path):
    def fake_run(name, method, tasks, success, steps=2500, backbone="a" * 64, **extra):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(dict(
            method=method, tasks=tasks, success=success, success_any=success, metrics={}, trainable_params=1,
            command=None, stages=[dict(train_seconds=60.0, eval_seconds=0.0)] * len(tasks), args=dict(seed=0),
            setting=dict(ckpt="b.pt", tasks=",".join(tasks), steps_per_task=steps), backbone_sha256=backbone, **extra,
        )))  # fmt: skip
        return str(tmp_path / name)

    data_scores = {"walker-walk": [0.6, 1.0], "finger-spin": [0.3, 1.0]}  # as finetune.py records them (DMControl)
    runs = [fake_run("l2m", "l2m", ["walker-walk", "finger-spin"], [[0.5, 0.0], [0.5, 0.25]], data_scores=data_scores)]
    single = [fake_run(f"ft-walker-walk-s{seed}", "ft", ["walker-walk"], [[score]], steps=10_000)
              for seed, score in ((0, 0.8), (1, 0.6))]  # fmt: skip
    evaluate.cli(["--compare", runs[0], "--single", str(tmp_path / "ft-walker-walk-s*"), "--out", str(tmp_path)])
    table = (tmp_path / "comparison.md").read_text()
    assert "| task | data: mean / best 10% | single-task ft (10,000 steps) | l2m |" in table
    assert "| walker-walk | 0.60 / 1.00 | 0.70 | 0.50 → 0.50 |" in table  # single-task: the mean of its two runs
    assert "| finger-spin | 0.30 / 1.00 | – | 0.25 → 0.25 |" in table
    other = fake_run("ft-other-backbone", "ft", ["walker-walk"], [[0.1]], steps=10_000, backbone="b" * 64)
    with pytest.raises(ValueError, match="fine-tuned another backbone than the runs compared"):
        evaluate.compare_runs(runs, single_dirs=[other])
    l2m = fake_run("l2m-finger-spin", "l2m", ["finger-spin"], [[0.1]], steps=10_000)
    with pytest.raises(ValueError, match="expected one-task runs of one method and --steps-per-task"):
        evaluate.compare_runs(runs, single_dirs=single + [l2m])


def test_l2_and_ewc_penalties_are_zero_at_the_anchor_and_positive_away():
    net = tiny_model()
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in net.named_parameters()}
    for importance in (None, fisher):
        assert finetune.quadratic_penalty(net, anchor, importance).item() == 0.0
    with torch.no_grad():
        net.action_head.weight.add_(0.1)
    assert finetune.quadratic_penalty(net, anchor, None).item() == pytest.approx(
        0.01 * net.action_head.weight.numel(), rel=1e-4
    )
    assert finetune.quadratic_penalty(net, anchor, fisher).item() > 0


def test_ewc_fisher_is_the_mean_squared_gradient_of_the_action_loss():
    net, b = tiny_model(), random_batch()
    valid = b["step_mask"][..., None].expand(-1, -1, 4).clone()

    class OneBatch:  # the same batch every time: the Fisher must equal its squared gradient
        def sample(self, batch_size, pools, device):
            return b, valid, None

    args = finetune.Args(fisher_batches=3, batch_size=len(valid))
    fisher = finetune.fisher_diagonal(
        net, OneBatch(), None, args, torch.device("cpu"), torch.autocast("cpu", enabled=False)
    )
    loss, _ = M.action_loss(forward(net, b)[0], b["action_bins"], valid)
    names, params = zip(*net.named_parameters())
    for name, grad in zip(names, torch.autograd.grad(loss, params, allow_unused=True)):
        expected = torch.zeros_like(fisher[name]) if grad is None else grad**2
        assert torch.allclose(fisher[name], expected, rtol=1e-4, atol=1e-12), name


def test_a_log_file_gets_a_plain_line_every_500_steps(capsys):
    step_fn = lambda: (torch.tensor(1.0), torch.tensor(0.5), None)  # noqa: E731
    losses, _ = finetune.train_task(step_fn, 1200, "task 1/1 reach-v3", pool_size=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if " | step " in line]
    assert len(losses) == 1200 and [line.split(" | ")[1] for line in lines] == ["step 500", "step 1000", "step 1200"]
    assert all("loss 1.000 acc 0.500" in line and "ms/step" in line for line in lines)


def test_command_line_reproduces_the_settings():
    args = finetune.Args(method="ft", seed=1, frozen_dropout=True, lr=3e-3, resume=True)
    command = finetune.command_line(args)
    assert command == "python finetune.py --method ft --seed 1 --lr 0.003 --frozen-dropout"
    assert collect.parse_args(finetune.Args, command.split()[2:]) == finetune.Args(**{**asdict(args), "resume": False})


def test_a_frozen_backbone_trains_without_dropout_while_the_pool_trains():
    net, b = tiny_model(pool_size=3), random_batch()  # dropout 0.1 in the backbone
    finetune.set_training(net, frozen_eval=True)
    assert net.pool.training and not any(m.training for m in net.blocks)
    assert torch.equal(forward(net, b)[0], forward(net, b)[0]), "the frozen backbone should run as when acting"
    finetune.set_training(net, frozen_eval=False)  # --frozen-dropout, and every full fine-tuning method
    assert not torch.equal(forward(net, b)[0], forward(net, b)[0]), "dropout should be on"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Real data for two Meta-World tasks and a tiny pre-trained checkpoint, shared by the fine-tuning tests."""
    root = tmp_path_factory.mktemp("pipeline")
    run_script("collect.py", "--tasks", "reach-v3,window-close-v3", "--episodes", "4", "--data-dir", str(root / "data"))
    run_script(
        "pretrain.py",
        "--tasks",
        "reach-v3,window-close-v3",
        "--data-dir",
        str(root / "data"),
        "--out",
        str(root / "pretrain" / "ckpt.pt"),
        "--steps",
        "40",
        "--batch-size",
        "16",
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--warmup-steps",
        "5",
        "--eval-every",
        "20",
        "--save-every",
        "20",
        "--holdout-episodes",
        "1",
    )
    return root


def test_env_workers_do_not_run_their_parents_stop_handler_when_they_end():
    """A finished fine-tuning run's log ended in "stopped by SIGTERM": its forked env workers ran its handler."""
    code = (
        "import signal, sys, evaluate; signal.signal(signal.SIGTERM, lambda s, f: sys.exit('stopped by SIGTERM')); "
        "evaluate.env_workers(2); print('done')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", ""), result


@pytest.mark.slow
def test_env_workers_end_with_the_process_that_forked_them():
    code = "import time, evaluate; evaluate.env_workers(2); print('ready', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    workers = children_of(proc.pid)
    proc.kill()  # kill -9: no handler of its runs
    proc.wait()
    deadline = time.time() + 15
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) >= 2 and not any(map(alive, workers)), workers


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_launcher_takes_its_runs_with_it(pipeline, tmp_path, how):
    argv = [sys.executable, os.path.join(HERE, "finetune.py"), "--methods", "ft,l2m", "--seeds", "0", "--ckpt",
            str(pipeline / "pretrain" / "ckpt.pt"), "--tasks", "reach,window-close", "--data-dir",
            str(pipeline / "data"), "--steps-per-task", "100000", "--runs-root", str(tmp_path)]  # fmt: skip
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, runs = time.time() + 60, []
    while len(runs) < 2 and time.time() < deadline:
        time.sleep(0.5)
        runs = children_of(launcher.pid)
    logs = [tmp_path / f"{m}-reach+window-close-s0" / "log.txt" for m in ("ft", "l2m")]
    while not all(log.exists() and log.stat().st_size for log in logs) and time.time() < deadline + 60:
        time.sleep(0.5)  # until both runs have started training (and so have set up their stop)
    launcher.send_signal(getattr(signal, how))
    _, err = launcher.communicate(timeout=60)
    deadline = time.time() + 20
    while any(map(alive, runs)) and time.time() < deadline:
        time.sleep(0.5)
    assert len(runs) == 2 and not any(map(alive, runs)), runs
    logs = [log.read_text() for log in logs]
    assert all("finetune.py: stopped by SIGTERM" in log for log in logs), logs
    if how == "SIGKILL":
        assert all(f"the launcher (pid {launcher.pid}) is gone" in log for log in logs)
    else:
        assert "stopped by SIGTERM, and with it 2 runs" in err


def finetune_args(root, method, run, **kw):
    base = dict(
        ckpt=str(root / "pretrain" / "ckpt.pt"),
        method=method,
        tasks="reach-v3,window-close-v3",
        data_dir=str(root / "data"),
        run_dir=str(root / run),
        steps_per_task=30,
        batch_size=16,
        lr=1e-2,
        eval_episodes=1,
        pool_size=6,
    )
    return finetune.Args(**{**base, **kw})


LIVE_MODELS = {}  # run folder -> the model a fine-tuning run trained, as it was when the run ended


@pytest.fixture(scope="module")
def l2m_run(pipeline):
    build = finetune.build_model
    with pytest.MonkeyPatch.context() as patch:  # keep the live model, not one rebuilt from the files
        patch.setattr(finetune, "build_model", lambda *a: LIVE_MODELS.setdefault(pipeline / "l2m", build(*a)))
        finetune.main(finetune_args(pipeline, "l2m", "l2m", steps_per_task=150))  # enough steps for keys to converge
    return pipeline / "l2m"


@pytest.mark.slow
def test_l2m_freezes_the_backbone_and_routes_each_task_to_its_own_entry(pipeline, l2m_run):
    ckpt = collect.load_checkpoint(str(pipeline / "l2m" / "ckpt.pt"))
    assert all(k.startswith("pool.") for k in ckpt["model"]), "a frozen-backbone run stores only the pool"
    trained = LIVE_MODELS[l2m_run].state_dict()  # the model the run trained, not one rebuilt from the backbone file
    pretrained = collect.load_checkpoint(str(pipeline / "pretrain" / "ckpt.pt"))["model"]
    for name, value in pretrained.items():
        assert torch.equal(trained[name], value), f"{name} changed"
    # evaluation-time routing: every step of each task's rollouts went to one entry, a different one per task
    routing = [np.array(r["routing"]) for r in ckpt["stages"][-1]["results"]]
    entries = [int(r.argmax()) for r in routing]
    assert entries[0] != entries[1] and all(r.max() == r.sum() for r in routing), routing
    assert all(
        (l2m_run / f).is_file() for f in ("success_matrix.png", "success_curves.png", "routing.png", "results.md")
    )
    results = json.loads((pipeline / "l2m" / "results.json").read_text())
    assert np.asarray(results["success"]).shape == (2, 2) and "forgetting" in results["metrics"]


@pytest.mark.slow
def test_overwrite_removes_the_old_results_before_the_new_run_writes(pipeline, monkeypatch):
    finetune.main(finetune_args(pipeline, "ft", "stale", steps_per_task=5))
    (pipeline / "stale" / "retain10").mkdir()
    (pipeline / "stale" / "retain10" / "results.json").write_text("{}")

    def killed(obj, path):
        raise KeyboardInterrupt  # the new run dies before its first save

    monkeypatch.setattr(finetune, "save_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_args(pipeline, "ft", "stale", steps_per_task=5, overwrite=True))
    left = sorted(p.name for p in (pipeline / "stale").rglob("*") if p.is_file())
    assert left == [".lock"], left
    with pytest.raises(FileNotFoundError, match="finished finetune.py run"):
        evaluate.compare_runs([str(pipeline / "stale")])


@pytest.mark.slow
def test_the_oracle_evaluates_each_task_with_its_own_group_of_entries(pipeline, tmp_path):
    finetune.main(finetune_args(pipeline, "l2m-oracle", "oracle", steps_per_task=10))
    ckpt_path = pipeline / "oracle" / "ckpt.pt"
    evaluate.main(evaluate.Args(ckpt=str(ckpt_path), episodes=1, out=str(tmp_path)))
    group_size = 6 // 2  # pool_size 6 split over the sequence's 2 tasks
    during_run = collect.load_checkpoint(str(ckpt_path))["stages"][-1]["results"]
    afterwards = json.loads((tmp_path / "results.json").read_text())["results"]
    for results in (during_run, afterwards):  # finetune.py's evaluations and evaluate.py's pass the task ids
        for task_index, r in enumerate(results):
            used = np.flatnonzero(r["routing"])
            assert len(used) and all(entry // group_size == task_index for entry in used), (r["task"], used)


@pytest.mark.slow
def test_l2m_stats_trains_as_the_oracle_and_infers_the_task_without_its_id(pipeline, tmp_path):
    for method in ("l2m-oracle", "l2m-stats"):
        finetune.main(finetune_args(pipeline, method, f"same-{method}", steps_per_task=10))
    oracle, stats = (
        collect.load_checkpoint(str(pipeline / f"same-{m}" / "ckpt.pt")) for m in ("l2m-oracle", "l2m-stats")
    )
    for name, value in oracle["model"].items():  # fitting the statistics draws nothing the training draws
        assert torch.equal(stats["model"][name], value), f"{name} differs from the oracle's"
    assert stats["model"]["pool.tasks.fitted"].all()
    assert "given its own task id" in (pipeline / "same-l2m-stats" / "results.md").read_text()
    evaluate.main(evaluate.Args(ckpt=str(pipeline / "same-l2m-stats" / "ckpt.pt"), episodes=1, out=str(tmp_path)))
    group_size = 6 // 2
    afterwards = json.loads((tmp_path / "results.json").read_text())["results"]
    for results in (stats["stages"][-1]["results"], afterwards):  # no task id given, in either evaluation
        for task_index, r in enumerate(results):
            assert r["inferred"][task_index] >= 0.9 * sum(r["inferred"]), (r["task"], r["inferred"])
            used = np.flatnonzero(r["routing"])
            assert sum(r["routing"][e] for e in used if e // group_size == task_index) >= 0.9 * sum(r["routing"])


@pytest.mark.slow
def test_a_run_notices_that_its_backbone_file_changed(pipeline, l2m_run, tmp_path):
    ckpt = collect.load_checkpoint(str(l2m_run / "ckpt.pt"))
    backbone = collect.load_checkpoint(ckpt["pretrained"]["path"])
    backbone["model"]["action_head.bias"] += 1.0  # another model, with the same step and config
    collect.save_atomic(backbone, str(tmp_path / "other.pt"))
    ckpt["pretrained"]["path"] = str(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no longer the checkpoint this run was fine-tuned from"):
        evaluate.build_model(ckpt, torch.device("cpu"))


@pytest.mark.slow
def test_a_moved_run_finds_its_backbone_or_is_pointed_to_it(pipeline, l2m_run, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(pipeline / "pretrain", moved / "pretrain")
    shutil.copytree(l2m_run, moved / "l2m")
    ckpt = collect.load_checkpoint(str(moved / "l2m" / "ckpt.pt"))
    assert evaluate.backbone_path(ckpt, str(moved / "l2m" / "ckpt.pt")) == str(
        moved / "l2m" / ".." / "pretrain" / "ckpt.pt"
    )
    lost = {**ckpt, "pretrained": {**ckpt["pretrained"], "path": str(tmp_path / "gone.pt"), "relpath": "gone.pt"}}
    collect.save_atomic(lost, str(moved / "l2m" / "ckpt.pt"))
    argv = [
        "--ckpt",
        str(moved / "l2m" / "ckpt.pt"),
        "--episodes",
        "1",
        "--tasks",
        "reach-v3",
        "--out",
        str(tmp_path / "e"),
    ]
    assert "--backbone points to it" in refuses(evaluate, argv, capsys)
    evaluate.cli([*argv, "--backbone", str(moved / "pretrain" / "ckpt.pt")])
    assert json.loads((tmp_path / "e" / "results.json").read_text())["results"][0]["task"] == "reach-v3"


@pytest.mark.slow
def test_l2m_leaves_a_finished_task_entry_bit_identical(pipeline, l2m_run):
    """The same seed run on the first task alone gives the first task's entry; learning the second task must not
    move it."""
    finetune.main(finetune_args(pipeline, "l2m", "l2m-first", tasks="reach-v3", steps_per_task=150))
    first = collect.load_checkpoint(str(pipeline / "l2m-first" / "ckpt.pt"))
    both = collect.load_checkpoint(str(l2m_run / "ckpt.pt"))
    entry = int(np.argmax(first["stages"][-1]["results"][0]["routing"]))
    for name in ("pool.keys", "pool.q_a", "pool.q_b", "pool.v_a", "pool.v_b", "pool.mlp_a", "pool.mlp_b"):
        assert torch.equal(first["model"][name][entry], both["model"][name][entry]), name
    assert not torch.equal(first["model"]["pool.q_b"], both["model"]["pool.q_b"]), "the second task trained nothing"


def marked_tasks(tmp_path, names, episodes=6, length=20):
    """Fake tasks whose observations carry (task number, episode number) in columns 0 and 1, and each task's data
    as finetune.py holds it: [(task, dataset, pools)]."""
    data = []
    for i, name in enumerate(names):
        arrays = write_fake_task(tmp_path, name, episodes=episodes, length=length, seed=i)
        arrays["observations"][:, 0] = i + 1
        arrays["observations"][:, 1] = np.repeat(np.arange(episodes), length)
        collect.save_npz(str(tmp_path / f"{name}.npz"), arrays)
        tasks, dataset, pools, _ = pretrain.load_data([name], str(tmp_path), 0, 5, 4, 64, i)
        data.append((tasks[0], dataset, pools))
    return data


def test_er_mixes_a_fixed_few_episodes_of_each_earlier_task_into_every_batch(tmp_path):
    data = marked_tasks(tmp_path, ["reach-v3", "push-v3", "window-close-v3"])
    args = finetune.Args(method="er", batch_size=64, replay_share=0.25, replay_episodes=2)
    kept = {}
    for task_index in (1, 2):
        sample = finetune.batch_source(data, task_index, args, "cpu")
        for _ in range(20):
            states = sample()[0]["states"][:, -1]  # the last timestep of a window is always real
            task, episode = states[:, 0].long() - 1, states[:, 1].long()
            assert (task[:48] == task_index).all() and (task[48:] < task_index).all()  # 3/4 own, 1/4 replay
            for j, e in zip(task[48:].tolist(), episode[48:].tolist()):
                kept.setdefault((task_index, j), set()).add(e)
    assert {key: len(episodes) for key, episodes in kept.items()} == {(1, 0): 2, (2, 0): 2, (2, 1): 2}
    assert kept[1, 0] == kept[2, 0], "task 0's kept episodes are the same whichever task is learned"
    own = finetune.batch_source(data, 2, finetune.Args(method="ft", batch_size=64), "cpu")()[0]["states"]
    assert (own[:, -1, 0] == 3).all(), "without replay a batch is the task's own"


def test_packnet_keeps_the_largest_free_weights_and_freezes_what_earlier_tasks_own():
    net = tiny_model().train()
    finetune.attach_method(net, finetune.Args(method="packnet"), 2, torch.device("cpu"))
    name = "blocks.1.mlp.fc.weight"
    weight = dict(net.named_parameters())[name]
    before = weight.detach().clone()
    finetune.packnet_prune(net, 0, n_tasks=3)  # the first of 3 tasks keeps a third
    owned = net.owners[name] == 0
    assert owned.float().mean().item() == pytest.approx(1 / 3, abs=0.01)
    assert before.abs()[owned].min() >= before.abs()[~owned].max()  # the largest magnitudes
    assert torch.equal(weight[owned], before[owned]) and (weight[~owned] == 0).all()
    restore = finetune.packnet_freezer(net, 1, retraining=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        logits, _ = forward(net, random_batch())
        optimizer.zero_grad()
        logits.square().mean().backward()
        optimizer.step()
        restore()
    assert torch.equal(weight[owned], before[owned]) and not (weight[~owned] == 0).all()  # free weights train
    assert torch.equal(net.ln_f.weight, tiny_model().ln_f.weight)  # no pruning, so frozen after the first task
    with net.weights_of_task(0):  # task 0 sees only its own weights
        assert torch.equal(weight[owned], before[owned]) and (weight[~owned] == 0).all()
    assert not (weight[~owned] == 0).all(), "leaving the block restores the weights"


def test_multitask_batches_draw_every_task_of_the_sequence(tmp_path):
    data = marked_tasks(tmp_path, ["reach-v3", "push-v3", "window-close-v3"])
    sample = finetune.batch_source(data, 0, finetune.Args(method="multitask", batch_size=300), "cpu")
    counts = np.bincount(sample()[0]["states"][:, -1, 0].long().numpy() - 1, minlength=3)
    assert counts.sum() == 300 and (counts > 70).all(), counts


DMC_PAIR = "cartpole-balance,cartpole-swingup"


@pytest.fixture(scope="module")
def dmc_pipeline(tmp_path_factory):
    """Synthetic data for two DMControl tasks (204 columns, 1-d actions) and a tiny checkpoint pre-trained on them."""
    root = tmp_path_factory.mktemp("dmc")
    (root / "data").mkdir()
    for i, name in enumerate(DMC_PAIR.split(",")):
        write_fake_task(root / "data", name, episodes=4, length=20, obs_dim=204, act_dim=1, seed=i)
    pretrain.main(pretrain_args(root / "data", tasks=DMC_PAIR, out=str(root / "pretrain" / "ckpt.pt")))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", finetune.METHODS)
def test_every_method_learns_a_dmcontrol_sequence_scored_by_normalized_return(dmc_pipeline, method):
    """Each method runs the DMControl path (1000-step episodes, 1-d actions, no success signal) end to end and is
    scored by the data-normalized return: (R - R_random) / (R_data - R_random), here R_random 1 and R_data 210."""
    finetune.main(
        finetune_args(dmc_pipeline, method, method, tasks=DMC_PAIR, steps_per_task=10, batch_size=8, threads=1)
    )
    results = json.loads((dmc_pipeline / method / "results.json").read_text())
    score = np.asarray(results["success"])
    assert score.shape == (2, 2) and np.isfinite(score[np.tril_indices(2)]).all()
    assert sorted(results["data_scores"]) == DMC_PAIR.split(",")  # each task's data on the same score, for --compare
    for i, stage in enumerate(results["stages"]):
        for j, task in enumerate(stage["results"]):
            assert len(task["returns"]) == 1 and task["env_steps"] == 1000
            assert score[i, j] == pytest.approx((np.mean(task["returns"]) - 1.0) / 209.0)
            assert task["success_any"] == task["success"], "no any-step success on DMControl: both hold the score"


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["ia3", "l2m-ia3", "adapter", "er", "multitask", "packnet", "l2p-pv2", "l2p-pret", "l2p-pt"]
)
def test_each_further_method_trains_what_it_should_and_nothing_else(pipeline, method):
    steps = 150 if method == "l2m-ia3" else 20  # enough for its keys to part, as in l2m_run
    finetune.main(finetune_args(pipeline, method, method, steps_per_task=steps))
    ckpt = collect.load_checkpoint(str(pipeline / method / "ckpt.pt"))
    pretrained = collect.load_checkpoint(str(pipeline / "pretrain" / "ckpt.pt"))["model"]
    assert np.asarray(ckpt["success"]).shape == (2, 2)
    if method == "packnet":  # task 0's weights are never touched again, so its evaluation repeats exactly
        stages = ckpt["stages"]
        assert stages[0]["results"][0]["returns"] == stages[1]["results"][0]["returns"]
        owners = ckpt["owners"]["blocks.0.attn.qkv.weight"]
        assert set(owners.unique().tolist()) == {0, 1} and 0.4 < (owners == 0).float().mean() < 0.6
    if method in ("er", "multitask", "packnet"):  # full fine-tuning: the backbone moves
        assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
        return
    prefix = "adapters." if method == "adapter" else "pool."
    assert ckpt["model"] and all(n.startswith(prefix) for n in ckpt["model"]), "a frozen run saves only its modulators"
    fresh = M.DecisionTransformer.from_checkpoint(collect.load_checkpoint(str(pipeline / "pretrain" / "ckpt.pt")))
    finetune.attach_method(fresh, finetune_args(pipeline, method, method), 2, torch.device("cpu"))
    moved = [n for n, v in ckpt["model"].items() if not torch.equal(v, fresh.state_dict()[n])]
    assert any(n.endswith(("scale", "up.weight", "prompts")) for n in moved), moved
    assert ckpt["trainable_params"] == sum(v.numel() for n, v in fresh.named_parameters() if n.startswith(prefix))
    model = evaluate.build_model(ckpt, torch.device("cpu"))  # the backbone as pre-trained, bit for bit
    for n, v in pretrained.items():
        assert torch.equal(model.state_dict()[n], v), n
    if method == "l2m-ia3":
        assert len({int(np.argmax(r["routing"])) for r in ckpt["stages"][-1]["results"]}) == 2


@pytest.mark.slow
def test_ft_changes_the_backbone(pipeline):
    finetune.main(finetune_args(pipeline, "ft", "ft", tasks="reach-v3"))
    ckpt = collect.load_checkpoint(str(pipeline / "ft" / "ckpt.pt"))
    pretrained = collect.load_checkpoint(str(pipeline / "pretrain" / "ckpt.pt"))["model"]
    assert not torch.equal(ckpt["model"]["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert ckpt["pool_args"] is None and ckpt["trainable_params"] == sum(v.numel() for v in pretrained.values())


@pytest.mark.slow
def test_resume_after_an_interruption_gives_the_same_success_matrix(pipeline, monkeypatch):
    args = finetune_args(pipeline, "ewc", "ewc-full", steps_per_task=10)
    finetune.main(args)
    full = collect.load_checkpoint(str(pipeline / "ewc-full" / "ckpt.pt"))

    real_save = finetune.save_atomic

    def save_then_crash(obj, path):  # dies right after the first task's checkpoint
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_args(pipeline, "ewc", "ewc-resumed", steps_per_task=10))
    monkeypatch.setattr(finetune, "save_atomic", real_save)
    finetune.main(finetune_args(pipeline, "ewc", "ewc-resumed", steps_per_task=10, resume=True))
    resumed = collect.load_checkpoint(str(pipeline / "ewc-resumed" / "ckpt.pt"))
    assert resumed["success"] == full["success"]
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.slow
def test_resume_fills_a_setting_newer_than_the_checkpoint_with_its_default(pipeline, l2m_run, tmp_path):
    ckpt = collect.load_checkpoint(str(l2m_run / "ckpt.pt"))
    del ckpt["args"]["frozen_dropout"]  # as in a checkpoint made before the flag existed
    collect.save_atomic(ckpt, str(tmp_path / "ckpt.pt"))
    finetune.main(finetune_args(pipeline, "l2m", "unused", steps_per_task=150, run_dir=str(tmp_path), resume=True))
    with pytest.raises(SystemExit, match="--frozen-dropout False \\(checkpoint\\) vs True \\(now\\)"):
        finetune.main(
            finetune_args(
                pipeline, "l2m", "unused", steps_per_task=150, run_dir=str(tmp_path), resume=True, frozen_dropout=True
            )
        )


@pytest.mark.slow
def test_evaluate_a_checkpoint_writes_results(pipeline):
    proc = run_script(
        "evaluate.py",
        "--ckpt",
        str(pipeline / "pretrain" / "ckpt.pt"),
        "--tasks",
        "reach",
        "--episodes",
        "2",
        "--bench",
    )
    assert (
        "stepping the same envs with the same actions" in proc.stdout and not (pipeline / "pretrain" / "eval").exists()
    )
    proc = run_script(
        "evaluate.py", "--ckpt", str(pipeline / "pretrain" / "ckpt.pt"), "--tasks", "reach", "--episodes", "2"
    )
    assert "env steps/s" in proc.stdout
    results = json.loads((pipeline / "pretrain" / "eval" / "results.json").read_text())["results"]
    assert results[0]["task"] == "reach-v3" and results[0]["episodes"] == 2 and 0 <= results[0]["success"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "sgd"], "argument --method: invalid choice: 'sgd'"),
        (["--ckpt", "nowhere.pt"], "no checkpoint at nowhere.pt"),
        (["--tasks", "push-v3"], "python collect.py --tasks push-v3"),
        (["--ckpt", "CORRUPT"], "not a readable checkpoint"),
    ],
)
def test_finetune_bad_input_fails_cleanly(pipeline, tmp_path, argv, message, capsys):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    argv = [str(tmp_path / "corrupt.pt") if a == "CORRUPT" else a for a in argv]
    base = [
        "--ckpt",
        str(pipeline / "pretrain" / "ckpt.pt"),
        "--tasks",
        "reach-v3",
        "--data-dir",
        str(pipeline / "data"),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert message in refuses(finetune, [*base, *argv], capsys)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One folder of bad files shared by the cases below: none of them may write to it."""
    tmp_path = tmp_path_factory.mktemp("bad_inputs")
    (tmp_path / "FILE").write_text("not a checkpoint, not a directory")
    net = tiny_model()  # checkpoints from elsewhere: a bare state_dict, a fine-tuning run, a hand-edited config
    pretrained = dict(model=net.state_dict(), model_args=asdict(net.cfg), tasks=[], step=0, args={})
    torch.save(net.state_dict(), tmp_path / "BARE")
    torch.save({**pretrained, "kind": "finetune", "pretrained": {}, "pool_args": None, "success": [], "stages": []},
               tmp_path / "FINETUNED")  # fmt: skip
    torch.save({**pretrained, "model_args": {**asdict(net.cfg), "n_embd": 64}}, tmp_path / "EDITED")
    narrow = {"observations": lambda o: o[:, :20]}  # reach-v3's environment has 39
    for folder, change in (("strings", {"rewards": str}), ("wide", {"actions": lambda a: 3 * a}), ("narrow", narrow)):
        (tmp_path / folder).mkdir()
        arrays = write_fake_task(tmp_path / folder, "reach-v3")
        for key, how in change.items():
            arrays[key] = arrays[key].astype(str) if how is str else how(arrays[key])
        np.savez(tmp_path / folder / "reach-v3.npz", **arrays)
    (tmp_path / "misplaced").mkdir()  # DMControl columns shifted out of their slots of the 204-column layout
    arrays = write_fake_task(tmp_path / "misplaced", "cartpole-balance", obs_dim=204, act_dim=1)
    np.savez(
        tmp_path / "misplaced" / "cartpole-balance.npz",
        **{**arrays, "observations": np.roll(arrays["observations"], 7, axis=1)},
    )
    return tmp_path


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("pretrain", ["--steps", "0"], "--steps 0 is out of range: it must be >= 1 (optimizer steps"),
        ("pretrain", ["--eval-every", "0"], "--eval-every 0 is out of range: it must be >= 1"),
        ("pretrain", ["--n-head", "3"], "--n-head 3 does not divide --n-embd 128"),
        ("pretrain", ["--lr", "-1"], "--lr -1.0 is out of range: it must be > 0"),
        ("pretrain", ["--lr", "nan"], "--lr nan is out of range: it must be > 0"),
        ("pretrain", ["--lr", "inf"], "--lr inf is out of range: it must be > 0"),
        ("pretrain", ["--min-lr", "0.1"], "--min-lr 0.1 > --lr 0.001: the schedule would raise lr"),
        ("pretrain", ["--grad-clip", "-1"], "--grad-clip -1.0 is out of range: it must be >= 0"),
        ("pretrain", ["--dropout", "1"], "--dropout 1.0 is out of range: it must be in [0, 1)"),
        ("pretrain", ["--decay-frac", "0"], "--decay-frac 0.0 is out of range: it must be in (0, 1]"),
        ("pretrain", ["--act-dim", "7"], "--act-dim 7 is out of range: it must be in [0, 6]"),
        ("pretrain", ["--holdout-episodes", "-1"], "--holdout-episodes -1 is out of range: it must be >= 0"),
        ("pretrain", ["--snapshots", "10,x"], "--snapshots '10,x': expected comma-separated step numbers"),
        ("pretrain", ["--steps", "20", "--snapshots", "30"], "step 30 is past --steps 20, so it would never be kept"),
        (
            "pretrain",
            ["--decay-frac", "0.5", "--schedule", "cosine"],
            "--decay-frac 0.5 applies only to --schedule wsd (this run: cosine)",
        ),
        ("pretrain", ["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
        ("pretrain", ["--device", "tpu"], "unknown --device 'tpu'"),
        ("pretrain", ["--out", "TMP/dir/"], "names a directory"),
        ("pretrain", ["--out", "FILE/ckpt.pt"], "cannot write under"),
        ("pretrain", ["--data-dir", "TMP/nowhere"], "python collect.py --tasks"),
        ("pretrain", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        ("finetune", ["--steps-per-task", "0"], "--steps-per-task 0 is out of range: it must be >= 1"),
        ("finetune", ["--rank", "0"], "--rank 0 is out of range: it must be >= 1"),
        ("finetune", ["--reg-lambda", "-1"], "--reg-lambda -1.0 is out of range: it must be >= 0"),
        ("finetune", ["--alpha", "0"], "--alpha 0.0 is out of range: it must be > 0"),
        ("finetune", ["--pull-coef", "-0.5"], "--pull-coef -0.5 is out of range: it must be >= 0"),
        ("finetune", ["--replay-share", "1"], "--replay-share 1.0 is out of range: it must be in [0, 1)"),
        ("finetune", ["--packnet-retrain", "0"], "--packnet-retrain 0.0 is out of range: it must be in (0, 1)"),
        ("finetune", ["--jobs", "0"], "--jobs 0 is out of range: it must be >= 1"),
        ("finetune", ["--prompt-top-k", "6", "--prompt-pool-size", "5"], "--prompt-top-k 6 > --prompt-pool-size 5"),
        ("finetune", ["--method", "l2m-oracle", "--pool-size", "5"], "--pool-size 5 < 10 tasks"),
        ("finetune", ["--run-dir", "FILE"], "--run-dir 'FILE' is a file"),
        ("finetune", ["--methods", "l2m,bogus"], "--methods: unknown method 'bogus'"),
        ("finetune", ["--tasks", "cw10,hammer"], "names hammer-v3 twice: a sequence learns each task once"),
        ("finetune", ["--methods", "l2m", "--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
        ("finetune", ["--methods", "l2m,ft", "--run-dir", "TMP/r"], "--run-dir names one run; with --methods"),
        ("finetune", ["--methods", "l2m,ft", "--ckpt", "TMP/nowhere.pt"], "no checkpoint at"),  # before any run
        ("finetune", ["--device", "tpu"], "unknown --device 'tpu'"),
        ("finetune", ["--ckpt", "FILE"], "not a readable checkpoint"),
        ("evaluate", ["--episodes", "0"], "--episodes 0 is out of range: it must be >= 1"),
        ("evaluate", ["--ckpt", "TMP/nowhere.pt"], "no checkpoint at"),
        ("evaluate", ["--ckpt", "FILE"], "not a readable checkpoint"),
        ("evaluate", ["--compare", "TMP"], "is TMP a finished finetune.py run?"),
        ("evaluate", ["--compare", "TMP", "--out", "FILE"], "--out 'FILE' is a file"),
        ("evaluate", ["--compare", "TMP", "--scaling", "TMP"], "--compare and --scaling are two modes"),
        ("evaluate", ["--single", "TMP"], "--reference, --single and --allow-mixed go with --compare"),
        ("evaluate", ["--compare", "TMP/runs/*-s*"], "is TMP/runs/*-s* a finished finetune.py run?"),
        ("collect", ["--workers", "0"], "--workers 0 is out of range: it must be >= 1"),
        ("collect", ["--sac-utd", "0"], "--sac-utd 0.0 is out of range: it must be > 0"),
        ("evaluate", ["--ckpt", "BARE"], "not a checkpoint of pretrain.py or finetune.py"),
        ("pretrain", ["--resume", "--out", "BARE"], "not a checkpoint of pretrain.py or finetune.py"),
        ("pretrain", ["--resume", "--out", "FINETUNED"], "is a finetune.py checkpoint; this needs a pretrain.py"),
        ("finetune", ["--ckpt", "FINETUNED"], "is a finetune.py checkpoint; this needs a pretrain.py"),
        ("evaluate", ["--ckpt", "EDITED"], "the checkpoint's weights do not fit its model_args"),
        ("pretrain", ["--tasks", "reach", "--data-dir", "TMP/strings"], "rewards has dtype <U"),
        ("pretrain", ["--tasks", "reach", "--data-dir", "TMP/wide"], "the data contract keeps them in [-1, 1]"),
        ("pretrain", ["--tasks", "reach", "--data-dir", "TMP/narrow"], "20 observation columns"),
        ("pretrain", ["--tasks", "cartpole-balance", "--data-dir", "TMP/misplaced"], "columns are in the wrong slots"),
        ("collect", ["--tasks", "reach", "--source", "magic"], "argument --source: invalid choice: 'magic'"),
    ],
)
def test_bad_flags_and_files_fail_with_one_line_before_any_work(bad_inputs, monkeypatch, capsys, script, argv, message):
    monkeypatch.chdir(bad_inputs)  # the scripts' default paths (runs/, data/) point into a folder without them
    before = listing(bad_inputs)
    module = {"collect": collect, "pretrain": pretrain, "finetune": finetune, "evaluate": evaluate}[script]
    line = refuses(module, [a.replace("TMP", str(bad_inputs)) for a in argv], capsys)
    assert message.replace("TMP", str(bad_inputs)) in line
    assert listing(bad_inputs) == before  # nothing written, nothing changed


@pytest.mark.slow
def test_data_whose_dims_do_not_match_the_checkpoint_is_rejected(pipeline, tmp_path):
    write_fake_task(tmp_path, "reach-v3", act_dim=4, obs_dim=39)
    arrays = dict(np.load(tmp_path / "reach-v3.npz"))
    arrays["actions"] = np.zeros((len(arrays["actions"]), 6), np.float32)  # 6 action dims; the checkpoint has 4
    collect.save_npz(str(tmp_path / "reach-v3.npz"), arrays)
    proc = run_script(
        "finetune.py",
        "--ckpt",
        str(pipeline / "pretrain" / "ckpt.pt"),
        "--tasks",
        "reach-v3",
        "--data-dir",
        str(tmp_path),
        "--run-dir",
        str(tmp_path / "run"),
        check=False,
    )
    assert (
        proc.returncode != 0
        and "has 39 observation columns and 6 action dims, but the reach-v3 environment has 39 and 4" in proc.stderr
    )


@pytest.mark.slow
def test_all_four_stages_run_as_scripts(pipeline):
    """collect.py and pretrain.py ran in the fixture; here finetune.py and evaluate.py on its checkpoint."""
    run = pipeline / "lora-script"
    proc = run_script(
        "finetune.py",
        "--ckpt",
        str(pipeline / "pretrain" / "ckpt.pt"),
        "--method",
        "lora",
        "--tasks",
        "reach-v3,window-close-v3",
        "--data-dir",
        str(pipeline / "data"),
        "--run-dir",
        str(run),
        "--steps-per-task",
        "10",
        "--batch-size",
        "8",
        "--eval-episodes",
        "1",
    )
    assert "average success" in proc.stdout and "trainable of" in proc.stdout
    proc = run_script("evaluate.py", "--ckpt", str(run / "ckpt.pt"), "--episodes", "1")
    assert (
        "average success" in proc.stdout and "| after \\ on | reach | window-close |" in proc.stdout
    )  # the run's CW table
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    assert [r["task"] for r in results] == ["reach-v3", "window-close-v3"] and len(results[0]["routing"]) == 1


class ScriptedSuccessEnv:
    """Succeeds only at steps 3 and 4 of an episode: success at some step but not at the last."""

    horizon = 10  # evaluate.horizon is patched to this (Meta-World's 200 would only cost time)

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(39, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(39, np.float32), 1.0, False, self.t == self.horizon, {"success": self.t in (3, 4)}


@pytest.fixture
def scripted_env(monkeypatch):
    """evaluate.py acting in ScriptedSuccessEnv instead of Meta-World."""
    env = ScriptedSuccessEnv()
    monkeypatch.setattr(evaluate, "make_env", lambda name, seed=0: env)
    monkeypatch.setattr(evaluate, "horizon", lambda name: env.horizon)
    monkeypatch.setattr(evaluate, "_ENVS", {})


def test_success_is_scored_at_the_last_step_and_at_any_step(scripted_env):
    task = dict(name="reach-v3", act_dim=4, reward_scale=200.0, target_return=200.0)
    (result,) = evaluate.evaluate_tasks(tiny_model(), [task], 2, torch.device("cpu"))
    assert result["success"] == 0.0 and result["success_any"] == 1.0 and result["mean_return"] == 10.0


def test_evaluation_acts_in_the_precision_it_is_given(scripted_env):
    task = dict(name="reach-v3", act_dim=4, reward_scale=200.0, target_return=200.0)
    net, seen = tiny_model(), []
    net.action_head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        seen.clear()
        evaluate.evaluate_tasks(net, [task], 2, torch.device("cpu"), bf16=bf16)
        assert seen and set(seen) == {dtype}


@pytest.mark.slow
def test_envs_stepped_in_two_processes_give_the_same_episodes_as_in_one(monkeypatch):
    """EvalEnvs spreads the envs over processes (env n in process n % 2): the same real Meta-World episodes, the
    same actions, returns and successes as stepping them all here."""
    monkeypatch.setattr(evaluate, "_ENVS", {})
    tasks = [dict(name=n, act_dim=4, reward_scale=200.0, target_return=400.0) for n in ("reach-v3", "button-press-v3")]
    net = tiny_model(pool_size=4, rank=2)
    two = evaluate.evaluate_tasks(net, tasks, 3, torch.device("cpu"), env_processes=2)
    assert set(evaluate._ENVS) == {("reach-v3", 0), ("reach-v3", 2), ("button-press-v3", 1)}  # envs 0, 2, 4 here
    one = evaluate.evaluate_tasks(net, tasks, 3, torch.device("cpu"), env_processes=1)
    assert one == two
    assert len({tuple(r["returns"]) for r in one}) == 2  # the two tasks' episodes differ: a real comparison


def test_an_error_in_an_env_worker_is_raised_here():
    envs = evaluate.EvalEnvs([("reach-v3", 0), ("no-such-task", 0)], processes=2)  # the bad one in the worker
    with pytest.raises(ValueError, match="Domain 'no' does not exist"):
        envs.run(evaluate.reset_envs)
    envs = evaluate.EvalEnvs([("reach-v3", 0), ("reach-v3", 1)], processes=2)  # the worker still serves
    assert [o.shape for o in envs.run(evaluate.reset_envs)] == [(39,), (39,)]


def test_bf16_acting_picks_the_fp32_actions_almost_everywhere():
    torch.manual_seed(0)
    net = M.DecisionTransformer(M.DTConfig(n_layer=2, n_head=2, n_embd=64, act_dim=4)).eval()
    B, K, cfg = 256, net.cfg.context_len, net.cfg
    window = (
        torch.randn(B, K, cfg.state_dim),
        torch.randn(B, K),
        torch.randint(0, cfg.n_bins, (B, K, cfg.act_dim)),
        torch.randn(B, K),
        torch.arange(K).repeat(B, 1),
        torch.ones(B, K, dtype=torch.bool),
    )
    with torch.no_grad():
        fp32 = net.act(*window, 4)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net.act(*window, 4)[0]
    assert (fp32 == bf16).float().mean() > 0.9  # only near-ties of the logits may flip


@pytest.mark.slow
def test_lockstep_evaluation_of_several_tasks_equals_one_task_at_a_time():
    torch.manual_seed(0)
    net = M.DecisionTransformer(M.DTConfig(n_layer=2, n_head=2, n_embd=32, act_dim=4, max_ep_len=1000)).eval()
    net.pool = M.ModulationPool(2, 32, pool_size=3)
    with torch.no_grad():
        net.pool.q_b.normal_(0, 0.3)
    tasks = [dict(name=n, act_dim=4, reward_scale=200.0, target_return=1500.0) for n in ("reach-v3", "window-close-v3")]
    dmc = dict(reward_scale=100.0, target_return=1000.0, random_return=20.0, data_return=520.0)
    tasks += [dict(name="cartpole-balance", act_dim=1, **dmc), dict(name="finger-turn_easy", act_dim=2, **dmc)]
    together = evaluate.evaluate_tasks(net, tasks, 1, torch.device("cpu"))  # two horizons, three action widths
    alone = [evaluate.evaluate_tasks(net, [task], 1, torch.device("cpu"))[0] for task in tasks]  # reused envs, too
    assert together == alone
    for r in together[2:]:  # DMControl: the data-normalized score, (R - R_random) / (R_data - R_random)
        assert r["success"] == r["success_any"] == pytest.approx((r["mean_return"] - 20.0) / 500.0)


@pytest.mark.slow
def test_a_run_folder_is_never_overwritten_without_a_flag(pipeline, l2m_run):
    with pytest.raises(SystemExit, match="already holds a run: --resume continues it, --overwrite replaces it"):
        finetune.main(finetune_args(pipeline, "l2m", "l2m"))
    proc = run_script(
        "pretrain.py",
        "--tasks",
        "reach-v3,window-close-v3",
        "--data-dir",
        str(pipeline / "data"),
        "--out",
        str(pipeline / "pretrain" / "ckpt.pt"),
        check=False,
    )
    assert proc.returncode != 0 and "exists: --resume continues that run, --overwrite replaces it" in proc.stderr


@pytest.mark.slow
def test_bench_times_steps_and_writes_nothing(pipeline, tmp_path, capsys):
    finetune.main(finetune_args(pipeline, "l2m", "bench", run_dir=str(tmp_path / "bench"), bench=3))
    out = capsys.readouterr().out
    assert "ms/step" in out and "tokens/s" in out and "model" in out and not (tmp_path / "bench").exists()
    proc = run_script(
        "pretrain.py",
        "--tasks",
        "reach-v3",
        "--data-dir",
        str(pipeline / "data"),
        "--out",
        str(tmp_path / "p" / "ckpt.pt"),
        "--bench",
        "2",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--n-head",
        "2",
    )
    assert "ms/step" in proc.stdout and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_methods_and_seeds_run_side_by_side_each_in_its_own_folder(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [os.path.join(HERE, "finetune.py")])
    args = finetune_args(
        pipeline,
        "lora",
        "unused",
        run_dir="",
        steps_per_task=3,
        tasks="reach-v3",
        methods="lora,ft",
        seeds="0,1",
        jobs=2,
    )
    finetune.main(args)
    for method in ("lora", "ft"):
        settings = []
        for seed in (0, 1):
            run = tmp_path / "runs" / f"{method}-reach-v3-s{seed}"
            results = json.loads((run / "results.json").read_text())
            assert results["args"]["seed"] == seed, (run / "log.txt").read_text()
            settings.append(results["setting"])
        assert settings[0] == settings[1] and settings[0]["method"] == method, "seeds of one setting share it"
        assert not {"seed", "run_dir", "jobs", "seeds", "methods"} & set(settings[0])


@pytest.mark.parametrize(
    "patterns, reference, n_runs, n_rows",
    [
        ("cw10/*-s*", "", 15, 18),
        ("cw10-v1/*-s*", "cw10-v1/l2m-oracle-cw10-s0", 25, 28),
        ("cw10/l2m-oracle-cw10-s0,cw10-steps/*-s*", "", 2, 14),
        ("quick/*-s*", "", 4, 4),
        ("md-cw10/*-s*", "", 8, 14),
        ("md-dmc6/*-s*", "", 10, 9),
    ],
)
def test_the_readme_results_tables_regenerate_from_the_result_files(patterns, reference, n_runs, n_rows):
    runs = [run for p in patterns.split(",") for run in sorted(glob.glob(os.path.join(HERE, "results", p)))]  # as given
    table = evaluate.compare_runs(runs, reference_dir=reference and os.path.join(HERE, "results", reference))
    pages = "".join(open(os.path.join(HERE, page)).read() for page in ("README.md", "docs/results.md"))
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    missing = [row for row in rows if row not in pages]
    assert len(runs) >= n_runs and len(rows) >= n_rows and not missing, (
        f"the tables of README.md and docs/results.md differ from results/{patterns}: {missing}"
    )


def test_the_scaling_table_regenerates_from_its_point_files():
    points = [json.load(open(p)) for p in glob.glob(os.path.join(HERE, "results", "scaling", "*.json"))]
    table = evaluate.scaling_table(points)
    pages = open(os.path.join(HERE, "docs", "results.md")).read()
    assert len(points) >= 6 and table == open(os.path.join(HERE, "results", "scaling", "scaling.md")).read()
    assert all(line in pages for line in table.splitlines()), "docs/results.md's scaling table is out of date"


def test_the_readme_headline_table_is_the_cw10_table_in_brief():
    runs = sorted(glob.glob(os.path.join(HERE, "results", "cw10", "*-s*")))
    table = evaluate.compare_runs(runs)
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if
                        line.startswith("|")]  # fmt: skip
    columns = [header.index(name) for name in ("method", "runs", "success (last step)", "paper", "forgetting")]
    readme = open(os.path.join(HERE, "README.md")).read()
    headline = readme[readme.index("| method | seeds | success (last step) | paper | forgetting |") :]
    headline = [line for line in headline.split("\n\n")[0].splitlines()[2:]]
    assert headline == ["| " + " | ".join(row[i] for i in columns) + " |" for row in rows if len(row) == len(header)]


@pytest.mark.parametrize("method", finetune.METHODS)
def test_evaluation_tells_the_task_id_to_the_methods_whose_row_says_so(method):
    base = dict(tasks=[dict(name="reach-v3")])
    run = dict(kind="finetune", method=method, tasks=[dict(name="push-v3"), dict(name="window-close-v3")])
    known, oracle_ids = evaluate.known_tasks(run, base)
    assert set(known) == {"reach-v3", "push-v3", "window-close-v3"}
    assert oracle_ids == ({"push-v3": 0, "window-close-v3": 1} if method in ("l2m-oracle", "packnet") else {})


def test_links_between_the_readme_and_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading of it if it has #."""

    def anchors(path):  # GitHub's: lower case, punctuation dropped, spaces to hyphens
        headings = re.findall(r"^#+ (.+)$", open(path).read(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    broken = []
    for page in ["README.md", *glob.glob(os.path.join("docs", "*.md"), root_dir=HERE)]:
        text = re.sub(r"```.*?```", "", open(os.path.join(HERE, page)).read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (
                os.path.normpath(os.path.join(HERE, os.path.dirname(page), file)) if file else os.path.join(HERE, page)
            )
            if not os.path.exists(path) or (anchor and anchor not in anchors(path)):
                broken.append(f"{page}: {target}")
    assert not broken, broken

"""Tests for the L2M reproduction: `pytest -q test_l2m.py` (CPU only, a few minutes).

Unit tests of each stage's behaviour that matters, plus end-to-end runs of the scripts as a user runs them.
"""
import os
import subprocess
import sys

import metaworld
import numpy as np
import pytest
import torch

import collect

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*argv, check=True):
    """Run a stage script as a user would; returns the CompletedProcess (stdout/stderr captured as text)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], capture_output=True, text=True, cwd=HERE)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---------------------------------------------------------------------------------------------------------
# collect.py: task lists


def test_task_lists_match_metaworld_and_are_disjoint():
    assert set(collect.MT50) == set(metaworld.ALL_V3_ENVIRONMENTS)
    assert len(collect.MT50) == 50 and len(collect.MT40) == 40 and not set(collect.MT40) & set(collect.CW10)
    assert collect.CW10[0] == "hammer-v3" and collect.CW10[-1] == "peg-unplug-side-v3"
    assert len(set(collect.DMC16)) == 16 and not set(collect.DMC10) & set(collect.DMC6)


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
    assert torch.allclose(log_prob, dist.base_dist.log_prob(u).sum(-1) - torch.distributions.TanhTransform().log_abs_det_jacobian(u, action).sum(-1), atol=1e-4)


def test_sac_update_fits_the_critic_to_a_fixed_batch():
    torch.manual_seed(0)
    agent = collect.SAC(obs_dim=4, act_dim=2, hidden=32, lr=1e-3)
    obs, action = torch.randn(32, 4), torch.rand(32, 2) * 2 - 1
    reward, terminal = torch.randn(32), torch.ones(32)  # terminal: the target is the reward alone
    q_error = lambda: (agent.q1(torch.cat([obs, action], -1)).squeeze(-1) - reward).pow(2).mean().item()
    before = q_error()
    for _ in range(500):
        agent.update(obs, action, reward, obs, terminal)
    assert q_error() < 0.1 * before


# ---------------------------------------------------------------------------------------------------------
# collect.py: the script end to end


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """The same small collection twice (scripted Meta-World + SAC DMControl), into two directories."""
    dirs = [tmp_path_factory.mktemp(f"data{i}") for i in range(2)]
    for d in dirs:
        run_script("collect.py", "--tasks", "reach-v3,cartpole-balance", "--episodes", "2", "--data-dir", str(d),
                   "--noise-levels", "0,0.3", "--sac-warmup-steps", "1500", "--sac-utd", "0.5")
    return dirs


def check_contract(path, act_dim, episodes, horizon):
    data = np.load(path)
    n = episodes * horizon
    assert data["observations"].dtype == np.float32 and data["observations"].ndim == 2 and len(data["observations"]) == n
    assert data["actions"].shape == (n, act_dim) and data["actions"].dtype == np.float32
    assert np.abs(data["actions"]).max() <= 1.0
    assert data["rewards"].shape == (n,) and data["rewards"].dtype == np.float32
    assert data["dones"].dtype == bool and np.array_equal(np.flatnonzero(data["dones"]) + 1, np.arange(1, episodes + 1) * horizon)
    assert np.isfinite(data["observations"]).all() and np.isfinite(data["rewards"]).all()
    return data


def test_scripted_collection_writes_the_contract_with_expert_success(collected):
    data = check_contract(collected[0] / "reach-v3.npz", act_dim=4, episodes=2, horizon=200)
    assert data["successes"].dtype == bool and data["successes"].any(), "the reach expert should succeed"


def test_sac_collection_writes_its_replay_buffer(collected):
    data = check_contract(collected[0] / "cartpole-balance.npz", act_dim=1, episodes=2, horizon=1000)
    assert "successes" not in data
    warmup, learned = data["actions"][:1500], data["actions"][1500:]
    assert np.abs(warmup.mean()) < 0.1 and not np.allclose(learned, learned[0])  # uniform, then the actor


def test_same_seed_gives_identical_bytes(collected):
    for name in ("reach-v3.npz", "cartpole-balance.npz"):
        assert (collected[0] / name).read_bytes() == (collected[1] / name).read_bytes()


def test_existing_file_is_skipped_unless_overwrite(collected):
    before = (collected[0] / "reach-v3.npz").stat().st_mtime_ns
    proc = run_script("collect.py", "--tasks", "reach-v3", "--episodes", "1", "--data-dir", str(collected[0]))
    assert "skip reach-v3" in proc.stdout and (collected[0] / "reach-v3.npz").stat().st_mtime_ns == before


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "hamer"], "unknown task 'hamer'"),
    (["--tasks", "reach-v3", "--episodes", "0"], "--episodes must be at least 1"),
    (["--tasks", "cartpole-balance", "--source", "scripted"], "experts only for Meta-World"),
    (["--tasks", "reach-v3", "--noise-levels", "a,b"], "comma-separated numbers"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, argv, message):
    proc = run_script("collect.py", *argv, "--data-dir", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_data_dir_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = run_script("collect.py", "--tasks", "reach-v3", "--data-dir", str(tmp_path / "file"), check=False)
    assert proc.returncode != 0 and "is a file" in proc.stderr


def test_failed_task_leaves_no_file_and_keeps_the_others(tmp_path):
    (tmp_path / "reach-v3.npz").mkdir()  # the write of reach-v3 fails at the final rename
    proc = run_script("collect.py", "--tasks", "reach-v3,push-v3", "--episodes", "1", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "reach-v3 failed" in proc.stderr
    assert (tmp_path / "push-v3.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["push-v3.npz", "reach-v3.npz"]  # no temp file left
    assert not any((tmp_path / "reach-v3.npz").iterdir())


def test_save_npz_is_atomic_on_failure(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError):  # object arrays cannot be written without pickle: fails mid-write
        collect.save_npz(str(path), dict(ok=np.zeros(3), bad=np.array([object()])))
    assert list(tmp_path.iterdir()) == []

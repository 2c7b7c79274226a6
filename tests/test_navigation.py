"""benchmarks/navigation.py: the 2D navigation environment, the policy-gradient estimator, the
meta-gradient of one RL meta-iteration, and the script itself.

References are written here independently of the code under test: a one-episode
environment in plain Python floats, returns-to-go and the baseline fitted by
loops and ``numpy.linalg.solve``, ``torch.distributions.Normal`` for the policy's
density, and the whole meta-gradient by ``torch.autograd.grad`` task by task.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from torch_metasgd import adapt_tasks

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import navigation  # noqa: E402

DTYPE = torch.float64


def reference_episode(goal, actions, reward="distance"):
    """One episode from the origin, by hand: ``(positions, rewards, running)`` per step.

    MAML's point environment: the velocity is 0.1 * action clipped to
    [-0.1, 0.1] per axis, the reward minus the distance (or squared distance)
    to the goal after the move, the end within 0.01 of the goal on both axes.
    """
    x, y = 0.0, 0.0
    positions, rewards, running = [(x, y)], [], []
    done = False
    for ax, ay in actions:
        running.append(not done)
        if not done:
            x += min(max(0.1 * ax, -0.1), 0.1)
            y += min(max(0.1 * ay, -0.1), 0.1)
            dx, dy = x - goal[0], y - goal[1]
            rewards.append(-(dx * dx + dy * dy) if reward == "squared" else -math.hypot(dx, dy))
            done = abs(dx) < 0.01 and abs(dy) < 0.01
        else:
            rewards.append(0.0)
        positions.append((x, y))
    return positions, rewards, running


def step_all(goals, actions, reward="distance"):
    """The batched environment driven by ``actions`` (T, n, H, 2): positions, rewards, running."""
    env = navigation.Navigation2D(goals, actions.shape[1], reward=reward)
    positions, rewards, running = [env.reset()], [], []
    for t in range(actions.shape[2]):
        running.append(~env.done)
        obs, r, _ = env.step(actions[:, :, t])
        positions.append(obs)
        rewards.append(r)
    return torch.stack(positions, 2), torch.stack(rewards, 2), torch.stack(running, 2)


def straight_to(goal, steps):
    """Actions that reach ``goal`` in ``steps`` equal moves (each under the top speed)."""
    return [(10 * goal[0] / steps, 10 * goal[1] / steps)] * steps


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("reward", ["distance", "squared"])
def test_environment_matches_the_single_episode_reference(reward):
    gen = torch.Generator().manual_seed(0)
    goals = torch.tensor([[0.25, -0.15], [-0.4, 0.3], [0.05, 0.5]], dtype=DTYPE)
    horizon = 12
    actions = 3 * torch.randn(3, 4, horizon, 2, generator=gen, dtype=DTYPE)  # mostly clipped
    lengths = (3, 5, 6)  # episode 0 of every task goes straight to the goal, and ends there
    for t, (goal, steps) in enumerate(zip(goals.tolist(), lengths, strict=True)):
        actions[t, 0, :steps] = torch.tensor(straight_to(goal, steps), dtype=DTYPE)
    positions, rewards, running = step_all(goals, actions, reward)
    ended = []
    for t in range(3):
        for i in range(4):
            want = reference_episode(goals[t].tolist(), actions[t, i].tolist(), reward)
            np.testing.assert_allclose(positions[t, i].numpy(), want[0], rtol=0, atol=1e-15)
            np.testing.assert_allclose(rewards[t, i].numpy(), want[1], rtol=1e-14, atol=1e-15)
            assert running[t, i].tolist() == want[2]
            ended.append(sum(want[2]))
    assert tuple(ended[::4]) == lengths  # the scripted episodes did end
    assert max(ended) == horizon  # and the random ones ran the horizon


def test_environment_clips_the_velocity_to_the_top_speed_per_axis():
    env = navigation.Navigation2D(torch.tensor([[0.5, 0.5]]), 1)
    env.reset()
    obs, reward, done = env.step(torch.tensor([[[7.0, -0.5]]]))
    torch.testing.assert_close(obs, torch.tensor([[[0.1, -0.05]]]))
    torch.testing.assert_close(reward, -torch.tensor([[math.hypot(0.4, 0.55)]]))
    assert not done.any()


def test_environment_rejects_bad_arguments():
    with pytest.raises(ValueError, match="goals must have shape"):
        navigation.Navigation2D(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="Invalid reward"):
        navigation.Navigation2D(torch.zeros(3, 2), 2, reward="l1")


def test_goals_are_uniform_on_the_unit_square_around_the_origin():
    goals = navigation.sample_goals(20_000, torch.Generator().manual_seed(0))
    assert goals.shape == (20_000, 2)
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    torch.testing.assert_close(goals.mean(0), torch.zeros(2, dtype=DTYPE), atol=0.01, rtol=0)
    torch.testing.assert_close(
        goals.var(0), torch.full((2,), 1 / 12, dtype=DTYPE), atol=0.01, rtol=0
    )
    held_out = navigation.eval_goals(50, seed=0)
    assert torch.equal(held_out, navigation.eval_goals(50, seed=0))
    training = navigation.sample_goals(50, torch.Generator().manual_seed(1))  # seed 0's stream
    assert not torch.isin(held_out, training).any()


# --------------------------------------------------------------------------- sampling


def small_policy(seed=0, hidden=(8, 8)):
    torch.manual_seed(seed)
    policy = navigation.GaussianMLP(hidden).to(DTYPE)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.3, 0.2]))  # two different stds
    return policy


def drifting(policy):
    """Mostly a drift of (0.02, -0.03) per step, with a little noise: of the episodes toward
    GOALS' first two, some end at the goal (at step 3 or 5) and some miss it."""
    with torch.no_grad():
        policy.mean[-1].weight.mul_(0.1)
        policy.mean[-1].bias.copy_(torch.tensor([0.2, -0.3]))
        policy.log_std.copy_(torch.tensor([-3.0, -2.8]))
    return policy


GOALS = torch.tensor([[0.06, -0.09], [0.1, -0.15], [-0.45, 0.45]], dtype=DTYPE)


def test_rollout_records_what_the_environment_and_the_policy_did():
    policy = small_policy()
    with torch.no_grad():  # a steady drift of (0.02, -0.03) per step: task 0 ends at step 3
        policy.mean[-1].weight.zero_()
        policy.mean[-1].bias.copy_(torch.tensor([0.2, -0.3]))
        policy.log_std.copy_(torch.tensor([-9.0, -8.0]))
    goals = torch.tensor([[0.06, -0.09], [0.3, 0.1]], dtype=DTYPE)
    traj = navigation.rollout(policy, None, goals, 5, torch.Generator().manual_seed(3), horizon=30)
    assert traj.actions.shape == (2, 5, 30, 2) and traj.positions.shape == (2, 5, 31, 2)
    for t in range(2):
        for i in range(5):
            positions, rewards, running = reference_episode(
                goals[t].tolist(), traj.actions[t, i].tolist()
            )
            np.testing.assert_allclose(traj.positions[t, i].numpy(), positions, atol=1e-15)
            np.testing.assert_allclose(traj.observations[t, i].numpy(), positions[:-1], atol=1e-15)
            np.testing.assert_allclose(traj.rewards[t, i].numpy(), rewards, rtol=1e-14)
            assert traj.mask[t, i].tolist() == [float(r) for r in running]
    assert traj.mask[0].sum(-1).tolist() == [3] * 5 and traj.mask[1].sum() == 5 * 30
    # The recorded log-probabilities: the policy's Gaussian, from torch.distributions.
    with torch.no_grad():
        mean = policy.mean(traj.observations)
        expected = Normal(mean, policy.log_std.exp()).log_prob(traj.actions).sum(-1)
    torch.testing.assert_close(traj.log_probs, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(traj.returns(), traj.rewards.sum(-1))


def test_rollout_is_seeded_and_shares_draw_the_meta_batchs_noise():
    policy = small_policy()
    goals = navigation.sample_goals(5, torch.Generator().manual_seed(1))

    def run(goals, seed, share=None):
        gen = torch.Generator().manual_seed(seed)
        return navigation.rollout(policy, None, goals, 3, gen, horizon=8, share=share)

    whole = run(goals, 7)
    assert torch.equal(whole.actions, run(goals, 7).actions)
    assert not torch.equal(whole.actions, run(goals, 8).actions)
    # Tasks 3 and 4 of the meta-batch, sampled apart (as on a second torchrun rank): the same.
    part = run(goals[3:], 7, share=(3, 5))
    torch.testing.assert_close(part.actions, whole.actions[3:], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(part.rewards, whole.rewards[3:], rtol=1e-14, atol=1e-14)


def test_rollout_with_stacked_params_samples_each_task_with_its_own_policy():
    policies = [small_policy(seed) for seed in (1, 2)]
    params = {
        name: torch.stack([dict(p.named_parameters())[name].detach() for p in policies])
        for name, _ in policies[0].named_parameters()
    }
    goals = torch.tensor([[0.3, 0.1], [-0.2, 0.4]], dtype=DTYPE)
    traj = navigation.rollout(policies[0], params, goals, 4, torch.Generator().manual_seed(0))
    for t, policy in enumerate(policies):
        with torch.no_grad():
            dist = Normal(policy.mean(traj.observations[t]), policy.log_std.exp())
            torch.testing.assert_close(
                traj.log_probs[t], dist.log_prob(traj.actions[t]).sum(-1), rtol=1e-13, atol=1e-13
            )


# --------------------------------------------------------------------------- estimator


def reference_advantages(observations, rewards, mask, gamma):
    """One task, by loops: returns-to-go, rllab's linear feature baseline, normalisation."""
    n, horizon = rewards.shape
    returns = np.zeros((n, horizon))
    for i in range(n):
        running = 0.0
        for t in reversed(range(horizon)):
            running = rewards[i, t] + gamma * running
            returns[i, t] = running
    rows, targets, where = [], [], []
    for i in range(n):
        for t in range(horizon):
            if mask[i, t]:
                o = np.clip(observations[i, t], -10, 10)
                s = t / 100
                rows.append([*o, *(o**2), s, s**2, s**3, 1.0])
                targets.append(returns[i, t])
                where.append((i, t))
    x, y = np.array(rows), np.array(targets)
    w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
    adv = y - x @ w
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    out = np.zeros((n, horizon))
    for (i, t), a in zip(where, adv, strict=True):
        out[i, t] = a
    return out


def test_advantages_match_returns_to_go_minus_a_hand_fitted_baseline():
    policy = drifting(small_policy())
    traj = navigation.rollout(policy, None, GOALS, 6, torch.Generator().manual_seed(3), horizon=20)
    assert (traj.mask[:2] == 0).any() and (traj.mask[:2, :, -1] == 1).any()
    adv = navigation.advantages(traj, gamma=0.9)
    for t in range(3):
        want = reference_advantages(
            traj.observations[t].numpy(), traj.rewards[t].numpy(), traj.mask[t].numpy(), 0.9
        )
        np.testing.assert_allclose(adv[t].numpy(), want, rtol=1e-8, atol=1e-9)


def test_clipped_surrogate_has_the_reinforce_gradient_at_the_sampling_policy():
    policy = small_policy()
    goals = torch.tensor([[0.3, 0.1]], dtype=DTYPE)
    traj = navigation.rollout(policy, None, goals, 4, torch.Generator().manual_seed(0), horizon=10)
    obs, targets = navigation.policy_gradient_batch(traj)
    grads = [
        torch.autograd.grad(loss(policy(obs[0]), targets[0]), list(policy.parameters()))
        for loss in (
            navigation.reinforce_loss,
            lambda out, y: navigation.clipped_loss(out, y, 0.2),
        )
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_evaluation_step_from_shared_weights_is_adapt_tasks():
    learner = navigation.build_learner("metasgd", tiny_args(), torch.device("cpu"))
    policy = learner.policy.to(DTYPE)
    goals = torch.tensor([[0.3, 0.1], [-0.2, 0.4]], dtype=DTYPE)
    traj = navigation.rollout(policy, None, goals, 3, torch.Generator().manual_seed(0), horizon=10)
    batch = navigation.policy_gradient_batch(traj)
    shared = {n: p.detach().expand(2, *p.shape) for n, p in policy.named_parameters()}
    mine = navigation.policy_gradient_step(policy, shared, learner.step_sizes(), batch, 1.0)
    with torch.no_grad():
        library = adapt_tasks(policy, learner.opt, navigation.reinforce_loss, batch)
    for name in library:
        torch.testing.assert_close(mine[name], library[name], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- meta-gradient


def mlp_out(weights, obs):
    """The policy by hand, from its weights by name: ReLU layers, then the mean; the log std."""
    h = obs
    for k in (0, 2):
        h = torch.relu(h @ weights[f"mean.{k}.weight"].T + weights[f"mean.{k}.bias"])
    return h @ weights["mean.4.weight"].T + weights["mean.4.bias"], weights["log_std"]


def reference_surrogate(weights, traj, t, gamma):
    """``-(1 / steps) sum A log pi(a | s)`` of task ``t``, with loops' advantages."""
    mask = traj.mask[t]
    adv = reference_advantages(
        traj.observations[t].numpy(), traj.rewards[t].numpy(), mask.numpy(), gamma
    )
    mean, log_std = mlp_out(weights, traj.observations[t])
    logp = Normal(mean, log_std.exp()).log_prob(traj.actions[t]).sum(-1)
    return -(torch.as_tensor(adv) * mask * logp).sum() / mask.sum()


def tiny_args(**overrides):
    argv = ["--fast-batch", "4", "--horizon", "12", "--hidden", "8", "8", "--meta-batch", "3"]
    args = navigation.parse_args(argv)
    vars(args).update(overrides)
    return args


@pytest.mark.parametrize("method", ["metasgd", "maml"])
def test_meta_gradient_of_one_iteration_matches_hand_written_autograd_float64(method):
    # Small steps, so that the adapted policies still end some episodes at the goal.
    args = tiny_args(gamma=0.95, maml_alpha=5e-4)
    learner = navigation.build_learner(method, args, torch.device("cpu"))
    policy, opt = drifting(learner.policy.to(DTYPE)), learner.opt
    if method == "metasgd":
        opt.uniform_step_sizes_(1e-4, 1e-3, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(2)
    query, fast, inner, fresh = navigation.meta_objective(learner, GOALS, args, generator)
    for traj in (inner, fresh):  # episodes that end early and episodes that run the horizon
        assert (traj.mask == 0).any() and (traj.mask[..., -1] == 1).any()
    loss = navigation.task_losses(policy, fast, navigation.reinforce_loss, query).mean()
    params = list(policy.parameters())
    opt.meta_parameters()  # the step sizes follow the cast to float64
    step_sizes = [opt.step_size(p) for p in params]  # the live leaves the outer step learns
    learned = params + (step_sizes if method == "metasgd" else [])
    got = torch.autograd.grad(loss, learned)

    # By hand: theta' = theta - alpha * grad L_in(theta) per task, L_out at theta', mean.
    names = [n for n, _ in policy.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    weights = dict(zip(names, leaves, strict=True))
    raw = [s.detach().clone().requires_grad_(method == "metasgd") for s in step_sizes]
    alphas = [opt.param_groups[0]["lr"] * s for s in raw]  # identity parametrization
    losses = []
    for t in range(3):
        inner_loss = reference_surrogate(weights, inner, t, args.gamma)
        grads = torch.autograd.grad(inner_loss, leaves, create_graph=True)
        adapted = {
            name: w - a * g for name, w, a, g in zip(names, leaves, alphas, grads, strict=True)
        }
        for name, w in adapted.items():
            torch.testing.assert_close(fast[name][t], w, rtol=1e-12, atol=1e-14)
        # The fresh episodes were drawn from this task's adapted policy.
        mean, log_std = mlp_out(adapted, fresh.observations[t])
        logp = Normal(mean, log_std.exp()).log_prob(fresh.actions[t]).sum(-1)
        torch.testing.assert_close(fresh.log_probs[t], logp, rtol=1e-12, atol=1e-12)
        losses.append(reference_surrogate(adapted, fresh, t, args.gamma))
    reference = torch.stack(losses).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-14)
    expected = torch.autograd.grad(reference, leaves + (raw if method == "metasgd" else []))
    assert len(got) == len(expected) == (14 if method == "metasgd" else 7)
    for g, e in zip(got, expected, strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- script


def test_help_shows_the_options():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "navigation.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    for option in ("--quick", "--device", "--methods", "--outer", "(default: 500)"):
        assert option in out.stdout


TINY = ["--iterations", "3", "--meta-batch", "3", "--fast-batch", "3", "--horizon", "15"]
TINY += ["--hidden", "8", "8", "--eval-goals", "4", "--log-every", "2"]


@pytest.mark.parametrize("outer", ["pg", "ppo"])
def test_tiny_run_writes_json_and_png(tmp_path, outer):
    results = navigation.main([*TINY, "--outer", outer, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "navigation.json").read_text())
    assert set(saved["returns"]) == set(navigation.METHODS)
    assert set(saved["train"]) == {"maml", "metasgd", "pretrained"}
    for method in navigation.METHODS:
        returns = saved["returns"][method]
        assert {"0", "1", "2", "3"} <= set(returns) and len(returns["per_goal"]) == 4
        assert returns["1"]["mean"] == pytest.approx(results["returns"][method]["1"]["mean"])
        assert returns["1"]["ci95"] > 0
    assert [it for it, *_ in saved["train"]["metasgd"]["curve"]] == [2, 3]
    assert saved["ranks_identical"] and saved["world_size"] == 1
    assert set(saved["step_sizes"]) == {
        n for n, _ in navigation.GaussianMLP((8, 8)).named_parameters()
    }
    assert "Meta-SGD" in saved["table"] and (tmp_path / "navigation.png").stat().st_size > 1000


def test_every_method_starts_from_the_same_weights_and_only_metasgd_learns_step_sizes():
    args = tiny_args()
    learners = {
        m: navigation.build_learner(m, args, torch.device("cpu")) for m in navigation.METHODS
    }
    first = learners["maml"].policy.state_dict()
    for learner in learners.values():
        for name, p in learner.policy.state_dict().items():
            assert torch.equal(p, first[name])
    assert learners["random"].outer is None
    held = {m: {id(p) for p in x.outer_tensors()} for m, x in learners.items() if x.outer}
    step_sizes = {id(s) for s in learners["metasgd"].opt.meta_parameters()}
    assert step_sizes <= held["metasgd"]
    assert not any(s.requires_grad for s in learners["maml"].opt.meta_parameters())
    alphas = learners["maml"].step_sizes()
    assert all(torch.all(a == navigation.MAML_ALPHA) for a in alphas.values())
    alphas = torch.cat([a.flatten() for a in learners["metasgd"].step_sizes().values()])
    assert 0.005 <= alphas.min() and alphas.max() <= 0.1


@pytest.mark.slow
def test_quick_mode_meta_learners_beat_the_baselines_after_one_step(tmp_path):
    results = navigation.main(["--quick", "--no-plot", "--out", str(tmp_path)])
    after = {m: r["1"]["mean"] for m, r in results["returns"].items()}
    assert min(after["maml"], after["metasgd"]) > after["pretrained"] > after["random"]


@pytest.mark.slow
def test_under_torchrun_trains_as_one_process_and_reports_identical_ranks(tmp_path):
    # 3 tasks on 2 ranks: shares of 2 and 1, each drawing the whole meta-batch's noise.
    args = [*TINY, "--methods", "metasgd", "pretrained", "--no-plot"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--local-addr", "127.0.0.1", "--nproc-per-node", "2"]
    path = str(BENCHMARKS.parent) + ":" + os.environ.get("PYTHONPATH", "")
    run = subprocess.run(
        [*command, str(BENCHMARKS / "navigation.py"), *args, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("wrote") == 1  # rank 0 alone writes
    two = json.loads((tmp_path / "two" / "navigation.json").read_text())
    alone = navigation.main([*args, "--out", str(tmp_path / "one")])
    assert (two["world_size"], two["ranks_identical"]) == (2, True)
    for method in ("metasgd", "pretrained"):
        curve_two, curve_one = two["train"][method]["curve"], alone["train"][method]["curve"]
        assert [c[0] for c in curve_two] == [c[0] for c in curve_one] == [2, 3]
        flat_two = [v for c in curve_two for v in c[1:]]
        assert flat_two == pytest.approx([v for c in curve_one for v in c[1:]], rel=1e-4)
        returns_two, returns_one = two["returns"][method], alone["returns"][method]
        assert returns_two["3"]["mean"] == pytest.approx(returns_one["3"]["mean"], rel=1e-4)

"""2D navigation with policy-gradient inner steps (MAML Section 5.3, Meta-SGD Section 4.3).

A point agent starts at the origin and must reach a goal drawn uniformly from
the square [-0.5, 0.5]^2; it observes its position, its action is a velocity
clipped to [-0.1, 0.1] per axis, its reward the negative distance to the goal,
and an episode ends within 0.01 of the goal (per axis) or after 100 steps.
Every task's trajectories are stepped together as tensors on ``--device``
(:class:`Navigation2D`). The policy is a Gaussian MLP (2 hidden layers of 100
ReLU units, a learned state-independent log standard deviation, starting at
std 1); its inner update is one REINFORCE step on ``--fast-batch`` (20)
trajectories of the task, with a linear feature baseline:

    theta' = theta - alpha * grad L_in(theta),
    L_in(theta) = -sum_{i,t} w_it A_it log pi_theta(a_it | s_it)

(A: discounted returns-to-go, gamma = 0.99, minus the baseline fitted by
ridge regression on the task's trajectories, normalised per task; w: 1 over
the task's number of steps). The meta-objective is the return of the adapted
policy on ``--fast-batch`` fresh trajectories sampled with theta', over
meta-batches of ``--meta-batch`` (20) tasks.

* ``maml``: learned initialization, fixed scalar ``alpha = --maml-alpha`` (0.1,
  MAML's appendix; the reference code's point script takes 0.5);
* ``metasgd``: learned initialization and elementwise step sizes ``alpha``
  (drawn from U[0.005, 0.1], as the paper draws them), learned together;
* ``pretrained``: one policy trained with policy gradient on all tasks (the
  same goals, iterations and number of trajectories per task as the
  meta-learners), then fine-tuned at test time with MAML's inner steps;
* ``random``: the same initial weights, untrained, fine-tuned likewise.

Meta-gradient estimator (``--outer pg``, the default): the exact gradient of
the surrogate L_out(theta') = -sum w A' log pi_theta'(a' | s') on the fresh
trajectories, through the inner policy-gradient step (second order: the
Hessian of L_in) to theta and alpha. As in the MAML-RL convention, the
advantages are constants and the dependence of the inner trajectories'
sampling distribution on theta is left out (the term that E-MAML and DiCE
add). The step is Adam's (``--meta-lr``, 3e-3, annealed to 0 by a cosine over
``--iterations``). ``--outer ppo`` instead takes
``--ppo-epochs`` Adam steps on PPO's clipped surrogate of the same
trajectories, re-adapting on the same inner trajectories each epoch; its first
epoch is the plain step. Both papers use TRPO for the outer step.

Test: ``--eval-goals`` held-out goals, the same for every method; per goal,
``--fast-batch`` trajectories with the current policy, then a policy-gradient
step on them, ``--eval-steps`` (3) times, the step sizes halved after the
first step (MAML's protocol, for every method). The table gives the average
return before adaptation and after each step, with its 95% confidence
interval over goals.

Where this deviates from MAML's reference code (cbfinn/maml_rl,
``maml_examples/point_env_randgoal.py``, ``maml_trpo_point.py``): the outer
step (Adam on the exact meta-gradient, or PPO clipping, not TRPO); the
baseline is fitted on the trajectories it is subtracted from (as
tristandeleu/pytorch-maml-rl does); meta-batches of 20 tasks (MAML's text;
the point script takes 40); the last iterate is tested, not the best one
during training. Kept from the
reference code against the papers' text: the reward is the negative distance
(the text says squared distance; ``--reward squared`` gives that), "within
0.01" is per axis, and the policy's action is scaled by 0.1 before clipping
(rllab's ``normalize`` wrapper of the environment).

Under torchrun every meta-batch's tasks are split over the processes (the
gradients of the weights and step sizes averaged with
:func:`torch_metasgd.average_gradients`); every rank draws the noise of the
whole meta-batch and keeps its share, so the training is that of one
process, up to float rounding. Rank 0 tests, prints and writes; the JSON
records ``world_size`` and ``ranks_identical``.

    python benchmarks/navigation.py --quick
    python benchmarks/navigation.py              # 500 meta-iterations per method
    python benchmarks/navigation.py --outer ppo --methods maml metasgd
    torchrun --standalone --nproc_per_node=2 benchmarks/navigation.py --quick
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from _common import (
    ALPHA_INIT,
    add_output_arguments,
    claim_output,
    device_of,
    environment,
    format_table,
    launch,
    mean_ci95,
    mean_over_ranks,
    rank,
    ranks_identical,
    save_figure,
    script_parser,
    seed_everything,
    world_size,
    write_json,
)
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from torch_metasgd import MetaSGD, adapt_tasks, average_gradients

# MAML (arXiv:1703.03400) Section 5.3 and its reference code.
HORIZON = 100
MAX_SPEED = 0.1  # per axis
ACTION_SCALE = 0.1  # rllab's normalize(): an action of 1 is the top speed
GOAL_RANGE = (-0.5, 0.5)
SUCCESS = 0.01  # per axis
GAMMA = 0.99  # rllab's default discount
HIDDEN = (100, 100)
MAML_ALPHA = 0.1  # MAML's appendix: alpha = 0.1 in its RL experiments
BASELINE_RIDGE = 1e-5  # rllab's LinearFeatureBaseline

METHODS = ("maml", "metasgd", "pretrained", "random")
META_LEARNERS = ("maml", "metasgd")
LABELS = {
    "maml": "MAML",
    "metasgd": "Meta-SGD",
    "pretrained": "pretrained",
    "random": "random init",
}
COLORS = {
    "maml": "tab:orange",
    "metasgd": "tab:blue",
    "pretrained": "tab:green",
    "random": "tab:gray",
}


# --------------------------------------------------------------------------- environment


class Navigation2D:
    """Point agents in the plane: ``T`` tasks (goals) of ``n`` episodes each, stepped together.

    Every episode starts at the origin. ``step(action)`` moves each running
    agent by ``clamp(ACTION_SCALE * action, -MAX_SPEED, MAX_SPEED)`` and
    rewards it with minus its distance to its task's goal (``reward=
    "squared"``: minus the squared distance); an episode ends once the agent
    is within ``SUCCESS`` of the goal on both axes. An ended episode stays
    put and earns 0. Tensors only: no Python loop over episodes, nothing read
    back to the host, any device and dtype (``goals``').

    Args:
        goals: ``(T, 2)``, one goal per task.
        n: episodes per task.
        reward: ``"distance"`` (MAML's code) or ``"squared"`` (MAML's text).
    """

    def __init__(self, goals: Tensor, n: int, *, reward: str = "distance") -> None:
        if goals.dim() != 2 or goals.shape[1] != 2:
            raise ValueError(f"goals must have shape (T, 2), got {tuple(goals.shape)}")
        if reward not in ("distance", "squared"):
            raise ValueError(f"Invalid reward: {reward!r} (expected 'distance' or 'squared')")
        self.goals, self.n, self.reward = goals, n, reward
        self.reset()

    def reset(self) -> Tensor:
        """Every agent back at the origin; the observations, ``(T, n, 2)``."""
        shape = (self.goals.shape[0], self.n)
        self.position = self.goals.new_zeros(*shape, 2)
        self.done = torch.zeros(shape, dtype=torch.bool, device=self.goals.device)
        return self.position

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(observation, reward, done)`` once the running agents take ``action`` (T, n, 2)."""
        running = ~self.done
        velocity = (ACTION_SCALE * action).clamp(-MAX_SPEED, MAX_SPEED)
        self.position = torch.where(running[..., None], self.position + velocity, self.position)
        offset = self.position - self.goals[:, None]
        squared = offset.square().sum(-1)
        cost = squared if self.reward == "squared" else squared.sqrt()
        reward = torch.where(running, -cost, torch.zeros_like(cost))
        self.done = self.done | (offset.abs() < SUCCESS).all(-1)
        return self.position, reward, self.done


def sample_goals(n_tasks: int, generator: torch.Generator) -> Tensor:
    low, high = GOAL_RANGE
    return low + (high - low) * torch.rand(n_tasks, 2, generator=generator, dtype=torch.float64)


# --------------------------------------------------------------------------- policy


class GaussianMLP(nn.Module):
    """``obs -> [mean, log_std]``: an MLP mean and a learned, state-independent log std.

    Xavier-uniform weights and zero biases, std 1 at first (rllab's and
    pytorch-maml-rl's Gaussian MLP policies).
    """

    def __init__(self, hidden: tuple[int, ...] = HIDDEN, obs_dim: int = 2, act_dim: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip((obs_dim, *hidden[:-1]), hidden, strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.mean = nn.Sequential(*layers, nn.Linear((obs_dim, *hidden)[-1], act_dim))
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        for m in self.mean:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, obs: Tensor) -> Tensor:
        mean = self.mean(obs)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)


def log_prob(out: Tensor, actions: Tensor) -> Tensor:
    """The Gaussian log-density of ``actions`` under the policy output ``out``, summed over axes."""
    mean, log_std = out.chunk(2, -1)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


Params = dict[str, Tensor]


def act(policy: nn.Module, params: Params | None, obs: Tensor) -> Tensor:
    """The policy's output on ``obs`` (``(T, ..., 2)``): with its own weights (``params=None``)
    or each task ``t`` with ``params[name][t]`` (stacked, as :func:`adapt_tasks` returns them)."""
    if params is None:
        return policy(obs)
    return vmap(lambda p, o: functional_call(policy, p, (o,)))(params, obs)


# --------------------------------------------------------------------------- trajectories


@dataclass
class Trajectories:
    """``T`` tasks x ``n`` episodes x ``H`` steps, padded after each episode's end."""

    observations: Tensor  # (T, n, H, 2): where each action was taken
    actions: Tensor  # (T, n, H, 2)
    rewards: Tensor  # (T, n, H), 0 after the end
    mask: Tensor  # (T, n, H), 1 while the episode runs
    log_probs: Tensor  # (T, n, H): of each action under the policy that sampled it
    positions: Tensor  # (T, n, H + 1, 2): the path, from the origin

    def returns(self) -> Tensor:
        """The undiscounted return of each episode, ``(T, n)``."""
        return self.rewards.sum(-1)


@torch.no_grad()
def rollout(
    policy: nn.Module,
    params: Params | None,
    goals: Tensor,
    n: int,
    generator: torch.Generator,
    *,
    horizon: int = HORIZON,
    reward: str = "distance",
    share: tuple[int, int] | None = None,
) -> Trajectories:
    """``n`` episodes of every task (goal), all stepped at once; see :func:`act` for ``params``.

    Actions are drawn with ``generator`` (on the goals' device); the episodes
    run ``horizon`` steps as tensors, each masked after its end. With
    ``share=(offset, tasks)`` the goals are tasks ``offset, offset + 1, ...``
    of a meta-batch of ``tasks``, and the noise is drawn for all of them: every
    torchrun process draws the same numbers, so a task's episodes do not
    depend on which process samples it.
    """
    offset, tasks = share or (0, goals.shape[0])
    env = Navigation2D(goals, n, reward=reward)
    obs = env.reset()
    steps: dict[str, list[Tensor]] = {k: [] for k in ("obs", "act", "rew", "mask", "logp")}
    positions = [obs]
    for _ in range(horizon):
        out = act(policy, params, obs)
        mean, log_std = out.chunk(2, -1)
        noise = torch.randn(
            (tasks, *mean.shape[1:]), generator=generator, device=mean.device, dtype=mean.dtype
        )
        action = mean + log_std.exp() * noise[offset : offset + mean.shape[0]]
        steps["obs"].append(obs)
        steps["act"].append(action)
        steps["mask"].append((~env.done).to(obs.dtype))
        steps["logp"].append(log_prob(out, action))
        obs, rew, _ = env.step(action)
        steps["rew"].append(rew)
        positions.append(obs)
    s = {k: torch.stack(v, 2) for k, v in steps.items()}
    return Trajectories(
        s["obs"], s["act"], s["rew"], s["mask"], s["logp"], torch.stack(positions, 2)
    )


def advantages(traj: Trajectories, gamma: float = GAMMA) -> Tensor:
    """Per task: returns-to-go minus a linear feature baseline, normalised; ``(T, n, H)``.

    The baseline (rllab's LinearFeatureBaseline: position, its square, time
    t/100 and its square and cube, a constant) is a ridge regression of the
    returns-to-go fitted on the task's own steps; the advantages are then
    centred and scaled to unit standard deviation over those steps.
    """
    horizon = traj.rewards.shape[-1]
    t = torch.arange(horizon, device=traj.rewards.device, dtype=traj.rewards.dtype)
    # discount[k, j] = gamma^(k - j) for k >= j: returns-to-go in one product.
    discount = torch.where(t[:, None] >= t, gamma ** (t[:, None] - t), 0.0)
    returns = traj.rewards @ discount
    mask = traj.mask
    obs = traj.observations.clamp(-10, 10)
    time = (t / 100).expand_as(mask)[..., None]
    features = torch.cat([obs, obs.square(), time, time**2, time**3, torch.ones_like(time)], -1)
    features = (features * mask[..., None]).flatten(1, 2)  # (T, n * H, 10)
    eye = torch.eye(features.shape[-1], dtype=features.dtype, device=features.device)
    gram = features.transpose(1, 2) @ features + BASELINE_RIDGE * eye
    weights = torch.linalg.solve(gram, features.transpose(1, 2) @ returns.flatten(1)[..., None])
    baseline = (features @ weights).view_as(returns)
    adv = (returns - baseline) * mask
    count = mask.sum((1, 2), keepdim=True)
    mean = adv.sum((1, 2), keepdim=True) / count
    std = (((adv - mean) * mask).square().sum((1, 2), keepdim=True) / count).sqrt()
    return (adv - mean) / (std + 1e-8) * mask


def policy_gradient_batch(traj: Trajectories, gamma: float = GAMMA) -> tuple[Tensor, Tensor]:
    """``(observations, targets)`` for :func:`reinforce_loss`, one row per step: ``(T, n * H, .)``.

    ``targets`` holds, per step, the action (2), the advantage, the step's
    weight (1 over its task's number of steps; 0 after the end) and the
    log-probability of the action when it was sampled.
    """
    weight = traj.mask / traj.mask.sum((1, 2), keepdim=True)
    targets = torch.cat(
        [traj.actions, torch.stack([advantages(traj, gamma), weight, traj.log_probs], -1)], -1
    )
    return traj.observations.flatten(1, 2), targets.flatten(1, 2)


def reinforce_loss(out: Tensor, targets: Tensor) -> Tensor:
    """One task's REINFORCE surrogate, ``-sum w A log pi(a | s)``; its gradient is the policy
    gradient (the advantages are constants)."""
    actions, adv, weight = targets[..., :2], targets[..., 2], targets[..., 3]
    return -(weight * adv * log_prob(out, actions)).sum()


def clipped_loss(out: Tensor, targets: Tensor, clip: float) -> Tensor:
    """PPO's clipped surrogate, ``-sum w min(r A, clamp(r, 1 - clip, 1 + clip) A)``, with ``r``
    the probability ratio to the sampling policy; at that policy its gradient is REINFORCE's."""
    actions, adv, weight, sampled = (targets[..., :2], *targets[..., 2:].unbind(-1))
    ratio = torch.exp(log_prob(out, actions) - sampled)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    return -(weight * surrogate).sum()


def task_losses(policy: nn.Module, params: Params, loss_fn, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``loss_fn`` of every task ``t`` at its own ``params[.][t]``, ``(T,)``, differentiable."""
    return vmap(lambda p, o, y: loss_fn(functional_call(policy, p, (o,)), y))(params, *batch)


def policy_gradient_step(
    policy: nn.Module, params: Params, alphas: Params, batch: tuple[Tensor, Tensor], scale: float
) -> Params:
    """One REINFORCE step of every task from its own ``params``, ``p - scale * alpha * grad``."""

    def loss(p: Params, obs: Tensor, targets: Tensor) -> Tensor:
        return reinforce_loss(functional_call(policy, p, (obs,)), targets)

    grads = vmap(grad(loss))(params, *batch)
    return {name: p - scale * alphas[name] * grads[name] for name, p in params.items()}


# --------------------------------------------------------------------------- methods


@dataclass
class Learner:
    """A method's policy, inner-loop :class:`MetaSGD`, outer Adam (``None``: untrained) and the
    schedule of Adam's learning rate."""

    method: str
    policy: GaussianMLP
    opt: MetaSGD
    outer: torch.optim.Optimizer | None
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None

    def outer_tensors(self) -> list[Tensor]:
        return [p for group in self.outer.param_groups for p in group["params"]]

    def step_sizes(self) -> Params:
        """The inner step size of every parameter (broadcastable to it), detached."""
        with torch.no_grad():
            return {n: self.opt.effective_lr(p) for n, p in self.policy.named_parameters()}


def build_learner(method: str, args: argparse.Namespace, device: torch.device) -> Learner:
    """The same initial weights for every method (``--seed``); Meta-SGD's step sizes drawn from
    U[0.005, 0.1]; the others' inner step is MAML's fixed scalar (not learned)."""
    torch.manual_seed(args.seed)
    policy = GaussianMLP(tuple(args.hidden)).to(device)
    if method == "metasgd":
        opt = MetaSGD(policy.parameters(), lr=1.0)
        opt.uniform_step_sizes_(*ALPHA_INIT, generator=torch.Generator().manual_seed(args.seed))
        learned = [*policy.parameters(), *opt.meta_parameters()]
    else:
        opt = MetaSGD(policy.parameters(), lr=args.maml_alpha, granularity="group")
        for s in opt.meta_parameters():
            s.requires_grad_(False)
        learned = list(policy.parameters())
    if method == "random":
        return Learner(method, policy, opt, None)
    outer = torch.optim.Adam(learned, lr=args.meta_lr)
    schedule = None
    if args.meta_lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(outer, max(args.iterations, 1))
    return Learner(method, policy, opt, outer, schedule)


def meta_objective(
    learner: Learner,
    goals: Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
    share: tuple[int, int] | None = None,
) -> tuple[tuple[Tensor, Tensor], Params, Trajectories, Trajectories]:
    """One meta-iteration's data: ``(query batch, adapted params, inner and fresh trajectories)``.

    Samples ``--fast-batch`` trajectories of every task with the policy,
    adapts every task with one REINFORCE step (:func:`adapt_tasks`, with the
    graph to the weights and step sizes), then samples as many fresh
    trajectories with each task's adapted policy. The surrogate of the
    meta-gradient is ``task_losses(policy, fast, reinforce_loss, query)``.
    ``share``: see :func:`rollout`.
    """
    policy, n = learner.policy, args.fast_batch
    options = {"horizon": args.horizon, "reward": args.reward, "share": share}
    inner = rollout(policy, None, goals, n, generator, **options)
    support = policy_gradient_batch(inner, args.gamma)
    fast = adapt_tasks(policy, learner.opt, reinforce_loss, support)
    detached = {name: p.detach() for name, p in fast.items()}
    fresh = rollout(policy, detached, goals, n, generator, **options)
    return policy_gradient_batch(fresh, args.gamma), fast, inner, fresh


def outer_step(learner: Learner, loss: Tensor, weight: float) -> None:
    """Backward, average the gradients over the ranks (torchrun), Adam's step."""
    learner.outer.zero_grad()
    (loss * weight).backward()
    if dist.is_initialized():
        average_gradients(learner.outer_tensors())
    learner.outer.step()


def iteration(
    learner: Learner,
    goals: Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
    share: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """One outer step (``--ppo-epochs`` with ``--outer ppo``) on ``goals``, a share of a
    meta-batch (see :func:`rollout`); the mean returns (before, after adaptation) of the
    trajectories it used, detached (pretrained: its own, twice)."""
    policy = learner.policy
    offset, tasks = share or (0, goals.shape[0])
    weight = world_size() * goals.shape[0] / tasks  # the ranks' mean: the meta-batch's mean
    epochs = args.ppo_epochs if args.outer == "ppo" else 1

    def clipped(out: Tensor, targets: Tensor) -> Tensor:
        return clipped_loss(out, targets, args.ppo_clip)

    if learner.method == "pretrained":
        # The meta-learners' budget: as many trajectories per task as their inner and fresh ones.
        n = 2 * args.fast_batch
        traj = rollout(
            policy, None, goals, n, generator, horizon=args.horizon, reward=args.reward, share=share
        )
        batch = policy_gradient_batch(traj, args.gamma)
        for epoch in range(epochs):
            loss_fn = reinforce_loss if epoch == 0 else clipped
            outer_step(learner, vmap(loss_fn)(policy(batch[0]), batch[1]).mean(), weight)
        ret = traj.returns().mean()
        return ret, ret
    query, fast, inner, fresh = meta_objective(learner, goals, args, generator, share)
    outer_step(learner, task_losses(policy, fast, reinforce_loss, query).mean(), weight)
    support = policy_gradient_batch(inner, args.gamma)
    for _ in range(epochs - 1):
        fast = adapt_tasks(policy, learner.opt, reinforce_loss, support)
        outer_step(learner, task_losses(policy, fast, clipped, query).mean(), weight)
    return inner.returns().mean(), fresh.returns().mean()


def train(learner: Learner, args: argparse.Namespace, device: torch.device) -> dict:
    """``--iterations`` outer steps on meta-batches of ``--meta-batch`` goals.

    Every rank draws the same goals and noise and keeps its share of the
    tasks; the curve holds ``(iteration, return before adaptation, after)``,
    averaged over the meta-batch and the ``--log-every`` iterations since the
    last point.
    """
    goal_stream = torch.Generator().manual_seed(args.seed * 1000 + 1)
    noise = torch.Generator(device).manual_seed(args.seed * 1000 + 2)
    dtype = next(learner.policy.parameters()).dtype
    curve: list[tuple[int, float, float]] = []
    running = torch.zeros(2, dtype=torch.float64, device=device)
    count = 0
    start = time.perf_counter()
    bar = tqdm(
        range(args.iterations),
        desc=f"{LABELS[learner.method]:10s}",
        leave=False,
        disable=rank() != 0,
    )
    for it in bar:
        goals = sample_goals(args.meta_batch, goal_stream).to(device, dtype)
        mine = goals.tensor_split(world_size())[rank()]
        offset = sum(part.shape[0] for part in goals.tensor_split(world_size())[: rank()])
        before, after = iteration(learner, mine, args, noise, (offset, goals.shape[0]))
        if learner.schedule is not None:
            learner.schedule.step()
        running += torch.stack([before, after]).to(torch.float64) * mine.shape[0] / goals.shape[0]
        count += 1
        if count == args.log_every or it == args.iterations - 1:
            # mean_over_ranks divides by the number of ranks: the meta-batch's mean.
            before_mean = mean_over_ranks(running[0]) * world_size() / count
            after_mean = mean_over_ranks(running[1]) * world_size() / count
            curve.append((it + 1, before_mean, after_mean))
            bar.set_postfix(ret=f"{before_mean:.1f} -> {after_mean:.1f}")
            running.zero_()
            count = 0
    seconds = time.perf_counter() - start
    tensors = [*learner.policy.parameters(), *learner.opt.meta_parameters()]
    return {"train_seconds": seconds, "curve": curve, "ranks_identical": ranks_identical(tensors)}


# --------------------------------------------------------------------------- evaluation


def eval_goals(n_goals: int, seed: int) -> Tensor:
    # Disjoint from the training stream (seed * 1000 + 1).
    return sample_goals(n_goals, torch.Generator().manual_seed(10_000_019 + seed))


@torch.no_grad()
def mean_paths(policy: nn.Module, params: Params, goals: Tensor, horizon: int) -> Tensor:
    """The path of each task's policy taking its mean action (no noise), ``(T, H + 1, 2)``."""
    env = Navigation2D(goals, 1)
    path = [env.reset()]
    for _ in range(horizon):
        mean, _ = act(policy, params, path[-1]).chunk(2, -1)
        path.append(env.step(mean)[0])
    return torch.stack(path, 2)[:, 0]


@torch.no_grad()
def evaluate(
    learner: Learner, goals: Tensor, args: argparse.Namespace, *, keep: int = 0
) -> tuple[Tensor, list[Tensor]]:
    """Per goal, the mean return of ``--fast-batch`` episodes before adaptation and after each of
    ``--eval-steps`` REINFORCE steps, ``(steps + 1, G)``; and the mean-action paths
    (:func:`mean_paths`) of the first ``keep`` goals at every stage, ``(keep, H + 1, 2)`` each.

    Step ``k > 1`` takes ``--later-step-scale`` times the step sizes (MAML
    halves them). The noise is seeded by ``--seed`` alone: every method sees
    the same draws.
    """
    policy = learner.policy
    noise = torch.Generator(goals.device).manual_seed(20_000_003 + args.seed)
    params = {n: p.detach().expand(goals.shape[0], *p.shape) for n, p in policy.named_parameters()}
    alphas = learner.step_sizes()
    returns, paths = [], []
    for k in range(args.eval_steps + 1):
        traj = rollout(
            policy, params, goals, args.fast_batch, noise, horizon=args.horizon, reward=args.reward
        )
        returns.append(traj.returns().mean(1))
        firsts = {n: p[:keep] for n, p in params.items()}
        paths.append(mean_paths(policy, firsts, goals[:keep], args.horizon))
        if k < args.eval_steps:
            scale = 1.0 if k == 0 else args.later_step_scale
            with torch.enable_grad():
                batch = policy_gradient_batch(traj, args.gamma)
                params = policy_gradient_step(policy, params, alphas, batch, scale)
            params = {n: p.detach() for n, p in params.items()}
    return torch.stack(returns), paths


# --------------------------------------------------------------------------- report


def step_names(args: argparse.Namespace) -> list[str]:
    return ["before" if k == 0 else f"{k} step" + "s" * (k > 1) for k in range(args.eval_steps + 1)]


def paired_differences(results: dict, args: argparse.Namespace) -> dict:
    """Per method but MAML: its return minus MAML's on the same goal (and the same noise), mean
    and 95% CI over goals, at every step: tighter than the two intervals side by side."""
    if "maml" not in results["returns"]:
        return {}
    maml = torch.tensor(results["returns"]["maml"]["per_goal"], dtype=torch.float64)
    differences = {}
    for method in args.methods:
        if method != "maml":
            mine = torch.tensor(results["returns"][method]["per_goal"], dtype=torch.float64)
            differences[method] = {
                str(k): dict(zip(("mean", "ci95"), mean_ci95(d), strict=True))
                for k, d in enumerate(mine - maml)
            }
    return differences


def tables(results: dict, args: argparse.Namespace) -> tuple[str, str]:
    """The returns (and training time) of every method; their differences from MAML's."""
    steps = range(args.eval_steps + 1)
    rows = []
    for method in args.methods:
        r = results["returns"][method]
        cells = [f"{r[str(k)]['mean']:.2f} ± {r[str(k)]['ci95']:.2f}" for k in steps]
        seconds = results["train"].get(method, {}).get("train_seconds")
        rows.append([LABELS[method], *cells, "-" if seconds is None else f"{seconds:.0f}"])
    returns = format_table(["Method", *step_names(args), "training (s)"], rows)
    rows = [
        [LABELS[method], *(f"{d[str(k)]['mean']:+.2f} ± {d[str(k)]['ci95']:.2f}" for k in steps)]
        for method, d in results["vs_maml"].items()
    ]
    return returns, format_table(["Method - MAML", *step_names(args)], rows) if rows else ""


def plot(results: dict, paths: dict, goals: Tensor, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9})
    fig = plt.figure(figsize=(13, 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    curves, by_steps = top.subplots(1, 2, width_ratios=[2, 1])
    for method in args.methods:
        curve = results["train"].get(method, {}).get("curve")
        if not curve:
            continue
        it, before, after = zip(*curve, strict=True)
        if method in META_LEARNERS:
            label = f"{LABELS[method]}, after 1 step"
            curves.plot(it, after, color=COLORS[method], lw=1.4, label=label)
            label = f"{LABELS[method]}, before"
            curves.plot(it, before, color=COLORS[method], lw=1, ls=":", label=label)
        else:
            curves.plot(it, after, color=COLORS[method], lw=1.4, label=LABELS[method])
    curves.set(
        xlabel="meta-iteration",
        ylabel="average return on the training goals",
        title=f"training: {args.meta_batch} goals x {args.fast_batch} episodes per iteration, "
        f"outer step {args.outer}",
    )
    if curves.lines:
        curves.legend(ncols=3, loc="lower right")
    steps = list(range(args.eval_steps + 1))
    for i, method in enumerate(args.methods):
        r = results["returns"][method]
        mean = [r[str(k)]["mean"] for k in steps]
        ci = [r[str(k)]["ci95"] for k in steps]
        x = [k + (i - (len(args.methods) - 1) / 2) * 0.06 for k in steps]
        by_steps.errorbar(
            x,
            mean,
            yerr=ci,
            color=COLORS[method],
            marker="o",
            ms=4,
            capsize=3,
            label=LABELS[method],
        )
    by_steps.set_xticks(steps)
    by_steps.set(
        xlabel="policy-gradient steps at test time",
        ylabel="average return (± 95% CI)",
        title=f"{args.eval_goals} held-out goals",
    )
    by_steps.legend()
    shown = [m for m in ("metasgd", "maml", "pretrained") if m in paths]
    low, high = GOAL_RANGE
    n_goals = min(3, goals.shape[0])
    bottom.suptitle(
        "held-out goals: each policy's mean-action path after one policy-gradient step on the "
        "goal (solid) and before it (dotted)"
    )
    for j, ax in enumerate(bottom.subplots(1, n_goals, squeeze=False)[0]):
        for method in shown:
            before, after = paths[method][0][j], paths[method][1][j]
            ax.plot(before[:, 0], before[:, 1], color=COLORS[method], lw=1, ls=":")
            ax.plot(after[:, 0], after[:, 1], color=COLORS[method], lw=1.6, label=LABELS[method])
        ax.plot(*goals[j].tolist(), marker="*", color="crimson", ms=14, ls="none", label="goal")
        ax.plot(0, 0, marker="o", color="k", ms=4, ls="none", label="start")
        square = plt.Rectangle((low, low), high - low, high - low, fill=False, ls="--", lw=0.6)
        ax.add_patch(square)
        margin = 0.1
        ax.set(
            xlim=(low - margin, high + margin),
            ylim=(low - margin, high + margin),
            aspect="equal",
            title=f"goal {j + 1}",
        )
        if j == 0:
            ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path, dpi=90)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="what to train and test",
    )
    add("--iterations", type=int, default=500, help="outer steps per trained method")
    add("--meta-batch", type=int, default=20, help="tasks (goals) per meta-iteration")
    add(
        "--fast-batch", type=int, default=20, help="episodes per task for each policy-gradient step"
    )
    add("--horizon", type=int, default=HORIZON, help="steps per episode at most")
    add("--gamma", type=float, default=GAMMA, help="discount of the returns-to-go")
    add(
        "--reward",
        choices=("distance", "squared"),
        default="distance",
        help="minus the distance to the goal (MAML's code) or its square (MAML's text)",
    )
    add(
        "--maml-alpha",
        type=float,
        default=MAML_ALPHA,
        help="the inner step of MAML, and of the pretrained and random baselines",
    )
    add("--meta-lr", type=float, default=3e-3, help="Adam's learning rate (outer step)")
    add(
        "--meta-lr-schedule",
        choices=("constant", "cosine"),
        default="cosine",
        help="cosine: anneal the meta learning rate to 0 over --iterations",
    )
    add(
        "--outer",
        choices=("pg", "ppo"),
        default="pg",
        help="pg: one Adam step on the exact meta-gradient of the policy-gradient surrogate; "
        "ppo: --ppo-epochs Adam steps on PPO's clipped surrogate",
    )
    add("--ppo-epochs", type=int, default=4, help="outer steps per meta-batch with --outer ppo")
    add("--ppo-clip", type=float, default=0.2, help="PPO's clipping range epsilon")
    add("--hidden", type=int, nargs="+", default=list(HIDDEN), help="hidden layer widths")
    add("--eval-goals", type=int, default=200, help="held-out goals")
    add("--eval-steps", type=int, default=3, help="policy-gradient steps at test time")
    add(
        "--later-step-scale",
        type=float,
        default=0.5,
        help="step sizes of test steps 2, 3, ... relative to the first (MAML halves them)",
    )
    add("--seed", type=int, default=0, help="seed of the policies, goals, step sizes and noise")
    add("--device", default="cpu", help="cpu, cuda, ... or auto")
    add("--threads", type=int, default=1, help="torch CPU threads (small nets thrash with more)")
    add("--log-every", type=int, default=10, help="iterations per learning-curve point")
    add(
        "--quick",
        action="store_true",
        help="60 iterations of 10 goals, 50 held-out goals: 55 s with one thread on 2 idle cores",
    )
    add_output_arguments(parser, "navigation", torchrun=True)
    add("--no-plot", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.meta_batch, args.eval_goals, args.log_every = 60, 10, 50, 5
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    claim_output(args, "navigation", ["navigation.json", "navigation.png"])
    torch.set_num_threads(args.threads)
    device = launch(device_of(args.device))
    seed_everything(args.seed)
    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "world_size": world_size(),
        "ranks_identical": True,
        "returns": {},
        "train": {},
        "step_sizes": {},
        "seconds": {},  # per method: training and testing
    }
    goals = eval_goals(args.eval_goals, args.seed).to(device, torch.float32)
    paths = {}
    start = time.perf_counter()
    for method in args.methods:
        began = time.perf_counter()
        learner = build_learner(method, args, device)
        if learner.outer is not None:
            log = train(learner, args, device)
            results["ranks_identical"] &= log["ranks_identical"]
            results["train"][method] = log
        if rank() != 0:
            continue  # testing, printing and files: rank 0's
        returns, paths[method] = evaluate(learner, goals, args, keep=3)
        results["returns"][method] = {
            str(k): dict(zip(("mean", "ci95"), mean_ci95(r), strict=True))
            for k, r in enumerate(returns)
        }
        results["returns"][method]["per_goal"] = returns.tolist()
        if method == "metasgd":
            results["step_sizes"] = {
                n: {"median": float(a.median()), "min": float(a.min()), "max": float(a.max())}
                for n, a in learner.step_sizes().items()
            }
        results["seconds"][method] = time.perf_counter() - began
        summary = "  ".join(
            f"{k}: {results['returns'][method][str(k)]['mean']:.2f}"
            for k in range(args.eval_steps + 1)
        )
        print(f"{LABELS[method]:10s} return after 0..{args.eval_steps} steps  {summary}")
    results["wall_seconds"] = time.perf_counter() - start
    if rank() != 0:
        return results
    results["vs_maml"] = paired_differences(results, args)
    results["table"], results["difference_table"] = tables(results, args)
    print(
        f"\n2D navigation, average return ± 95% CI over {args.eval_goals} held-out goals "
        f"({args.fast_batch} episodes each), {args.iterations} meta-iterations x "
        f"{args.meta_batch} goals per trained method, outer {args.outer}, "
        f"{results['wall_seconds']:.0f} s in all\n"
    )
    print(results["table"])
    if results["difference_table"]:
        print("\nDifference from MAML's return, paired per held-out goal (± 95% CI)\n")
        print(results["difference_table"])
    write_json(args.out / "navigation.json", results)
    if not args.no_plot:
        plot(results, paths, goals.cpu(), args, args.out / "navigation.png")
    print(f"\nwrote {args.out}/navigation.json" + ("" if args.no_plot else " and navigation.png"))
    return results


if __name__ == "__main__":
    main()

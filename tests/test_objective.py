"""Tests of pacsrl.objective against hand-worked values and an independent loop implementation."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from pacsrl.objective import (
    class_weights,
    group_centre,
    group_outcomes,
    implicit_reward,
    on_policy_advantage,
    pacs_loss,
    pacs_on_policy_loss,
)

BASELINES = ["rloo", "grpo", "mean", "none"]
WEIGHT_MODES = ["question", "none", "only_positive", "only_negative"]
REWARD_FORMS = ["sum", "mean_logp"]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------------------------------
# an independent, deliberately naive implementation (python loops over floats, torch only for autograd)
# --------------------------------------------------------------------------------------------------
def reference_loss(logps, ref_logps, mask, labels, G, beta, baseline, weight_mode, reward_form):
    N, T = logps.shape
    rewards = []
    for i in range(N):
        if reward_form == "sum":
            s = 0.0
            for t in range(T):
                if mask[i, t] == 1:
                    s = s + (logps[i, t] - ref_logps[i, t])
            rewards.append(beta * s)
        else:
            s, count = 0.0, 0
            for t in range(T):
                if mask[i, t] == 1:
                    s = s + logps[i, t]
                    count += 1
            rewards.append(beta * s / max(count, 1))
    loss = 0.0
    for b in range(N // G):
        idx = list(range(b * G, (b + 1) * G))
        group_r = [rewards[i] for i in idx]
        group_y = [int(labels[i]) for i in idx]
        mean_all = sum(group_r) / G
        var = sum((r - mean_all) ** 2 for r in group_r) / (G - 1)
        std_const = math.sqrt(float(var.detach() if torch.is_tensor(var) else var))
        n_pos = sum(group_y)
        n_neg = G - n_pos
        for j, i in enumerate(idx):
            r = group_r[j]
            if baseline == "rloo":
                others = [group_r[k] for k in range(G) if k != j]
                psi = r - sum(others) / (G - 1)
            elif baseline == "mean":
                psi = r - mean_all
            elif baseline == "grpo":
                psi = (r - mean_all) / (std_const + 1e-6)
            else:
                psi = r
            y = group_y[j]
            if weight_mode == "question":
                if n_pos == 0 or n_neg == 0:
                    w = 1.0
                else:
                    w = G / (2 * (n_pos if y == 1 else n_neg))
            elif weight_mode == "none":
                w = 1.0
            elif weight_mode == "only_positive":
                w = float(y)
            else:
                w = float(1 - y)
            psi = psi if torch.is_tensor(psi) else torch.tensor(psi, dtype=torch.float64)
            # BCE with logits: -[y log sigma(psi) + (1-y) log(1 - sigma(psi))] = softplus(-psi) if y else softplus(psi)
            bce = torch.nn.functional.softplus(-psi) if y == 1 else torch.nn.functional.softplus(psi)
            loss = loss + w * bce
    return loss / N


def random_batch(N, T, seed, mixed_lengths=True):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    mask = torch.ones(N, T, dtype=torch.long)
    if mixed_lengths:
        for i in range(N):
            length = int(torch.randint(1, T + 1, (1,), generator=g))
            mask[i, length:] = 0
    return logps, ref, mask


# --------------------------------------------------------------------------------------------------
# hand-worked values
# --------------------------------------------------------------------------------------------------
def test_hand_worked_two_completions():
    # r_0 = (-1 - -1.5) + (-2 - -2) = 0.5 ; r_1 = (-3 - -2) + (-1 - -1) = -1
    # RLOO: psi_0 = 0.5 - (-1) = 1.5 ; psi_1 = -1 - 0.5 = -1.5
    # labels (1, 0): mixed group, one of each class, w = G/(2*1) = 1 for both
    # BCE(1.5, 1) = softplus(-1.5) ; BCE(-1.5, 0) = softplus(-1.5) ; L = (1/2)(2 softplus(-1.5))
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0], [-2.0, -1.0]])
    mask = torch.ones(2, 2)
    labels = torch.tensor([1, 0])
    assert torch.allclose(implicit_reward(logps, ref, mask), torch.tensor([0.5, -1.0]))
    assert torch.allclose(group_centre(torch.tensor([0.5, -1.0]), 2), torch.tensor([1.5, -1.5]))
    loss = pacs_loss(logps, ref, mask, labels, 2)
    assert loss.item() == pytest.approx(softplus(-1.5), rel=1e-6)  # = 0.2014133
    assert loss.item() == pytest.approx(0.2014133, abs=1e-6)


def test_hand_worked_group_of_four_class_weights():
    # one token each, r = logps - ref = (1, 0, 0, -1); labels (1, 0, 0, 0): n_pos = 1, n_neg = 3
    # weights: w_pos = 4 / (2*1) = 2, w_neg = 4 / (2*3) = 2/3
    # RLOO: psi_0 = 1 - (0+0-1)/3 = 4/3 ; psi_1 = psi_2 = 0 - (1+0-1)/3 = 0 ; psi_3 = -1 - (1+0+0)/3 = -4/3
    # L = (1/4) [ 2 softplus(-4/3) + (2/3) log2 + (2/3) log2 + (2/3) softplus(-4/3) ]
    #   = (1/4) [ (8/3) * 0.2339626 + (4/3) * 0.6931472 ] = (1/4) * 1.5480965 = 0.387024
    logps = torch.tensor([[1.0], [0.0], [0.0], [-1.0]])
    ref = torch.zeros(4, 1)
    mask = torch.ones(4, 1)
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(class_weights(labels, 4), torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))
    psi = group_centre(implicit_reward(logps, ref, mask), 4, "rloo")
    assert torch.allclose(psi, torch.tensor([4 / 3, 0.0, 0.0, -4 / 3]))
    expected = 0.25 * ((8 / 3) * softplus(-4 / 3) + (4 / 3) * math.log(2))
    assert pacs_loss(logps, ref, mask, labels, 4).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.387024, abs=1e-6)

    # "mean" baseline: the group mean of (1, 0, 0, -1) is 0, so psi = r
    assert torch.allclose(
        group_centre(torch.tensor([1.0, 0.0, 0.0, -1.0]), 4, "mean"), torch.tensor([1.0, 0, 0, -1])
    )
    # "grpo": unbiased std = sqrt((1 + 0 + 0 + 1) / 3) = sqrt(2/3) = 0.8165
    std = math.sqrt(2 / 3)
    psi_grpo = group_centre(torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=torch.float64), 4, "grpo")
    assert torch.allclose(psi_grpo, torch.tensor([1, 0, 0, -1], dtype=torch.float64) / (std + 1e-6))
    # weight_mode="none" with RLOO: L = (1/4) [ softplus(-4/3) + log2 + log2 + softplus(-4/3) ]
    expected_none = 0.25 * (2 * softplus(-4 / 3) + 2 * math.log(2))
    assert pacs_loss(logps, ref, mask, labels, 4, weight_mode="none").item() == pytest.approx(
        expected_none, rel=1e-6
    )
    # only_positive: only row 0 counts: L = (1/4) softplus(-4/3)
    got = pacs_loss(logps, ref, mask, labels, 4, weight_mode="only_positive").item()
    assert got == pytest.approx(0.25 * softplus(-4 / 3), rel=1e-6)


def test_hand_worked_mean_logp_and_beta():
    # mean_logp: r_i = beta * mean over unmasked tokens; row 0: (-1 + -3)/2 = -2, row 1: (-4)/1 = -4 (padding ignored)
    # beta = 0.5: r = (-1, -2); RLOO psi = (-1 - -2, -2 - -1) = (1, -1)
    logps = torch.tensor([[-1.0, -3.0], [-4.0, -100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    r = implicit_reward(logps, None, mask, beta=0.5, reward_form="mean_logp")
    assert torch.allclose(r, torch.tensor([-1.0, -2.0]))
    # labels (0, 0): all equal, w = 1; L = (1/2)(softplus(1) + softplus(-1))
    loss = pacs_loss(logps, None, mask, torch.tensor([0, 0]), 2, beta=0.5, reward_form="mean_logp")
    assert loss.item() == pytest.approx(0.5 * (softplus(1) + softplus(-1)), rel=1e-6)


def test_class_weights_question_mode_balances_each_group():
    # G = 8 with 3 correct: w_pos = 8/6 = 4/3, w_neg = 8/10 = 4/5; each class sums to G/2 = 4
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    w = class_weights(labels, 8)
    assert torch.allclose(w[:8], torch.tensor([4 / 3] * 3 + [4 / 5] * 5))
    assert torch.allclose(w[8:], torch.ones(8))  # all-correct group: w = 1
    assert w[:3].sum().item() == pytest.approx(4.0) and w[3:8].sum().item() == pytest.approx(4.0)


def test_group_outcomes():
    labels = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0])  # groups of 2: all-correct, all-wrong, all-wrong, mixed
    out = group_outcomes(labels, 2)
    assert out == {"all_correct": 0.25, "all_wrong": 0.5, "mixed": 0.25}
    # one all-wrong group of five: a count of groups with *some* correct answer (4 of 5) would read 0.8
    labels = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1, 1, 0])  # all-correct, all-wrong, mixed, mixed, mixed
    assert group_outcomes(labels, 2) == pytest.approx({"all_correct": 0.2, "all_wrong": 0.2, "mixed": 0.6})
    with pytest.raises(ValueError, match="shape"):  # (N, 1) labels are refused, not silently flattened
        group_outcomes(labels.view(-1, 1), 2)


# --------------------------------------------------------------------------------------------------
# agreement with the loop implementation, values and gradients, every mode
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "baseline,weight_mode,reward_form", list(itertools.product(BASELINES, WEIGHT_MODES, REWARD_FORMS))
)
def test_matches_loop_reference_values_and_gradients(baseline, weight_mode, reward_form):
    G, B, T = 4, 3, 5
    N = G * B
    # a fixed seed per case (str hash() differs from process to process: failures would not reproduce)
    logps, ref, mask = random_batch(
        N, T, seed=zlib.crc32(f"{baseline}/{weight_mode}/{reward_form}".encode()) % 1000
    )
    # group 0 mixed, group 1 all correct, group 2 all wrong
    labels = torch.tensor([1, 0, 0, 1] + [1] * 4 + [0] * 4)
    beta = 0.7

    lp1 = logps.clone().requires_grad_(True)
    ours = pacs_loss(
        lp1,
        ref,
        mask,
        labels,
        G,
        beta=beta,
        baseline=baseline,
        weight_mode=weight_mode,
        reward_form=reward_form,
    )
    ours.backward()

    lp2 = logps.clone().requires_grad_(True)
    theirs = reference_loss(lp2, ref, mask, labels, G, beta, baseline, weight_mode, reward_form)
    theirs.backward()

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(lp1.grad, lp2.grad, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# the on-policy gradient identity of PAPER.md
# --------------------------------------------------------------------------------------------------
def loop_weights(labels, G, weight_mode):
    """Eq. 4 by counting, one group at a time."""
    w = []
    for b in range(len(labels) // G):
        group = labels[b * G : (b + 1) * G]
        n_pos = sum(group)
        n_neg = G - n_pos
        for y in group:
            if weight_mode == "question":
                w.append(1.0 if n_pos in (0, G) else G / (2 * (n_pos if y == 1 else n_neg)))
            elif weight_mode == "none":
                w.append(1.0)
            elif weight_mode == "only_positive":
                w.append(float(y))
            else:
                w.append(float(1 - y))
    return w


def loop_advantage(labels, G, weights, baseline):
    """A_k by the chain rule written out per baseline, with u_i = w_i (R_i - 1/2):
    rloo: u_k - 1/(G-1) sum_{i != k} u_i ; mean: u_k - mean(u) ; none: u_k ; grpo: (u_k - mean(u)) / 1e-6."""
    A = []
    for b in range(len(labels) // G):
        u = [weights[b * G + i] * (labels[b * G + i] - 0.5) for i in range(G)]
        for k in range(G):
            if baseline == "rloo":
                A.append(u[k] - sum(u[i] for i in range(G) if i != k) / (G - 1))
            elif baseline == "mean":
                A.append(u[k] - sum(u) / G)
            elif baseline == "grpo":
                A.append((u[k] - sum(u) / G) / 1e-6)
            else:
                A.append(u[k])
    return torch.tensor(A, dtype=torch.float64)


def loop_advantage_rloo(labels, G, weights):
    return loop_advantage(labels, G, weights, "rloo")


@pytest.mark.parametrize("weight_mode", WEIGHT_MODES)
@pytest.mark.parametrize("baseline", BASELINES)
def test_on_policy_gradient_identity(baseline, weight_mode):
    G, B, T = 4, 4, 6
    N = G * B
    logps, _, mask = random_batch(N, T, seed=3)
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    beta = 2.0
    lp = logps.clone().requires_grad_(True)
    loss = pacs_loss(
        lp, logps.clone(), mask, labels, G, beta=beta, baseline=baseline, weight_mode=weight_mode
    )
    loss.backward()
    w = loop_weights(labels.tolist(), G, weight_mode)
    A = loop_advantage(labels.tolist(), G, w, baseline)  # independent of the library
    expected_grad = -(beta / N) * A[:, None] * mask  # (N, T): -(beta/N) A_k on each completion token
    assert torch.isfinite(lp.grad).all()
    assert torch.allclose(lp.grad, expected_grad.to(lp.grad.dtype), rtol=1e-7, atol=1e-9)
    # ... and the library's own advantage agrees
    ours = on_policy_advantage(labels.double(), G, baseline=baseline, weight_mode=weight_mode)
    assert torch.allclose(ours, A, rtol=1e-9, atol=1e-12)
    # every psi is 0 on-policy, so the loss is (1/N) sum_i w_i log 2
    assert loss.item() == pytest.approx(sum(w) * math.log(2) / N, rel=1e-9)


def test_on_policy_advantage_rloo_matches_paper_formula_by_loops():
    labels = [1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    G = 4
    w = loop_weights(labels, G, "question")  # Eq. 4 by counting, not the library's class_weights
    expected = loop_advantage_rloo(labels, G, w)
    got = on_policy_advantage(torch.tensor(labels), G).double()
    assert torch.allclose(got, expected, atol=1e-7)
    # groups with all-equal labels carry exactly zero advantage
    assert (got[8:] == 0).all()
    # hand-worked, group 0 labels (1,0,0,0): u = w (R - 1/2) = (2 * 1/2, -(2/3)/2 x3) = (1, -1/3, -1/3, -1/3)
    # A_0 = 1 - (-1/3 * 3)/3 = 4/3 ; A_1 = -1/3 - (1 - 1/3 - 1/3)/3 = -1/3 - 1/9 = -4/9
    assert got[0].item() == pytest.approx(4 / 3, rel=1e-6)
    assert got[1].item() == pytest.approx(-4 / 9, rel=1e-6)


@pytest.mark.parametrize("weight_mode", WEIGHT_MODES)
@pytest.mark.parametrize("baseline", BASELINES)
def test_on_policy_loss_matches_full_loss(baseline, weight_mode):
    G, B, T = 4, 4, 5
    N = G * B
    logps, _, mask = random_batch(N, T, seed=11)
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    modes = {"baseline": baseline, "weight_mode": weight_mode}
    lp_full = logps.clone().requires_grad_(True)
    full = pacs_loss(lp_full, logps.clone(), mask, labels, G, beta=0.5, **modes)
    full.backward()
    lp_fast = logps.clone().requires_grad_(True)
    fast = pacs_on_policy_loss(lp_fast, mask, labels, G, beta=0.5, **modes)
    fast.backward()
    assert fast.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(lp_fast.grad, lp_full.grad, rtol=1e-9, atol=1e-12)

    # dropping the zero-advantage groups (all-equal labels: groups 1 and 3) and keeping N for the 1/N
    # leaves the gradient of the kept rows unchanged
    if baseline != "none":
        keep = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
        lp_sub = logps[keep].clone().requires_grad_(True)
        sub = pacs_on_policy_loss(lp_sub, mask[keep], labels[keep], G, beta=0.5, num_rows=N, **modes)
        sub.backward()
        assert torch.allclose(lp_sub.grad, lp_full.grad[keep], rtol=1e-9, atol=1e-12)
        assert (lp_full.grad[4:8] == 0).all() and (lp_full.grad[12:] == 0).all()


def test_on_policy_loss_default_beta_is_the_papers():
    G, T = 4, 5
    logps, _, mask = random_batch(8, T, seed=5)
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1])
    lp_default = logps.clone().requires_grad_(True)
    pacs_on_policy_loss(lp_default, mask, labels, G).backward()
    lp_full = logps.clone().requires_grad_(True)
    pacs_loss(
        lp_full, logps.clone(), mask, labels, G, beta=1.0
    ).backward()  # beta = 1 (paper), said explicitly
    assert torch.allclose(lp_default.grad, lp_full.grad, rtol=1e-9, atol=1e-12)


def test_on_policy_loss_num_rows_must_cover_the_rows_given():
    logps, _, mask = random_batch(4, 3, seed=2)
    labels = torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match="num_rows=2 must be >= the number of rows given"):
        pacs_on_policy_loss(logps, mask, labels, 2, num_rows=2)  # 1/2 would double every row's weight
    empty = torch.zeros(0, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_rows=0"):  # 1/0
        pacs_on_policy_loss(empty, empty, torch.zeros(0), 2, num_rows=0)


# --------------------------------------------------------------------------------------------------
# padding, extremes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reward_form", REWARD_FORMS)
def test_padding_changes_nothing(reward_form):
    G, N, T = 2, 4, 6
    logps, ref, mask = random_batch(N, T, seed=5)
    labels = torch.tensor([1, 0, 1, 1])
    lp1 = logps.clone().requires_grad_(True)
    loss1 = pacs_loss(lp1, ref, mask, labels, G, reward_form=reward_form)
    loss1.backward()
    # garbage (even inf and NaN) on padding positions of both policy and reference
    pad = mask == 0
    logps2, ref2 = logps.clone(), ref.clone()
    logps2[pad] = float("-inf")
    ref2[pad] = float("nan")
    lp2 = logps2.requires_grad_(True)
    loss2 = pacs_loss(lp2, ref2, mask, labels, G, reward_form=reward_form)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-12)
    assert torch.equal(lp2.grad[~pad], lp1.grad[~pad])
    assert (lp2.grad[pad] == 0).all()


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("reward_form", REWARD_FORMS)
def test_extreme_logps_and_long_sequences_stay_finite(baseline, reward_form):
    G, N, T = 4, 8, 4096
    logps = torch.full((N, T), -1e4)
    logps[::2] = -1e-3  # rows that are near-certain vs near-impossible
    ref = torch.zeros(N, T)
    ref[1::2] = -1e4
    mask = torch.ones(N, T)
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0])
    lp = logps.clone().requires_grad_(True)
    loss = pacs_loss(lp, ref, mask, labels, G, beta=10.0, baseline=baseline, reward_form=reward_form)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_grpo_baseline_finite_when_all_scores_equal():
    # on-policy every implicit reward is exactly 0, so the group std is exactly 0
    logps = torch.randn(4, 3, dtype=torch.float64)
    lp = logps.clone().requires_grad_(True)
    loss = pacs_loss(lp, logps.clone(), torch.ones(4, 3), torch.tensor([1, 0, 0, 0]), 4, baseline="grpo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def _ok():
    return torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3), torch.tensor([1, 0, 1, 0])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: dict(a, ref_logps=torch.zeros(4, 2)), "ref_logps shape"),
        (lambda a: dict(a, mask=torch.ones(4, 2)), "mask shape"),
        (lambda a: dict(a, logps=torch.zeros(4)), r"shape \(N, T\)"),
        (lambda a: dict(a, labels=torch.tensor([1, 0, 1])), r"labels must have shape"),
        (lambda a: dict(a, labels=torch.tensor([1, 0, 2, 0])), r"\{0, 1\}"),
        (lambda a: dict(a, labels=torch.tensor([1.0, 0.5, 1.0, 0.0])), r"\{0, 1\}"),
        (lambda a: dict(a, group_size=3), "not a multiple of group_size=3"),
        (lambda a: dict(a, group_size=1), "at least 2"),
        (lambda a: dict(a, baseline="ppo"), "unknown baseline='ppo'"),
        (lambda a: dict(a, weight_mode="class"), "unknown weight_mode"),
        (lambda a: dict(a, reward_form="max"), "unknown reward_form"),
        (lambda a: dict(a, ref_logps=None), "needs ref_logps"),
        (lambda a: dict(a, mask=torch.full((4, 3), 0.5)), "mask must hold 0"),
        (lambda a: dict(a, ref_logps=torch.zeros(4, 2), reward_form="mean_logp"), "ref_logps shape"),
    ],
)
def test_bad_input_raises_clear_errors(mutate, match):
    logps, ref, mask, labels = _ok()
    args = mutate({"logps": logps, "ref_logps": ref, "mask": mask, "labels": labels, "group_size": 2})
    kwargs = {k: args.pop(k) for k in ("baseline", "weight_mode", "reward_form") if k in args}
    with pytest.raises(ValueError, match=match):
        pacs_loss(
            args["logps"], args["ref_logps"], args["mask"], args["labels"], args["group_size"], **kwargs
        )


def test_each_public_function_names_its_bad_mode():
    labels = torch.tensor([1, 0, 1, 0])
    with pytest.raises(ValueError, match="unknown baseline='ppo'"):
        group_centre(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="unknown baseline='ppo'"):
        on_policy_advantage(labels, 2, baseline="ppo")
    with pytest.raises(ValueError, match="unknown weight_mode='class'"):
        class_weights(labels, 2, "class")


def test_scalar_inputs_get_the_shape_error():
    scalar = torch.tensor(1.0)  # 0-dim: no shape[0] to read, so the check must not index it first
    with pytest.raises(ValueError, match=r"logps must have shape \(N, T\)"):
        pacs_loss(scalar, scalar, scalar, scalar, 2)
    with pytest.raises(ValueError, match=r"logps must have shape \(N, T\)"):
        pacs_on_policy_loss(scalar, scalar, scalar, 2)
    for fn in (class_weights, group_outcomes):
        with pytest.raises(ValueError, match="labels must have shape"):
            fn(scalar, 2)


@pytest.mark.parametrize("group_size", [2.0, True])
def test_group_size_must_be_an_int(group_size):
    logps, ref, mask, labels = _ok()
    with pytest.raises(TypeError, match=f"group_size must be an int, got {type(group_size).__name__}"):
        pacs_loss(logps, ref, mask, labels, group_size)


def test_bad_labels_message_lists_the_bad_values():
    logps, ref, mask, _ = _ok()
    with pytest.raises(ValueError, match=r"got \[0\.5, 2\.0\]"):
        pacs_loss(logps, ref, mask, torch.tensor([1.0, 0.5, 2.0, 0.5]), 2)


@pytest.mark.parametrize("weight_mode", WEIGHT_MODES)
def test_class_weights_have_the_labels_float_dtype(weight_mode):
    labels = [1, 0, 0, 0]  # float32 for integer labels, else the labels' own float dtype
    for given, expected in [
        (torch.long, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        assert class_weights(torch.tensor(labels, dtype=given), 4, weight_mode).dtype == expected


def test_numpy_integer_group_size_is_accepted():
    np = pytest.importorskip("numpy")
    logps, ref, mask, labels = _ok()
    assert torch.equal(
        pacs_loss(logps, ref, mask, labels, np.int64(2)), pacs_loss(logps, ref, mask, labels, 2)
    )


# --------------------------------------------------------------------------------------------------
# low-precision input: the token sum is done in fp32
# --------------------------------------------------------------------------------------------------
def bf16_batch():
    """Eight completions of 4096 tokens whose bf16 log-probs under pi_theta and pi_ref differ by about 2 per token
    (as after many updates away from a fixed reference): log-ratio sums of about +-100."""
    g = torch.Generator().manual_seed(7)
    N, T = 8, 4096
    ref = -(torch.rand(N, T, generator=g) * 5).to(torch.bfloat16)  # (N, T)
    logps = -(torch.rand(N, T, generator=g) * 5).to(torch.bfloat16)  # (N, T)
    return logps, ref, torch.ones(N, T)


def test_bf16_log_probs_are_summed_in_fp32():
    logps, ref, mask = bf16_batch()
    exact = (logps.double() - ref.double()).sum(dim=1)  # (N,) the same bf16 values, summed in fp64
    got = implicit_reward(logps, ref, mask)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), exact, rtol=0, atol=1e-3)
    naive = (logps - ref).sum(dim=1)  # differences and sum in bf16: off by up to 0.27 here, 100x our error
    assert (naive.double() - exact).abs().max() > 0.1
    # the reference-free form: a mean of the bf16 log-probs, summed in fp32 too
    exact_mean = logps.double().sum(dim=1) / logps.shape[1]  # (N,)
    got_mean = implicit_reward(logps, None, mask, reward_form="mean_logp")
    assert got_mean.dtype == torch.float32
    assert torch.allclose(got_mean.double(), exact_mean, rtol=0, atol=1e-6)
    naive_mean = logps.sum(dim=1) / logps.shape[1]  # a bf16 sum near -10,000 rounds to a multiple of 64
    assert (naive_mean.double() - exact_mean).abs().max() > 1e-3

    labels = torch.tensor([1, 0, 0, 1, 0, 1, 1, 1])
    lp = logps.clone().requires_grad_(True)
    loss = pacs_loss(lp, ref, mask, labels, 4, beta=0.02)  # psi of a few units: the BCE is not saturated
    loss.backward()
    lp64 = logps.double().requires_grad_(True)
    expected = reference_loss(lp64, ref.double(), mask, labels, 4, 0.02, "rloo", "question", "sum")
    expected.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(lp.grad.double(), lp64.grad, rtol=1e-2, atol=1e-6)  # the gradient rounded to bf16


def test_bf16_on_policy_loss_is_computed_in_fp32():
    logps, _, mask = bf16_batch()
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1])  # class weights 2 and 2/3: not exact in bf16
    lp = logps.clone().requires_grad_(True)
    loss = pacs_on_policy_loss(lp, mask, labels, 4, beta=0.5)
    loss.backward()
    w = loop_weights(labels.tolist(), 4, "question")
    assert loss.item() == pytest.approx(sum(w) * math.log(2) / 8, rel=1e-6)
    A = loop_advantage(labels.tolist(), 4, w, "rloo")
    expected_grad = -(0.5 / 8) * A[:, None] * mask  # (N, T)
    assert torch.allclose(lp.grad.double(), expected_grad, rtol=1e-2, atol=0)

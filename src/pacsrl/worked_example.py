"""``pacsrl objective``: the PACS loss, its pieces and its on-policy gradient on a small worked example.

Useful to see what the objective does before training anything, and as an install check.
"""

from __future__ import annotations

import argparse
from typing import get_args

import torch

from pacsrl.objective import (
    Baseline,
    WeightMode,
    class_weights,
    group_centre,
    implicit_reward,
    on_policy_advantage,
    pacs_loss,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacsrl objective", description=__doc__)
    parser.add_argument("--beta", type=float, default=1.0, help="scale of the implicit reward")
    parser.add_argument("--baseline", default="rloo", choices=get_args(Baseline))
    parser.add_argument("--weight-mode", default="question", choices=get_args(WeightMode))
    args = parser.parse_args(argv)

    # one prompt, G = 4 completions of 3 tokens; the last completion has one padding token
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    ref = torch.tensor([[-0.7, -1.2, -0.3], [-0.9, -0.4, -1.5], [-1.1, -0.8, -0.6], [-0.5, -1.0, 0.0]])
    logps = ref + torch.tensor([[0.3, 0.2, 0.1], [-0.1, 0.0, -0.2], [0.1, -0.1, 0.0], [-0.2, -0.1, 0.0]])
    logps.requires_grad_(True)

    r = implicit_reward(logps, ref, mask, beta=args.beta)
    psi = group_centre(r, 4, args.baseline)
    w = class_weights(labels, 4, args.weight_mode)
    loss = pacs_loss(
        logps, ref, mask, labels, 4, beta=args.beta, baseline=args.baseline, weight_mode=args.weight_mode
    )
    loss.backward()
    adv = on_policy_advantage(labels, 4, baseline=args.baseline, weight_mode=args.weight_mode)

    fmt = lambda t: "[" + ", ".join(f"{v:+.4f}" for v in t.tolist()) + "]"
    print(
        f"PACS on one group of G=4 completions (beta={args.beta}, baseline={args.baseline}, "
        f"weight_mode={args.weight_mode})"
    )
    print(f"  labels R                      {fmt(labels)}")
    print(f"  implicit reward r = beta*sum log(pi/pi_ref)  {fmt(r.detach())}")
    print(f"  centred score psi             {fmt(psi.detach())}")
    print(f"  critic sigma(psi)             {fmt(torch.sigmoid(psi.detach()))}")
    print(f"  class weights w               {fmt(w)}")
    print(f"  loss (1/N) sum w BCE(psi, R)  {loss.item():.6f}")
    print(f"  dL/d log pi, each token       {fmt(logps.grad[:, 0])}")
    print(f"  on-policy advantage A_k       {fmt(adv)}  (gradient at pi = pi_ref is -(beta/N) A_k)")
    return 0

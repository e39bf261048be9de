"""
Stage II with the shaping bonus's expectation and not its variance: the experiment of docs/RESULTS.md
("Why shaping costs turn 1 on the demo"). Turn 1's return is r(y1); turn 2's is (1 + alpha) r(y2); beta1 * KL
on both turns, as in train_stage2.py.

Why: with per-turn credit (gamma = 0), turn 2's log-probs are weighted by r(y2) + alpha (r(y2) - r(y1)). Once y1
is drawn r(y1) is a constant for turn 2, and E[c * grad log pi(y2 | y1)] = 0 for any constant c, so

    E[ (r(y2) + alpha (r(y2) - r(y1))) grad log pi(y2 | y1) ] = E[ (1 + alpha) r(y2) grad log pi(y2 | y1) ]

SCoRe's Stage II and this objective have the same expected gradient; they differ only in variance (the
-alpha r(y1) term, with the leave-one-out baseline over the k samples of a prompt, whose y1 differ, adds noise).
Hypothesis: the bonus is then a weight of 1 + alpha on turn 2's reward against turn 1's; Adam's step, shared
by both turns and normalized by the whole gradient's scale, moves turn 1 by a small fraction of what it would
with alpha = 0; so SCoRe's acc_t1 trails "w/o reward shaping". If so, this objective's acc_t1 should match
SCoRe's (both below alpha = 0's); if its acc_t1 is nearer alpha = 0's, the cost is the variance, not the weight.

    python docs/stage2_weighted.py --base out/demo/seed0/base --init out/demo/seed0/stage1/step_000300 \\
        --out out/shaping/seed0/weighted --seed 0        # the CPU demo's settings, as run.sh's SCoRe row
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import rl  # noqa: E402


def objective(b, args):
    return rl.reinforce(b, args, [(b.r1, args.beta1),                     # r(y1); beta1 * KL on turn 1
                                  ((1 + args.alpha) * b.r2, args.beta1)])  # the bonus without -alpha r(y1)


if __name__ == "__main__":
    rl.run(rl.get_args(stage=2, run="stage2_weighted"), objective, "Stage II weighted")

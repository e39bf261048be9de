"""
The ablation "w/o multi-turn training" (paper Table 4): ordinary single-turn RL on the first attempt,
from the base model, evaluated with two turns like every other row:

    max  E[ r(y1) ]  -  beta1 * KL(pi(.|x) || pi_ref(.|x))

The rollouts hold the first attempt only (args.turns = 1: rl.rollout samples no second one, and the
log has turn 1's columns alone). Turn 2 gets no gradient: it keeps whatever the base does after p1.
Defaults are Stage I's (lr, steps, every first attempt from the policy).

    python train_single_turn.py                 # the CPU demo: out/demo/single_turn
"""
import rl


def objective(b, args):
    return rl.reinforce(b, args, [(b.r1, args.beta1)])  # r(y1); beta1 * KL on turn 1: the only attempt


if __name__ == "__main__":
    args = rl.get_args(stage=1, run="single_turn", unused=("alpha", "beta2", "turns"))
    if args.base_first:
        raise SystemExit("train_single_turn.py: --base-first must be 0 (a first attempt from the base model "
                         "gets no turn-1 terms, and turn 2 is not trained: such rows would teach nothing)")
    args.turns = 1  # rl.rollout: sample the first attempt only
    rl.run(args, objective, "single-turn RL")

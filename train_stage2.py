"""
SCoRe Stage II (paper Eq. 4): multi-turn RL on both attempts, starting from Stage I's policy, with
the reward-shaping bonus that pays for turning a wrong first attempt into a right second one:

    max  E[ r(y1) + r^(y2) ]  -  beta1 * ( KL_turn1 + KL_turn2 ),   r^(y2) = r(y2) + alpha * (r(y2) - r(y1))

Each turn's log-probs are weighted by that turn's own return (gamma = 0). With --kl reward (the
paper's RLOO, the default) each KL enters its turn's return as -beta1 * (log pi(y) - log pi_ref(y)).
With --turns T, each attempt t >= 2 is credited r^(y_t) = r(y_t) + alpha * (r(y_t) - r(y_{t-1})), so a
rollout's returns sum to r(y1) + sum over t >= 2 of r^(y_t).

    python train_stage2.py                      # the CPU demo, from out/demo/stage1/ckpt (python train_stage1.py)
    python train_stage2.py --alpha 0 --init out/demo/base --out out/demo/ablation   # no Stage I, no bonus
"""
import rl


def objective(b, args):
    turns = [(b.r1, args.beta1)]                       # Eq. 4: r(y1); beta1 * KL on turn 1
    for prev, r in zip(b.r, b.r[1:]):                  # turn 2 (and, with --turns T, each later one):
        bonus = args.alpha * (r - prev)                # reward shaping: alpha * (r(y2) - r(y1))
        turns.append((r + bonus, args.beta1))          # Eq. 4: r^(y2) = r(y2) + bonus; beta1 * KL on turn 2
    return rl.reinforce(b, args, turns)


if __name__ == "__main__":
    rl.run(rl.get_args(stage=2), objective, "Stage II")

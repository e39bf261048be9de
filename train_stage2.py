"""
SCoRe Stage II (paper Eq. 4): multi-turn RL on both attempts, starting from Stage I's policy, with
the reward-shaping bonus that pays for turning a wrong first attempt into a right second one:

    max  E[ r(y1) + r^(y2) ]  -  beta1 * ( KL_turn1 + KL_turn2 ),   r^(y2) = r(y2) + alpha * (r(y2) - r(y1))

Each turn's log-probs are weighted by that turn's own reward (gamma = 0).

    python train_stage2.py                      # the CPU demo, from Stage I's checkpoint
    python train_stage2.py --alpha 0 --init out/demo/base --out out/demo/ablation   # no Stage I, no bonus
"""
import rl


def objective(b, args):
    R1 = b.r1                                      # Eq. 4: turn 1 credited with r(y1)
    R2 = b.r2 + args.alpha * (b.r2 - b.r1)         # Eq. 4 + shaping: r(y2) + alpha * (r(y2) - r(y1))
    A1, A2 = rl.baseline(R1, b.group, args), rl.baseline(R2, b.group, args)
    return (-(A1 * b.logp1 + A2 * b.logp2)         # REINFORCE on both attempts
            + args.beta1 * (b.kl1 + b.kl2))        # Eq. 4: beta1 * KL on both turns


if __name__ == "__main__":
    rl.run(rl.get_args(stage=2), objective, "Stage II")

"""
SCoRe Stage I (paper Eq. 3): train the second attempt to be right while holding the first attempt
close to the base model, so that the two attempts decouple and Stage II does not collapse into
"answer once, then repeat it":

    max  E[ r(y2) ]  -  beta2 * KL(pi(.|x) || pi_ref(.|x))  -  beta1 * KL(pi(.|x, y1, p1) || pi_ref(.|x, y1, p1))

The first attempt y1 gets no reward gradient, only the strong pull (beta2) to pi_ref.

    python train_stage1.py                      # the CPU demo
    python train_stage1.py --preset math --base out/math/base
"""
import rl


def objective(b, args):
    A2 = rl.baseline(b.r2, b.group, args)          # turn 2 credited with r(y2) (gamma = 0), minus the baseline
    return (-A2 * b.logp2                          # Eq. 3: REINFORCE on the second attempt only
            + args.beta2 * b.kl1                   # Eq. 3: beta2 * KL on turn 1 (strong)
            + args.beta1 * b.kl2)                  # Eq. 3: beta1 * KL on turn 2


if __name__ == "__main__":
    rl.run(rl.get_args(stage=1), objective, "Stage I")

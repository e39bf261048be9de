"""
SCoRe Stage I (paper Eq. 3): train the second attempt to be right while holding the first attempt
close to the base model, so that the two attempts decouple and Stage II does not collapse into
"answer once, then repeat it":

    max  E[ r(y2) ]  -  beta2 * KL(pi(.|x) || pi_ref(.|x))  -  beta1 * KL(pi(.|x, y1, p1) || pi_ref(.|x, y1, p1))

The first attempt y1 gets no reward, only the strong pull (beta2) to pi_ref. With --kl reward (the
paper's RLOO, the default) each KL enters its turn's return as -beta * (log pi(y) - log pi_ref(y)).
With --turns T, every attempt after the first is trained as y2 is, on its own reward (beta1); y1 is held by beta2.

    python train_base.py && python train_stage1.py   # the CPU demo by hand: out/demo/base, then out/demo/stage1
    python train_stage1.py --preset math --base out/math/base
"""
import rl


def objective(b, args):
    turn1 = (0.0, args.beta2)                       # Eq. 3: no reward on y1; beta2 * KL on turn 1 (strong)
    later = [(r, args.beta1) for r in b.r[1:]]      # Eq. 3: r(y2) (gamma = 0); beta1 * KL on turn 2 (and each later)
    return rl.reinforce(b, args, [turn1] + later)


if __name__ == "__main__":
    rl.run(rl.get_args(stage=1), objective, "Stage I")

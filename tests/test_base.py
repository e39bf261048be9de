"""The demo base's training examples (train_base.example), read back as text and judged by the task's
own oracle: a first answer is trained on only when it is right, and no example ever shows a correction
(a wrong answer followed by a right one: that would be Pair-SFT, not a base)."""
import random

import pytest

import data
import train_base
from reward import pair_sum_equal
from tokenizer import Tokenizer


@pytest.mark.parametrize("change", [0.5, 0.0, 1.0])
def test_base_examples_never_show_a_correction(change):
    tok = Tokenizer.byte_level(data.DEMO_WORDS)
    followup = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
    rng, n = random.Random(0), 600
    kinds = {"one turn": 0, "right, same": 0, "right, changed": 0, "wrong, wrong": 0}
    for p in data.make_demo(n, seed=5):
        ids, mask = train_base.example(tok, p, rng, 0.5, change)
        assert len(mask) == len(ids) - 1
        prompt = tok.render([{"role": "user", "content": p.prompt}])
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt) - 1])  # x is never trained on
        rest = ids[len(prompt):]
        end = rest.index(tok.eot_id) + 1
        y1, trained1 = rest[:end - 1], mask[len(prompt) - 1:len(prompt) - 1 + end]
        right1 = pair_sum_equal(tok.decode(y1), p.meta["numbers"], p.meta["target"])
        assert all(trained1) == right1 and (all(trained1) or not any(trained1))  # a wrong answer is never a target
        if end == len(rest):
            kinds["one turn"] += 1
            continue
        assert rest[end:end + len(followup)] == followup and not any(mask[len(prompt) - 1 + end:][:len(followup)])
        y2 = rest[end + len(followup):]
        assert y2[-1] == tok.eot_id and all(mask[-len(y2):])  # the second answer is trained on
        right2 = pair_sum_equal(tok.decode(y2[:-1]), p.meta["numbers"], p.meta["target"])
        assert right1 or not right2, f"a correction: {tok.decode(y1)!r} then {tok.decode(y2)!r} for {p.prompt!r}"
        kinds["wrong, wrong" if not right1 else "right, same" if y2[:-1] == y1 else "right, changed"] += 1
    # the mix asked for, within about 4 standard errors
    expect = {"one turn": 0.5, "wrong, wrong": 0.0, "right, changed": 0.5 * change, "right, same": 0.5 * (1 - change)}
    for k, f in expect.items():
        assert abs(kinds[k] / n - f) < 4 * (0.25 / n) ** 0.5, (k, kinds[k] / n, f)

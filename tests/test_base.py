"""The demo base's training examples (train_base.example), read back as text and judged by the task's
own oracle: a first answer is trained on only when it is right, and no example ever shows a correction
(a wrong answer followed by a right one: that would be Pair-SFT, not a base)."""
import math
import random

import pytest

import data
import train_base
from reward import pair_sum_equal
from tokenizer import Tokenizer


@pytest.mark.parametrize("change,change_to,numbers", [(0.5, "near", "tokens"), (0.0, "near", "tokens"),
                                                      (1.0, "near", "tokens"), (0.5, "random", "digits")])
def test_base_examples_never_show_a_correction(change, change_to, numbers):
    tok = Tokenizer.byte_level(data.DEMO_WORDS)
    followup = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
    rng, n = random.Random(0), 600
    kinds = {"one turn": 0, "right, same": 0, "right, changed": 0, "wrong, wrong": 0}
    for p in data.make_demo(n, seed=5):
        ids, mask = train_base.example(tok, p, rng, 0.5, change, change_to, numbers)
        assert len(mask) == len(ids) - 1
        prompt = tok.render([{"role": "user", "content": p.prompt}])
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt) - 1])  # x is never trained on
        rest = ids[len(prompt):]
        end = rest.index(tok.eot_id) + 1
        y1, trained1 = rest[:end - 1], mask[len(prompt) - 1:len(prompt) - 1 + end]
        right1 = pair_sum_equal(tok.decode(y1), p.meta["numbers"], p.meta["target"])
        # the answer's numbers as the prompt writes them, one token each, or digit by digit
        assert tok.decode(y1) == (" %s+ %s" if numbers == "tokens" else "%s+%s") % tuple(p.reference.split("+"))
        assert (numbers == "tokens") == all(tok.encode(f" {n}")[0] in y1 for n in p.reference.split("+"))
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


def test_a_near_miss_is_drawn_by_its_distance_to_the_target():
    # sum 16 of 3 5 12 13 14: only 3+13 is right; the eight wrong pairs' distances |a + b - 16| by hand
    p = data.Problem("sum 16: 3 5 12 13 14", "3+13", "demo", {"numbers": [3, 5, 12, 13, 14], "target": 16})
    dist = {(3, 5): 8, (3, 12): 1, (3, 14): 1, (5, 12): 1, (5, 13): 2, (5, 14): 3, (12, 13): 9, (12, 14): 10,
            (13, 14): 11}
    tok = Tokenizer.byte_level(data.DEMO_WORDS)
    followup = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
    counts, rng, n = {}, random.Random(1), 20_000
    for _ in range(n):
        ids, _ = train_base.example(tok, p, rng, two_turn=1.0, change=1.0, change_to="near")
        start = next(i for i in range(len(ids)) if ids[i:i + len(followup)] == followup) + len(followup)
        pair = tuple(map(int, tok.decode(ids[start:-1]).split("+")))
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) <= set(dist)  # never the right pair, never a pair the list does not hold
    z = sum(math.exp(-d) for d in dist.values())
    for pair, d in dist.items():
        f = math.exp(-d) / z
        assert abs(counts.get(pair, 0) / n - f) < 5 * (f * (1 - f) / n) ** 0.5 + 1e-4, (pair, counts.get(pair), f)

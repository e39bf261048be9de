import os
import sys

# tests import the flat top-level scripts (model.py, sample.py, ...) directly
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test file (pytestmark = pytest.mark.usefixtures("one_thread")): tiny models gain
    nothing from threads, and on a busy 2-core machine two OpenMP threads make such tests several times slower;
    restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def recount():
    """count(ckpt, problems, p1, max_new_tokens): what evaluate.py's report should say of a checkpoint, counted
    without evaluate.py: each problem's two greedy attempts generated here, one problem at a time
    (sample.generate_turns, fp32), scored by the task's oracle (data.rewards), tallied by hand."""
    import data
    from model import GPT
    from sample import generate_turns
    from tokenizer import Tokenizer

    def count(ckpt, problems, p1, max_new_tokens):
        tok, model = Tokenizer.from_pretrained(ckpt), GPT.from_pretrained(ckpt, dtype=torch.float32).eval()
        followup = tok.render_followup([{"role": "user", "content": p1}])
        text = lambda y: tok.decode([t for t in y if t not in tok.stop_ids])
        r1, r2 = [], []
        for p in problems:
            x = tok.render([{"role": "user", "content": p.prompt}])
            (y1,), (y2,) = generate_turns(model, [x], followup, max_new_tokens, turns=2, temperature=0.0,
                                          stop_ids=tok.stop_ids, eot_id=tok.eot_id)
            r1 += data.rewards([p], [text(y1)])
            r2 += data.rewards([p], [text(y2)])
        n = len(problems)
        return {"acc_t1": sum(r1) / n, "acc_t2": sum(r2) / n, "delta": (sum(r2) - sum(r1)) / n,
                "delta_i2c": sum(a == 0 and b == 1 for a, b in zip(r1, r2)) / n,
                "delta_c2i": sum(a == 1 and b == 0 for a, b in zip(r1, r2)) / n, "n": n}
    return count

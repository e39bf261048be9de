"""
Batched sampling over a preallocated KV cache, for one turn or several.

    generate(model, prompts, max_new_tokens)                     # one turn
    generate_turns(model, prompts, followup, max_new_tokens)     # SCoRe: y1 ~ pi(.|x), y2 ~ pi(.|x, y1, p1)

How the batch is laid out. Every row shares the cache's slots: slot s of every row is written
at the same step. A row's tokens are right-aligned in each block it prefills (left padding), pad
slots are marked invalid in `valid` (B, S) and masked out, and each row carries its own RoPE
positions, so a row's tokens never see another row's lengths: a row gives the same tokens alone
or in a batch. Decoding feeds one token per live row per step. When a good fraction of rows have
stopped, live rows are swapped to the front of the batch and only that prefix `[:n]` is run, so
stopped rows cost nothing but the occasional swap; their cache stays, for the next turn.

Turns. Tokens that belong to a row's context but are not in the cache yet are the row's
"pending" tokens: the prompt before turn 1; before each later turn, the last sampled token of
the previous attempt (if it was not fed yet), eot_id unless that attempt ended with it (it hit
max_new_tokens, or stopped on another stop token such as <|endoftext|>: `close_turn`), and the followup (the instruction p1, rendered). A turn starts with one
prefill of the pending block at the next free slots, so turn 2 never re-runs x or y1.

Context length. Positions are checked up front: the longest row needs
    max prompt length + turns * max_new_tokens + (turns - 1) * (len(followup) + 1)
positions (the +1 is the possible eot_id); if that exceeds model.config.max_seq_len,
generate_turns raises ValueError naming the numbers. Nothing is truncated silently.

The token layout of a finished rollout, x + y1 + close + followup + y2 + ..., is `layout`'s: the
trainer reads each attempt's span from it, so sampler and trainer cannot disagree on it.

Precision: under torch.autocast the KV cache is allocated in the autocast dtype (bf16), otherwise in
the weights' dtype. With return_logprobs the log-prob of each sampled token under the distribution it was
drawn from, softmax(logits / T) (T = 1 for greedy) renormalized over the nucleus when top_p < 1, is
returned too, in fp32: the trainer uses them for the KL in the reward (it samples with top_p = 1).

This file imports only model.py (and torch), so it can be copied with model.py alone.
"""
import argparse
import hashlib
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from model import GPT, KVCache, compute_dtype, device_error, merge_lora, warn_if_emulated


def seed_of(*key):
    """The seed of one stream of random numbers, named by its key: (the run's --seed, the step, the rank), then
    the purpose and the chunk. A hash, so no two keys share a stream (seeds such as seed and seed + 1 would:
    each step's streams would be the next step's). The CPU's generator keeps 32 bits of it: two of a run's
    streams meet only by chance, about once in 2^32 pairs, never by a pattern."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


def sample_next(logits, temperature=1.0, top_p=1.0, generator=None):
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / T) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    probs = (logits if temperature == 1.0 else logits / temperature).softmax(-1)
    if top_p < 1.0:
        probs, order = nucleus(probs, top_p)
        return order.gather(-1, draw(probs, generator)[:, None]).squeeze(1)
    return draw(probs, generator)


def nucleus(probs, top_p):
    """probs (B, V) sorted in descending order, with the tokens outside the nucleus zeroed, and the order:
    a token is dropped when the mass before it already reaches top_p (the first token always stays)."""
    probs, order = probs.sort(-1, descending=True)
    return probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0), order


def token_logprob(logits, tok, temperature=1.0, top_p=1.0):
    """log p(tok) (B,), in fp32, under the distribution sample_next drew tok from: softmax(logits / T)
    (T = 1 for greedy), renormalized over the nucleus when top_p < 1."""
    lf = logits.float() / (temperature or 1.0)
    lp = lf.gather(1, tok[:, None]).squeeze(1) - lf.logsumexp(-1)
    if top_p < 1.0 and temperature:
        lp = lp - nucleus(lf.softmax(-1), top_p)[0].sum(-1).log()  # minus log of the nucleus's mass
    return lp


def draw(weights, generator=None, block=128):
    """One index per row, drawn with probability proportional to weights (B, V) >= 0; a zero
    weight is never drawn. Inverse CDF from one uniform per row, in two levels: which block of
    `block` entries (fp64 cumulative sum of the block sums), then which entry within it.
    (torch.multinomial draws V exponentials per row: 20x slower on a CPU at V = 32768.)"""
    B, V = weights.shape
    nb = -(-V // block)
    w = (weights if V % block == 0 else F.pad(weights, (0, nb * block - V))).view(B, nb, block)
    sums = w.sum(-1).double()  # (B, nb)
    cdf = sums.cumsum(-1)
    below = lambda x: torch.minimum(x.nextafter(x.new_zeros(())), x)  # largest float < x (rounding guard)
    u = torch.minimum(torch.rand(B, 1, dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:],
                      below(cdf[:, -1:]))
    b = torch.searchsorted(cdf, u, right=True)                      # (B, 1): cdf[b - 1] <= u < cdf[b], so sums[b] > 0
    frac = ((u - cdf.gather(1, b) + sums.gather(1, b)) / sums.gather(1, b)).clamp_(0, 1)  # where u falls in block b
    inner = w[torch.arange(B, device=w.device), b[:, 0]].double().cumsum(-1)  # (B, block)
    j = torch.searchsorted(inner, torch.minimum(frac * inner[:, -1:], below(inner[:, -1:])), right=True)
    return (b * block + j).squeeze(1)


def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(), seed=None):
    """New tokens of each prompt (a list of token lists), each ending with its stop token if one
    was produced, nothing after it. prompts: token-id lists of any lengths. seed: an int or a
    torch.Generator on the model's device; the same seed gives the same tokens."""
    return generate_turns(model, prompts, [], max_new_tokens, turns=1, temperature=temperature,
                          top_p=top_p, stop_ids=stop_ids, seed=seed)[0]


def close_turn(attempt, eot_id):
    """What closes an attempt in the chat format before the next user turn: the end-of-turn token,
    unless the attempt already ends with it. An attempt cut at max_new_tokens, or stopped by another
    stop token (<|endoftext|> in ChatML), gets it too."""
    return [] if eot_id is None or (attempt and attempt[-1] == eot_id) else [eot_id]


def layout(prompt, attempts, followup, eot_id):
    """The whole token sequence of one rollout, prompt + y1 + close + followup + y2 + ..., as the
    sampler feeds it, and the (start, end) span of each attempt in it."""
    seq, spans = list(prompt), []
    for t, y in enumerate(attempts):
        if t:
            seq += close_turn(attempts[t - 1], eot_id) + list(followup)
        spans.append((len(seq), len(seq) + len(y)))
        seq += y
    return seq, spans


def _prefix(cache, n):
    """The first n rows of the cache, as views: the model's in-place writes land in `cache`."""
    return SimpleNamespace(k=[k[:n] for k in cache.k], v=[v[:n] for v in cache.v])


@torch.inference_mode()
def generate_turns(model, prompts, followup, max_new_tokens, turns=2, k=1, temperature=1.0, top_p=1.0,
                   stop_ids=(), eot_id=None, seed=None, first=None, return_logprobs=False):
    """Attempts of `turns` turns: a list over turns of lists over rows of new token lists.

    prompts: P token lists (chat(x) rendered, ending where the assistant speaks).
    followup: token list appended after each attempt before the next one (p1 rendered: it closes
      the attempt's turn and opens the next assistant turn).
    k: samples per prompt, sharing one prefill. Rows are prompt-major: row p * k + j is sample j of prompt p.
    stop_ids: a row's attempt ends at its first stop token (kept in the returned tokens).
    eot_id: the chat format's end of turn, appended to the context (not to the returned tokens) after
      an attempt that does not end with it (close_turn), so the next turn's context is well formed.
    first: None, or one entry per row: None (sample turn 1) or a token list, used as that row's
      first attempt instead of sampling (teacher-forced into the cache; paper 5.3).
    seed: None (torch's global generator), an int, or a torch.Generator on the model's device.
    return_logprobs: also return, in the same nesting, each returned token's log-prob under the distribution
      it was drawn from (token_logprob; fp32 floats; None for a given first attempt): returns (attempts,
      logprobs).
    """
    cfg = model.config
    W = model.head_weight
    device = W.device
    dtype = compute_dtype(W)
    P, B, Fl = len(prompts), len(prompts) * k, len(followup)
    if P == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_turns: every prompt needs at least one token")
    if turns > 1 and Fl == 0:
        raise ValueError("generate_turns: turns > 1 needs a non-empty followup")
    if first is not None and len(first) != B:
        raise ValueError(f"generate_turns: first has {len(first)} entries for {B} rows (len(prompts) * k)")
    given = [f is not None for f in first] if first is not None else [False] * B
    # ---- context check: the positions the longest row can need
    Lp = max(len(p) for p in prompts)
    t1 = max([max_new_tokens] + [len(f) for f, g in zip(first or [], given) if g])
    need = Lp + t1 + (turns - 1) * (max_new_tokens + Fl + 1)
    if need > cfg.max_seq_len:
        raise ValueError(f"generate_turns: prompt length {Lp} + {turns} turn(s) of {max_new_tokens} new tokens "
                         f"+ {turns - 1} followup(s) of {Fl} (+1 eot) tokens = {need} positions "
                         f"> model.config.max_seq_len = {cfg.max_seq_len}")
    if isinstance(seed, int):
        seed = torch.Generator(device).manual_seed(seed)
    stop_t = torch.tensor(sorted(set(stop_ids)), device=device, dtype=torch.long)
    S = Lp + max_new_tokens + (turns - 1) * (max_new_tokens + Fl + 2) + (t1 if any(given) else 0)

    # ---- state, one entry per batch row; `order` maps a batch row to its output row
    # rows that sample turn 1 come first, rows with a given first attempt last (they never decode in turn 1)
    order = torch.tensor([r for r in range(B) if not given[r]] + [r for r in range(B) if given[r]], device=device)
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # slot holds a real token of this row
    pos = torch.zeros(B, dtype=torch.long, device=device)       # next RoPE position of each row
    outs = [[None] * B for _ in range(turns)]
    lps = [[None] * B for _ in range(turns)]

    # ---- turn 1 prefill: the P prompts once, then each prompt's cache repeated for its k rows
    cache = KVCache(cfg, P, S, device=device, dtype=dtype)
    logits = _prefill(model, cache, [list(p) for p in prompts], 0, valid[:P], pos[:P])
    rows = order // k  # the prompt of each batch row
    cache.select(rows)
    logits, valid, pos = logits[rows], valid[rows], pos[rows]
    slot = Lp

    for t in range(turns):
        if t == 0:
            n = B - sum(given)  # rows that decode this turn
            logits = logits[:n]
        else:
            # prefill each row's pending tokens, then every row decodes
            n = B
            logits = _prefill(model, cache, pending, slot, valid, pos)
            slot += max(len(p) for p in pending)
        gen, lp, length, owed, slot = _decode(model, cache, logits, n, slot, max_new_tokens, valid, pos, order,
                                              temperature, top_p, stop_t, seed, return_logprobs)
        # collect this turn's attempts, in batch order, and what each row still owes the cache
        gen, lp, length, order_l = gen.tolist(), lp.tolist(), length.tolist(), order.tolist()
        pending = []
        for i in range(B):
            r = order_l[i]
            if i < n:
                y = gen[i][:length[i]]
                lps[t][order_l[i]] = lp[i][:length[i]]
                owe = [y[-1]] if owed[i] else []
            else:  # a given first attempt: all of it goes into the cache
                y = list(first[r])
                owe = list(y)
            outs[t][r] = y
            pending.append(owe + close_turn(y, eot_id) + list(followup))
    return (outs, lps) if return_logprobs else outs


def _prefill(model, cache, seqs, slot, valid, pos):
    """Write each row's tokens `seqs` right-aligned into slots [slot, slot + T) (T the longest),
    mark them valid, advance `pos`, and return the logits (B, V) after each row's last token."""
    B, T = len(seqs), max(len(s) for s in seqs)
    dev = valid.device
    lens = torch.tensor([len(s) for s in seqs], device=dev)
    ids = torch.tensor([[0] * (T - len(s)) + list(s) for s in seqs], device=dev)  # (B, T), left-padded
    ar = torch.arange(T, device=dev)
    real = ar >= (T - lens)[:, None]                                             # (B, T)
    p = (pos[:, None] + ar - (T - lens)[:, None]).clamp(min=0)                   # (B, T) positions
    valid[:, slot:slot + T] = real
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mask = valid[:, None, None, :slot + T].repeat(1, 1, T, 1)                    # (B, 1, T, slot + T)
    mask[..., slot:] &= causal
    mask[..., slot:] |= torch.eye(T, dtype=torch.bool, device=dev)  # a pad query sees its own slot (no NaN)
    h = model.hidden(ids, p, _prefix(cache, B), slot, mask)
    pos += lens
    return F.linear(h[:, -1], model.head_weight)


def _decode(model, cache, logits, n, slot, max_new_tokens, valid, pos, order, temperature, top_p, stop_t, gen_rng,
            want_lp=False):
    """Sample up to max_new_tokens for batch rows [0, n), starting from `logits` (n, V).
    Feeds each sampled token of a live row back at the next slot; when a quarter of the rows
    being run have stopped, live rows are swapped to the front and only those are run.
    Returns gen (n, max_new_tokens), their log-probs (n, max_new_tokens) (zeros unless want_lp), length (n,), owed (list: the row's last token is not in
    the cache yet) and the next free slot. Permutes the rows of cache, valid, pos and order in place."""
    dev, W = valid.device, model.head_weight
    gen = torch.zeros(n, max_new_tokens, dtype=torch.long, device=dev)
    lp = torch.zeros(n, max_new_tokens, dtype=torch.float32, device=dev)
    length = torch.zeros(n, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    owed = torch.zeros(n, dtype=torch.bool, device=dev)
    m = n  # rows [0, m) are run; rows [m, n) have stopped
    view = _prefix(cache, m)
    for step in range(max_new_tokens if n else 0):
        live = ~done[:m]                                        # rows that get a new token this step
        tok = sample_next(logits, temperature, top_p, gen_rng)  # (m,)
        gen[:m, step] = tok
        if want_lp:
            lp[:m, step] = token_logprob(logits, tok, temperature, top_p)
        length[:m] += live
        owed[:m] |= live
        if len(stop_t):
            done[:m] |= live & torch.isin(tok, stop_t)
        if step == max_new_tokens - 1:
            break
        n_live = int(m - done[:m].sum())
        if n_live == 0:
            break
        if n_live <= m * 3 // 4:  # compact; a row that just stopped keeps owing its stop token
            perm = _live_first(done[:m])
            for buf in cache.k + cache.v:
                _permute_rows(buf, perm, slot)
            for x in (gen, lp, length, done, owed, valid, pos, order):
                x[:m] = x[perm]
            m = n_live
            tok, live, view = tok[perm][:m], live[perm][:m], _prefix(cache, m)
        # feed the new tokens (a row that just stopped feeds its stop token, for the next turn)
        valid[:m, slot] = live
        h = model.hidden(tok[:, None], pos[:m, None], view, slot, valid[:m, None, None, :slot + 1])
        pos[:m] += live
        owed[:m] &= ~live
        slot += 1
        logits = F.linear(h[:, -1], W)
    return gen, lp, length, owed.tolist(), slot


def _live_first(done):
    """A permutation of rows (a swap of the fewest rows) that puts the live rows first."""
    m = len(done)
    n_live = int((~done).sum())
    a = done[:n_live].nonzero().squeeze(1)                # stopped rows in the front part
    b = (~done[n_live:]).nonzero().squeeze(1) + n_live    # live rows in the back part
    perm = torch.arange(m, device=done.device)
    perm[a], perm[b] = b, a
    return perm


def _permute_rows(buf, perm, upto):
    """buf[:m, :, :upto] = buf[perm, :, :upto] for a perm that swaps few rows: copy only those."""
    moved = (perm != torch.arange(len(perm), device=perm.device)).nonzero().squeeze(1)
    if len(moved):
        buf[moved, :, :upto] = buf[perm[moved], :, :upto]


# ------------------------------------------------------------------------------------ CLI
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as every script of the project shows it: the docstring's layout kept, each flag's default shown
    once, where its help does not already state one."""
    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, argparse.SUPPRESS) or action.option_strings == ["-h", "--help"]:
            return h
        return h + " (default: %(default)s)"


def max_new_that_fits(max_seq_len, prompt_len, followup_len, turns):
    """The largest max_new_tokens with which generate_turns fits a prompt of prompt_len tokens into
    max_seq_len positions (the count in this file's docstring, solved for max_new_tokens; < 1: none)."""
    return (max_seq_len - prompt_len - (turns - 1) * (followup_len + 1)) // turns


def is_checkpoint(path):
    """Whether path holds a checkpoint as model.py writes it: config.json and model.pt, or a LoRA run's
    config.json, lora.json and adapters.pt."""
    has = lambda *fs: all(os.path.isfile(os.path.join(path, f)) for f in fs)
    return has("config.json", "model.pt") or has("config.json", "lora.json", "adapters.pt")


def main(argv=None):
    p = argparse.ArgumentParser(description="Watch a model's attempts: y1 from chat(x), then y2 after the instruction p1.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (convert.py or a training script)")
    p.add_argument("--prompt", required=True, help="the problem x, as the user's message")
    p.add_argument("--turns", type=int, default=2, help="attempts (1: no self-correction turn)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (evaluation); the paper trains at 1.0")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: draw from the smallest set of tokens whose probability reaches P (1: all)")
    p.add_argument("--max-new-tokens", type=int,
                   help="per turn (default: the checkpoint's, from its task.json; else 512, or less to fit the context)")
    p.add_argument("--p1", help="the self-correction instruction (default: the one the checkpoint was trained "
                                "with, from its task.json; else the paper's math p1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="compute precision (default: bf16 on cuda, fp32 on the cpu)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling (temperature above 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    error = lambda msg: p.exit(2, f"{p.prog}: error: {msg}\n")  # one line, without the usage
    import data  # lazily: sample.py itself needs only model.py
    from tokenizer import Tokenizer

    if args.turns < 1:
        error("--turns must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        error("--max-new-tokens must be at least 1")
    if not 0.0 <= args.temperature < float("inf"):  # also false for nan
        error(f"--temperature must be 0 (greedy) or positive (got {args.temperature})")
    if not 0.0 < args.top_p <= 1.0:
        error(f"--top-p is a fraction in (0, 1] (got {args.top_p})")
    if device_error(args.device):
        error(device_error(args.device))
    if not is_checkpoint(args.ckpt):
        error(f"--ckpt {args.ckpt}: not a checkpoint (no config.json and model.pt, or LoRA adapters, there)")
    try:
        info = data.task_info(args.ckpt)
        tok = Tokenizer.from_pretrained(args.ckpt)
        model = merge_lora(GPT.from_pretrained(args.ckpt, device=args.device, dtype=torch.float32)).eval()  # fp32 weights
    except (OSError, ValueError) as e:
        error(f"--ckpt {args.ckpt}: {e}")
    p1 = args.p1 or info.get("p1") or data.instruction("math")
    dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    warn_if_emulated(dtype, args.device)
    ctx = tok.render([{"role": "user", "content": args.prompt}])
    # the followup closes an attempt and opens the next assistant turn; it does not depend on the attempt
    followup = tok.render_followup([{"role": "user", "content": p1}])
    fits = max_new_that_fits(model.config.max_seq_len, len(ctx), len(followup), args.turns)
    if fits < 1:
        error(f"the prompt ({len(ctx)} tokens) and {args.turns - 1} p1 turn(s) of {len(followup)} tokens leave "
              f"no room in the model's context of {model.config.max_seq_len} positions")
    max_new = args.max_new_tokens or info.get("max_new_tokens") or min(512, fits)
    if max_new > fits:
        error(f"{args.turns} turn(s) of {max_new} new tokens do not fit the model's context of "
              f"{model.config.max_seq_len} positions with this prompt ({len(ctx)} tokens): "
              f"use --max-new-tokens {fits} or less")
    try:
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            outs = generate_turns(model, [ctx], followup, max_new, turns=args.turns,
                                  temperature=args.temperature, top_p=args.top_p, stop_ids=tok.stop_ids,
                                  eot_id=tok.eot_id, seed=args.seed)
    except ValueError as e:  # e.g. an empty prompt: say so without a traceback
        raise SystemExit(f"sample.py: {e}")
    for t, rows in enumerate(outs):
        y = rows[0]
        stopped = bool(y) and y[-1] in tok.stop_ids
        print(f"===== attempt {t + 1} ({len(y)} tokens, {'stopped' if stopped else 'hit --max-new-tokens'}) =====")
        print(tok.decode(y[:-1] if stopped else y))
        if t + 1 < len(outs):
            print(f"===== instruction =====\n{p1}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("sample.py: stopped by Ctrl-C (SIGINT)") from None

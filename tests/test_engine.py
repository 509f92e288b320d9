"""The inference engine: cached decoding, continuous batching, sampling, MTP speculation, text."""

import collections
import re
from dataclasses import replace

import pytest
import torch

from nanoseek.config import model_size
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer import greedy
from nanoseek.infer.engine import ADMIT_SHARE, PREFILL_TOKENS, Engine, EngineBusy, EngineError
from nanoseek.infer.runner import ROWS_PER_GROUP, DecodeRunner, ModuleRunner
from nanoseek.infer.sampling import SamplingError, SamplingParams, accept_draft, draw, filtered_probs
from nanoseek.infer.text import TextStream
from nanoseek.model import Transformer

TEXT = ["Question: 12 + 30 = ?\n<think>\n12 + 30 = 42\n</think>\nAnswer: 42",
        "To be, or not to be, that is the question. Café, naïve, 東京, 🙂 done."] * 40


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=400)


def model_for(seed=0, **changes) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(model_size("tiny").replace(vocab_size=400, **changes))
    with torch.no_grad():  # sharper distributions than the init's, and routing biases in play
        m.lm_head.weight.mul_(20)
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.eval()


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("changes", [{}, dict(q_lora_rank=None, n_routed_experts=None),
                                     dict(n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=0),
                                     dict(rope_scaling={"type": "yarn", "factor": 2.0,
                                                        "original_max_position_embeddings": 128})])
def test_cached_decoding_matches_a_full_forward(changes):
    """Rows of different lengths, prefilled one by one, then decoded together (1 and 2 tokens
    a step, as speculation does): every logit equals the full forward over the whole sequence."""
    model = model_for(**changes)
    seqs = [torch.randint(0, 400, (n,)).tolist() for n in [5, 17, 11]]
    assert_decoding_matches_full_forward(model, seqs, 64, (1, 2, 1, 2), torch.Generator().manual_seed(0))


def assert_decoding_matches_full_forward(model, seqs, context, steps, gen):
    """Prefill each of `seqs` into its own cache row, then decode all rows together, `steps`
    tokens at a time: every logit equals the model's full forward over the whole sequence."""
    runner = DecodeRunner(model)
    cache = model.new_cache(len(seqs), context, mtp=False)
    with torch.no_grad():
        for row, s in enumerate(seqs):
            cache.start = row
            model(torch.tensor([s]), torch.arange(len(s))[None], cache)
        cache.start = 0
        for step_tokens in steps:
            new = torch.randint(0, 400, (len(seqs), step_tokens), generator=gen)
            pos = torch.tensor([[len(s) + i for i in range(step_tokens)] for s in seqs])
            got = model.lm_head(runner.hidden(new, pos, cache))
            for row, s in enumerate(seqs):
                s += new[row].tolist()
                full = model(torch.tensor([s]))[0, -step_tokens:]
                assert (got[row] - full).abs().max().item() <= 1e-4


def test_rows_read_in_groups_see_their_whole_context():
    """More rows than one attention group, in no order of length: each group reads up to its own
    longest row, and every row's logits still equal the full forward's."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 60, (ROWS_PER_GROUP + 9,), generator=gen).tolist()
    seqs = [torch.randint(0, 400, (n,), generator=gen).tolist() for n in lengths]
    assert_decoding_matches_full_forward(model_for(), seqs, 128, (1, 2), gen)


def test_rows_kept_in_order_of_length_change_nothing(tok, monkeypatch):
    """Enough rows for several attention groups, answers of many lengths ending at different
    steps: the engine reorders its rows (and their cache) and the greedy outputs stay those
    of each prompt decoded alone."""
    model = model_for()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist()
               for n in torch.randint(2, 30, (3 * ROWS_PER_GROUP,), generator=gen).tolist()]
    budgets = torch.randint(2, 40, (len(prompts),), generator=gen).tolist()
    engine = Engine(model, tok, max_seqs=2 * ROWS_PER_GROUP)
    reorders, sort = [], engine._sort_rows

    def watched_sort():
        before = engine.running
        sort()
        reorders.append(engine.running is not before)
    monkeypatch.setattr(engine, "_sort_rows", watched_sort)
    reqs = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(prompts, budgets)]
    engine.run()
    assert any(reorders)
    assert [r.outputs[0].token_ids for r in reqs] == [greedy(model, p, n) for p, n in zip(prompts, budgets)]


def test_continuous_batching_changes_nothing(tok):
    """Greedy outputs alone == among others joining and leaving (2 rows for 5 requests)."""
    model = model_for()
    prompts = [tok.encode(t) for t in ["To be", "Question: 12", "Café", "Answer: 4", "that is the"]]
    alone = [greedy(model, p, 6 + 3 * i) for i, p in enumerate(prompts)]
    engine = Engine(model, tok, max_seqs=2)
    reqs = []
    for i, p in enumerate(prompts):
        reqs.append(engine.submit(p, SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True)))
        engine.step()  # requests arrive while others run
    engine.run()
    assert [r.outputs[0].token_ids for r in reqs] == alone
    assert not engine.running and engine.cache.start == 0


def test_greedy_and_sampled_requests_share_a_batch(tok):
    """One generate() with parameters per prompt: each request's outputs are those it gets alone."""
    model = model_for()
    prompts = [tok.encode(t) for t in ["To be", "Question: 12", "Café"]]
    greedy_p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    sampled_p = SamplingParams(max_tokens=8, temperature=0.8, n=2, seed=3, ignore_eos=True)
    together = Engine(model, tok, max_seqs=8).generate(prompts * 2, [greedy_p] * 3 + [sampled_p] * 3)
    alone = [Engine(model, tok, max_seqs=2).generate([p], params)[0]
             for params, p in [(greedy_p, p) for p in prompts] + [(sampled_p, p) for p in prompts]]
    assert [[c.token_ids for c in r.outputs] for r in together] == [[c.token_ids for c in r.outputs] for r in alone]
    with pytest.raises(EngineError, match="2 sampling parameters for 3 prompts"):
        Engine(model, tok).generate(prompts, [greedy_p] * 2)


def test_a_busy_engine_prefills_waiting_prompts_together(tok):
    """With a queue, rows are refilled a few prompts at a time (ADMIT_SHARE of the rows), each
    batch in one forward; the outputs stay those of each prompt alone."""
    model = model_for()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 400, (n,), generator=gen).tolist()
               for n in torch.randint(2, 20, (150,), generator=gen).tolist()]
    budgets = torch.randint(2, 30, (len(prompts),), generator=gen).tolist()
    engine = Engine(model, tok, max_seqs=64)
    batches = []
    forward = model.hidden_states
    model.hidden_states = lambda ids, *a, **k: (batches.append(ids.shape[0]), forward(ids, *a, **k))[1]
    try:
        reqs = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in budgets])
    finally:
        del model.hidden_states
    least = int(64 * ADMIT_SHARE)
    assert sum(batches) == len(prompts) and min(batches[1:-1]) >= least >= 2
    assert batches[0] == 64  # the first rows' prompts: 64 x at most 20 positions, within PREFILL_TOKENS
    assert [r.outputs[0].token_ids for r in reqs] == [greedy(model, p, n) for p, n in zip(prompts, budgets)]


def test_long_prompts_are_prefilled_a_few_at_a_time(tok):
    """Prompts admitted together are prefilled in runs of at most PREFILL_TOKENS padded positions,
    so a wide engine's prefill memory does not grow with its rows."""
    P = PREFILL_TOKENS // 3 + 1  # two fit in a run, three do not
    model = model_for(max_position_embeddings=P + 8)
    prompts = [[5 + i] * P for i in range(5)]
    batches = []
    forward = model.hidden_states
    model.hidden_states = lambda ids, *a, **k: (batches.append(tuple(ids.shape)), forward(ids, *a, **k))[1]
    try:
        Engine(model, tok, max_seqs=8, context=P + 4).generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    finally:
        del model.hidden_states
    assert batches == [(2, P), (2, P), (1, P)]


def test_n_samples_share_one_prefill(tok):
    model = model_for()
    prompt = tok.encode("Question: 12")
    engine = Engine(model, tok, max_seqs=4)
    calls = collections.Counter()
    forward = model.hidden_states
    model.hidden_states = lambda *a, **k: (calls.update([a[0].shape[1]]), forward(*a, **k))[1]
    try:
        r = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, n=3, ignore_eos=True))[0]
    finally:
        del model.hidden_states
    assert calls == {len(prompt): 1}  # one prefill for three samples
    assert all(c.token_ids == greedy(model, prompt, 8) for c in r.outputs)


@pytest.fixture(scope="module")
def trained(tok):
    """The tiny model after a few hundred steps on TEXT: its MTP module drafts well."""
    torch.manual_seed(0)
    model = Transformer(model_size("tiny").replace(vocab_size=400))
    ids = torch.tensor(tok.encode("\n".join(TEXT)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s: s + 65] for s in starts])
        model.loss(batch[:, :-1], batch[:, 1:])["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_an_mha_model_decodes_through_its_own_modules(tok):
    """The ablations' multi-head-attention model (GQA with a KV head per head): the engine
    decodes it through ModuleRunner, plain and with MTP drafts, to the same tokens as argmax
    over full forwards of the whole sequence."""
    model = model_for(seed=2, attn_type="gqa", num_key_value_heads=model_size("tiny").num_attention_heads)
    prompts = [tok.encode(t) for t in ["To be", "Question: 12 + 30", "Café"]]
    expected = []
    with torch.no_grad():
        for p in prompts:
            s = list(p)
            for _ in range(GREEDY.max_tokens):
                s.append(int(model(torch.tensor([s]))[0, -1].argmax()))
            expected.append(s[len(p):])
    for speculative in (False, True):
        engine = Engine(model, tok, max_seqs=2, speculative=speculative)
        assert isinstance(engine.runner, ModuleRunner)
        assert [r.outputs[0].token_ids for r in engine.generate(prompts, GREEDY)] == expected
    assert engine.stats["drafted"] > 0


@pytest.mark.parametrize("which", ["random", "trained"])
def test_mtp_speculation_is_exact_for_greedy(tok, trained, which):
    model = trained if which == "trained" else model_for(seed=1)
    prompts = [tok.encode(t) for t in ["To be", "Question: 12 + 30", "Café"]]
    plain_engine = Engine(model, tok, max_seqs=2)
    plain = plain_engine.generate(prompts, GREEDY)
    for drafts in (1, 3):  # one draft a step, and the MTP module applied to its own output
        spec = Engine(model, tok, max_seqs=2, speculative=True, drafts=drafts)
        fast = spec.generate(prompts, GREEDY)
        assert [r.outputs[0].token_ids for r in fast] == [r.outputs[0].token_ids for r in plain]
        st = spec.stats
        assert 0 < st["drafted"] and 0 <= st["accepted"] <= st["drafted"]
        if which == "trained":  # kept drafts are exercised, and save steps
            assert st["accepted"] / st["drafted"] > 0.5
            assert st["steps"] < (0.8 if drafts == 1 else 0.6) * plain_engine.stats["steps"]


def test_mtp_speculation_with_samples_admitted_together(tok, trained):
    """Several requests of n samples each, prefilled together (each sample's main and MTP cache
    rows copied from its prompt's): speculation still gives plain decoding's greedy tokens."""
    prompts = [tok.encode(t) for t in ["To be", "Question: 12 + 30", "Café"]]
    params = SamplingParams(max_tokens=24, temperature=0, n=2, ignore_eos=True)
    plain = Engine(trained, tok, max_seqs=6).generate(prompts, params)
    fast = Engine(trained, tok, max_seqs=6, speculative=True).generate(prompts, params)
    assert [[c.token_ids for c in r.outputs] for r in fast] == [[c.token_ids for c in r.outputs] for r in plain]


def test_speculative_sampling_keeps_the_target_distribution():
    torch.manual_seed(0)
    V, N = 6, 40000
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15, 0.0]).expand(N, V)
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1]).expand(N, V)
    gens = [torch.Generator().manual_seed(i) for i in range(N)]
    draft = draw(q, gens)
    accepted, token = accept_draft(p, q, draft, gens)
    freq = torch.bincount(token, minlength=V).float() / N
    assert (freq - p[0]).abs().max() < 0.01
    assert freq[5] == 0  # never a token the target gives probability 0
    expected_accept = torch.minimum(p[0], q[0]).sum()  # sum_x min(p, q)
    assert abs(accepted.float().mean() - expected_accept) < 0.01


def test_a_chain_of_drafts_keeps_the_target_distribution():
    """Drafts d1, d2 drawn from q1, q2 and verified against p1, p2 (then p3 for the bonus):
    the first token out is distributed as p1, and, once d1 is kept, the second as p2."""
    from nanoseek.infer.engine import Request as Req
    from nanoseek.infer.engine import _Seq

    torch.manual_seed(0)
    V, B, k = 5, 40_000, 2
    p_logits = torch.randn(k + 1, V) * 1.5
    q = torch.randn(k, V).mul(1.5).softmax(-1)
    engine = Engine(model_for(), max_seqs=1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    drafts = torch.stack([torch.multinomial(q[j], B, replacement=True, generator=gen) for j in range(k)], 1)
    seqs = [_Seq(Req([1], params), 0, [1], torch.Generator().manual_seed(i), None,
                 drafts[i].tolist(), [q[0], q[1]]) for i in range(B)]
    kept, last = engine._verify_sampled(p_logits[None].expand(B, -1, -1), drafts, seqs)
    first = torch.where(kept > 0, drafts[:, 0], last)
    second = torch.where(kept > 1, drafts[:, 1], last)[kept > 0]
    p = p_logits.softmax(-1)
    assert (torch.bincount(first, minlength=V) / B - p[0]).abs().max() < 0.015
    assert (torch.bincount(second, minlength=V) / len(second) - p[1]).abs().max() < 0.02


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])).expand(3, 5)
    t = torch.tensor([1.0, 1.0, 0.0])
    probs = filtered_probs(logits, t, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.8, 1.0]))
    allowed = [{0, 1}, {0, 1, 2}, {0}]  # top-2; top-p 0.8 (0.5 + 0.2 < 0.8 <= 0.85); greedy
    for row, ok in enumerate(allowed):
        assert {i for i in range(5) if probs[row, i] > 0} == ok
    assert torch.allclose(probs[0, :2], torch.tensor([0.5, 0.2]) / 0.7)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    seen = [set() for _ in range(3)]
    for _ in range(2000):
        for row, token in enumerate(draw(probs, gens).tolist()):
            seen[row].add(token)
    assert seen == allowed


def test_a_rows_distribution_does_not_depend_on_the_rows_beside_it():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    t, k, p = torch.tensor([0.7, 1.0, 0.0, 0.7]), torch.tensor([0, 5, 0, 0]), torch.tensor([1.0, 1.0, 1.0, 0.9])
    together = filtered_probs(logits, t, k, p)
    for row in range(4):
        alone = filtered_probs(logits[row:row + 1], t[row:row + 1], k[row:row + 1], p[row:row + 1])
        assert torch.equal(together[row], alone[0]), row
    assert torch.allclose(together[0], (logits[0] / 0.7).softmax(-1))  # no cut: the plain distribution
    assert together[2].tolist() == torch.nn.functional.one_hot(logits[2].argmax(), 50).float().tolist()
    assert (together[1] > 0).sum() == 5 and 0 < (together[3] > 0).sum() < 50


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(tok):
    model = model_for()
    prompt = tok.encode("To be")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    alone = Engine(model, tok).generate([prompt], params)[0].outputs[0].token_ids
    crowd = Engine(model, tok).generate([tok.encode("Café"), prompt, tok.encode("Answer")], params)
    assert crowd[1].outputs[0].token_ids == alone
    other = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=16, seed=8, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone
    spec = Engine(model, tok, speculative=True)
    again = spec.generate([prompt, prompt], params)  # sampled speculation runs and is seeded too
    assert again[0].outputs[0].token_ids == again[1].outputs[0].token_ids


def test_logprobs_are_the_models_own(tok):
    model = model_for()
    prompt = tok.encode("Question: 12")
    out = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=10, seed=1, logprobs=True,
                                                               ignore_eos=True))[0].outputs[0]
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        lp = model(seq)[0, len(prompt) - 1: -1].log_softmax(-1)
    want = lp.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(out.logprobs), want, atol=1e-4)


def test_stop_strings_end_the_output_before_them(tok):
    model = model_for()
    prompt = tok.encode("To be")
    full = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    text = full[0].outputs[0].text
    assert len(text) > 12
    stop = text[6:9]
    cut = text[: text.index(stop)]
    engine = Engine(model, tok)
    chunks = list(engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop], ignore_eos=True)))
    assert "".join(chunks) == cut
    r = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, stop=["zzz", stop], ignore_eos=True))
    assert r[0].outputs[0].text == cut and r[0].outputs[0].finish_reason == "stop"


def test_streaming_never_breaks_a_character(tok):
    text = "Ωμέγα, Привет, 🚀 ok. " * 3  # unseen in training: single bytes, split characters
    ids = tok.encode(text)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 10
    stream = TextStream(tok, stop=["never"])
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text
    s = TextStream(tok, stop=["Привет"])
    out = "".join(s.push(i) for i in ids) + s.flush()
    assert out == "Ωμέγα, " and s.stopped


def test_cache_holds_only_the_latent():
    model = model_for()
    cfg = model.config
    T = 40
    engine = Engine(model, max_seqs=1, context=T)
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert sum(b.numel() for b in engine.cache.layers) == T * per_token
    spec = Engine(model, max_seqs=1, context=T, speculative=True)  # plus the MTP block's own layer
    assert sum(b.numel() for b in spec.cache.layers) == T * (per_token + cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_limits_are_clear_refusals(tok):
    model = model_for()
    engine = Engine(model, tok, max_seqs=2, context=32, max_waiting=1)
    with pytest.raises(EngineError, match="context window is 32"):
        engine.submit(list(range(40)))
    with pytest.raises(EngineError, match="n=3 exceeds"):
        engine.submit([1, 2], SamplingParams(n=3))
    with pytest.raises(EngineError, match="drafts must be at least 1"):
        Engine(model, tok, speculative=True, drafts=0)
    with pytest.raises(SamplingError, match="top_p"):
        engine.submit([1, 2], SamplingParams(top_p=0))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        engine.submit([1, 9999])
    engine.submit([1, 2], GREEDY)
    with pytest.raises(EngineBusy):
        engine.submit([1, 2], GREEDY)
    engine.run()
    r = engine.submit([1, 2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.run()
    assert r.outputs[0].finish_reason == "length" and 2 + len(r.outputs[0].token_ids) == 32
    # an offline batch is not refused by the server's queue cap: it is fed in as the queue drains
    prompts = [[1, 2 + i] for i in range(5)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    batch = engine.generate(prompts, params)
    assert [b.prompt_ids for b in batch] == prompts and all(len(b.outputs[0].token_ids) == 4 for b in batch)
    assert [b.outputs[0].token_ids for b in batch] == [engine.generate([p], params)[0].outputs[0].token_ids
                                                       for p in prompts]


def test_abort_frees_the_row_at_once(tok):
    model = model_for()
    engine = Engine(model, tok, max_seqs=1)
    a = engine.submit([1, 2, 3], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    b = engine.submit([4, 5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    engine.abort(a)
    engine.run()
    assert a.outputs[0].finish_reason == "abort" and len(a.outputs[0].token_ids) < 100
    assert b.outputs[0].token_ids == greedy(model, [4, 5], 3)


def test_the_runner_follows_the_weights():
    model = model_for()
    runner = DecodeRunner(model)
    cache = model.new_cache(1, 16, mtp=False)
    x, pos = torch.tensor([[3]]), torch.tensor([[0]])
    before = runner.hidden(x, pos, cache)
    with torch.no_grad():
        model.layers[0].self_attn.o_proj.weight.mul_(2)  # an optimizer step, in place
    runner.sync()
    after = runner.hidden(x, pos, cache)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, model.hidden_states(x, pos, model.new_cache(1, 16))[0], atol=1e-5)


def test_chat_repl_resets_drops_old_turns_and_refuses_overlong_messages(tok, trained):
    import io

    from nanoseek.infer.chat import chat_repl

    engine = Engine(trained, tok, max_seqs=1, context=64)
    params = SamplingParams(max_tokens=12, temperature=0)
    lines = ["To be, or not", "/reset", "Question: 12 + 30", "Answer: 42 and more", "Café, naïve", "the question",
             "To be " * 60, "/bogus", "/exit", "never read"]
    out = io.StringIO()
    assert chat_repl(engine, params, stdin=io.StringIO("\n".join(lines) + "\n"), out=out, color=True) == 0
    text = out.getvalue()
    assert text.count("nanoseek> ") == 5  # five replies; the overlong message got none
    assert "(conversation cleared)" in text
    assert "outgrew the 64-token context window" in text
    assert "does not fit the 64-token context window" in text
    assert "unknown command /bogus" in text and "never read" not in text
    assert not engine.has_work()


def test_thinking_is_dimmed_and_only_the_answer_is_kept():
    import io

    from nanoseek.infer.chat import DIM, RESET, ThinkingPrinter, split_thinking

    out = io.StringIO()
    printer = ThinkingPrinter(out, color=True)
    for chunk in ["<think>", "12 + 30", " = 42", "</think>", "42"]:
        printer.write(chunk)
    assert out.getvalue() == f"{DIM}12 + 30{RESET}{DIM} = 42{RESET}\n42"
    assert split_thinking("<think>12 + 30 = 42</think>\n42") == ("12 + 30 = 42", "42")
    assert split_thinking("<think>still thinking") == ("still thinking", "")


def test_generate_command_streams_the_greedy_completion(tmp_path, tok, trained, capsys):
    from nanoseek.checkpoint import save_checkpoint
    from nanoseek.cli import main

    save_checkpoint(tmp_path / "run", 1, trained, tok, {"stage": "test"})
    prompt = "To be, or"
    want = tok.decode(greedy(trained, tok.encode(prompt), 20, eos_token_id=tok.eos_id), keep_special=True)
    want = want.replace("<|eos|>", "")
    capsys.readouterr()
    for extra in ([], ["--mtp"]):
        assert main(["generate", str(tmp_path / "run"), "--prompt", prompt, "--temperature", "0",
                     "--max-tokens", "20", "--eager", *extra]) == 0
        captured = capsys.readouterr()
        assert captured.out == want + "\n"
        assert "tok/s" in captured.err
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.strip() == "nanoseek: error: top_p must be in (0, 1]"


def test_training_forwards_do_not_rebuild_the_runner_but_steps_do(tok):
    """A trainer keeps one engine: its forwards (which count expert load) leave the folded
    weights alone; an optimizer step rebuilds them; the engine decodes in eval mode."""
    model = model_for()
    engine = Engine(model, tok, max_seqs=2)
    weights = engine.runner.weights
    model.train()
    ids = torch.randint(0, 400, (2, 16))
    loss = model.loss(ids[:, :-1], ids[:, 1:])["loss"]
    engine.runner.sync()
    assert engine.runner.weights is weights
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    out = engine.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids
    assert engine.runner.weights is not weights and model.training
    model.eval()
    assert out == greedy(model, [1, 2, 3], GREEDY.max_tokens)


# ---- tools: the calculator's output forced into the stream ----

CALC_QUESTIONS = ["What is 12 + 30?", "What is 55 + 23 + 41?", "What is 7 + 8?", "What is 81 + 19 + 60?",
                  "What is 40 + 45?"]


def calc_prompts(tok):
    return [tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
            for q in CALC_QUESTIONS]


def client_loop(engine, prompt, params):
    """What a client does over a plain completion endpoint: no tools run by the server; at each
    call, run it, append the output to the prompt and continue. Returns (tokens, forced flags)."""
    from nanoseek.tools import MALFORMED_CALL, render_output, run_builtin

    tokens, forced = [], []
    while True:
        room = params.max_tokens - len(tokens)
        c = engine.generate([prompt + tokens], replace(params, max_tokens=room, builtin_tools=()))[0].outputs[0]
        tokens += c.token_ids
        forced += [False] * len(c.token_ids)
        if c.finish_reason != "tool_calls":
            return tokens, forced
        outputs = [run_builtin(call["name"], call["arguments"]) for call in c.calls] or [MALFORMED_CALL]
        out = engine.tok.encode("".join(map(render_output, outputs)))
        if len(out) >= params.max_tokens - len(tokens):
            return tokens, forced
        tokens += out
        forced += [True] * len(out)


def test_the_engine_runs_the_calculator_inside_the_stream(calc_model):
    from nanoseek.tools import MALFORMED_CALL, calculator, render_output

    model, tok = calc_model
    reqs = Engine(model, tok, max_seqs=4).generate(calc_prompts(tok), SamplingParams(max_tokens=100, temperature=0))
    calls = 0
    for r in reqs:
        c = r.outputs[0]
        assert len(c.forced) == len(c.token_ids)
        for call in c.calls:
            assert call["name"] == "calculator" and call["output"] == calculator(call["arguments"])
        forced_text = tok.decode([t for t, f in zip(c.token_ids, c.forced) if f], keep_special=True)
        # every forced output right after the block it answers, in the text streamed out; a
        # block without a parsable call gets the malformed-call error, the others their outputs
        blocks = re.findall("<｜tool▁calls▁end｜>(<｜tool▁output▁begin｜>.*?<｜tool▁output▁end｜>)", c.text, re.S)
        assert "".join(blocks) == forced_text
        assert [b for b in blocks if b != render_output(MALFORMED_CALL)] == \
            [render_output(call["output"]) for call in c.calls]
        calls += len(c.calls)
    assert calls >= 3


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("rows", [3, 5])
def test_tool_outputs_give_a_client_loops_tokens(calc_model, speculative, rows):
    """Five requests on three rows (continuous batching) or five (rows calling in one step share
    one forward, rows between them left alone), with and without MTP speculation: the engine
    running the calculator gives, token for token, what a client loop gives."""
    model, tok = calc_model
    params = SamplingParams(max_tokens=90, temperature=0)
    engine = Engine(model, tok, max_seqs=rows, speculative=speculative)
    shared, forward = [], engine._forward_outputs
    engine._forward_outputs = lambda batch: (shared.append([b[0] for b in batch]), forward(batch))[1]
    reqs = engine.generate(calc_prompts(tok), params)
    alone = Engine(model, tok, max_seqs=1)
    for prompt, r in zip(calc_prompts(tok), reqs):
        tokens, forced = client_loop(alone, prompt, params)
        assert r.outputs[0].token_ids == tokens and r.outputs[0].forced == forced
    assert sum(len(r.outputs[0].calls) for r in reqs) >= 3
    if rows == 5:  # some rows that are not adjacent called in one step, and shared a forward
        assert any(len(b) > 1 and b[-1] - b[0] >= len(b) for b in shared), shared
    if speculative:
        assert engine.stats["accepted"] > 0


def test_seeded_samples_with_tools_do_not_depend_on_the_batch(calc_model):
    model, tok = calc_model
    prompts = calc_prompts(tok)
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=3, n=2)
    alone = [Engine(model, tok, max_seqs=2).generate([p], params)[0] for p in prompts[:2]]
    together = Engine(model, tok, max_seqs=8).generate(prompts, params)[:2]
    for a, b in zip(alone, together):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.forced for c in a.outputs] == [c.forced for c in b.outputs]
    assert any(c.calls for r in together for c in r.outputs)


def test_a_call_to_a_client_tool_ends_the_output(calc_model):
    """A tool the engine does not run (builtin_tools empty: every call is the client's) ends the
    output at the call, with finish_reason "tool_calls" and the call's name and arguments."""
    model, tok = calc_model
    params = SamplingParams(max_tokens=100, temperature=0, builtin_tools=())
    reqs = Engine(model, tok, max_seqs=4).generate(calc_prompts(tok), params)
    ended = [r.outputs[0] for r in reqs if r.outputs[0].finish_reason == "tool_calls"]
    assert len(ended) >= 3
    for c in ended:
        assert c.token_ids[-1] == tok.calls_end_id and not any(c.forced)
        assert c.text.endswith("<｜tool▁calls▁end｜>") and c.calls[-1]["output"] is None


def test_a_call_block_with_no_call_in_it_gets_an_error_output(calc_model):
    from nanoseek.infer.engine import _Seq
    from nanoseek.tools import MALFORMED_CALL, render_output

    model, tok = calc_model
    engine = Engine(model, tok, max_seqs=1)
    req = engine.submit([tok.bos_id], SamplingParams())
    for generated in ([tok.calls_begin_id, *tok.encode("calculator 2+2"), tok.calls_end_id], [tok.calls_end_id]):
        seq = _Seq(req, 0, [tok.bos_id, *generated], torch.Generator(), None)
        assert tok.decode(engine._tool_output(seq), keep_special=True) == render_output(MALFORMED_CALL)


def test_the_streamed_text_shows_the_call_and_its_output(calc_model):
    model, tok = calc_model
    engine = Engine(model, tok, max_seqs=2)
    text = "".join(engine.stream(calc_prompts(tok)[0], SamplingParams(max_tokens=60, temperature=0)))
    assert "<｜tool▁calls▁end｜><｜tool▁output▁begin｜>" in text and "<｜tool▁output▁end｜>" in text

"""The compiled decode step: the eager step's logits for each bucket, one package per bucket built
once and shared by checkpoints, the engine's tokens unchanged (tools, MTP, seeded sampling),
and eager decoding with one line when the compiler fails."""

import pytest
import torch

from nanoseek.config import model_size
from nanoseek.infer.compiled import CompiledSteps
from nanoseek.infer.engine import Engine
from nanoseek.infer.runner import DecodeRunner
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer

CONTEXT = 256  # one cache length for every test here: one set of packages, built once


@pytest.fixture(scope="module", autouse=True)
def package_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv("NANOSEEK_CACHE", str(folder))
        yield folder


def like(model: Transformer, seed: int) -> Transformer:
    """Another checkpoint of the same architecture: fresh weights, routing biases in play."""
    torch.manual_seed(seed)
    m = Transformer(model.config)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def steps(calc_model):
    """The calculator model's compiled steps, every bucket of batch 1 built."""
    compiled = CompiledSteps(calc_model[0], CONTEXT)
    compiled.warm(speculative=True)
    assert compiled.failed is None and len(compiled.seconds) == 3
    return compiled


def prefilled(model: Transformer, prompt: list[int]):
    cache = model.new_cache(1, CONTEXT)
    with torch.no_grad():
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
    return cache


@pytest.mark.parametrize("T", [1, 2])
def test_each_bucket_gives_the_eager_steps_logits_for_every_checkpoint(steps, T):
    """Two checkpoints of one architecture through the same packages: each gets its own eager
    logits (main model and MTP module) and writes the same cache, step after step."""
    gen = torch.Generator().manual_seed(T)
    V = steps.model.config.vocab_size
    prompt = torch.randint(0, V, (9,), generator=gen).tolist()
    outs = []
    for model in (steps.model, like(steps.model, 1)):
        eager, compiled = DecodeRunner(model), DecodeRunner(model, steps)
        caches = [prefilled(model, prompt), prefilled(model, prompt)]
        n = len(prompt)
        for _ in range(4):
            ids = torch.randint(0, V, (1, T), generator=gen)
            pos = torch.arange(n, n + T)[None]
            (h, logits), (h2, logits2) = (r.forward(ids, pos, c) for r, c in zip((eager, compiled), caches))
            assert (logits2 - logits).abs().max() <= 1e-4 and (h2 - h).abs().max() <= 1e-4
            pick = torch.randint(0, T, (1,), generator=gen)
            (o, m_logits), (o2, m_logits2) = (r.mtp_forward(h, ids, pos, c, pick)
                                              for r, c in zip((eager, compiled), caches))
            assert (m_logits2 - m_logits).abs().max() <= 1e-4 and (o2 - o).abs().max() <= 1e-4
            for a, b in zip(*(c.layers for c in caches)):
                assert (a - b).abs().max() <= 1e-5
            n += T
        outs.append(logits)
    assert (outs[0] - outs[1]).abs().max() > 0.1  # two checkpoints, two sets of logits
    assert set(steps.steps) == {("main", 1, 1), ("main", 1, 2), ("mtp", 1, 2)}


def test_a_package_is_built_once_and_follows_the_architecture(steps, monkeypatch):
    """Another engine of the same architecture loads the packages; another architecture, or
    another cache length, is another package."""
    again = CompiledSteps(like(steps.model, 2), CONTEXT)
    monkeypatch.setattr(CompiledSteps, "_build", lambda *a: pytest.fail("rebuilt an existing package"))
    assert again.step("main", 1, 1) is not None and again.failed is None
    assert again.path("main", 1, 1) == steps.path("main", 1, 1)
    wider = Transformer(steps.model.config.replace(kv_lora_rank=48))
    assert CompiledSteps(wider, CONTEXT).path("main", 1, 1) != steps.path("main", 1, 1)
    assert CompiledSteps(steps.model, 2 * CONTEXT).path("main", 1, 1) != steps.path("main", 1, 1)
    assert again.step("main", 2, 1) is None  # no bucket: the caller decodes eagerly


def test_a_copy_of_cache_rows_decodes_eagerly(steps, monkeypatch):
    """A forward over a copy of some cache rows (the engine's shared tool-output forward) is not
    the cache a package was built for: it runs eagerly, with the eager step's logits."""
    model = steps.model
    cache = prefilled(model, list(range(3, 12)))
    ids, pos = torch.tensor([[5, 6]]), torch.arange(9, 11)[None]
    assert steps.step("main", 1, 2) is not None
    monkeypatch.setitem(steps.steps, ("main", 1, 2), lambda *a: pytest.fail("a package read a copy of the cache"))
    got = DecodeRunner(model, steps).forward(ids, pos, cache.gather(torch.tensor([0]), 16))[1]
    want = DecodeRunner(model).forward(ids, pos, cache.gather(torch.tensor([0]), 16))[1]
    assert torch.equal(got, want)


def test_the_compiled_engine_gives_the_eager_engines_tokens(calc_model, steps):
    """The calculator's model at batch 1, with MTP speculation: greedy and seeded sampled outputs,
    tool calls run inside the stream, token for token those of the eager engine."""
    from tests.test_engine import calc_prompts

    model, tok = calc_model
    prompts = calc_prompts(tok)[:3]
    params = [SamplingParams(max_tokens=60, temperature=0), SamplingParams(max_tokens=60, temperature=0.8, seed=3)]
    runs = {}
    for compiled in (False, True):
        engine = Engine(model, tok, max_seqs=1, context=CONTEXT, speculative=True, compile=compiled)
        engine.warm()
        runs[compiled] = [[c.token_ids for r in engine.generate(prompts, p) for c in r.outputs] for p in params]
        if compiled:
            assert engine.compiled.failed is None and engine.stats["accepted"] > 0
            assert set(engine.compiled.steps) == {("main", 1, 1), ("main", 1, 2), ("mtp", 1, 2)}
            calls = sum(len(c.calls) for r in engine.generate(prompts, params[0]) for c in r.outputs)
            assert calls >= 2
    assert runs[True] == runs[False]


def test_a_failed_compile_decodes_eagerly_with_one_line(tmp_path, monkeypatch, capfd):
    """No working C++ compiler: one line on stderr, no crash, the eager engine's tokens."""
    import torch._inductor.config as inductor

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path))
    torch.manual_seed(3)
    model = Transformer(model_size("tiny")).eval()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(model, None, max_seqs=1, context=64, compile=True)
    with inductor.patch({"cpp.cxx": ("/bin/false",)}):
        got = engine.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    err = capfd.readouterr().err
    assert len([line for line in err.splitlines() if "decoding eagerly" in line]) == 1 and "Traceback" not in err
    assert engine.compiled.failed and not list(tmp_path.rglob("*.pt2"))
    assert got == Engine(model, None, max_seqs=1, context=64).generate([[5, 6, 7]], params)[0].outputs[0].token_ids


def test_generate_and_serve_use_the_compiled_step(calc_model, steps, tmp_path, capsys):
    """`nanoseek generate` decodes through the compiled step by default (the eager engine's text),
    and a server's engine holds its compiled step before it takes a request."""
    from nanoseek.checkpoint import save_checkpoint
    from nanoseek.cli import main
    from nanoseek.serve.server import build

    model, tok = calc_model
    save_checkpoint(tmp_path / "run", 1, model, tok, {"stage": "test"})
    texts = []
    for extra in ([], ["--eager"]):
        capsys.readouterr()
        assert main(["generate", str(tmp_path / "run"), "--prompt", "What is 3 + 4?", "--chat", "--temperature", "0",
                     "--max-tokens", "40", "--context", str(CONTEXT), *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    app, _ = build(str(tmp_path / "run"), context=CONTEXT, compile=True)
    engine = app.state.engine
    assert engine.compiled.failed is None and ("main", 1, 1) in engine.compiled.steps


def test_bench_compiled_compares_every_problems_answer(calc_model, steps, tmp_path):
    """`bench compiled` runs each problem through both engines and accounts for every one: the
    same tokens, or a divergence with its margin."""
    from nanoseek.bench.compiled import bench_compiled
    from nanoseek.checkpoint import save_checkpoint

    model, tok = calc_model
    save_checkpoint(tmp_path / "run", 1, model, tok, {"stage": "sft"})
    out = bench_compiled(str(tmp_path / "run"), problems=3, sets=["chain_sum", "basic_arithmetic"],
                         context=CONTEXT, max_tokens=60)
    assert out["problems"] == 6 and out["compiled_failed"] is None and out["template"] == "chat"
    assert out["same_tokens"] + len(out["divergences"]) == 6 and out["same_score"] >= out["same_tokens"]
    assert all(d["top2_margin"] >= 0 and d["set"] in ("chain_sum", "basic_arithmetic") for d in out["divergences"])

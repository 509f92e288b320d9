"""GGUF through llama.cpp's own converter, run by llama.cpp itself (llama-cpp-python, built
by `make gguf`): the same ids, the same logits, the same chat and tool-call tokens."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import CALC_TOOL, calc_reply, client_tool_loop
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from test_hf import one_line_error, random_model

from nanoseek.bench import gguf as bench_gguf
from nanoseek.bench.gguf import llama_greedy, llama_logits
from nanoseek.checkpoint import save_checkpoint
from nanoseek.cli import main
from nanoseek.config import model_size
from nanoseek.data.corpus import default_corpus
from nanoseek.data.loader import VAL_EVERY
from nanoseek.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from nanoseek.gguf import export_gguf, find_converter, pre_tokenizer_name
from nanoseek.hf import CheckpointError
from nanoseek.infer import greedy
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.tools import render_call, render_output

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ROUTING = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=0,
               tie_word_embeddings=True, max_position_embeddings=1024,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
# the text llama.cpp's converter hashes to name a pre-tokenizer: every split rule at once
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
          "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
          "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# operator and bracket runs, which nanoseek's vocabulary never joins into one token (data/tokenizer.py)
OPERATORS = "Calculate ((-3+4))*-2 = ? (12 --5) /-3 % [2]^(-1) × ÷ −4 a**b f(x)=(x), (1+2).\n((((x))))"


@pytest.fixture(scope="module")
def corpus():
    docs = default_corpus()
    return docs, docs[VAL_EVERY - 1::VAL_EVERY]  # the loader's held-out documents


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus[0], vocab_size=4096)  # the speedrun's tokenizer


def llama(path, **kw) -> Llama:
    """llama.cpp on one GGUF at the tiny model's context, with an f32 KV cache unless asked."""
    return bench_gguf.llama(path, **{"n_ctx": 512, "type_k": 0, "type_v": 0, **kw})


def trained_speedrun_model(tok, docs, steps=25) -> Transformer:
    """The speedrun's model size, trained a few steps on the corpus so that its logits mean
    something (a random model's are flat)."""
    torch.manual_seed(0)
    model = Transformer(model_size("cpu").replace(vocab_size=tok.vocab_size))
    stream = torch.tensor([i for d in docs[:400] for i in tok.encode(d)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        starts = torch.randint(0, len(stream) - 257, (4,), generator=torch.Generator().manual_seed(step))
        batch = torch.stack([stream[s:s + 257] for s in starts])
        model.loss(batch[:, :-1], batch[:, 1:])["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok, corpus):
    """{name: (nanoseek model, checkpoint)}: tiny random ones (with MTP; with grouped routing, a MoE
    first layer, tied embeddings and YaRN), the speedrun's size trained."""
    root = tmp_path_factory.mktemp("gguf")
    out = {"tiny_mtp": random_model(vocab_size=tok.vocab_size, num_nextn_predict_layers=1),
           "tiny_routing": random_model(vocab_size=tok.vocab_size, **ROUTING),
           "speedrun": trained_speedrun_model(tok, corpus[0])}
    for name, model in out.items():
        save_checkpoint(root / name, 1, model, tok, {"stage": "test"})
        out[name] = (model, root / name)
    return out


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    """{(model, type): GGUF path}, through `nanoseek export-gguf`."""
    root = tmp_path_factory.mktemp("out")
    files = {}
    for name, types in [("tiny_mtp", ["f32"]), ("tiny_routing", ["f32"]), ("speedrun", ["f32", "f16", "q8_0"])]:
        for t in types:
            path = root / f"{name}-{t}.gguf"
            assert main(["export-gguf", str(models[name][1]), str(path), "--type", t]) == 0
            files[name, t] = path
    return files


def test_llama_cpp_tokenizes_as_nanoseek_does(tok, corpus, ggufs):
    llm = llama(ggufs["speedrun", "f32"], vocab_only=True)
    chat = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                            {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"}], True)
    asked = tok.render_chat([{"role": "user", "content": OPERATORS}], True) + render_call("calculator", OPERATORS)
    texts = [*corpus[1], CHKTXT, chat, calc_reply([1234, 4321, 17]), "".join(SPECIAL_TOKENS), "x = 007.50 × ½ café",
             OPERATORS, asked]
    assert len(corpus[1]) > 100
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text[:60]
    assert llm.tokenize(b"((", add_bos=False) == tok.encode("(") * 2
    for i, special in enumerate(SPECIAL_TOKENS):  # one token each, at its fixed id
        assert llm.tokenize(special.encode(), add_bos=False, special=True) == [i]
        assert llm.detokenize([i], special=True).decode() == special
    assert (llm.token_bos(), llm.token_eos()) == (tok.bos_id, tok.eos_id)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    llm.close()


@pytest.mark.parametrize("name", ["tiny_mtp", "tiny_routing", "speedrun"])
def test_f32_logits_match_nanoseek(models, ggufs, tok, corpus, name):
    model, _ = models[name]
    ids = [tok.bos_id] + [i for d in corpus[1][:20] for i in tok.encode(d)][:383]
    llm = llama(ggufs[name, "f32"])
    assert llm.metadata["general.architecture"] == "deepseek2"
    theirs = llama_logits(llm, ids)
    llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    assert theirs.shape == ours.shape == (384, tok.vocab_size)
    diff = np.abs(theirs - ours).max()
    assert diff < 1e-3 and ours.std() > 0.1, (diff, ours.std())


@pytest.mark.parametrize("type", ["f16", "q8_0"])
def test_quantized_greedy_follows_nanoseek_on_most_prompts(models, ggufs, tok, type, capsys):
    model, _ = models["speedrun"]
    rng = random.Random(0)
    questions = [f"What is {rng.randint(10, 999)} + {rng.randint(10, 999)}?" for _ in range(4)] + \
                ["Tell me about the king.", "Who are you?", "ROMEO: Is the day so young?", "Count to three."]
    llm = llama(ggufs["speedrun", type], type_k=1, type_v=1)  # f16 cache, llama.cpp's default
    same, first_diff = 0, []
    for q in questions:
        prompt = tok.encode(tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True))
        ours = greedy(model, prompt, 64)
        theirs, _ = llama_greedy(llm, prompt, 64)
        assert len(ours) == len(theirs) == 64
        same += ours == theirs
        first_diff.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 64))
    llm.close()
    with capsys.disabled():
        print(f"\n{type}: {same}/{len(questions)} greedy continuations equal; first divergence at {first_diff}")
    assert same > len(questions) // 2


def test_tool_calls_survive_in_the_ggufs_chat_template(models, ggufs, tok):
    llm = llama(ggufs["tiny_mtp", "f32"], vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "1234+4321"})}}
    messages = [{"role": "user", "content": "What is 1234 + 4321?"},
                {"role": "assistant", "content": "", "reasoning_content": "Add them.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "content": "5555"},
                {"role": "assistant", "content": "5555"}, {"role": "user", "content": "And 2 + 3?"}]
    for tools, gen in [(None, False), ([CALC_TOOL], False), ([CALC_TOOL], True)]:
        fmt = Jinja2ChatFormatter(template, eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                                  bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
                                  add_generation_prompt=gen)
        prompt = fmt(messages=messages, tools=tools).prompt
        theirs = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert theirs == tok.encode(tok.render_chat(messages, add_generation_prompt=gen, tools=tools))
        calls = 1 + (tools is not None)  # the tools' header shows the call format once
        assert theirs.count(tok.calls_begin_id) == theirs.count(tok.calls_end_id) == calls
    built_in = render_call("calculator", "1234+4321") + render_output("5555")
    assert llm.tokenize(built_in.encode(), add_bos=False, special=True) == tok.encode(built_in)
    llm.close()


def test_a_client_loop_over_llama_cpp_gives_the_engines_tool_stream(tmp_path, calc_model):
    """llama.cpp runs no calculator: a client generates until the call closes, runs it, appends
    its output and goes on. The engine, running the calculator itself, gives the same tokens."""
    model, tok = calc_model
    save_checkpoint(tmp_path / "calc", 1, model, tok, {"stage": "test"})
    llm = llama(export_gguf(tmp_path / "calc", tmp_path / "calc.gguf", type="f32"))
    questions = ["What is 12 + 30?", "What is 55 + 23 + 41?", "What is 81 + 19 + 60?", "What is 40 + 45?"]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}], True)) for q in questions]
    budget = 90
    reqs = Engine(model, tok, max_seqs=3).generate(prompts, SamplingParams(max_tokens=budget, temperature=0))
    calls = 0
    for prompt, r in zip(prompts, reqs):
        out, n = client_tool_loop(lambda ids, n: llama_greedy(llm, ids, n, stop=(tok.eos_id, tok.calls_end_id))[0],
                                  prompt, budget, tok)
        assert r.outputs[0].token_ids == out
        calls += n
    llm.close()
    assert calls >= 2


def test_export_gguf_writes_the_types_and_a_modelfile(models, ggufs, tmp_path, capsys):
    sizes = {t: ggufs["speedrun", t].stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > 1.8 * sizes["f16"] and sizes["f16"] > 1.5 * sizes["q8_0"]
    out = tmp_path / "model.gguf"
    assert main(["export-gguf", str(models["tiny_mtp"][1]), str(out), "--type", "bf16"]) == 0
    assert "model.gguf" in capsys.readouterr().out
    modelfile = (tmp_path / "model.Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|eos|>"' in modelfile
    assert "PARAMETER temperature 0.6" in modelfile and "<|assistant|>" in modelfile
    llm = llama(out, vocab_only=True)
    assert llm.metadata["general.file_type"] == "32"  # llama.cpp's MOSTLY_BF16
    assert llm.metadata["general.name"] == "model"
    llm.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.gguf"]  # no staging left


def test_what_llama_cpp_cannot_represent_is_refused_in_one_line(tmp_path, tok, capsys, monkeypatch):
    refusals = [(dict(n_routed_experts=None), "routed experts"), (dict(q_lora_rank=None), "q_lora_rank"),
                (dict(attn_type="gqa", num_key_value_heads=1), "attn_type='gqa'")]
    for i, (changes, needle) in enumerate(refusals):
        save_checkpoint(tmp_path / f"m{i}", 1, random_model(vocab_size=tok.vocab_size, **changes), tok, {})
        assert needle in one_line_error(capsys, ["export-gguf", str(tmp_path / f"m{i}"), str(tmp_path / "x.gguf")])
    # a tokenizer with another split (Qwen2's, which joins a newline to the punctuation before it)
    other = train_tokenizer(["the cat sat on the mat 0123456789"] * 50, vocab_size=300)
    spec = json.loads(other.hf.to_str())
    spec["pre_tokenizer"]["pretokenizers"][1]["pattern"]["Regex"] = QWEN2_SPLIT
    from tokenizers import Tokenizer as HFTokenizer

    from nanoseek.data.tokenizer import Tokenizer
    other = Tokenizer(HFTokenizer.from_str(json.dumps(spec)))
    other.save(tmp_path / "othertok")
    assert pre_tokenizer_name(tmp_path / "othertok" / "tokenizer.json") is None
    assert pre_tokenizer_name(tmp_path / "nope.json") is None
    save_checkpoint(tmp_path / "other", 1, random_model(vocab_size=other.vocab_size), other, {})
    assert "pre-tokenizer" in one_line_error(capsys, ["export-gguf", str(tmp_path / "other"), str(tmp_path / "x.gguf")])

    save_checkpoint(tmp_path / "ok", 1, random_model(vocab_size=tok.vocab_size), tok, {})
    monkeypatch.setenv("NANOSEEK_LLAMA_CPP", str(tmp_path / "no-llama"))
    assert "make gguf" in one_line_error(capsys, ["export-gguf", str(tmp_path / "ok"), str(tmp_path / "x.gguf")])
    monkeypatch.delenv("NANOSEEK_LLAMA_CPP")
    assert find_converter().name == "convert_hf_to_gguf.py"
    (tmp_path / "taken.gguf").write_text("mine")
    taken = str(tmp_path / "taken.gguf")
    assert "already exists" in one_line_error(capsys, ["export-gguf", str(tmp_path / "ok"), taken])
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    (tmp_path / "y.Modelfile").write_text("FROM mine")
    assert "y.Modelfile already exists" in one_line_error(capsys, ["export-gguf", str(tmp_path / "ok"),
                                                                   str(tmp_path / "y.gguf")])
    assert (tmp_path / "y.Modelfile").read_text() == "FROM mine" and not (tmp_path / "y.gguf").exists()
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
    with pytest.raises(CheckpointError, match="--type"):
        export_gguf(tmp_path / "ok", tmp_path / "y.gguf", type="q4_k")

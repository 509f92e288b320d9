"""Open weights: transformers' DeepseekV3 format both ways, exact logits parity, clear refusals."""

import json
import shutil

import pytest
import tokenizers
import torch
from conftest import client_tool_loop
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

import nanoseek
from nanoseek.checkpoint import load_model, save_checkpoint
from nanoseek.cli import main
from nanoseek.config import model_size
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.export import export_hf, import_hf
from nanoseek.hf import CheckpointError
from nanoseek.infer import greedy
from nanoseek.model import Transformer

TEXT = ["Question: 12 + 30 = ?\n<think>\n12 + 30 = 42\n</think>\nAnswer: 42",
        "To be, or not to be, that is the question.", "The cat sat on the mat 7 times."] * 40

CONFIGS = {
    "q_lora+mtp": {},
    "no_q_lora": dict(q_lora_rank=None),
    "groups": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
    "dense": dict(n_routed_experts=None),
    "moe_first_layer": dict(first_k_dense_replace=0),
    "no_mtp": dict(num_nextn_predict_layers=0),
    "yarn_tied": dict(tie_word_embeddings=True, max_position_embeddings=1024,
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=512)


def random_model(seed=0, **changes) -> Transformer:
    """The tiny model with every weight random, norms and routing biases included, so that
    a name or layout mistake anywhere changes the logits."""
    torch.manual_seed(seed)
    model = Transformer(model_size("tiny").replace(**changes))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(0.05 * torch.randn_like(m.gate.e_score_correction_bias))
    return model.eval()


def make_checkpoint(tmp_path, tok, name="run", meta=None, **changes):
    model = random_model(**changes)
    save_checkpoint(tmp_path / name, 1, model, tok, meta or {"stage": "test"})
    return model, tmp_path / name


def load_in_transformers(folder, capfd):
    capfd.readouterr()
    hf, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    err = capfd.readouterr().err
    return hf.eval(), info, err


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tok, capfd, name):
    model, run = make_checkpoint(tmp_path, tok, **CONFIGS[name])
    out = export_hf(run, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert (cfg["scoring_func"], cfg["topk_method"], cfg["moe_layer_freq"], cfg["rope_interleave"]) == \
        ("sigmoid", "noaux_tc", 1, True)
    assert cfg["num_nextn_predict_layers"] == model.config.num_nextn_predict_layers
    hf, info, err = load_in_transformers(out, capfd)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "MISSING" not in err and "UNEXPECTED" not in err and "newly initialized" not in err
    ids = torch.randint(0, model.config.vocab_size, (2, 96))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    if model.config.num_nextn_predict_layers:
        mtp = load_file(str(out / "mtp.safetensors"))
        L = model.config.num_hidden_layers
        assert {f"model.layers.{L}.{k}.weight" for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm",
                                                          "shared_head.head", "embed_tokens")} <= set(mtp)
        assert all(k.startswith(f"model.layers.{L}.") for k in mtp)
    else:
        assert not (out / "mtp.safetensors").exists()


def test_exported_moe_layout_is_transformers_on_disk_names(tmp_path, tok):
    model, run = make_checkpoint(tmp_path, tok)
    out = export_hf(run, tmp_path / "hf", dtype="bfloat16")
    sd = load_file(str(out / "model.safetensors"))
    layer = model.config.first_k_dense_replace
    for e in range(model.config.n_routed_experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in sd
    for k in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm", "o_proj"):
        assert f"model.layers.0.self_attn.{k}.weight" in sd
    assert sd[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", ["default", "no_q_lora_groups_sharded"])
def test_transformers_model_imports_with_the_same_logits(tmp_path, variant):
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
              q_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, routed_scaling_factor=2.5,
              max_position_embeddings=512)
    shard = None
    if variant != "default":
        kw.update(q_lora_rank=None, n_group=4, topk_group=2, num_experts_per_tok=3,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                   "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 1.0})
        shard = "100KB"
    torch.manual_seed(1)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(str(tmp_path / "hf"), **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())  # another model's: no nanoseek chat tokens
    foreign.train_from_iterator(TEXT, tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    foreign.save(str(tmp_path / "hf" / "tokenizer.json"), pretty=False)
    import_hf(tmp_path / "hf", tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    ours, _ = nanoseek.load(str(tmp_path / "ours"))
    direct, tok = nanoseek.load(str(tmp_path / "hf"))  # an HF folder loads directly too
    assert tok is None  # not nanoseek's tokenizer: the weights load, the files are kept as they are
    assert ours.config.num_nextn_predict_layers == 0  # transformers saves no MTP weights
    assert (ours.config.q_lora_rank is None) == (variant != "default")
    ids = torch.randint(0, 300, (2, 80))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-4
        assert (direct(ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype,shard", [("float32", None), ("bfloat16", "64KB")])
def test_export_import_export_is_byte_identical(tmp_path, tok, dtype, shard):
    _, run = make_checkpoint(tmp_path, tok, first_k_dense_replace=0)
    args = ["--dtype", dtype] + (["--max-shard-size", shard] if shard else [])
    assert main(["export-hf", str(run), str(tmp_path / "a"), *args]) == 0
    assert main(["import-hf", str(tmp_path / "a"), str(tmp_path / "ours")]) == 0
    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "b"), *args]) == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    assert ("model.safetensors" in files) == (shard is None) and "mtp.safetensors" in files
    for f in files:
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert a[k].view(torch.uint8).equal(b[k].view(torch.uint8)), k
    if shard:
        index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2 and "mtp.safetensors" in index["weight_map"].values()


def test_chat_template_renders_the_same_tokens_in_transformers(tmp_path, tok):
    _, run = make_checkpoint(tmp_path, tok)
    out = export_hf(run, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "<think>12 + 30 = 42</think>42"},
                {"role": "user", "content": "And 7 times 6?"}]
    for gen in (False, True):
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=gen)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        ours = tok.encode(tok.render_chat(messages, add_generation_prompt=gen))
        assert list(theirs) == ours
        assert (ours[-1] == tok.hf.token_to_id("<|assistant|>")) == gen
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.bos_token == "<|bos|>"


def test_greedy_generation_matches_transformers_generate(tmp_path, tok):
    model, run = make_checkpoint(tmp_path, tok)
    out = export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "What is 12 + 30?"}], True))
    ours = greedy(model, prompt, 32)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ours) == 32 and ours == theirs
    assert len(set(ours)) > 1  # a real continuation, not one token repeated


def test_model_card_reports_the_model_and_its_cost(tmp_path, tok):
    meta = {"stage": "pretrain", "step": 10, "tokens_seen": 5120,
            "cost": {"flops": 1.5e12, "tokens": 5120, "wall_s": 90.0, "device": "test CPU", "device_hours": 0.025,
                     "price_per_device_hour": 0.1, "dollars": 0.0025},
            "metrics": {"val_loss": 3.25}, "report": {"gsm_symbolic": {"pass@1": 0.125}}}
    model, run = make_checkpoint(tmp_path, tok, meta=meta)
    card = (export_hf(run, tmp_path / "hf") / "README.md").read_text()
    p = model.param_counts()
    for needle in (f"{p['total']:,} total", f"{p['active']:,} active", "$0.0025", "3.2500", "gsm_symbolic.pass@1",
                   "vllm serve", "deepseek_mtp", "sglang.launch_server", "AutoModelForCausalLM"):
        assert needle in card, needle


def test_fp8_block_quantized_weights_are_dequantized(tmp_path, tok):
    """DeepSeek-V3's released format: E4M3 weights with one fp32 scale per 128x128 block."""
    model, run = make_checkpoint(tmp_path, tok, num_nextn_predict_layers=0, vocab_size=512)
    out = export_hf(run, tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"  # [64, 192]: two column blocks, the second partial
    w = sd[name]
    w[:, 150] *= 50  # an outlier in the second block only
    scale = torch.stack([torch.stack([blk.abs().max() / 448 for blk in row.split(128, 1)]) for row in w.split(128, 0)])
    q = (w / scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]).to(
        torch.float8_e4m3fn)
    sd[name], sd[name + "_scale_inv"] = q, scale
    save_file(sd, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    (out / "config.json").write_text(json.dumps(cfg))
    loaded, _ = nanoseek.load(str(out))
    got = loaded.layers[0].mlp.down_proj.weight
    want = q.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    assert torch.equal(got, want)
    first = (got[:, :128] - w[:, :128]).abs().max() / w[:, :128].abs().max()
    assert first < 2 ** -4  # E4M3 keeps 3 mantissa bits; the outlier's block does not spoil this one

    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization_config 'gptq'"):
        nanoseek.load(str(out))


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_bad_folders_give_one_line_errors(tmp_path, tok, capsys):
    _, run = make_checkpoint(tmp_path, tok)
    assert main(["export-hf", str(run), str(tmp_path / "sharded"), "--max-shard-size", "64KB"]) == 0
    capsys.readouterr()
    sharded = tmp_path / "sharded"

    broken = tmp_path / "missing_shard"
    shutil.copytree(sharded, broken)
    shards = sorted(broken.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    err = one_line_error(capsys, ["import-hf", str(broken), str(tmp_path / "x")])
    assert shards[1].name in err and "missing" in err

    shape = tmp_path / "shape"
    shutil.copytree(sharded, shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["kv_lora_rank"] += 8
    (shape / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(capsys, ["import-hf", str(shape), str(tmp_path / "x")])
    assert "kv_a_proj_with_mqa.weight has shape" in err

    for field, value, needle in [("model_type", "llama", "model_type 'llama'"),
                                 ("architectures", ["LlamaForCausalLM"], "architectures"),
                                 ("scoring_func", "softmax", "scoring_func='softmax'"),
                                 ("hidden_act", "gelu", "hidden_act='gelu'"),
                                 ("rope_parameters", {"rope_type": "linear", "factor": 2.0}, "rope type 'linear'")]:
        bad = tmp_path / f"bad_{field}"
        shutil.copytree(sharded, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[field] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        assert needle in one_line_error(capsys, ["import-hf", str(bad), str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # nothing half-written

    assert "not empty" in one_line_error(capsys, ["export-hf", str(run), str(sharded)])
    assert "no checkpoint" in one_line_error(capsys, ["export-hf", str(tmp_path / "nope"), str(tmp_path / "y")])
    assert "--dtype" in one_line_error(capsys, ["export-hf", str(run), str(tmp_path / "y"), "--dtype", "int8"])


def test_gqa_baseline_is_refused_for_export_but_checkpoints_round_trip(tmp_path, tok):
    model, run = make_checkpoint(tmp_path, tok, attn_type="gqa", num_key_value_heads=1)
    again, _, _ = load_model(run)
    assert again.config.attn_type == "gqa" and again.config.num_key_value_heads == 1
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), again.eval()(ids))
    with pytest.raises(CheckpointError, match="attn_type='gqa'"):
        export_hf(run, tmp_path / "hf")


def test_a_checkpoint_is_itself_a_transformers_folder(tmp_path, tok):
    """One format everywhere: a training checkpoint loads in transformers as it is."""
    model, run = make_checkpoint(tmp_path, tok, num_nextn_predict_layers=0)
    hf = AutoModelForCausalLM.from_pretrained(str(run / "latest")).eval()
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_mtp_concatenates_embedding_then_hidden_as_vllm_does():
    """vLLM's deepseek_mtp.py: eh_proj(cat([enorm(embedding), hnorm(previous hidden)])). With the
    hidden half of eh_proj zeroed, the module must ignore the hidden state and follow the embedding."""
    model = random_model()
    mtp = model.mtp[0]
    d = model.config.hidden_size
    with torch.no_grad():
        mtp.eh_proj.weight[:, d:] = 0
    T = 8
    cos, sin = model.rotary(torch.arange(T)[None])
    h, e = torch.randn(1, T, d), torch.randn(1, T, d)
    with torch.no_grad():
        out, _ = mtp(h, e, cos, sin)
        assert torch.equal(out, mtp(torch.randn(1, T, d), e, cos, sin)[0])
        assert not torch.allclose(out, mtp(h, torch.randn(1, T, d), cos, sin)[0])


def test_a_client_loop_over_transformers_gives_the_engines_tool_stream(tmp_path, calc_model):
    """The exported model in transformers, driven as a client drives any completion endpoint:
    generate until the call closes, run the calculator, append its output, go on. The engine,
    running the calculator itself with four requests batched on three rows and MTP
    speculation on, gives the same tokens."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    model, tok = calc_model
    save_checkpoint(tmp_path / "calc", 1, model, tok, {"stage": "test"})
    hf = AutoModelForCausalLM.from_pretrained(str(export_hf(tmp_path / "calc" / "latest", tmp_path / "hf"))).eval()
    questions = ["What is 12 + 30?", "What is 55 + 23 + 41?", "What is 81 + 19 + 60?", "What is 40 + 45?"]
    prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}], True)) for q in questions]
    budget = 90
    reqs = Engine(model, tok, max_seqs=3, speculative=True).generate(prompts, SamplingParams(max_tokens=budget,
                                                                                            temperature=0))

    def generate(ids: list[int], n: int) -> list[int]:
        return hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id,
                           eos_token_id=[tok.eos_id, tok.calls_end_id])[0, len(ids):].tolist()

    calls = 0
    for prompt, r in zip(prompts, reqs):
        out, n = client_tool_loop(generate, prompt, budget, tok)
        assert r.outputs[0].token_ids == out
        calls += n
    assert calls >= 2


def test_the_exported_template_renders_tools_as_nanoseek_does(tmp_path, tok):
    """transformers' apply_chat_template on the export, with the client's tools, an assistant's
    tool_calls and the tool's message, gives nanoseek's ids; the model card says how vLLM and
    SGLang parse the calls and what a client loop does for the calculator."""
    from test_tokenizer import TOOL_CONVERSATIONS, WEATHER

    _, run = make_checkpoint(tmp_path, tok)
    out = export_hf(run, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    for messages in TOOL_CONVERSATIONS:
        for tools in (None, [WEATHER]):
            theirs = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
            theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
            assert list(theirs) == tok.encode(tok.render_chat(messages, add_generation_prompt=True, tools=tools))
    assert hf_tok.convert_tokens_to_ids("<｜tool▁calls▁end｜>") == tok.calls_end_id == 9
    card = (out / "README.md").read_text()
    assert "--tool-call-parser deepseek_v31" in card and "stop_token_ids=[9]" in card

"""infer/measure.py: the figures the report card and `bench decode` print about the engine."""

import pytest
import torch

from nanoseek.config import model_size
from nanoseek.infer.measure import decode_flops, eval_workload
from nanoseek.model import Transformer


def test_decode_flops_count_the_weights_and_every_key_seen():
    model = Transformer(model_size("tiny"))
    cfg = model.config
    per_key = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    assert decode_flops(model, 0) == pytest.approx(model.flops_per_token(1, training=False))
    assert decode_flops(model, 10) - decode_flops(model, 0) == pytest.approx(10 * per_key)
    # a whole sequence's decode FLOPs average to the model's per-token figure for that length
    T = 64
    assert sum(decode_flops(model, p) for p in range(T)) / T == pytest.approx(model.flops_per_token(T, training=False))


def test_the_eval_workload_decodes_every_answer_and_reports_its_share_of_the_bound():
    torch.manual_seed(0)
    model = Transformer(model_size("tiny")).eval()
    prompts = [torch.randint(10, 400, (n,)).tolist() for n in (5, 9, 7, 12, 6)]
    lengths = [8, 3, 11, 5, 6]
    fast = eval_workload(model, prompts, lengths, max_seqs=2, peak_flops=1e12, ignore_eos=True)
    slow = eval_workload(model, prompts, lengths, max_seqs=2, peak_flops=1e9, ignore_eos=True)
    assert fast["generated_tokens"] == slow["generated_tokens"] == sum(lengths)  # rows refilled as answers end
    assert fast["tokens_per_s"] > 0 and 0 < fast["compute_bound_fraction"] < slow["compute_bound_fraction"]

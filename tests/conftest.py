import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# A real model that answers every chat message with REPLY (trained here in a few seconds), so
# that the server and browser tests see reasoning, markdown and hostile HTML come from a model.
REPLY = ("<think>The user asks. 2 + 2 = 4, so the answer is four.</think>**Four**, see `2 + 2`: "
         "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> done.")
USER_MESSAGES = ["What is 2 + 2?", "hi", "Hello there", "Tell me a joke", "Who are you?", "Count to three",
                 "x", "What is the capital of France?"]


@pytest.fixture(scope="session")
def chat_model():
    from nanoseek.config import preset
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer

    tok = train_tokenizer([REPLY] * 20 + USER_MESSAGES * 5, vocab_size=400)
    seqs = [tok.encode(tok.render_chat([{"role": "user", "content": m}], add_generation_prompt=True) + REPLY)
            + [tok.eos_id] for m in USER_MESSAGES]
    width = max(len(s) for s in seqs)
    batch = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in seqs])
    labels = batch[:, 1:].clone()
    labels[batch[:, 1:] == tok.pad_id] = -100
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model.loss(batch[:, :-1], labels)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A random tiny base model with a tokenizer that spells digits and the tasks' words."""
    from nanoseek.config import preset
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer
    from nanoseek.train.checkpoint import save_checkpoint

    tok = train_tokenizer(["the cat sat on the mat 0123456789 + - = Question Answer " * 3] * 50, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(vocab_size=320, num_nextn_predict_layers=0))
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(folder, 1, model, tok, {"stage": "pretrain"})
    return folder / "latest", tok

"""`nanoseek export-gguf`: a GGUF for llama.cpp, Ollama, LM Studio and the phone apps.

The checkpoint goes out as transformers' DeepseekV3 folder (`export_hf`), then through
llama.cpp's own `convert_hf_to_gguf.py`, whose files are used as they ship. llama.cpp runs it
with its `deepseek2` graph (MLA, sigmoid-gated experts with the correction bias); the
converter leaves DeepseekV3's MTP layers out, since llama.cpp does not run them.

One thing the converter cannot know: it names a BPE pre-tokenizer by hashing the ids a
vocabulary gives a fixed text, so a freshly trained vocabulary is never in its table (the
hash is of the ids, not of the split). nanoseek's split is SmolLM's (GPT-2's, every digit on
its own), so the conversion is told "smollm" for it, which is what llama.cpp's
`convert_hf_to_gguf_update.py` would add to the table; the tests check that llama.cpp then
tokenizes id for id as nanoseek does. A tokenizer with any other split is refused.

Where the converter lives: `--converter`, else $NANOSEEK_LLAMA_CPP, else `.venv/llama.cpp`
(`make gguf` unpacks it there from llama-cpp-python's source distribution).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nanoseek.data.tokenizer import ASSISTANT, BOS, EOS, SPLIT, SYSTEM, USER
from nanoseek.export import R1_SAMPLING, export_hf
from nanoseek.hf import CheckpointError

TYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_ENV = "NANOSEEK_LLAMA_CPP"


def pre_tokenizer_name(tokenizer_json: Path) -> str | None:
    """llama.cpp's name for this tokenizer's pre-tokenizer: "smollm" (GPT-2's split after every
    digit is split off) for nanoseek's, byte-level BPE without a normalizer; else None."""
    try:
        d = json.loads(Path(tokenizer_json).read_text())
    except (OSError, ValueError):
        return None
    pre = d.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if d.get("normalizer") or len(steps) != 3:
        return None
    digits, split, byte_level = steps
    ok = (all(s.get("type") == "Split" and s.get("behavior") == "Isolated" and not s.get("invert")
              for s in (digits, split))
          and digits.get("pattern") == {"Regex": r"\p{N}"} and split.get("pattern") == {"Regex": SPLIT}
          and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
          and not byte_level.get("use_regex"))
    return "smollm" if ok else None


def find_converter(path: str | Path | None = None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: `path` (the script or its folder), $NANOSEEK_LLAMA_CPP,
    or the one `make gguf` unpacks into the virtual environment."""
    where = path or os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "llama.cpp"
    script = Path(where)
    if script.is_dir():
        script = script / CONVERTER
    if not script.is_file():
        raise CheckpointError(f"llama.cpp's converter is not at {script}: run `make gguf`, or pass "
                              f"--converter (or set {CONVERTER_ENV}) to a llama.cpp folder with {CONVERTER}")
    return script


def export_gguf(ckpt: str | Path, out: str | Path, type: str = "f16", converter: str | Path | None = None) -> Path:
    """Write `out` (a new .gguf file) and an Ollama Modelfile beside it."""
    if type not in TYPES:
        raise CheckpointError(f"--type must be one of {', '.join(TYPES)}, not {type!r}")
    out = Path(out)
    for path in (out, out.with_suffix(".Modelfile")):
        if path.exists():
            raise CheckpointError(f"{path} already exists; export into a new file")
    script = find_converter(converter)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        hf = export_hf(ckpt, Path(tmp) / "hf", mtp=False)
        representable(ckpt, hf)
        staged = Path(tmp) / out.name
        _convert(script, hf, staged, type)
        os.replace(staged, out)
    modelfile(out)
    return out


def representable(ckpt: str | Path, hf: Path) -> None:
    """Refuse, in one line, what llama.cpp's deepseek2 cannot load (it would fail or abort)."""
    cfg = json.loads((hf / "config.json").read_text())
    if not cfg.get("n_routed_experts"):
        raise CheckpointError(f"{ckpt}: llama.cpp's deepseek2 needs routed experts; this dense model has none")
    if not cfg.get("q_lora_rank"):
        raise CheckpointError(f"{ckpt}: llama.cpp's deepseek2 needs a compressed query (q_lora_rank); "
                              "this model has none")
    if pre_tokenizer_name(hf / "tokenizer.json") is None:
        raise CheckpointError(f"{ckpt}: its tokenizer's pre-tokenizer is not nanoseek's, and llama.cpp "
                              "would tokenize it differently; export it with export-hf instead")


def _convert(script: Path, hf: Path, out: Path, type: str) -> None:
    cmd = [sys.executable, "-m", "nanoseek.gguf", str(script), str(hf), "--outfile", str(out), "--outtype", type,
           "--model-name", out.stem]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0 or not out.is_file():
        lines = [ln for ln in (run.stderr + run.stdout).splitlines() if ln.strip()]
        raise CheckpointError(f"llama.cpp's converter failed: {lines[-1] if lines else f'exit {run.returncode}'}")


def modelfile(gguf: Path) -> Path:
    """An Ollama Modelfile beside the GGUF: nanoseek's chat format, its stop token and R1's sampling."""
    template = (BOS + "{{- range .Messages }}"
                "{{- if eq .Role \"system\" }}" + SYSTEM + "{{ .Content }}" + EOS
                + "{{- else if eq .Role \"user\" }}" + USER + "{{ .Content }}" + EOS
                + "{{- else if eq .Role \"assistant\" }}" + ASSISTANT + "{{ .Content }}" + EOS
                + "{{- end }}{{- end }}" + ASSISTANT)
    text = (f"# Ollama: ollama create NAME -f {gguf.stem}.Modelfile && ollama run NAME\n"
            f"FROM ./{gguf.name}\n"
            f'TEMPLATE """{template}"""\n'
            f'PARAMETER stop "{EOS}"\n'
            f"PARAMETER temperature {R1_SAMPLING['temperature']}\n"
            f"PARAMETER top_p {R1_SAMPLING['top_p']}\n")
    path = gguf.with_suffix(".Modelfile")  # export_gguf checked that it is new
    path.write_text(text)
    return path


def _run_converter(argv: list[str]) -> None:
    """The converter as it ships, told the name of nanoseek's pre-tokenizer (its table of
    pre-tokenizers is keyed by vocabulary hashes; see the module docstring)."""
    script = Path(argv[0]).resolve()
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
    from conversion.base import TextModel

    by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        return pre_tokenizer_name(Path(self.dir_model) / "tokenizer.json") or by_hash(self, tokenizer)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), *argv[1:]]
    import runpy
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    _run_converter(sys.argv[1:])

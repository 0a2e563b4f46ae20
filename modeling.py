"""Models: loading one (a Hub id or a local directory, safetensors only, no remote code; or a small offline "scratch"
GPT-2 with a BPE tokenizer trained on the data), and adapting it for training (LoRA adapters, gradient checkpointing).
Where it runs is hardware.py's; saving a model, like every directory we write, is checkpoints.py's."""

import contextlib
import os
import re
import warnings

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          PreTrainedTokenizerFast)
from transformers.activations import GELUTanh, NewGELUActivation

import hub
from checkpoints import check_manifest
from cli import UserError, no_such

EOS = "<|endoftext|>"


def parameters(model):
    """(all the model's parameters, those trained): with LoRA, the adapters alone are trained."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))



def load(name):
    """A tokenizer and model from a Hub id or a local directory: safetensors only, no remote code."""
    name = local_path(name)
    if os.path.isdir(name):
        # a big model's weights come in several files, with an index (model.safetensors.index.json)
        missing = [f for f in ("config.json", "model.safetensors") if not os.path.exists(os.path.join(name, f)) and
                   not os.path.exists(os.path.join(name, f + ".index.json"))]
        if missing:
            raise UserError(f"model directory {name!r} is incomplete: no {', '.join(missing)} "
                            f"(a directory written by save_pretrained, with safetensors weights, is expected)")
    tokenizer = load_tokenizer(name)
    with _load_errors(name):
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, use_safetensors=True,
                                                     dtype=torch.float32, local_files_only=cache_only(name))
    return tokenizer, fused_gelu(model)


def load_shape(name):
    """As load(), but without reading the weights: the model's shape on the meta device, taking no memory. Under
    FSDP the ranks but rank 0 start so, and rank 0 sends each its part of the weights (sharding.shard): a machine
    holds one copy of the model while it loads, not one a rank."""
    name = local_path(name)
    tokenizer = load_tokenizer(name)
    with _load_errors(name):
        config = AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=cache_only(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    return tokenizer, fused_gelu(model)


def load_tokenizer(name):
    """The tokenizer alone (all that --show_example needs), checked: it must have an EOS to end dialogues with."""
    name = local_path(name)
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "tokenizer_config.json")):
            raise UserError(f"model directory {name!r} is incomplete: no tokenizer_config.json "
                            f"(a directory written by save_pretrained, with safetensors weights, is expected)")
        problem = check_manifest(name)
        if problem:
            raise UserError(f"model directory {name!r} is damaged: {problem}")
    with _load_errors(name):
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, local_files_only=cache_only(name))
    if tokenizer.eos_token_id is None:
        raise UserError(f"model {name!r}: its tokenizer has no EOS token, which marks the end of a dialogue")
    return tokenizer


def local_path(name):
    """MODEL as given, with ~ expanded; a UserError where it is a path (./x, ../x, /x, ~/x, or a/b/c, or a/b with a
    directory a here) that is not a directory: such a name is no Hub id (those are 'owner/name'), and the Hub's
    answer would only confuse."""
    path = os.path.expanduser(name)
    parts = name.split("/")
    hub_shaped = len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts) and not os.path.isdir(parts[0])
    looks_local = name.startswith(("./", "../", "/", "~", "." + os.sep, ".." + os.sep)) or (
        (os.sep in name or "/" in name) and not hub_shaped)
    if looks_local and not os.path.isdir(path):
        if os.path.exists(path):
            raise UserError(f"MODEL {name!r} is a file; a model directory (written by save_pretrained) is expected")
        raise UserError(f"{no_such('MODEL', path)}: a model directory, a Hugging Face Hub id ('owner/name') or "
                        f"'scratch' is expected")
    return path


@contextlib.contextmanager
def _load_errors(name):
    try:
        yield
    except (OSError, ValueError, EnvironmentError) as e:
        if os.path.isdir(name):
            raise UserError(f"model directory {name!r} could not be loaded: {str(e).splitlines()[0]}") from None
        raise UserError(f"could not load MODEL={name!r}: it is not a local directory, and the Hugging Face Hub is "
                        f"unreachable or has no such model with safetensors weights. Connect once so it is cached, "
                        f"point MODEL at a local copy, or use --model=scratch to train a small model offline") from None


def adapt(model, cfg, adapter=None):
    """What the run trains: gradient checkpointing when asked, and with LORA_R > 0 the model wrapped by peft with
    LoRA adapters (initialised from SEED, or given as `adapter`, a state dict from a checkpoint); every other weight
    is frozen, so it gets no gradient and no optimizer state."""
    if cfg.GRADIENT_CHECKPOINTING:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"GRADIENT_CHECKPOINTING: {type(model).__name__} does not support it")
        # non-reentrant: recomputes exactly (the RNG state too, so dropout masks match) and needs no input grads;
        # transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.LORA_R:
        return model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D
    targets = cfg.LORA_TARGETS or "all-linear"  # peft's name for every linear layer but the output head
    # GPT-2's linear layers are Conv1D, which stores its weight transposed (in x out): peft needs to know, and warns
    # on every run as it finds out for itself
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    torch.manual_seed(cfg.SEED)
    try:
        with warnings.catch_warnings():
            # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates in favour of
            # is_activation_checkpointing with a FutureWarning on every LoRA run: peft's to fix, nothing for a user
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA,
                                                     lora_dropout=cfg.LORA_DROPOUT, target_modules=targets,
                                                     fan_in_fan_out=conv1d, task_type="CAUSAL_LM"))
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise UserError(f"LORA_TARGETS={targets!r}: {str(e).splitlines()[0]}") from None
    if adapter is not None:
        set_peft_model_state_dict(model, adapter)
    return model


def cache_only(name):
    """Offline, a Hub model loads from the local cache at once, or not at all (hub.py): local_files_only alone
    leaves requests that still retry for 20 s each (transformers looking for a LoRA adapter's config beside a cached
    model, the client fetching its own registry)."""
    return not os.path.isdir(name) and hub.offline_unless_reachable()


def fused_gelu(model):
    """GPT-2's "gelu_new" is the tanh GELU written as eight elementwise ops, each a pass over the MLP's activations;
    PyTorch's gelu(approximate="tanh") is the same formula in one kernel (up to a tenth of a CPU step). Weights and
    the saved config are unchanged: a reloaded model computes the same function."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    return model


def build_scratch(cfg, texts, tokenizer=None):
    """A small GPT-2 and a byte-level BPE tokenizer trained on `texts` (unless one is given): no network at all."""
    tokenizer = tokenizer or scratch_tokenizer(cfg, texts)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.BLOCK_SIZE, n_embd=cfg.SCRATCH_EMBD,
                        n_layer=cfg.SCRATCH_LAYERS, n_head=cfg.SCRATCH_HEADS,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(cfg.SEED)
    return tokenizer, fused_gelu(GPT2LMHeadModel(config))


def scratch_tokenizer(cfg, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own pre-tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.SCRATCH_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=cfg.BLOCK_SIZE)


def context_size(model):
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions")

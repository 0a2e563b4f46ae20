"""FSDP=True: the model sharded over the ranks instead of copied to each, and its checkpoints sharded too. PyTorch's
FSDP2 (`fully_shard`) does the sharding, one unit per transformer layer plus the root; torch.distributed.checkpoint
(DCP) writes and reads the checkpoints. Nothing here is written by hand but the glue.

Under DDP every rank holds the whole model, its gradients and AdamW's two moments: 16 bytes a trained parameter (and
DDP's buckets, 4 more). Under FSDP a rank holds 1/N of each, and gathers one layer's weights at a time to compute.

    checkpoints/step-NNNNNNNN/  state.pt      the run's state (as a DDP checkpoint's, less the optimizer), and the
                                              optimizer's param_groups
                                the tokenizer, the model's config.json
                                shards/       DCP: .metadata and one __R_0.distcp a rank: the trained weights and
                                              AdamW's state, each rank's own part
                                manifest.json

A sharded checkpoint is written whole or not at all, like every directory we write (checkpoints.atomic_dir): rank 0
makes the temp directory, every rank writes its shard into it, rank 0 adds the rest, the manifest, and renames it
into place. DCP reads it back on any number of ranks, sharded or not: a run may change its number of ranks, and go on
under DDP or in one process. A DDP or one-process checkpoint resumes under FSDP too: its model directory is loaded
before sharding, and its optimizer state is sharded from the full one. DCP's own reader unpickles what it reads; ours
takes tensors and DCP's own metadata classes only: nothing a file holds can run code.

best/ and final/ stay ordinary Hugging Face directories: the full weights are gathered to rank 0 (in CPU memory, a
tensor at a time) and saved there.
"""

import importlib
import os
import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

import checkpoints
from cli import UserError
import masks
from loss import head_of, trust_head
from masks import hf_model

# ---------------------------------------------------------------------------------------------------------------------
# sharding the model

def layers(model):
    """The model's transformer layers: the modules whose class the model names in _no_split_modules (GPT2Block,
    LlamaDecoderLayer, ...), found inside peft's wrapper too."""
    hf = hf_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or ())
    found = [m for m in hf.modules() if type(m).__name__ in names]
    if not found:
        raise UserError(f"FSDP: {type(hf).__name__} names no transformer layers (_no_split_modules) to shard by")
    return found


def shard(net, model, device, dtype):
    """`net` (loss.ChunkedLoss around `model`) sharded over the ranks in place, on `device`: each layer a unit (its
    weights gathered for its forward and backward, then freed), the root the rest (embeddings, final norm, output
    layer). In bf16 (CUDA's default), the weights are kept in fp32 and computed in bf16, the gradients reduced in
    fp32. Rank 0 holds the weights (the other ranks may hold the model's shape alone, on the meta device:
    modeling.load_shape) and sends each rank its part; it checks the chunked loss and the packing masks on the whole
    model first (loss.probe, masks.probe), and the others take its word."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    master, ranks = dist.get_rank() == 0, dist.get_world_size()
    verdict = [(head_of(model) is not None, masks.form(model)) if master else None]
    dist.broadcast_object_list(verdict)
    trust_head(model, verdict[0][0])
    masks.trust(model, verdict[0][1])
    full = net.state_dict() if master and ranks > 1 else {}
    mesh = init_device_mesh(device.type, (ranks,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for layer in layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    if ranks == 1:  # a group of one: the weights are there already
        return net
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        net.to_empty(device=device)
    set_model_state_dict(net, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in net.buffers():  # those no state dict holds too (rotary frequencies): rank 0's
        dist.broadcast(buffer, 0)
    return net


def full_weights(net):
    """The model's full state dict, keyed as model.state_dict() is, gathered to rank 0's CPU memory (the other ranks
    get an empty dict). Every rank must call it."""
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (GPT-2's output layer is its input embeddings) comes back as two tensors: saved once, as
    # save_pretrained saves it
    tied = {n for n, _ in net.named_parameters(remove_duplicate=False)} - {n for n, _ in net.named_parameters()}
    return {k.removeprefix("model."): v for k, v in full.items() if k not in tied}


# ---------------------------------------------------------------------------------------------------------------------
# sharded checkpoints

def trained(net, weights):
    """Only what is trained goes into a checkpoint: a LoRA run's adapters (its base is MODEL, unchanged)."""
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    return {k: v for k, v in weights.items() if k in names}


def save(out_dir, net, optimizer, tokenizer, config, state, keep):
    """Checkpoint state['step'] of an FSDP run, every rank writing its own shard; then the oldest pruned down to
    `keep` (rank 0). Every rank must call it. `net` is the sharded loss.ChunkedLoss; `config` the model's."""
    model_sd, optim_sd = get_state_dict(net, optimizer)
    path = os.path.join(out_dir, "checkpoints", f"step-{state['step']:08d}")
    master, known = dist.get_rank() == 0, {}

    def write(tmp):
        shards = os.path.join(tmp, "shards")
        dcp.save({"model": trained(net, model_sd), "optim": optim_sd["state"]},
                 storage_writer=dcp.FileSystemWriter(shards))
        # the manifest's entries for its own files, hashed by each rank at once (not all of them by rank 0)
        mine = {f"shards/{f}": {"size": os.path.getsize(os.path.join(shards, f)),
                                "sha256": checkpoints.sha256(os.path.join(shards, f))}
                for f in os.listdir(shards) if f.startswith(f"__{dist.get_rank()}_")}
        hashed = [None] * dist.get_world_size()
        dist.all_gather_object(hashed, mine)
        if master:
            for entries in hashed:
                known.update(entries)
            tokenizer.save_pretrained(tmp)
            config.save_pretrained(tmp)
            torch.save({**state, "optimizer": None, "param_groups": optim_sd["param_groups"], "sharded": True},
                       os.path.join(tmp, "state.pt"))

    try:
        if master:
            with checkpoints.atomic_dir(path, known) as tmp:
                dist.broadcast_object_list([tmp])
                write(tmp)
        else:
            tmp = [None]
            dist.broadcast_object_list(tmp)
            write(tmp[0])
    except (OSError, CheckpointException) as e:
        raise UserError(f"could not write {path}: {reason(e)}; what was there before is intact") from None
    if master:
        checkpoints.prune(out_dir, path, keep)


def load(path, net, optimizer, param_groups):
    """A sharded checkpoint's weights and optimizer state into `net` (loss.ChunkedLoss: sharded or not, on any number
    of ranks; DCP reshards) and `optimizer`."""
    model_sd, optim_sd = get_state_dict(net, optimizer)  # the shapes to read into; the optimizer's state made
    want = {"model": trained(net, model_sd), "optim": optim_sd["state"]}
    reader = SafeReader(os.path.join(path, "shards"))
    try:
        reader.read_metadata()  # refused here, before DCP would fall back to other files with a traceback each
        dcp.load(want, storage_reader=reader, planner=SafePlanner())
    except (Exception, CheckpointException) as e:  # refused, or not what this model has
        raise UserError(f"{path}: the sharded checkpoint does not load into this run's model ({reason(e)})") from None
    set_state_dict(net, optimizer, model_state_dict=want["model"],
                   optim_state_dict={"state": want["optim"], "param_groups": param_groups},
                   options=StateDictOptions(strict=False))


def reason(e):
    """An error in one line. DCP raises every rank's error on every rank, with its traceback: the first rank's."""
    if isinstance(e, CheckpointException) and e.failures:
        _, (e, _) = min(e.failures.items(), key=lambda kv: kv[0])
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def load_full_optimizer(net, optimizer, saved):
    """A DDP or one-process checkpoint's optimizer state (optimizer.state_dict(): parameters by number) into a sharded
    run's `optimizer`: numbered as the optimizer numbers its parameters, named, then sharded by DCP's helpers."""
    names = {id(p): n for n, p in net.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full = {"state": {order[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, full, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------------------------------
# reading DCP files without running code

SAFE_MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}


class MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: this reads it taking only DCP's metadata classes, torch's sizes, dtypes and
    layouts, and paths; any other global (os.system, say) is refused."""

    def find_class(self, module, name):
        if module in SAFE_MODULES and not name.startswith("__"):
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type):
                return found
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "Path")):
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(dcp.DefaultLoadPlanner):
    """Tensors DCP reads with torch.load(weights_only=True) itself; anything else it would unpickle in full. Our
    checkpoints hold tensors only (the param_groups are in state.pt), so anything else is refused."""

    def load_bytes(self, read_item, value):
        raise pickle.UnpicklingError(f"{read_item.dest_index.fqn} is not a tensor")

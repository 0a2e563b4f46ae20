"""The job's processes and how they hold the model, decided once. `World` is who the processes are: torchrun's ranks
(`torchrun --nproc_per_node=N train.py`), or one plain `python train.py`. A layout is how they share the model:

    Single   one process, the whole model
    DDP      each rank a whole copy; the gradients are averaged over the ranks after a step's last micro-batch
    FSDP     each rank a shard of the weights, gradients and AdamW state (sharding.py), gathered a layer at a time

A layout holds the model (`model`, the Hugging Face model; `net`, what a training step runs: the model with its loss
as one module, compiled or wrapped as the layout needs; `scorer`, what validation runs), and it alone knows what
differs between the three: whether this rank reads the weights, the gradient sync between micro-batches, the memory
the step needs, the full weights of a model to save, how a checkpoint is written and read, and the barrier after a
write, so that no rank runs ahead of one that is still writing. Rank 0, the `master`, prints and writes the run's
files."""

import contextlib
import os

import torch
import torch.distributed as dist

import checkpoints
import hardware
import memory
from loss import ChunkedLoss


class World:
    """This job's processes: this one is `rank` of `size`, `local_size` of them on this machine; rank 0 is the
    `master`. `device`: the device torchrun's rank must use (its own GPU), or None where the DEVICE setting decides.
    A world of one has no process group, unless FSDP makes one (group_of_one)."""

    def __init__(self, rank=0, size=1, local_size=1, backend=None, device=None):
        self.rank, self.size, self.local_size, self.backend, self.device = rank, size, local_size, backend, device
        self.master = rank == 0

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def gather(self, obj):
        """Every rank's `obj` (any picklable value), in rank order."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, tensor):
        """`tensor` summed over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def max(self, n, device):
        """The largest of every rank's integer `n`."""
        if self.size == 1:
            return n
        flag = torch.tensor([n], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def close(self):
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def start(device_setting):
    """The World this process is part of: under torchrun its ranks' process group (nccl, each rank on its own GPU,
    where CUDA is there and DEVICE allows it; else gloo on the CPU), else a world of one."""
    size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if size == 1:
        return World()
    if torch.cuda.is_available() and device_setting in ("auto", "cuda"):
        device, backend = f"cuda:{int(os.environ['LOCAL_RANK'])}", "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = "cpu", "gloo"
    init_processes(backend, rank, size)
    return World(rank, size, int(os.environ.get("LOCAL_WORLD_SIZE") or 1), backend, device)


def init_processes(backend, rank, world):
    """torch.distributed's process group, from torchrun's environment. Under --max-restarts, the store torchrun
    shares with its workers outlives a restart and still holds the dead attempt's addresses, which the new one can
    read before they are replaced (pytorch/pytorch#135712: a restart fails at random). On one machine every rank has
    the same restart count, so each attempt takes keys of its own; across machines the counts can differ, and
    the elastic command in docs/distributed.md turns the sharing off instead (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("LOCAL_WORLD_SIZE") != str(world):
        return dist.init_process_group(backend)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False)
    attempt = dist.PrefixStore(f"dialogue-finetune/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=attempt, rank=rank, world_size=world)


def layout(world, fsdp, device, dtype):
    """The layout a run uses: FSDP where asked (in one process too), else DDP under torchrun, else Single."""
    return (FSDP if fsdp else DDP if world.size > 1 else Single)(world, device, dtype)


# ---------------------------------------------------------------------------------------------------------------------

class Single:
    """One process holds the whole model. The base of the other two: what they do alike is here."""
    name = None  # in the device line: how the ranks share the model

    def __init__(self, world, device, dtype=None):
        self.world, self.device, self.dtype = world, device, dtype
        self.rank, self.size, self.master = world.rank, world.size, world.master
        self.model = self.net = self.scorer = None

    @property
    def reads_weights(self):
        """Whether this rank loads the model's weights (else its shape alone: modeling.load_shape)."""
        return True

    def wrap(self, model, cfg=None):
        """Take `model` (on the CPU, as loaded) onto the device, with its loss as one module (loss.ChunkedLoss: the
        loss never holds the full logits): `scorer` for validation, `net` for a training step, compiled where
        cfg.COMPILE. `cfg` None: the model is only scored. Returns a line to print, or None."""
        self.model = model
        self.scorer = ChunkedLoss(model).to(self.device).train(model.training)  # in the model's mode, as it is
        self.net = torch.compile(self.scorer) if cfg is not None and cfg.COMPILE else self.scorer
        return None

    def autocast(self):
        return hardware.autocast(self.device, self.dtype)

    def micro_batch(self, last):
        """The context a step's micro-batch runs forward and backward in: `last`, the step's last, whose backward
        makes the gradients that the update uses. One process has nothing to sync."""
        return contextlib.nullcontext()

    def preflight(self, cfg):
        """memory.preflight for this layout: a UserError where a step cannot fit, a warning line, or None."""
        return memory.preflight(self.model, cfg, self.device, self.dtype, self.size, self.world.local_size)

    def full_weights(self):
        """The model's whole state dict where the model cannot give it itself (FSDP's); else None."""
        return None

    def save_model(self, tokenizer, path):
        """best/ or final/, a Hugging Face model directory, written by rank 0 while the others wait."""
        weights = self.full_weights()
        if self.master:
            checkpoints.save_model(self.model, tokenizer, path, weights=weights)
        self.world.barrier()

    def save_checkpoint(self, out_dir, tokenizer, optimizer, state, keep):
        """checkpoints/step-N with the run's `state` and the optimizer's, written by rank 0 while the others wait;
        then the oldest pruned down to `keep`."""
        if self.master:
            checkpoints.save(out_dir, self.model, tokenizer, {**state, "optimizer": optimizer.state_dict()}, keep)
        self.world.barrier()

    def load_checkpoint(self, path, state, optimizer):
        """A checkpoint's optimizer state into `optimizer`; from an FSDP checkpoint (of any number of ranks), the
        trained weights too, resharded as this layout holds them."""
        if state.get("sharded"):
            import sharding
            sharding.load(path, self.scorer, optimizer, state["param_groups"])
        else:
            optimizer.load_state_dict(state["optimizer"])

    def describe(self):
        """What the device line adds: the processes and how they share the model."""
        if self.world.backend is None:
            return ""
        return f"; {self.size} process{'es' * (self.size > 1)} ({self.world.backend}, {self.name})"

    def close(self):
        self.world.close()


class DDP(Single):
    """Every rank holds the whole model; torch's DistributedDataParallel averages the gradients over the ranks in
    the backward pass of a step's last micro-batch."""
    name = "DDP"

    def wrap(self, model, cfg=None):
        from torch.nn.parallel import DistributedDataParallel
        super().wrap(model, cfg)
        # DDP syncs the gradients of what runs inside its own forward: the whole loss module, not the model alone
        self.net = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None)
        return None

    def micro_batch(self, last):
        return contextlib.nullcontext() if last else self.net.no_sync()


class FSDP(Single):
    """Every rank holds a shard of each weight, gradient and AdamW state (PyTorch's FSDP2, sharding.py). Rank 0 reads
    the weights and sends each rank its part; best/ and final/ gather them back; checkpoints are sharded (DCP)."""
    name = "FSDP"

    def __init__(self, world, device, dtype=None):
        if not dist.is_initialized():  # FSDP=True in one process: the sharded code path needs a group, of one
            world.backend = group_of_one(device)
        if device.type == "cpu":
            hardware.return_freed_memory()
        super().__init__(world, device, dtype)
        self.reduce_every_micro_batch = False

    @property
    def reads_weights(self):
        return self.master

    def wrap(self, model, cfg=None):
        """Shard the model, its weights going to the device a layer at a time (never the whole model at once), and
        choose how the gradients are reduced between micro-batches (memory.keeps_gradients)."""
        import sharding
        self.model = model
        self.scorer = self.net = ChunkedLoss(model).train(model.training)
        sharding.shard(self.net, model, self.device, self.dtype)
        if cfg is None or memory.keeps_gradients(model, cfg, self.device, self.dtype, self.size,
                                                  self.world.local_size):
            return None
        self.reduce_every_micro_batch = True
        return (f"FSDP: every micro-batch reduce-scatters its gradients: holding them unsharded over "
                f"GRAD_ACCUM_STEPS={cfg.GRAD_ACCUM_STEPS} micro-batches would not fit in memory")

    def micro_batch(self, last):
        # the earlier micro-batches keep their gradients unsharded, as DDP's no_sync does, unless memory forbids
        self.net.set_requires_gradient_sync(last or self.reduce_every_micro_batch)
        return contextlib.nullcontext()

    def preflight(self, cfg):
        return memory.preflight(self.model, cfg, self.device, self.dtype, self.size, self.world.local_size,
                                sharded=True, unsharded=not self.reduce_every_micro_batch)

    def full_weights(self):
        import sharding
        return sharding.full_weights(self.net)  # every rank sends its part to rank 0

    def save_checkpoint(self, out_dir, tokenizer, optimizer, state, keep):
        import sharding
        sharding.save(out_dir, self.net, optimizer, tokenizer, self.model.config, state, keep)
        self.world.barrier()

    def load_checkpoint(self, path, state, optimizer):
        import sharding
        if state.get("sharded"):
            return super().load_checkpoint(path, state, optimizer)
        sharding.load_full_optimizer(self.net, optimizer, state["optimizer"])  # a DDP or one-process checkpoint's


def group_of_one(device):
    """A process group of this process alone; returns its backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    if "MASTER_ADDR" in os.environ:  # torchrun --nproc_per_node=1
        dist.init_process_group(backend)
    else:  # no rendezvous needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return backend

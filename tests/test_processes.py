"""processes.py: the job's processes and the layout that holds the model (one process, DDP or FSDP), decided once.
Layouts of a world of one here (DDP and FSDP in a group of one, gloo); tests/test_train_torchrun.py runs them on two
ranks with torchrun.

Run: .venv/bin/python -m pytest -q tests/test_processes.py
"""

import os

import pytest
import torch
import torch.distributed as dist
import transformers

import checkpoints
import processes
import step
from batching import IGNORE
from tiny import gpt2_tokenizer

CPU = torch.device("cpu")


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16,
                                                                n_layer=2, n_head=2, resid_pdrop=0.0,
                                                                embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.fixture
def group_of_one():
    """A process group of this process alone, as torchrun --nproc_per_node=1 would make (DDP needs one)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_one_process_is_a_world_of_one_without_collectives(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    world = processes.start("auto")
    assert (world.rank, world.size, world.local_size, world.master, world.backend) == (0, 1, 1, True, None)
    assert not dist.is_initialized()  # a plain `python train.py` makes no process group
    assert world.gather({"a": 1}) == [{"a": 1}] and world.max(3, CPU) == 3
    t = torch.tensor([2.0])
    assert world.sum(t) is t and t.item() == 2.0
    layout = processes.layout(world, False, CPU, None)
    assert type(layout) is processes.Single and layout.reads_weights and layout.describe() == ""


def test_the_layout_is_chosen_once_from_the_world_and_fsdp():
    assert type(processes.layout(processes.World(0, 2), False, CPU, None)) is processes.DDP
    assert type(processes.layout(processes.World(1, 2), False, CPU, None)) is processes.DDP
    assert type(processes.layout(processes.World(), False, CPU, None)) is processes.Single


@pytest.mark.parametrize("training", [True, False])
def test_single_holds_the_model_with_its_loss_in_its_mode(training):
    model = gpt2().train(training)
    layout = processes.Single(processes.World(), CPU)
    assert layout.wrap(model) is None
    assert layout.model is model and layout.scorer.model is model and layout.net is layout.scorer
    assert layout.scorer.training == training and model.training == training
    with layout.micro_batch(last=False):  # nothing to sync in one process
        pass
    x = torch.randint(0, 50257, (2, 8))
    y = torch.where(x % 2 == 0, x, IGNORE)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
        assert layout.scorer(x, y).item() == pytest.approx(want.item(), rel=1e-5)


def test_ddp_skips_the_gradient_sync_but_on_a_step_s_last_micro_batch(group_of_one):
    world = processes.World(0, 1, backend="gloo")
    layout = processes.DDP(world, CPU)
    layout.wrap(gpt2().train())
    assert isinstance(layout.net, torch.nn.parallel.DistributedDataParallel) and layout.net.module is layout.scorer
    with layout.micro_batch(last=False):
        assert not layout.net.require_backward_grad_sync
    with layout.micro_batch(last=True):
        assert layout.net.require_backward_grad_sync
    assert layout.describe() == "; 1 process (gloo, DDP)"


def test_fsdp_in_one_process_makes_its_own_group_and_reduces_only_where_asked():
    layout = processes.FSDP(processes.World(), CPU)
    try:
        assert dist.is_initialized() and layout.world.backend == "gloo"  # a group of one, made by the layout
        assert layout.reads_weights  # rank 0 of one
        assert layout.wrap(gpt2().train()) is None  # no settings: the gradients stay unsharded between micro-batches
        calls = []
        layout.net.set_requires_gradient_sync = calls.append
        for last in (False, True):
            with layout.micro_batch(last):
                pass
        layout.reduce_every_micro_batch = True
        with layout.micro_batch(False):
            pass
        assert calls == [False, True, True]
        assert layout.describe() == "; 1 process (gloo, FSDP)"
    finally:
        dist.destroy_process_group()


def test_only_rank_0_of_fsdp_reads_the_weights():
    class Rank1(processes.World):
        def __init__(self):
            super().__init__(1, 2)

    layout = processes.FSDP.__new__(processes.FSDP)  # the layout of rank 1 of 2, without its group
    processes.Single.__init__(layout, Rank1(), CPU)
    assert not layout.master and not layout.reads_weights


def test_a_rank_0_write_is_followed_by_a_barrier(tmp_path, monkeypatch):
    """Every rank-0 write of a layout ends with a barrier, so no rank runs ahead of a write (or exits before it is
    done); the loop has none of its own."""
    events = []

    class Watched(processes.World):
        def barrier(self):
            events.append("barrier")

    monkeypatch.setattr(checkpoints, "save_model", lambda *a, **k: events.append("model"))
    monkeypatch.setattr(checkpoints, "save", lambda *a, **k: events.append("checkpoint"))
    layout = processes.Single(Watched(), CPU)
    layout.wrap(gpt2())
    layout.save_model(gpt2_tokenizer(), str(tmp_path / "best"))
    optimizer = step.make_optimizer(layout.model, 1e-3, 0.0, (0.9, 0.999))
    layout.save_checkpoint(str(tmp_path), gpt2_tokenizer(), optimizer, {"step": 1}, 2)
    assert events == ["model", "barrier", "checkpoint", "barrier"]
    events.clear()
    layout.master = False  # another rank: no write, the same barrier
    layout.save_model(gpt2_tokenizer(), str(tmp_path / "best"))
    layout.save_checkpoint(str(tmp_path), gpt2_tokenizer(), optimizer, {"step": 1}, 2)
    assert events == ["barrier", "barrier"]


def test_a_checkpoint_of_one_process_resumes_in_one_process(tmp_path):
    """save_checkpoint and load_checkpoint round-trip the optimizer's state."""
    layout = processes.Single(processes.World(), CPU)
    layout.wrap(gpt2().train())
    optimizer = step.make_optimizer(layout.model, 1e-3, 0.0, (0.9, 0.999))
    x = torch.randint(0, 50257, (2, 8))
    step.train_step(layout, optimizer, None, [(x, x, None)], 1.0)
    layout.save_checkpoint(str(tmp_path), gpt2_tokenizer(), optimizer, {"step": 1}, 2)
    state = torch.load(os.path.join(tmp_path, "checkpoints", "step-00000001", "state.pt"), weights_only=True)
    other = processes.Single(processes.World(), CPU)
    other.wrap(gpt2().train())
    fresh = step.make_optimizer(other.model, 1e-3, 0.0, (0.9, 0.999))
    other.load_checkpoint(None, state, fresh)
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    for k, v in optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], fresh.state_dict()["state"][k]["exp_avg"])

"""Tests for checkpoints.py: the rules for resuming a run in OUT_DIR (which settings are the run's, which may change)
and its global batch split over another number of processes. Writing, checking and recovering checkpoints is tested
through train.py, in test_train_faults.py and test_train.py.

Run: .venv/bin/python -m pytest -q tests/test_checkpoints.py
"""

import pytest

import checkpoints
import cli
from checkpoints import split_batch


# ---------------------------------------------------------------------------------------------------------------------
# resuming: the run's own settings, and the ones that may change

def test_resume_config_keeps_the_run_s_own_settings():
    """A 10-epoch run resumed with `--resume=True` alone stays a 10-epoch run (config.py says EPOCHS=3); --epochs may
    extend it; a setting newer than the run is protected too: the run had config.py's value."""
    saved = {**cli.defaults(), "EPOCHS": 10, "BETAS": [0.9, 0.98], "RESUME": False, "OUT_DIR": "elsewhere"}
    del saved["VAL_MAX_TOKENS"]  # as if the run were older than this setting
    given = set()
    cfg, taken = checkpoints.resume_config(cli.load_config(["--resume=True"], given=given), given, saved, "ckpt", print)
    assert cfg.EPOCHS == 10 and cfg.BETAS == (0.9, 0.98) and cfg.RESUME is True and cfg.OUT_DIR == "out"
    assert taken == ["BETAS", "EPOCHS"]
    given = set()
    cfg, _ = checkpoints.resume_config(cli.load_config(["--resume=True", "--epochs=12", "--log_interval=1"],
                                                       given=given), given, saved, "ckpt", print)
    assert cfg.EPOCHS == 12 and cfg.LOG_INTERVAL == 1
    given = set()
    with pytest.raises(cli.UserError, match=r"--val_max_tokens=5 \(the run has --val_max_tokens=100000\)"):
        checkpoints.resume_config(cli.load_config(["--resume=True", "--val_max_tokens=5"], given=given), given, saved,
                                  "ckpt", print)


def test_loss_chunk_may_change_on_resume():
    """How the loss is chunked changes its memory, not its numbers (to rounding): a resumed run may take another."""
    saved = {**cli.defaults(), "LOSS_CHUNK": 64}
    given = set()
    cfg, _ = checkpoints.resume_config(cli.load_config(["--resume=True", "--loss_chunk=8"], given=given), given, saved,
                                       "ck", print)
    assert cfg.LOSS_CHUNK == 8


# ---------------------------------------------------------------------------------------------------------------------
# a run's global batch on another number of processes

def settings(batch, accum):
    """A run's BATCH_SIZE and GRAD_ACCUM_STEPS, in its settings as cli.load_config makes them."""
    return cli.load_config([f"--batch_size={batch}", f"--grad_accum_steps={accum}"])


def test_split_batch():
    cfg = settings(4, 2)
    assert split_batch(cfg, set(), (4, 2, 2), 1) == (4, 4, "")
    assert split_batch(cfg, set(), (4, 2, 2), 4) == (4, 1, "")
    assert split_batch(settings(2, 2), {"BATCH_SIZE"}, (4, 2, 2), 2) == (2, 4, "")
    assert split_batch(settings(4, 8), {"GRAD_ACCUM_STEPS"}, (4, 2, 2), 1) == (2, 8, "")
    # scale-up: a 1-process run of BATCH_SIZE=4 on 8 ranks takes 2 blocks a rank; the largest batch that divides it
    assert split_batch(cfg, set(), (4, 2, 2), 8) == (2, 1, " (BATCH_SIZE=4 does not divide a process's 2 blocks; 2 "
                                                          "is the largest that does)")
    assert split_batch(settings(3, 1), set(), (4, 1, 1), 1)[:2] == (2, 2)
    # an elastic job's command line stays as it began: BATCH_SIZE is kept, GRAD_ACCUM_STEPS made up
    assert split_batch(cfg, {"BATCH_SIZE", "GRAD_ACCUM_STEPS"}, (4, 2, 2), 1) == (4, 4, "")
    batch, accum, note = split_batch(settings(4, 3), {"GRAD_ACCUM_STEPS"}, (4, 2, 2), 1)
    assert (batch, accum) == (4, 4) and "GRAD_ACCUM_STEPS=3 does not divide a process's 16 blocks" in note
    with pytest.raises(cli.UserError,
                       match=r"does not divide over 3 processes; resume it on 1, 2, 4, 8 or 16 processes"):
        split_batch(cfg, set(), (4, 2, 2), 3)

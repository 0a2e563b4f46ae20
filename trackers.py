"""Where a run's figures go besides metrics.jsonl, as REPORT_TO asks: TensorBoard events in OUT_DIR/tensorboard, and a
Weights & Biases run. Each package is imported only when asked for: neither is needed to train.

A resumed run redoes the steps after its checkpoint, which the process before may have logged already. metrics.jsonl
drops its lines after that step (checkpoints.begin), TensorBoard purges its events after it, and a W&B run, whose steps
only go up, is continued under the same id (kept in config.json and every checkpoint) and sent only the steps after
the last one logged before: each step appears once in each."""

import os

from cli import UserError

KINDS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def chosen(report_to):
    """REPORT_TO as a list of trackers: "none", one name, or a list of names."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n != "none"]


def check(report_to, installed=True):
    """REPORT_TO's names known and (`installed`) their packages there, before anything is written; a UserError where
    not."""
    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in ("none", *KINDS) for n in names):
        raise UserError(f"REPORT_TO must be 'none', 'tensorboard', 'wandb' or a list of them, like "
                        f"['tensorboard', 'wandb'], got {report_to!r}")
    for name in chosen(report_to) if installed else ():
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else "wandb")
        except ImportError:
            raise UserError(f"REPORT_TO={name!r} needs the {name} package: {INSTALL[name]} (or --report_to=none)") \
                from None


class Trackers:
    """The run's trackers (rank 0's): log(record) sends a metrics.jsonl record to each, close() ends them. `step`:
    the step the run starts from, `resumed`: whether it continues one; `logged`: the last step the process before
    logged (None: none), `run_id`: the run's own id; `cfg`: its settings."""

    def __init__(self, cfg, step, resumed, logged, run_id):
        names = chosen(cfg.REPORT_TO)
        self.board = self.wandb = None
        self.logged = logged if resumed and logged is not None else -1
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(os.path.join(cfg.OUT_DIR, "tensorboard"), flush_secs=10,
                                       purge_step=step + 1 if resumed else 0)
        if "wandb" in names:
            import wandb
            # the project from WANDB_PROJECT where set, as wandb's own scripts take it; the run named for OUT_DIR
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT") or "dialogue-finetune", id=run_id,
                                    name=os.path.basename(os.path.abspath(cfg.OUT_DIR)), resume="allow",
                                    config=vars(cfg))

    def log(self, record):
        figures = {f"{'val' if k.startswith('val') else 'train'}/{k}": v for k, v in record.items()
                   if k not in ("step", "epoch")}
        step = record["step"]
        if self.board is not None:
            for key, value in figures.items():
                self.board.add_scalar(key, value, step)
        if self.wandb is not None and step > self.logged:
            self.wandb.log(figures, step=step)

    def close(self):
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()

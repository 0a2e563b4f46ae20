"""An experiment is a file of settings: NAME = value lines, each a Python literal, read (never run) over config.py's;
the command line overrides them in turn.

    python train.py experiments/small_lr.py                 # this experiment
    python train.py experiments/small_lr.py --epochs=2      # the same with two epochs
    python evaluate.py experiments/small_lr.py              # evaluates its run: OUT_DIR is the experiment's

A gentler fine-tune than config.py's: a lower peak rate, a longer warmup, and an end once validation stops improving.
"""
LEARNING_RATE = 2e-5
WARMUP_STEPS = 50
EPOCHS = 6
EVAL_INTERVAL = 50
EARLY_STOP_EVALS = 3  # three validations without a new best end the run; best/ holds the best
OUT_DIR = "out/small_lr"

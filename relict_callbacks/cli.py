"""The ``relict`` command: ``relict audit`` (folders of scans -> report), ``relict bank build``, ``relict demo``.

Exit status: 0 done (and, with ``--fail-above``, within the limit); 1 the replica rate is above
``--fail-above``; 2 usage error or bad input (the message names the option or file and the problem; nothing
is written to ``--out``). A bad *synthetic* image does not stop an audit: it gets a row with its error in
``results.csv`` and the others are scored (``--strict``: exit 2 instead). A bad training or holdout image
stops it, because it changes the reference.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

LEVEL_NAMES = ("voxel", "feature", "segmentation")
EXIT_CODES = ("exit status: 0 done (with --fail-above: within the limit); 1 the replica rate is above --fail-above; "
              "2 usage error or bad input (named; nothing written to --out); 3 the run failed (e.g. the GPU ran out "
              "of memory): no verdict")


class UsageError(ValueError):
    """Options that do not fit together."""


def _number(integer: bool = False, **bounds):
    """An argparse type: a finite number (a whole one when ``integer``) within ``bounds`` (see check_number)."""
    from .validation import check_number

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if integer else ''}number, got {text!r}") from None
        try:
            return check_number("value", value, integer=integer, **bounds)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


RATE = _number(low=0, high=1)
PROBABILITY = _number(low=0, high=1, low_open=True, high_open=True)
COUNT = _number(integer=True, low=1)


def _add_bank_arguments(parser: argparse.ArgumentParser, train_required: bool) -> None:
    parser.add_argument("--train", type=Path, required=train_required, help="folder of training images")
    parser.add_argument("--train-labels", type=Path, help="their labels (matched by file name), for segmentation")
    parser.add_argument("--holdout", type=Path, help="real images NOT used in training, for calibration "
                        "(default: leave-one-out on the training set)")
    parser.add_argument("--holdout-labels", type=Path, help="labels of the holdout images")
    parser.add_argument("--levels", help="comma-separated levels among voxel, segmentation (default: voxel, plus "
                        "segmentation when --train-labels is given); feature needs a model and is Python-only")
    parser.add_argument("--grid", type=_number(integer=True, low=2), help="voxels per axis of the common grid (default 128 for 2D, 64 for 3D)")
    parser.add_argument("--spacing", type=_number(low=0, low_open=True), help="isotropic voxel size in mm of the 3D grid (default: the first "
                        "training volume's largest extent fills the grid)")
    parser.add_argument("--device", default="cpu", help="where images are embedded and searched: cpu, cuda, "
                        "cuda:1, ... (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relict", description="Replica detection for medical image generators.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a MONAI DDPM with Lightning on phantoms until ReplicaMonitor "
                                             "stops it (--planted: score a synthetic set with planted copies)")
    demo.add_argument("--out", default="relict_demo", help="folder for all outputs")
    demo.add_argument("--planted", action="store_true", help="the offline demo: no training, planted copies")
    demo.add_argument("--epochs", type=COUNT, default=150, help="most training epochs (training demo)")
    demo.add_argument("--every", type=COUNT, default=10, help="check every N epochs (training demo)")
    demo.add_argument("--kind", choices=["head_ct", "mra"], default="head_ct", help="phantoms (--planted)")
    demo.add_argument("--ndim", type=int, choices=[2, 3], default=2, help="2D or 3D (--planted)")
    demo.add_argument("--size", type=_number(integer=True, low=8), default=64, help="image size (--planted)")
    demo.add_argument("--no-progress", action="store_true")

    audit = commands.add_parser("audit", help="score a folder of synthetic images against the training set",
                                description="Score every synthetic image against the training set (or a bank "
                                "built with `relict bank build`) and write summary.json, results.csv and "
                                "report.html into --out. A synthetic image that cannot be scored (unreadable, "
                                "constant, NaN, wrong shape) gets a row with its error in results.csv and the "
                                "others are scored; a bad training or holdout image is an error, as it changes "
                                "the reference.", epilog=EXIT_CODES)
    _add_bank_arguments(audit, train_required=False)
    audit.add_argument("--bank", type=Path, help="a bank from `relict bank build`, instead of --train")
    audit.add_argument("--synthetic", type=Path, required=True, help="folder of synthetic images")
    audit.add_argument("--synthetic-labels", type=Path, help="their labels, for the segmentation level")
    audit.add_argument("--threshold", action="extend", nargs="+", default=[], metavar="LEVEL=VALUE",
                       help="explicit thresholds in [-1, 1], e.g. voxel=0.92 (default: calibrated on the null)")
    audit.add_argument("--alpha", type=PROBABILITY, default=0.01, help="bound on the fraction of unseen patients flagged overall, whatever --rule "
                       "(default 0.01)")
    audit.add_argument("--rule", choices=["any", "all", "majority"], default="any",
                       help="levels that must flag a sample (default any)")
    audit.add_argument("--confidence", type=PROBABILITY, default=0.95, help="confidence of the bounds on the "
                       "replica rate (default 0.95)")
    audit.add_argument("--fail-above", type=RATE, metavar="RATE", help="exit with status 1 when the replica "
                       "rate exceeds RATE (e.g. 0 or 0.05)")
    audit.add_argument("--gallery", type=_number(integer=True, low=0), default=8, metavar="N", help="most similar pairs shown (default 8)")
    audit.add_argument("--hide-training-images", action="store_true",
                       help="leave training images (patient data) out of the report")
    audit.add_argument("--strict", action="store_true", help="any bad synthetic image fails the audit (exit 2, naming "
                       "the first in file order and counting the others; nothing is written)")
    audit.add_argument("--out", type=Path, required=True, help="folder for the report, replaced atomically; refused "
                       "if it is, holds or lies inside an input, or is a non-empty folder relict did not write")

    bank = commands.add_parser("bank", help="reference banks")
    bank_commands = bank.add_subparsers(dest="bank_command", required=True)
    build = bank_commands.add_parser("build", help="embed a training folder once, for `relict audit --bank`",
                                     epilog=EXIT_CODES)
    _add_bank_arguments(build, train_required=True)
    build.add_argument("--out", type=Path, required=True, help="bank file to write (.npz); refused if it is or "
                       "lies inside an input, or is a file that is not a relict bank")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo" and args.planted:
        from .demos.planted import run_demo

        run_demo(args.out, args.kind, args.ndim, args.size, progress=not args.no_progress)
        return 0
    if args.command == "demo":
        try:
            from .demos.training import main as run_training_demo
        except ModuleNotFoundError as error:  # the training demo needs the lightning and monai extras
            print(f"relict demo: needs {error.name!r}, which is not installed; install the extras with\n"
                  "  pip install -c constraints.txt \"relict-callbacks[lightning,monai]\"\n"
                  "or run the offline demo without them: relict demo --planted", file=sys.stderr)
            return 2
        run_training_demo(args.out, max_epochs=args.epochs, every_n_epochs=args.every, progress=not args.no_progress)
        return 0
    from .bank import BankError

    try:
        with warnings.catch_warnings():  # warnings as one plain line, restored afterwards
            warnings.showwarning = _show_warning
            return _audit(args) if args.command == "audit" else _build_bank(args)
    except (ValueError, BankError, OSError) as err:  # ItemError, ReadError, BankError, UsageError: bad input
        print(f"relict: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # e.g. out of memory (torch's or the host's): no verdict, so not 1, which gates pipelines
        hint = " (a smaller --grid, or --device cpu)" if "out of memory" in str(err).lower() else ""
        print(f"relict: error: the run failed, no verdict: {type(err).__name__}: {err}{hint}", file=sys.stderr)
        return 3


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"relict: warning: {message}", file=sys.stderr)


def _levels(args, labelled: bool) -> list:
    from .levels import SegmentationLevel, VoxelLevel

    names = args.levels.split(",") if args.levels else ["voxel"] + (["segmentation"] if labelled else [])
    names = [n.strip() for n in names if n.strip()]
    unknown = sorted(set(names) - set(LEVEL_NAMES))
    if unknown or not names:
        raise UsageError(f"--levels {args.levels!r}: unknown level(s) {unknown}; choose among voxel, segmentation")
    if "feature" in names:
        raise UsageError("--levels feature: the feature level needs a feature extractor (a model), which the command "
                         "line cannot load; use FeatureLevel(extractor=...) from Python")
    if "segmentation" in names and not labelled:
        raise UsageError("--levels segmentation needs --train-labels (the command line segments with labels)")
    return [VoxelLevel(grid=args.grid) if n == "voxel" else SegmentationLevel(grid=args.grid) for n in names]


def _training_folders(args):
    """(reader, levels, training folder, holdout folder) from the bank-building options; lists files only."""
    from .io import ImageFolder, ImageReader

    reader = ImageReader(grid=args.grid, spacing=args.spacing)
    levels = _levels(args, labelled=args.train_labels is not None)
    segmentation = any(level.name == "segmentation" for level in levels)
    if segmentation and args.holdout is not None and args.holdout_labels is None:
        raise UsageError("the segmentation level needs --holdout-labels for the holdout images")
    train = ImageFolder(args.train, reader, labels=args.train_labels if segmentation else None)
    holdout = None
    if args.holdout is not None:
        holdout = ImageFolder(args.holdout, reader, labels=args.holdout_labels if segmentation else None)
    return reader, levels, train, holdout


def _device(name: str):
    """``--device`` as a torch device that exists here, or a UsageError naming the option."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r}: not a device name ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: relict runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is false)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def _bank(train, levels, holdout, reader, progress: bool, device):
    from .bank import ReferenceBank
    from .items import ItemError

    try:
        bank = ReferenceBank.build(train, levels, holdout=holdout, progress=progress, device=device)
    except ItemError as err:  # not skipped like a bad synthetic image: the reference would change
        raise ItemError(f"{err}\n(training and holdout images make the reference every synthetic image is scored "
                        "against, so a bad one stops the audit: fix or remove it)") from None
    bank.manifest["audit"] = {"reader": reader.config(), "train": str(train.root.resolve())}  # for --bank
    return bank


def _inputs(args) -> dict[str, Path]:
    """The input paths given on the command line, by option."""
    options = ("train", "train_labels", "holdout", "holdout_labels", "synthetic", "synthetic_labels", "bank")
    return {f"--{o.replace('_', '-')}": getattr(args, o) for o in options if getattr(args, o, None) is not None}


def _check_out(out: Path, inputs: dict[str, Path]) -> None:
    """Refuse an ``--out`` that is, holds or lies inside an input (writing it could replace or delete input)."""
    target = out.resolve()
    for option, path in inputs.items():
        source = Path(path).resolve()
        if target == source:
            problem = f"is the {option} input"
        elif source in target.parents:
            problem = f"lies inside the {option} input {path}"
        elif target in source.parents:
            problem = f"holds the {option} input {path}"
        else:
            continue
        raise UsageError(f"--out {out}: {problem}; writing there could overwrite or delete input files, "
                         "choose another place")


def _build_bank(args) -> int:
    from .bank import ReferenceBank

    _check_out(args.out, _inputs(args))
    if args.out.exists():  # only a bank (of any version) is ever replaced
        ReferenceBank.read_manifest(args.out, any_version=True)
    device = _device(args.device)
    reader, levels, train, holdout = _training_folders(args)
    start = time.perf_counter()
    bank = _bank(train, levels, holdout, reader, not args.no_progress, device)
    bank.save(args.out)
    print(f"relict: bank of {len(bank)} training images ({', '.join(lv.name for lv in levels)}; null: "
          f"{bank.null_source}) written to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _thresholds(pairs: list[str]) -> dict[str, float]:
    from .validation import check_number

    thresholds = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--threshold {pair!r}: expected LEVEL=NUMBER, e.g. voxel=0.92") from None
        thresholds[name.strip()] = check_number(f"--threshold {name.strip()}", number, low=-1, high=1)
    return thresholds


def _scored(scorer, synthetic, strict: bool, progress: bool):
    """``(report, bad)``: the report on the synthetic images that can be read, checked and embedded, and the
    others as :class:`~relict_callbacks.report.BadImage` in file order. Each image is embedded once, with its
    batch. With ``strict``, any bad image is an error naming the first one, once all are scored."""
    from tqdm.auto import tqdm

    from .items import ItemError
    from .report import BadImage

    bad = []

    def skip(item_id: str, error: ItemError) -> None:
        bad.append(BadImage(item_id, str(error)))

    def readable():
        for index, item_id in enumerate(synthetic.ids):
            try:
                item = synthetic[index]
            except ItemError as error:
                skip(item_id, error)
                continue
            yield item

    samples = tqdm(readable(), total=len(synthetic), desc="relict score", unit="img", disable=not progress)
    try:
        report = scorer.score(samples, on_error=skip)
    except ItemError:
        if len(bad) < len(synthetic):
            raise
        report = None
    position = {item_id: i for i, item_id in enumerate(synthetic.ids)}
    bad.sort(key=lambda image: position[image.id])
    if report is None:
        raise ItemError(f"none of the {len(synthetic)} synthetic images can be scored; first: {bad[0].error}")
    if strict and bad:
        more = f"; {len(bad) - 1} more bad synthetic image(s)" if len(bad) > 1 else ""
        raise ItemError(f"{bad[0].error} (--strict: a bad synthetic image fails the audit{more})")
    return report, bad


def _audit(args) -> int:
    from .atomic import atomic_dir, check_replaceable
    from .bank import ReferenceBank
    from .io import ImageFolder, ImageReader
    from .report import verdict, write_report
    from .scoring import ReplicaScorer

    start = time.perf_counter()
    device = _device(args.device)
    thresholds = _thresholds(args.threshold)
    if (args.bank is None) == (args.train is None):
        raise UsageError("give either --train (build the bank now) or --bank (one from `relict bank build`)")
    inputs = _inputs(args)
    _check_out(args.out, inputs)
    check_replaceable(args.out)
    train = None
    if args.bank is not None:
        fixed = [f"--{o.replace('_', '-')}" for o in ("train_labels", "holdout", "holdout_labels", "levels", "grid",
                                                      "spacing") if getattr(args, o) is not None]
        if fixed:
            raise UsageError(f"{', '.join(fixed)}: fixed when the bank was built; not allowed with --bank")
        bank = ReferenceBank.load(args.bank)
        saved = bank.manifest.get("audit")
        if saved is None:
            raise UsageError(f"{args.bank}: not built by `relict bank build` (it lacks the reader settings)")
        _check_out(args.out, {"training folder of the bank": Path(saved["train"])})
        reader = ImageReader.from_config(saved["reader"])
        if Path(saved["train"]).is_dir() and not args.hide_training_images:
            train = ImageFolder(saved["train"], reader)
        segmentation = any(level.name == "segmentation" for level in bank.levels)
    else:
        reader, levels, train, holdout = _training_folders(args)
        segmentation = any(level.name == "segmentation" for level in levels)
    if segmentation and args.synthetic_labels is None:
        raise UsageError("the segmentation level needs --synthetic-labels for the synthetic images")
    synthetic = ImageFolder(args.synthetic, reader, labels=args.synthetic_labels if segmentation else None)
    if args.bank is None:
        bank = _bank(train, levels, holdout, reader, not args.no_progress, device)
    scorer = ReplicaScorer(bank, alpha=args.alpha, rule=args.rule, thresholds=thresholds or None,
                           confidence=args.confidence, device=device)
    report, bad = _scored(scorer, synthetic, args.strict, not args.no_progress)
    if bad:
        warnings.warn(f"{len(bad)} of {len(synthetic)} synthetic images could not be scored (listed with their "
                      "errors in results.csv and the report; --strict makes this an error)")
    result = verdict(report, args.fail_above, not_scored=len(bad))
    gallery = _gallery(report, synthetic, None if args.hide_training_images else train, bank, args.gallery)
    facts = {"synthetic_folder": str(args.synthetic.resolve()),
             "training_folder": str(args.train.resolve()) if args.bank is None else bank.manifest["audit"]["train"],
             "bank_file": None if args.bank is None else str(args.bank.resolve()),
             "training_images": len(bank), "levels": [level.name for level in bank.levels],
             "null": bank.null_source, "alpha": args.alpha, "rule": args.rule, "thresholds_given": thresholds,
             "fail_above": args.fail_above, "reader": reader.config(),
             "training_images_shown": train is not None, "device": str(device), "seconds": round(time.perf_counter() - start, 2)}
    with atomic_dir(args.out) as folder:
        write_report(folder, report, result, facts, gallery, bad)
    print(report.summary())
    print(f"{result.headline}\nwrote {args.out}/report.html, summary.json, results.csv "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if result.failed else 0


def _gallery(report, synthetic, train, bank, count: int) -> list:
    """Gallery rows; training files moved since the bank was built (or hidden: ``train=None``) are not shown."""
    from .gallery import gallery_rows

    position = {} if train is None else {item_id: i for i, item_id in enumerate(train.ids)}
    sample = {item_id: i for i, item_id in enumerate(synthetic.ids)}
    return gallery_rows(report, lambda record: synthetic[sample[record.id]]["image"],
                        lambda match: train[position[match.nearest_id]]["image"] if match.nearest_id in position
                        else None, bank.levels[0], count)


if __name__ == "__main__":
    sys.exit(main())

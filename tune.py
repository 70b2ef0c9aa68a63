"""Search main.py's hyper-parameters with Optuna: each trial one training run, on one machine or many.

    python tune.py --trials 20 --space config/tune.yaml --model_name resnet18 --epoch 10 --save_path runs/tune
    python tune.py ... (the same command again)                       # resumes the study: runs what is missing
    python tune.py ... --storage postgresql://user@db/optuna --study_name cats   # on each machine: one shared study

Every main.py flag is a base option of every trial; --space (YAML, config/tune.yaml) names the flags
each trial samples. A trial trains in this process into --save_path/trial_NNNN (the Optuna trial
number), reports each epoch's validation metric (--metrice) and may be pruned after it. The study is
stored in --save_path/study.db unless --storage says otherwise. At the end: the table of trials,
trials.csv, best.yaml (`python main.py --config runs/tune/best.yaml` trains the best options) and
history.png, importances.png, slice.png. The library: utils.tune.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import main as train_script
from utils.core.config import CONFIG_ONLY_KEYS, finite_float, parse_with_config
from utils.core.log import UserError, script_main
from utils.core.options import Options
from utils.train.flags import check_inputs

TUNE_FLAGS = ("--trials", "--space", "--storage", "--study_name", "--pruner", "--tune_sampler", "--timeout",
              "--prune_startup", "--prune_warmup")


def get_args_parser() -> argparse.ArgumentParser:
    from utils.tune.study import PRUNERS, SAMPLERS

    parser = train_script.get_args_parser()
    parser.description = "Search main.py's hyper-parameters with Optuna (every main.py flag is a base option)."
    p = parser.add_argument_group("search (tune.py's own flags)").add_argument
    p("--trials", type=int, default=20, help="trials the study should hold finished (complete or pruned; failed ones "
      "do not count), by all the processes that share it")
    p("--space", default="config/tune.yaml", help="YAML search space: main.py flag names and their ranges or choices")
    p("--storage", default="", help="the study's storage: an RDB URL (sqlite:///FILE, postgresql://...) or a Redis "
      "journal (redis://HOST:PORT/DB) that several processes or machines share (default: sqlite in --save_path/study.db)")
    p("--study_name", default="", help="the study's name in the storage (default: the name of --save_path)")
    p("--pruner", default="median", choices=list(PRUNERS), help="stop hopeless trials after an epoch: median (below the "
      "median of the earlier trials at that epoch), hyperband, none")
    p("--tune_sampler", default="tpe", choices=list(SAMPLERS), help="how trials choose their values: tpe (Bayesian), random, "
      "qmc (quasi-random), gp (Gaussian process)")
    p("--timeout", type=finite_float, default=0.0, help="seconds after which this process starts no new trial (0 = none)")
    p("--prune_startup", type=int, default=5, help="trials finished before the median pruner prunes")
    p("--prune_warmup", type=int, default=1, help="epochs a trial trains before it can be pruned")
    parser.set_defaults(save_path="runs/tune")
    for action in parser._actions:
        if action.dest == "save_path":
            action.help = "the study's folder: study.db, trial_NNNN run folders, trials.csv, best.yaml, plots (reused: resumes)"
        elif action.dest == "seed":
            action.help += "; also seeds the sampler (each process of a shared study: give its own, or none)"
    return parser


def main_argv(argv: Sequence[str]) -> list[str]:
    """The command line without tune.py's own flags: main.py's base options."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in TUNE_FLAGS:
            skip = True
        elif arg.split("=", 1)[0] not in TUNE_FLAGS:
            out.append(arg)
    return out


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """tune.py's flags, the base options (main.py's parse_args of the other flags) and the search space,
    all checked before any trial."""
    from utils.tune.space import SearchSpace
    from utils.tune.study import import_optuna

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_with_config(get_args_parser(), argv, CONFIG_ONLY_KEYS | {"custom_augment": []})
    if args.list_models:
        return Options({"list_models": True})
    import_optuna()
    for name, low in (("trials", 1), ("prune_startup", 0), ("prune_warmup", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.timeout < 0:
        raise UserError(f"--timeout must be 0 (none) or a number of seconds, got {args.timeout:g}")
    base = train_script.parse_args(main_argv(argv))
    for flag in ("resume", "kfold", "lr_find"):
        if base.get(flag):
            raise UserError(f"tune.py runs each trial as a new plain run: drop --{flag}")
    check_inputs(base)  # the training images, --weight, --teacher_path and --model_name, as main.py checks them
    space = SearchSpace.load(args.space, train_script.get_args_parser(), base)
    own = {a.dest: getattr(args, a.dest) for a in get_args_parser()._actions if "--" + a.dest in TUNE_FLAGS}
    return Options(own | {"save_path": args.save_path, "base": base, "space_params": space, "list_models": False,
                          "command": shlex.join(["python", "tune.py", *argv])})


def main(args: Options) -> dict[str, Any]:
    """Run the study until it holds --trials finished trials; then write its table, best.yaml and plots."""
    if args.list_models:
        return train_script.main(Options({"list_models": True}))
    from utils.core.files import check_writable
    from utils.train.saver import LOWER_IS_BETTER
    from utils.tune.objective import Objective
    from utils.tune.study import check_study_folder, counts, make_pruner, make_sampler, open_study, run_trials, storage_url

    base, out = args.base, Path(args.save_path)
    check_study_folder(out)  # its table, best.yaml and plots are written over only in a study's own folder
    out.mkdir(parents=True, exist_ok=True)  # shared by every process of the study, and by its resumes
    check_writable(out, "--save_path")
    metric = base.metrice or "default"  # the task's first metric (acc, map): resolved by each trial
    direction = "minimize" if base.metrice in LOWER_IS_BETTER else "maximize"
    url, name = storage_url(out, args.storage), args.study_name or out.resolve().name
    pruner = make_pruner(args.pruner, base.epoch, args.prune_startup, args.prune_warmup)
    study = open_study(url, name, direction, None, pruner, {"metric": metric, "space": args.space_params.to_plain()})
    # seeded: a resumed study (or a second process starting later) does not repeat the first samples
    study.sampler = make_sampler(args.tune_sampler, None if base.seed is None else base.seed + len(study.trials))
    print(f"study '{name}' in {url}: {counts(study)[0]} of {args.trials} trials finished so far, "
          f"{direction} the val {metric if base.metrice else 'metric'} (finished: complete or pruned)", flush=True)
    objective = Objective(base, args.space_params, out, train_script.train, args.trials, base.metrice or "metric")
    try:
        run_trials(study, objective, args.trials, args.timeout)
    except KeyboardInterrupt:
        print(f"interrupted: the trial under way is recorded as failed; to resume the study, run the same command:\n  "
              f"{args.command}", file=sys.stderr, flush=True)
        raise
    finally:
        summary = report(study, base, out)
    return {"study": study, **summary}


def report(study: Any, base: Options, out: Path) -> dict[str, Any]:
    """The trials table (printed, trials.csv), best.yaml and the plots of the study as it stands."""
    metric = next((t.user_attrs["metric"] for t in study.trials if "metric" in t.user_attrs), base.metrice or "value")
    from utils.tune.report import best_config, trial_rows, trials_table, write_best_yaml, write_plots, write_trials_csv

    rows, names = trial_rows(study)
    print(trials_table(rows, names, metric), flush=True)
    write_trials_csv(out / "trials.csv", rows, names)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = None
    if complete:
        best = study.best_trial
        config = best_config(base, best.params, out)
        write_best_yaml(out / "best.yaml", config, f"tune.py's best trial: {best.number}, {metric} {best.value:.6g} "
                        f"({best.user_attrs.get('run', '')})\ntrain it: python main.py --config {out / 'best.yaml'}")
        print(f"best: trial {best.number}, {metric} {best.value:.4f}: {best.params}\n"
              f"  python main.py --config {out / 'best.yaml'}", flush=True)
    else:
        print("no complete trial yet: no best.yaml", flush=True)
    for line in write_plots(study, out, len(complete)):
        print(f"plot: {line}", flush=True)
    return {"rows": rows, "best": best}


if __name__ == "__main__":
    script_main(main, parse_args)

"""`reproduce --parallel_subjects K`: the protocol's (subject, seed) runs trained K at a time, each group as
one run of several subjects (`train --subjects`), just before its runs are sampled and scored (so that at most
one group's models are on disk at a time).

Every group's runs span the same number of devices (`--subject_devices`, fixed by the first grouping), so
every run trains with the same global batch. A group lives in `<output_dir>/parallel/<id>/` (`group.json`: its
runs and devices per run; the trainer's subjects file, checkpoints and exports) until its models are moved
into their runs' `model` folders. A rerun finds interrupted groups there and resumes them as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile

import jax

from dreambooth_jax import parallel
from dreambooth_jax.errors import UsageError
from dreambooth_jax.paper import trainer_flags
from dreambooth_jax.training import preflight, trainer

log = logging.getLogger("dreambooth_jax.reproduce")


def _model_dir(args, run) -> str:
    return os.path.join(args.output_dir, run[0], f"seed{run[1]}", "model")


def _trained(args, run) -> bool:
    return os.path.isfile(os.path.join(_model_dir(args, run), "model_index.json"))


def _name(run) -> str:
    return f"{run[0]}-seed{run[1]}"


class Together:
    """The groups of `pending` [(subject, seed)] runs to train together, and training them on demand
    (`train_group_of`). Without --parallel_subjects > 1 (given, or the default's choice) there are none, and
    each run trains alone as before."""

    def __init__(self, args, trainer_args: list[str], builder, pending: list[tuple[str, int]]):
        # heavy and optional: TFDS, as in `reproduction.run_protocol`
        from dreambooth_jax.datasets import dreambooth as dreambooth_dataset

        self.args, self.trainer_args = args, trainer_args
        # run -> (its group's runs, devices per run)
        self.group_of: dict[tuple[str, int], tuple[list, int]] = {}
        untrained = [r for r in pending if not _trained(args, r)]
        if not untrained or args.parallel_subjects == 1:
            return
        self.subjects = {n: dreambooth_dataset.load_subject(builder, n) for n in {n for n, _ in untrained}}
        groups = self._interrupted(untrained)
        started = {r for runs, _ in groups for r in runs}
        rest = [r for r in untrained if r not in started]
        k = args.parallel_subjects or (self._default_k(rest) if rest else 1)
        devices = jax.device_count()
        per_run = groups[0][1] if groups else devices // parallel.subject_groups(k, devices)
        if k > 1:
            groups += [(rest[i : i + k], per_run) for i in range(0, len(rest), k)]
        for runs, n in groups:
            for r in runs:
                self.group_of[r] = (runs, n)
        if groups:
            print(f"training {len(untrained)} run(s) {k} at a time, {per_run} device(s) each",
                  file=sys.stderr)

    def folder(self, runs) -> str:
        digest = hashlib.sha1(" ".join(_name(r) for r in runs).encode()).hexdigest()[:12]
        return os.path.join(self.args.output_dir, "parallel", digest)

    def _interrupted(self, untrained) -> list[tuple[list, int]]:
        """The groups an earlier invocation started and did not finish, as they were (their checkpoints
        resume)."""
        root = os.path.join(self.args.output_dir, "parallel")
        groups = []
        for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            path = os.path.join(root, entry, "group.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    group = json.load(f)
                runs = [tuple(r) for r in group["runs"]]
                if any(r in untrained for r in runs):
                    groups.append((runs, group["devices_per_run"]))
        return groups

    def _subjects_file(self, runs, path: str) -> None:
        items = [{"name": _name(r), "dataset": f"dreambooth:{r[0]}", "seed": r[1],
                  "instance_prompt": self.subjects[r[0]].instance_prompt(self.args.unique_token),
                  "class_data_dir": trainer_flags.class_folder(self.args, self.subjects[r[0]])} for r in runs]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(items, f, indent=1)

    def _argv(self, runs, folder: str, subjects_file: str, per_run: int | None) -> list[str]:
        extra = ["--subject_devices", str(per_run)] if per_run else []
        return [*trainer_flags.run_flags(self.args, folder), "--subjects", subjects_file,
                "--output_dir", folder, *extra, *self.trainer_args]

    def _default_k(self, runs) -> int:
        """--parallel_subjects when not given: as many runs as the devices and their memory allow, from the
        memory preflight of the trainer's --dry_run (no weights loaded): one run per device (each run's batch
        then spans one device, as the paper's batch of 1), doubled while the preflight says it fits (LoRA:
        several runs per device), halved while it does not."""
        k = min(jax.device_count(), len(runs))
        if len(runs) <= 1 or preflight.device_memory() is None:  # e.g. CPU: no limit to fit in
            return k

        def fits(k: int):
            with tempfile.TemporaryDirectory() as tmp:
                self._subjects_file(runs[:k], os.path.join(tmp, "subjects.json"))
                argv = self._argv(runs[:k], tmp, os.path.join(tmp, "subjects.json"), None)
                report = trainer.dry_run(trainer_flags.parse_train_args([*argv, "--dry_run"]))
            log.info("--parallel_subjects %d: preflight %s", k, json.dumps(report))
            return report["fits"]

        verdict = fits(k)
        while verdict is False and k > 1:
            k //= 2
            verdict = fits(k)
        while verdict and 2 * k <= len(runs) and fits(2 * k):
            k *= 2
        return k

    def train_group_of(self, name: str, seed: int) -> None:
        """Trains the group of run (name, seed), unless it trains alone or its model is there; then moves each
        run's export to its `model` folder, where `run_one` finds it."""
        if (name, seed) not in self.group_of or _trained(self.args, (name, seed)):
            return
        runs, per_run = self.group_of[(name, seed)]
        folder = self.folder(runs)
        subjects_file = os.path.join(folder, "subjects.json")
        if parallel.is_main_process() and not os.path.isfile(os.path.join(folder, "group.json")):
            os.makedirs(folder, exist_ok=True)
            self._subjects_file(runs, subjects_file)
            with open(os.path.join(folder, "group.json"), "w", encoding="utf-8") as f:
                json.dump({"runs": [list(r) for r in runs], "devices_per_run": per_run}, f)
        parallel.barrier(f"group {folder}")
        argv = self._argv(runs, folder, subjects_file, per_run)
        log.info("training %d runs together (python -m dreambooth_jax.train %s)", len(runs), " ".join(argv))
        result = trainer.run(trainer_flags.parse_train_args(argv))
        missing = [r for r in runs if not os.path.isfile(os.path.join(folder, _name(r), "model_index.json"))]
        if missing:
            raise UsageError(f"training of {', '.join(_name(r) for r in runs)} stopped at step "
                             f"{result.steps} (preempted?); rerun the same command to resume")
        if parallel.is_main_process():
            for r in runs:
                shutil.rmtree(_model_dir(self.args, r), ignore_errors=True)
                os.replace(os.path.join(folder, _name(r)), _model_dir(self.args, r))
            shutil.rmtree(folder)  # its checkpoints: every run of it is exported
        parallel.barrier(f"moved {folder}")

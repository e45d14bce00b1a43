"""Orbax checkpoints of the train state, and the SIGTERM (preemption) watch.

Resume order, documented once: (1) build the model and a fresh state exactly as a new run would;
(2) restore {step, params, opt_state, ema, stopped parts} into that state's abstract, sharded shapes
(after freezing the text encoder if the checkpoint is past --stop_text_encoder_training); (3) the data
order needs no state of its own: the batch of step s is a pure function of (seed, s), so restoring the
step restores the data position too. The never-trained params are re-read from the base model, whose name
the checkpoint's metadata records and checks.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
import orbax.checkpoint as ocp

from dreambooth_jax import storage
from dreambooth_jax.errors import UsageError

log = logging.getLogger(__name__)


def _saved_tree(state) -> dict:
    # Parts that were trained and then frozen (the text encoder after --stop_text_encoder_training) differ
    # from the base model, so they are saved too; the other frozen parts are re-read from the base model.
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "ema": state.ema,
            "stopped": {k: state.frozen[k] for k in state.stopped}}


class Checkpointer:
    """Saves every `every` steps into `root/<step>` (a local folder or a bucket URI, written by Orbax
    directly), keeping the newest `keep` (all when None)."""

    def __init__(self, root: str, *, every: int, keep: int | None = None):
        folder = storage.Folder(root)
        self.root = folder.uri if folder.remote else os.path.abspath(root)
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(folder.remote_path, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, meta: dict, *, step: int, force: bool = False) -> bool:
        """Starts an (async) save of `state`, which is at step `step` (the caller's count: reading
        `state.step` would wait for the device); returns whether one was started. Sharded arrays are saved
        sharded: each process writes its own shards."""
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(_saved_tree(state)),
                                  meta=ocp.args.JsonSave({**meta, "step": step}))
        return self.manager.save(step, args=args, force=True)

    def restore(self, state, step: int, expected_meta: dict | None = None):
        """Returns (`state` with the saved step/params/opt_state, saved metadata). The arrays are restored
        into `state`'s shardings, whatever the device count and mesh the checkpoint was written with;
        `state`'s own arrays of the restored parts are freed first (they are replaced), so the state is not
        held twice."""
        saved = _saved_tree(state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
        for x in jax.tree.leaves({k: v for k, v in saved.items() if k != "step"}):
            x.delete()
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
        for key, value in (expected_meta or {}).items():
            if meta.get(key) != value:
                raise UsageError(f"checkpoint {self.root}/{step} was made with {key}={meta.get(key)!r}, "
                                 f"this run has {key}={value!r}")
        tree = restored["state"]
        return state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                             ema=tree["ema"], frozen={**state.frozen, **tree["stopped"]}), meta

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_resume(spec: str | None, checkpoints_root: str) -> tuple[str, int] | None:
    """`--resume_from_checkpoint` ('latest' or a `.../checkpoints/<step>` folder) -> (root, step) or None."""
    if spec is None:
        return None
    if spec == "latest":
        folder = storage.Folder(checkpoints_root)
        names = ([p.name for p in storage.remote_path(folder.uri).iterdir()] if folder.remote else
                 os.listdir(checkpoints_root)) if folder.exists() else []
        steps = [int(d) for d in names if d.isdigit()]
        if not steps:
            log.warning("--resume_from_checkpoint latest: no checkpoints in %s yet; starting fresh",
                        checkpoints_root)
            return None
        return (checkpoints_root if folder.remote else os.path.abspath(checkpoints_root)), max(steps)
    path = spec.rstrip("/") if storage.is_remote(spec) else os.path.abspath(spec.rstrip("/"))
    root, _, name = path.rpartition("/")
    if not name.isdigit():
        raise UsageError(f"--resume_from_checkpoint {spec}: expected a checkpoint folder named by its step")
    return root, int(name)


class PreemptionWatch:
    """Turns SIGTERM (TPU/GPU preemption, `kill`) into a flag the training loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def should_stop(self, manager: ocp.CheckpointManager | None = None, step: int = 0) -> bool:
        # On several hosts, JAX's preemption notice (via Orbax) makes every host stop at the same step.
        if jax.process_count() > 1 and manager is not None:
            return bool(manager.reached_preemption(step)) or self.requested
        return self.requested

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

"""The train state: trained parameters with their optimizers, frozen ones, EMA; and building it for a run."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dreambooth_jax import lora, parallel
from dreambooth_jax.errors import UsageError
from dreambooth_jax.training import optimizers as optim
from dreambooth_jax.training.specs import StateSpec


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes (or is needed) across steps.

    `params` holds the trained parts ({'unet'[, 'text_encoder']}), each with its own optimizer in `txs` and
    state in `opt_state`; `frozen` the others; `ema` (or None) the exponential moving average of every part
    trained so far (a part that stops training keeps its last average).
    """

    step: jax.Array
    params: dict
    opt_state: dict
    frozen: dict
    ema: dict | None
    txs: tuple = flax.struct.field(pytree_node=False)  # ((part, GradientTransformation), ...)
    stopped: tuple = flax.struct.field(pytree_node=False, default=())  # parts trained, then frozen

    @classmethod
    def create(cls, params: dict, frozen: dict, txs: dict, *, ema: bool = False) -> TrainState:
        # Copied: some optimizers (prodigy) keep the initial params in their state, and the same buffer twice
        # in a donated state is an error.
        opt_state = jax.tree.map(jnp.copy, {k: txs[k].init(params[k]) for k in params})
        ema_params = jax.tree.map(jnp.copy, params) if ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, frozen=frozen,
                   ema=ema_params, txs=tuple(sorted(txs.items())))

    def freeze(self, *parts: str) -> TrainState:
        """Stops training `parts` (those trained; others are ignored): their params join `frozen` and their
        optimizer states are dropped."""
        parts = tuple(p for p in parts if p in self.params)
        params = {k: v for k, v in self.params.items() if k not in parts}
        return self.replace(params=params, frozen={**self.frozen, **{p: self.params[p] for p in parts}},
                            opt_state={k: v for k, v in self.opt_state.items() if k not in parts},
                            txs=tuple((k, tx) for k, tx in self.txs if k not in parts),
                            stopped=(*self.stopped, *parts))

    def export_params(self) -> dict:
        """The weights to export: every part, the EMA ones where there are."""
        return {**self.frozen, **self.params, **(self.ema or {})}

    # --- several subjects (see `step.subjects_train_step`) ----------------------------------------------
    def per_subject(self) -> dict:
        """The parts with a leading subject axis in a state of several subjects: everything trained (params,
        optimizer state, EMA) and the stopped parts of `frozen`."""
        return {"params": self.params, "opt_state": self.opt_state, "ema": self.ema,
                "stopped": {k: self.frozen[k] for k in self.stopped}}

    def subject(self, k: int) -> TrainState:
        """Subject `k`'s weights from a state of several subjects, as a run of it alone would export them: its
        params, EMA and stopped parts in host memory (every process whole; gathered one array at a time, so no
        device holds the subject's state whole), the shared frozen networks as they are; no optimizer
        state."""
        take = lambda tree: jax.tree.map(lambda x: parallel.fetch(x[k]), tree)  # noqa: E731
        return self.replace(params=take(self.params), opt_state={}, ema=take(self.ema),
                            frozen={**self.frozen, **take(self.per_subject()["stopped"])})


def stack_subjects(states: list[TrainState]) -> TrainState:
    """One state of several subjects from each subject's own (same structure and optimizers): their trained
    parts stacked along a new leading subject axis; the frozen networks (and step) taken from the first,
    shared."""
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    first = states[0]
    return first.replace(params=jax.tree.map(stack, *[s.params for s in states]),
                         opt_state=jax.tree.map(stack, *[s.opt_state for s in states]),
                         ema=None if first.ema is None else jax.tree.map(stack, *[s.ema for s in states]))


def shardings(state: TrainState, mesh) -> TrainState:
    """The state's NamedShardings on `mesh`: the fsdp rule (`parallel.state_shardings`); on a mesh with a
    `subject` axis the per-subject parts (`TrainState.per_subject`) are split over it too."""
    plain = parallel.state_shardings(state, mesh)
    if parallel.SUBJECT_AXIS not in mesh.axis_names:
        return plain
    split = parallel.subject_shardings(state.per_subject(), mesh)
    return plain.replace(params=split["params"], opt_state=split["opt_state"], ema=split["ema"],
                         frozen={**plain.frozen, **split["stopped"]})


def trained_networks(spec: StateSpec, family) -> list[str]:
    """The networks the run trains: the denoiser, and with --train_text_encoder every text encoder (SDXL's
    two)."""
    return [family.denoiser, *(family.text_encoders if spec.train_text_encoder else ())]


def text_encoder_parts(params: dict, family) -> tuple[str, ...]:
    """The trained parts of `params` that --stop_text_encoder_training freezes: the text encoders' (or their
    LoRAs')."""
    return tuple(part for part in params if part.removesuffix("_lora") in family.text_encoders)


def lr_schedules(spec: StateSpec, family, parts, max_steps: int, global_batch: int) -> dict:
    """{trained part: its learning-rate schedule} (the text encoders' parts take --text_encoder_lr)."""
    scale = global_batch if spec.scale_lr else 1
    text_lr = spec.text_encoder_lr or spec.learning_rate
    peak = {name: text_lr for name in family.text_encoders}
    return {part: optim.lr_schedule(spec.lr_scheduler,
                                    peak.get(part.removesuffix("_lora"), spec.learning_rate) * scale,
                                    warmup_steps=spec.lr_warmup_steps, total_steps=max_steps,
                                    num_cycles=spec.lr_num_cycles, power=spec.lr_power) for part in parts}


def make_subjects_state(specs: list[StateSpec], family, params: dict, max_steps: int,
                        global_batch: int) -> TrainState:
    """The initial state of several subjects trained together (`specs`: each subject's own): each subject's
    `make_state` (its own seed: LoRA factors start as they would alone), stacked (`stack_subjects`)."""
    return stack_subjects([make_state(s, family, params, max_steps, global_batch) for s in specs])


def make_state(spec: StateSpec, family, params: dict, max_steps: int, global_batch: int) -> TrainState:
    """The initial train state of a pipeline of `family` from its params {component: params}.

    Pure: the trainer traces it with `jax.eval_shape` (the memory preflight, before any weight is read) and
    runs it under `jax.jit` with the state's shardings as outputs, so the optimizer state and EMA are created
    in place, sharded, and nothing is built whole on one device first.
    """
    networks = trained_networks(spec, family)
    if spec.lora is not None:
        trained, frozen = lora_params(spec, family, params, networks)
    else:
        trained = {k: v for k, v in params.items() if k in networks}
        frozen = {k: v for k, v in params.items() if k not in networks}
    schedules = lr_schedules(spec, family, trained, max_steps, global_batch)
    txs = {part: optim.make_optimizer(spec.optimizer, schedules[part], b1=spec.adam_beta1, b2=spec.adam_beta2,
                                      eps=spec.adam_epsilon, weight_decay=spec.adam_weight_decay)
           for part in trained}
    return TrainState.create(trained, frozen, txs, ema=spec.use_ema)


def lora_params(spec: StateSpec, family, params: dict, networks: list[str]) -> tuple[dict, dict]:
    """(trained LoRA factors {'<net>_lora'}, frozen params): every network frozen, kept in the compute dtype.

    They compute in it anyway (casting a weight to bf16 once or at every use gives the same values), and
    nothing exports them from here (the merged export reads the fp32 base from disk): in bf16 that halves
    their memory, e.g. SDXL's text encoders 3.1 -> 1.5 GiB."""
    names = spec.lora_target_modules
    custom = tuple(t.strip() for t in names.split(",")) if names else None
    rngs = dict(zip(networks, jax.random.split(jax.random.PRNGKey(spec.seed), len(networks))))
    dtype = jnp.bfloat16 if spec.compute_dtype == "bf16" else jnp.float32
    trained, frozen = {}, jax.tree.map(lambda x: x.astype(dtype), params)
    for net in networks:
        targets = (family.lora_targets[net] if custom is None
                   else [t for t in custom if _matches(params[net], t)])
        if not targets:
            continue  # none of the custom names is in this network
        trained[f"{net}_lora"] = lora.init_lora(params[net], targets, spec.lora, rngs[net])
    if not trained:
        raise UsageError(f"--lora_target_modules {names}: no such module in the {' or '.join(networks)}")
    return trained, frozen


def _matches(params, target: str) -> bool:
    try:
        return bool(lora.target_paths(params, [target]))
    except UsageError:
        return False

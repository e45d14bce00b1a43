"""The train state: trained parameters with their optimizers, frozen ones, EMA; and building it for a run."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dreambooth_jax import lora
from dreambooth_jax.errors import UsageError
from dreambooth_jax.training import optimizers as optim
from dreambooth_jax.training.config import TrainConfig


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

    def freeze(self, part: str) -> TrainState:
        """Stops training `part`: its params join `frozen` and its optimizer state is dropped."""
        params = {k: v for k, v in self.params.items() if k != part}
        return self.replace(params=params, frozen={**self.frozen, part: self.params[part]},
                            opt_state={k: v for k, v in self.opt_state.items() if k != part},
                            txs=tuple((k, tx) for k, tx in self.txs if k != part), stopped=(*self.stopped, part))

    def export_params(self) -> dict:
        """The weights to export: every part, the EMA ones where there are."""
        return {**self.frozen, **self.params, **(self.ema or {})}


def make_state(cfg: TrainConfig, pipe, max_steps: int, global_batch: int):
    """The initial train state (unplaced) and the lr schedule of each trained part."""
    networks = ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])
    if cfg.use_lora:
        params, frozen = lora_params(cfg, pipe, networks)
    else:
        params = {k: v for k, v in pipe.params.items() if k in networks}
        frozen = {k: v for k, v in pipe.params.items() if k not in networks}
    scale = global_batch if cfg.scale_lr else 1
    peak = {"unet": cfg.learning_rate, "text_encoder": cfg.text_encoder_lr or cfg.learning_rate}
    schedules = {part: optim.lr_schedule(cfg.lr_scheduler, peak[part.removesuffix("_lora")] * scale,
                                         warmup_steps=cfg.lr_warmup_steps, total_steps=max_steps,
                                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power) for part in params}
    txs = {part: optim.make_optimizer(cfg.optimizer, schedules[part], b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                                      eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay) for part in params}
    return TrainState.create(params, frozen, txs, ema=cfg.use_ema), schedules


def lora_config(cfg: TrainConfig) -> lora.LoraConfig | None:
    """The run's LoRA settings (None without --use_lora)."""
    return lora.LoraConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout) if cfg.use_lora else None


def lora_params(cfg: TrainConfig, pipe, networks: list[str]) -> tuple[dict, dict]:
    """(trained LoRA factors {'<net>_lora'}, frozen params): the adapted bases kept in the compute dtype."""
    defaults = {"unet": lora.UNET_TARGETS, "text_encoder": lora.TEXT_ENCODER_TARGETS}
    custom = tuple(t.strip() for t in cfg.lora_target_modules.split(",")) if cfg.lora_target_modules else None
    rngs = dict(zip(networks, jax.random.split(jax.random.PRNGKey(cfg.seed), len(networks))))
    params, frozen = {}, dict(pipe.params)
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bf16" else jnp.float32
    for net in networks:
        targets = defaults[net] if custom is None else [t for t in custom if lora.target_paths(pipe.params[net], [t])]
        if not targets:
            continue  # none of the custom names is in this network
        params[f"{net}_lora"] = lora.init_lora(pipe.params[net], targets, lora_config(cfg), rngs[net])
        frozen[net] = jax.tree.map(lambda x: x.astype(dtype), pipe.params[net])
    if not params:
        raise UsageError(f"--lora_target_modules {cfg.lora_target_modules}: no such module in the "
                         f"{' or '.join(networks)}")
    return params, frozen

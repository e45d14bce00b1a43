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


def trained_networks(cfg: TrainConfig) -> list[str]:
    return ["unet"] + (["text_encoder"] if cfg.train_text_encoder else [])


def lr_schedules(cfg: TrainConfig, parts, max_steps: int, global_batch: int) -> dict:
    """{trained part: its learning-rate schedule} (the text encoder's parts take --text_encoder_lr)."""
    scale = global_batch if cfg.scale_lr else 1
    peak = {"unet": cfg.learning_rate, "text_encoder": cfg.text_encoder_lr or cfg.learning_rate}
    return {part: optim.lr_schedule(cfg.lr_scheduler, peak[part.removesuffix("_lora")] * scale,
                                    warmup_steps=cfg.lr_warmup_steps, total_steps=max_steps,
                                    num_cycles=cfg.lr_num_cycles, power=cfg.lr_power) for part in parts}


def make_state(cfg: TrainConfig, params: dict, max_steps: int, global_batch: int) -> TrainState:
    """The initial train state from the pipeline's params {'unet', 'vae', 'text_encoder'}.

    Pure: the trainer traces it with `jax.eval_shape` (the memory preflight, before any weight is read) and runs
    it under `jax.jit` with the state's shardings as outputs, so the optimizer state and EMA are created in
    place, sharded, and nothing is built whole on one device first.
    """
    networks = trained_networks(cfg)
    if cfg.use_lora:
        trained, frozen = lora_params(cfg, params, networks)
    else:
        trained = {k: v for k, v in params.items() if k in networks}
        frozen = {k: v for k, v in params.items() if k not in networks}
    schedules = lr_schedules(cfg, trained, max_steps, global_batch)
    txs = {part: optim.make_optimizer(cfg.optimizer, schedules[part], b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                                      eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay) for part in trained}
    return TrainState.create(trained, frozen, txs, ema=cfg.use_ema)


def lora_config(cfg: TrainConfig) -> lora.LoraConfig | None:
    """The run's LoRA settings (None without --use_lora)."""
    return lora.LoraConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout) if cfg.use_lora else None


def lora_params(cfg: TrainConfig, params: dict, networks: list[str]) -> tuple[dict, dict]:
    """(trained LoRA factors {'<net>_lora'}, frozen params): the adapted bases kept in the compute dtype."""
    defaults = {"unet": lora.UNET_TARGETS, "text_encoder": lora.TEXT_ENCODER_TARGETS}
    custom = tuple(t.strip() for t in cfg.lora_target_modules.split(",")) if cfg.lora_target_modules else None
    rngs = dict(zip(networks, jax.random.split(jax.random.PRNGKey(cfg.seed), len(networks))))
    trained, frozen = {}, dict(params)
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bf16" else jnp.float32
    for net in networks:
        targets = defaults[net] if custom is None else [t for t in custom if _matches(params[net], t)]
        if not targets:
            continue  # none of the custom names is in this network
        trained[f"{net}_lora"] = lora.init_lora(params[net], targets, lora_config(cfg), rngs[net])
        frozen[net] = jax.tree.map(lambda x: x.astype(dtype), params[net])
    if not trained:
        raise UsageError(f"--lora_target_modules {cfg.lora_target_modules}: no such module in the "
                         f"{' or '.join(networks)}")
    return trained, frozen


def _matches(params, target: str) -> bool:
    try:
        return bool(lora.target_paths(params, [target]))
    except UsageError:
        return False

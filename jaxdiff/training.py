"""Training: the train state, the optimizer, one pure train step, and its sharding over every device of every host.

The step is a pure function ``train_step(state, batch) -> (state, metrics)``. Its randomness (timesteps, noise,
dropout, label dropout) comes from ``fold_in(PRNGKey(seed), state.step)`` and is drawn for the global batch, so one
device and N devices (or N hosts) follow the same trajectory up to float reassociation, and a resumed run continues
exactly. ``shard_train_step`` compiles it once with the batch split over a ``data`` mesh axis, the state replicated
and donated.

The network enters as a plain ``apply(params, x_t, t, labels, dropout_key)`` (e.g.
:func:`jaxdiff.models.unet.make_apply`), and the objective as a :class:`jaxdiff.spec.DiffusionConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff import diffusion, edm, flow, parallel
from jaxdiff.ema import SIGMA_REL_MAX, sigma_rel_to_gamma, update_power_emas
from jaxdiff.errors import ConfigError
from jaxdiff.losses import diffusion_loss
from jaxdiff.schedules import Schedule
from jaxdiff.spec import DiffusionConfig

__all__ = [
    "DECAYS",
    "HISTORY",
    "OptimConfig",
    "TrainState",
    "ema_decay_at",
    "init_train_state",
    "learning_rate",
    "make_optimizer",
    "make_train_step",
    "run_keys",
    "shard_train_step",
]

#: The learning-rate decays after the warmup.
DECAYS = ("none", "cosine", "linear")
HISTORY = 10  #: losses kept per timestep for importance sampling (improved DDPM)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with linear warmup, global-norm clipping, optional decay and gradient accumulation; the EMA.

    Every count is of optimizer updates (train steps): ``warmup_steps``, ``total_steps`` and the EMA's warmup.
    ``grad_accum_steps = k`` computes each step's gradient over its batch in k sequential micro-batches (memory for
    one micro-batch of activations), summed: the same update as the whole batch at once, up to float summation order.

    ``posthoc_ema``: the relative widths (sigma_rel) of the power-function EMAs tracked beside that EMA for post-hoc
    EMA (Karras et al. 2024, EDM2 section 3; :mod:`jaxdiff.ema`): each in (0, 0.3003], e.g. EDM2's (0.05, 0.10);
    () tracks none.

    DDPM: lr 2e-4, warmup 5000 steps, clip 1.0, no decay, EMA 0.9999.
    """

    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    decay: str = "none"
    total_steps: int = 800_000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    posthoc_ema: tuple[float, ...] = ()

    def __post_init__(self):
        diffusion.check_choice("decay", self.decay, DECAYS)
        if self.lr <= 0 or self.warmup_steps < 0 or self.total_steps < 1 or self.grad_accum_steps < 1:
            raise ConfigError(
                f"Need lr > 0, warmup_steps >= 0, total_steps >= 1, grad_accum_steps >= 1; got {self.lr}, "
                f"{self.warmup_steps}, {self.total_steps}, {self.grad_accum_steps}."
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")
        widths = self.posthoc_ema
        if not isinstance(widths, tuple | list) or not all(
            isinstance(s, int | float) and not isinstance(s, bool) and 0 < s <= SIGMA_REL_MAX for s in widths
        ):
            raise ConfigError(
                f"posthoc_ema must be a tuple of EMA widths sigma_rel in (0, {SIGMA_REL_MAX:.4f}], e.g. "
                f"--config.optim.posthoc_ema=0.05,0.10 (EDM2's), or () for none; got {widths!r}."
            )
        object.__setattr__(self, "posthoc_ema", tuple(float(s) for s in widths))

    @property
    def posthoc_gammas(self) -> tuple[float, ...]:
        """The exponents of the tracked power-function EMAs, one per ``posthoc_ema`` width
        (:func:`jaxdiff.ema.sigma_rel_to_gamma`)."""
        return tuple(sigma_rel_to_gamma(s) for s in self.posthoc_ema)


def learning_rate(opt: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then constant, or a cosine / linear decay to 0 at ``total_steps``."""
    warmup = optax.linear_schedule(0.0, opt.lr, max(opt.warmup_steps, 1))
    rest = max(opt.total_steps - opt.warmup_steps, 1)
    after = {
        "none": optax.constant_schedule(opt.lr),
        "cosine": optax.cosine_decay_schedule(opt.lr, rest),
        "linear": optax.linear_schedule(opt.lr, 0.0, rest),
    }[opt.decay]
    if opt.warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [opt.warmup_steps])


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam(W) on :func:`learning_rate` (gradient accumulation is the train step's)."""
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
    parts.append(
        optax.adamw(learning_rate(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
        if opt.weight_decay
        else optax.adam(learning_rate(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps)
    )
    return optax.chain(*parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a run needs to continue: no RNG is stored (keys come from the step).

    ``loss_history`` ``[T, 10]`` and ``history_count`` ``[T]`` feed importance sampling of t (zeros otherwise: a run
    that draws t uniformly never writes them).

    ``posthoc_emas``: the power-function EMAs of post-hoc EMA, a tuple of trees shaped like ``params``, one per
    width of ``OptimConfig.posthoc_ema`` in its order (:func:`jaxdiff.ema.update_power_emas`); None (no leaves: a
    state, and a checkpoint, as before the field existed) when none is tracked. Last, with a default, so that the
    six-field positional construction still works.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    loss_history: jax.Array
    history_count: jax.Array
    posthoc_emas: Any = None


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the key of the initial parameters, the key that each step folds its step number into), from the seed."""
    init_key, step_key = jax.random.split(jax.random.key(seed))
    return init_key, step_key


def init_train_state(
    params, optimizer: optax.GradientTransformation, num_timesteps: int, posthoc_gammas: tuple[float, ...] = ()
) -> TrainState:
    """A fresh state from initial ``params`` (drawn with ``run_keys(seed)[0]``): EMA equal to them, a zero optimizer
    state, empty loss histories; one power-function EMA per exponent of ``posthoc_gammas`` (``OptimConfig
    .posthoc_gammas``), each a copy of ``params`` (the first update replaces it: beta_1 = 0), or None for ()."""
    posthoc = tuple(jax.tree_util.tree_map(jnp.copy, params) for _ in posthoc_gammas) or None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        opt_state=optimizer.init(params),
        loss_history=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
        history_count=jnp.zeros((num_timesteps,), jnp.int32),
        posthoc_emas=posthoc,
    )


def _draw_timesteps(key, state: TrainState, batch_size: int, T: int, importance: bool):
    """t ~ uniform, or ~ sqrt(E[L_t^2]) once every t has a full history; with the weights 1/(T p_t)."""
    uniform = jax.random.randint(key, (batch_size,), 0, T)
    if not importance:
        return uniform, jnp.ones((batch_size,), jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(state.loss_history), axis=1))
    probs = rms / jnp.sum(rms)
    probs = probs * (1 - 1e-3) + 1e-3 / T  # keep every t reachable
    ready = jnp.all(state.history_count >= HISTORY)
    weighted = jax.random.choice(jax.random.fold_in(key, 1), T, (batch_size,), p=probs)
    t = jnp.where(ready, weighted, uniform)
    weights = jnp.where(ready, 1.0 / (T * probs[t]), 1.0)
    return t, weights


def _record_losses(state: TrainState, t, losses):
    """Push each example's loss into its timestep's history (oldest out), one example after another."""

    def push(i, carry):
        history, count = carry
        row = jnp.concatenate([history[t[i], 1:], losses[i][None]])
        return history.at[t[i]].set(row), count.at[t[i]].add(1)

    return jax.lax.fori_loop(0, t.shape[0], push, (state.loss_history, state.history_count))


def ema_decay_at(step: jax.Array, opt: OptimConfig) -> jax.Array | float:
    """The EMA's decay at optimizer update ``step`` (0-based): ``ema_decay``, or with ``ema_warmup``
    min(ema_decay, (1 + step) / (10 + step))."""
    if opt.ema_warmup:
        return jnp.minimum(opt.ema_decay, (1.0 + step) / (10.0 + step))
    return opt.ema_decay


def _ema_update(ema, params, step: jax.Array, opt: OptimConfig):
    """ema <- decay * ema + (1 - decay) * params, once per optimizer update."""
    decay = ema_decay_at(step, opt)
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def _posthoc_update(state: TrainState, params, opt: OptimConfig):
    """The power-function EMAs after this update, the (state.step + 1)-th (1-based); None when none is tracked."""
    if state.posthoc_emas is None and not opt.posthoc_ema:
        return None
    if state.posthoc_emas is None or len(state.posthoc_emas) != len(opt.posthoc_ema):
        tracked = 0 if state.posthoc_emas is None else len(state.posthoc_emas)
        raise ConfigError(
            f"The state tracks {tracked} post-hoc EMA(s) but posthoc_ema = {opt.posthoc_ema}: build it with "
            "init_train_state(..., posthoc_gammas=opt.posthoc_gammas)."
        )
    return update_power_emas(state.posthoc_emas, params, state.step + 1, opt.posthoc_gammas)


def _draw_levels(key, state: TrainState, batch_size: int, T: int, objective: DiffusionConfig):
    """The batch's noise levels ``[B]`` (the chain's timesteps; EDM's sigmas; flow matching's times), their loss
    weights ``[B]``, and the quarter ``[B]`` (0..3) of the levels' range that each falls in: of [0, T) for the chain,
    of the log-normal's probability for EDM (its quartiles), of [0, 1) for flow matching."""
    ones = jnp.ones((batch_size,), jnp.float32)
    quarter_of = lambda position: jnp.clip(jnp.floor(4.0 * position), 0, 3).astype(jnp.int32)
    if objective.process == "edm":
        sigma = edm.draw_sigmas(key, batch_size, objective.p_mean, objective.p_std)
        position = jax.scipy.stats.norm.cdf((jnp.log(sigma) - objective.p_mean) / objective.p_std)
        return sigma, ones, quarter_of(position)
    if objective.process == "flow":
        sampling = "logit_normal" if objective.t_sampling == "logit_normal" else "uniform"
        t = flow.draw_times(key, batch_size, sampling, objective.logit_mean, objective.logit_std)
        return t, ones, quarter_of(t)
    t, weights = _draw_timesteps(key, state, batch_size, T, objective.t_sampling == "importance")
    return t, weights, (t * 4) // T


def _quarter_losses(losses: jax.Array, quarter: jax.Array) -> dict[str, jax.Array]:
    """``loss_q0``..``loss_q3``: the mean loss of the examples in each quarter of the levels (NaN if none)."""
    return {f"loss_q{q}": jnp.sum(jnp.where(quarter == q, losses, 0.0)) / jnp.sum(quarter == q) for q in range(4)}


def make_train_step(
    apply_fn: Callable,
    schedule: Schedule,
    objective: DiffusionConfig,
    optimizer: optax.GradientTransformation,
    opt: OptimConfig,
    seed: int,
    null_class: int | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build the pure ``train_step(state, batch) -> (state, metrics)``.

    ``apply_fn(params, x_t, t, labels, dropout_key)`` is the network in training mode. A class-conditional network
    has a ``null_class``: the batch's labels go in, each replaced by the null class with probability
    ``objective.label_dropout``; an unconditional one (None) gets no labels.

    ``objective.process`` picks the loss: the chain's (:func:`jaxdiff.losses.diffusion_loss` at timesteps t), EDM's
    (:func:`jaxdiff.edm.edm_loss` at log-normal sigmas) or flow matching's (:func:`jaxdiff.flow.flow_loss` at times in
    (0, 1)); ``objective.offset_noise`` adds offset noise to the training noise
    (:func:`jaxdiff.diffusion.offset_noise`).

    ``batch`` is ``{'image': float32 [B, H, W, C] in [-1, 1], 'label': int32 [B]}`` (the global batch). Its levels,
    noise and label dropout are drawn for the whole batch; with ``opt.grad_accum_steps = k`` the gradient is then
    summed over k micro-batches (examples i, i + k, i + 2k, ...: each device keeps its own rows) in a ``lax.scan``.
    Dropout masks are drawn per micro-batch. Metrics (all
    scalars): ``loss``, ``loss_q0``..``loss_q3`` (the mean loss of the examples whose level lies in each quarter of
    the levels: of [0, T) for the chain, of the log-normal's probability for EDM, of t for flow matching; NaN when
    none does), ``grad_norm``, ``lr``, ``finite`` (1 if the loss and the gradients are finite; if not, the returned
    state is the input state, unchanged, and the caller must stop).
    """
    T = schedule.num_timesteps
    base_key = run_keys(seed)[1]
    lr_fn = learning_rate(opt)
    conditional = null_class is not None

    k = opt.grad_accum_steps

    def draws(batch, key):
        """The step's noise and (dropped) labels for the whole batch, and the key of its dropout masks."""
        noise_key, dropout_key, label_key = jax.random.split(key, 3)
        noise = jax.random.normal(noise_key, batch["image"].shape, batch["image"].dtype)
        if objective.offset_noise > 0:
            noise = diffusion.offset_noise(noise, jax.random.fold_in(noise_key, 1), objective.offset_noise)
        labels = None
        if conditional:
            drop = jax.random.bernoulli(label_key, objective.label_dropout, batch["label"].shape)
            labels = jnp.where(drop, null_class, batch["label"])
        return noise, labels, dropout_key

    def loss_fn(params, x0, noise, labels, t, weights, dropout_key):
        model_fn = lambda x_t, timesteps: apply_fn(params, x_t, timesteps, labels, dropout_key)
        if objective.process == "edm":  # t: the noise levels sigma
            losses = edm.edm_loss(model_fn, x0, noise, t, objective.sigma_data)
        elif objective.process == "flow":  # t: the times in (0, 1)
            losses = flow.flow_loss(model_fn, x0, noise, t)
        else:  # t: the chain's timesteps
            losses = diffusion_loss(schedule, model_fn, x0, t, noise, **objective.loss_kwargs())
        return jnp.mean(losses * weights), losses

    def gradient(params, inputs, dropout_key):
        """(mean loss, per-example losses [B]), grads of the mean, over the batch at once or in k micro-batches."""
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if k == 1:
            return grad_fn(params, *inputs, dropout_key)
        split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        micro = jax.tree_util.tree_map(split, inputs)  # labels None (unconditional) stays None

        def add(carry, part):
            i, (x0, noise, labels, t, weights) = part
            (loss, losses), grads = grad_fn(params, x0, noise, labels, t, weights, jax.random.fold_in(dropout_key, i))
            total_loss, total_grads = carry
            return (total_loss + loss / k, jax.tree_util.tree_map(lambda a, g: a + g / k, total_grads, grads)), losses

        zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
        (loss, grads), losses = jax.lax.scan(add, zero, (jnp.arange(k), micro))
        return (loss, jnp.swapaxes(losses, 0, 1).reshape(-1)), grads  # losses back in the batch's order

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(base_key, state.step)
        t_key, loss_key = jax.random.split(key)
        batch_size = batch["image"].shape[0]
        if batch_size % k:
            raise ConfigError(f"The batch of {batch_size} does not split into grad_accum_steps = {k} micro-batches.")
        t, weights, quarter = _draw_levels(t_key, state, batch_size, T, objective)
        noise, labels, dropout_key = draws(batch, loss_key)
        inputs = (batch["image"], noise, labels, t, weights)
        (loss, losses), grads = gradient(state.params, inputs, dropout_key)
        grad_norm = optax.tree_utils.tree_norm(grads)

        def update(state: TrainState) -> TrainState:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = _ema_update(state.ema_params, params, state.step, opt)
            posthoc = _posthoc_update(state, params, opt)
            history, count = state.loss_history, state.history_count
            if objective.t_sampling == "importance":  # a loop over the batch: only where the draws read the history
                history, count = _record_losses(state, t, jax.lax.stop_gradient(losses))
            return TrainState(state.step + 1, params, ema, opt_state, history, count, posthoc)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step changes nothing, so the state in hand (and any checkpoint of it) stays the last good one.
        # A branch, not a select of new against old, which read the whole state a second time: train.py's digits
        # step takes 0.71x the time with the branch (benchmarks/README.md, "CPU training against PyTorch").
        new_state = jax.lax.cond(finite, update, lambda state: state, state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
            "finite": finite.astype(jnp.float32),
            **_quarter_losses(losses, quarter),
        }
        return new_state, metrics

    return train_step


def shard_train_step(train_step, mesh: Mesh):
    """``jax.jit`` of the step with the batch on the ``data`` axis, the state replicated and donated."""
    replicated = parallel.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(replicated, parallel.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )

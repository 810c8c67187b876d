"""AdamW with linear warmup, cosine (or linear/constant) decay, global-norm clipping and a weight-decay mask."""

import jax
import optax


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then decay to `min_learning_rate`."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.min_learning_rate / cfg.learning_rate)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, cfg.min_learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params):
    """Decay matrices only: biases, norm scales and other vectors are left alone (as in GPT-2/nanoGPT)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """The optimizer for `config.optim`; gradient clipping comes first so the norm is the raw gradient's."""
    chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    chain.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain)

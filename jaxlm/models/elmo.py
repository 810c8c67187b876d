"""ELMo's bidirectional language model (Peters et al. 2018, "Deep contextualized word representations").

A shared token embedding feeds two stacks of projected LSTM layers (LSTMP, :class:`lstm.LSTMLayer`
with hidden cfg.hidden_size projected back to d = cfg.d_model): the forward stack reads left to right
and predicts token t+1, the backward stack reads right to left and predicts token t-1.  From the second
layer on each layer adds its input (residual connection).  Both directions share one softmax, tied to
the embedding: logits = h @ E^T + bias.

Padding: rows are right-padded (mask True on a prefix).  The backward stack reverses only each row's
real tokens (:func:`flip_sequences`), so it starts at the row's last real token, never at padding.

The per-layer representations for transfer (:meth:`ELMo.embeddings`) concatenate the two directions:
layer 0 is the token embedding duplicated to [x; x], layer l is [forward_l; backward_l], each 2d wide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import layers, lstm


def flip_sequences(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Flips each row's first `lengths[b]` steps along time (axis 1), leaving the padding in place.

    Naive `x[:, ::-1]` would put the padding first, and a recurrent layer would then read padding before
    the real tokens.  Example (one row, length 3, padding 0):
      x = [1, 2, 3, 0, 0]  ->  [3, 2, 1, 0, 0]
    Flipping twice is the identity.

    Args:
      x: [B, T, ...]; lengths: int [B] (<= T).
    Returns:
      [B, T, ...], the same shape.
    """
    steps = jnp.arange(x.shape[1])[None, :]                       # [1, T]
    idx = jnp.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)  # [B, T]
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def run_stack(stack, x: jax.Array | None, *, dropout_rate: float = 0.0, keys=None, first_projection=None) -> list:
    """Runs a stack of LSTM layers left to right with residual connections from the second layer on.

    h_1 = lstm_1(x);  h_l = lstm_l(h_{l-1}) + h_{l-1} for l >= 2 (dropout, if any, on each layer's input).
    Args:
      stack: sequence of :class:`lstm.LSTMLayer` mapping d -> d.
      x: [B, T, d].  keys: one dropout key (or None) per layer.
      first_projection: the first layer's input projection of x, already computed (x is then unused).
    Returns:
      list of the layers' outputs, each [B, T, d].
    """
    keys = [None] * len(stack) if keys is None else keys
    outputs, h = [], x
    for n, (layer, key) in enumerate(zip(stack, keys)):
        if n == 0 and first_projection is not None:
            y, _ = layer.recur(first_projection)
        else:
            y, _ = layer(layers.dropout(h, dropout_rate, key))
        h = y if n == 0 else y + h
        outputs.append(h)
    return outputs


class ELMo(nnx.Module):
    """Bidirectional LSTM LM with tied softmax; returns ((forward_logits, backward_logits), None).

    `cfg.projection_size` is not used: every layer projects to d = cfg.d_model, as in the paper (4096
    cells projected to 512).  ELMo is not stateful: `carry` is ignored and None is returned.
    """

    def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs, fused: bool = True):
        self.dtype = layers.compute_dtype(cfg)
        self.dropout_rate = float(cfg.dropout)
        self.num_layers = cfg.num_layers
        d = cfg.d_model
        self.embedding = layers.Embed(vocab_size, d, dtype=self.dtype, rngs=rngs,
                                      std=layers.embedding_std(cfg, recurrent=True))

        def make_stack():
            return nnx.List([lstm.LSTMLayer(d, cfg.hidden_size, d, forget_bias=cfg.forget_bias,
                                            lstm_init=cfg.lstm_init, max_len=cfg.max_len, dtype=self.dtype,
                                            fused=fused, rngs=rngs) for _ in range(cfg.num_layers)])

        self.forward_layers = make_stack()
        self.backward_layers = make_stack()
        self.logit_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))

    def initial_carry(self, batch_size: int):
        """None: the backward direction cannot carry state across segments."""
        del batch_size
        return None

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> embeddings [B, T, d] (compute dtype)."""
        return self.embedding(tokens)

    def _directions(self, x, mask, dropout_key, tokens=None):
        """x [B, T, d] -> (forward outputs, backward outputs): lists of [B, T, d], one per layer.

        With `tokens` (x's ids; x is then unused) each direction's first layer projects the vocabulary
        (`lstm.vocabulary_projection`; the backward one reads the row-flipped tokens).
        """
        batch, steps = (x if tokens is None else tokens).shape[:2]
        lengths = (jnp.full((batch,), steps, jnp.int32) if mask is None
                   else jnp.sum(mask, axis=1, dtype=jnp.int32))
        keys = layers.split_keys(dropout_key, 2 * self.num_layers)
        directions = []
        for stack, flip, stack_keys in ((self.forward_layers, False, keys[:self.num_layers]),
                                        (self.backward_layers, True, keys[self.num_layers:])):
            if tokens is None:
                outputs = run_stack(stack, flip_sequences(x, lengths) if flip else x, dropout_rate=self.dropout_rate,
                                    keys=stack_keys)
            else:
                ids = flip_sequences(tokens, lengths) if flip else tokens
                outputs = run_stack(stack, None, dropout_rate=self.dropout_rate, keys=stack_keys,
                                    first_projection=lstm.vocabulary_projection(stack[0], self.embedding, ids))
            directions.append(outputs)
        fwd, bwd = directions
        return fwd, [flip_sequences(h, lengths) for h in bwd]

    def _logits(self, h, key, positions=None):
        """Top-layer output [B, T, d] -> logits [B, T, V] float32 through the shared, tied softmax ([B, K, V] at
        positions)."""
        logits = self.embedding.attend(layers.at_positions(layers.dropout(h, self.dropout_rate, key), positions))
        return (logits + self.logit_bias[...].astype(self.dtype)).astype(jnp.float32)

    def forward_from_embeddings(self, x, carry=None, *, mask=None, dropout_key=None, positions=None):
        """x [B, T, d] -> ((forward_logits, backward_logits) each [B, T, V] float32, None).

        forward_logits[:, t] predicts token t+1; backward_logits[:, t] predicts token t-1.
        positions: int [B, K] or None: both directions' logits at only these positions ([B, K, V]).
        """
        del carry
        return self._forward(x, None, mask, dropout_key, positions)

    def _forward(self, x, tokens, mask, dropout_key, positions=None):
        keys = layers.split_keys(dropout_key, 3)
        fwd, bwd = self._directions(x, mask, keys[0], tokens)
        return (self._logits(fwd[-1], keys[1], positions), self._logits(bwd[-1], keys[2], positions)), None

    def projects_by_vocabulary(self, tokens: jax.Array, dropout_key=None) -> bool:
        """Whether :meth:`__call__` computes the first layers' input projections per vocabulary entry
        (`lstm.projects_by_vocabulary`)."""
        return lstm.projects_by_vocabulary(self.embedding.embedding.shape[0], tokens, self.dropout_rate,
                                           dropout_key)

    def __call__(self, tokens, carry=None, *, mask=None, dropout_key=None, positions=None):
        """tokens int [B, T], mask bool [B, T] (right padding) -> ((fwd_logits, bwd_logits), None).

        Same function as ``forward_from_embeddings(embed(tokens))``; see :meth:`projects_by_vocabulary`.
        positions: int [B, K] or None: both directions' logits at only these positions ([B, K, V]).
        """
        if self.projects_by_vocabulary(tokens, dropout_key):
            return self._forward(None, tokens, mask, dropout_key, positions)
        return self.forward_from_embeddings(self.embed(tokens), carry, mask=mask, dropout_key=dropout_key,
                                            positions=positions)

    def embeddings(self, tokens, mask=None) -> jax.Array:
        """Per-layer contextual representations [num_layers + 1, B, T, 2d] (no dropout).

        Layer 0 is the token embedding duplicated to [x; x] (as in the paper, so all layers have the
        same width); layer l is [forward_l; backward_l].  Positions where mask is False are padding.
        """
        x = self.embed(tokens)
        fwd, bwd = self._directions(x, mask, None)
        reps = [jnp.concatenate([x, x], axis=-1)]
        reps += [jnp.concatenate([f, b], axis=-1) for f, b in zip(fwd, bwd)]
        return jnp.stack(reps)

    def hidden_states(self, tokens, *, mask=None):
        """The rows of :meth:`embeddings` as a list: [embedding [B, T, 2d], layer 1 [B, T, 2d], ...]."""
        return list(self.embeddings(tokens, mask))


def flops_per_token(cfg, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward, forward = two directions x (LSTMP layers + tied softmax).

    Each direction: per layer 2 * (d*4H + d*4H + H*d) (input, recurrent and projection matmuls), plus
    its softmax 2 * d * V.  `seq_len` does not enter (no attention).
    """
    del seq_len
    d, hidden = cfg.d_model, cfg.hidden_size
    per_direction = cfg.num_layers * lstm.layer_matmul_flops("lstm", d, hidden, d) + 2 * d * vocab_size
    return float(3 * 2 * per_direction)

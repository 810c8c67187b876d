"""Transformer language models: Decoder (GPT, causal) and Encoder (BERT, bidirectional), one implementation.

Both are pre-LN stacks (GPT-2, Radford et al. 2019) of the same :class:`Block`; the only differences are the
`causal` flag of the attention and, for the Encoder, BERT's MLM head transform (Devlin et al. 2019:
dense + GELU + LayerNorm, then the tied output with a vocabulary bias).  Output layers are tied to the
token embedding: ``logits = h @ E^T``.

Analysis hooks: :meth:`Transformer.hidden_states` (embedding output + every block output),
:meth:`Transformer.embed` + :meth:`Transformer.forward_from_embeddings` (differentiate w.r.t. the input
embeddings), and the attention weights each layer sows (``nnx.pop(model, nnx.Intermediate)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models import attention, layers, positions


class Block(nnx.Module):
    """Pre-LN transformer block: x + Drop(MHA(LN(x))), then x + Drop(MLP(LN(x))).  x [B, T, d] -> [B, T, d]."""

    def __init__(self, cfg, *, causal: bool, rngs: nnx.Rngs, fused: bool = True):
        d, dtype = cfg.d_model, layers.compute_dtype(cfg)
        self.rate = float(cfg.dropout)
        self.ln1 = layers.layer_norm(d, dtype=dtype, rngs=rngs)
        self.attn = attention.MultiHeadAttention(d, cfg.num_heads, causal=causal, num_layers=cfg.num_layers,
                                                 dtype=dtype, rngs=rngs, fused=fused,
                                                 query_blocks=int(cfg.attention_query_blocks),
                                                 rope=cfg.get("position_encoding", "learned") == "rope")
        self.ln2 = layers.layer_norm(d, dtype=dtype, rngs=rngs)
        self.mlp = layers.MlpBlock(d, cfg.mlp_ratio * d, num_layers=cfg.num_layers,
                                   gelu_approximate=bool(cfg.gelu_approximate), dtype=dtype, rngs=rngs)

    def __call__(self, x, mask=None, dropout_key=None):
        k_attn, k_mlp = layers.split_keys(dropout_key, 2)
        x = x + layers.dropout(self.attn(self.ln1(x), mask), self.rate, k_attn)
        return x + layers.dropout(self.mlp(self.ln2(x)), self.rate, k_mlp)


class Transformer(nnx.Module):
    """Token embeddings (+ learned positions, or rope in attention: ``position_encoding``), `num_layers` Blocks,
    final LN, (MLM head), tied output.

    Built as ``Cls(cfg, vocab_size, *, rngs)`` (cfg = the ``config.model`` slice).  State is only
    nnx.Param: dropout keys come in at call time.  Use :class:`Decoder` or :class:`Encoder`.
    ``fused=False`` differentiates attention by plain autodiff (forward mode, jvp/jacfwd, works then).
    """

    def __init__(self, cfg, vocab_size: int, *, causal: bool, mlm_head: bool, rngs: nnx.Rngs,
                 fused: bool = True):
        d, dtype = cfg.d_model, layers.compute_dtype(cfg)
        self.causal = causal
        self.max_len = int(cfg.max_len)
        self.rate = float(cfg.dropout)
        self.remat = bool(cfg.remat)
        self.token_embed = layers.Embed(vocab_size, d, dtype=dtype, rngs=rngs,
                                        std=layers.embedding_std(cfg, recurrent=False))
        self.position_encoding = cfg.get("position_encoding", "learned")
        if self.position_encoding == "learned":
            self.pos_embed = positions.PositionEmbed(self.max_len, d, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, causal=causal, rngs=rngs, fused=fused) for _ in range(cfg.num_layers)])
        self.ln_f = layers.layer_norm(d, dtype=dtype, rngs=rngs)
        self.mlm_head = mlm_head
        if mlm_head:
            self.head_dense = layers.linear(d, d, dtype=dtype, rngs=rngs)
            self.head_ln = layers.layer_norm(d, dtype=dtype, rngs=rngs)
            self.output_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
        self.gelu_approximate = bool(cfg.gelu_approximate)

    def initial_carry(self, batch_size: int):
        """Transformers carry no state between segments."""
        del batch_size
        return None

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens int [B, T] -> token (+ learned position) embeddings [B, T, d] (compute dtype, before dropout).

        Raises ValueError if T > cfg.max_len with learned positions (the table has max_len rows); rope and none
        run at any length (analysis beyond the training length), max_len staying the window sampling uses.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_len and self.position_encoding == "learned":
            raise ValueError(f"sequence length {length} exceeds model.max_len={self.max_len} (learned positions)")
        x = self.token_embed(tokens)
        return x + self.pos_embed(length)[None] if self.position_encoding == "learned" else x

    def _block(self, block: Block, h, mask, key):
        if self.remat:  # recompute the block's activations in the backward pass instead of storing them
            # graph_updates=False: the block changes no state, and writing its Params back fails where they are
            # closed over from an outer trace (sampling's scan, sensitivity's vjp: TraceContextError)
            return nnx.remat(Block.__call__, graph_updates=False)(block, h, mask, key)
        return block(h, mask, key)

    def _output(self, h, positions=None) -> jax.Array:
        h = self.ln_f(layers.at_positions(h, positions))   # per-position layers from here: only where asked
        if self.mlm_head:
            h = self.head_ln(layers.gelu(self.head_dense(h), self.gelu_approximate))
        logits = self.token_embed.attend(h).astype(jnp.float32)
        if self.mlm_head:
            logits = logits + self.output_bias[...]
        return logits

    def forward_from_embeddings(self, x: jax.Array, *, mask=None, dropout_key=None, positions=None) -> jax.Array:
        """Input embeddings x [B, T, d] (as from :meth:`embed`) -> logits float32 [B, T, V].

        Everything after the embedding lookup, so analysis can take gradients w.r.t. x.
        mask: bool [B, T] (True = real token; padding keys are hidden from attention) or None.
        positions: int [B, K] or None: the logits at only these positions, [B, K, V] (BERT's gather_indexes:
        the final LN, the MLM head and the output projection then run at K positions, not T).
        Differentiate functionally: ``jax.grad(lambda x: nnx.merge(graphdef, params).forward_from_embeddings(x)...)``.
        A live module cannot be used inside jax.grad/jit directly: its attention layers sow weights, and NNX
        forbids mutating a module from inside a transform's trace (TraceContextError).
        """
        keys = layers.split_keys(dropout_key, 1 + len(self.blocks))
        h = layers.dropout(x, self.rate, keys[0])
        for block, key in zip(self.blocks, keys[1:]):
            h = self._block(block, h, mask, key)
        return self._output(h, positions)

    def __call__(self, tokens: jax.Array, carry=None, *, mask=None, dropout_key=None, positions=None):
        """tokens int32 [B, T] -> (logits float32 [B, T, V], None).  `carry` is ignored (contract).

        positions: int [B, K] to get the logits at only those positions ([B, K, V]; see forward_from_embeddings).
        """
        del carry
        logits = self.forward_from_embeddings(self.embed(tokens), mask=mask, dropout_key=dropout_key,
                                              positions=positions)
        return logits, None

    def hidden_states(self, tokens: jax.Array, *, mask=None) -> list:
        """Residual stream, no dropout: [embedding output, block 1 output, ..., block L output], each [B, T, d]."""
        h = self.embed(tokens)
        states = [h]
        for block in self.blocks:
            h = block(h, mask)
            states.append(h)
        return states


class Decoder(Transformer):
    """GPT: causal self-attention; logits at t predict token t+1."""

    def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs, fused: bool = True):
        super().__init__(cfg, vocab_size, causal=True, mlm_head=False, rngs=rngs, fused=fused)


class Encoder(Transformer):
    """BERT: bidirectional self-attention with key padding mask, MLM head; logits at t reconstruct token t."""

    def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs, fused: bool = True):
        super().__init__(cfg, vocab_size, causal=False, mlm_head=True, rngs=rngs, fused=fused)


def flops_per_token(cfg, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), in the style of PaLM appendix B.

    Exact formula, counting only matrix multiplies (2 flops per multiply-add; biases, LayerNorm, GELU,
    softmax and embedding lookups are not counted)::

        N     = L * (4 + 2 * mlp_ratio) * d^2      # per block: QKV 3d^2, attention out d^2, MLP 2*r*d^2
              + d * V                              # tied output layer h @ E^T
              + d^2   (Encoder only)               # BERT MLM head dense
        flops = 6 * N + 6 * L * T * d

    The attention term follows the project contract (6*L*T*d).  PaLM / nanoGPT and
    ``shared/bench/torch_gpt.py`` count 12*L*T*d (q.k and attn.v over the full T x T matrix: 2 matmuls x
    2*T*d per token x 3); 6*L*T*d is exactly half of it, i.e. only the causal lower triangle.
    """
    d, layers_, t = cfg.d_model, cfg.num_layers, seq_len
    n = layers_ * (4 + 2 * cfg.mlp_ratio) * d * d + d * vocab_size
    if cfg.get("name", "gpt") == "bert":
        n += d * d
    return float(6 * n + 6 * layers_ * t * d)

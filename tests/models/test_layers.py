"""layers.dense / layers.Linear against a float64 NumPy reference and flax's nnx.Linear."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import layers


def test_dense_value_and_gradients_match_numpy_float64():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(3, 5, 7)), rng.normal(size=(7, 4)), rng.normal(size=4)
    g = rng.normal(size=(3, 5, 4))                     # cotangent of y
    y, vjp = jax.vjp(layers.dense, *(jnp.asarray(a, jnp.float32) for a in (x, w, b)))
    dx, dw, db = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)              # dL/dx = g W^T
    np.testing.assert_allclose(dw, np.einsum("bti,bto->io", x, g), rtol=1e-5, atol=1e-5)  # x^T g
    np.testing.assert_allclose(db, g.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    # forward mode too (dense is plain autodiff): J v with tangents (vx, vw, vb)
    vx, vw, vb = rng.normal(size=x.shape), rng.normal(size=w.shape), rng.normal(size=b.shape)
    primals = tuple(jnp.asarray(a, jnp.float32) for a in (x, w, b))
    tangents = tuple(jnp.asarray(a, jnp.float32) for a in (vx, vw, vb))
    _, tangent = jax.jvp(layers.dense, primals, tangents)
    np.testing.assert_allclose(tangent, vx @ w + x @ vw + vb, rtol=1e-4, atol=1e-4)


def test_linear_has_nnx_linear_parameters_and_function():
    ours = layers.linear(6, 3, dtype=jnp.float32, rngs=nnx.Rngs(params=0))
    theirs = nnx.Linear(6, 3, rngs=nnx.Rngs(params=1))
    shapes = [jax.tree.map(jnp.shape, nnx.state(m, nnx.Param)) for m in (ours, theirs)]
    assert shapes[0] == shapes[1]
    nnx.update(theirs, nnx.state(ours, nnx.Param))     # same names: a checkpoint of one loads into the other
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6)), jnp.float32)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6)


def test_dense_vjp_matches_numpy_float64_and_keeps_the_weight_gradient_untransposed():
    rng = np.random.default_rng(2)
    x, w, b = rng.normal(size=(3, 5, 7)), rng.normal(size=(7, 4)), rng.normal(size=4)
    g = rng.normal(size=(3, 5, 4))
    args = tuple(jnp.asarray(a, jnp.float32) for a in (x, w, b))
    y, vjp = jax.vjp(layers.dense_vjp, *args)
    dx, dw, db = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("bti,bto->io", x, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, g.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)

    def transposed_products(dense):   # matmul results transposed afterwards (autodiff's rule gives dw that way)
        eqns = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(dense(args[0], w, args[2]) * g)))(args[1]).jaxpr.eqns
        products = {v for e in eqns if e.primitive.name == "dot_general" for v in e.outvars}
        return [e for e in eqns if e.primitive.name == "transpose" and e.invars[0] in products]
    assert transposed_products(layers.dense) and not transposed_products(layers.dense_vjp)


def test_weight_gradient_matches_numpy_and_multiplies_a_materialised_transpose():
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(9, 5)), rng.normal(size=(9, 4))
    np.testing.assert_allclose(layers.weight_gradient(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32)),
                               x.T @ dy, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(layers.weight_gradient).lower(jnp.zeros((9, 5)), jnp.zeros((9, 4))).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots and all("lhs_contracting_dims={1}" in line for line in dots), dots   # x^T @ dy, not x contracted on 0

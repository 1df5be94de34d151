"""The moving average of the parameters (``--ema-decay``): its rule by hand, and that it never changes training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.steps import ParamsEmaState, TrainState, create_optimizer, evaluation_params, params_ema


def test_the_moving_average_follows_the_warmed_up_rule_by_hand():
    decay, lr = 0.5, 0.25
    tx = optax.chain(optax.sgd(lr), params_ema(decay))
    params = {"w": jnp.array([1.0, -2.0], jnp.float32)}
    state = tx.init(params)
    grads = np.random.default_rng(3).normal(size=(20, 2)).astype(np.float32)
    p = np.array([1.0, -2.0])
    ema = p.copy()
    for t, g in enumerate(grads):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        p = p - lr * g
        d = min(decay, (1 + t) / (10 + t))  # 0.1, 0.18, ... then 0.5 from t = 8 on
        ema = d * ema + (1 - d) * p
        np.testing.assert_allclose(params["w"], p, rtol=1e-6)  # the updates pass unchanged
        np.testing.assert_allclose(state[-1].ema["w"], ema, rtol=1e-5)
    assert int(state[-1].count) == len(grads)
    assert not np.allclose(ema, p)  # an average, not a copy


def test_training_is_the_same_with_or_without_the_average():
    base = dict(database_url="postgresql://x@localhost/db", steps=10)
    plain, averaged = (create_optimizer(TrainConfig(**base, ema_decay=e), 10) for e in (0.0, 0.99))
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.zeros((2,))}}
    grads = {"conv": {"kernel": jnp.full((3, 3, 2, 2), 0.3), "bias": jnp.full((2,), -0.1)}}
    results = []
    for tx in (plain, averaged):
        p, s = params, tx.init(params)
        for _ in range(3):
            updates, s = tx.update(grads, s, p)
            p = optax.apply_updates(p, updates)
        results.append((p, s))
    (p_plain, s_plain), (p_avg, s_avg) = results
    for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_avg)):
        np.testing.assert_array_equal(a, b)
    assert not any(isinstance(part, ParamsEmaState) for part in s_plain)
    assert evaluation_params(TrainState(jnp.int32(3), p_avg, s_avg), ema=True) is s_avg[-1].ema
    assert evaluation_params(TrainState(jnp.int32(3), p_plain, s_plain), ema=False) is p_plain
    with pytest.raises(TypeError, match="no moving average"):
        evaluation_params(TrainState(jnp.int32(3), p_plain, s_plain), ema=True)


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_a_decay_outside_0_1_is_refused_naming_the_flag(value):
    with pytest.raises(ConfigError, match="--ema-decay"):
        TrainConfig(database_url="postgresql://x@localhost/db", steps=1, ema_decay=value)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.inference import sampling

N = 4000  # samples per distribution check


def _draw(sampler, logits_V, n=N, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  logits = jnp.broadcast_to(logits_V, (1, logits_V.shape[0]))
  return np.asarray(jax.jit(jax.vmap(lambda k: sampler(logits, k)[0]))(keys))


LOGITS = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.25, 0.2]))  # order: 1, 3, 4, 2, 0


def assert_frequencies(draws, probs, n):
  """Observed frequencies of 0..len(probs)-1 within 4 binomial standard
  deviations (Monte-Carlo error, not rounding) plus one draw of the expected
  probabilities.
  """
  probs = np.asarray(probs, np.float64)
  freq = np.bincount(draws, minlength=len(probs)) / n
  tol = 4 * np.sqrt(probs * (1 - probs) / n) + 1 / n
  assert np.all(np.abs(freq - probs) <= tol), (freq, probs, tol)


def test_greedy_and_temperature_zero():
  logits = jax.random.normal(jax.random.key(1), (6, 50))
  want = np.argmax(np.asarray(logits), axis=-1)
  assert isinstance(
      sampling.make_sampler(0.0, top_k=5, top_p=0.5), sampling.Greedy
  )
  np.testing.assert_array_equal(
      sampling.Greedy()(logits, jax.random.key(0)), want
  )


def test_temperature_matches_softmax():
  # a low temperature concentrates the mass on the argmax, a high one spreads it
  for t in (1.0, 0.05, 3.0):
    probs = np.exp(np.asarray(LOGITS, np.float64) / t)
    probs /= probs.sum()
    assert_frequencies(_draw(sampling.Temperature(t), LOGITS), probs, N)


def test_top_k_support_and_renormalisation():
  draws = _draw(sampling.TopK(1.0, 2), LOGITS)
  assert set(np.unique(draws)) == {1, 3}
  assert_frequencies(draws, np.array([0, 0.4, 0, 0.25, 0]) / 0.65, N)


@pytest.mark.parametrize(
    "p, support",
    [
        (0.3, {1}),
        (0.39, {1}),
        (0.41, {1, 3}),
        (0.7, {1, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_support(p, support):
  draws = _draw(sampling.TopP(1.0, p), LOGITS, n=1500)
  assert set(np.unique(draws)) == support


def test_top_p_with_top_k():
  draws = _draw(sampling.make_sampler(1.0, top_k=2, top_p=0.95), LOGITS, n=1500)
  assert set(np.unique(draws)) == {1, 3}


def test_determinism_by_key():
  s = sampling.make_sampler(1.3, top_k=0, top_p=0.9)
  a, b, c = (
      _draw(s, LOGITS, 300, seed=3),
      _draw(s, LOGITS, 300, seed=3),
      _draw(s, LOGITS, 300, seed=4),
  )
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_stop_rule():
  rule = sampling.StopRule(max_new_tokens=4, stop_ids=[2, 7])
  assert rule.stop_ids == (2, 7)
  np.testing.assert_array_equal(
      rule.is_stop(jnp.array([2, 3, 7, 0])), [True, False, True, False]
  )
  assert not sampling.StopRule(3).is_stop(jnp.array([2])).any()
  hash(rule)  # static argument of jit


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_k=-2), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
    ],
)
def test_bad_flags(kw, msg):
  with pytest.raises(ValueError, match=msg):
    sampling.make_sampler(**kw)


def test_bad_stop_rule():
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.StopRule(0)

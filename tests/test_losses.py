"""Loss terms against numpy formulas written here, and their composition."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ppojax.rl.losses import (
    LossInputs,
    LossTerm,
    combine,
    entropy_loss,
    explained_variance,
    kl_estimate,
    kl_loss,
    ppo_clip_loss,
    resolve_term,
    value_loss,
)

PPO_TERMS = [LossTerm("policy", ppo_clip_loss, 1.0, {"clip_eps": 0.2}),
             LossTerm("value", value_loss, 0.1, {"clip_eps": 0.2}),
             LossTerm("entropy", entropy_loss, 0.01)]

MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 1, 1],
        [0, 0, 0, 0, 1, 0],
    ],
    np.float32,
)
REAL = MASK > 0


def _arrays(seed=0, garbage=True):
    rng = np.random.default_rng(seed)
    shape = MASK.shape
    out = {
        "logprobs": rng.normal(-2.0, 0.5, shape),
        "ref_logprobs": rng.normal(-2.0, 0.5, shape),
        "entropy": rng.uniform(0.5, 3.0, shape),
        "values": rng.normal(0.0, 1.0, shape),
        "advantages": rng.normal(0.0, 1.0, shape),
        "returns": rng.normal(0.0, 1.0, shape),
    }
    # Old log-probs within +-0.4 of the current ones, so some ratios fall outside [0.8, 1.2] and some inside.
    out["old_logprobs"] = out["logprobs"] + rng.uniform(-0.4, 0.4, shape)
    out["old_values"] = out["values"] + rng.uniform(-0.5, 0.5, shape)
    out = {k: v.astype(np.float32) for k, v in out.items()}
    if garbage:  # padding holds values that would blow up exp() if they leaked
        for k in out:
            out[k] = np.where(REAL, out[k], 1e4).astype(np.float32)
    return out


def _inputs(arrays, **kw):
    return LossInputs.create(
        mask=jnp.asarray(MASK),
        tokens=jnp.zeros(MASK.shape, jnp.int32),
        **{k: jnp.asarray(v) for k, v in arrays.items()},
        **kw,
    )


def _np_mean(x):
    return float(np.sum(np.where(REAL, x, 0.0)) / MASK.sum())


def _reference_ppo(a, clip_eps, dual_clip=None):
    """Per-token loop over real tokens, in the papers' objective form (maximised), negated at the end."""
    objectives, clipped, sq_log_ratio, ratios = [], [], [], []
    for b, t in zip(*np.nonzero(REAL)):
        log_ratio = float(a["logprobs"][b, t]) - float(a["old_logprobs"][b, t])
        ratio = np.exp(log_ratio)
        adv = float(a["advantages"][b, t])
        obj = min(ratio * adv, min(max(ratio, 1 - clip_eps), 1 + clip_eps) * adv)
        if dual_clip is not None and adv < 0:
            obj = max(obj, dual_clip * adv)
        objectives.append(obj)
        # The clip binds when the ratio has left the trust region in the direction the advantage rewards.
        clipped.append((adv > 0 and ratio > 1 + clip_eps) or (adv < 0 and ratio < 1 - clip_eps))
        sq_log_ratio.append(log_ratio**2)
        ratios.append(ratio)
    return {
        "policy_loss": -np.mean(objectives),
        "clipfrac": np.mean(clipped),
        "approx_kl": 0.5 * np.mean(sq_log_ratio),
        "ratio_mean": np.mean(ratios),
        "ratio_max": np.max(ratios),
    }


class PpoClipLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((0.2, None), (0.1, None), (0.2, 3.0), (0.1, 1.5))
    def test_matches_reference(self, clip_eps, dual_clip):
        a = _arrays(0)
        loss, metrics = self.variant(functools.partial(ppo_clip_loss, clip_eps=clip_eps, dual_clip=dual_clip))(
            _inputs(a)
        )
        ref = _reference_ppo(a, clip_eps, dual_clip)
        np.testing.assert_allclose(loss, ref["policy_loss"], rtol=1e-5)
        for k, v in ref.items():
            np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
        assert 0.0 < float(metrics["clipfrac"]) < 1.0  # the inputs exercise both branches

    def test_ratio_one(self):
        a = _arrays(1)
        a["old_logprobs"] = a["logprobs"].copy()
        loss, metrics = ppo_clip_loss(_inputs(a))
        assert float(metrics["approx_kl"]) == 0.0
        assert float(metrics["clipfrac"]) == 0.0
        assert float(metrics["ratio_max"]) == 1.0
        np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)
        np.testing.assert_allclose(loss, -_np_mean(a["advantages"]), rtol=1e-5)

    def test_dual_clip_caps_negative_advantage_loss(self):
        # One token, advantage -1, ratio e^3 ~ 20: plain PPO loss is ~20, dual clip c=3 caps it at 3.
        one = {k: jnp.full((1, 1), v, jnp.float32) for k, v in
               {"logprobs": 0.0, "old_logprobs": -3.0, "advantages": -1.0}.items()}
        inputs = LossInputs.create(mask=jnp.ones((1, 1)), **one)
        plain, _ = ppo_clip_loss(inputs)
        dual, _ = ppo_clip_loss(inputs, dual_clip=3.0)
        np.testing.assert_allclose(plain, np.exp(3.0), rtol=1e-5)
        np.testing.assert_allclose(dual, 3.0, rtol=1e-6)
        # A positive advantage is unaffected by the dual clip.
        pos = inputs.replace(advantages=jnp.ones((1, 1)))
        np.testing.assert_allclose(ppo_clip_loss(pos, dual_clip=3.0)[0], ppo_clip_loss(pos)[0])
        with pytest.raises(ValueError, match="dual_clip"):
            ppo_clip_loss(inputs, dual_clip=1.0)

    def test_padding_garbage_gives_finite_gradients(self):
        a = _arrays(2)
        a["logprobs"] = np.where(REAL, a["logprobs"], np.nan).astype(np.float32)

        def f(logprobs):
            return ppo_clip_loss(_inputs(a).replace(logprobs=logprobs))[0]

        grad = jax.grad(f)(jnp.asarray(a["logprobs"]))
        assert np.all(np.isfinite(grad))
        assert np.all(np.asarray(grad)[~REAL] == 0)
        assert np.isfinite(float(f(jnp.asarray(a["logprobs"]))))

    def test_global_token_count_makes_minibatch_losses_add_up(self):
        a = _arrays(3)
        full, _ = ppo_clip_loss(_inputs(a))
        total = 0.0
        for rows in (slice(0, 2), slice(2, 4)):
            part = LossInputs.create(
                mask=jnp.asarray(MASK[rows]),
                n_tokens=MASK.sum(),
                **{k: jnp.asarray(a[k][rows]) for k in ("logprobs", "old_logprobs", "advantages")},
            )
            total += float(ppo_clip_loss(part)[0])
        np.testing.assert_allclose(total, full, rtol=1e-5)

    def test_shape_mismatch_and_missing_field_fail(self):
        a = _arrays(0)
        with pytest.raises(AssertionError):
            ppo_clip_loss(_inputs(a).replace(advantages=jnp.zeros((4, 5))))
        with pytest.raises(ValueError, match="old_logprobs"):
            ppo_clip_loss(_inputs(a).replace(old_logprobs=None))


class OtherTermsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.2, 0.05)
    def test_value_loss(self, clip_eps):
        a = _arrays(4)
        loss, metrics = self.variant(functools.partial(value_loss, clip_eps=clip_eps))(_inputs(a))
        terms, clipped = [], []
        for b, t in zip(*np.nonzero(REAL)):
            v, v_old, r = (float(a[k][b, t]) for k in ("values", "old_values", "returns"))
            v_clip = v_old + min(max(v - v_old, -clip_eps), clip_eps)
            terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
            clipped.append((v_clip - r) ** 2 > (v - r) ** 2)
        np.testing.assert_allclose(loss, 0.5 * np.mean(terms), rtol=1e-5)
        np.testing.assert_allclose(metrics["value_loss"], 0.5 * np.mean(terms), rtol=1e-5)
        np.testing.assert_allclose(metrics["value_clipfrac"], np.mean(clipped), rtol=1e-6)
        assert 0.0 < float(metrics["value_clipfrac"]) < 1.0

    def test_value_loss_unclipped_when_values_unchanged(self):
        a = _arrays(5, garbage=False)
        a["old_values"] = a["values"].copy()
        loss, metrics = value_loss(_inputs(a))
        np.testing.assert_allclose(loss, 0.5 * _np_mean((a["values"] - a["returns"]) ** 2), rtol=1e-5)
        assert float(metrics["value_clipfrac"]) == 0.0

    def test_entropy_loss(self):
        a = _arrays(6)
        loss, metrics = entropy_loss(_inputs(a))
        np.testing.assert_allclose(metrics["entropy"], _np_mean(a["entropy"]), rtol=1e-6)
        np.testing.assert_allclose(loss, -_np_mean(a["entropy"]), rtol=1e-6)

    def test_explained_variance(self):
        a = _arrays(7)
        a["values"] = (a["returns"] + 0.5 * a["values"]).astype(np.float32)  # a critic that is partly right
        v, r = a["values"][REAL], a["returns"][REAL]
        expected = 1.0 - np.var(r - v) / np.var(r)
        got = explained_variance(jnp.asarray(a["values"]), jnp.asarray(a["returns"]), jnp.asarray(MASK))
        assert 0.1 < expected < 0.95
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        perfect = explained_variance(jnp.asarray(a["returns"]), jnp.asarray(a["returns"]), jnp.asarray(MASK))
        np.testing.assert_allclose(perfect, 1.0)


class KlTest(chex.TestCase):
    def test_estimators_closed_forms(self):
        a = _arrays(8, garbage=False)
        lp, ref = a["logprobs"].astype(np.float64), a["ref_logprobs"].astype(np.float64)
        r = np.exp(ref) / np.exp(lp)  # p_ref / p_policy at the sampled token
        expected = {"k1": -np.log(r), "k2": 0.5 * np.log(r) ** 2, "k3": (r - 1) - np.log(r)}
        for name, want in expected.items():
            got = kl_estimate(jnp.asarray(a["logprobs"]), jnp.asarray(a["ref_logprobs"]), name)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
        k3 = np.asarray(kl_estimate(jnp.asarray(a["logprobs"]), jnp.asarray(a["ref_logprobs"]), "k3"))
        assert np.all(k3 >= 0)
        same = kl_estimate(jnp.asarray(a["logprobs"]), jnp.asarray(a["logprobs"]), "k3")
        assert np.all(np.asarray(same) == 0)
        with pytest.raises(ValueError, match="k4"):
            kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")

    def test_k1_and_k3_are_unbiased(self):
        # Monte Carlo over samples of p: E_p[k1] = E_p[k3] = KL(p || q).
        rng = np.random.default_rng(0)
        p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
        q = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
        true_kl = float(np.sum(p * np.log(p / q)))
        x = rng.choice(len(p), size=200_000, p=p)
        lp, lq = jnp.asarray(np.log(p)[x], jnp.float32), jnp.asarray(np.log(q)[x], jnp.float32)
        for name in ("k1", "k3"):
            np.testing.assert_allclose(float(jnp.mean(kl_estimate(lp, lq, name))), true_kl, rtol=0.03, err_msg=name)

    @parameterized.parameters("k1", "k2", "k3")
    def test_kl_loss(self, estimator):
        a = _arrays(9)
        loss, metrics = kl_loss(_inputs(a), estimator=estimator)
        log_r = (a["ref_logprobs"] - a["logprobs"]).astype(np.float64)
        per_token = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}[estimator]
        np.testing.assert_allclose(loss, _np_mean(np.where(REAL, per_token, 0.0)), rtol=1e-5)
        np.testing.assert_allclose(metrics[f"kl_{estimator}"], loss)


# --- composition ---------------------------------------------------------------------------------------------------


def mean_advantage_term(inputs, *, scale=1.0):
    """A user-defined term, found by resolve_term through this module's name."""
    mask = inputs.mask
    mean = jnp.sum(inputs.advantages * mask) / inputs.n_tokens
    return scale * mean, {"mean_advantage": mean}


def extra_term(inputs):
    """A user term reading an array LossInputs does not name."""
    bonus = inputs.extra["bonus"]
    return jnp.sum(bonus * inputs.mask) / inputs.n_tokens, {"bonus": jnp.max(bonus)}


NOT_CALLABLE = 3


class CombineTest(chex.TestCase):
    def test_total_is_weighted_sum(self):
        a = _arrays(10)
        terms = [
            LossTerm("policy", ppo_clip_loss, 1.0, {"clip_eps": 0.1}),
            LossTerm("value", "value_loss", 0.5),
            LossTerm("entropy", entropy_loss, 0.01),
            LossTerm("kl", kl_loss, 0.2, {"estimator": "k2"}),
            LossTerm("mine", f"{__name__}:mean_advantage_term", -2.0, {"scale": 3.0}),
        ]
        total, metrics = jax.jit(combine(terms))(_inputs(a))

        policy = _reference_ppo(a, 0.1)["policy_loss"]
        v_clip = a["old_values"] + np.clip(a["values"] - a["old_values"], -0.2, 0.2)
        value = 0.5 * _np_mean(np.maximum((a["values"] - a["returns"]) ** 2, (v_clip - a["returns"]) ** 2))
        entropy = -_np_mean(a["entropy"])
        kl = _np_mean(0.5 * (a["ref_logprobs"] - a["logprobs"]) ** 2)
        mine = 3.0 * _np_mean(a["advantages"])
        expected = {"policy": policy, "value": 0.5 * value, "entropy": 0.01 * entropy, "kl": 0.2 * kl,
                    "mine": -2.0 * mine}
        for name, want in expected.items():
            np.testing.assert_allclose(metrics[f"loss/{name}"], want, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(total, sum(expected.values()), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["loss/total"], total)
        for key in ("policy_loss", "clipfrac", "approx_kl", "value_loss", "entropy", "kl_k2", "mean_advantage"):
            assert key in metrics, key

    def test_weights_override_without_retracing(self):
        a = _arrays(11)
        traces = []

        def counted(inputs, weights):
            traces.append(1)
            return combine(PPO_TERMS)(inputs, weights)

        fn = jax.jit(counted)
        inputs = _inputs(a)
        base, m = fn(inputs, {"entropy": jnp.float32(0.01)})
        for coef in (0.0, 0.5, 2.0):
            total, metrics = fn(inputs, {"entropy": jnp.float32(coef)})
            want = float(m["loss/policy"] + m["loss/value"]) + coef * float(-m["entropy"])
            np.testing.assert_allclose(total, want, rtol=1e-5)
        assert len(traces) == 1
        with pytest.raises(ValueError, match="nope"):
            combine(PPO_TERMS)(inputs, {"nope": 1.0})

    def test_gradient_flows_through_combined_loss(self):
        a = _arrays(12)
        loss_fn = combine([LossTerm("policy", ppo_clip_loss), LossTerm("entropy", entropy_loss, 0.1)])

        def f(logprobs):
            return loss_fn(_inputs(a).replace(logprobs=logprobs))[0]

        grad = jax.grad(f)(jnp.asarray(a["logprobs"]))
        assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)

    def test_extra_inputs_reach_user_terms(self):
        a = _arrays(13)
        bonus = jnp.asarray(np.where(REAL, 2.0, 99.0), jnp.float32)
        total, metrics = combine([LossTerm("bonus", extra_term, 0.5)])(_inputs(a, extra={"bonus": bonus}))
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)  # 0.5 * mean over real tokens of 2.0

    def test_composition_errors(self):
        with pytest.raises(ValueError, match="unique"):
            combine([LossTerm("a", entropy_loss), LossTerm("a", value_loss)])
        with pytest.raises(ValueError, match="at least one"):
            combine([])
        with pytest.raises(ValueError, match="name"):
            LossTerm("", entropy_loss)
        with pytest.raises(ValueError, match="weight"):
            LossTerm("e", entropy_loss, float("nan"))
        inputs = _inputs(_arrays(0))
        clash = combine([LossTerm("e1", entropy_loss), LossTerm("e2", entropy_loss)])
        with pytest.raises(ValueError, match="entropy"):
            clash(inputs)
        bad = combine([LossTerm("bad", lambda inputs: jnp.float32(0.0))])
        with pytest.raises(TypeError, match="bad"):
            bad(inputs)
        vector = combine([LossTerm("vec", lambda inputs: (inputs.mask.sum(0), {}))])
        with pytest.raises(AssertionError, match="vec"):
            vector(inputs)


class ResolveTermTest(chex.TestCase):
    def test_resolves(self):
        assert resolve_term(f"{__name__}:mean_advantage_term") is mean_advantage_term
        assert resolve_term("ppojax.rl.losses:value_loss") is value_loss
        assert resolve_term("ppo_clip_loss") is ppo_clip_loss
        assert resolve_term(entropy_loss) is entropy_loss

    @parameterized.parameters(
        ("no_such_builtin", ValueError),
        ("a:b:c", ValueError),
        (":f", ValueError),
        ("mod:", ValueError),
        ("ppojax.rl.losses:value_loss.", ValueError),
        ("ppojax_no_such_module_xyz:f", ImportError),
        ("ppojax.rl.losses:no_such_function", AttributeError),
        ("ppojax.rl.losses:KL_ESTIMATORS", TypeError),
        (42, TypeError),
    )
    def test_errors(self, spec, error):
        with pytest.raises(error):
            resolve_term(spec)

    def test_errors_in_this_module(self):
        with pytest.raises(AttributeError, match="missing_fn"):
            resolve_term(f"{__name__}:missing_fn")
        with pytest.raises(TypeError, match="not callable"):
            resolve_term(f"{__name__}:NOT_CALLABLE")
        with pytest.raises(AttributeError):
            LossTerm("x", f"{__name__}:missing_fn")


# --- aggregation, clip-higher, GSPO (the estimators' issue) ------------------------------------------------------


def _loop_aggregate(x, mask, mode):
    """The table's formulas, one sequence and one token at a time."""
    B, T = mask.shape
    seq_sums, seq_counts = [], []
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if mask[b, t] > 0:
                s += float(x[b, t])
                n += 1
        seq_sums.append(s)
        seq_counts.append(n)
    if mode == "token-mean":
        return sum(seq_sums) / sum(seq_counts)
    if mode == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_counts)) / B
    if mode == "seq-mean-token-sum":
        return sum(seq_sums) / B
    return sum(seq_sums) / (B * T)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_aggregate_modes_match_their_formulas(mode):
    from ppojax.rl.losses import aggregate

    x = _arrays(21)["logprobs"]  # garbage 1e4 on padding must not leak
    np.testing.assert_allclose(aggregate(jnp.asarray(x), jnp.asarray(MASK), mode), _loop_aggregate(x, MASK, mode),
                               rtol=1e-5)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_aggregated_loss_is_exact_across_row_splits(mode):
    """Shares of one batch with global token and sequence counts add up to the whole batch's loss."""
    a = _arrays(22)
    whole = ppo_clip_loss(_inputs(a, aggregation=mode), clip_eps=0.2)[0]
    n_tokens, n_seqs = jnp.float32(MASK.sum()), jnp.float32(MASK.shape[0])
    parts = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        part = LossInputs.create(mask=jnp.asarray(MASK[rows]), n_tokens=n_tokens, n_seqs=n_seqs,
                                 aggregation=mode, **{k: jnp.asarray(v[rows]) for k, v in a.items()})
        parts = parts + ppo_clip_loss(part, clip_eps=0.2)[0]
    np.testing.assert_allclose(parts, whole, rtol=1e-5)


def test_clip_higher_widens_only_the_upper_bound():
    a = _arrays(23)
    # positive advantages everywhere: the clip at 1 + eps_high binds from above
    a["advantages"] = np.where(REAL, np.abs(a["advantages"]) + 0.1, a["advantages"]).astype(np.float32)
    got, _ = ppo_clip_loss(_inputs(a), clip_eps=0.2, clip_eps_high=0.28)
    want = []
    for b, t in zip(*np.nonzero(REAL)):
        r = np.exp(float(a["logprobs"][b, t]) - float(a["old_logprobs"][b, t]))
        adv = float(a["advantages"][b, t])
        want.append(-min(r * adv, min(max(r, 0.8), 1.28) * adv))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    symmetric, _ = ppo_clip_loss(_inputs(a), clip_eps=0.2)
    assert float(got) < float(symmetric)  # more room above: a lower (better) clipped objective is reachable


def test_gspo_ratio_value_and_gradient():
    from ppojax.rl.losses import gspo_loss

    a = _arrays(24)
    # sequence-level advantages: one value per row on its real tokens (group estimators give exactly that)
    per_row = np.array([0.7, -0.4, 1.3, -1.1], np.float32)
    a["advantages"] = np.where(REAL, per_row[:, None], 1e4).astype(np.float32)

    def reference(logprobs):
        """GSPO's objective in the paper's sequence form: s_i = exp(mean_t log ratio), per-sequence clip, mean over
        the sequences that have tokens (seq-mean-token-mean: each sequence counts once)."""
        total = 0.0
        for b in range(MASK.shape[0]):
            real = MASK[b] > 0
            if not real.any():
                continue
            s = jnp.exp(jnp.mean(logprobs[b][real] - a["old_logprobs"][b][real]))
            adv = per_row[b]
            total = total + jnp.maximum(-adv * s, -adv * jnp.clip(s, 0.8, 1.2))
        return total / MASK.shape[0]

    logp = jnp.asarray(a["logprobs"])
    loss = lambda lp: gspo_loss(_inputs({**a, "logprobs": lp}, aggregation="seq-mean-token-mean"), clip_eps=0.2)[0]
    np.testing.assert_allclose(loss(logp), reference(logp), rtol=1e-5)
    g, g_ref = jax.grad(loss)(logp), jax.grad(reference)(logp)
    np.testing.assert_allclose(np.where(REAL, g, 0.0), np.where(REAL, g_ref, 0.0), rtol=1e-4, atol=1e-7)
    _, metrics = gspo_loss(_inputs(a, aggregation="seq-mean-token-mean"), clip_eps=0.2)
    # the logged ratio is the sequence ratio on each token
    s1 = np.exp(np.mean(a["logprobs"][1][REAL[1]] - a["old_logprobs"][1][REAL[1]]))
    assert float(metrics["ratio_max"]) >= s1 - 1e-6


def test_policy_loss_registry():
    from ppojax.rl.losses import get_policy_loss, gspo_loss

    assert get_policy_loss("ppo") is ppo_clip_loss and get_policy_loss("gspo") is gspo_loss
    with pytest.raises(ValueError, match="did you mean 'gspo'"):
        get_policy_loss("gsop")

"""The reward registry (``ppojax.rl.rewards``): rewards named by ``reward.kind`` from a YAML config whose ``imports:``
brings in the module that registers them, built by ``build_reward``, and checked against a loop written here that
decodes with the tokenizer and calls the user's function. ``imports`` failures are one-line errors."""

import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from ppojax.io import configlib
from ppojax.io.tokenizer import gpt2_offline_tokenizer
from ppojax.rl import rewards
from ppojax.train.config import ExperimentConfig, ModelConfig, RewardConfig, load_config

MODEL = ModelConfig(vocab_size=50257).random_init_config()


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # imports: appends the config's directory for the process


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_offline_tokenizer()


def _write_config(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _batch(tokenizer, texts, time=12):
    """Right-padded token ids and mask of ``texts``, with a stray token after each one's end (masked out)."""
    rows = [tokenizer.encode(t)[:time - 1] for t in texts]
    tokens = np.full((len(rows), time), 50256, np.int32)
    mask = np.zeros((len(rows), time), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
        tokens[i, len(row)] = 1110  # ' good' after the end: must not be scored
    return tokens, mask


def _left_padded(tokenizer, texts, time=6):
    rows = [tokenizer.encode(t)[-time:] for t in texts]
    ids = np.full((len(rows), time), 50256, np.int32)
    mask = np.zeros((len(rows), time), np.int32)
    for i, row in enumerate(rows):
        ids[i, time - len(row):], mask[i, time - len(row):] = row, 1
    return ids, mask


def _decoded(tokenizer, ids, mask):
    return [tokenizer.decode([int(t) for t, m in zip(row, keep) if m > 0], skip_special_tokens=True)
            for row, keep in zip(ids, mask)]


def _build(cfg, tokenizer, config_dir=None):
    return rewards.build_reward(cfg.reward, tokenizer=tokenizer, model_config=MODEL, config_dir=config_dir)


RESPONSES = ["a good day, good", "nothing here", "good", "so good and bad"]


def test_host_text_reward_from_an_imported_module_scores_the_decoded_responses(tmp_path, tokenizer):
    from tests.extensions import text_rewards

    path = _write_config(tmp_path, """\
        imports: [tests.extensions.text_rewards]
        reward: {kind: word_share, kwargs: {word: good}}
    """)
    cfg, config_dir = load_config(path)
    assert cfg.imports == ("tests.extensions.text_rewards",) and config_dir == tmp_path.resolve()
    reward, host_reward = _build(cfg, tokenizer, config_dir)
    assert reward is None and not host_reward.uses_prompts
    tokens, mask = _batch(tokenizer, RESPONSES)
    expected = [text_rewards.word_share([text], word="good")[0] for text in _decoded(tokenizer, tokens, mask)]
    scores = host_reward(tokens, mask)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert expected[1] == 0 and expected[2] == 1  # the masked-out ' good' after "nothing here" is not read


def test_host_reward_that_asks_for_prompts_gets_each_responses_prompt(tmp_path, tokenizer):
    from tests.extensions import text_rewards

    cfg, _ = load_config({"reward": {"kind": "echoes_prompt"}}, imports=["tests.extensions.text_rewards"])
    _, host_reward = _build(cfg, tokenizer)
    assert host_reward.uses_prompts
    prompts = ["The day was", "I feel"]  # two prompts, two responses each (rows g*2, g*2+1 share prompt g)
    responses = ["it was a good day was", "bad", "I feel fine", "feel"]
    tokens, mask = _batch(tokenizer, responses)
    p_ids, p_mask = _left_padded(tokenizer, prompts)
    prompt_texts = _decoded(tokenizer, p_ids, p_mask)
    expected = [text_rewards.echoes_prompt([r], [prompt_texts[i // 2]])[0]
                for i, r in enumerate(_decoded(tokenizer, tokens, mask))]
    assert expected == [1.0, 0.0, 1.0, 1.0]
    np.testing.assert_array_equal(host_reward(tokens, mask, prompts=(p_ids, p_mask)), expected)
    repeated = (np.repeat(p_ids, 2, axis=0), np.repeat(p_mask, 2, axis=0))  # the rollout's [batch, P] prompts
    np.testing.assert_array_equal(host_reward(tokens, mask, prompts=repeated), expected)
    with pytest.raises(TypeError, match="scores with the prompts"):
        host_reward(tokens, mask)


def test_jittable_registered_reward_is_a_pytree_with_its_kwargs_bound(tokenizer):
    from tests.extensions import text_rewards

    cfg, _ = load_config({"reward": {"kind": "count_of_token"}}, overrides=["reward.kwargs.token=7"],
                         imports=["tests.extensions.text_rewards"])
    reward, host_reward = _build(cfg, tokenizer)
    assert host_reward is None and isinstance(reward, rewards.FunctionReward)
    tokens = jnp.asarray([[7, 7, 1, 7], [2, 7, 3, 3]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
    scores = reward(tokens, mask)
    np.testing.assert_array_equal(scores, text_rewards.count_of_token(tokens, mask, token=7))
    np.testing.assert_array_equal(scores, [2.0, 1.0])
    rewards.check_reward_fn(reward, 2, 4)


def test_a_module_next_to_the_config_registers_a_reward_named_in_set(tmp_path, tokenizer):
    (tmp_path / "my_rewards_reg.py").write_text(textwrap.dedent("""\
        import ppojax.rl.rewards as rewards

        @rewards.register_reward("length_in_words_reg", host=True)
        def length_in_words(responses, *, scale=1.0):
            return [scale * len(r.split()) for r in responses]
    """))
    path = _write_config(tmp_path, "imports: [my_rewards_reg]\n")
    try:
        cfg, config_dir = load_config(path, overrides=["reward.kind=length_in_words_reg", "reward.kwargs={scale: 2}"])
        _, host_reward = _build(cfg, tokenizer, config_dir)
        tokens, mask = _batch(tokenizer, RESPONSES)
        np.testing.assert_array_equal(host_reward(tokens, mask),
                                      [2.0 * len(t.split()) for t in _decoded(tokenizer, tokens, mask)])
    finally:
        sys.modules.pop("my_rewards_reg", None)


def test_host_function_spec_names_a_text_function(tokenizer):
    from tests.extensions import text_rewards

    cfg = RewardConfig(kind="host_function", function="tests.extensions.text_rewards:word_share",
                       kwargs={"word": "bad"})
    _, host_reward = rewards.build_reward(cfg, tokenizer=tokenizer, model_config=MODEL, config_dir=None)
    tokens, mask = _batch(tokenizer, RESPONSES)
    expected = [text_rewards.word_share([t], word="bad")[0] for t in _decoded(tokenizer, tokens, mask)]
    np.testing.assert_allclose(host_reward(tokens, mask), expected, rtol=1e-6)


def test_builtins_are_registered_names():
    assert {"lexicon", "vader", "reward_model", "function", "host_function"} <= set(rewards.reward_names())


def test_errors_about_a_built_reward_name_its_config_key():
    assert rewards.reward_label(RewardConfig(kind="function", function="m:f")) == "reward.function='m:f'"
    assert rewards.reward_label(RewardConfig(kind="reward_model", reward_model_path="rm")) == \
        "reward.reward_model_path='rm'"
    assert rewards.reward_label(RewardConfig(kind="vader")) == "reward.kind='vader'"


def test_lexicon_and_vader_build_by_name(tokenizer):
    reward, host = rewards.build_reward(RewardConfig(kind="lexicon", lexicon_reduce="sum"), tokenizer=tokenizer,
                                        model_config=MODEL, config_dir=None)
    assert isinstance(reward, rewards.LexiconReward) and reward.reduce == "sum" and host is None
    reward, host = rewards.build_reward(RewardConfig(kind="vader"), tokenizer=tokenizer, model_config=MODEL,
                                        config_dir=None)
    tokens, mask = _batch(tokenizer, ["what a wonderful day", "terrible"])
    assert reward is None and host(tokens, mask)[0] > 0 > host(tokens, mask)[1]


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_unknown_kind_names_the_closest_registered_reward():
    with pytest.raises(ValueError) as e:
        RewardConfig(kind="vadr")
    assert _one_line(e).startswith("reward.kind='vadr': unknown reward; did you mean 'vader'?")
    assert "lexicon" in str(e.value)
    with pytest.raises(configlib.ConfigError) as e:
        load_config({"reward": {"kind": "word_shar"}}, imports=["tests.extensions.text_rewards"])
    assert _one_line(e).startswith("reward.kind='word_shar': unknown reward; did you mean 'word_share'?")


def test_kind_needs_the_fields_its_builder_needs():
    with pytest.raises(ValueError, match=r"reward.kind='function' needs reward.function"):
        RewardConfig(kind="function")
    with pytest.raises(ValueError, match=r"reward.kind='reward_model' needs reward.reward_model_path"):
        RewardConfig(kind="reward_model")


def test_a_host_reward_of_the_wrong_length_fails_at_call_time_in_one_line(tokenizer):
    cfg, _ = load_config({"reward": {"kind": "one_score_short"}}, imports=["tests.extensions.text_rewards"])
    _, host_reward = _build(cfg, tokenizer)
    tokens, mask = _batch(tokenizer, RESPONSES)
    with pytest.raises(ValueError) as e:
        host_reward(tokens, mask)
    assert _one_line(e) == ("host reward 'one_score_short' must return 4 scores (one per response), "
                            "got shape (3,)")


@pytest.mark.parametrize("reward, match", [
    ({"kind": "word_share", "kwargs": {"wrd": "good"}},
     "reward.kind='word_share': word_share(responses, *, word='good') cannot be called as fn(responses, wrd=...): "),
    ({"kind": "count_of_token", "kwargs": {"tok": 3}}, "reward.kind='count_of_token': reward.kwargs ['tok'] do not "),
    ({"kind": "host_function", "function": "tests.extensions.text_rewards:nope"},
     "reward.function='tests.extensions.text_rewards:nope': host reward 'tests.extensions.text_rewards:nope': "),
    ({"kind": "host_function", "function": "no_such_module_reg:f"},
     "reward.function='no_such_module_reg:f': cannot import module 'no_such_module_reg'"),
    ({"kind": "function", "function": "not a spec"}, "reward.function='not a spec': a reward is named"),
    ({"kind": "host_function", "function": "tests.extensions.token_reward:share_of_token_three"},
     "cannot be called as fn(responses)"),
    ({"kind": "vader", "kwargs": {"x": 1}}, "reward.kwargs: reward 'vader' takes no kwargs"),
])
def test_bad_user_rewards_fail_to_build_in_one_line_naming_the_key(tokenizer, reward, match):
    cfg, _ = load_config({"reward": reward}, imports=["tests.extensions.text_rewards"])
    with pytest.raises(ValueError) as e:
        _build(cfg, tokenizer)
    assert match in _one_line(e)


def test_a_module_registering_a_reward_of_the_wrong_signature_fails_to_import_in_one_line(tmp_path):
    (tmp_path / "wrong_arity_reg.py").write_text(textwrap.dedent("""\
        import ppojax.rl.rewards as rewards

        @rewards.register_reward("wrong_arity_reg")
        def only_tokens(tokens):
            return tokens.sum(-1)
    """))
    try:
        with pytest.raises(configlib.ConfigError) as e:
            configlib.import_modules(["wrong_arity_reg"], search_dirs=[tmp_path])
    finally:
        sys.modules.pop("wrong_arity_reg", None)
    assert _one_line(e).startswith("imports: module 'wrong_arity_reg' could not be imported: ValueError: "
                                   "register_reward('wrong_arity_reg'): only_tokens(tokens) cannot be called as "
                                   "fn(tokens, mask): ")
    assert "wrong_arity_reg" not in rewards.reward_names()


def test_register_reward_refuses_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="a reward named 'vader' is already registered"):
        rewards.register_reward("vader", host=True)(lambda responses: [0.0] * len(responses))


# ----------------------------------------------------------------------------------------------------------------
# imports


@pytest.mark.parametrize("source, match", [
    ("", "imports: module '{name}' could not be imported: ModuleNotFoundError: No module named '{name}'"),
    ("def f(:\n", "imports: module '{name}' could not be imported: SyntaxError: "),
    ("raise RuntimeError('no GPU here')\n", "imports: module '{name}' could not be imported: RuntimeError: no GPU here"),
])
def test_import_failures_are_one_line_config_errors(tmp_path, source, match):
    name = f"user_module_reg_{abs(hash(source)) % 10**6}"
    if source:
        (tmp_path / f"{name}.py").write_text(source)
    path = _write_config(tmp_path, f"imports: [{name}]\n")
    try:
        with pytest.raises(configlib.ConfigError) as e:
            load_config(path)
        assert _one_line(e).startswith(match.format(name=name))
        with pytest.raises(configlib.ConfigError) as e:  # the library function, as the runner's --import uses it
            configlib.import_modules([name], search_dirs=[tmp_path])
        assert _one_line(e).startswith(match.format(name=name))
    finally:
        sys.modules.pop(name, None)


def test_missing_package_is_named_and_extra_imports_join_the_config(tmp_path):
    with pytest.raises(configlib.ConfigError) as e:
        load_config({}, imports=["mypkg_reg.rewards"])
    assert _one_line(e) == ("imports: module 'mypkg_reg.rewards' could not be imported: ModuleNotFoundError: "
                            "No module named 'mypkg_reg'")
    cfg, config_dir = load_config({"imports": ["tests.extensions.text_rewards"]},
                                  imports=["tests.extensions.bag_lm", "tests.extensions.text_rewards"])
    assert cfg.imports == ("tests.extensions.text_rewards", "tests.extensions.bag_lm") and config_dir is None
    assert configlib.from_dict(ExperimentConfig, configlib.to_dict(cfg)) == cfg


def test_malformed_imports_are_refused():
    with pytest.raises(configlib.ConfigError, match=r"imports\[0\]: expected a module name .*not 'module:function'"):
        load_config({"imports": ["tests.extensions.text_rewards:word_share"]})
    with pytest.raises(configlib.ConfigError, match="imports: expected a list of module names"):
        load_config({"imports": "tests.extensions.text_rewards"})

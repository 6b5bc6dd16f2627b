"""Tests for ppojax.configlib: building, checking, overriding, loading and describing typed configs."""

import dataclasses
import importlib.util
import pathlib
import subprocess
import sys
import textwrap
from typing import Literal, Optional

import pytest

from ppojax.io import configlib
from ppojax.io.configlib import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optim:
    learning_rate: float = 1e-5
    """Adam step size."""
    schedule: Literal["constant", "linear"] = "constant"
    """How the step size changes over training."""
    clip: Optional[float] = None
    """Global gradient-norm clip; null for none."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPO:
    batch_size: int = 16
    """Sequences per PPO iteration."""
    minibatch_size: int = 8
    """Sequences per gradient step."""
    epochs: int = 4
    """Passes over each batch."""
    whiten: bool = True
    """Whiten advantages."""
    optim: Optim = dataclasses.field(default_factory=Optim)
    """Optimiser settings."""

    def __post_init__(self):
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must divide batch_size ({self.batch_size})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reward:
    weight: float = 1.0
    """Multiplier of this reward."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    name: str
    """Run name."""
    seed: int = 0
    """Random seed."""
    ppo: PPO = dataclasses.field(default_factory=PPO)
    """PPO hyperparameters."""
    # The reference optimiser differs from Optim's class defaults, so partial overrides must keep its choices.
    value_optim: Optim = dataclasses.field(default_factory=lambda: Optim(learning_rate=3e-4, schedule="linear"))
    """Critic optimiser."""
    stop_tokens: tuple[int, ...] = (50256,)
    """Token ids that end a response."""
    layers: list[str] = dataclasses.field(default_factory=list)
    """Layers to train; empty for all."""
    pair: tuple[int, str] = (1, "a")
    """A fixed-length tuple."""
    rewards: dict[str, Reward] = dataclasses.field(default_factory=dict)
    """Reward terms by name."""
    init: Optim | str = "pretrained"
    """A checkpoint name, or an optimiser to start from."""
    note: str | None = None
    """Free text."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Helped:
    a: int = dataclasses.field(default=1, metadata={"help": "From metadata."})
    b: int = 2
    """From the docstring."""
    c: int = dataclasses.field(default=3, metadata={"help": "Metadata wins."})
    """Docstring loses."""


def _error(cls, data) -> str:
    with pytest.raises(ConfigError) as info:
        configlib.from_dict(cls, data)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# from_dict


def test_defaults_and_nested_values():
    cfg = configlib.from_dict(Config, {"name": "run", "ppo": {"epochs": 2, "optim": {"learning_rate": 1}}})
    assert cfg.ppo.epochs == 2
    assert cfg.ppo.batch_size == 16
    assert cfg.ppo.optim.learning_rate == 1.0 and isinstance(cfg.ppo.optim.learning_rate, float)
    assert cfg.ppo.optim.schedule == "constant"
    assert cfg.stop_tokens == (50256,)
    assert cfg == Config(name="run", ppo=PPO(epochs=2, optim=Optim(learning_rate=1.0)))


def test_partial_nested_override_keeps_the_parents_default():
    cfg = configlib.from_dict(Config, {"name": "run", "value_optim": {"clip": 1.0}})
    assert cfg.value_optim == Optim(learning_rate=3e-4, schedule="linear", clip=1.0)


def test_container_types():
    cfg = configlib.from_dict(Config, {
        "name": "run",
        "stop_tokens": [1, 2],
        "layers": ["h.0", "h.1"],
        "pair": [7, "b"],
        "rewards": {"sentiment": {"weight": 2}, "length": {}},
    })
    assert cfg.stop_tokens == (1, 2) and isinstance(cfg.stop_tokens, tuple)
    assert cfg.layers == ["h.0", "h.1"] and isinstance(cfg.layers, list)
    assert cfg.pair == (7, "b")
    assert cfg.rewards == {"sentiment": Reward(weight=2.0), "length": Reward()}


def test_optional_literal_and_union_values():
    optim = {"clip": 0.5, "schedule": "linear"}
    cfg = configlib.from_dict(Config, {"name": "r", "note": None, "ppo": {"optim": optim}})
    assert cfg.note is None and cfg.ppo.optim.clip == 0.5 and cfg.ppo.optim.schedule == "linear"
    assert configlib.from_dict(Config, {"name": "r", "note": "hi"}).note == "hi"
    assert configlib.from_dict(Config, {"name": "r", "init": "ckpt-3"}).init == "ckpt-3"
    assert configlib.from_dict(Config, {"name": "r", "init": {"learning_rate": 0.1}}).init == Optim(learning_rate=0.1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaybeReward:
    reward: Optional[Reward] = None
    """An optional reward."""


def test_optional_dataclass():
    assert configlib.from_dict(MaybeReward, {}).reward is None
    assert configlib.from_dict(MaybeReward, {"reward": {"weight": 2}}).reward == Reward(weight=2.0)
    assert _error(MaybeReward, {"reward": {"wieght": 2}}) == (
        "reward.wieght: unknown field; did you mean 'weight'? (valid fields: weight)")
    assert _error(MaybeReward, {"reward": 3}) == "reward: expected Reward | null, got int 3"
    data = configlib.apply_overrides({}, ["reward.weight=0.5"], MaybeReward)
    assert configlib.from_dict(MaybeReward, data).reward == Reward(weight=0.5)


def test_existing_dataclass_instances_are_kept():
    cfg = configlib.from_dict(Config, {"name": "r", "ppo": PPO(epochs=9)})
    assert cfg.ppo == PPO(epochs=9)


@pytest.mark.parametrize("data, message", [
    ({"name": "r", "ppo": {"minibatch_size": "eight"}}, "ppo.minibatch_size: expected int, got str 'eight'"),
    ({"name": "r", "ppo": {"minibatch_size": 8.0}}, "ppo.minibatch_size: expected int, got float 8.0"),
    ({"name": "r", "ppo": {"minibatch_size": True}}, "ppo.minibatch_size: expected int, got bool true"),
    ({"name": "r", "ppo": {"whiten": "yes"}}, "ppo.whiten: expected bool, got str 'yes' (write true or false)"),
    ({"name": "r", "ppo": {"whiten": 1}}, "ppo.whiten: expected bool, got int 1 (write true or false)"),
    ({"name": "r", "ppo": {"optim": {"learning_rate": "fast"}}},
     "ppo.optim.learning_rate: expected float, got str 'fast'"),
    ({"name": "r", "ppo": {"optim": {"learning_rate": False}}},
     "ppo.optim.learning_rate: expected float, got bool false"),
    ({"name": "r", "ppo": {"optim": {"clip": "none"}}}, "ppo.optim.clip: expected float | null, got str 'none'"),
    ({"name": 3}, "name: expected str, got int 3"),
    ({"name": "r", "stop_tokens": 5}, "stop_tokens: expected list[int], got int 5"),
    ({"name": "r", "stop_tokens": [1, "x"]}, "stop_tokens[1]: expected int, got str 'x'"),
    ({"name": "r", "pair": [1]}, "pair: expected list[int, str] (2 items), got list [1]"),
    ({"name": "r", "rewards": {"kl": {"weight": "high"}}}, "rewards.kl.weight: expected float, got str 'high'"),
    ({"name": "r", "rewards": [1]}, "rewards: expected dict[str, Reward], got list [1]"),
    ({"name": "r", "ppo": 3}, "ppo: expected PPO (a mapping of its fields), got int 3"),
    ({"name": "r", "init": 3}, "init: expected Optim | str, got int 3"),
    ({"name": "r", "note": ["a"]}, "note: expected str | null, got list ['a']"),
    ({"name": "r", "ppo": {"optim": {"clip": [1.0]}}}, "ppo.optim.clip: expected float | null, got list [1.0]"),
])
def test_type_errors_name_path_expected_and_given(data, message):
    assert _error(Config, data) == message


def test_literal_error_lists_choices_and_suggests():
    message = _error(Optim, {"schedule": "linaer"})
    assert message == "schedule: expected 'constant' | 'linear', got str 'linaer'; did you mean 'linear'?"


def test_union_error_points_inside_the_dataclass_member():
    assert _error(Config, {"name": "r", "init": {"learning_rat": 1.0}}).startswith(
        "init.learning_rat: unknown field; did you mean 'learning_rate'?")


def test_unknown_field_suggests_closest_and_lists_valid_fields():
    message = _error(Config, {"name": "r", "ppo": {"optim": {"lerning_rate": 1e-4}}})
    assert message == ("ppo.optim.lerning_rate: unknown field; did you mean 'learning_rate'? "
                       "(valid fields: learning_rate, schedule, clip)")
    message = _error(Config, {"name": "r", "zzz": 1})
    assert message.startswith("zzz: unknown field (valid fields: name, seed, ppo,")


def test_missing_required_fields_are_named():
    assert _error(Config, {}) == "name: missing required field, expected str"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Two:
        a: int
        b: str

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Outer:
        inner: Two

    assert _error(Outer, {"inner": {}}) == "inner: missing required fields: inner.a (int), inner.b (str)"


def test_top_level_must_be_a_mapping():
    assert _error(Config, [1, 2]) == "Config: expected a mapping of Config fields, got list [1, 2]"


def test_post_init_errors_are_reraised_with_the_path():
    message = _error(Config, {"name": "r", "ppo": {"minibatch_size": 5}})
    assert message == "ppo: minibatch_size (5) must divide batch_size (16)"
    with pytest.raises(ConfigError, match=r"^PPO: minibatch_size \(3\)"):
        configlib.from_dict(PPO, {"minibatch_size": 3})
    with pytest.raises(ConfigError, match=r"^run\.ppo: "):
        configlib.from_dict(PPO, {"minibatch_size": 3}, path="run.ppo")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# to_dict


def test_to_dict_is_plain_and_round_trips():
    cfg = Config(
        name="r", ppo=PPO(batch_size=32, optim=Optim(clip=1.0)), stop_tokens=(1, 2), layers=["x"],
        pair=(3, "z"), rewards={"kl": Reward(weight=0.1)}, init=Optim(schedule="linear"), note="1e-5")
    data = configlib.to_dict(cfg)
    assert data["ppo"]["optim"] == {"learning_rate": 1e-5, "schedule": "constant", "clip": 1.0}
    assert data["stop_tokens"] == [1, 2] and data["pair"] == [3, "z"]
    assert data["rewards"] == {"kl": {"weight": 0.1}}
    assert configlib.from_dict(Config, data) == cfg
    assert configlib.from_dict(Config, configlib.to_dict(Config(name="d"))) == Config(name="d")


def test_to_dict_skips_derived_fields():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Derived:
        n: int = 2
        double: int = dataclasses.field(init=False)

        def __post_init__(self):
            object.__setattr__(self, "double", 2 * self.n)

    assert configlib.to_dict(Derived(n=3)) == {"n": 3}
    assert configlib.from_dict(Derived, {"n": 3}).double == 6


# ---------------------------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize("text, value", [
    ("a=3", 3),
    ("a=1e-5", 1e-5),
    ("a=3E4", 3e4),
    ("a=-2.5e-3", -2.5e-3),
    ("a=+1e3", 1000.0),
    ("a=1.0e-05", 1e-5),
    ("a=0.1", 0.1),
    ("a=true", True),
    ("a=false", False),
    ("a=yes", "yes"),  # YAML 1.2: only true/false are booleans.
    ("a=no", "no"),
    ("a=null", None),
    ("a=", None),
    ("a=[1, 2]", [1, 2]),
    ("a=[1e-3, x]", [1e-3, "x"]),
    ("a=gpt2", "gpt2"),
    ("a='3'", "3"),
    ("a=x=y", "x=y"),
    ("a=hello world", "hello world"),
])
def test_parse_override_values(text, value):
    keys, parsed = configlib.parse_override(text)
    assert keys == ["a"]
    assert parsed == value and type(parsed) is type(value)


def test_parse_override_splits_dotted_path():
    assert configlib.parse_override(" ppo.optim.learning_rate = 3e-4") == (["ppo", "optim", "learning_rate"], 3e-4)


@pytest.mark.parametrize("text", ["ppo.epochs", "=3", "a..b=1", "a.=1"])
def test_malformed_override_shows_expected_form(text):
    with pytest.raises(ConfigError, match="expected the form --set a.b=value"):
        configlib.parse_override(text)


def test_unparseable_override_value():
    with pytest.raises(ConfigError, match=r"override 'a=\[1, 2': cannot read the value"):
        configlib.parse_override("a=[1, 2")


def test_apply_overrides_sets_nested_keys_without_mutating_input():
    data = {"name": "r", "ppo": {"epochs": 2}}
    result = configlib.apply_overrides(
        data, ["ppo.optim.learning_rate=1e-4", "ppo.epochs=3", "seed=7", "rewards.kl.weight=0.5"])
    assert result == {"name": "r", "seed": 7, "rewards": {"kl": {"weight": 0.5}},
                      "ppo": {"epochs": 3, "optim": {"learning_rate": 1e-4}}}
    assert data == {"name": "r", "ppo": {"epochs": 2}}
    cfg = configlib.from_dict(Config, result)
    assert cfg.ppo.optim.learning_rate == 1e-4 and cfg.ppo.epochs == 3 and cfg.rewards["kl"].weight == 0.5


def test_apply_overrides_later_wins_and_replaces_null_parents():
    result = configlib.apply_overrides({"init": None}, ["seed=1", "seed=2", "init.clip=1.0"])
    assert result == {"seed": 2, "init": {"clip": 1.0}}


def test_apply_overrides_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"override 'seed.x=1': seed holds int 3, not a mapping"):
        configlib.apply_overrides({"seed": 3}, ["seed.x=1"])


def test_apply_overrides_rejects_unknown_paths_with_suggestion():
    with pytest.raises(ConfigError) as info:
        configlib.apply_overrides({}, ["ppo.lerning_rate=1e-4"], Config)
    message = str(info.value)
    assert message.startswith("ppo.lerning_rate: unknown field")
    assert "valid fields: batch_size, minibatch_size, epochs, whiten, optim" in message
    with pytest.raises(ConfigError, match=r"^ppo\.optim\.learning_rat: unknown field; did you mean 'learning_rate'\?"):
        configlib.apply_overrides({}, ["ppo.optim.learning_rat=1"], Config)
    with pytest.raises(ConfigError, match=r"^seed\.x: unknown field; seed is int, which has no fields"):
        configlib.apply_overrides({}, ["seed.x=1"], Config)
    # Dict keys are free; Optim | str descends into Optim.
    configlib.apply_overrides({}, ["rewards.anything.weight=1", "init.clip=2"], Config)
    with pytest.raises(ConfigError, match=r"^rewards\.kl\.wieght: unknown field; did you mean 'weight'\?"):
        configlib.apply_overrides({}, ["rewards.kl.wieght=1"], Config)


def test_apply_overrides_wants_a_list():
    with pytest.raises(TypeError, match="sequence"):
        configlib.apply_overrides({}, "seed=1")


# ---------------------------------------------------------------------------------------------------------------
# Files


def test_load_yaml_reads_exponent_floats_and_strict_bools(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nbig: 3E4\nold: 1.0e-5\nflag: true\nword: no\nlist: [1e-3, 2]\n")
    assert configlib.load_yaml(path) == {
        "lr": 1e-5, "big": 3e4, "old": 1e-5, "flag": True, "word": "no", "list": [1e-3, 2]}


def test_load_yaml_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert configlib.load_yaml(path) == {}


def test_load_yaml_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file not found: '.*nope\.yaml'"):
        configlib.load_yaml(path)
    with pytest.raises(ConfigError, match="is a directory"):
        configlib.load_yaml(tmp_path)


def test_load_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping .* got list \[1, 2\]"):
        configlib.load_yaml(path)


def test_load_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nppo:\n  epochs: 2\n  batch: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: YAML syntax error at line \d+, column \d+"):
        configlib.load_yaml(path)
    path.write_text("seed: 1\nname: a: b\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: YAML syntax error at line 2, column 8"):
        configlib.load_yaml(path)


def test_load_yaml_rejects_duplicate_keys(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\nppo:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: YAML syntax error at line 4.*duplicate key 'epochs'"):
        configlib.load_yaml(path)


def test_save_yaml_round_trips_through_load(tmp_path):
    cfg = Config(name="yes", note="1e-5", ppo=PPO(optim=Optim(learning_rate=2e-6)), stop_tokens=(1, 2))
    path = tmp_path / "out" / "config.yaml"
    configlib.save_yaml(path, cfg)
    assert configlib.from_dict(Config, configlib.load_yaml(path)) == cfg
    configlib.save_yaml(path, configlib.to_dict(cfg))
    assert configlib.load_config(Config, path) == cfg


def test_load_config_layers_defaults_file_and_overrides(tmp_path):
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("name: base\nseed: 1\nppo:\n  epochs: 2\n  optim:\n    learning_rate: 1e-5\n")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("name: exp\nppo:\n  optim:\n    clip: 1.0\n")
    cfg = configlib.load_config(Config, experiment, ["ppo.optim.learning_rate=3e-6", "seed=5"],
                                defaults_path=defaults)
    assert cfg.name == "exp" and cfg.seed == 5 and cfg.ppo.epochs == 2
    assert cfg.ppo.optim == Optim(learning_rate=3e-6, clip=1.0)
    assert configlib.load_config(Config, overrides=["name=x"]) == Config(name="x")
    with pytest.raises(ConfigError, match="^seeed: unknown field; did you mean 'seed'"):
        configlib.load_config(Config, experiment, ["seeed=1"])
    with pytest.raises(ConfigError, match="^ppo.epochs: expected int, got float 1.5"):
        configlib.load_config(Config, experiment, ["ppo.epochs=1.5"])


# ---------------------------------------------------------------------------------------------------------------
# Docs and describe


def test_field_docs_from_docstrings_and_metadata():
    assert configlib.field_docs(Optim) == {
        "learning_rate": "Adam step size.",
        "schedule": "How the step size changes over training.",
        "clip": "Global gradient-norm clip; null for none.",
    }
    assert configlib.field_docs(Helped) == {"a": "From metadata.", "b": "From the docstring.", "c": "Metadata wins."}


def test_every_test_config_field_is_documented():
    for cls in (Optim, PPO, Reward, Config):
        undocumented = {f.name for f in dataclasses.fields(cls)} - set(configlib.field_docs(cls))
        assert not undocumented, (cls.__name__, undocumented)


def test_describe_lists_dotted_fields_types_defaults_and_docs():
    text = configlib.describe(Config)
    lines = text.splitlines()
    assert lines[:4] == ["name: str  (required)", "    Run name.", "seed: int = 0", "    Random seed."]
    for expected in [
        "ppo: PPO\n    PPO hyperparameters.\nppo.batch_size: int = 16\n    Sequences per PPO iteration.",
        "ppo.optim.learning_rate: float = 1e-05\n    Adam step size.",
        "ppo.optim.schedule: 'constant' | 'linear' = 'constant'",
        "ppo.optim.clip: float | null = null",
        "ppo.whiten: bool = true",
        # Nested defaults are the enclosing config's, not the class's.
        "value_optim.learning_rate: float = 0.0003",
        "value_optim.schedule: 'constant' | 'linear' = 'linear'",
        "stop_tokens: list[int] = [50256]",
        "pair: list[int, str] = [1, 'a']",
        "rewards: dict[str, Reward] = {}",
        "rewards.<key>.weight: float = 1.0\n    Multiplier of this reward.",
        "init: Optim | str = 'pretrained'",
        "init.learning_rate: float = 1e-05",
        "note: str | null = null",
    ]:
        assert expected in text, expected


# ---------------------------------------------------------------------------------------------------------------
# `from __future__ import annotations`, and no jax


_FUTURE_MODULE = '''
from __future__ import annotations

import dataclasses
from typing import Literal, Optional


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
    kind: Literal["a", "b"] = "a"
    """Which kind."""
    sizes: tuple[int, ...] = (1,)
    """Sizes."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    """The inner part."""
    scale: Optional[float] = None
    """A scale."""
    tag: str | None = None
    """A tag."""

    def __post_init__(self):
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
'''


@pytest.fixture
def future_module(tmp_path, monkeypatch):
    path = tmp_path / "future_cfg.py"
    path.write_text(_FUTURE_MODULE)
    spec = importlib.util.spec_from_file_location("future_cfg", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "future_cfg", module)
    spec.loader.exec_module(module)
    return module


def test_future_annotations(future_module):
    Outer, Inner = future_module.Outer, future_module.Inner
    cfg = configlib.from_dict(Outer, {"inner": {"kind": "b", "sizes": [2, 3]}, "scale": 2, "tag": "t"})
    assert cfg == Outer(inner=Inner(kind="b", sizes=(2, 3)), scale=2.0, tag="t")
    assert configlib.from_dict(Outer, configlib.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"^inner\.kind: expected 'a' \| 'b', got str 'c'$"):
        configlib.from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"^inner\.sizes\[0\]: expected int, got str 'x'$"):
        configlib.from_dict(Outer, {"inner": {"sizes": ["x"]}})
    with pytest.raises(ConfigError, match=r"^Outer: scale must be positive, got -1.0$"):
        configlib.from_dict(Outer, {"scale": -1})
    assert "inner.kind: 'a' | 'b' = 'a'\n    Which kind." in configlib.describe(Outer)
    assert "scale: float | null = null\n    A scale." in configlib.describe(Outer)


def test_configlib_does_not_import_jax():
    # Load the module file on its own, so the package __init__ (which imports jax) does not run.
    source = pathlib.Path(configlib.__file__)
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("configlib_alone", {str(source)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "jax" not in sys.modules, "configlib imported jax"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)

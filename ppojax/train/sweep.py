"""Sweeps: seeds x hyperparameter grids, each group of runs in one compiled program (PureJaxRL's jit(vmap(train))).

    python experiments/sweep.py --config CONFIG [--seeds N | --seeds 3,7,11] [--grid a.b=v1,v2,...]...
                                [--iterations N] [--run-dir DIR] [--set a.b=value]...

The runs are the Cartesian product of the seeds and the grid values. Runs whose configs differ only in array
hyperparameters (``ppojax.rl.hparams.ARRAY_CONFIG_PATHS``: learning rate, clip ranges, coefficients, gamma, lambda,
temperature, the KL controller's settings...) share one static setup, hence one program: their train states are
stacked on a leading run axis and ``jax.vmap``-ed, and they advance together, iteration by iteration. A grid field
that changes a shape or the code (``ppo.batch_size``, an estimator) splits the sweep into groups, one program each.
Frozen inputs that every run of a group shares (the reference policy, the reward model) are held once, not R times
(``in_axes=None``). The run axis is split over the devices.

Run r of the sweep is the run ``experiments/ppo_gpt2.py --config CONFIG --seed S --set <its grid values>`` would do:
the same initial state, the same data order, the same samples and metrics up to float reduction order.

From Python: :func:`sweep` takes a config, seeds and a grid and returns the stacked metrics; or stack train states
yourself (:func:`stack_states`) and call :func:`vmapped_step`. ``docs/sweeps.md`` shows both.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ppojax.io import configlib
from ppojax.rl import iteration
from ppojax.rl.hparams import is_array_path
from ppojax.rl.state import TrainState

RUN_AXIS = "runs"
CANNOT_VARY = ("seed", "iterations", "checkpoint", "logging", "export", "mesh")
"""Config fields that belong to the sweep as a whole (``seed``: use ``--seeds``)."""


class SweepError(ValueError):
    """A bad sweep specification: one line, before anything compiles."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its index, seed, grid values (dotted path -> value) and resolved config."""

    index: int
    seed: int
    grid: dict
    config: Any


# ----------------------------------------------------------------------------------------------------------------
# The specification


def parse_seeds(text: Optional[str], default: int) -> list[int]:
    """``'4'`` -> seeds 0..3; ``'3,7,11'`` -> those; None -> ``[default]`` (the config's seed)."""
    if text is None:
        return [default]
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected a count N (seeds 0..N-1) or a comma-separated list of ints")
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise SweepError(f"--seeds {text!r}: the number of seeds must be >= 1")
        return list(range(values[0]))
    if len(set(values)) != len(values):
        raise SweepError(f"--seeds {text!r}: a seed is listed twice")
    return values


def parse_grid(specs: Sequence[str], config_cls: type) -> dict[str, list]:
    """``['ppo.clip_eps=0.1,0.2']`` -> ``{'ppo.clip_eps': [0.1, 0.2]}`` (values read as YAML scalars).

    Refuses, with one line each: a malformed spec, an unknown field (with the closest name), a field given twice, an
    empty value, and a field that cannot vary over a sweep (:data:`CANNOT_VARY`)."""
    grid: dict[str, list] = {}
    for spec in specs:
        path, sep, raw = spec.partition("=")
        path = path.strip()
        if not sep or not path:
            raise SweepError(f"--grid {spec!r}: expected a.b=v1,v2,...")
        try:
            configlib.apply_overrides({}, [f"{path}=0"], config_cls)  # the path must name a field
        except configlib.ConfigError as e:
            raise SweepError(f"--grid {spec!r}: {e}") from None
        if path.split(".")[0] in CANNOT_VARY or path in CANNOT_VARY:
            hint = " (use --seeds)" if path == "seed" else ""
            raise SweepError(f"--grid {spec!r}: {path} cannot vary within a sweep; it applies to the whole sweep{hint}")
        if path in grid:
            raise SweepError(f"--grid {path} is given twice; list all its values in one --grid")
        values = []
        for item in raw.split(","):
            if not item.strip():
                raise SweepError(f"--grid {spec!r}: an empty value (expected a.b=v1,v2,... with no empty item)")
            _, value = configlib.parse_override(f"{path}={item.strip()}")
            values.append(value)
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"--grid {spec!r}: a value is listed twice")
        grid[path] = values
    return grid


def plan_runs(data: dict, config_cls: type, seeds: Sequence[int], grid: dict[str, list]) -> list[Run]:
    """Every combination of the seeds and the grid values, each resolved and validated into a config (a wrong type
    or a bad value fails here, naming the field and the value)."""
    runs = []
    combos = list(itertools.product(*grid.values())) if grid else [()]
    for seed in seeds:
        for combo in combos:
            values = dict(zip(grid, combo))
            overrides = [f"{k}={_yaml(v)}" for k, v in values.items()] + [f"seed={seed}"]
            try:
                cfg = configlib.from_dict(config_cls, configlib.apply_overrides(data, overrides, config_cls))
            except (configlib.ConfigError, ValueError) as e:
                what = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise SweepError(f"grid point {what}: {e}") from None
            runs.append(Run(index=len(runs), seed=seed, grid=values, config=cfg))
    return runs


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs whose grid values differ only in array hyperparameters share a group (one program)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple((k, repr(v)) for k, v in run.grid.items() if not is_array_path(k))
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def closest_field(path: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(path, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# ----------------------------------------------------------------------------------------------------------------
# Stacked states and the vmapped step


@dataclasses.dataclass(frozen=True)
class RunAxes:
    """Which state fields carry the run axis. Shared frozen inputs (held once) do not."""

    shared_frozen: bool
    shared_reward: bool

    def field_axes(self) -> dict:
        return {"params": 0, "opt_state": 0, "frozen": None if self.shared_frozen else 0,
                "reward": None if self.shared_reward else 0, "hparams": 0, "kl": 0, "key": 0, "step": 0}


def _same_arrays(trees: Sequence[Any]) -> bool:
    first = jax.tree.leaves(trees[0])
    for other in trees[1:]:
        leaves = jax.tree.leaves(other)
        if len(leaves) != len(first) or jax.tree.structure(other) != jax.tree.structure(trees[0]):
            return False
        for a, b in zip(first, leaves):
            if a is b:
                continue
            if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            if a.shape != b.shape or not bool(jnp.array_equal(a, b)):
                return False
    return True


def stack_states(states: Sequence[TrainState]) -> tuple[TrainState, RunAxes]:
    """One state with a leading run axis on every per-run array, and the frozen inputs and reward held once when
    every run has the same ones (the pretrained reference, the reward model). All states must share one setup:
    runs that differ only in array hyperparameters do (``ppojax.rl.setup.make_setup``)."""
    setup = states[0].setup
    for s in states[1:]:
        if s.setup is not setup:
            raise SweepError("these runs do not share one static setup (a grid field changes a shape or the code): "
                             "they need separate groups")
    axes = RunAxes(shared_frozen=_same_arrays([s.frozen for s in states]),
                   shared_reward=_same_arrays([s.reward for s in states]))
    fields = {}
    for name, axis in axes.field_axes().items():
        values = [getattr(s, name) for s in states]
        fields[name] = values[0] if axis is None else jax.tree.map(lambda *xs: jnp.stack(xs), *values)
    return TrainState(setup=setup, **fields), axes


def unstack_state(state: TrainState, axes: RunAxes, r: int) -> TrainState:
    """Run ``r``'s own state out of a stacked one."""
    fields = {name: getattr(state, name) if axis is None else jax.tree.map(lambda x: x[r], getattr(state, name))
              for name, axis in axes.field_axes().items()}
    return TrainState(setup=state.setup, **fields)


def restack_state(state: TrainState, axes: RunAxes, r: int, one: TrainState) -> TrainState:
    """``state`` with run ``r``'s slice of every per-run field replaced by ``one``'s (the inverse of
    :func:`unstack_state`)."""
    fields = {name: jax.tree.map(lambda x, y: x.at[r].set(y), getattr(state, name), getattr(one, name))
              for name, axis in axes.field_axes().items() if axis is not None}
    return state.replace(**fields)


_JITS: dict = {}


def _per_run(body: Callable, width: Optional[int], *per_run):
    """``body`` over the leading run axis of ``per_run``: one ``jax.vmap`` over every run (``width=None``), or a
    ``lax.map`` over chunks of ``width`` runs, each chunk vmapped. ``width=1`` computes every run with exactly the
    shapes of the single run, so its numbers do not depend on how many runs share a device."""
    n = jax.tree.leaves(per_run)[0].shape[0]
    if width is None or width >= n:
        return jax.vmap(body)(*per_run)
    if width == 1:
        return jax.lax.map(lambda xs: body(*xs), per_run)
    if n % width:
        raise SweepError(f"vmap width {width} does not divide the {n} runs on a device")
    chunks = jax.tree.map(lambda x: x.reshape(n // width, width, *x.shape[1:]), per_run)
    out = jax.lax.map(lambda xs: jax.vmap(body)(*xs), chunks)
    return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)


def _vmapped(phase: str, setup, axes: RunAxes, mesh: Optional[jax.sharding.Mesh], donate: bool,
             width: Optional[int] = None):
    key = (phase, setup, axes, mesh, donate, width)
    fn = _JITS.get(key)
    if fn is None:
        changes = iteration.CHANGES[phase]
        field_axes = axes.field_axes()
        shared_names = [k for k, v in field_axes.items() if v is None and k not in changes]

        def transform(inner):
            def local(setup, changing, frozen, *args):
                # Every run's own arrays carry the run axis; the shared frozen inputs are held once (in_axes None).
                shared = {k: frozen[k] for k in shared_names}
                per = {k: v for k, v in frozen.items() if k not in shared}
                body = lambda c, f, *a: inner(setup, c, {**f, **shared}, *a)
                return _per_run(body, width, changing, per, *args)

            if mesh is None:
                return local

            def sharded(setup, changing, frozen, *args):
                # Each device runs its own slice of the run axis (runs never talk to each other): shard_map with the
                # per-run arrays split over the devices and the shared ones replicated.
                runs, whole = P(RUN_AXIS), P()
                frozen_specs = {k: (whole if k in shared_names else runs) for k in frozen}
                return jax.shard_map(lambda c, f, *a: local(setup, c, f, *a), mesh=mesh,
                                     in_specs=(runs, frozen_specs, *([runs] * len(args))),
                                     out_specs=runs, check_vma=False)(changing, frozen, *args)
            return sharded

        out = None if mesh is None else NamedSharding(mesh, P(RUN_AXIS))  # every output has the run axis first
        fn = iteration.jit_state_fn(iteration.PHASES[phase], changes, donate=donate, out_shardings=out,
                                    name=f"sweep/{phase}", transform=transform)
        _JITS[key] = fn
    return fn


def default_vmap_width(devices: Optional[Sequence[Any]] = None) -> Optional[int]:
    """1 on CPUs, every run of a device at once elsewhere.

    XLA:CPU batches little: on this project's 2-core CPU a vmap over 8 tiny runs took about the time of a
    ``lax.map`` over them (``benchmarks/sweep.py``), while the vmapped matmuls change the reduction order, and with it
    sometimes a sampled token, with the number of runs per device. Width 1 keeps every run bit-identical to the
    single run on any device count. Accelerators gain from the batching: there every local run is vmapped."""
    devices = list(jax.devices() if devices is None else devices)
    return 1 if devices[0].platform == "cpu" else None


def vmapped_step(state: TrainState, axes: RunAxes, prompt_ids, prompt_mask, *, mesh=None,
                 host_reward: Optional[Callable] = None, donate: bool = False, width: Optional[int] = None):
    """One iteration of every run of a stacked state: prompts ``[R, batch / k, P]``, metrics ``[R]`` each.

    ``width``: runs batched per vmap on a device (None: all of them; see :func:`default_vmap_width`).
    ``host_reward``: scores on the host (``(tokens [n, T], mask) -> [n]``) between the vmapped rollout and update;
    every run's responses go through it together."""
    setup = state.setup
    if host_reward is None:
        return _vmapped("iteration", setup, axes, mesh, donate, width)(state, prompt_ids, prompt_mask)
    after, batch = _vmapped("rollout", setup, axes, mesh, False, width)(state, prompt_ids, prompt_mask)
    from ppojax.train.loop import score_on_host

    tokens, mask, p_ids, p_mask = jax.device_get((batch.tokens, batch.mask, batch.prompt_ids, batch.prompt_mask))
    R, B = tokens.shape[:2]
    flat = lambda x: x.reshape(R * B, -1)  # noqa: E731
    scores = np.asarray(score_on_host(host_reward, flat(tokens), flat(mask), flat(p_ids), flat(p_mask)),
                        np.float32).reshape(R, B)
    if mesh is not None:
        scores = jax.device_put(scores, NamedSharding(mesh, P(RUN_AXIS)))
    return _vmapped("update", setup, axes, mesh, donate, width)(after, batch, jnp.asarray(scores))


def run_mesh(n_runs: int, devices: Optional[Sequence[Any]] = None) -> tuple[Optional[jax.sharding.Mesh], int]:
    """A 1-D mesh over the devices for the run axis, and how many padding runs make R split over it (0 on one
    device)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return None, 0
    pad = (-n_runs) % len(devices)
    return jax.make_mesh((len(devices),), (RUN_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,)), pad


def place(state: TrainState, axes: RunAxes, mesh: Optional[jax.sharding.Mesh]) -> TrainState:
    """Per-run arrays split over the run axis of ``mesh``; shared ones replicated."""
    if mesh is None:
        return state
    split, whole = NamedSharding(mesh, P(RUN_AXIS)), NamedSharding(mesh, P())
    fields = {name: jax.device_put(getattr(state, name), whole if axis is None else split)
              for name, axis in axes.field_axes().items()}
    return state.replace(**fields)


def pad_runs(state: TrainState, axes: RunAxes, pad: int) -> TrainState:
    """Append ``pad`` copies of run 0 (their results are dropped) so that R splits over the devices."""
    if not pad:
        return state
    fields = {}
    for name, axis in axes.field_axes().items():
        value = getattr(state, name)
        fields[name] = value if axis is None else jax.tree.map(
            lambda x: jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]), value)
    return state.replace(**fields)


# ----------------------------------------------------------------------------------------------------------------
# Summaries


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile (two-sided 95%), from the standard table (1.96 for large df)."""
    if df in _T975:
        return _T975[df]
    below = [d for d in _T975 if d < df]
    return _T975[max(below)] if df <= 30 else 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval over seeds (``t * s / sqrt(n)``; 0 for one seed)."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), 0.0
    return float(x.mean()), t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


# ----------------------------------------------------------------------------------------------------------------
# A built sweep


@dataclasses.dataclass
class Group:
    """Runs that share one program: their stacked state (padded to split over the devices) and their data."""

    runs: list
    state: TrainState
    axes: RunAxes
    loaders: list
    host_reward: Optional[Callable]
    mesh: Optional[jax.sharding.Mesh]
    pad: int
    width: Optional[int] = None
    """Runs batched per vmap on a device (None: all; 1: a lax.map over the runs)."""
    episode_steps: Optional[list] = None
    """Multi-turn configs (``env:``): each run's own step (``ppojax.train.multiturn.make_step``), run one after
    another on the run's slice of the stacked state (an episode's turns go through the host)."""

    @property
    def n(self) -> int:
        return len(self.runs)

    def prompts(self, it: int):
        """Every run's prompts of iteration ``it``, stacked: ``[R (+ pad), batch / k, P]``."""
        batches = [loader.batch(it) for loader in self.loaders]
        batches += [batches[0]] * self.pad
        ids, mask = (np.stack([b[i] for b in batches]) for i in (0, 1))
        if self.mesh is not None:
            split = NamedSharding(self.mesh, P(RUN_AXIS))
            return jax.device_put(ids, split), jax.device_put(mask, split)
        return jnp.asarray(ids), jnp.asarray(mask)

    def step(self, it: int, donate: bool = True) -> list[dict]:
        """Iteration ``it`` of every run: the new state is kept, one metrics dict (floats) per run is returned."""
        if self.episode_steps is not None:
            out = []
            for r, run_step in enumerate(self.episode_steps):
                one, metrics, _ = run_step(unstack_state(self.state, self.axes, r), it)
                self.state = restack_state(self.state, self.axes, r, one)
                out.append(metrics)
            return out
        ids, mask = self.prompts(it)
        self.state, metrics = vmapped_step(self.state, self.axes, ids, mask, mesh=self.mesh,
                                           host_reward=self.host_reward, donate=donate, width=self.width)
        host = jax.device_get(metrics)
        return [{k: float(v[r]) for k, v in host.items()} for r in range(self.n)]


class _Builder:
    """Builds each run's host-side inputs through ``ppojax.train.run``'s build functions (those of every single
    run), once per distinct config section."""

    def __init__(self, config_dir):
        self.config_dir = config_dir
        self.cache: dict = {}

    def _once(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def run_inputs(self, cfg):
        from ppojax.io.tokenizer import load_tokenizer
        from ppojax.train import run as runs

        tok = self._once(("tokenizer", cfg.tokenizer), lambda: load_tokenizer(cfg.tokenizer))
        task_key = ("task", repr(cfg.task), repr(cfg.prompts), cfg.tokenizer, cfg.eval.every, cfg.eval.num_prompts)
        task = self._once(task_key, lambda: runs.load_task(cfg, self.config_dir, tok))
        prompts = ([row.key() for row in task.task.train], task.train_ids, task.train_mask)
        model = self._once(("model", repr(cfg.model)), lambda: runs.build_model(cfg))
        reward = (None, None) if cfg.env.name is not None else self._once(  # an environment rewards the episodes
            ("reward", repr(cfg.reward), task_key, repr(cfg.model)),
            lambda: runs.build_reward(cfg, tok, model[0], self.config_dir, task))
        return tok, prompts, model, reward, task


def build_groups(runs: Sequence[Run], config_dir=None, devices: Optional[Sequence[Any]] = None,
                 log: Callable[[str], None] = print, width: Any = "auto") -> list[Group]:
    """Every group's stacked state, placed on the devices, with each run's prompt loader (its own seed).
    ``width``: runs per vmap on a device; ``'auto'`` is :func:`default_vmap_width`."""
    from ppojax.io.data import PromptLoader
    from ppojax.train.build import create_state
    from ppojax.train.run import resolve_built, task_config

    builder = _Builder(config_dir)
    groups = []
    if any(run.config.eval.every for run in runs):
        log("[sweep] eval: is not run inside a sweep (its runs share one program): evaluate each run's policy with "
            "experiments/evaluate.py, or run it alone with experiments/ppo_gpt2.py")
    for members in group_runs(runs):
        states, loaders, host_reward, episode_steps = [], [], None, []
        for run in members:
            cfg = run.config
            tok, (_, ids, mask), (model_config, params), (reward, host_reward), task = builder.run_inputs(cfg)
            # As the single run resolves it: the task's reward and stop sequences, a chat model's EOS...
            cfg = resolve_built(task_config(cfg, task, tok), tok, model_config)
            state = create_state(cfg, model_config, params, reward)
            if states and _same_arrays([states[0].frozen, state.frozen]):
                state = state.replace(frozen=states[0].frozen)  # hold one copy while building, too
            states.append(state)
            loaders.append(PromptLoader(ids, mask, cfg.ppo.prompts_per_iteration, cfg.seed, cfg.prompts.shuffle))
            if cfg.env.name is not None:  # multi-turn: the run's own episodes, one run after another
                from ppojax.train import multiturn
                from ppojax.train.run import check_env, episode_settings

                check_env(cfg, tok, task)
                episode_steps.append(multiturn.make_step(loaders[-1], task.task.train, *episode_settings(cfg, tok),
                                                         k=cfg.ppo.samples_per_prompt, donate=False))
        state, axes = stack_states(states)
        del states
        mesh, pad = run_mesh(len(members), devices) if not episode_steps else (None, 0)
        if pad:
            log(f"[sweep] {len(members)} runs do not split over {len(mesh.devices.flat)} devices: padding with "
                f"{pad} copies of run {members[0].index} (their results are dropped)")
        state = place(pad_runs(state, axes, pad), axes, mesh)
        groups.append(Group(runs=list(members), state=state, axes=axes, loaders=loaders, host_reward=host_reward,
                            mesh=mesh, pad=pad, width=default_vmap_width(devices) if width == "auto" else width,
                            episode_steps=episode_steps or None))
    return groups


@dataclasses.dataclass
class SweepResult:
    """What :func:`sweep` returns: the runs and every metric stacked ``[R, iterations]`` in run order."""

    runs: list
    metrics: dict

    def where(self, **grid) -> np.ndarray:
        """Indices of the runs with these grid values, e.g. ``result.where(**{'ppo.clip_eps': 0.1})``."""
        return np.asarray([r.index for r in self.runs
                           if all(repr(r.grid.get(k)) == repr(v) for k, v in grid.items())], np.int64)


def sweep(config, *, seeds: Sequence[int] = (0,), grid: Optional[dict] = None, iterations: Optional[int] = None,
          overrides: Sequence[str] = (), config_dir=None, devices: Optional[Sequence[Any]] = None,
          log: Callable[[str], None] = print, width: Any = "auto") -> SweepResult:
    """Run a sweep in memory and return the stacked metrics.

    Args:
      config: an ``ExperimentConfig``, a YAML path, or the config's data as a dict.
      seeds: the seeds; grid: ``{dotted path: [values]}``; the runs are their Cartesian product.
      iterations: the run length (default the config's); overrides: ``'a.b=value'`` applied to every run.
      devices: the devices the run axis is split over (default all).
      width: runs per vmap on a device (``'auto'``: :func:`default_vmap_width`; None: all of them).
    """
    from pathlib import Path

    from ppojax.train.config import ExperimentConfig

    if isinstance(config, (str, Path)):
        config_dir = config_dir or Path(config).resolve().parent
        data = configlib.load_yaml(config)
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = configlib.to_dict(config)
    overrides = list(overrides) + ([f"iterations={iterations}"] if iterations is not None else [])
    data = configlib.apply_overrides(data, overrides, ExperimentConfig)
    grid = grid or {}
    parse_grid([f"{k}=0" for k in grid], ExperimentConfig)  # unknown / fixed fields fail here
    runs = plan_runs(data, ExperimentConfig, list(seeds), grid)
    groups = build_groups(runs, config_dir, devices, log, width)
    from ppojax.train import loop

    rows: list[list[dict]] = [[] for _ in runs]

    def step(groups, it):
        return groups, [(run, m) for group in groups for run, m in zip(group.runs, group.step(it))], None

    def record(it):
        for run, metrics in it.metrics:
            rows[run.index].append(metrics)

    loop.train(groups, iterations=runs[0].config.iterations, step=step, callbacks=[record], check=None)
    names = sorted(set().union(*(m.keys() for r in rows for m in r)))
    stacked = {k: np.asarray([[m.get(k, np.nan) for m in r] for r in rows]) for k in names}
    return SweepResult(runs=runs, metrics=stacked)


__all__ = [
    "CANNOT_VARY",
    "Group",
    "SweepResult",
    "build_groups",
    "default_vmap_width",
    "sweep",
    "Run",
    "RunAxes",
    "SweepError",
    "group_runs",
    "mean_ci",
    "pad_runs",
    "parse_grid",
    "parse_seeds",
    "place",
    "plan_runs",
    "run_mesh",
    "stack_states",
    "unstack_state",
    "vmapped_step",
]

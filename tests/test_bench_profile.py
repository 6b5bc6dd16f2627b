"""benchmarks/profile_iteration.py's op grouping, on op names and metadata as XLA:CPU writes them."""

import pytest


@pytest.fixture(scope="module")
def prof(load_benchmark):
    return load_benchmark("profile_iteration")


HLO = """
  %ynn_fusion.3 = f32[192,4096]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(inner)/while/body/closed_call/jvp()/while/body/closed_call/nd,vd->nv/dot_general"}
  %multiply_add_fusion.8 = f32[50257,256]{1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(inner)/cond/branch_1_fun/while/body/closed_call/while/body/closed_call/add"}
  %ynn_fusion.62 = f32[704,3072]{1,0} fusion(%d), kind=kCustom, metadata={op_name="jit(inner)/while/transpose(jvp(GPT2ScalarHeadModel))/transformer/while/body/closed_call/h/c_proj_mlp/dot_general"}
  %dot.148 = f32[768,3072]{1,0} dot(%e, %f), metadata={op_name="jit(inner)/while/transpose(jvp(GPT2Trunk))/while/body/closed_call/h/c_fc/transpose"}
  %tanh_fusion = f32[8,88,3072]{2,1,0} fusion(%g), kind=kLoop, metadata={op_name="jit(inner)/while/jvp(GPT2Trunk)/while/body/closed_call/h/tanh"}
  %subtract_exponential_fusion = f32[192,4096]{1,0} fusion(%h), kind=kLoop, metadata={op_name="jit(inner)/while/jvp(token_logprobs)/while/body/closed_call/exp"}
  %divide_subtract_fusion = f32[1024,256]{1,0} fusion(%i), kind=kLoop, metadata={op_name="jit(inner)/cond/branch_1_fun/while/body/closed_call/while/body/closed_call/optimizer_step/convert_element_type"}
"""


def test_ops_fall_in_their_groups(prof):
    ops = prof.hlo_ops(HLO)
    assert ops["dot.148"][0] == "f32[768,3072]{1,0}"
    group = {name: prof.categorize(name, *ops[name], 50257) for name in ops}
    assert group == {
        "ynn_fusion.3": "vocab matmul",
        "multiply_add_fusion.8": "optimizer",
        "ynn_fusion.62": "critic trunk bwd matmul",
        "dot.148": "actor trunk bwd matmul",
        "tanh_fusion": "actor trunk fwd elementwise",
        "subtract_exponential_fusion": "vocab elementwise",  # a chunk: named by token_logprobs' scope
        "divide_subtract_fusion": "optimizer",  # by optimizer_step's scope (its last name is no Adam op)
    }


def test_summary_shares_add_up(prof):
    import collections

    ops = prof.hlo_ops(HLO)
    total = collections.Counter({"ynn_fusion.3": 30.0, "dot.148": 10.0, "multiply_add_fusion.8": 10.0})
    count = collections.Counter({k: 1 for k in total})
    s = prof.summarize(total, count, ops, 50257, wall_ms=45.0, steps=1, top=2)
    assert s["sum_of_op_ms"] == pytest.approx(50.0)
    assert s["groups_ms"]["vocab matmul"] == pytest.approx(30.0)
    assert sum(s["groups_share_of_op_time"].values()) == pytest.approx(1.0, abs=1e-3)
    assert [o["op"] for o in s["top_ops"]] == ["ynn_fusion.3", "dot.148"]

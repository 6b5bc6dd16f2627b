"""The named ``XLA_FLAGS`` values that ``xla_cpu_flags.py`` compares and ``vs_trl.py`` takes as a side option
(``xla=NAME``): data shared by both, in a module of its own so that neither imports the other for it."""

FLAG_SETS = {
    "default": {"flags": "", "note": "no flags: the baseline"},
    "onednn": {"flags": "--xla_cpu_use_onednn=true", "note": "oneDNN for dots"},
    "onednn_custom_call": {"flags": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
                           "note": "oneDNN through custom calls (matmul + fused elementwise epilogues)"},
    "onednn_fusion": {"flags": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
                      "note": "oneDNN fusions of dots, elementwise ops and reductions"},
    "xnnpack": {"flags": "--xla_cpu_use_xnnpack=true", "note": "XNNPACK for dots"},
    "xnn_fusion": {"flags": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
                   "note": "XNNPACK fusions of dots, elementwise ops and reductions"},
    "xnn_graph_greedy": {"flags": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
                         "note": "greedy XNNPACK subgraph extraction"},
    "ynn_off": {"flags": "--xla_cpu_experimental_ynn_fusion_type=",
                "note": "no YNNPACK fusions: XLA's own dots (the committed profiles show ynn_fusion matmuls by "
                        "default)"},
    "ynn_all": {"flags": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
                "note": "YNNPACK fusions of elementwise ops and reductions too"},
    "no_fusion_emitters": {"flags": "--xla_cpu_use_fusion_emitters=false", "note": "the older loop emitters"},
    "thunk_runtime_off": {"flags": "--xla_cpu_use_thunk_runtime=false",
                          "note": "the pre-thunk runtime (may be a deprecated no-op in this jaxlib: --check)"},
    "onednn_legacy": {"flags": "--xla_cpu_use_thunk_runtime=false --xla_cpu_use_onednn=true "
                               "--xla_cpu_experimental_onednn_custom_call=true",
                      "note": "oneDNN custom calls as the pre-thunk runtime used them"},
    "concurrency_scheduler": {"flags": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
                              "note": "a scheduler that favours running independent ops concurrently"},
    "vector_width_512": {"flags": "--xla_cpu_prefer_vector_width=512", "codegen": True,
                         "note": "AVX-512-wide codegen if the CPU has it"},
    "fast_math": {"flags": "--xla_cpu_enable_fast_math=true", "codegen": True,
                  "note": "numerics: fast math (reassociation, approximate functions)"},
}
"""Named ``XLA_FLAGS`` values to compare (``vs_trl.py`` side option ``xla=NAME``)."""

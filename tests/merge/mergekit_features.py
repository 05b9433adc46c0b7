"""Every mergekit 0.1.5 merge method and recipe feature, what weightkit does with it, the tests checking it.

``bench/tables.py`` renders the README's mergekit table from :data:`FEATURES`;
``tests/merge/test_mergekit_features.py`` fails if a test named here does not exist, or if a method listed
as refused is not refused by name. "same output": equal to mergekit's output (float32 compute), checked
against mergekit's own outputs (stored fixtures) or against its definition; "documented difference": a
deliberate difference, said in the method's docstring and the README; "refused": a clear error naming it.
"""

# ruff: noqa: E501 (a table: one row a line, test ids spelled out in full)

from dataclasses import dataclass

SAME, DIFFERENT, REFUSED = "same output", "documented difference", "refused"


@dataclass(frozen=True)
class Feature:
    name: str  # as a mergekit recipe or command line spells it
    status: str
    note: str
    tests: tuple[str, ...] = ()  # "path::test_function" of the tests that check it


_PARITY = "tests/merge/test_mergekit_parity.py::test_merge_equals_mergekits_output"
_SLICES = "tests/merge/test_slices.py::test_output_equals_mergekits"

METHODS = [
    Feature("linear", SAME, "", ("tests/merge/test_linear.py::test_matches_weighted_sum",)),
    Feature("slerp", SAME, "angle and coefficients in double", ("tests/merge/test_slerp.py::test_matches_reference",)),
    Feature("nuslerp", SAME, "norms and angles in double (<= 2.4e-7)", (_PARITY,)),
    Feature("multislerp", DIFFERENT, "a tensor no model changed gives the base (mergekit stops)", (_PARITY,)),
    Feature("karcher", SAME, "dot products in double (<= 2.4e-7)", (_PARITY,)),
    Feature("task_arithmetic", SAME, "",
            ("tests/merge/test_task_arithmetic.py::test_task_arithmetic_matches_reference",)),
    Feature("ties", DIFFERENT, "equal magnitudes at the cut: the lower index is kept (mergekit: unstable sort)",
            ("tests/merge/test_task_arithmetic.py::test_ties_equals_trim_elect_disjoint_mean",
             "tests/merge/test_sparsify.py::test_magnitude_prune_breaks_ties_by_index")),
    Feature("breadcrumbs", DIFFERENT, "as ties at the cut",
            ("tests/merge/test_sparsify.py::test_breadcrumbs_keeps_exactly_the_middle_band",)),
    Feature("breadcrumbs_ties", DIFFERENT, "as ties at the cut",
            ("tests/merge/test_sparsify.py::test_breadcrumbs_breaks_ties_by_index",)),
    Feature("dare_linear", DIFFERENT, "kept entries rescaled by 1/p as in the paper; masks seeded per tensor",
            ("tests/merge/test_sparsify.py::test_random_drop_is_unbiased_and_keeps_density",
             "tests/merge/test_merge_api.py::test_dare_is_seeded_per_tensor")),
    Feature("dare_ties", DIFFERENT, "as dare_linear",
            ("tests/merge/test_merge_api.py::test_dare_is_seeded_per_tensor",)),
    Feature("della", DIFFERENT, "as dare_linear; ranks over every dimension",
            ("tests/merge/test_sparsify.py::test_della_mask_and_rescaling_follow_the_rank_rule",)),
    Feature("della_linear", DIFFERENT, "as della",
            ("tests/merge/test_sparsify.py::test_della_keep_frequency_grows_with_rank_and_is_unbiased",)),
    Feature("sce", SAME, "bit for bit on the fixtures", (_PARITY,)),
    Feature("model_stock", DIFFERENT, "a negative mean cosine is clamped to 0; filter_wise: true refused",
            ("tests/merge/test_model_stock.py::test_matches_reference",
             "tests/merge/test_model_stock.py::test_filter_wise_false_is_what_model_stock_computes_and_true_is_refused")),
    Feature("nearswap", SAME, "bit for bit on the fixtures", (_PARITY,)),
    Feature("arcee_fusion", DIFFERENT, "exact quantiles above 1M entries (mergekit samples 1M at random)",
            (_PARITY,)),
    Feature("passthrough", SAME, "", (_SLICES, "tests/merge/test_passthrough.py::test_passthrough_of_one_model_copies_it_or_scales_it_per_layer")),
    Feature("ram", REFUSED, "not implemented"),
    Feature("ramplus_tl", REFUSED, "not implemented"),
]  # fmt: skip

RECIPE_FEATURES = [
    Feature("weights, densities ... per model or for the method", SAME, "",
            ("tests/merge/test_merge_api.py::test_per_model_weights_and_lambda_follow_the_formula",)),
    Feature("gradients over layers (`[0.1, 0.9]`)", SAME, "outside the layers: the first value",
            ("tests/merge/test_params.py::test_the_gradient_is_mergekits_float_for_float",
             "tests/merge/test_merge_api.py::test_a_gradient_gives_tensors_outside_the_layers_its_first_value",
             "tests/merge/test_merge_api.py::test_gpt2_gradients_span_its_n_layer_layers")),
    Feature("`filter` entries, `filter: \"*\"`", SAME, "",
            ("tests/merge/test_params.py::test_a_wildcard_or_empty_filter_matches_every_tensor",)),
    Feature("`slices` (frankenmerges, repeated layers, per-slice parameters)", SAME, "",
            (_SLICES, "tests/merge/test_slices.py::test_a_gradient_spans_each_slice_and_filters_fall_through")),
    Feature("`layer_range` under `models`", REFUSED, "mergekit ignores it and merges every layer",
            ("tests/merge/test_slices.py::test_layer_range_under_models_is_refused_as_mergekit_ignores_it",)),
    Feature("a slice's `residual_weight`, `modules`, `tokenizer` section", REFUSED,
            "mergekit never applies residual_weight; weightkit builds no tokenizer",
            ("tests/merge/test_slices.py::test_recipe_keys_weightkit_does_not_implement_are_refused_by_name",)),
    Feature("`tokenizer_source: base`", SAME, "embeddings and lm_head cut to the tokenizer", (_SLICES,)),
    Feature("`tokenizer_source: union` or a model", REFUSED, "weightkit builds no tokenizer",
            ("tests/merge/test_slices.py::test_recipe_keys_weightkit_does_not_implement_are_refused_by_name",)),
    Feature("`chat_template` (`auto`, a Jinja template)", SAME, "mergekit's template names refused: give the text",
            ("tests/merge/test_merge_api.py::test_a_recipes_chat_template_is_written_into_the_output_tokenizer",)),
    Feature("`model+lora` references", SAME, "equal to PEFT's merge_and_unload, which mergekit runs",
            ("tests/adapt/test_merged_reader.py::test_a_model_read_with_its_adapter_merged_equals_pefts_merge_and_unload",
             "tests/adapt/test_merged_reader.py::test_a_model_plus_adapter_reference_merges_as_the_merged_model_does")),
    Feature("`dtype` / `out_dtype`", DIFFERENT, "weightkit always computes in float32 and writes the dtype",
            ("tests/merge/test_merge_api.py::test_a_mergekit_recipe_runs_unchanged",)),
    Feature("`int8_mask`, `normalize`, `lambda`", SAME, "int8_mask changes nothing in either tool",
            ("tests/merge/test_merge_api.py::test_per_model_weights_and_lambda_follow_the_formula",)),
    Feature("`--random-seed`", DIFFERENT, "seeds DARE/DELLA; weightkit's random streams are its own",
            ("tests/cli/test_merge.py::test_random_seed_seeds_the_random_methods_like_the_recipes_seed",)),
    Feature("`--lora-merge-cache`", SAME, "accepted; nothing to cache (adapters merged while reading)",
            ("tests/cli/test_merge.py::test_a_model_plus_lora_recipe_runs_with_mergekits_lora_cache_flag",)),
    Feature("Hugging Face hub model ids", REFUSED, "weightkit reads local directories only",
            ("tests/merge/test_merge_api.py::test_recipe_errors_name_the_field",)),
]  # fmt: skip

FEATURES = METHODS + RECIPE_FEATURES

"""Sharded phase 1: partial stores of sample and parameter shards, and their exact merge.

`fisher.shards: K` splits a task's samples into K contiguous ranges of the task's sample
order (sizes differ by at most one sample); `fisher.param_shards: P` splits the parameters
into P size-balanced shares (`param_shares`). Each of the K x P jobs runs the whole
forward/backward on its samples, folds only its share's per-sample gradients into Welford
statistics, and writes a *partial store* (`ShardWriter`, `partial.py`); `shard_plan` makes the split.
`merge_shards` (`merge.py`) combines them into the store one job would have written, through the same
writer (`store.StoreWriter`: same layout, attrs and config hash; values equal to float
rounding): Chan's merge of the sample shards in shard index order, the union of the
parameter shares, per-sample arrays and gates concatenated in sample order, input second
moments weighted by their token counts.

Partial store layout (zarr v3, staged and published whole like a store, `atomic.Staging`,
with its `integrity.json`; `results/fisher/shards/{task}/s{k}of{K}-p{p}of{P}.zarr` in the
workflow):

    attrs: shard_format_version (3),
           shard: {sample_shard k, sample_shards K, param_shard p, param_shards P,
                   sample_start, sample_stop (its range of the task's N samples),
                   task_samples N, params (its share, sorted)},
           store_attrs (exactly the attrs the merged store gets from its writer: model_id,
                        model_type, weights_hash, task, config_hash, package_version, ...),
           geometry (the whole model's), per_sample_params (its share of the selection),
           per_sample_dtype, shard_samples (per-sample shard size of the merged store),
           count (samples folded in), skipped ([{id, reason}], in task order),
           input_sq ({param: {input_dim, tokens}} of its share's Linear / Conv1D weights)
      samples/id, samples/n_tokens, samples/loss   [count]  the shard's samples, in task order
      fisher_total/<param>   float64 sum of g^2 over its samples, full shape
      fisher_m2/<param>      float64 elementwise Welford M2 of g^2 (selected parameters)
      grad_total/<param>     float64 sum of g
      group_total/<param>    float64 [G] sum of the per-sample group contributions
      group_m2/<param>       float64 [G] their Welford M2
      saliency_total/<param> float64 [G] sum of the per-sample group saliencies
      saliency_m2/<param>    float64 [G] their Welford M2
      input_sq_total/<param> float64 [in] sum of x_j^2 over its scored token positions
      per_sample/<param>     [count, *shape] g_i in the stored dtype, chunk (1, *shape)
      gate/<param>           [count, G] per-sample gates (store.GATE_DTYPE), chunk (1, G)

All parameter shares of one sample shard hold the same samples (ids, token counts, losses,
skipped samples); `<param>` arrays only for the share's parameters.
"""

from .merge import (
           MergedStatistics,
           Shard,
           all_skipped_error,
           check_shards,
           merge_shards,
           merged_statistics,
           open_shards,
)
from .partial import INPUT_SQ_ARRAY, SHARD_FORMAT_VERSION, STATE_ARRAYS, ShardInfo, ShardWriter

__all__ = ["INPUT_SQ_ARRAY", "SHARD_FORMAT_VERSION", "STATE_ARRAYS", "MergedStatistics", "Shard", "ShardInfo",
           "ShardWriter", "all_skipped_error", "check_shards", "merge_shards", "merged_statistics", "open_shards"]

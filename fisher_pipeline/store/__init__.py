"""The phase 1 store (zarr v3): `writer` with atomic completion (per-sample `rows` written in
the background), and the lazy `reader`; `format` holds the constants both obey.

Layout (a contract; README "Store layout" documents it for users):

    {task}.zarr            attrs: format_version, model_id, weights_hash, task,
                                  n_samples, loss_convention, fisher_kind, config_hash,
                                  package_version, per_sample_params, skipped, ...,
                                  geometry (layer, role, groups of every parameter and
                                  the attention shape: see `layout.ModelGeometry`)
      samples/id, samples/n_tokens, samples/loss          [N]
      fisher/<param>       mean of g^2, full shape, float32
      grad_mean/<param>    mean of g, full shape, float32
      group/<param>        sum of fisher within each group (head / neuron), [G] float32,
                           groups in the order of the geometry's segments
      group_m2/<param>     Welford M2 of each sample's group-reduced contribution, [G]
      fisher_m2/<param>    elementwise Welford M2 of g^2 (selected parameters), float32
      per_sample/<param>   g_i, [N, *shape], chunk (1, *shape), sharded by samples
      gate/<param>         gate_i,G = sum_{k in G} g_i,k w_k per sample and group, [N, G]
                           float32, rows in samples/id order, chunked like per_sample
      group_saliency/<param>     mean over samples of s_i,G = 0.5 sum_{k in G} g_i,k^2 w_k^2, [G]
      group_saliency_m2/<param>  its Welford M2, [G]
      input_sq/<param>     mean over scored token positions of x_j^2 at the layer's input,
                           [in_features] float64 (Linear / Conv1D weights used by one module;
                           attrs `input_sq`: {param: {input_dim, tokens}})
      integrity.json       size and CRC-32 of every other file (`integrity`): checked
                           when the store is opened (names, sizes) and read (CRCs)

The store is written in a staging directory of its writer's own
(`.{name}.{pid}-{random}.partial`, `atomic.Staging`, which first claims the path) and
published only once every array, attribute and the integrity record are in place: an
interrupted run never leaves a finished-looking store, and a missing or damaged file of a
published one is an error, never a zero.
"""

from .format import FORMAT_VERSION, GATE_DTYPE, LOSS_CONVENTION, READABLE_VERSIONS
from .integrity import VerifyReport, verify_store
from .reader import FisherStore, check_same_model, open_store
from .rows import SampleArrays, SampleRows
from .writer import StoreWriter, consolidate

__all__ = ["FORMAT_VERSION", "GATE_DTYPE", "LOSS_CONVENTION", "READABLE_VERSIONS", "FisherStore", "SampleArrays",
           "SampleRows", "StoreWriter", "VerifyReport", "check_same_model", "consolidate", "open_store",
           "verify_store"]

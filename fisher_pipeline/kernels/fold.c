/* One pass over a chunk of per-sample gradients: everything phase 1 needs from it.
 *
 * Called through ctypes by fisher_pipeline/kernels/__init__.py (which documents the
 * arguments and compiles this file). Eager torch needs five passes over a chunk (sum,
 * square, sum, group sum, per-sample copy), each reading it from L3/DRAM; here each row
 * of the chunk is read once per sample while its running sums sit in L1.
 *
 * Compiled with -fassociative-math (reductions are vectorised; their rounding order
 * changes, which is fine for sums that are float64 anyway) but NOT -ffinite-math-only:
 * a non-finite row must be seen.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <omp.h>

/* Per-sample copy dtypes. */
enum { COPY_NONE = 0, COPY_FLOAT32 = 1, COPY_FLOAT16 = 2 };
/* Group sums of g^2 per sample: over the columns of each row, or over the rows of each column. */
enum { GROUP_NONE = 0, GROUP_PER_ROW = 1, GROUP_PER_COLUMN = 2 };

/* g: [b, R, C] float32, contiguous.
 * total_g, total_c: [R, C] float64 state rows or NULL: += sign * (sum over samples of g,
 *   of g*g), for each row whose sum of g*g over samples and columns is finite (others are
 *   skipped and counted in the return value).
 * copy: NULL or the per-sample copy of row 0, sample stride `copy_stride` elements.
 * group: [b, R] (GROUP_PER_ROW) or [b, C] (GROUP_PER_COLUMN) float64, written (not added).
 * scratch: float64, at least threads * (2 * C + b * C) elements.
 * Returns the number of rows skipped as non-finite. */
int64_t fold_chunk(const float *restrict g, int64_t b, int64_t R, int64_t C,
                   double *restrict total_g, double *restrict total_c, double sign,
                   void *restrict copy, int64_t copy_stride, int copy_kind,
                   double *restrict group, int group_kind,
                   double *restrict scratch, int threads)
{
    int64_t skipped = 0;
    if (threads < 1) threads = 1;
    if (R < threads) threads = (int)(R > 0 ? R : 1);
    const int64_t per_thread = 2 * C + (group_kind == GROUP_PER_COLUMN ? b * C : 0);

#pragma omp parallel num_threads(threads) reduction(+ : skipped)
    {
        const int t = omp_get_thread_num();
        double *restrict sum_g = scratch + t * per_thread;
        double *restrict sum_c = sum_g + C;
        double *restrict column_part = sum_c + C;  /* [b, C], GROUP_PER_COLUMN only */
        if (group_kind == GROUP_PER_COLUMN)
            memset(column_part, 0, (size_t)(b * C) * sizeof(double));

#pragma omp for schedule(static)
        for (int64_t i = 0; i < R; i++) {
            memset(sum_g, 0, (size_t)C * sizeof(double));
            memset(sum_c, 0, (size_t)C * sizeof(double));
            double row_total = 0.0;
            for (int64_t s = 0; s < b; s++) {
                const float *restrict x = g + (s * R + i) * C;
                double sample_total = 0.0;
                for (int64_t j = 0; j < C; j++) {
                    const float v = x[j];
                    const float c = v * v;  /* squared in float32, like the model's gradients */
                    sum_g[j] += v;
                    sum_c[j] += c;
                    sample_total += c;
                }
                if (copy_kind == COPY_FLOAT16) {
                    _Float16 *restrict out = (_Float16 *)copy + s * copy_stride + i * C;
                    for (int64_t j = 0; j < C; j++) out[j] = (_Float16)x[j];
                } else if (copy_kind == COPY_FLOAT32) {
                    memcpy((float *)copy + s * copy_stride + i * C, x, (size_t)C * sizeof(float));
                }
                if (group_kind == GROUP_PER_ROW) {
                    group[s * R + i] = sample_total;
                } else if (group_kind == GROUP_PER_COLUMN) {
                    double *restrict part = column_part + s * C;
                    for (int64_t j = 0; j < C; j++) part[j] += x[j] * x[j];
                }
                row_total += sample_total;
            }
            if (!(row_total <= DBL_MAX)) {  /* inf or NaN somewhere in this row */
                skipped += 1;
                continue;
            }
            if (total_g != NULL) {
                double *restrict state_g = total_g + i * C;
                double *restrict state_c = total_c + i * C;
                for (int64_t j = 0; j < C; j++) {
                    state_g[j] += sign * sum_g[j];
                    state_c[j] += sign * sum_c[j];
                }
            }
        }
        if (group_kind == GROUP_PER_COLUMN) {
            /* After the loop's barrier: sum the threads' partial column sums, a share each. */
            const int team = omp_get_num_threads();
#pragma omp for schedule(static)
            for (int64_t k = 0; k < b * C; k++) {
                double total = 0.0;
                for (int u = 0; u < team; u++) total += scratch[u * per_thread + 2 * C + k];
                group[k] = total;
            }
        }
    }
    return skipped;
}

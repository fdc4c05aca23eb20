/* One pass over a chunk of per-sample gradients: everything phase 1 needs from it.
 *
 * Called through ctypes by fisher_pipeline/kernels/__init__.py (which documents the
 * arguments and compiles this file). Eager torch needs five passes over a chunk (sum,
 * square, sum, group sum, per-sample copy), each reading it from L3 or DRAM. Here each
 * row of each sample is read once, contiguously, while the row's running sums over the
 * samples stay in L1; the float64 state is read and written once per chunk. (Blocks of
 * 16-64 columns summed over the samples in registers were 1.3-2x slower: b strided
 * streams of 64 bytes defeat the prefetcher.)
 *
 * With the parameter's values it also gives, per sample and group, the sums of g*w (the
 * gradient of a multiplicative gate on the group) and of (g*w)^2, in the same pass.
 *
 * Sums over the samples of one chunk and within one row or column are float32, as in
 * the torch path (at most a few thousand terms); they are added into float64 state.
 * Compiled with -fassociative-math (reductions are vectorised; only the rounding order
 * changes) but NOT -ffinite-math-only: a non-finite row must be seen.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <omp.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* Per-sample copy dtypes. */
enum { COPY_NONE = 0, COPY_FLOAT32 = 1, COPY_FLOAT16 = 2 };
/* Group sums of g^2 per sample: over the columns of each row, or over the rows of each column. */
enum { GROUP_NONE = 0, GROUP_PER_ROW = 1, GROUP_PER_COLUMN = 2 };

/* float -> IEEE half, round to nearest even (as torch's conversion), n elements. */
static inline void to_half(_Float16 *restrict out, const float *restrict x, int64_t n)
{
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(out + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; j++) out[j] = (_Float16)x[j];
}

/* Row i of every sample folded into the row's sums over samples `sum_g`, `sum_c` [C]
 * (float32, in L1), with the group and copy work of the row. With the parameter's row
 * `w_row` [C] (else NULL), also each sample's sums of g*w and (g*w)^2 (the gradient of a
 * multiplicative gate on the group, and its saliency) beside those of g^2. */
static inline void fold_row(const float *restrict g, const float *restrict w_row, int64_t b, int64_t R, int64_t C,
                            int64_t i, float *restrict sum_g, float *restrict sum_c, double *restrict row_group,
                            double *restrict row_gate, double *restrict row_saliency, float *restrict column_part,
                            float *restrict column_gate, float *restrict column_saliency, void *restrict copy,
                            int64_t copy_stride, int copy_kind, int group_kind)
{
    memset(sum_g, 0, (size_t)C * sizeof(float));
    memset(sum_c, 0, (size_t)C * sizeof(float));
    for (int64_t s = 0; s < b; s++) {
        const float *restrict x = g + (s * R + i) * C;  /* contiguous: the prefetcher streams it */
        float sample_total = 0.0f, gate_total = 0.0f, saliency_total = 0.0f;
        if (w_row != NULL) {
            for (int64_t j = 0; j < C; j++) {
                const float c = x[j] * x[j];  /* squared in float32, like the model's gradients */
                const float p = x[j] * w_row[j];
                sum_g[j] += x[j];
                sum_c[j] += c;
                sample_total += c;
                gate_total += p;
                saliency_total += p * p;
            }
        } else {
            for (int64_t j = 0; j < C; j++) {
                const float c = x[j] * x[j];
                sum_g[j] += x[j];
                sum_c[j] += c;
                sample_total += c;
            }
        }
        if (group_kind == GROUP_PER_ROW) {
            row_group[s * R] = sample_total;
            if (w_row != NULL) {
                row_gate[s * R] = gate_total;
                row_saliency[s * R] = saliency_total;
            }
        } else if (group_kind == GROUP_PER_COLUMN) {
            float *restrict part = column_part + s * C;
            for (int64_t j = 0; j < C; j++) part[j] += x[j] * x[j];
            if (w_row != NULL) {
                float *restrict gate_part = column_gate + s * C;
                float *restrict saliency_part = column_saliency + s * C;
                for (int64_t j = 0; j < C; j++) {
                    const float p = x[j] * w_row[j];
                    gate_part[j] += p;
                    saliency_part[j] += p * p;
                }
            }
        }
        if (copy_kind == COPY_FLOAT16)
            to_half((_Float16 *)copy + s * copy_stride + i * C, x, C);
        else if (copy_kind == COPY_FLOAT32)
            memcpy((float *)copy + s * copy_stride + i * C, x, (size_t)C * sizeof(float));
    }
}

/* g: [b, R, C] float32, contiguous.
 * w: NULL or the parameter's rows [R, C] float32, contiguous (only with a group kind).
 * total_g, total_c: [R, C] float64 state rows or NULL: += sign * (sum over samples of g,
 *   of g*g), for each row whose g*g summed over samples and columns is finite (others are
 *   skipped and counted in the return value).
 * copy: NULL or the per-sample copy of row 0, sample stride `copy_stride` elements.
 * group: [b, R] (GROUP_PER_ROW) or [b, C] (GROUP_PER_COLUMN) float64, written (not added):
 *   per-sample sums of g^2; with w, gate and saliency (same layout) get those of g*w and
 *   (g*w)^2.
 * scratch: float32, at least threads * 2 * C + column_blocks(R, group_kind) * parts * b * C
 *   elements, parts = 3 with w, else 1.
 * Returns the number of rows skipped as non-finite.
 *
 * The rows are cut into blocks that depend on R only, never on `threads` (GROUP_PER_COLUMN:
 * COLUMN_BLOCKS blocks, each with its own float32 partial column sums, added in block order
 * in float64; otherwise one row per block): the same chunk gives the same bits whatever the
 * thread count, so a store does not depend on the machine's cores. */
/* Row blocks with their own partial column sums (GROUP_PER_COLUMN): enough for 16 threads,
 * few enough that their scratch stays small (16 * 3 * b * C floats). */
#define COLUMN_BLOCKS 16

int64_t column_blocks(int64_t R, int group_kind)
{
    if (group_kind != GROUP_PER_COLUMN) return 0;
    return R < COLUMN_BLOCKS ? R : COLUMN_BLOCKS;
}

int64_t fold_chunk(const float *restrict g, const float *restrict w, int64_t b, int64_t R, int64_t C,
                   double *restrict total_g, double *restrict total_c, double sign,
                   void *restrict copy, int64_t copy_stride, int copy_kind,
                   double *restrict group, double *restrict gate, double *restrict saliency, int group_kind,
                   float *restrict scratch, int threads)
{
    int64_t skipped = 0;
    if (threads < 1) threads = 1;
    const int per_column = group_kind == GROUP_PER_COLUMN;
    const int64_t blocks = per_column ? column_blocks(R, group_kind) : R;
    if (blocks < threads) threads = (int)(blocks > 0 ? blocks : 1);
    const int64_t parts = w != NULL ? 3 : 1;
    const int64_t n = b * C;
    float *restrict block_parts = scratch + (int64_t)threads * 2 * C;  /* [blocks, parts, b, C] */

#pragma omp parallel num_threads(threads) reduction(+ : skipped)
    {
        const int t = omp_get_thread_num();
        float *restrict sum_g = scratch + (int64_t)t * 2 * C;  /* [C] this row's sums over samples */
        float *restrict sum_c = sum_g + C;

#pragma omp for schedule(static)
        for (int64_t k = 0; k < blocks; k++) {
            float *restrict column_part = per_column ? block_parts + k * parts * n : NULL;  /* of g^2 */
            float *restrict column_gate = per_column && w != NULL ? column_part + n : NULL;  /* of g*w */
            float *restrict column_saliency = per_column && w != NULL ? column_part + 2 * n : NULL;  /* (g*w)^2 */
            if (per_column) memset(column_part, 0, (size_t)(parts * n) * sizeof(float));
            const int64_t first = per_column ? k * R / blocks : k;
            const int64_t end = per_column ? (k + 1) * R / blocks : k + 1;
            for (int64_t i = first; i < end; i++) {
                const int per_row = group_kind == GROUP_PER_ROW;
                fold_row(g, w != NULL ? w + i * C : NULL, b, R, C, i, sum_g, sum_c, per_row ? group + i : NULL,
                         per_row && w != NULL ? gate + i : NULL, per_row && w != NULL ? saliency + i : NULL,
                         column_part, column_gate, column_saliency, copy, copy_stride, copy_kind, group_kind);
                double row_total = 0.0;  /* of g^2: finite iff every g of the row is (and g^2 fits float32) */
                for (int64_t j = 0; j < C; j++) row_total += sum_c[j];
                if (!(row_total <= DBL_MAX)) {  /* inf or NaN somewhere in this row */
                    skipped += 1;
                    continue;
                }
                if (total_g != NULL) {
                    double *restrict state_g = total_g + i * C;
                    double *restrict state_c = total_c + i * C;
                    for (int64_t j = 0; j < C; j++) {
                        state_g[j] += sign * (double)sum_g[j];
                        state_c[j] += sign * (double)sum_c[j];
                    }
                }
            }
        }
        if (per_column) {
            /* After the loop's barrier: the blocks' partial column sums, added block after
             * block (the outer loop fixes the order; the inner one vectorises over columns).
             * Each thread owns a share of the b * C outputs. */
            const int team = omp_get_num_threads();
            const int64_t first = t * n / team, end = (t + 1) * n / team;
            for (int64_t k = first; k < end; k++) group[k] = 0.0;
            if (w != NULL)
                for (int64_t k = first; k < end; k++) gate[k] = saliency[k] = 0.0;
            for (int64_t u = 0; u < blocks; u++) {
                const float *restrict parts_u = block_parts + u * parts * n;
                for (int64_t k = first; k < end; k++) group[k] += (double)parts_u[k];
                if (w != NULL)
                    for (int64_t k = first; k < end; k++) {
                        gate[k] += (double)parts_u[n + k];
                        saliency[k] += (double)parts_u[2 * n + k];
                    }
            }
        }
    }
    return skipped;
}

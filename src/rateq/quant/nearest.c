/* Nearest centroid of every point, for k-means and codebook encoding (rateq.quant.kmeans, rateq.quant.codebook).
 *
 * G independent problems: points x (G, n, c), centroids C (G, k, c), weights none, per point w (G, n, 1) or per
 * coordinate w (G, n, c), all fp32 and contiguous. For every point it writes the index of the nearest centroid
 * (int64, the first of equal minima) and that centroid's weighted squared error (fp32), with
 *
 *     d(x, mu) = s_0 + s_1 + ... + s_{c-1},   s_j = (mu_j - x_j) * (mu_j - x_j)   [ * w_j, per coordinate ]
 *
 * summed coordinate by coordinate in order, every operation a separately rounded IEEE single-precision one
 * (compiled with -ffp-contract=off: no fused multiply-add, no reordering; mu - x is exactly -(x - mu), so its
 * square is that of x - mu), so a distance is bit for bit the one rateq.quant.kmeans._nearest_torch forms
 * elementwise in torch. A weight per point does not take part in the choice; the error is then d * w. Nothing
 * of the (n, k) distances is stored. (The expanded form, |mu|^2 - 2 x.mu with fused multiply-adds, which would
 * need the distances recomputed at near-ties to be exact, measured hardly faster in this layout: the loads,
 * broadcasts and the running minimum cost as much as the arithmetic.)
 *
 * Vectorised over points: a block of NV vectors of LANES points (of one problem) is held coordinate by
 * coordinate in registers, and every centroid, taken in order, is broadcast against it; each lane keeps its
 * running minimum and the index where it was first reached (strictly smaller values replace it), so no lanes
 * need reducing at the end, and no centroid table is copied. (Vectorising over centroids instead — a transposed
 * table per problem, the lanes reduced per point — measured about as fast at 256 centroids and about three times
 * slower at 16 and fewer, where that per-point reduction dominates.) Blocks are split in contiguous ranges over
 * the threads; a call of little work runs on one.
 *
 * Inputs must be finite, with |x_j|, |mu_j| < 2^62 and 0 <= w < inf (then no distance is NaN, and one that
 * overflows to +inf ties like torch's); the Python side (rateq.quant.nearest) checks that and otherwise uses torch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define NV 4       /* vectors of points per block */
#define MAX_C 16   /* coordinates per point */

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

enum { W_NONE = 0, W_POINT = 1, W_COORD = 2 };

static inline vf splat(float v) { return (vf){0} + v; }

static inline vf select_f(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline vi select_i(vi m, vi a, vi b) { return (a & m) | (b & ~m); }

/* Points [0, m) of one problem (m <= nv * LANES; the lanes past m repeat the last point and are not written)
 * against its k centroids Cg (k, c). */
static inline __attribute__((always_inline)) void block(const float *x, const float *w, int64_t m, const int nv,
                                                        const int c, const float *Cg, int64_t k, const int wmode,
                                                        int64_t *codes, float *err) {
    vf xs[MAX_C][NV], ws[MAX_C][NV];
    for (int j = 0; j < c; j++)
        for (int v = 0; v < nv; v++)
            for (int l = 0; l < LANES; l++) {
                int64_t p = v * LANES + l < m ? v * LANES + l : m - 1;
                xs[j][v][l] = x[p * c + j];
                if (wmode == W_COORD) ws[j][v][l] = w[p * c + j];
            }
    vf best[NV];
    vi at[NV];
    for (int v = 0; v < nv; v++) {
        best[v] = splat(INFINITY);
        at[v] = (vi){0};
    }
    vi id = {0};
    for (int64_t i = 0; i < k; i++) {
        const float *mu = Cg + i * c;
        vf d[NV];
        for (int j = 0; j < c; j++) { /* c >= 1: d[v] is set at j = 0 */
            vf u = splat(mu[j]);
            for (int v = 0; v < nv; v++) {
                vf t = u - xs[j][v];
                vf s = t * t;
                if (wmode == W_COORD) s = s * ws[j][v];
                d[v] = j ? d[v] + s : s;
            }
        }
        for (int v = 0; v < nv; v++) {
            vi lt = d[v] < best[v];
            best[v] = select_f(lt, d[v], best[v]);
            at[v] = select_i(lt, id, at[v]);
        }
        id += 1;
    }
    for (int v = 0; v < nv; v++)
        for (int l = 0; l < LANES; l++) {
            int64_t p = v * LANES + l;
            if (p < m) {
                codes[p] = at[v][l];
                err[p] = wmode == W_POINT ? best[v][l] * w[p] : best[v][l];
            }
        }
}

/* The block with c, the weighting and the block width as constants: c = 1, 2, 4, 8 unrolled; a whole block of
 * NV vectors, or a single vector for at most LANES points (a token or a few, as the cache encodes them). */
static void dispatch(const float *x, const float *w, int64_t m, int c, const float *Cg, int64_t k, int wmode,
                     int64_t *codes, float *err) {
#define WEIGHTS(NVEC, C)                                                        \
    if (wmode == W_COORD)                                                      \
        block(x, w, m, NVEC, C, Cg, k, W_COORD, codes, err);                   \
    else if (wmode == W_POINT)                                                 \
        block(x, w, m, NVEC, C, Cg, k, W_POINT, codes, err);                   \
    else                                                                       \
        block(x, w, m, NVEC, C, Cg, k, W_NONE, codes, err);
#define CASE(C)                                                                \
    case C:                                                                    \
        if (m <= LANES) {                                                      \
            WEIGHTS(1, C)                                                      \
        } else {                                                               \
            WEIGHTS(NV, C)                                                     \
        }                                                                      \
        return;
    switch (c) {
        CASE(1)
        CASE(2)
        CASE(4)
        CASE(8)
    default:
        block(x, w, m, NV, c, Cg, k, wmode, codes, err);
    }
#undef CASE
#undef WEIGHTS
}

/* x (G, n, c), C (G, k, c), w NULL / (G, n, 1) / (G, n, c) per wmode; codes (G, n) int64, err (G, n) fp32.
 * Returns 0, or 2 for arguments out of range (nothing written). */
int rq_nearest(int64_t G, int64_t n, int64_t c, int64_t k, const float *x, const float *C, const float *w,
               int32_t wmode, int64_t *codes, float *err, int32_t nthreads) {
    if (G < 0 || n < 0 || c < 1 || c > MAX_C || k < 1 || k > INT32_MAX - 1 || wmode < W_NONE || wmode > W_COORD ||
        (wmode != W_NONE && !w))
        return 2;
    const int64_t span = NV * LANES;
    int64_t per = (n + span - 1) / span, units = G * per;
    if (units == 0) return 0;
    int nt = nthreads > 0 ? nthreads : 1;
    if ((double)G * (double)n * (double)k * (double)c < 1e5) nt = 1; /* a handful of points: no threads woken */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < units; u++) {
        int64_t g = u / per, p0 = (u % per) * span, m = n - p0 < span ? n - p0 : span;
        int64_t p = g * n + p0;
        const float *wp = wmode == W_NONE ? NULL : w + (wmode == W_COORD ? p * c : p);
        dispatch(x + p * c, wp, m, (int)c, C + g * k * c, k, wmode, codes + p, err + p);
    }
    return 0;
}

/* One step of k-means++ seeding (rateq.quant.kmeans._init_kmeanspp) for G problems: every point's distance to
 * the nearest centroid so far, d (G, n) fp32, lowered to its distance to the centroid just placed, mu (G, c) at
 * row stride mu_stride (the same sum as above: s_j in order, then * w for a weight per point), then one point
 * per problem drawn with probability proportional to d: the first i whose float64 running sum d_0 + ... + d_i
 * (taken in order, each d_i widened exactly) exceeds u_g times the whole sum, at most n - 1; every point alike
 * where d sums to zero. That is torch.searchsorted(cumsum(d.double()), u * total, right=True), the sums being
 * sequential either way. Returns 0, or 2 for arguments out of range (nothing written). */
int rq_seed_step(int64_t G, int64_t n, int64_t c, const float *x, const float *w, int32_t wmode, const float *mu,
                 int64_t mu_stride, float *d, const double *u, int64_t *drawn, int32_t nthreads) {
    if (G < 0 || n < 1 || c < 1 || c > MAX_C || wmode < W_NONE || wmode > W_COORD || (wmode != W_NONE && !w))
        return 2;
    int nt = nthreads > 0 ? nthreads : 1;
    if ((double)G * (double)n * (double)c < 1e5) nt = 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t g = 0; g < G; g++) {
        const float *xg = x + g * n * c, *m = mu + g * mu_stride;
        const float *wg = wmode == W_NONE ? NULL : w + g * n * (wmode == W_COORD ? c : 1);
        float *dg = d + g * n;
        double total = 0.0;
        for (int64_t i = 0; i < n; i++) {
            float e = 0.0f;
            for (int64_t j = 0; j < c; j++) {
                float t = m[j] - xg[i * c + j];
                float s = t * t;
                if (wmode == W_COORD) s = s * wg[i * c + j];
                e = j ? e + s : s;
            }
            if (wmode == W_POINT) e = e * wg[i];
            if (e < dg[i]) dg[i] = e;
            total += (double)dg[i];
        }
        int64_t at = n - 1;
        if (total > 0.0) {
            double v = u[g] * total, run = 0.0;
            for (int64_t i = 0; i < n; i++) {
                run += (double)dg[i];
                if (run > v) {
                    at = i;
                    break;
                }
            }
        } else { /* all ones: the running sum at i is i + 1 */
            double v = u[g] * (double)n;
            for (int64_t i = 0; i < n; i++)
                if ((double)(i + 1) > v) {
                    at = i;
                    break;
                }
        }
        drawn[g] = at;
    }
    return 0;
}

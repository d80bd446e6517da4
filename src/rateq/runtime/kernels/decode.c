/* Decode attention straight from a bucket's packed codes, on the CPU: one pass over the codes, nothing of the
 * dense history formed.
 *
 * A bucket holds h KV heads of one role at one (bits, quantizer). Stored row t of head i dequantizes to
 *
 *     x[d] = A[row, col] * (L[c[t, d]] - S[row, col]) + Z[row, col]
 *
 * with c the packed codes (rateq.quant.pack: 8 codes of `bits` bits per `bits` bytes, little-endian), L the
 * levels (a Lloyd-Max codebook, or the integer codes themselves for uniform grids), A the scale or norm, S a
 * shift (a symmetric grid's midpoint or an integer zero-point; optional), Z an added zero (optional). Metadata
 * is indexed per token and group of G channels (row t, col d / G: "channels") or per block of G tokens and
 * channel (row t / G, col d: "tokens").
 *
 * In a rotated basis (Walsh-Hadamard with signs s: rotate(x) = H diag(s) x / sqrt(D), unrotate(y) =
 * diag(s) H y / sqrt(D)) the query is rotated once and the output unrotated once; pre-RoPE keys are unrotated
 * and re-rotated by RoPE (rotate-half convention, tables of the stored positions) row by row, in registers.
 *
 * rq_scores: out[b, head, j, t] = sum_d q[b, head, j, d] * k_t[d]        (j < r query heads per KV head)
 * rq_mix:    out[b, head, j, d] = sum_t p[b, head, j, t] * v_t[d]        (then unrotated, once)
 *
 * A learned codebook bucket (rateq.quant.codebook) stores, per group of c channels, the index of one of its head's
 * 2^(b c) centroids of that group (codes of b c bits, D / c per row, no metadata): a row is its centroids one
 * after another, x[g c + m] = C[head, g, code_g, m].
 *
 * Codes are read through a table of their levels per byte (1, 2, 4 bits), per 12-bit chunk (3 bits), or one by
 * one (5-8 bits), so a row's levels come out as whole vectors. Metadata folds where it can: keys grouped along
 * tokens without RoPE take (A ⊙ q) and a bias once per block; values accumulate (p·A) per token and group and
 * add the shifts and zeros once at the end. Work is split over (batch row, head, run of tokens) across the
 * OpenMP threads torch itself uses.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 256
#define MAX_R 64
#define RUN 256 /* tokens per work item */

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

typedef struct {
    const void *ptr;
    int64_t stride[3]; /* elements: batch row, head, row */
    int32_t dtype;
    int32_t present;
} Meta;

typedef struct {
    const uint8_t *codes;
    int64_t cstride[3]; /* bytes: batch row, head, row */
    int32_t bits;
    int32_t D;
    int32_t G;
    int32_t axis_tokens; /* 1: metadata per (block of G tokens, channel); 0: per (token, group of G channels) */
    const float *levels; /* 2^bits levels, or NULL for the integer codes themselves */
    Meta scale, shift, add;
    float shift_const; /* used when shift is absent and has_shift_const */
    int32_t has_shift_const;
    const float *signs; /* rotated basis: the rotation's signs (D), or NULL */
    const float *cos, *sin; /* pre-RoPE keys: tables (T, D) of the stored rows' positions, or NULL */
    const float *book;      /* learned codebooks (h, D / c, 2^bits, c) fp32, or NULL; bits is then b c */
    int32_t book_c;         /* channels per code c of a codebook bucket */
} Unit;

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        if (m == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) { m <<= 1; e--; }
            bits = sign | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load(const Meta *m, int64_t i) {
    switch (m->dtype) {
    case DT_F16: return half_to_float(((const uint16_t *)m->ptr)[i]);
    case DT_BF16: {
        uint32_t bits = (uint32_t)((const uint16_t *)m->ptr)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    default: return ((const float *)m->ptr)[i];
    }
}

static inline int64_t at(const Meta *m, int64_t b, int64_t i, int64_t row) {
    return b * m->stride[0] + i * m->stride[1] + row * m->stride[2];
}

/* ---- codes → levels ------------------------------------------------------------------------------------- */

typedef struct {
    int bits, D;
    const float *levels; /* 2^bits */
    float *table;        /* per byte (1, 2, 4, 8 bits) or per 12-bit chunk (3 bits); NULL for 5-7 bits */
    float lv[256];
} Reader;

static float level(const Reader *rd, unsigned c) { return rd->lv[c]; }

static int reader_init(Reader *rd, int bits, int D, const float *levels) {
    rd->bits = bits;
    rd->D = D;
    for (unsigned c = 0; c < (1u << bits); c++) rd->lv[c] = levels ? levels[c] : (float)c;
    rd->table = NULL;
    int per, chunk;
    switch (bits) {
    case 1: per = 8; chunk = 8; break;
    case 2: per = 4; chunk = 8; break;
    case 3: per = 4; chunk = 12; break;
    case 4: per = 2; chunk = 8; break;
    case 8: per = 1; chunk = 8; break;
    default: return 0;
    }
    rd->table = malloc(sizeof(float) * ((size_t)1 << chunk) * per);
    if (!rd->table) return 1;
    for (unsigned x = 0; x < (1u << chunk); x++)
        for (int m = 0; m < per; m++) rd->table[x * per + m] = level(rd, (x >> (m * bits)) & ((1u << bits) - 1));
    return 0;
}

static void reader_free(Reader *rd) { free(rd->table); }

/* The levels of one row of D codes into u. */
static inline __attribute__((always_inline)) void read_row(const Reader *rd, const uint8_t *src, float *restrict u,
                                                          const int D) {
    const float *tb = rd->table;
    switch (rd->bits) {
    case 1:
        for (int k = 0; k < D / 8; k++) memcpy(u + 8 * k, tb + 8 * src[k], 32);
        return;
    case 2:
        for (int k = 0; k < D / 4; k++) memcpy(u + 4 * k, tb + 4 * src[k], 16);
        return;
    case 4:
        for (int k = 0; k < D / 2; k++) memcpy(u + 2 * k, tb + 2 * src[k], 8);
        return;
    case 8:
        for (int k = 0; k < D; k++) u[k] = tb[src[k]];
        return;
    case 3:
        for (int g = 0; g < D / 8; g++) {
            const uint8_t *s = src + 3 * g;
            uint32_t w = (uint32_t)s[0] | (uint32_t)s[1] << 8 | (uint32_t)s[2] << 16;
            memcpy(u + 8 * g, tb + 4 * (w & 0xfff), 16);
            memcpy(u + 8 * g + 4, tb + 4 * (w >> 12), 16);
        }
        return;
    default: {
        const int b = rd->bits;
        for (int g = 0; g < D / 8; g++) {
            uint64_t w = 0;
            memcpy(&w, src + g * b, (size_t)b);
            for (int m = 0; m < 8; m++) u[8 * g + m] = rd->lv[(w >> (m * b)) & ((1u << b) - 1)];
        }
    }
    }
}

/* The centroids of one row of a codebook bucket's head i into x: D / c codes of `bits` bits, 8 codes per `bits`
 * bytes (rateq.quant.pack). */
static inline __attribute__((always_inline)) void read_book_c(const float *restrict book, int b,
                                                             const uint8_t *src, float *restrict x, const int D,
                                                             const int c) {
    const int n = D / c;
    const int64_t K = (int64_t)1 << b;
    const uint64_t mask = (1u << b) - 1;
    if (b == 8) { /* one byte per code (b c = 8: the widest tables) */
        for (int g = 0; g < n; g++) memcpy(x + g * c, book + ((int64_t)g * 256 + src[g]) * c, sizeof(float) * c);
        return;
    }
    for (int g8 = 0; g8 < n / 8; g8++) {
        uint64_t w = 0;
        memcpy(&w, src + g8 * b, (size_t)b);
        const float *base = book + (int64_t)(8 * g8) * K * c;
        for (int m = 0; m < 8; m++) /* c is a constant here: each copy is a few register moves */
            memcpy(x + (8 * g8 + m) * c, base + ((int64_t)m * K + (int64_t)((w >> (m * b)) & mask)) * c,
                   sizeof(float) * c);
    }
}

static inline __attribute__((always_inline)) void read_book(const Unit *u, int64_t i, const uint8_t *src,
                                                           float *restrict x, const int D) {
    const int c = u->book_c;
    const float *book = u->book + i * (int64_t)(D / c) * ((int64_t)1 << u->bits) * c;
    switch (c) {
    case 1: read_book_c(book, u->bits, src, x, D, 1); return;
    case 2: read_book_c(book, u->bits, src, x, D, 2); return;
    case 4: read_book_c(book, u->bits, src, x, D, 4); return;
    case 8: read_book_c(book, u->bits, src, x, D, 8); return;
    default: read_book_c(book, u->bits, src, x, D, c);
    }
}

/* ---- rotation: the Walsh-Hadamard transform on vectors of 8 (stages 1, 2, 4 inside each vector by lane
 * shuffles, the higher stages between whole vectors) ------------------------------------------------------ */

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Unnormalised Walsh-Hadamard transform in Sylvester order (pairs (i, i + h) in blocks of 2h), in place. */
static inline __attribute__((always_inline)) void fwht(float *restrict x, const int D) {
    const v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1}, s4 = {1, 1, 1, 1, -1, -1, -1, -1};
    const v8i p1 = {1, 0, 3, 2, 5, 4, 7, 6}, p2 = {2, 3, 0, 1, 6, 7, 4, 5}, p4 = {4, 5, 6, 7, 0, 1, 2, 3};
    v8 v[MAX_D / 8];
    for (int a = 0; a < D / 8; a++) {
        v8 w;
        memcpy(&w, x + 8 * a, 32);
        w = w * s1 + __builtin_shuffle(w, p1); /* (x0, x1) -> (x0 + x1, x0 - x1) */
        w = w * s2 + __builtin_shuffle(w, p2);
        w = w * s4 + __builtin_shuffle(w, p4);
        v[a] = w;
    }
    for (int h = 1; h < D / 8; h *= 2)
        for (int i = 0; i < D / 8; i += 2 * h)
            for (int k = i; k < i + h; k++) {
                v8 p = v[k], m = v[k + h];
                v[k] = p + m;
                v[k + h] = p - m;
            }
    memcpy(x, v, sizeof(float) * D);
}

/* rotate (forward=1): H diag(s) x / sqrt(D); unrotate (forward=0): diag(s) H x / sqrt(D). */
static inline __attribute__((always_inline)) void rotate(float *x, const float *signs, const int D, int forward) {
    float norm = 1.0f / sqrtf((float)D);
    if (forward)
        for (int d = 0; d < D; d++) x[d] *= signs[d];
    fwht(x, D);
    for (int d = 0; d < D; d++) x[d] *= forward ? norm : norm * signs[d];
}

/* ---- metadata --------------------------------------------------------------------------------------------- */

/* Per-channel metadata of one block of G tokens (keys grouped along tokens): A, S, Z for every channel. */
static void block_meta(const Unit *u, int64_t b, int64_t i, int64_t row, float *A, float *S, float *Z) {
    int D = u->D;
    int64_t sa = at(&u->scale, b, i, row), ss = u->shift.present ? at(&u->shift, b, i, row) : 0,
            sz = u->add.present ? at(&u->add, b, i, row) : 0;
    for (int d = 0; d < D; d++) {
        float a = load(&u->scale, sa + d);
        A[d] = (a < 1e-12f && !u->levels) ? 1e-12f : a; /* grids clamp stored scales below 1e-12 */
        S[d] = u->shift.present ? load(&u->shift, ss + d) : (u->has_shift_const ? u->shift_const : 0.0f);
        Z[d] = u->add.present ? load(&u->add, sz + d) : 0.0f;
    }
}

/* Per-group metadata of one token (groups along channels): a, s, z of each of the D/G groups. */
static inline void token_meta(const Unit *u, int64_t b, int64_t i, int64_t t, float *a, float *s, float *z) {
    int n = u->D / u->G;
    int64_t sa = at(&u->scale, b, i, t), ss = u->shift.present ? at(&u->shift, b, i, t) : 0,
            sz = u->add.present ? at(&u->add, b, i, t) : 0;
    for (int g = 0; g < n; g++) {
        float x = load(&u->scale, sa + g);
        a[g] = (x < 1e-12f && !u->levels) ? 1e-12f : x;
        s[g] = u->shift.present ? load(&u->shift, ss + g) : (u->has_shift_const ? u->shift_const : 0.0f);
        z[g] = u->add.present ? load(&u->add, sz + g) : 0.0f;
    }
}

/* Row t dequantized into x (stored basis), from its levels u. */
static inline __attribute__((always_inline)) void dequant(const Unit *u, int64_t b, int64_t i, int64_t t,
                                                         const float *A, const float *S, const float *Z,
                                                         const float *restrict lv, float *restrict x, const int D) {
    if (u->axis_tokens) {
        for (int d = 0; d < D; d++) x[d] = A[d] * (lv[d] - S[d]) + Z[d];
        return;
    }
    float a[MAX_D], s[MAX_D], z[MAX_D];
    const int G = u->G;
    token_meta(u, b, i, t, a, s, z);
    for (int g = 0; g < D / G; g++)
        for (int d = g * G; d < (g + 1) * G; d++) x[d] = a[g] * (lv[d] - s[g]) + z[g];
}

static inline v8 ld8(const float *p) {
    v8 v;
    memcpy(&v, p, 32);
    return v;
}

static inline void st8(float *p, v8 v) { memcpy(p, &v, 32); }

/* The sums of a[0..7] as one vector: lane i = a[i][0] + ... + a[i][7]. */
static inline v8 hsum8x8(const v8 *a) {
    const v8i lo = {0, 8, 2, 10, 4, 12, 6, 14}, hi = {1, 9, 3, 11, 5, 13, 7, 15};
    const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 s[4], t[2];
    for (int k = 0; k < 4; k++)
        s[k] = __builtin_shuffle(a[2 * k], a[2 * k + 1], lo) + __builtin_shuffle(a[2 * k], a[2 * k + 1], hi);
    for (int k = 0; k < 2; k++)
        t[k] = __builtin_shuffle(s[2 * k], s[2 * k + 1], lo2) + __builtin_shuffle(s[2 * k], s[2 * k + 1], hi2);
    return __builtin_shuffle(t[0], t[1], lo4) + __builtin_shuffle(t[0], t[1], hi4);
}

/* ---- scores ----------------------------------------------------------------------------------------------- */

/* Scores of tokens [t0, t1) of head i against the r queries, 8 tokens at a time: each tile's rows (levels when
 * the metadata folds into the query, else dequantized keys, re-rotated for pre-RoPE) are dotted with every query
 * by 8 independent accumulators, summed across lanes at once. t0 is a multiple of 8. */
static inline __attribute__((always_inline)) void scores_run(const Unit *u, const Reader *rd, int64_t b, int64_t i,
                                                            int64_t t0, int64_t t1, int64_t r, const float *q,
                                                            const int64_t *qs, float *o, int64_t ostride,
                                                            const int D) {
    float qq[MAX_R][MAX_D] __attribute__((aligned(32))), qa[MAX_R][MAX_D] __attribute__((aligned(32)));
    float bias[MAX_R], rows[8][MAX_D] __attribute__((aligned(32)));
    float A[MAX_D], S[MAX_D], Z[MAX_D], lv[MAX_D], y[MAX_D];
    const int prerope = u->cos != 0, fold = u->axis_tokens && !prerope && u->G % 8 == 0 && !u->book;
    for (int j = 0; j < r; j++) {
        memcpy(qq[j], q + j * qs[2], sizeof(float) * D);
        if (u->signs && !prerope) rotate(qq[j], u->signs, D, 1); /* keys in the rotated basis */
    }
    memset(rows, 0, sizeof(rows));
    int64_t block = -1;
    for (int64_t t = t0; t < t1; t += 8) {
        const int n = t1 - t < 8 ? (int)(t1 - t) : 8;
        for (int tk = 0; tk < n; tk++) {
            const int64_t tt = t + tk;
            if (u->axis_tokens && !u->book && tt / u->G != block) {
                block = tt / u->G;
                block_meta(u, b, i, block, A, S, Z);
                if (fold) /* q·(A ⊙ (L - S) + Z) = (q ⊙ A)·L + q·(Z - A ⊙ S): once per block */
                    for (int j = 0; j < r; j++) {
                        float c = 0.0f;
                        for (int d = 0; d < D; d++) {
                            qa[j][d] = qq[j][d] * A[d];
                            c += qq[j][d] * (Z[d] - A[d] * S[d]);
                        }
                        bias[j] = c;
                    }
            }
            const uint8_t *src = u->codes + b * u->cstride[0] + i * u->cstride[1] + tt * u->cstride[2];
            if (fold) {
                read_row(rd, src, rows[tk], D);
                continue;
            }
            if (u->book) {
                read_book(u, i, src, prerope ? y : rows[tk], D);
                if (!prerope) continue;
            } else {
                read_row(rd, src, lv, D);
                if (!prerope) {
                    dequant(u, b, i, tt, A, S, Z, lv, rows[tk], D);
                    continue;
                }
                dequant(u, b, i, tt, A, S, Z, lv, y, D);
            }
            if (u->signs) rotate(y, u->signs, D, 0);
            const float *cs = u->cos + tt * D, *sn = u->sin + tt * D;
            const int half = D / 2;
            float *k = rows[tk];
            for (int d = 0; d < half; d++) k[d] = y[d] * cs[d] - y[d + half] * sn[d];
            for (int d = half; d < D; d++) k[d] = y[d] * cs[d] + y[d - half] * sn[d];
        }
        const float (*qx)[MAX_D] = fold ? qa : qq;
        for (int j = 0; j < r; j++) {
            v8 acc[8] = {{0}};
            for (int c = 0; c < D; c += 8) {
                v8 qv = ld8(qx[j] + c);
                for (int tk = 0; tk < 8; tk++) acc[tk] += qv * ld8(rows[tk] + c);
            }
            float sums[8];
            st8(sums, hsum8x8(acc));
            float add = fold ? bias[j] : 0.0f;
            for (int tk = 0; tk < n; tk++) o[j * ostride + t + tk] = sums[tk] + add;
        }
    }
}

static int work_items(int64_t B, int64_t h, int64_t T, int64_t *runs) {
    *runs = (T + RUN - 1) / RUN;
    return (int)(B * h * *runs);
}

static int check(const Unit *u, int64_t r) {
    int D = u->D;
    if (D > MAX_D || D % 8 || r > MAX_R || u->bits < 1 || u->bits > 8) return 1;
    if (u->book) return u->book_c < 1 || D % (8 * u->book_c) || u->axis_tokens; /* whole bytes of 8 codes a row */
    if (!u->axis_tokens && (u->G <= 0 || D % u->G || u->G % 8)) return 1; /* whole groups per vector of 8 */
    if ((u->signs) && (D & (D - 1))) return 1;
    return 0;
}

/* q (B, ., r, D) fp32 with strides qs (batch, head, query); out (B, ., r, T) fp32 with strides os, last dim
 * contiguous; heads[i] is bucket head i's index in q and out. */
int rq_scores(const Unit *u, int64_t B, int64_t h, int64_t T, int64_t r, const int64_t *heads, const float *q,
              const int64_t *qs, float *out, const int64_t *os, int nthreads) {
    if (check(u, r)) return 1;
    Reader rd;
    if (reader_init(&rd, u->bits, u->D, u->levels)) return 2;
    int64_t runs;
    int items = work_items(B, h, T, &runs);
    const int D = u->D;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int it = 0; it < items; it++) {
        int64_t bi = it / runs, run = it % runs, b = bi / h, i = bi % h, head = heads[i];
        int64_t t0 = run * RUN, t1 = t0 + RUN < T ? t0 + RUN : T;
        const float *qh = q + b * qs[0] + head * qs[1];
        float *o = out + b * os[0] + head * os[1];
        if (D == 64)
            scores_run(u, &rd, b, i, t0, t1, r, qh, qs, o, os[2], 64);
        else if (D == 128)
            scores_run(u, &rd, b, i, t0, t1, r, qh, qs, o, os[2], 128);
        else
            scores_run(u, &rd, b, i, t0, t1, r, qh, qs, o, os[2], D);
    }
    reader_free(&rd);
    return 0;
}

/* ---- outputs ---------------------------------------------------------------------------------------------- */

/* acc[j] += sum over tokens [t0, t1) of p[j][t] * x_t, in the stored basis, 8 tokens at a time. Groups along
 * channels fold each token's metadata into its weight: (p·a) · L per group, and p·(z - a·s) per group summed
 * apart (added once at the end). */
static inline __attribute__((always_inline)) void mix_run(const Unit *u, const Reader *rd, int64_t b, int64_t i,
                                                         int64_t t0, int64_t t1, int64_t r, const float *pp,
                                                         int64_t pstride, float (*acc)[MAX_D], const int D) {
    float A[MAX_D], S[MAX_D], Z[MAX_D], lv[MAX_D];
    float a[8][MAX_D], sh[MAX_D], z[MAX_D], gb[MAX_R][MAX_D];
    float rows[8][MAX_D] __attribute__((aligned(32)));
    const int G = u->G, ng = (u->axis_tokens || u->book) ? 0 : D / G;
    int64_t block = -1;
    memset(gb, 0, sizeof(float) * MAX_D * (size_t)r);
    memset(rows, 0, sizeof(rows));
    for (int64_t t = t0; t < t1; t += 8) {
        const int n = t1 - t < 8 ? (int)(t1 - t) : 8;
        for (int tk = 0; tk < n; tk++) {
            const int64_t tt = t + tk;
            const uint8_t *src = u->codes + b * u->cstride[0] + i * u->cstride[1] + tt * u->cstride[2];
            if (u->book) {
                read_book(u, i, src, rows[tk], D);
            } else if (u->axis_tokens) {
                if (tt / G != block) {
                    block = tt / G;
                    block_meta(u, b, i, block, A, S, Z);
                }
                read_row(rd, src, lv, D);
                dequant(u, b, i, tt, A, S, Z, lv, rows[tk], D);
            } else {
                read_row(rd, src, rows[tk], D);
                token_meta(u, b, i, tt, a[tk], sh, z);
                for (int j = 0; j < r; j++) {
                    const float w = pp[j * pstride + tt];
                    for (int g = 0; g < ng; g++) gb[j][g] += w * (z[g] - a[tk][g] * sh[g]);
                }
            }
        }
        for (int j = 0; j < r; j++) {
            float cf[MAX_D / 8][8]; /* weight of tile token tk in group g (0 past the run's end) */
            for (int g = 0; g < (ng ? ng : 1); g++)
                for (int tk = 0; tk < 8; tk++)
                    cf[g][tk] = tk < n ? pp[j * pstride + t + tk] * (ng ? a[tk][g] : 1.0f) : 0.0f;
            for (int c = 0; c < D; c += 8) {
                v8 s = ld8(acc[j] + c);
                const float *w = cf[ng ? c / G : 0];
                for (int tk = 0; tk < 8; tk++) s += w[tk] * ld8(rows[tk] + c);
                st8(acc[j] + c, s);
            }
        }
    }
    for (int j = 0; j < r; j++)
        for (int g = 0; g < ng; g++)
            for (int d = g * G; d < (g + 1) * G; d++) acc[j][d] += gb[j][g];
}

static void flush(float (*acc)[MAX_D], float *out, const int64_t *os, int64_t b, int64_t head, int64_t r, int D) {
    for (int64_t j = 0; j < r; j++) {
        float *o = out + b * os[0] + head * os[1] + j * os[2];
        for (int d = 0; d < D; d++) o[d] += acc[j][d];
    }
}

/* p (B, ., r, T) fp32 with strides ps (last dim contiguous); out (B, ., r, D) fp32 with strides os. */
int rq_mix(const Unit *u, int64_t B, int64_t h, int64_t T, int64_t r, const int64_t *heads, const float *p,
           const int64_t *ps, float *out, const int64_t *os, int nthreads) {
    if (check(u, r) || u->cos) return 1;
    Reader rd;
    if (reader_init(&rd, u->bits, u->D, u->levels)) return 2;
    const int D = u->D;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < h; i++)
            for (int64_t j = 0; j < r; j++) memset(out + b * os[0] + heads[i] * os[1] + j * os[2], 0, sizeof(float) * D);
    int64_t runs;
    int items = work_items(B, h, T, &runs);
#pragma omp parallel num_threads(nthreads)
    {
        float acc[MAX_R][MAX_D];
        int64_t current = -1; /* (b, i) whose partial sums acc holds */
#pragma omp for schedule(static)
        for (int it = 0; it < items; it++) {
            int64_t bi = it / runs, run = it % runs, b = bi / h, i = bi % h;
            if (bi != current) {
                if (current >= 0) {
#pragma omp critical(rq_mix_flush)
                    flush(acc, out, os, current / h, heads[current % h], r, D);
                }
                memset(acc, 0, sizeof(float) * MAX_D * (size_t)r);
                current = bi;
            }
            int64_t t0 = run * RUN, t1 = t0 + RUN < T ? t0 + RUN : T;
            const float *pp = p + b * ps[0] + heads[i] * ps[1];
            if (D == 64)
                mix_run(u, &rd, b, i, t0, t1, r, pp, ps[2], acc, 64);
            else if (D == 128)
                mix_run(u, &rd, b, i, t0, t1, r, pp, ps[2], acc, 128);
            else
                mix_run(u, &rd, b, i, t0, t1, r, pp, ps[2], acc, D);
        }
        if (current >= 0) {
#pragma omp critical(rq_mix_flush)
            flush(acc, out, os, current / h, heads[current % h], r, D);
        }
    }
    reader_free(&rd);
    if (u->signs)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < h; i++)
                for (int64_t j = 0; j < r; j++) rotate(out + b * os[0] + heads[i] * os[1] + j * os[2], u->signs, D, 0);
    return 0;
}

/* The Mamba-1 selective scan and its gradient as fused loops for CPUs (compiled on first use by scan_cpu.py).
 *
 * For every channel d and state n, with dt = softplus(delta + bias) when asked:
 *   h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * u_t * B_t[n]
 *   y_t = (sum_n C_t[n] * h_t + D[d] * u_t) * silu(z_t)       (D and z optional)
 * Tensors are time-major with channels innermost, so that one vector holds W neighbouring
 * channels and the loop over states runs on registers:
 *   u, delta, z, y   [batch, len, dim]            A_t  [nstate, dim]  (A transposed)
 *   B, C             [batch, len, groups, nstate]  (channel d reads group d / (dim / groups))
 *   h                [batch, nstate, dim]          the state entering the scan, overwritten by the last
 * Channels (and states within a group) are contiguous; batches and tokens may have any stride,
 * negative ones included (a negative token stride scans the sequence backwards). Nothing is
 * allocated; the work is split over (batch, group, block of W channels).
 * arena_selective_scan_bwd, the gradient, takes contiguous tensors of the same layouts and splits
 * its work the same way; it recomputes the states (a few per channel block at a time) instead of
 * reading saved ones.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else  /* built without OpenMP: one thread */
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

#ifndef W  /* channels per block: one vector register (AVX-512: 16 floats, AVX2: 8) */
#ifdef __AVX512F__
#define W 16
#else
#define W 8
#endif
#endif
#define NMAX 64   /* largest d_state held in registers / on the stack */
/* The backward's states and decays per segment: within a core's L2 cache. Its four per-token factors
 * come on top; counting them too would split VMamba's stage-1 sequences (3,136 tokens, d_state 1) in
 * two segments and add a first pass: 30 -> 44 ms per backward at batch 8 (Zen 3). */
#define SEG_BYTES (512 * 1024)
#define WIDE_BYTES (2048 * 1024)

/* GCC/Clang vector extensions: the compiler maps them onto the machine's vector width. */
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

/* W, for the caller's split of the work. */
int arena_block_width(void) { return W; }

static inline vf blend(vi mask, vf yes, vf no) { return (vf)((mask & (vi)yes) | (~mask & (vi)no)); }

#define LOG2E 1.44269504088896341f

/* 2^f for |f| <= 1/2: a degree-5 polynomial fitted for error in ulps, 1 at f = 0 (2.1 ulp in fp32
 * arithmetic; degree 6 was 0.9). Estrin's scheme: its longest chain of dependent operations is three
 * FMAs and a multiply where Horner's is five FMAs; the recurrence waits on it for every state. */
static inline vf exp2_poly(vf f) {
    const vf f2 = f * f;
    const vf p01 = f * 6.9314682925e-1f + 1.0f, p23 = f * 5.5508914385e-2f + 2.4022237037e-1f;
    const vf p45 = f * 1.3225707461e-3f + 9.6717629178e-3f;
    return (p45 * f2 + p23) * f2 + p01;
}

/* 2^x: 0 below -126 (where it is denormal or 0). x = k + f with k the nearest integer, then
 * exp2_poly(f) * 2^k. With AVX-512 the rounding, the scaling by 2^k (which overflows to inf above
 * 127, as exp does) and the underflow to 0 are one instruction each (vrndscaleps, masked
 * vscalefps); otherwise x is clamped to 127 first, rounded by adding and subtracting 1.5 * 2^23, and
 * 2^k's exponent bits are the low bits of that sum shifted into place (no conversion). With AVX2
 * the clamps are one vminps and one vmaxps, about 2^-125 stands for 0 below -125, and k is added to
 * the polynomial's exponent as an integer (exact: its result stays a normal float) instead of a
 * multiply, which leaves the FMA pipes to the polynomial and the recurrence: backward 3% faster. */
#define ROUNDER 12582912.0f  /* 1.5 * 2^23: x + ROUNDER is x rounded to an integer k, held in its low bits */
#if defined(__AVX512F__) && W == 16
#include <immintrin.h>
static inline vf vexp2(vf x) {
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
    const __m512 k = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_maskz_scalef_ps(keep, (__m512)exp2_poly((vf)_mm512_sub_ps((__m512)x, k)), k);
}
#elif defined(__AVX2__) && W == 8
#include <immintrin.h>
static inline vf vexp2(vf x) {  /* x clamped to [-125, 127] by vminps/vmaxps (x second: NaN passes through) */
    x = (vf)_mm256_max_ps(_mm256_set1_ps(-125.0f), _mm256_min_ps(_mm256_set1_ps(127.0f), (__m256)x));
    const vf t = x + ROUNDER;
    return (vf)((vi)exp2_poly(x - (t - ROUNDER)) + ((vi)t << 23));  /* k added to the exponent: an integer add */
}
#else
static inline vf vexp2(vf x) {
    const vi under = x < -126.0f;
    x = blend(under, (vf){0} - 126.0f, blend(x > 127.0f, (vf){0} + 127.0f, x));
    const vf t = x + ROUNDER;
    return blend(under, (vf){0}, exp2_poly(x - (t - ROUNDER)) * (vf)(((vi)t << 23) + (127 << 23)));
}
#endif

/* exp(x) = 2^(x log2 e): ~2 ulp for |x| <= 1, growing to |x| / 2 ulp (the rounding of x log2 e);
 * softplus and sigmoid use it where that is far below their own rounding, and sigmoid(x) is 0 (AVX2:
 * below 1e-38) when exp(-x) overflows. */
static inline vf vexp(vf x) { return vexp2(x * LOG2E); }

/* exp(-|x|), the one exponential behind softplus(x) and sigmoid(x). */
static inline vf vexp_neg_abs(vf x) { return vexp((vf)((vi)x | INT32_MIN)); }

/* softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|), log1p(e) = e * P(e) on [0, 1] by a degree-8
 * polynomial fitted for relative error (3e-8): no logarithm and no division. Estrin's scheme (four
 * dependent steps, against Horner's nine FMAs): the softplus of every token starts the scan's chain,
 * and with one state (VMamba) Horner's chain held the core to a few tokens in flight. */
static inline vf vsoftplus_e(vf x, vf e) {
    const vf e2 = e * e, e4 = e2 * e2;
    const vf p01 = e * -4.9999493139e-01f + 9.9999996988e-01f, p23 = e * -2.4842982113e-01f + 3.3319096792e-01f;
    const vf p45 = e * -1.3663245083e-01f + 1.9106006404e-01f, p67 = e * -2.9505233918e-02f + 7.8225943791e-02f;
    const vf p = ((e2 * 5.2326930648e-03f + p67) * e2 + p45) * e4 + (p23 * e2 + p01);
    return blend(x > 0.0f, x, (vf){0}) + e * p;
}

static inline vf vsoftplus(vf x) { return vsoftplus_e(x, vexp_neg_abs(x)); }

/* The sum of a vector's lanes, halving it twice first (portable: no target-specific shuffles). */
typedef float vh __attribute__((vector_size(2 * W)));
typedef float vq __attribute__((vector_size(W)));

static inline float hsum(vf v) {
    vh lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    lo += hi;
    vq a, b;
    memcpy(&a, &lo, sizeof a);
    memcpy(&b, (const char *)&lo + sizeof a, sizeof b);
    a += b;
    float sum = 0.0f;
    for (int j = 0; j < W / 4; j++) sum += a[j];
    return sum;
}

/* out[i] = the sum of v[i]'s lanes for i < n. With a compiler that has __builtin_shufflevector, W
 * vectors at a time by a transpose-and-add tree (W - 1 pair steps of two shuffles and an add, against
 * W separate reductions): each step halves the partial sums per vector and doubles the vectors per
 * register, in order, so that lane i ends as v[i]'s sum; the rest one by one. */
#if (W == 16 || W == 8) && (defined(__clang__) || __GNUC__ >= 12)
#define SUM_PAIRS(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
#if W == 16
static inline vf lane_sums_w(const vf *v) {
    vf c[8], d[4], e[2];
    for (int i = 0; i < 8; i++)
        c[i] = SUM_PAIRS(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SUM_PAIRS(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        d[i] = SUM_PAIRS(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SUM_PAIRS(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        e[i] = SUM_PAIRS(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SUM_PAIRS(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SUM_PAIRS(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SUM_PAIRS(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
static inline vf lane_sums_w(const vf *v) {
    vf c[4], d[2];
    for (int i = 0; i < 4; i++)
        c[i] = SUM_PAIRS(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11)
             + SUM_PAIRS(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)
        d[i] = SUM_PAIRS(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13)
             + SUM_PAIRS(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    return SUM_PAIRS(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14) + SUM_PAIRS(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif
#define LANE_SUMS_AT_ONCE W
#else
#define LANE_SUMS_AT_ONCE 0
#endif

static inline void lane_sums(const vf *v, long n, float *out) {
    long i = 0;
#if LANE_SUMS_AT_ONCE
    for (; i + W <= n; i += W) {
        const vf sums = lane_sums_w(v + i);
        memcpy(out + i, &sums, sizeof sums);
    }
#endif
    for (; i < n; i++) out[i] = hsum(v[i]);
}

static inline vf sigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

/* GELU(x) = x * Phi(x), the exact (erf) form: Phi(x) = 1/2 + x P(x^2) / Q(x^2), a (5, 5) rational
 * function fitted for absolute error (7e-9) on |x| <= 5.5, and 0 or 1 beyond (as in fp32, within 2e-8).
 * Error within 2.2e-7 max(|x|, 1), as PyTorch's (2.0e-7), at 4.3 against its 6.9 ms for 8 M floats
 * (Zen 3): two chains of five FMAs and one division instead of an exp and a division. */
#define GELU_CLAMP 5.5f
static inline vf vnormal_cdf(vf x) {  /* Phi(x) */
    const vf xc = blend(x > GELU_CLAMP, (vf){0} + GELU_CLAMP, blend(x < -GELU_CLAMP, (vf){0} - GELU_CLAMP, x));
    const vf z = xc * xc;
    vf p = (vf){0} + 2.274730521e-08f, q = (vf){0} + 1.197455055e-06f;
    p = p * z + 6.352280080e-06f;
    q = q * z + 7.365589569e-05f;
    p = p * z + 1.688524638e-04f;
    q = q * z + 1.884599224e-03f;
    p = p * z + 4.677427941e-03f;
    q = q * z + 2.864739742e-02f;
    p = p * z + 3.385529248e-02f;
    q = q * z + 2.515285515e-01f;
    p = p * z + 3.989422346e-01f;
    q = q * z + 1.0f;
    return blend(x > GELU_CLAMP, (vf){0} + 1.0f, blend(x < -GELU_CLAMP, (vf){0}, 0.5f + xc * p / q));
}

static inline vf vgelu(vf x) { return x * vnormal_cdf(x); }

/* GELU'(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi); the second term is taken as 0 for
 * |x| > 13 (below 1e-36), where exp's clamp would otherwise leave a tiny nonzero value. */
#define GELU_DENSITY_CLAMP 13.0f
static inline vf vgelu_grad(vf x) {
    const vf density = x * vexp(-0.5f * x * x) * 0.3989422804f;
    return vnormal_cdf(x) + blend(x * x > GELU_DENSITY_CLAMP * GELU_DENSITY_CLAMP, (vf){0}, density);
}

/* w <= W floats from p into a vector (zeros after them), and back. */
static inline vf load(const float *p, long w) {
    vf v;
    if (w == W) {
        memcpy(&v, p, sizeof v);
        return v;
    }
    v = (vf){0};
    for (long j = 0; j < w; j++) v[j] = p[j];
    return v;
}

static inline void store(float *p, vf v, long w) {
    if (w == W) memcpy(p, &v, sizeof v);
    else for (long j = 0; j < w; j++) p[j] = v[j];
}

/* dt of one token: delta + bias, through softplus when asked. */
static inline vf step(const float *delta, vf bias, int softplus, long w) {
    const vf d = load(delta, w) + bias;
    return softplus ? vsoftplus(d) : d;
}

/* Token strides of one block's tensors (in floats). */
struct strides { long u, dt, z, b, c, y; };

/* Vectors of channels a block of the scan and of its gradient walks together. With few states
 * (VMamba's one) a vector's work per token is short and its W floats sit a whole token row from the
 * previous token's (a grouped route: 3 KB at VMamba-T's first stage, a new page per token, where
 * the hardware prefetchers stop): VMAX vectors share each token's cache lines and pages and give
 * the core VMAX independent recurrences. With more states one vector's fill the registers. */
#define VMAX 8
static inline long block_vectors(long nstate) { return nstate <= 2 ? VMAX : 1; }

/* Tokens ahead that the forward prefetches its inputs and outputs: consecutive tokens of a block sit
 * a token row apart (VMamba's grouped routes: 3-6 KB, a new page per token, where the hardware
 * prefetchers stop), and a token's work is too short to hide a miss to memory (on top of wide blocks,
 * 1.1-1.6x at VMamba-T's stage shapes; its gradient, whose walk waits on its own chains, gained nothing). */
#define AHEAD 4
static inline void prefetch_vectors(const float *p, long nvb, int write) {
    for (long v = 0; v < nvb; v++) {
        if (write) __builtin_prefetch(p + v * W, 1);
        else __builtin_prefetch(p + v * W, 0);
    }
}

/* The width of vector v of a block of cw channels. */
static inline long vec_width(long cw, long v) { return cw - v * W < W ? cw - v * W : W; }

/* The channels of block k of a group of dg channels in blocks of nv vectors (the last may be narrower). */
static inline long block_channels(long dg, long k, long nv) { return dg - k * nv * W < nv * W ? dg - k * nv * W : nv * W; }

/* CALL(nv, full, nstate) with the block function's instantiation for a block of nv vectors, cw channels
 * and nstate states: constants where the block is full width (and for VMamba's one state in a wide
 * block), the generic form otherwise. The forward and its gradient choose alike. */
#define BY_BLOCK_SHAPE(CALL, nv, cw, nstate)                              \
    do {                                                                   \
        if ((nv) == 1 && (cw) == W) CALL(1, 1, nstate);                    \
        else if ((nv) == 1) CALL(1, 0, nstate);                            \
        else if ((cw) == VMAX * W && (nstate) == 1) CALL(VMAX, 1, 1);      \
        else CALL(VMAX, 0, nstate);                                        \
    } while (0)

/* One block of cw <= nv * W channels over the whole sequence; pointers are at (t = 0, first channel).
 * Token t sits at (t / inner) * outer strides + (t % inner) * inner strides: a route through a 2D
 * grid (rows, or columns) is read in place; a plain sequence has one outer step of len tokens.
 * CHUNK tokens at a time in three passes: their steps dt (softplus) and dt * u, then the recurrence,
 * then D * u, the gate and the store. A token's softplus, decay and gate are one chain of dependent
 * operations over 100 cycles long; with few states a token's work is short, and in one pass the
 * core overlapped only the few tokens its reorder window held; a wide block (nv > 1) has nv
 * independent vectors in each token and takes one token at a time (1.05-1.2x faster than 4 or 32 at
 * VMamba-T's shapes). Per-vector values are indexed [token or state][vector]; nv, full (cw == nv * W)
 * and, for wide blocks, nstate are constants at each call (the function is inlined). */
#define CHUNK 32
static inline __attribute__((always_inline)) void
scan_block(const float *u, const float *dt, const float *z, const float *B, const float *C, const float *At,
           const float *D, const float *bias, float *y, float *h, struct strides so, struct strides si, long outer,
           long inner, long dim, long nstate, int softplus, int accumulate, long cw, const long nv,
           const int full) {
    const long nvb = full ? nv : (cw + W - 1) / W;
#define WIDTH(v) (full ? W : vec_width(cw, v))
    vf a2[NMAX], hs[NMAX], Dv[VMAX], bv[VMAX];  /* a2: A in base 2, so each decay is one vexp2 */
    for (long v = 0; v < nvb; v++) {
        const long w = WIDTH(v);
        for (long s = 0; s < nstate; s++) {
            a2[s * nv + v] = load(At + s * dim + v * W, w) * LOG2E;
            hs[s * nv + v] = load(h + s * dim + v * W, w);
        }
        Dv[v] = D ? load(D + v * W, w) : (vf){0};
        bv[v] = bias ? load(bias + v * W, w) : (vf){0};
    }
    const long chunk = nv > 1 ? 1 : CHUNK;
    vf ds[CHUNK], dus[CHUNK], ys[CHUNK];
    for (long o = 0; o < outer; o++)
        for (long t0 = 0; t0 < inner; t0 += chunk) {
            const long n = inner - t0 < chunk ? inner - t0 : chunk;
#define TOKEN(p, x) ((p) + o * so.x + (t0 + i) * si.x)
#define AT(p, x) (TOKEN(p, x) + v * W)
            for (long i = 0; i < n; i++) {
                if (t0 + i + AHEAD < inner) {  /* the rows AHEAD tokens on */
#define AHEAD_ROW(p, x) (TOKEN(p, x) + AHEAD * si.x)
                    prefetch_vectors(AHEAD_ROW(u, u), nvb, 0);
                    prefetch_vectors(AHEAD_ROW(dt, dt), nvb, 0);
                    prefetch_vectors(AHEAD_ROW(y, y), nvb, !accumulate);
                    if (z) prefetch_vectors(AHEAD_ROW(z, z), nvb, 0);
#undef AHEAD_ROW
                }
                for (long v = 0; v < nvb; v++) {
                    const long w = WIDTH(v);
                    ds[i * nv + v] = step(AT(dt, dt), bv[v], softplus, w);
                    dus[i * nv + v] = ds[i * nv + v] * load(AT(u, u), w);
                }
            }
            for (long i = 0; i < n; i++) {
                const float *Bt = TOKEN(B, b), *Ct = TOKEN(C, c);
                for (long v = 0; v < nvb; v++) {
                    vf acc = {0};
                    for (long s = 0; s < nstate; s++) {
                        const long k = s * nv + v;
                        hs[k] = vexp2(ds[i * nv + v] * a2[k]) * hs[k] + dus[i * nv + v] * Bt[s];
                        acc += Ct[s] * hs[k];
                    }
                    ys[i * nv + v] = acc;
                }
            }
            for (long i = 0; i < n; i++)
                for (long v = 0; v < nvb; v++) {
                    const long w = WIDTH(v);
                    vf acc = Dv[v] * load(AT(u, u), w) + ys[i * nv + v];  /* u read again, not kept in a fourth buffer */
                    if (accumulate) acc += load(AT(y, y), w);
                    if (z) {
                        const vf zt = load(AT(z, z), w);
                        acc *= zt * sigmoid(zt);
                    }
                    store(AT(y, y), acc, w);
                }
#undef AT
#undef TOKEN
        }
    for (long v = 0; v < nvb; v++)
        for (long s = 0; s < nstate; s++) store(h + s * dim + v * W, hs[s * nv + v], WIDTH(v));
#undef WIDTH
}

/* arena_selective_scan over a 2D grid of tokens read in place: token t of the sequence is at
 * (t / inner) * outer stride + (t % inner) * inner stride, with 18 strides in floats (batch, outer,
 * inner of u, delta, z, B, C, y). A route through an image in row- or column-major order, forwards
 * or (negative strides from the last token) backwards, is one call. */
int arena_selective_scan_grid(const float *u, const float *dt, const float *z, const float *B, const float *C,
                              const float *At, const float *D, const float *bias, float *y, float *h,
                              const long *strides, long batch, long outer, long inner, long dim, long nstate,
                              long groups, int softplus, int accumulate, int threads) {
    if (nstate > NMAX || groups <= 0 || dim % groups) return 1;
    const long nv = block_vectors(nstate), dg = dim / groups, per_group = (dg + nv * W - 1) / (nv * W);
    const long blocks = batch * groups * per_group;
    const struct strides so = {strides[1], strides[4], strides[7], strides[10], strides[13], strides[16]};
    const struct strides si = {strides[2], strides[5], strides[8], strides[11], strides[14], strides[17]};
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < blocks; i++) {
        const long b = i / (groups * per_group), g = (i / per_group) % groups, k = i % per_group;
        const long c0 = g * dg + k * nv * W, cw = block_channels(dg, k, nv);
#define SCAN_BLOCK(NV, FULL, NS)                                                                                   \
        scan_block(u + b * strides[0] + c0, dt + b * strides[3] + c0, z ? z + b * strides[6] + c0 : NULL,      \
                   B + b * strides[9] + g * nstate, C + b * strides[12] + g * nstate, At + c0, D ? D + c0 : NULL, \
                   bias ? bias + c0 : NULL, y + b * strides[15] + c0, h + b * nstate * dim + c0, so, si, outer,  \
                   inner, dim, NS, softplus, accumulate, cw, NV, FULL)
        BY_BLOCK_SHAPE(SCAN_BLOCK, nv, cw, nstate);
#undef SCAN_BLOCK
    }
    return 0;
}

/* strides: batch and token strides of u, delta, z, B, C, y, in floats (12 numbers). z, D and bias may be NULL.
 * With accumulate, what y holds is added to each token's output before the gate (two directions
 * of one sequence summed and gated in one pass).
 * Returns 0, or 1 when nstate is larger than NMAX or dim is not a multiple of groups. */
int arena_selective_scan(const float *u, const float *dt, const float *z, const float *B, const float *C,
                         const float *At, const float *D, const float *bias, float *y, float *h,
                         const long *strides, long batch, long len, long dim, long nstate, long groups,
                         int softplus, int accumulate, int threads) {
    long grid[18];
    for (int i = 0; i < 6; i++) {  /* one outer step of len tokens */
        grid[3 * i] = strides[2 * i];
        grid[3 * i + 1] = 0;
        grid[3 * i + 2] = strides[2 * i + 1];
    }
    return arena_selective_scan_grid(u, dt, z, B, C, At, D, bias, y, h, grid, batch, 1, len, dim, nstate, groups,
                                     softplus, accumulate, threads);
}

/* VMamba's four routes through a map [batch, h, w, c] (contiguous): row-major, column-major and both
 * backwards, time-major in seq [batch, h * w, 4, c]. Grid cell (i, j) is token i * w + j of route 0,
 * j * h + i of route 1, and the mirror images (len - 1 - t) of those of routes 2 and 3.
 * arena_cross_scan copies the map into every route; arena_cross_merge sums the routes back onto the map,
 * (route 0 + route 2) + (route 1 + route 3) per cell, as the PyTorch formulation adds them. Both walk the
 * cells in one pass (cross_routes), split over (batch, row); merge says which way the data goes. */
static void cross_routes(float *map, float *seq, long batch, long h, long w, long c, int merge, int threads) {
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (long b = 0; b < batch; b++)
        for (long i = 0; i < h; i++)
            for (long j = 0; j < w; j++) {
                const long t0 = i * w + j, t1 = j * h + i, t[4] = {t0, t1, h * w - 1 - t0, h * w - 1 - t1};
                float *cell = map + ((b * h + i) * w + j) * c, *route[4];
                for (int k = 0; k < 4; k++) route[k] = seq + ((b * h * w + t[k]) * 4 + k) * c;
                if (!merge) {
                    for (int k = 0; k < 4; k++) memcpy(route[k], cell, c * sizeof(float));
                    continue;
                }
                for (long ch = 0; ch < c; ch += W) {
                    const long n = c - ch < W ? c - ch : W;
                    const vf rows = load(route[0] + ch, n) + load(route[2] + ch, n);
                    const vf cols = load(route[1] + ch, n) + load(route[3] + ch, n);
                    store(cell + ch, rows + cols, n);
                }
            }
}

/* The map is only read by the scan and the routes only by the merge (the casts drop const for the shared walk). */
void arena_cross_scan(const float *x, float *seq, long batch, long h, long w, long c, int threads) {
    cross_routes((float *)x, seq, batch, h, w, c, 0, threads);
}

void arena_cross_merge(const float *seq, float *out, long batch, long h, long w, long c, int threads) {
    cross_routes(out, (float *)seq, batch, h, w, c, 1, threads);
}

/* Calls body(c, w) for the blocks of W channels in [c0, c1), then for the tail (w < W): with w a constant
 * in the first loop the compiler drops load's and store's partial-width paths, which otherwise cost half
 * the time of a short loop body. */
#define FOR_BLOCKS(c0, c1, body)                                              \
    do {                                                                      \
        long c_ = (c0);                                                       \
        for (; c_ + W <= (c1); c_ += W) body(c_, W);                         \
        if (c_ < (c1)) body(c_, (c1) - c_);                                   \
    } while (0)

/* The calling OpenMP thread's share of dim channels, [*c0, *c1): one contiguous range of whole vectors
 * (the last thread's may end in a partial one), for passes in which each thread sums into its own channels. */
static inline void thread_channels(long dim, long *c0, long *c1) {
    const long blocks = (dim + W - 1) / W, n = omp_get_num_threads(), id = omp_get_thread_num();
    const long end = blocks * (id + 1) / n * W;
    *c0 = blocks * id / n * W;
    *c1 = end < dim ? end : dim;
}

/* Mamba's depthwise conv along the tokens of x [batch, len_in, dim] (any batch and token strides,
 * channels contiguous), w [k, dim] (taps transposed): output token t of channel c is
 *   a[t] = bias[c] + sum_j w[j, c] * x[t + j - pad, c]   (x is 0 outside its len_in tokens).
 * TAP_RANGE gives the taps [j0, j1) whose inputs exist for token t; with xt = x at token t - pad,
 * TAPS4(c, w) is a[t] - bias for the W channels at c where a token has Mamba's four taps (all but the
 * first or last three of a sequence), unrolled (the loop over taps took three times the instructions of
 * its four FMAs), TAPS(c, w) the same for any taps. FOUR_TAPS says which: the callers choose once per
 * token, outside their loop over channels (inside, it cost the plain conv 1.4x). */
#define TAP_RANGE(t) const long j0 = pad - (t) > 0 ? pad - (t) : 0, j1 = len_in + pad - (t) < k ? len_in + pad - (t) : k
#define FOUR_TAPS (k == 4 && j0 == 0 && j1 == 4)
#define TAPS4(c, w) (load(wt + c, w) * load(xt + c, w) + load(wt + dim + c, w) * load(xt + token_stride + c, w) \
                     + (load(wt + 2 * dim + c, w) * load(xt + 2 * token_stride + c, w)                          \
                        + load(wt + 3 * dim + c, w) * load(xt + 3 * token_stride + c, w)))
#define TAPS(c, w) ({ vf a_ = {0};                                                                   \
                      for (long j = j0; j < j1; j++) a_ += load(wt + j * dim + c, w) * load(xt + j * token_stride + c, w); \
                      a_; })

/* out = a, or silu(a) with silu, for the len output tokens, into out [batch, len, dim] (any batch and token
 * strides, channels contiguous); with accumulate the result is added to what out holds. Split over
 * (batch, token). */
void arena_token_conv(const float *x, long batch_stride, long token_stride, const float *wt, const float *bias,
                      float *out, long out_batch_stride, long out_token_stride, long batch, long len_in, long len,
                      long dim, long k, long pad, int silu, int accumulate, int threads) {
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (long b = 0; b < batch; b++)
        for (long t = 0; t < len; t++) {
            TAP_RANGE(t);
            const float *xt = x + b * batch_stride + (t - pad) * token_stride;
            float *o = out + b * out_batch_stride + t * out_token_stride;
#define CONV_BLOCK(c, w, taps)                                                                       \
            {                                                                                        \
                vf a = load(bias + c, w) + taps(c, w);                                               \
                if (silu) a *= sigmoid(a);                                                           \
                if (accumulate) a += load(o + c, w);                                                 \
                store(o + c, a, w);                                                                  \
            }
#define CONV_BLOCK4(c, w) CONV_BLOCK(c, w, TAPS4)
#define CONV_BLOCK_ANY(c, w) CONV_BLOCK(c, w, TAPS)
            if (FOUR_TAPS) FOR_BLOCKS(0, dim, CONV_BLOCK4);
            else FOR_BLOCKS(0, dim, CONV_BLOCK_ANY);
#undef CONV_BLOCK_ANY
#undef CONV_BLOCK4
#undef CONV_BLOCK
        }
}

/* The gradients of arena_token_conv (with or without silu) from g [batch, len, dim] (contiguous), its
 * output's gradient, in one pass over the tokens: with e the gradient of a (g * silu'(a), a recomputed, or g),
 *   dx[s] = sum_j w[j] e[s - j + pad]   written into dx [batch, len_in, dim] (any batch and token strides,
 *                                        channels contiguous), or added to what it holds with accumulate;
 *   dw[j] = sum_{b, t} e[t] x[t + j - pad]   (dwt [k, dim]),   db = sum_{b, t} e[t].
 * Step t computes e[t] (0 past the len outputs) and then dx[t - pad], which needs e[t - k + 1 .. t]: the e
 * of a thread's channels for the last k tokens sit in a ring of k rows. Each thread owns a contiguous
 * range of channels (its rows of the ring, dwt and db stay in its L1 cache), and walks the tokens in order
 * as the forward does. One pass instead of three (the SiLU's gradient, the transposed conv for x, the
 * weights' sums), each of which read and wrote whole [batch, len, dim] tensors that in a training step
 * come from memory: at Vim-Ti's shapes (batch 8, Zen 3) 1.5x faster with the data in cache, 1.5-2.9x
 * without. bias is read only with silu. Returns 0, or 2 when out of memory. */
int arena_token_conv_bwd(const float *x, long batch_stride, long token_stride, const float *wt, const float *bias,
                         const float *g, float *dx, long dx_batch_stride, long dx_token_stride, float *dwt, float *db,
                         long batch, long len_in, long len, long dim, long k, long pad, int silu, int accumulate,
                         int threads) {
    memset(dwt, 0, k * dim * sizeof(float));
    memset(db, 0, dim * sizeof(float));
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        long c0, c1;
        thread_channels(dim, &c0, &c1);
        const long span = (c1 - c0 + W - 1) / W * W;  /* a ring row: the thread's channels, whole vectors */
        float *ring = span ? aligned_alloc(sizeof(vf), k * span * sizeof(float)) : NULL;
        failed = span && !ring;
        const long steps = len > len_in + pad ? len : len_in + pad;  /* outputs past x's reach add to db only */
        for (long b = 0; b < batch && span && !failed; b++)  /* (no channels for a thread beyond the blocks) */
            for (long t = 0; t < steps; t++) {
                TAP_RANGE(t);
                const float *xt = x + b * batch_stride + (t - pad) * token_stride, *gt = g + (b * len + t) * dim;
                float *out = dx + b * dx_batch_stride + (t - pad) * dx_token_stride;
                const float *e_at[NMAX];  /* e[t - i] of the thread's channels, i < i1: dx[t - pad]'s terms */
                const long i1 = t + 1 < k ? t + 1 : k, emit = t >= pad && t - pad < len_in;
                for (long i = 0; i < i1; i++) e_at[i] = ring + ((t - i) % k) * span - c0;
                float *et = (float *)e_at[0];
#define CONV_BWD_BLOCK(c, w, taps, jlo, jhi, ihi)                                                    \
                {                                                                                    \
                    vf e = {0};                                                                      \
                    if (t < len) {                                                                   \
                        e = load(gt + c, w);                                                         \
                        if (silu) {                                                                  \
                            const vf a = load(bias + c, w) + taps(c, w), s = sigmoid(a);             \
                            e *= s * (1.0f + a * (1.0f - s));                                        \
                        }                                                                            \
                        store(db + c, load(db + c, w) + e, w);                                       \
                        for (long j = (jlo); j < (jhi); j++)                                         \
                            store(dwt + j * dim + c, load(dwt + j * dim + c, w) + e * load(xt + j * token_stride + c, w), w); \
                    }                                                                                \
                    store(et + c, e, w);                                                             \
                    if (emit) {                                                                      \
                        vf s = load(wt + c, w) * e;                                                  \
                        for (long i = 1; i < (ihi); i++) s += load(wt + i * dim + c, w) * load(e_at[i] + c, w); \
                        if (accumulate) s += load(out + c, w);                                       \
                        store(out + c, s, w);                                                        \
                    }                                                                                \
                }
/* Mamba's four taps with every input and term there (which makes dx[t - pad] one to emit): constant trip counts */
#define CONV_BWD_BLOCK4(c, w) CONV_BWD_BLOCK(c, w, TAPS4, 0, 4, 4)
#define CONV_BWD_BLOCK_ANY(c, w) CONV_BWD_BLOCK(c, w, TAPS, j0, j1, i1)
                if (FOUR_TAPS && i1 == 4 && t < len) FOR_BLOCKS(c0, c1, CONV_BWD_BLOCK4);
                else FOR_BLOCKS(c0, c1, CONV_BWD_BLOCK_ANY);
#undef CONV_BWD_BLOCK_ANY
#undef CONV_BWD_BLOCK4
#undef CONV_BWD_BLOCK
            }
        free(ring);
    }
    return failed ? 2 : 0;
}
#undef TAPS
#undef TAPS4
#undef FOUR_TAPS
#undef TAP_RANGE

/* y[r, j] = sum_i x[r, i] * wt[i, j] for j < n: a GEMM whose output is at most THIN_MAX vectors wide
 * (Mamba's x projection: 44 columns), where BLAS libraries run far below their square-matrix rate.
 * x rows [rows, k] (row stride x_stride, contiguous within), wt [k, nv * W] (nv = n / W rounded up;
 * zero columns past n), y rows [rows, n] (row stride y_stride). Two rows at a time with every output
 * vector in a register: per input column, nv loads of wt and two broadcasts feed 2 * nv FMAs. */
#define THIN_MAX 8
#define THIN_ROWS(NV)                                                                                \
    static void thin_rows##NV(const float *x0, const float *x1, const float *wt, float *y0, float *y1, \
                              long k, long n) {                                                      \
        vf a0[NV], a1[NV];                                                                           \
        for (int v = 0; v < NV; v++) a0[v] = a1[v] = (vf){0};                                        \
        for (long i = 0; i < k; i++) {                                                               \
            const float b0 = x0[i], b1 = x1[i];                                                      \
            const vf *wv = (const vf *)(wt + i * NV * W);                                            \
            for (int v = 0; v < NV; v++) {                                                           \
                vf wi;                                                                               \
                memcpy(&wi, wv + v, sizeof wi);                                                      \
                a0[v] += b0 * wi;                                                                    \
                a1[v] += b1 * wi;                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int v = 0; v < NV; v++) {                                                               \
            const long w = n - v * W < W ? n - v * W : W;                                            \
            store(y0 + v * W, a0[v], w);                                                             \
            if (y1) store(y1 + v * W, a1[v], w);                                                     \
        }                                                                                            \
    }
THIN_ROWS(1)
THIN_ROWS(2)
THIN_ROWS(3)
THIN_ROWS(4)
THIN_ROWS(5)
THIN_ROWS(6)
THIN_ROWS(7)
THIN_ROWS(8)
#undef THIN_ROWS

/* z[r, j] = sum_i y[r, i] * wt[i, j] for i < k, j < n, two rows at a time: a GEMM with a short inner
 * dimension (Mamba's dt_proj: 12), four output vectors of each row in registers, then one at a time. */
static void short_rows(const float *y0, const float *y1, const float *wt, float *z0, float *z1, long k, long n) {
    long j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
        vf a0[4] = {{0}}, a1[4] = {{0}};
        for (long i = 0; i < k; i++)
            for (int v = 0; v < 4; v++) {
                const vf wi = load(wt + i * n + j + v * W, W);
                a0[v] += y0[i] * wi;
                a1[v] += y1[i] * wi;
            }
        for (int v = 0; v < 4; v++) {
            store(z0 + j + v * W, a0[v], W);
            if (z1) store(z1 + j + v * W, a1[v], W);
        }
    }
    for (; j < n; j += W) {
        const long w = n - j < W ? n - j : W;
        vf a0 = {0}, a1 = {0};
        for (long i = 0; i < k; i++) {
            const vf wi = load(wt + i * n + j, w);
            a0 += y0[i] * wi;
            a1 += y1[i] * wi;
        }
        store(z0 + j, a0, w);
        if (z1) store(z1 + j, a1, w);
    }
}

/* With wt2 [k2, n2] (contiguous) also z = y[:, :k2] @ wt2 into z rows (row stride z_stride), each pair
 * of rows right after its y, still in cache (Mamba's dt = dt_proj(x_proj(u)[:, :dt_rank])).
 * Returns 0, or 1 when n is wider than THIN_MAX vectors or k2 exceeds n. */
int arena_thin_matmul(const float *x, long x_stride, const float *wt, float *y, long y_stride, long rows, long k,
                      long n, const float *wt2, float *z, long z_stride, long k2, long n2, int threads) {
    typedef void (*rows_kernel)(const float *, const float *, const float *, float *, float *, long, long);
    static const rows_kernel kernels[THIN_MAX] = {thin_rows1, thin_rows2, thin_rows3, thin_rows4,
                                                  thin_rows5, thin_rows6, thin_rows7, thin_rows8};
    const long nv = (n + W - 1) / W;
    if (n < 1 || nv > THIN_MAX || (wt2 && k2 > n)) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r += 2) {
        const int pair = r + 1 < rows;
        float *y0 = y + r * y_stride, *y1 = pair ? y + (r + 1) * y_stride : NULL;
        kernels[nv - 1](x + r * x_stride, x + (r + pair) * x_stride, wt, y0, y1, k, n);
        if (wt2) short_rows(y0, pair ? y1 : y0, wt2, z + r * z_stride, pair ? z + (r + 1) * z_stride : NULL, k2, n2);
    }
    return 0;
}
#undef THIN_MAX

/* GELU over n floats, y = GELU(x) (y may be x), or with g its gradient: y = g * GELU'(x). */
void arena_gelu(const float *x, const float *g, float *y, long n, int threads) {
    const long blocks = (n + W - 1) / W;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < blocks; i++) {
        const long c = i * W, w = n - c < W ? n - c : W;
        const vf v = load(x + c, w);
        store(y + c, g ? load(g + c, w) * vgelu_grad(v) : vgelu(v), w);
    }
}

/* The gate y = scale * s * silu(z) over rows of dim channels (z and dz rows strided, the rest contiguous);
 * with grad (y's gradient) instead: the gradient of s into ds (which may be grad) and of z into dz. */
void arena_gate(const float *s, const float *z, long z_stride, const float *grad, float *y_or_ds, float *dz,
                long dz_stride, long rows, long dim, float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
#define GATE_BLOCK(c, w)                                                                             \
        {                                                                                            \
            const long i = r * dim + c;                                                              \
            const vf zt = load(z + r * z_stride + c, w), sz = sigmoid(zt), st = load(s + i, w) * scale; \
            if (!grad) {                                                                             \
                store(y_or_ds + i, st * zt * sz, w);                                                 \
            } else {                                                                                 \
                const vf gt = load(grad + i, w);                                                     \
                store(dz + r * dz_stride + c, gt * st * sz * (1.0f + zt * (1.0f - sz)), w);          \
                store(y_or_ds + i, gt * zt * sz * scale, w);                                         \
            }                                                                                        \
        }
        FOR_BLOCKS(0, dim, GATE_BLOCK);
#undef GATE_BLOCK
    }
}

/* RMSNorm over rows of dim floats (Mamba's): y = x * rstd * wt with rstd = 1 / sqrt(mean(x^2) + eps),
 * one pass per row; rstd [rows] is kept for the gradient. */
void arena_rms_norm(const float *x, const float *wt, float *y, float *rstd, long rows, long dim, float eps,
                    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        vf sq = {0};
#define SQUARES(c, n) { const vf v = load(xr + c, n); sq += v * v; }
        FOR_BLOCKS(0, dim, SQUARES);
#undef SQUARES
        const float inv = 1.0f / __builtin_sqrtf(hsum(sq) / (float)dim + eps);
        rstd[r] = inv;
#define SCALE(c, n) store(y + r * dim + c, load(xr + c, n) * inv * load(wt + c, n), n);
        FOR_BLOCKS(0, dim, SCALE);
#undef SCALE
    }
}

/* ConvNeXt-V2's global response norm in place, for inference: per image of x [batch, pixels, dim]
 * (channels-last rows, contiguous), x *= gamma * g / (mean_c g + eps) + 1 with g[c] the L2 norm of
 * channel c over the pixels; first, in the same pass, bias [dim] is added (unless NULL: a GEMM's bias, added
 * here instead of copied into its output beforehand) and with gelu x = GELU(x) (GELU -> GRN, as UniRepLKNet's
 * blocks run). Two passes per image: each thread sums the squares of its own range of channels down the
 * pixel rows into scale [batch, dim] (the caller's), then the rows are scaled. */
void arena_grn(float *x, const float *gamma, const float *bias, float *scale, long batch, long pixels, long dim,
               float eps, int gelu, int threads) {
    for (long b = 0; b < batch; b++) {
        float *xb = x + b * pixels * dim, *sb = scale + b * dim;
        memset(sb, 0, dim * sizeof(float));
#pragma omp parallel num_threads(threads)
        {
            long c0, c1;
            thread_channels(dim, &c0, &c1);
            for (long p = 0; p < pixels; p++) {
                float *row = xb + p * dim;
#define SQUARES_DOWN(c, w)                                                                           \
                {                                                                                    \
                    vf v = load(row + c, w);                                                         \
                    if (bias) v += load(bias + c, w);                                                \
                    if (gelu) v = vgelu(v);                                                          \
                    if (bias || gelu) store(row + c, v, w);                                          \
                    store(sb + c, load(sb + c, w) + v * v, w);                                       \
                }
                FOR_BLOCKS(c0, c1, SQUARES_DOWN);
#undef SQUARES_DOWN
            }
        }
        float total = 0.0f;
        for (long c = 0; c < dim; c++) total += sb[c] = __builtin_sqrtf(sb[c]);
        const float inv = 1.0f / (total / (float)dim + eps);
        for (long c = 0; c < dim; c++) sb[c] = gamma[c] * sb[c] * inv + 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long p = 0; p < pixels; p++) {
            float *row = xb + p * dim;
#define SCALE_ROW(c, w) store(row + c, load(row + c, w) * load(sb + c, w), w);
            FOR_BLOCKS(0, dim, SCALE_ROW);
#undef SCALE_ROW
        }
    }
}

/* The depthwise 'same' conv of channels-last maps, for inference (stride 1, odd k, no dilation):
 *   y[b, i, j, c] = bias[c] + sum_{p, q < k} wt[p, q, c] * x[b, i + p - k/2, j + q - k/2, c]   (x zero outside)
 * x, y [batch, h, wd, dim] contiguous and distinct, wt [k, k, dim] (the taps first), bias [dim] or NULL;
 * sums [batch, dim], unless NULL, gets each image's per-channel sum of y (SE's pooling) from the same pass.
 * Work unit: one image's block of W channels, copied into an aligned buffer whose rows carry k/2 zero
 * columns before and zeros after, so that the inner loops check no bounds; kernel rows that fall
 * outside the map, and taps whose inputs are all zero columns, are skipped. DW_R neighbouring outputs
 * of a row accumulate in registers, the taps of a kernel row come four at a time, and each input
 * vector is loaded once for the DW_R outputs it reaches: 0.5 loads per FMA instead of the 1 + 1/DW_R of
 * one loop over outputs and one over taps. */
#define DW_R 8
#define DW_TAPS(Q)                                                                                   \
    static inline void dw_taps##Q(vf *acc, const vf *xs, const vf *ws) {                             \
        vf wq[Q];                                                                                    \
        for (int q = 0; q < Q; q++) wq[q] = ws[q];                                                   \
        _Pragma("GCC unroll 16") for (int j = 0; j < DW_R + Q - 1; j++) {                            \
            const vf xv = xs[j];                                                                     \
            _Pragma("GCC unroll 16") for (int r = 0; r < DW_R; r++)                                  \
                if (j - r >= 0 && j - r < Q) acc[r] += xv * wq[j - r];                              \
        }                                                                                            \
    }
DW_TAPS(1)
DW_TAPS(2)
DW_TAPS(3)
DW_TAPS(4)
#undef DW_TAPS

int arena_dwconv(const float *x, const float *wt, const float *bias, float *y, float *sums, long batch, long h,
                 long wd, long dim, long k, int threads) {
    const long pad = k / 2, blocks = (dim + W - 1) / W, tiles = (wd + DW_R - 1) / DW_R;
    const long pw = tiles * DW_R + k - 1;  /* a padded row: k/2 zeros, the row, zeros to the last tile's reach */
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        vf *xp = aligned_alloc(sizeof(vf), h * pw * sizeof(vf)), *wp = aligned_alloc(sizeof(vf), k * k * sizeof(vf));
        failed = !xp || !wp;
#pragma omp for collapse(2) schedule(static)
        for (long b = 0; b < batch; b++)
            for (long cb = 0; cb < blocks; cb++) {
                if (failed) continue;
                const long c = cb * W, w = dim - c < W ? dim - c : W;
                memset(xp, 0, h * pw * sizeof(vf));
                for (long i = 0; i < h; i++)
                    for (long j = 0; j < wd; j++) xp[i * pw + pad + j] = load(x + ((b * h + i) * wd + j) * dim + c, w);
                for (long t = 0; t < k * k; t++) wp[t] = load(wt + t * dim + c, w);
                const vf bv = bias ? load(bias + c, w) : (vf){0};
                vf total = {0};
                for (long i = 0; i < h; i++) {
                    const long p0 = pad - i > 0 ? pad - i : 0, p1 = h + pad - i < k ? h + pad - i : k;
                    for (long j0 = 0; j0 < wd; j0 += DW_R) {
                        const long q0 = pad - j0 - DW_R + 1 > 0 ? pad - j0 - DW_R + 1 : 0;
                        const long q1 = wd + pad - j0 < k ? wd + pad - j0 : k;
                        vf acc[DW_R];
                        for (int r = 0; r < DW_R; r++) acc[r] = bv;
                        for (long p = p0; p < p1; p++) {
                            const vf *xs = xp + (i + p - pad) * pw + j0, *ws = wp + p * k;
                            long q = q0;
                            for (; q + 4 <= q1; q += 4) dw_taps4(acc, xs + q, ws + q);
                            switch (q1 - q) {
                                case 3: dw_taps3(acc, xs + q, ws + q); break;
                                case 2: dw_taps2(acc, xs + q, ws + q); break;
                                case 1: dw_taps1(acc, xs + q, ws + q); break;
                            }
                        }
                        float *out = y + ((b * h + i) * wd + j0) * dim + c;
                        for (long r = 0; r < DW_R && j0 + r < wd; r++) {
                            store(out + r * dim, acc[r], w);
                            total += acc[r];
                        }
                    }
                }
                if (sums) store(sums + b * dim + c, total, w);
            }
        free(xp);
        free(wp);
    }
    return failed ? -1 : 0;
}
#undef DW_R

/* The gradients of arena_rms_norm from y's gradient dy: dx = rstd * wt * dy - x * rstd^3 * mean(wt * dy * x),
 * and wt's, sum over rows of dy * x * rstd, into dw_parts [threads, dim] (zeroed; one row per thread, summed
 * by the caller). */
void arena_rms_norm_bwd(const float *x, const float *wt, const float *rstd, const float *dy, float *dx,
                        float *dw_parts, long rows, long dim, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *dw = dw_parts + omp_get_thread_num() * dim;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            const float *xr = x + r * dim, *gr = dy + r * dim, inv = rstd[r];
            vf dot = {0};
#define DOT(c, n) dot += load(wt + c, n) * load(gr + c, n) * load(xr + c, n);
            FOR_BLOCKS(0, dim, DOT);
#undef DOT
            const float k = inv * inv * inv * hsum(dot) / (float)dim;
#define GRADS(c, n)                                                                                  \
            {                                                                                        \
                const vf xv = load(xr + c, n), gv = load(gr + c, n);                                 \
                store(dx + r * dim + c, inv * load(wt + c, n) * gv - k * xv, n);                     \
                store(dw + c, load(dw + c, n) + gv * xv * inv, n);                                   \
            }
            FOR_BLOCKS(0, dim, GRADS);
#undef GRADS
        }
    }
}

/* Token strides of the gradient's tensors (in floats): its inputs, then the gradients it writes. */
struct bwd_strides { long u, dt, z, b, c, dy, du, ddt, dz, dbc; };

/* The gradient of one block of cw <= nv * W channels, by reverse-mode through the recurrence:
 *   dh_t = C_t * g_t + exp(dt_{t+1} A) * dh_{t+1}       (g: the gradient of y before the gate)
 *   dA += dh_t * dt_t * exp(dt_t A) * h_{t-1}        ddt_t = sum_n dh_t * (A exp(dt_t A) h_{t-1} + u_t B_t)
 *   du_t = sum_n dh_t * dt_t * B_t + g_t * D         dB_t = sum_d dh_t * dt_t * u_t,  dC_t = sum_d g_t * h_t
 * A first pass keeps the state entering every segment of seg_len tokens; then, from the last segment
 * to the first, the segment's states and decays are recomputed into `work` and walked backwards. The terms
 * of dB and dC are added lane by lane into lanes_b and lanes_c [len, nstate] (vectors): the caller sums
 * the lanes once after all of a run's blocks, not every block at every step; dA, dD and dbias are this
 * block's sums over tokens. t counts the scan's steps; st says where step t of each tensor is. Per-vector
 * values are indexed [token][state][vector] (m = nstate * nv per token); nv and full (cw == nv * W) are
 * constants at each call, as in scan_block. */
static inline __attribute__((always_inline)) void
scan_block_bwd(const float *u, const float *dt, const float *z, const float *B, const float *C, const float *At,
               const float *D, const float *bias, const float *dy, float *du, float *ddt, float *dz, float *dA,
               float *dD, float *dbias, struct bwd_strides st, long len, long dim, long nstate, long seg_len,
               int softplus, long cw, const long nv, const int full, vf *work, vf *lanes_b, vf *lanes_c) {
    const long nseg = (len + seg_len - 1) / seg_len, m = nstate * nv, nvb = full ? nv : (cw + W - 1) / W;
    vf *entering = work, *hs = work + nseg * m, *es = hs + seg_len * m, *dts = es + seg_len * m;
    vf *gzs = dts + seg_len * nv, *dzs = gzs + seg_len * nv, *sps = dzs + seg_len * nv;  /* per-token factors */
    vf a[NMAX], a2[NMAX], h[NMAX], dh[NMAX], dAs[NMAX], Dv[VMAX], bv[VMAX], dDs[VMAX], dbs[VMAX];
#define WIDTH(v) (full ? W : vec_width(cw, v))
    for (long v = 0; v < nvb; v++) {
        for (long s = 0; s < nstate; s++) {
            const long k = s * nv + v;
            a[k] = load(At + s * dim + v * W, WIDTH(v));
            a2[k] = a[k] * LOG2E;
            h[k] = dh[k] = dAs[k] = (vf){0};
        }
        Dv[v] = D ? load(D + v * W, WIDTH(v)) : (vf){0};
        bv[v] = bias ? load(bias + v * W, WIDTH(v)) : (vf){0};
        dDs[v] = dbs[v] = (vf){0};
    }
    for (long t = 0; t < (nseg - 1) * seg_len; t++) {  /* the last segment's states are recomputed below */
        if (t % seg_len == 0) memcpy(entering + (t / seg_len) * m, h, m * sizeof(vf));
        for (long v = 0; v < nvb; v++) {
            const vf d = step(dt + t * st.dt + v * W, bv[v], softplus, WIDTH(v));
            const vf du_ = d * load(u + t * st.u + v * W, WIDTH(v));
            for (long s = 0; s < nstate; s++) h[s * nv + v] = vexp2(d * a2[s * nv + v]) * h[s * nv + v] + du_ * B[t * st.b + s];
        }
    }
    if (nseg) memcpy(entering + (nseg - 1) * m, h, m * sizeof(vf));
    for (long seg = nseg - 1; seg >= 0; seg--) {
        const long t0 = seg * seg_len, t1 = t0 + seg_len < len ? t0 + seg_len : len;
        memcpy(h, entering + seg * m, m * sizeof(vf));
        /* The segment's per-token factors first, each token independent of the others (the core
         * overlaps their long chains of exp, log and division), then the recurrence and the walk back. */
        for (long t = t0; t < t1; t++) {
            for (long v = 0; v < nvb; v++) {
                const long j = (t - t0) * nv + v;
                const vf x = load(dt + t * st.dt + v * W, WIDTH(v)) + bv[v];
                dts[j] = x;
                if (softplus) {  /* softplus and its derivative, sigmoid, from one exponential */
                    const vf e = vexp_neg_abs(x), r = 1.0f / (1.0f + e);
                    dts[j] = vsoftplus_e(x, e);
                    sps[j] = blend(x > 0.0f, r, e * r);
                }
                if (z) {
                    const vf zt = load(z + t * st.z + v * W, WIDTH(v)), sz = sigmoid(zt);
                    gzs[j] = zt * sz;                       /* silu(z), the gate */
                    dzs[j] = sz * (1.0f + zt * (1.0f - sz));  /* silu'(z) */
                }
            }
        }
        for (long t = t0; t < t1; t++) {
            for (long v = 0; v < nvb; v++) {
                const vf d = dts[(t - t0) * nv + v], du_ = d * load(u + t * st.u + v * W, WIDTH(v));
                for (long s = 0; s < nstate; s++) {
                    const long k = s * nv + v, i = (t - t0) * m + k;
                    es[i] = vexp2(d * a2[k]);
                    hs[i] = h[k] = es[i] * h[k] + du_ * B[t * st.b + s];
                }
            }
        }
        for (long t = t1 - 1; t >= t0; t--) {
            const vf *ht = hs + (t - t0) * m, *et = es + (t - t0) * m;
            const vf *hp = t > t0 ? ht - m : entering + seg * m;
            const float *Bt = B + t * st.b, *Ct = C + t * st.c;
            vf *lb = lanes_b + t * nstate, *lc = lanes_c + t * nstate;
            for (long v = 0; v < nvb; v++) {
                const long j = (t - t0) * nv + v, w = WIDTH(v);
                const vf d = dts[j], ut = load(u + t * st.u + v * W, w), du_ = d * ut;
                vf g = load(dy + t * st.dy + v * W, w);
                if (z) {
                    vf y = Dv[v] * ut;
                    for (long s = 0; s < nstate; s++) y += Ct[s] * ht[s * nv + v];
                    store(dz + t * st.dz + v * W, g * y * dzs[j], w);
                    g *= gzs[j];
                }
                vf dd = {0}, q = {0};  /* q = sum_n dh_t B_t: shared by du_t (times dt_t) and ddt_t (times u_t) */
                for (long s = 0; s < nstate; s++) {
                    const long k = s * nv + v;
                    dh[k] += Ct[s] * g;
                    q += dh[k] * Bt[s];
                    lb[s] += dh[k] * du_;
                    lc[s] += g * ht[k];
                    dh[k] *= et[k];  /* now dh_t exp(dt_t A), the part carried to step t - 1 */
                    const vf dhe = dh[k] * hp[k];
                    dAs[k] += dhe * d;
                    dd += dhe * a[k];
                }
                const vf dx = g * Dv[v] + d * q;
                dd += ut * q;
                if (softplus) dd *= sps[j];
                dDs[v] += g * ut;
                dbs[v] += dd;
                store(du + t * st.du + v * W, dx, w);
                store(ddt + t * st.ddt + v * W, dd, w);
            }
        }
    }
    for (long v = 0; v < nvb; v++) {
        for (long s = 0; s < nstate; s++) store(dA + s * dim + v * W, dAs[s * nv + v], WIDTH(v));
        if (dD) store(dD + v * W, dDs[v], WIDTH(v));
        if (dbias) store(dbias + v * W, dbs[v], WIDTH(v));
    }
#undef WIDTH
}

/* strides: batch and token strides (in floats) of u, delta, z, B, C, dy, du, ddelta, dz and of dB/dC
 * (20 numbers; channels, and states within a group, contiguous), as the forward takes them:
 * a negative token stride walks a sequence backwards. u, delta, z, dy [batch, len, dim] and du,
 * ddelta, dz the same; B, C [batch, len, groups, nstate]; dB, dC [parts, batch, len, groups, nstate]:
 * the channel blocks of a group are split into `parts` runs (1 to dim / groups / W rounded up), each
 * summing its blocks' dB and dC into its own part (at p * (dB's batch stride) * batch), so parts
 * can run in parallel; dA [batch, nstate, dim]; dD, dbias [batch, dim]. z/dz, D/dD and bias/dbias
 * may be NULL together.
 * Returns 0, 1 when nstate is larger than NMAX or dim is not a multiple of groups, 2 when out of memory. */
int arena_selective_scan_bwd(const float *u, const float *dt, const float *z, const float *B, const float *C,
                             const float *At, const float *D, const float *bias, const float *dy,
                             float *du, float *ddt, float *dz, float *dB, float *dC, float *dA, float *dD,
                             float *dbias, const long *strides, long batch, long len, long dim, long nstate,
                             long groups, long parts, int softplus, int threads) {
    if (nstate > NMAX || groups <= 0 || dim % groups) return 1;
    const long dg = dim / groups, per_group = (dg + W - 1) / W, tasks = batch * groups * parts;
    if (parts < 1 || parts > per_group) return 1;
    /* segments as long as the buffer allows (a short sequence is one segment: no first pass), at least 32 tokens */
    const long max_seg = SEG_BYTES / (2 * nstate * (long)sizeof(vf)), seg_len = max_seg > 32 ? max_seg : 32;
    /* wide blocks while a wide block's states, decays and factors stay within WIDE_BYTES: beyond, their
     * misses cost more than the wide walk gains (VMamba-T's first stage: 4.8 MB, 0.85x) */
    const long per_token = (2 * nstate + 4) * VMAX * (long)sizeof(vf);
    const long nv = (len < seg_len ? len : seg_len) * per_token <= WIDE_BYTES ? block_vectors(nstate) : 1;
    const long blocks = (dg + nv * W - 1) / (nv * W);  /* a group's blocks */
    const long nseg = (len + seg_len - 1) / seg_len;
    const size_t work_bytes = ((nseg + 2 * seg_len) * nstate + 4 * seg_len) * nv * sizeof(vf);
    const size_t lanes_bytes = (size_t)len * nstate * sizeof(vf);
    const struct bwd_strides st = {strides[1], strides[3], strides[5], strides[7], strides[9], strides[11],
                                   strides[13], strides[15], strides[17], strides[19]};
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|: failed)
    {
        vf *work = aligned_alloc(sizeof(vf), work_bytes), *lanes = aligned_alloc(sizeof(vf), 2 * lanes_bytes);
        failed = work == NULL || lanes == NULL;
#pragma omp for schedule(static)
        for (long i = 0; i < tasks; i++) {
            if (failed) continue;
            const long b = i / (groups * parts), g = (i / parts) % groups, p = i % parts, gs = g * nstate;
            const long bc = b * strides[18] + gs + p * strides[18] * batch;
            vf *lanes_b = lanes, *lanes_c = lanes + len * nstate;
            memset(lanes, 0, 2 * lanes_bytes);
            for (long k = p * blocks / parts; k < (p + 1) * blocks / parts; k++) {  /* none for some parts of a
                                                                                   narrow group: their lanes are 0 */
                const long c0 = g * dg + k * nv * W, cw = block_channels(dg, k, nv);
#define SCAN_BLOCK_BWD(NV, FULL, NS)                                                                              \
                scan_block_bwd(u + b * strides[0] + c0, dt + b * strides[2] + c0, z ? z + b * strides[4] + c0 : NULL, \
                               B + b * strides[6] + gs, C + b * strides[8] + gs, At + c0, D ? D + c0 : NULL,       \
                               bias ? bias + c0 : NULL, dy + b * strides[10] + c0, du + b * strides[12] + c0,      \
                               ddt + b * strides[14] + c0, dz ? dz + b * strides[16] + c0 : NULL,                  \
                               dA + b * nstate * dim + c0, dD ? dD + b * dim + c0 : NULL,                          \
                               dbias ? dbias + b * dim + c0 : NULL, st, len, dim, NS, seg_len, softplus,      \
                               cw, NV, FULL, work, lanes_b, lanes_c)
                BY_BLOCK_SHAPE(SCAN_BLOCK_BWD, nv, cw, nstate);
#undef SCAN_BLOCK_BWD
            }
            for (long t = 0; t < len; t++) {
                lane_sums(lanes_b + t * nstate, nstate, dB + bc + t * st.dbc);
                lane_sums(lanes_c + t * nstate, nstate, dC + bc + t * st.dbc);
            }
        }
        free(work);
        free(lanes);
    }
    return failed ? 2 : 0;
}

/* One decode step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3) in float32, for flywheel's engine.
 *
 * Why: at batch 16 a 5M-parameter model's decode step is ~30 small torch ops per layer, each an OpenMP fork/join
 * and a dispatch, around GEMMs of 16 rows that stream every weight from memory. This file runs the whole step
 * (embedding, every layer, final norm, LM head) inside one OpenMP parallel region: one call, a barrier between
 * phases, and a GEMM kernel that reads each weight once per step, from panels laid out in the order it reads them.
 * The arithmetic is that of engine/compact.py (and so of HF's LlamaForCausalLM.forward) up to float32 rounding;
 * tests/test_engine_native.py checks it against both.
 *
 * Built at first use by engine/native.py (cc -O3 -march=native -fopenmp); the OpenMP runtime it links is the one
 * torch has loaded (same soname), so both share one thread pool.
 *
 * Layouts (all float32, C-contiguous):
 *   panels of a linear with N outputs and K inputs: (ceil(N/16), K, 16); panel p, row k holds W[16p .. 16p+15, k]
 *   cache: (B, L, 2*Hkv, S, D): per row and layer, the k heads then the v heads of every slot (rows outermost, so
 *          the first B rows of a larger cache are a valid cache)
 *   rope: (positions, 2, D): cos, then signed sin (rotate_half(x) * sin == roll(x, D/2) * signed sin)
 *   bias: (B, S) additive attention bias (0 or -inf); logits: (B, V)
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads and stores */
typedef int v8i __attribute__((vector_size(32)));

#define NR 16 /* panel width: two 8-float vectors */
#define MR 6  /* rows per GEMM micro-tile: 12 accumulators + 2 weight vectors fit in 16 AVX registers */

enum { P_LN1, P_QKV, P_QKV_B, P_O, P_O_B, P_LN2, P_GU, P_GU_B, P_DOWN, P_DOWN_B, P_QNORM, P_KNORM, P_COUNT };
enum { D_LAYERS, D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_FFN, D_VOCAB, D_COUNT };

int fw_abi_version(void) { return 2; }

static inline v8 load8(const float *p) { return *(const v8u *)p; }
static inline void store8(float *p, v8 v) { *(v8u *)p = v; }

/* exp of 8 floats. AVX2: Cephes' expf (range reduction by ln 2, degree-5 polynomial, 2^n from the exponent
 * bits), within 2 ulp of libm's expf on [-87, 88]; below that it returns ~0, as expf underflows. */
static inline v8 exp8(v8 x) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 v = _mm256_max_ps(_mm256_min_ps((__m256)x, _mm256_set1_ps(88.3762626647949f)),
                             _mm256_set1_ps(-87.3365478515625f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    v = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), v);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(v, v), _mm256_add_ps(v, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return (v8)_mm256_mul_ps(y, _mm256_castsi256_ps(e));
#else
    v8 out;
    for (int i = 0; i < 8; i++) out[i] = expf(x[i]);
    return out;
#endif
}

/* y[r, 0:ncols] (=|+=) x[r, :] . panel + bias for r < mr. Constant mr after inlining: the accumulators live in
 * registers. */
static inline __attribute__((always_inline)) void tile(const int mr, const float *x, int ldx, const float *panel,
                                                       int k_dim, float *y, int ldy, int ncols, const float *bias,
                                                       int accumulate) {
    v8 acc[MR][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = (v8){0};
    for (int k = 0; k < k_dim; k++) {
        const v8 w0 = load8(panel + (size_t)k * NR), w1 = load8(panel + (size_t)k * NR + 8);
        for (int r = 0; r < mr; r++) {
            const float xv = x[(size_t)r * ldx + k];
            acc[r][0] += xv * w0;
            acc[r][1] += xv * w1;
        }
    }
    for (int r = 0; r < mr; r++) {
        float out[NR];
        store8(out, acc[r][0]);
        store8(out + 8, acc[r][1]);
        float *row = y + (size_t)r * ldy;
        for (int j = 0; j < ncols; j++) {
            const float v = bias ? out[j] + bias[j] : out[j]; /* HF: (x @ W.T + b), then the residual add */
            row[j] = accumulate ? row[j] + v : v;
        }
    }
}

/* y (m, n) (=|+=) x (m, k) @ W.T + b, W given as panels. Called inside a parallel region: the panels are shared
 * out among the threads, each reading its own weights once for all m rows. */
static void linear(const float *x, int m, int k_dim, const float *panels, const float *bias, int n, float *y,
                   int accumulate) {
    const int n_panels = (n + NR - 1) / NR;
#pragma omp for schedule(static)
    for (int p = 0; p < n_panels; p++) {
        const float *panel = panels + (size_t)p * k_dim * NR;
        const int ncols = n - p * NR < NR ? n - p * NR : NR;
        const float *b = bias ? bias + p * NR : NULL;
        float *out = y + p * NR;
        int r = 0;
        for (; r + MR <= m; r += MR) tile(MR, x + (size_t)r * k_dim, k_dim, panel, k_dim, out + (size_t)r * n, n, ncols, b, accumulate);
        const float *xr = x + (size_t)r * k_dim;
        float *yr = out + (size_t)r * n;
        switch (m - r) {
            case 5: tile(5, xr, k_dim, panel, k_dim, yr, n, ncols, b, accumulate); break;
            case 4: tile(4, xr, k_dim, panel, k_dim, yr, n, ncols, b, accumulate); break;
            case 3: tile(3, xr, k_dim, panel, k_dim, yr, n, ncols, b, accumulate); break;
            case 2: tile(2, xr, k_dim, panel, k_dim, yr, n, ncols, b, accumulate); break;
            case 1: tile(1, xr, k_dim, panel, k_dim, yr, n, ncols, b, accumulate); break;
            default: break;
        }
    }
}

/* out = x * rsqrt(mean(x^2) + eps) * w over n values (LlamaRMSNorm in float32). */
static inline void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static void rms_norm_rows(const float *x, const float *w, int rows, int n, float eps, float *out) {
#pragma omp for schedule(static)
    for (int r = 0; r < rows; r++) rms_norm(x + (size_t)r * n, w, n, eps, out + (size_t)r * n);
}

/* In place: v[d] = v[d] * cos[d] + v[(d + D/2) % D] * sin[d] (HF's x * cos + rotate_half(x) * sin). */
static inline void rope(float *v, const float *cos, const float *sin, int d_head, float *tmp) {
    const int half = d_head / 2;
    for (int d = 0; d < d_head; d++) tmp[d] = v[d];
    for (int d = 0; d < d_head; d++) v[d] = tmp[d] * cos[d] + tmp[d < half ? d + half : d - half] * sin[d];
}

/* Scratch floats fw_step needs for a batch of b rows, nthreads threads and s cache slots. */
long fw_scratch_floats(const int *dims, int b, int s, int nthreads) {
    const long h = dims[D_HIDDEN], hq = dims[D_HEADS], hkv = dims[D_KV_HEADS], d = dims[D_HEAD_DIM];
    const long f = dims[D_FFN];
    return b * h * 2 + b * (hq + 2 * hkv) * d + b * hq * d + b * 2 * f + b * f + (long)nthreads * (s + d);
}

/* One decode step: append tokens (B,) at slot n (positions pos (B,)) and write the next-token logits (B, V).
 * layer_ptrs: P_COUNT pointers per layer (NULL for an absent bias or q/k norm); windows: per layer, the sliding
 * window in slots (0 = full attention); lo: no row attends to a slot before it. Returns 0. */
int fw_step(const int *dims, float eps, float scale, const float *const *layer_ptrs, const int *windows,
            const float *embed, const float *final_norm, const float *lm_panels, const float *lm_bias,
            const float *rope_table, const int64_t *tokens, const int64_t *pos, int b, float *cache, int s,
            const float *attn_bias, int lo_all, int n, float *scratch, float *logits, int nthreads) {
    const int n_layers = dims[D_LAYERS], hidden = dims[D_HIDDEN], hq = dims[D_HEADS], hkv = dims[D_KV_HEADS];
    const int d_head = dims[D_HEAD_DIM], ffn = dims[D_FFN], vocab = dims[D_VOCAB];
    const int n_qkv = (hq + 2 * hkv) * d_head, group = hq / hkv;
    float *x = scratch;                        /* (B, hidden) residual stream */
    float *h = x + (size_t)b * hidden;         /* (B, hidden) normed */
    float *qkv = h + (size_t)b * hidden;       /* (B, n_qkv) */
    float *att = qkv + (size_t)b * n_qkv;      /* (B, hq * D) */
    float *gu = att + (size_t)b * hq * d_head; /* (B, 2 * ffn) */
    float *act = gu + (size_t)b * 2 * ffn;     /* (B, ffn) */
    float *per_thread = act + (size_t)b * ffn; /* nthreads * (S + D): attention scores and a RoPE buffer */
    const size_t layer_stride = (size_t)2 * hkv * s * d_head, row_stride = (size_t)n_layers * layer_stride;
    const size_t head_stride = (size_t)s * d_head;

#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        float *scores = per_thread + (size_t)tid * (s + d_head), *tmp = scores + s;
#pragma omp for schedule(static)
        for (int r = 0; r < b; r++)
            for (int i = 0; i < hidden; i++) x[(size_t)r * hidden + i] = embed[(size_t)tokens[r] * hidden + i];

        for (int l = 0; l < n_layers; l++) {
            const float *const *p = layer_ptrs + (size_t)l * P_COUNT;
            float *kv = cache + l * layer_stride; /* row r of this layer: kv + r * row_stride */
            rms_norm_rows(x, p[P_LN1], b, hidden, eps, h);
            linear(h, b, hidden, p[P_QKV], p[P_QKV_B], n_qkv, qkv, 0);
            /* q/k norm (Qwen3), RoPE on q and k, then k and v into the cache at slot n */
#pragma omp for schedule(static)
            for (int t = 0; t < b * (hq + hkv); t++) {
                const int r = t / (hq + hkv), head = t % (hq + hkv);
                float *v = qkv + (size_t)r * n_qkv + (size_t)head * d_head;
                const float *norm_w = head < hq ? p[P_QNORM] : p[P_KNORM];
                if (norm_w) rms_norm(v, norm_w, d_head, eps, v);
                const float *cs = rope_table + (size_t)pos[r] * 2 * d_head;
                rope(v, cs, cs + d_head, d_head, tmp);
                if (head >= hq) {
                    const int g = head - hq;
                    float *kslot = kv + r * row_stride + g * head_stride + (size_t)n * d_head;
                    float *vslot = kv + r * row_stride + (hkv + g) * head_stride + (size_t)n * d_head;
                    const float *vsrc = qkv + (size_t)r * n_qkv + (size_t)(hq + hkv + g) * d_head;
                    for (int d = 0; d < d_head; d++) {
                        kslot[d] = v[d];
                        vslot[d] = vsrc[d];
                    }
                }
            }
            /* attention of one query per row and head over slots lo..n */
            const int lo_window = windows[l] > 0 ? n - windows[l] + 1 : 0;
            const int lo = lo_window > lo_all ? lo_window : lo_all;
#pragma omp for schedule(static)
            for (int t = 0; t < b * hq; t++) {
                const int r = t / hq, head = t % hq, g = head / group;
                const float *q = qkv + (size_t)r * n_qkv + (size_t)head * d_head;
                const float *keys = kv + r * row_stride + g * head_stride;
                const float *values = kv + r * row_stride + (hkv + g) * head_stride;
                const float *mask = attn_bias + (size_t)r * s;
                int first = lo;
                while (first < n && mask[first] == -INFINITY) first++; /* left padding: never attended */
                float best = -INFINITY;
                for (int j = first; j <= n; j++) {
                    const float *kj = keys + (size_t)j * d_head;
                    float dot = 0.0f;
                    if (d_head % 8 == 0) {
                        v8 acc = (v8){0};
                        for (int d = 0; d < d_head; d += 8) acc += load8(q + d) * load8(kj + d);
                        for (int i = 0; i < 8; i++) dot += acc[i];
                    } else {
                        for (int d = 0; d < d_head; d++) dot += q[d] * kj[d];
                    }
                    const float sc = dot * scale + mask[j];
                    scores[j] = sc;
                    if (sc > best) best = sc;
                }
                float total = 0.0f;
                int j = first;
                for (; j + 8 <= n + 1; j += 8) {
                    const v8 sc = load8(scores + j);
                    v8 e = exp8(sc - best);
                    e = (v8)((sc != -INFINITY) & (v8i)e); /* masked slots: exactly 0 */
                    store8(scores + j, e);
                    for (int i = 0; i < 8; i++) total += e[i];
                }
                for (; j <= n; j++) {
                    const float e = scores[j] == -INFINITY ? 0.0f : expf(scores[j] - best);
                    scores[j] = e;
                    total += e;
                }
                float *out = att + (size_t)r * hq * d_head + (size_t)head * d_head;
                for (int d = 0; d < d_head; d++) out[d] = 0.0f;
                for (int j = first; j <= n; j++) {
                    const float pj = scores[j] / total;
                    if (pj == 0.0f) continue;
                    const float *vj = values + (size_t)j * d_head;
                    for (int d = 0; d < d_head; d++) out[d] += pj * vj[d];
                }
            }
            linear(att, b, hq * d_head, p[P_O], p[P_O_B], hidden, x, 1);
            rms_norm_rows(x, p[P_LN2], b, hidden, eps, h);
            linear(h, b, hidden, p[P_GU], p[P_GU_B], 2 * ffn, gu, 0);
#pragma omp for schedule(static)
            for (int r = 0; r < b; r++) {
                const float *gate = gu + (size_t)r * 2 * ffn, *up = gate + ffn;
                float *a = act + (size_t)r * ffn;
                int i = 0; /* silu(g) * u */
                for (; i + 8 <= ffn; i += 8) {
                    const v8 g = load8(gate + i);
                    store8(a + i, g / (1.0f + exp8(-g)) * load8(up + i));
                }
                for (; i < ffn; i++) a[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
            }
            linear(act, b, ffn, p[P_DOWN], p[P_DOWN_B], hidden, x, 1);
        }
        rms_norm_rows(x, final_norm, b, hidden, eps, h);
        linear(h, b, hidden, lm_panels, lm_bias, vocab, logits, 0);
    }
    return 0;
}

/* Speed3R block-sparse attention for one chunk of query blocks (fp32, CPU).
 *
 * Per head and query block: the block's queries attend, in one online softmax, to the
 * "always" keys shared by every block (may be none), then to all tokens of the block's selected
 * key blocks, then to at most one pseudo-key per block given by its attention result and
 * log-sum-exp (the training-free op's pooled part; may be none). The normalised result is
 * written straight to the query tokens' rows of the output. This replaces, in the eager twin
 * (spark3r.accel.speed3r.training_free_attention / models.layers.sparse_attention), the gather
 * of every selected block into a contiguous tile, SDPA on 16-query tiles (slow per FLOP on
 * CPU), the log-sum-exp merge of the partial results and the scatter to token order.
 *
 * Layout: queries, keys and values come block-major, [heads][blocks][bt][d] contiguous (the
 * gathers the op already makes for pooling), so a tile of keys is rows at a fixed stride and
 * the selected blocks are read where they are. The always keys are [heads][A][d] contiguous.
 *
 * Micro-kernel: VL queries per tile, one per vector lane, against KT keys: logits as KT vector
 * accumulators (query lanes x key registers), softmax statistics per lane (vertical ops only),
 * the output kept transposed ([d][VL], in L1) and updated with broadcast values. exp2 is a
 * degree-7 polynomial (relative error ~1e-9 before fp32 rounding); everything in fp32, the
 * result of a query does not depend on threading.
 */
#pragma GCC optimize("fp-contract=fast") /* -std=c11 turns contraction off; the kernel wants FMAs */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16 /* queries per tile = vector lanes */
#define KT 16 /* keys per tile */
#define CG 8  /* output columns updated together (independent FMA chains) */
#else
#define VL 8
#define KT 8
#define CG 4
#endif
#define DMAX 256 /* largest head size (spark3r.accel.native checks it) */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

static inline vf vsplat(float x) { return (vf){0} + x; }

static inline vf vmax(vf a, vf b) {
    vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

/* 2^x for x <= 0 (exactly 0 below -126, -inf included). */
static inline vf vexp2(vf x) {
    vi keep = x > -126.0f;
    x = vmax(x, vsplat(-126.0f));
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    vf t = x + magic;
    vf f = x - (t - magic); /* in [-0.5, 0.5] */
    vi e = (((vi)t - 0x4B400000) + 127) << 23;
    vf p = vsplat(1.5252733804059841e-05f);
    p = p * f + 1.5403530393381606e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.6181291076284772e-03f;
    p = p * f + 5.5504108664821580e-02f;
    p = p * f + 2.4022650695910071e-01f;
    p = p * f + 6.9314718055994531e-01f;
    p = p * f + 1.0f;
    return (vf)((vi)(p * (vf)e) & keep);
}

/* Running state of one query tile: max and sum of exp2 in log2 units per lane, output [d][VL]. */
typedef struct {
    vf m, l;
    vf o[DMAX];
} state_t;

/* One tile of KT keys at rows k, k + d, ... (values likewise). bias: NULL or KT additive
 * logits (0 or -inf, for padding). sc = softmax scale * log2(e). */
static inline __attribute__((always_inline)) void attend_tile(const vf *restrict qt, const float *restrict k,
                                                              const float *restrict v, const int d,
                                                              const float *bias, float sc, state_t *restrict st) {
    vf s[KT];
#pragma GCC unroll 16
    for (int j = 0; j < KT; ++j) s[j] = vsplat(0.0f);
    for (int c = 0; c < d; ++c) {
        vf qc = qt[c];
#pragma GCC unroll 16
        for (int j = 0; j < KT; ++j) s[j] += qc * k[j * d + c];
    }
    vf mx = st->m;
#pragma GCC unroll 16
    for (int j = 0; j < KT; ++j) {
        s[j] *= sc;
        if (bias) s[j] += bias[j];
        mx = vmax(mx, s[j]);
    }
    vf alpha = vexp2(st->m - mx);
    st->m = mx;
    vf sum = vsplat(0.0f);
#pragma GCC unroll 16
    for (int j = 0; j < KT; ++j) {
        s[j] = vexp2(s[j] - mx);
        sum += s[j];
    }
    st->l = st->l * alpha + sum;
    for (int c = 0; c < d; c += CG) {
        vf acc[CG];
#pragma GCC unroll 8
        for (int u = 0; u < CG; ++u) acc[u] = st->o[c + u] * alpha;
#pragma GCC unroll 16
        for (int j = 0; j < KT; ++j)
#pragma GCC unroll 8
            for (int u = 0; u < CG; ++u) acc[u] += s[j] * v[j * d + c + u];
#pragma GCC unroll 8
        for (int u = 0; u < CG; ++u) st->o[c + u] = acc[u];
    }
}

/* rows keys (and values) at k, v with row stride d; valid: NULL or rows flags. */
static inline __attribute__((always_inline)) void attend_rows(const vf *restrict qt, const float *k, const float *v,
                                                              int64_t rows, const uint8_t *valid, const int d,
                                                              float sc, state_t *restrict st) {
    float kpad[KT * DMAX] __attribute__((aligned(64)));
    float vpad[KT * DMAX] __attribute__((aligned(64)));
    float bias[KT];
    for (int64_t r = 0; r < rows; r += KT) {
        int n = rows - r < KT ? (int)(rows - r) : KT;
        int all = n == KT, any = 0;
        for (int j = 0; j < n; ++j) {
            int ok = !valid || valid[r + j];
            all &= ok;
            any |= ok;
        }
        if (!any) continue; /* a fully masked tile would make the running max -inf */
        if (all) {
            attend_tile(qt, k + r * d, v + r * d, d, NULL, sc, st);
            continue;
        }
        memset(kpad, 0, sizeof(float) * KT * d);
        memset(vpad, 0, sizeof(float) * KT * d);
        for (int j = 0; j < KT; ++j) {
            int ok = j < n && (!valid || valid[r + j]);
            bias[j] = ok ? 0.0f : -__builtin_inff();
            if (ok) {
                memcpy(kpad + j * d, k + (r + j) * d, sizeof(float) * d);
                memcpy(vpad + j * d, v + (r + j) * d, sizeof(float) * d);
            }
        }
        attend_tile(qt, kpad, vpad, d, bias, sc, st);
    }
}

typedef struct {
    const float *qb, *kb, *vb;      /* [G][blocks][bt][d] */
    int64_t blocks, bt;
    const uint8_t *key_valid;       /* [blocks][bt] or NULL */
    const float *always_k, *always_v; /* [G][always][d] or NULL */
    int64_t always;
    int64_t groups, first, count;   /* query blocks first .. first + count - 1 of every head */
    const int64_t *selected;        /* [G][count][top] key block rows */
    int64_t top;
    const float *extra_out, *extra_lse; /* [G][count][d], [G][count] or NULL */
    const int64_t *query_tokens;    /* [blocks][bt] output token of every query slot, or NULL: block-major order */
    const uint8_t *query_valid;     /* [blocks][bt] or NULL */
    float *out;
    int64_t heads, out_batch, out_head, out_token; /* strides of out [B][H][N][d] */
    float scale;
} args_t;

static inline __attribute__((always_inline)) void run_item(const args_t *a, int64_t item, const int d) {
    int64_t g = item / a->count, local = item % a->count, m = a->first + local, bt = a->bt;
    const float *q = a->qb + (g * a->blocks + m) * bt * d;
    const float sc = a->scale * LOG2E;
    vf qt[DMAX];
    state_t st;
    float *dst_head = a->out + (g / a->heads) * a->out_batch + (g % a->heads) * a->out_head;
    for (int64_t qs = 0; qs < bt; qs += VL) {
        int nq = bt - qs < VL ? (int)(bt - qs) : VL;
        for (int c = 0; c < d; ++c) {
            float lanes[VL] __attribute__((aligned(64)));
            for (int i = 0; i < VL; ++i) lanes[i] = i < nq ? q[(qs + i) * d + c] : 0.0f;
            memcpy(&qt[c], lanes, sizeof lanes);
        }
        st.m = vsplat(-__builtin_inff());
        st.l = vsplat(0.0f);
        for (int c = 0; c < d; ++c) st.o[c] = vsplat(0.0f);
        if (a->always)
            attend_rows(qt, a->always_k + g * a->always * d, a->always_v + g * a->always * d, a->always, NULL, d, sc,
                        &st);
        const int64_t *sel = a->selected + (g * a->count + local) * a->top;
        for (int64_t t = 0; t < a->top; ++t) {
            int64_t blk = sel[t];
            const int64_t off = (g * a->blocks + blk) * bt * d;
            attend_rows(qt, a->kb + off, a->vb + off, bt, a->key_valid ? a->key_valid + blk * bt : NULL, d, sc, &st);
        }
        vf inv;
        if (a->extra_out) {
            /* The pooled part as one more key: logit = its log-sum-exp, value = its output. */
            const float *eo = a->extra_out + (g * a->count + local) * d;
            vf e = vsplat(a->extra_lse[g * a->count + local] * LOG2E);
            vf mx = vmax(st.m, e);
            vf alpha = vexp2(st.m - mx), beta = vexp2(e - mx);
            st.l = st.l * alpha + beta;
            for (int c = 0; c < d; ++c) st.o[c] = st.o[c] * alpha + beta * eo[c];
        }
        inv = vsplat(1.0f) / st.l;
        float res[DMAX][VL] __attribute__((aligned(64)));
        for (int c = 0; c < d; ++c) {
            vf r = st.o[c] * inv;
            memcpy(res[c], &r, sizeof r);
        }
        for (int i = 0; i < nq; ++i) {
            int64_t slot = m * bt + qs + i;
            if (a->query_valid && !a->query_valid[slot]) continue;
            int64_t token = a->query_tokens ? a->query_tokens[slot] : slot;
            float *dst = dst_head + token * a->out_token;
            for (int c = 0; c < d; ++c) dst[c] = res[c][i];
        }
    }
}

void spark3r_block_attention_f32(const float *qb, const float *kb, const float *vb, int64_t blocks, int64_t bt,
                                 int64_t d, const uint8_t *key_valid, const float *always_k, const float *always_v,
                                 int64_t always, int64_t groups, int64_t first, int64_t count,
                                 const int64_t *selected, int64_t top, const float *extra_out,
                                 const float *extra_lse, const int64_t *query_tokens, const uint8_t *query_valid,
                                 float *out, int64_t heads, int64_t out_batch, int64_t out_head, int64_t out_token,
                                 float scale) {
    args_t a = {qb, kb, vb, blocks, bt, key_valid, always_k, always_v, always, groups, first, count, selected, top,
                extra_out, extra_lse, query_tokens, query_valid, out, heads, out_batch, out_head, out_token, scale};
    int64_t total = groups * count;
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < total; ++item) {
        /* The common head size spelled out so the tile loops are unrolled with constant offsets. */
        if (d == 64)
            run_item(&a, item, 64);
        else
            run_item(&a, item, (int)d);
    }
}

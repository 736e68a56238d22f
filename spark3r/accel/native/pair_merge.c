/* Spark3R 2x2 -> 2 query merge in one pass over the queries (fp32, CPU).
 *
 * For every head and every full 2x2 group it reads the four member queries once, picks the
 * split into two pairs with the least squared merge error (signs of <m0-m3, m1-m2> and
 * <m0-m2, m1-m3>, see spark3r.accel.spark3r.pair_choice) and writes the two pair means. The
 * eager PyTorch path does the same in ~8 passes over memory; on CPU those passes cost as much
 * as a sixth of the reduced attention they prepare.
 *
 * Dot products are accumulated in LANES independent partial sums, reduced in a fixed order, so
 * the compiler vectorises them without -ffast-math and results do not depend on threading.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16

static const int PAIRS[3][4] = {{0, 1, 2, 3}, {0, 2, 1, 3}, {0, 3, 1, 2}};

static float lane_sum(const float *acc) {
    float s = 0.0f;
    for (int i = 0; i < LANES; ++i) s += acc[i];
    return s;
}

/* q rows: row r starts at q + r * d.  The query of token t in head bh is row
 * head_row[bh] + t * token_step.  members: [groups, 4] token indices.  out: q_red, whose row
 * (bh, j) starts at out + (bh * out_rows + j) * d; slot 0 of group g goes to row out_offset + g,
 * slot 1 to out_offset + groups + g.  best: [heads, groups] chosen split (0, 1, 2). */
void spark3r_pair_merge_f32(const float *q, int64_t d, const int64_t *head_row, int64_t token_step,
                            const int64_t *members, int64_t groups, int64_t heads,
                            float *out, int64_t out_rows, int64_t out_offset, int64_t *best) {
    int64_t total = heads * groups;
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < total; ++item) {
        int64_t bh = item / groups, g = item % groups;
        const float *m[4];
        for (int j = 0; j < 4; ++j) m[j] = q + (head_row[bh] + members[g * 4 + j] * token_step) * d;
        float ab[LANES], ac[LANES];
        memset(ab, 0, sizeof ab);
        memset(ac, 0, sizeof ac);
        int64_t i = 0;
        for (; i + LANES <= d; i += LANES)
            for (int l = 0; l < LANES; ++l) {
                float a0 = m[0][i + l], a1 = m[1][i + l], a2 = m[2][i + l], a3 = m[3][i + l];
                ab[l] += (a0 - a3) * (a1 - a2);
                ac[l] += (a0 - a2) * (a1 - a3);
            }
        for (int l = 0; i < d; ++i, ++l) {
            float a0 = m[0][i], a1 = m[1][i], a2 = m[2][i], a3 = m[3][i];
            ab[l] += (a0 - a3) * (a1 - a2);
            ac[l] += (a0 - a2) * (a1 - a3);
        }
        float a_minus_b = lane_sum(ab), a_minus_c = lane_sum(ac);
        int o = (a_minus_b >= 0.0f && a_minus_c >= 0.0f) ? 0 : (a_minus_c >= a_minus_b ? 1 : 2);
        const float *p0 = m[PAIRS[o][0]], *p1 = m[PAIRS[o][1]], *p2 = m[PAIRS[o][2]], *p3 = m[PAIRS[o][3]];
        float *s0 = out + (bh * out_rows + out_offset + g) * d;
        float *s1 = out + (bh * out_rows + out_offset + groups + g) * d;
        for (int64_t k = 0; k < d; ++k) {
            s0[k] = 0.5f * (p0[k] + p1[k]);
            s1[k] = 0.5f * (p2[k] + p3[k]);
        }
        best[item] = o;
    }
}

/* Fused VSGD step on CPU: one pass over (param, grad, mu, b_g, b_ghat) per element.
 *
 * The same algebra as probopt.optim.vsgd._single_tensor_vsgd (see the pseudo-code in the VSGD
 * docstring), written with k = 1 - beta_t = b_g / (b_g + b_ghat) and a*sigma^2 = k*b_ghat.
 * Compiled on first use by probopt._kernels.cpu (cc -O3 -march=native); no torch headers.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define VSGD_KERNEL(NAME, T, SQRT)                                                             \
    void NAME(T *restrict p, const T *restrict g, T *restrict mu, T *restrict bg,              \
              T *restrict bh, int64_t n, double lr_d, double decay_d, double a_inv_d,          \
              double gamma_d, double kg_gamma_d, double rho1_d, double rho2_d, double eps_d,   \
              double sign_d, int first, double k1_d, double s2_1_d) {                          \
        const T lr = (T)lr_d, decay = (T)decay_d, a_inv = (T)a_inv_d, gamma = (T)gamma_d;      \
        const T kg_gamma = (T)kg_gamma_d, rho1 = (T)rho1_d, rho2 = (T)rho2_d, eps = (T)eps_d;  \
        const T sign = (T)sign_d, half = (T)0.5, one = (T)1;                                   \
        if (first) {                                                                           \
            const T k = (T)k1_d, s2 = (T)s2_1_d;                                               \
            for (int64_t i = 0; i < n; ++i) {                                                  \
                const T gi = sign * g[i], m = mu[i];                                           \
                const T dm = k * (gi - m), mn = m + dm, e = mn - gi;                           \
                bg[i] = gamma + half * (s2 + dm * dm);                                         \
                bh[i] = kg_gamma + half * (s2 + e * e);                                        \
                mu[i] = mn;                                                                    \
                p[i] = p[i] * decay - lr * (mn / (SQRT(mn * mn + s2) + eps));                  \
            }                                                                                  \
        } else {                                                                               \
            for (int64_t i = 0; i < n; ++i) {                                                  \
                const T gi = sign * g[i], m = mu[i], b1 = bg[i], b2 = bh[i];                   \
                const T k = b1 / (b1 + b2), s2 = k * b2 * a_inv;                               \
                const T dm = k * (gi - m), mn = m + dm, e = mn - gi;                           \
                bg[i] = (one - rho1) * b1 + rho1 * (gamma + half * (s2 + dm * dm));            \
                bh[i] = (one - rho2) * b2 + rho2 * (kg_gamma + half * (s2 + e * e));           \
                mu[i] = mn;                                                                    \
                p[i] = p[i] * decay - lr * (mn / (SQRT(mn * mn + s2) + eps));                  \
            }                                                                                  \
        }                                                                                      \
    }

VSGD_KERNEL(vsgd_step_f32, float, sqrtf)
VSGD_KERNEL(vsgd_step_f64, double, sqrt)

/* 1 when every entry is finite; the whole array is read (no early exit) so it vectorises. */
#define FINITE_KERNEL(NAME, T, UT, EXPMASK)                                                    \
    int NAME(const T *restrict x, int64_t n) {                                                 \
        const UT *u = (const UT *)x;                                                           \
        UT bad = 0;                                                                            \
        for (int64_t i = 0; i < n; ++i) bad |= (UT)((u[i] & EXPMASK) == EXPMASK);              \
        return bad == 0;                                                                       \
    }

FINITE_KERNEL(all_finite_f32, float, uint32_t, 0x7f800000u)
FINITE_KERNEL(all_finite_f64, double, uint64_t, 0x7ff0000000000000ull)

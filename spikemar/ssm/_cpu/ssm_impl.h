/* One token of the selective SSM mixer (spikemar/ssm/mixer.py), everything between the input
 * projection and the output norm, and RMSNorm over rows. Included twice by ssm.c (float,
 * double).
 *
 * Per sequence, with zxbcdt = W_in·u split into z [I], ξ [K] (K = I + 2GN) and Δ_raw [H]:
 *
 *   ξ' = SiLU(Σ_j w[:, j]·window[:, j] + b)      window = [conv state (k−1 columns), ξ]
 *   x, B, C = ξ'[:I] as [H, P], ξ'[I:I+GN] as [G, N], ξ'[I+GN:] as [G, N]
 *   Δ = clamp(softplus(Δ_raw + b_Δ), Δ_min, Δ_max),  a = −exp(A_log)·Δ
 *   h' = exp(a)·h + (Δ·x) ⊗ B_g,  y = h'·C_g + D·x,  out = y ⊙ SiLU(z)     (g = h / (H/G))
 *
 * Llamba's discrete Mamba-2 mixer is the same loop with its own row layout and four switches:
 * the offsets of ξ, z and Δ_raw in a row (Mamba-2's [z | ξ | Δ_raw]: I, 0, I + K; Llamba's
 * [ξ | z | Δ_raw]: 0, K, K + I), conv_silu = 0 (no activation after the convolution), dt_bias and
 * A_log NULL (b_Δ = 0, A = −1), dt_scales_x = 0 (the state's input is x ⊗ B), and z_bias (added to
 * z before the SiLU; NULL: none).
 *
 * softplus is PyTorch's (β = 1, linear above 20). Layout: zxbcdt [batch, I + K + H], conv_state
 * [batch, K, k−1], ssm_state [batch, H, P, N], all contiguous; the outputs gated [batch, I],
 * new_conv [batch, K, k−1], new_ssm [batch, H, P, N] and a [batch, H] are written whole.
 * Returns the number of decays a that are not finite and ≤ 0 (what ssd_step rejects). */

static inline REAL CAT(silu_, SUFFIX)(REAL v) { return v / ((REAL)1 + EXP(-v)); }

static inline REAL CAT(softplus_, SUFFIX)(REAL v) {
  return v > (REAL)20 ? v : LOG1P(EXP(v));
}

int64_t CAT(mixer_step_, SUFFIX)(const REAL *zxbcdt, const REAL *conv_state,
                                 const REAL *ssm_state, const REAL *conv_w, const REAL *conv_b,
                                 const REAL *dt_bias, const REAL *A_log, const REAL *D,
                                 int64_t batch, int64_t I, int64_t N, int64_t G, int64_t H,
                                 int64_t P, int64_t k, double dt_min, double dt_max,
                                 int64_t xi_off, int64_t z_off, int64_t dt_off,
                                 int64_t conv_silu, int64_t dt_scales_x, const REAL *z_bias,
                                 REAL *gated, REAL *new_conv, REAL *new_ssm, REAL *a_out,
                                 REAL *scratch /* [I + 2GN] */) {
  const int64_t K = I + 2 * G * N, km1 = k - 1, width = I + K + H, heads_per_group = H / G;
  const int clamp_lo = dt_min > 0, clamp_hi = !isinf(dt_max);
  int64_t bad = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const REAL *row = zxbcdt + b * width;
    const REAL *z = row + z_off, *xi = row + xi_off, *dt_raw = row + dt_off;
    const REAL *cs = conv_state + b * K * km1;
    REAL *nc = new_conv + b * K * km1;
    for (int64_t c = 0; c < K; ++c) {
      const REAL *w = conv_w + c * k, *win = cs + c * km1;
      REAL acc = 0;
      for (int64_t j = 0; j < km1; ++j) acc += win[j] * w[j];
      acc += xi[c] * w[km1];
      if (conv_b) acc += conv_b[c];
      scratch[c] = conv_silu ? CAT(silu_, SUFFIX)(acc) : acc;
      for (int64_t j = 0; j + 1 < km1; ++j) nc[c * km1 + j] = win[j + 1];
      if (km1 > 0) nc[c * km1 + km1 - 1] = xi[c];
    }
    const REAL *x = scratch;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / heads_per_group;
      const REAL *Bv = scratch + I + g * N, *Cv = scratch + I + G * N + g * N;
      REAL dt = CAT(softplus_, SUFFIX)(dt_bias ? dt_raw[h] + dt_bias[h] : dt_raw[h]);
      if (clamp_lo && dt < (REAL)dt_min) dt = (REAL)dt_min;
      if (clamp_hi && dt > (REAL)dt_max) dt = (REAL)dt_max;
      const REAL a = A_log ? -EXP(A_log[h]) * dt : -dt;
      a_out[b * H + h] = a;
      bad += !(a <= 0 && a > -(REAL)INFINITY);
      const REAL decay = EXP(a);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = h * P + p;
        const REAL xd = dt_scales_x ? x[i] * dt : x[i];
        const REAL *hs = ssm_state + ((b * H + h) * P + p) * N;
        REAL *hn = new_ssm + ((b * H + h) * P + p) * N;
        REAL y = 0;
        for (int64_t n = 0; n < N; ++n) {
          const REAL v = xd * Bv[n] + decay * hs[n];
          hn[n] = v;
          y += v * Cv[n];
        }
        gated[b * I + i] = (y + D[h] * x[i]) * CAT(silu_, SUFFIX)(z_bias ? z[i] + z_bias[i] : z[i]);
      }
    }
  }
  return bad;
}

/* RMSNorm over groups of D consecutive values (rows · groups of them): y = x / √(mean(x²) + ε)
 * · w, w indexed over the whole row of groups · D (NULL: no weight). The sum of squares is taken
 * in double, so the result equals PyTorch's to rounding, not bit for bit. */
void CAT(rms_norm_, SUFFIX)(const REAL *x, int64_t rows, int64_t groups, int64_t D,
                            const REAL *w, double eps, REAL *out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const REAL *xr = x + (r * groups + g) * D;
      REAL *yr = out + (r * groups + g) * D;
      const REAL *wg = w ? w + g * D : 0;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * (double)xr[i];
      const REAL mean = (REAL)(ss / (double)D);
      const REAL scale = (REAL)1 / (REAL)sqrt((double)(mean + (REAL)eps));
      if (wg) for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * scale * wg[i];
      else for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * scale;
    }
  }
}

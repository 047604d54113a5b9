/* One token of the selective SSM mixer (spikemar/ssm/mixer.py), everything between the input
 * projection and the output norm, for inference. Included twice by atmn.c (float, double); the
 * PyTorch operations of SelectiveMixer.step are the reference this must equal to rounding.
 *
 * Per sequence, with zxbcdt = W_in·u split into z [I], ξ [K] (K = I + 2N) and Δ_raw [H]:
 *
 *   ξ' = SiLU(Σ_j w[:, j]·window[:, j] + b)      window = [conv state (k−1 columns), ξ]
 *   x, B, C = ξ'[:I] as [H, P], ξ'[I:I+N], ξ'[I+N:]
 *   Δ = softplus(Δ_raw + b_Δ),  a = −exp(A_log)·Δ
 *   h' = exp(a)·h + (Δ·x) ⊗ B,  y = h'·C + D·x,  out = y ⊙ SiLU(z)
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
                                 int64_t batch, int64_t I, int64_t N, int64_t H, int64_t P,
                                 int64_t k, REAL *gated, REAL *new_conv, REAL *new_ssm,
                                 REAL *a_out, REAL *scratch /* [I + 2N] */) {
  const int64_t K = I + 2 * N, km1 = k - 1, width = I + K + H;
  int64_t bad = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const REAL *z = zxbcdt + b * width, *xi = z + I, *dt_raw = xi + K;
    const REAL *cs = conv_state + b * K * km1;
    REAL *nc = new_conv + b * K * km1;
    for (int64_t c = 0; c < K; ++c) {
      const REAL *w = conv_w + c * k, *win = cs + c * km1;
      REAL acc = 0;
      for (int64_t j = 0; j < km1; ++j) acc += win[j] * w[j];
      acc += xi[c] * w[km1];
      scratch[c] = CAT(silu_, SUFFIX)(acc + conv_b[c]);
      for (int64_t j = 0; j + 1 < km1; ++j) nc[c * km1 + j] = win[j + 1];
      if (km1 > 0) nc[c * km1 + km1 - 1] = xi[c];
    }
    const REAL *x = scratch, *Bv = scratch + I, *Cv = scratch + I + N;
    for (int64_t h = 0; h < H; ++h) {
      const REAL dt = CAT(softplus_, SUFFIX)(dt_raw[h] + dt_bias[h]);
      const REAL a = -EXP(A_log[h]) * dt;
      a_out[b * H + h] = a;
      bad += !(a <= 0 && a > -(REAL)INFINITY);
      const REAL decay = EXP(a);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = h * P + p;
        const REAL xd = x[i] * dt;
        const REAL *hs = ssm_state + ((b * H + h) * P + p) * N;
        REAL *hn = new_ssm + ((b * H + h) * P + p) * N;
        REAL y = 0;
        for (int64_t n = 0; n < N; ++n) {
          const REAL v = xd * Bv[n] + decay * hs[n];
          hn[n] = v;
          y += v * Cv[n];
        }
        gated[b * I + i] = (y + D[h] * x[i]) * CAT(silu_, SUFFIX)(z[i]);
      }
    }
  }
  return bad;
}

// VSGD's state update for one leaf as an XLA FFI custom call (CPU): one fused pass.
//
// Note [probopt: the VSGD FFI kernel]
// XLA's CPU backend compiles scale_by_vsgd's per-leaf update (probopt/jax/vsgd.py) into one loop
// per output, materialises the gain k and copies the donated mu and b_ghat buffers before
// overwriting them: about 27 passes over memory per step against the 8 this loop makes (read g,
// mu, b_g, b_ghat; write mu, b_g, b_ghat, u). The Python side (probopt/jax/_ffi_cpu.py) aliases
// mu, b_g, b_ghat to the outputs 1-3 (input_output_aliases), so XLA hands the same buffers in and
// out and the state is updated in place; u (output 0) is the direction scale_by_vsgd returns.
//
// The arithmetic is the XLA path's, operation by operation (the gain form, see Note
// [probopt: the gain form] in vsgd.py); only the compiler's contraction of a*b + c into an FMA
// may differ. The t-dependent scalars and the hyperparameters arrive in one small buffer, since
// under jit they are traced values (the step count lives in the optimizer state, and
// optax.inject_hyperparams traces the hyperparameters):
//
//   scalars[9 * b + i], i = 0..8: rho1, rho2, first (1 or 0), k on the first step, sigma^2 on
//   the first step, 1/a, gamma, K_g * gamma, eps
//
// b indexes a batch of independent problems (vmap with vmap_method="broadcast_all" gives every
// operand the same leading batch dimensions): the data operands hold nb = size(scalars) / 9
// consecutive blocks of n / nb elements, block b using scalars[9b:9b+9].
//
// Large leaves are cut into chunks run on XLA's intra-op thread pool; the handler is then
// asynchronous (it returns a Future that completes when the last chunk is done).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define PROBOPT_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kScalars = 9;
// Below this many elements per chunk, handing work to another thread costs more than it saves.
constexpr int64_t kMinChunk = int64_t{1} << 16;

template <typename T>
void VsgdBlock(const T *__restrict g, T *__restrict mu, T *__restrict bg, T *__restrict bh,
               T *__restrict u, int64_t n, const T *s) {
  const T rho1 = s[0], rho2 = s[1], k0 = s[3], s2_0 = s[4], a_inv = s[5], gamma = s[6];
  const T kg_gamma = s[7], eps = s[8], one = T(1), half = T(0.5);
  const T keep1 = one - rho1, keep2 = one - rho2;
  if (s[2] != T(0)) {  // first step: k and sigma^2 from the prior (b_g = b_ghat = 0 here)
    for (int64_t i = 0; i < n; ++i) {
      const T gi = g[i], m = mu[i], b1 = bg[i], b2 = bh[i];
      const T dm = k0 * (gi - m), mn = m + dm, miss = gi - mn;
      bg[i] = b1 * keep1 + rho1 * (gamma + half * (s2_0 + dm * dm));
      bh[i] = b2 * keep2 + rho2 * (kg_gamma + half * (s2_0 + miss * miss));
      mu[i] = mn;
      u[i] = mn / (std::sqrt(mn * mn + s2_0) + eps);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i], m = mu[i], b1 = bg[i], b2 = bh[i];
    const T k = b1 / (b1 + b2), s2 = k * b2 * a_inv;
    const T dm = k * (gi - m), mn = m + dm, miss = gi - mn;
    bg[i] = b1 * keep1 + rho1 * (gamma + half * (s2 + dm * dm));
    bh[i] = b2 * keep2 + rho2 * (kg_gamma + half * (s2 + miss * miss));
    mu[i] = mn;
    u[i] = mn / (std::sqrt(mn * mn + s2) + eps);
  }
}

// Subnormal numbers flushed to zero, as XLA's CPU code runs: the same results as the XLA path
// and no slow path (once μ settles, (μ_t - μ_{t-1})² underflows into the subnormals, which cost
// ~100 cycles each without this).
class ScopedFlushDenormal {
 public:
#if defined(PROBOPT_X86)
  ScopedFlushDenormal() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~ScopedFlushDenormal() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#elif defined(__aarch64__)
  ScopedFlushDenormal() {
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t fz = saved_ | (uint64_t{1} << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fz));
  }
  ~ScopedFlushDenormal() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
};

// Elements [start, end) of the flat index space over all blocks.
template <typename T>
void VsgdRange(const T *g, T *mu, T *bg, T *bh, T *u, const T *scalars, int64_t per_block,
               int64_t start, int64_t end) {
  ScopedFlushDenormal flush;
  while (start < end) {
    const int64_t b = start / per_block;
    const int64_t stop = std::min(end, (b + 1) * per_block);
    VsgdBlock<T>(g + start, mu + start, bg + start, bh + start, u + start, stop - start,
                 scalars + kScalars * b);
    start = stop;
  }
}

ffi::Future Ready(ffi::Error error = ffi::Error::Success()) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(error);
  }
  return future;
}

template <typename T>
ffi::Future Run(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer mu_in, ffi::AnyBuffer bg_in,
                ffi::AnyBuffer bh_in, ffi::AnyBuffer scalars, ffi::AnyBuffer u_out,
                ffi::AnyBuffer mu_out, ffi::AnyBuffer bg_out, ffi::AnyBuffer bh_out) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  const int64_t nb = static_cast<int64_t>(scalars.element_count()) / kScalars;
  if (n == 0) return Ready();
  if (nb == 0 || n % nb != 0) {
    return Ready(ffi::Error::InvalidArgument(
        "probopt_vsgd: the scalars do not divide the leaf into equal blocks"));
  }
  // The state is updated in place on the output buffers; XLA aliases them to the inputs, and if
  // it ever did not, the inputs are copied over first.
  const ffi::AnyBuffer ins[] = {mu_in, bg_in, bh_in}, outs[] = {mu_out, bg_out, bh_out};
  for (int i = 0; i < 3; ++i) {
    if (ins[i].untyped_data() != outs[i].untyped_data()) {
      std::memcpy(outs[i].untyped_data(), ins[i].untyped_data(), ins[i].size_bytes());
    }
  }
  const T *gp = static_cast<const T *>(g.untyped_data());
  T *mu = static_cast<T *>(mu_out.untyped_data());
  T *bg = static_cast<T *>(bg_out.untyped_data());
  T *bh = static_cast<T *>(bh_out.untyped_data());
  T *u = static_cast<T *>(u_out.untyped_data());
  const T *s = static_cast<const T *>(scalars.untyped_data());
  const int64_t per_block = n / nb;

  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunks = std::min(threads, std::max<int64_t>(n / kMinChunk, 1));
  if (chunks == 1) {
    VsgdRange<T>(gp, mu, bg, bh, u, s, per_block, 0, n);
    return Ready();
  }
  // Chunk starts rounded to 16 elements keep them 64-byte aligned for float32.
  const int64_t size = ((n + chunks - 1) / chunks + 15) / 16 * 16;
  const int64_t count = (n + size - 1) / size;
  ffi::CountDownPromise done(count);
  ffi::Future future(done);
  for (int64_t c = 1; c < count; ++c) {
    pool.Schedule([=]() mutable {
      VsgdRange<T>(gp, mu, bg, bh, u, s, per_block, c * size, std::min(n, (c + 1) * size));
      done.CountDown();
    });
  }
  VsgdRange<T>(gp, mu, bg, bh, u, s, per_block, 0, std::min(n, size));
  done.CountDown();
  return future;
}

ffi::Future Vsgd(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer mu_in,
                 ffi::AnyBuffer bg_in, ffi::AnyBuffer bh_in, ffi::AnyBuffer scalars,
                 ffi::Result<ffi::AnyBuffer> u_out, ffi::Result<ffi::AnyBuffer> mu_out,
                 ffi::Result<ffi::AnyBuffer> bg_out, ffi::Result<ffi::AnyBuffer> bh_out) {
  const ffi::DataType dtype = g.element_type();
  const ffi::AnyBuffer operands[] = {mu_in, bg_in, bh_in, scalars, *u_out, *mu_out, *bg_out,
                                     *bh_out};
  for (const auto &x : operands) {
    if (x.element_type() != dtype) {
      return Ready(ffi::Error::InvalidArgument("probopt_vsgd: operands of different dtypes"));
    }
  }
  const size_t n = g.element_count();
  const ffi::AnyBuffer data[] = {mu_in, bg_in, bh_in, *u_out, *mu_out, *bg_out, *bh_out};
  for (const auto &x : data) {
    if (x.element_count() != n) {
      return Ready(ffi::Error::InvalidArgument("probopt_vsgd: operands of different sizes"));
    }
  }
  if (scalars.element_count() % kScalars != 0) {
    return Ready(ffi::Error::InvalidArgument("probopt_vsgd: scalars must hold 9 per block"));
  }
  switch (dtype) {
    case ffi::DataType::F32:
      return Run<float>(pool, g, mu_in, bg_in, bh_in, scalars, *u_out, *mu_out, *bg_out, *bh_out);
    case ffi::DataType::F64:
      return Run<double>(pool, g, mu_in, bg_in, bh_in, scalars, *u_out, *mu_out, *bg_out,
                         *bh_out);
    default:
      return Ready(ffi::Error::InvalidArgument("probopt_vsgd: only float32 and float64"));
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProboptVsgd, Vsgd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // g
                                  .Arg<ffi::AnyBuffer>()   // mu
                                  .Arg<ffi::AnyBuffer>()   // b_g
                                  .Arg<ffi::AnyBuffer>()   // b_ghat
                                  .Arg<ffi::AnyBuffer>()   // scalars
                                  .Ret<ffi::AnyBuffer>()   // u
                                  .Ret<ffi::AnyBuffer>()   // mu (aliased to the input)
                                  .Ret<ffi::AnyBuffer>()   // b_g (aliased)
                                  .Ret<ffi::AnyBuffer>()); // b_ghat (aliased)

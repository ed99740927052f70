// CPU kernels of QuadraNet (float32):
//   * the depthwise quadratic convolution on channels-last maps, forward y = a * b + c
//     (+ residual), where a, b, c are depthwise k x k convolutions of x (stride 1, dilation
//     1, padding k / 2) with the fused weight (3C, 1, k, k) whose channel 3 * ch + branch
//     holds branch (a, b, c) of input channel ch, and backward (dx and the fused weight /
//     bias gradients in one pass over the data);
//   * the channel MLP fc2(GELU(fc1(LN(x)))) over chunks of rows whose hidden activation
//     stays in cache, forward and backward (GELU by exp-free rational fits).
// They are backends of the `quadranet::` ops (see quadranet/ops): the Python side folds
// the layer scales into the weights and decides when these kernels apply.
//
// Vectors are GCC vector extensions of L floats: 16 where the build enables AVX-512F, else
// 8 (AVX2 + FMA where enabled, pairs of SSE registers otherwise); channels are processed in
// blocks of L. Each task (one image, a band of output rows) copies one channel block of its
// rows plus a k / 2 halo into a zero-padded buffer [rows + 2p][W + 2p][L], so the inner
// loops have no bounds checks.
// Small batches also split the channel blocks among tasks, so every thread has work.
// Weight gradients are summed per chunk of tasks (one chunk per thread), then reduced in
// chunk order: the result is deterministic for a given thread count.

// Only the headers needed (not torch/extension.h) keep the just-in-time build short; the
// ops are registered with the dispatcher and called as torch.ops.quadranet_cpu.*.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int L = 16;         // lanes: channels per block (one 512-bit register)
#else
constexpr int L = 8;          // lanes: channels per block (one 256-bit register)
#endif
constexpr int64_t BAND = 8;   // output rows per task
constexpr int TILE = 3;       // output pixels per forward register tile (3 x 3 branches)
constexpr int DX_TILE = 5;    // output pixels per input-gradient register tile
constexpr int DW_TAPS = 4;    // weight-gradient taps per register pass
constexpr int64_t STRIP = 25; // output columns per input-gradient strip (whole DX_TILEs)

// Scratch memory aligned to 64 bytes: an 8-float vector at an odd multiple of 16 bytes
// straddles two cache lines, and such loads cost the tiles below about 20%.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
};
using Floats = std::vector<float, AlignedAllocator<float>>;

typedef float vf __attribute__((vector_size(L * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf splat(float s) { return vf{} + s; }

// Makes the compiler treat v as changed in a register, so a vector used by several FMAs
// is loaded once. Without it GCC folds the load into each FMA that uses it, and the
// forward tile runs 12-26% slower on Zen 3.
inline void in_register(vf& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));  // any of the 32 vector registers
#elif defined(__x86_64__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}


// Lane-wise min and max: one instruction each with AVX (GCC's vector ternary compiles to a
// compare and a blend). Where either is NaN, both return b.
inline vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
  const __m512 r = _mm512_min_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b));
  return reinterpret_cast<vf>(r);
#elif defined(__AVX__)
  return __builtin_ia32_minps256(a, b);
#else
  return a < b ? a : b;
#endif
}

inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  const __m512 r = _mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b));
  return reinterpret_cast<vf>(r);
#elif defined(__AVX__)
  return __builtin_ia32_maxps256(a, b);
#else
  return a > b ? a : b;
#endif
}

// The first `n` lanes from p, zeros after (n <= L).
inline vf load_n(const float* p, int64_t n) {
  if (n == L) return load(p);
  vf v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

inline void store_n(float* p, vf v, int64_t n) {
  if (n == L) {
    store(p, v);
  } else {
    std::memcpy(p, &v, n * sizeof(float));
  }
}

// Sizes of an NHWC problem, with channels rounded up to whole blocks.
struct Shape {
  int64_t n, c, h, w;
  int k, p;
  int64_t blocks;

  Shape(const at::Tensor& x, int64_t ksize)
      : n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), k(static_cast<int>(ksize)),
        p(static_cast<int>(ksize / 2)), blocks((x.size(1) + L - 1) / L) {}

  int64_t wp() const { return w + 2 * p; }
  int64_t taps() const { return static_cast<int64_t>(k) * k; }
  int64_t lanes(int64_t cb) const { return std::min<int64_t>(L, c - cb * L); }
  int64_t bands() const { return (h + BAND - 1) / BAND; }
  int64_t tasks() const { return n * bands(); }
  // Channel-block groups per (image, band) task: enough tasks for all threads.
  int64_t groups() const {
    if (tasks() == 0 || blocks == 0) return 1;
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    return std::clamp<int64_t>((want + tasks() - 1) / tasks(), 1, blocks);
  }
  int64_t buffer_floats() const { return (std::min(BAND, h) + 2 * p) * wp() * L; }
};

// Fused (3C, 1, k, k) weights as [block][branch][tap][lane], taps optionally reversed
// (the transposed convolution of the input gradient uses the flipped kernel).
Floats block_weights(const at::Tensor& weight, const Shape& s, bool flip) {
  const int64_t taps = s.taps();
  Floats out(s.blocks * 3 * taps * L, 0.f);
  const float* w = weight.data_ptr<float>();
  for (int64_t ch = 0; ch < s.c; ++ch) {
    const int64_t cb = ch / L, lane = ch % L;
    for (int br = 0; br < 3; ++br) {
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t src = (3 * ch + br) * taps + (flip ? taps - 1 - t : t);
        out[((cb * 3 + br) * taps + t) * L + lane] = w[src];
      }
    }
  }
  return out;
}

// Fused (3C) bias as [block][branch][lane]; zeros without a bias.
Floats block_bias(const c10::optional<at::Tensor>& bias, const Shape& s) {
  Floats out(s.blocks * 3 * L, 0.f);
  if (!bias.has_value() || !bias->defined()) return out;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                  bias->numel() == 3 * s.c,
              "quadratic_forward: expected a contiguous float32 bias of 3C = ", 3 * s.c,
              " elements, got ", bias->sizes());
  const float* b = bias->data_ptr<float>();
  for (int64_t ch = 0; ch < s.c; ++ch) {
    for (int br = 0; br < 3; ++br) out[((ch / L) * 3 + br) * L + ch % L] = b[3 * ch + br];
  }
  return out;
}

// Copies channel block cb of rows [h0 - p, h0 + rows + p) of image `img` (NHWC, one image)
// into a zero-padded [rows + 2p][W + 2p][L] buffer.
void gather(const float* img, const Shape& s, int64_t cb, int64_t h0, int64_t rows, float* buf) {
  const int64_t wp = s.wp(), n = s.lanes(cb);
  for (int64_t r = 0; r < rows + 2 * s.p; ++r) {
    float* dst = buf + r * wp * L;
    const int64_t h = h0 + r - s.p;
    if (h < 0 || h >= s.h) {
      std::fill(dst, dst + wp * L, 0.f);
      continue;
    }
    std::fill(dst, dst + s.p * L, 0.f);
    std::fill(dst + (s.p + s.w) * L, dst + wp * L, 0.f);
    const float* src = img + h * s.w * s.c + cb * L;
    float* d = dst + s.p * L;
    for (int64_t x = 0; x < s.w; ++x) store(d + x * L, load_n(src + x * s.c, n));
  }
}

// Like `gather` for the three branch gradients g * b, g * a and g; adds the sums over the
// band's own rows (not the halo) to `bias_sum` [branch][lane].
void gather_grads(const float* g, const float* a, const float* b, const Shape& s, int64_t cb,
                  int64_t h0, int64_t rows, float* const bufs[3], float* bias_sum) {
  const int64_t wp = s.wp(), n = s.lanes(cb);
  vf sum[3] = {};
  for (int64_t r = 0; r < rows + 2 * s.p; ++r) {
    const int64_t h = h0 + r - s.p;
    float* dst[3];
    for (int br = 0; br < 3; ++br) dst[br] = bufs[br] + r * wp * L;
    if (h < 0 || h >= s.h) {
      for (float* d : dst) std::fill(d, d + wp * L, 0.f);
      continue;
    }
    for (float* d : dst) {
      std::fill(d, d + s.p * L, 0.f);
      std::fill(d + (s.p + s.w) * L, d + wp * L, 0.f);
    }
    const bool own = r >= s.p && r < rows + s.p;
    const int64_t off = h * s.w * s.c + cb * L;
    for (int64_t x = 0; x < s.w; ++x) {
      const int64_t o = off + x * s.c;
      const vf gv = load_n(g + o, n), av = load_n(a + o, n), bv = load_n(b + o, n);
      const vf prod[3] = {gv * bv, gv * av, gv};
      for (int br = 0; br < 3; ++br) {
        store(dst[br] + (s.p + x) * L, prod[br]);
        if (own) sum[br] += prod[br];
      }
    }
  }
  for (int br = 0; br < 3; ++br) store(bias_sum + br * L, load(bias_sum + br * L) + sum[br]);
}

// Forward of T adjacent output pixels: xb points at the buffer pixel of the first output's
// top-left tap, wb at this block's weights [branch][tap][lane]. Writes whichever of
// y, a, b, c are non-null at `off` (NHWC offset of the first pixel).
template <int KT, int T>
inline void forward_tile(const float* xb, int64_t wp, int kr, const float* wb, const vf bias[3],
                         float* const out[4], const float* res, int64_t off, int64_t c,
                         int64_t n) {
  const int k = KT > 0 ? KT : kr;
  const int64_t taps = static_cast<int64_t>(k) * k;
  vf acc[3][T];
  for (int br = 0; br < 3; ++br) {
    for (int t = 0; t < T; ++t) acc[br][t] = bias[br];
  }
  for (int i = 0; i < k; ++i) {
    const float* row = xb + i * wp * L;
    const float* wi = wb + i * k * L;
    for (int j = 0; j < k; ++j) {
      vf wa = load(wi + j * L), wbv = load(wi + (taps + j) * L);
      vf wc = load(wi + (2 * taps + j) * L);
      in_register(wa);
      in_register(wbv);
      in_register(wc);
      for (int t = 0; t < T; ++t) {
        const vf xv = load(row + (j + t) * L);
        acc[0][t] += xv * wa;
        acc[1][t] += xv * wbv;
        acc[2][t] += xv * wc;
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t o = off + t * c;
    if (out[0]) {
      const vf y = acc[0][t] * acc[1][t] + acc[2][t];
      store_n(out[0] + o, res ? y + load_n(res + o, n) : y, n);
    }
    for (int br = 0; br < 3; ++br) {
      if (out[br + 1]) store_n(out[br + 1] + o, acc[br][t], n);
    }
  }
}

// Input gradient of T adjacent pixels: the sum over branches of the flipped-kernel
// correlation of the branch gradient buffers gb[3] (same geometry as the forward buffer).
template <int KT, int T>
inline void dx_tile(const float* const gb[3], int64_t base, int64_t wp, int kr, const float* wf,
                    float* dx, int64_t off, int64_t c, int64_t n) {
  const int k = KT > 0 ? KT : kr;
  const int64_t taps = static_cast<int64_t>(k) * k;
  // two partial sums per pixel (branch a and c; branch b) halve the dependency chains
  vf acc[2][T] = {};
#pragma GCC unroll 1
  for (int i = 0; i < k; ++i) {
    const int64_t row = base + i * wp * L;
    const float* wi = wf + i * k * L;
#pragma GCC unroll 8
    for (int j = 0; j < k; ++j) {
#pragma GCC unroll 3
      for (int br = 0; br < 3; ++br) {
        const vf wv = load(wi + (br * taps + j) * L);
        const float* gr = gb[br] + row + j * L;
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[br & 1][t] += load(gr + t * L) * wv;
      }
    }
  }
  for (int t = 0; t < T; ++t) store_n(dx + off + t * c, acc[0][t] + acc[1][t], n);
}

// Weight gradient of taps (i, j0 .. j0 + J) of all three branches over band row r:
// dW[br][i][j] += sum_x X[r + i][x + j] * G_br[r + p][x + p]. `acc_mem` is this block's
// [branch][tap][lane] partial sum. One row at a time keeps the rows read in L1.
template <int KT, int J>
inline void dw_pass(const float* xbuf, const float* const gb[3], int64_t wp, int kr, int64_t r,
                    int64_t width, int i, int j0, float* acc_mem) {
  const int k = KT > 0 ? KT : kr;
  const int p = k / 2;
  const int64_t taps = static_cast<int64_t>(k) * k;
  vf acc[3][J] = {};
  {
    const float* xr = xbuf + ((r + i) * wp + j0) * L;
    const int64_t grow = ((r + p) * wp + p) * L;
    const float* g0 = gb[0] + grow;
    const float* g1 = gb[1] + grow;
    const float* g2 = gb[2] + grow;
    vf xw[J];  // sliding window: xw[jj] = X[r + i][x + j0 + jj], one new load per pixel
    for (int jj = 0; jj + 1 < J; ++jj) xw[jj + 1] = load(xr + jj * L);
    for (int64_t x = 0; x < width; ++x) {
      for (int jj = 0; jj + 1 < J; ++jj) xw[jj] = xw[jj + 1];
      xw[J - 1] = load(xr + (x + J - 1) * L);
      const vf ga = load(g0 + x * L), gbv = load(g1 + x * L), gc = load(g2 + x * L);
      for (int jj = 0; jj < J; ++jj) {
        acc[0][jj] += xw[jj] * ga;
        acc[1][jj] += xw[jj] * gbv;
        acc[2][jj] += xw[jj] * gc;
      }
    }
  }
  for (int br = 0; br < 3; ++br) {
    for (int jj = 0; jj < J; ++jj) {
      float* m = acc_mem + (br * taps + i * k + j0 + jj) * L;
      store(m, load(m) + acc[br][jj]);
    }
  }
}

template <int KT>
void forward_band(const Shape& s, const float* x, const float* wblk, const float* bblk,
                  float* const out[4], const float* res, int64_t img, int64_t h0, int64_t rows,
                  int64_t cb0, int64_t cb1, float* buf) {
  const int64_t wp = s.wp();
  const float* ximg = x + img * s.h * s.w * s.c;
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    gather(ximg, s, cb, h0, rows, buf);
    const float* wb = wblk + cb * 3 * s.taps() * L;
    const vf bias[3] = {load(bblk + (cb * 3) * L), load(bblk + (cb * 3 + 1) * L),
                        load(bblk + (cb * 3 + 2) * L)};
    const int64_t n = s.lanes(cb);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row_off = ((img * s.h + h0 + r) * s.w) * s.c + cb * L;
      const float* xr = buf + r * wp * L;
      // whole tiles; the last one ends at the row's end and may redo a few pixels (the
      // same values again: the outputs never alias the inputs)
      for (int64_t x = 0; x < s.w; x += TILE) {
        if (s.w < TILE) {
          forward_tile<KT, 1>(xr + x * L, wp, s.k, wb, bias, out, res, row_off + x * s.c, s.c, n);
          x += 1 - TILE;
          continue;
        }
        const int64_t x0 = std::min(x, s.w - TILE);
        forward_tile<KT, TILE>(xr + x0 * L, wp, s.k, wb, bias, out, res, row_off + x0 * s.c, s.c,
                               n);
      }
    }
  }
}

template <int KT>
void backward_band(const Shape& s, const float* x, const float* g, const float* a, const float* b,
                   const float* wflip, float* dx, bool need_dw, float* dw_part, float* db_part,
                   int64_t img, int64_t h0, int64_t rows, int64_t cb0, int64_t cb1, float* xbuf,
                   float* const gbufs[3]) {
  const int64_t wp = s.wp(), taps = s.taps(), plane = s.h * s.w * s.c;
  const int64_t io = img * plane;
  const float* const gb[3] = {gbufs[0], gbufs[1], gbufs[2]};
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    gather_grads(g + io, a + io, b + io, s, cb, h0, rows, gbufs, db_part + cb * 3 * L);
    const int64_t n = s.lanes(cb);
    if (dx) {
      const float* wf = wflip + cb * 3 * taps * L;
      for (int64_t xs = 0; xs < s.w; xs += STRIP) {  // column strips keep the rows read in L1
        const int64_t xe = std::min(s.w, xs + STRIP);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row_off = io + ((h0 + r) * s.w) * s.c + cb * L;
          for (int64_t x = xs; x < xe; x += DX_TILE) {
            if (s.w < DX_TILE) {
              dx_tile<KT, 1>(gb, (r * wp + x) * L, wp, s.k, wf, dx, row_off + x * s.c, s.c, n);
              x += 1 - DX_TILE;
              continue;
            }
            const int64_t x0 = std::min(x, xe - DX_TILE);  // may redo pixels, as in forward
            dx_tile<KT, DX_TILE>(gb, (r * wp + x0) * L, wp, s.k, wf, dx, row_off + x0 * s.c, s.c,
                                 n);
          }
        }
      }
    }
    if (!need_dw) continue;
    gather(x + io, s, cb, h0, rows, xbuf);
    float* acc = dw_part + cb * 3 * taps * L;
    for (int64_t r = 0; r < rows; ++r) {
      for (int i = 0; i < s.k; ++i) {
        for (int j0 = 0; j0 < s.k; j0 += DW_TAPS) {
          switch (std::min(DW_TAPS, s.k - j0)) {
            case 4: dw_pass<KT, 4>(xbuf, gb, wp, s.k, r, s.w, i, j0, acc); break;
            case 3: dw_pass<KT, 3>(xbuf, gb, wp, s.k, r, s.w, i, j0, acc); break;
            case 2: dw_pass<KT, 2>(xbuf, gb, wp, s.k, r, s.w, i, j0, acc); break;
            default: dw_pass<KT, 1>(xbuf, gb, wp, s.k, r, s.w, i, j0, acc); break;
          }
        }
      }
    }
  }
}

void check_input(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              name, ": expected a 4-D float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              ": x must be channels-last contiguous (x.contiguous(memory_format="
              "torch.channels_last))");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 4 &&
                  weight.size(0) == 3 * x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              name, ": expected a contiguous float32 fused weight of shape (3C, 1, k, k) with odd "
              "k for C = ", x.size(1), ", got ", weight.sizes());
}

at::Tensor like_nhwc(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

#define DISPATCH_K(k, FN, ...)                 \
  switch (k) {                                 \
    case 3: FN<3>(__VA_ARGS__); break;         \
    case 5: FN<5>(__VA_ARGS__); break;         \
    case 7: FN<7>(__VA_ARGS__); break;         \
    default: FN<0>(__VA_ARGS__); break;        \
  }

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The fused weight and bias (float32, contiguous) with the layer scale folded in: gamma
// multiplies branches a and c, so that gamma (a b + c) = (gamma a) b + gamma c.
std::pair<at::Tensor, c10::optional<at::Tensor>> fold(const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias,
                                                      const c10::optional<at::Tensor>& gamma) {
  if (!given(gamma)) return {weight.contiguous(), bias};
  TORCH_CHECK(gamma->scalar_type() == at::kFloat && gamma->dim() == 1 &&
                  3 * gamma->size(0) == weight.size(0),
              "quadratic conv: gamma must be a float32 vector of C = weight.size(0) / 3 values");
  const at::Tensor g = gamma->contiguous(), w = weight.contiguous();
  const float* gp = g.data_ptr<float>();
  auto scaled = [&](const at::Tensor& t, int64_t per) {
    at::Tensor out = at::empty(t.sizes(), t.options());
    const float* src = t.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    for (int64_t ch = 0; ch < t.size(0); ++ch) {
      const float scale = ch % 3 == 1 ? 1.f : gp[ch / 3];
      for (int64_t i = 0; i < per; ++i) dst[ch * per + i] = src[ch * per + i] * scale;
    }
    return out;
  };
  c10::optional<at::Tensor> b;
  if (given(bias)) b = scaled(bias->contiguous(), 1);
  return {scaled(w, w.numel() / std::max<int64_t>(w.size(0), 1)), b};
}

// Returns [y] or [y, a, b] (`want_ab`), or [a, b] without `want_y`: y = gamma (a b + c)
// (+ residual, channels-last of x's shape), where a is kept with gamma folded in.
std::vector<at::Tensor> quadratic_forward(const at::Tensor& x, const at::Tensor& weight_in,
                                          const c10::optional<at::Tensor>& bias_in,
                                          const c10::optional<at::Tensor>& gamma, bool want_y,
                                          bool want_ab, const c10::optional<at::Tensor>& residual) {
  const auto [weight, bias] = fold(weight_in, bias_in, gamma);
  const bool want_a = want_ab, want_b = want_ab, want_c = false;
  check_input(x, weight, "quadratic_forward");
  const float* res = nullptr;
  if (given(residual)) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->sizes() == x.sizes() &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                "quadratic_forward: residual must be a channels-last float32 tensor of x's shape ",
                x.sizes());
    res = residual->data_ptr<float>();
  }
  const Shape s(x, weight.size(2));
  const Floats wblk = block_weights(weight, s, false);
  const Floats bblk = block_bias(bias, s);
  const bool want[4] = {want_y, want_a, want_b, want_c};
  std::vector<at::Tensor> outs(4);
  float* ptrs[4] = {nullptr, nullptr, nullptr, nullptr};
  for (int i = 0; i < 4; ++i) {
    if (want[i]) {
      outs[i] = like_nhwc(x);
      ptrs[i] = outs[i].data_ptr<float>();
    }
  }
  std::vector<at::Tensor> requested;
  for (const at::Tensor& t : outs) {
    if (t.defined()) requested.push_back(t);
  }
  if (x.numel() == 0) return requested;
  const float* xp = x.data_ptr<float>();
  const int64_t bands = s.bands(), groups = s.groups();
  at::parallel_for(0, s.tasks() * groups, 1, [&](int64_t begin, int64_t end) {
    Floats buf(s.buffer_floats());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / groups / bands, h0 = (t / groups % bands) * BAND;
      const int64_t rows = std::min(BAND, s.h - h0), grp = t % groups;
      const int64_t cb0 = s.blocks * grp / groups, cb1 = s.blocks * (grp + 1) / groups;
      DISPATCH_K(s.k, forward_band, s, xp, wblk.data(), bblk.data(), ptrs, res, img, h0, rows,
                 cb0, cb1, buf.data());
    }
  });
  return requested;
}

// Returns the requested ones of [dx, dweight, dbias, dgamma] of y = gamma (a b + c) given
// the kept a (gamma folded in) and b and grad = dL/dy, in that order. dweight / dbias use
// the fused (3C, 1, k, k) / (3C) layouts. With W' the folded weight:
//   dW = s dW' (s = gamma on branches a and c),
//   dgamma = <Wa, dW'a> + ba db'a + <Wc, dW'c> + bc db'c.
std::vector<at::Tensor> quadratic_backward(const at::Tensor& x, const at::Tensor& weight_in,
                                           const c10::optional<at::Tensor>& bias_in,
                                           const c10::optional<at::Tensor>& gamma_in,
                                           const at::Tensor& a_in, const at::Tensor& b_in,
                                           const at::Tensor& grad_in, bool need_dx,
                                           bool need_dw, bool need_db, bool need_dg) {
  const auto [weight, folded_bias] = fold(weight_in, bias_in, gamma_in);
  (void)folded_bias;
  check_input(x, weight, "quadratic_backward");
  const bool has_gamma = given(gamma_in), has_bias = given(bias_in);
  need_dg = need_dg && has_gamma;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor a = a_in.contiguous(cl), b = b_in.contiguous(cl), g = grad_in.contiguous(cl);
  for (const at::Tensor* t : {&a, &b, &g}) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == at::kFloat,
                "quadratic_backward: a, b and grad must be float32 of x's shape ", x.sizes());
  }
  const Shape s(x, weight.size(2));
  const int64_t taps = s.taps();
  std::vector<at::Tensor> outs(4);
  float* dx = nullptr;
  if (need_dx) {
    outs[0] = like_nhwc(x);
    dx = outs[0].data_ptr<float>();
  }
  const bool want_dw = need_dw || need_dg;
  const int64_t groups = s.groups(), tasks = s.tasks() * groups;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const int64_t part_w = s.blocks * 3 * taps * L, part_b = s.blocks * 3 * L;
  Floats dw_parts(want_dw ? chunks * part_w : 0, 0.f);
  Floats db_parts(chunks * part_b, 0.f);
  if (x.numel() > 0 && (need_dx || want_dw || need_db || need_dg)) {
    const Floats wflip = block_weights(weight, s, true);
    const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>();
    const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      const int64_t bf = s.buffer_floats();
      Floats bufs(4 * bf);
      float* const gbufs[3] = {bufs.data() + bf, bufs.data() + 2 * bf, bufs.data() + 3 * bf};
      const int64_t bands = s.bands();
      for (int64_t ch = begin; ch < end; ++ch) {
        float* dwp = want_dw ? dw_parts.data() + ch * part_w : nullptr;
        float* dbp = db_parts.data() + ch * part_b;
        for (int64_t t = tasks * ch / chunks; t < tasks * (ch + 1) / chunks; ++t) {
          const int64_t img = t / groups / bands, h0 = (t / groups % bands) * BAND;
          const int64_t rows = std::min(BAND, s.h - h0), grp = t % groups;
          const int64_t cb0 = s.blocks * grp / groups, cb1 = s.blocks * (grp + 1) / groups;
          DISPATCH_K(s.k, backward_band, s, xp, gp, ap, bp, wflip.data(), dx, want_dw, dwp, dbp,
                     img, h0, rows, cb0, cb1, bufs.data(), gbufs);
        }
      }
    });
  }
  const at::Tensor raw_w = weight_in.contiguous();
  const at::Tensor gamma = has_gamma ? gamma_in->contiguous() : at::Tensor();
  const at::Tensor raw_b = has_bias ? bias_in->contiguous() : at::Tensor();
  const float* gm = has_gamma ? gamma.data_ptr<float>() : nullptr;
  std::vector<float> dgamma(s.c, 0.f);
  auto scale = [&](int64_t ch, int br) { return gm != nullptr && br != 1 ? gm[ch] : 1.f; };
  if (want_dw) {
    float* out = nullptr;
    if (need_dw) {
      outs[1] = at::empty(weight.sizes(), weight.options());
      out = outs[1].data_ptr<float>();
    }
    const float* w = raw_w.data_ptr<float>();
    for (int64_t ch = 0; ch < s.c; ++ch) {
      for (int br = 0; br < 3; ++br) {
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t src = (((ch / L) * 3 + br) * taps + t) * L + ch % L;
          float sum = 0.f;
          for (int64_t part = 0; part < chunks; ++part) sum += dw_parts[part * part_w + src];
          const int64_t dst = (3 * ch + br) * taps + t;
          if (out != nullptr) out[dst] = sum * scale(ch, br);
          if (br != 1) dgamma[ch] += w[dst] * sum;
        }
      }
    }
  }
  if (need_db || (need_dg && has_bias)) {
    float* out = nullptr;
    if (need_db) {
      outs[2] = at::empty({3 * s.c}, weight.options());
      out = outs[2].data_ptr<float>();
    }
    const float* bias = has_bias ? raw_b.data_ptr<float>() : nullptr;
    for (int64_t ch = 0; ch < s.c; ++ch) {
      for (int br = 0; br < 3; ++br) {
        const int64_t src = ((ch / L) * 3 + br) * L + ch % L;
        float sum = 0.f;
        for (int64_t part = 0; part < chunks; ++part) sum += db_parts[part * part_b + src];
        if (out != nullptr) out[3 * ch + br] = sum * scale(ch, br);
        if (bias != nullptr && br != 1) dgamma[ch] += bias[3 * ch + br] * sum;
      }
    }
  }
  if (need_dg) {
    outs[3] = at::empty({s.c}, weight.options());
    std::copy(dgamma.begin(), dgamma.end(), outs[3].data_ptr<float>());
  }
  std::vector<at::Tensor> requested;
  for (const at::Tensor& t : outs) {
    if (t.defined()) requested.push_back(t);
  }
  return requested;
}

// c P(c^2) / Q(c^2) with c = u clamped to [-clamp, clamp] (a NaN stays NaN), P and Q
// given by their coefficients from the highest power down (Horner's rule): the odd part
// of the two GELU fits below.
template <size_t NP, size_t NQ>
inline vf odd_rational(vf u, float clamp, const float (&p)[NP], const float (&q)[NQ]) {
  const vf c = vmax(splat(-clamp), vmin(splat(clamp), u));
  const vf v = c * c;
  vf num = splat(p[0]);
  for (size_t i = 1; i < NP; ++i) num = num * v + p[i];
  vf den = splat(q[0]);
  for (size_t i = 1; i < NQ; ++i) den = den * v + q[i];
  return c * num / den;
}

// gelu(u) = u Phi(u), Phi(u) = 1/2 + c P(c^2) / Q(c^2) with c = u clamped to [-5.5, 5.5]
// and Phi clamped to [0, 1]. The rational function was fitted (least squares reweighted
// toward the minimax error, in double) to Phi(u) - 1/2 on [0, 5.5], plus a ramp of 3e-7 at
// the end: it reaches 1/2 + 1.7e-7 there, so Phi is exactly 1 (0 below) beyond the clamp
// and gelu(u) is u (0) there, as in float32 exact GELU. Error below 3e-7 |u| in float32;
// no exp. Multiply-adds, min/max and one division: 1.4x the throughput of the previous
// A&S 7.1.28 form (poly^-16) on Zen 3, and 3x more accurate. P's last coefficient is
// about 1 / sqrt(2 pi), Phi'(0).
constexpr float kPhiP[] = {7.4415493164260715e-06f, 4.156277350420871e-04f,
                           6.185110634372833e-03f, 5.870831657358246e-02f,
                           0.3989415613626975f};
constexpr float kPhiQ[] = {6.096019477888626e-07f, 1.492627931386531e-04f,
                           3.29361943709954e-03f,  4.2826902136052634e-02f,
                           0.3138151480609739f,    1.f};

inline vf gelu_fast_vec(vf u) {
  const vf phi = odd_rational(u, 5.5f, kPhiP, kPhiQ) + 0.5f;
  return u * vmax(splat(0.f), vmin(splat(1.f), phi));
}

// gelu'(u) = Phi(u) + u phi(u) = 1/2 + c P(c^2) / Q(c^2) with c = u clamped to [-6, 6]:
// the odd part, fitted in double as for Phi above (degrees 5 and 5; a ramp of -1.35e-7
// makes it 1/2 in float32 at the clamp, so gelu' is exactly 1 (0) for u >= 6 (u <= -6),
// as the float32 exact derivative rounds). Error below 4.5e-7 absolute; no exp. P's last
// coefficient is about 2 / sqrt(2 pi), gelu''(0).
constexpr float kGeluGradP[] = {1.9085629787696234e-07f, 3.584895239328034e-05f,
                                2.4214836230385117e-05f, 1.4208994805812836e-02f,
                                -3.0742069706320763e-02f, 0.7978845238685608f};
constexpr float kGeluGradQ[] = {8.886634532245807e-06f, 1.9352699746377766e-04f,
                                3.5287656355649233e-03f, 4.1065093129873276e-02f,
                                0.2948073744773865f,     1.f};

inline vf gelu_grad_vec(vf u) { return odd_rational(u, 6.f, kGeluGradP, kGeluGradQ) + 0.5f; }

// z = gelu(u), exactly as the forward computes it, and grad <- grad * gelu'(u).
inline void gelu_vec(vf u, vf& z, vf& grad) {
  z = gelu_fast_vec(u);
  grad = grad * gelu_grad_vec(u);
}

// ---------------------------------------------------------------------------------------
// Channel MLP at inference, x + fc2(GELU(fc1(LN(x)))) over the last dim, in chunks of rows:
// each thread normalises a chunk, multiplies it by fc1 into a buffer that stays in its
// cache, applies bias + GELU there and accumulates fc2's product into the output, which
// already holds x + fc2's bias. Unchunked, the 4C-wide hidden activation goes to memory
// and back three times (fc1's output, GELU in place, fc2's input), plus a pass each for
// LayerNorm's output and the residual add: on maps with few channels (QuadraNet's stages
// 1-2) those passes cost more than the chunks' smaller matrix products lose.

// C (rows x n) = beta C + A (rows x k) W^T for a row-major weight W (n x k), called from
// inside a parallel region (the products run on the calling thread). The weight is held
// detached: ATen's out= products refuse an input that requires grad while grad mode is on,
// and the pool's worker threads do not see the caller's no-grad mode.
class RowGemm {
 public:
  explicit RowGemm(const at::Tensor& w) : wt_(w.detach().t()) {}

  void run(int64_t rows, const float* a, float beta, float* c) const {
    const auto opt = at::TensorOptions().dtype(at::kFloat);
    at::Tensor at_ = at::from_blob(const_cast<float*>(a), {rows, wt_.size(0)}, opt);
    at::Tensor ct = at::from_blob(c, {rows, wt_.size(1)}, opt);
    if (beta == 0.f) {
      at::mm_out(ct, at_, wt_);
    } else {
      at::addmm_out(ct, ct, at_, wt_);
    }
  }

 private:
  at::Tensor wt_;  // W^T (k x n), a view of W
};

// out = (x - mean) * rstd * w + b over one row of c values (w, b may be null).
void normalize_row(const float* x, int64_t c, float mean, float rstd, const float* w,
                   const float* b, float* out) {
  for (int64_t j = 0; j < c; j += L) {
    const int64_t n = std::min<int64_t>(L, c - j);
    vf y = (load_n(x + j, n) - mean) * rstd;
    if (w != nullptr) y *= load_n(w + j, n);
    if (b != nullptr) y += load_n(b + j, n);
    store_n(out + j, y, n);
  }
}

// out = LayerNorm(x) over one row of c values (two passes over the row, in cache); the
// row's mean and 1 / std go to *mean_out and *rstd_out where those are not null.
void layer_norm_row(const float* x, int64_t c, const float* w, const float* b, float eps,
                    float* out, float* mean_out = nullptr, float* rstd_out = nullptr) {
  const int64_t full = c / L * L;
  vf acc = {};
  for (int64_t j = 0; j < full; j += L) acc += load(x + j);
  float mean = 0.f;
  for (int i = 0; i < L; ++i) mean += acc[i];
  for (int64_t j = full; j < c; ++j) mean += x[j];
  mean /= static_cast<float>(c);
  acc = vf{};
  for (int64_t j = 0; j < full; j += L) {
    const vf d = load(x + j) - mean;
    acc += d * d;
  }
  float var = 0.f;
  for (int i = 0; i < L; ++i) var += acc[i];
  for (int64_t j = full; j < c; ++j) var += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.f / std::sqrt(var / static_cast<float>(c) + eps);
  if (mean_out != nullptr) *mean_out = mean;
  if (rstd_out != nullptr) *rstd_out = rstd;
  normalize_row(x, c, mean, rstd, w, b, out);
}

// LayerNorm's backward over one row of c values from its saved statistics: with
// xhat = (x - mean) rstd and dy = dn w, gx = rstd (dy - mean(dy) - xhat mean(dy xhat));
// adds dn xhat to dlw and dn to dlb.
void layer_norm_backward_row(const float* x, const float* dn, int64_t c, float mean, float rstd,
                             const float* w, float* gx, float* dlw, float* dlb) {
  vf sum_dy = {}, sum_dy_xhat = {};
  for (int64_t j = 0; j < c; j += L) {
    const int64_t n = std::min<int64_t>(L, c - j);
    const vf xhat = (load_n(x + j, n) - mean) * rstd, d = load_n(dn + j, n);
    const vf dy = w != nullptr ? d * load_n(w + j, n) : d;
    sum_dy += dy;
    sum_dy_xhat += dy * xhat;
    store_n(dlw + j, load_n(dlw + j, n) + d * xhat, n);
    store_n(dlb + j, load_n(dlb + j, n) + d, n);
  }
  float a = 0.f, b = 0.f;
  for (int i = 0; i < L; ++i) {
    a += sum_dy[i];
    b += sum_dy_xhat[i];
  }
  a /= static_cast<float>(c);
  b /= static_cast<float>(c);
  for (int64_t j = 0; j < c; j += L) {
    const int64_t n = std::min<int64_t>(L, c - j);
    const vf xhat = (load_n(x + j, n) - mean) * rstd, d = load_n(dn + j, n);
    const vf dy = w != nullptr ? d * load_n(w + j, n) : d;
    store_n(gx + j, rstd * (dy - a - xhat * b), n);
  }
}

const float* optional_data(const c10::optional<at::Tensor>& t, int64_t size, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == size,
              "channel MLP: ", name, " must be a contiguous float32 tensor of ", size,
              " values, got ", t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

// Checks x (..., C) and the weights fc1 (H, C), fc2 (C, H); returns {C, H, rows}.
std::array<int64_t, 3> check_mlp(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                                 const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.dim() >= 1,
              name, ": expected a contiguous float32 CPU tensor (..., C), got ", x.scalar_type(),
              " ", x.sizes());
  const int64_t c = x.size(-1), hid = w1.size(0);
  TORCH_CHECK(w1.scalar_type() == at::kFloat && w2.scalar_type() == at::kFloat &&
                  w1.dim() == 2 && w2.dim() == 2 && w1.size(1) == c && w2.size(0) == c &&
                  w2.size(1) == hid,
              name, ": expected float32 weights fc1 (H, ", c, ") and fc2 (", c, ", H), got ",
              w1.sizes(), " and ", w2.sizes());
  return {c, hid, c > 0 ? x.numel() / c : 0};
}

// Rows per chunk: `chunk`, or 0 for about 512 KiB of hidden activation (the L2 size).
int64_t chunk_rows(int64_t chunk, int64_t hid, int64_t rows) {
  if (chunk <= 0) chunk = std::max<int64_t>(16, 131072 / std::max<int64_t>(hid, 1));
  return std::max<int64_t>(1, std::min(chunk, rows));
}

// x's shape with the last dim replaced by n.
std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

// out = (residual ? x : 0) + fc2(GELU(fc1(LN(x)))) by chunks of rows (see above). Where
// not null, u (rows x H) receives fc1's output before GELU and mean / rstd (rows) the
// LayerNorm statistics: what the training backward needs.
void mlp_forward_chunks(const at::Tensor& x, const float* lw, const float* lb, float eps,
                        const at::Tensor& w1, const float* b1, const at::Tensor& w2,
                        const float* b2, bool residual, int64_t chunk, float* out,
                        float* u, float* mean, float* rstd) {
  const int64_t c = x.size(-1), hid = w1.size(0), rows = x.numel() / c;
  const RowGemm fc1(w1), fc2(w2);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, (rows + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    Floats nbuf(chunk * c), hbuf(chunk * hid);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * chunk, r = std::min(chunk, rows - r0);
      for (int64_t i = 0; i < r; ++i) {
        const int64_t row = r0 + i;
        const float* xr = xp + row * c;
        layer_norm_row(xr, c, lw, lb, eps, nbuf.data() + i * c, mean ? mean + row : nullptr,
                       rstd ? rstd + row : nullptr);
        for (int64_t j = 0; j < c; j += L) {
          const int64_t n = std::min<int64_t>(L, c - j);
          vf o = residual ? load_n(xr + j, n) : vf{};
          if (b2 != nullptr) o += load_n(b2 + j, n);
          store_n(out + row * c + j, o, n);
        }
      }
      fc1.run(r, nbuf.data(), 0.f, hbuf.data());
      for (int64_t i = 0; i < r; ++i) {
        float* hr = hbuf.data() + i * hid;
        float* ur = u ? u + (r0 + i) * hid : nullptr;
        for (int64_t j = 0; j < hid; j += L) {
          const int64_t n = std::min<int64_t>(L, hid - j);
          vf uv = load_n(hr + j, n);
          if (b1 != nullptr) uv += load_n(b1 + j, n);
          if (ur != nullptr) store_n(ur + j, uv, n);
          store_n(hr + j, gelu_fast_vec(uv), n);
        }
      }
      fc2.run(r, hbuf.data(), 1.f, out + r0 * c);
    }
  });
}

// Returns (residual ? x : 0) + fc2(GELU(fc1(LN(x)))) for x (..., C) contiguous float32;
// fc1: w1 (H, C), b1 (H); fc2: w2 (C, H), b2 (C) (a layer scale already folded in).
// `chunk` rows per task (0: about 512 KiB of hidden activation per chunk).
at::Tensor mlp_inference(const at::Tensor& x, const c10::optional<at::Tensor>& ln_w,
                         const c10::optional<at::Tensor>& ln_b, double eps, const at::Tensor& w1,
                         const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                         const c10::optional<at::Tensor>& b2, bool residual,
                         int64_t chunk) {
  const std::array<int64_t, 3> dims = check_mlp(x, w1, w2, "mlp_inference");
  const int64_t c = dims[0], hid = dims[1], rows = dims[2];
  const float* lw = optional_data(ln_w, c, "ln_weight");
  const float* lb = optional_data(ln_b, c, "ln_bias");
  const float* b1p = optional_data(b1, hid, "fc1 bias");
  const float* b2p = optional_data(b2, c, "fc2 bias");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (rows == 0 || hid == 0) return residual ? out.copy_(x) : out.zero_();
  mlp_forward_chunks(x, lw, lb, static_cast<float>(eps), w1, b1p, w2, b2p, residual,
                     chunk_rows(chunk, hid, rows), out.data_ptr<float>(), nullptr, nullptr,
                     nullptr);
  return out;
}

// The training forward of the same MLP: returns [out, u, mean, rstd] with u = fc1's output
// before GELU (..., H) and the LayerNorm statistics (..., 1), as saved for backward.
std::vector<at::Tensor> mlp_forward(const at::Tensor& x, const c10::optional<at::Tensor>& ln_w,
                                    const c10::optional<at::Tensor>& ln_b, double eps,
                                    const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                                    const at::Tensor& w2, const c10::optional<at::Tensor>& b2,
                                    bool residual, int64_t chunk) {
  const std::array<int64_t, 3> dims = check_mlp(x, w1, w2, "mlp_forward");
  const int64_t c = dims[0], hid = dims[1], rows = dims[2];
  TORCH_CHECK(rows > 0 && hid > 0, "mlp_forward: empty input ", x.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor u = at::empty(with_last(x, hid), x.options());
  at::Tensor mean = at::empty(with_last(x, 1), x.options());
  at::Tensor rstd = at::empty(with_last(x, 1), x.options());
  mlp_forward_chunks(x, optional_data(ln_w, c, "ln_weight"), optional_data(ln_b, c, "ln_bias"),
                     static_cast<float>(eps), w1, optional_data(b1, hid, "fc1 bias"), w2,
                     optional_data(b2, c, "fc2 bias"), residual, chunk_rows(chunk, hid, rows),
                     out.data_ptr<float>(), u.data_ptr<float>(), mean.data_ptr<float>(),
                     rstd.data_ptr<float>());
  return {out, u, mean, rstd};
}

// Backward of mlp_forward by the same chunks, every activation-sized intermediate in cache:
// per chunk dZ = G W2 (w2: fc2's weight with the layer scale folded in), Z and dU = dZ *
// GELU'(U) in one pass, M += G^T Z, N = LN(x) from the saved statistics, dW1 += dU^T N,
// dN = dU W1, then LayerNorm's backward row by row. Sums are kept per thread and added in
// thread order. Returns [grad_x, grad_ln_weight, grad_ln_bias, grad_w1, grad_b1,
// M = G^T Z (C, H), column sums of G (C)]; the caller forms fc2's and the layer scale's
// gradients from M.
std::vector<at::Tensor> mlp_backward(const at::Tensor& x, const at::Tensor& mean,
                                     const at::Tensor& rstd, const at::Tensor& u,
                                     const at::Tensor& grad, const c10::optional<at::Tensor>& ln_w,
                                     const c10::optional<at::Tensor>& ln_b, const at::Tensor& w1,
                                     const at::Tensor& w2, int64_t chunk) {
  const std::array<int64_t, 3> dims = check_mlp(x, w1, w2, "mlp_backward");
  const int64_t c = dims[0], hid = dims[1], rows = dims[2];
  TORCH_CHECK(rows > 0 && hid > 0, "mlp_backward: empty input ", x.sizes());
  for (const at::Tensor* t : {&mean, &rstd, &u, &grad}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "mlp_backward: saved tensors and grad must be contiguous float32");
  }
  TORCH_CHECK(grad.sizes() == x.sizes() && u.numel() == rows * hid && mean.numel() == rows &&
                  rstd.numel() == rows,
              "mlp_backward: grad ", grad.sizes(), ", u ", u.sizes(), " and the statistics do ",
              "not match x ", x.sizes());
  const float* lw = optional_data(ln_w, c, "ln_weight");
  const float* lb = optional_data(ln_b, c, "ln_bias");
  chunk = chunk_rows(chunk, hid, rows);
  const RowGemm dz_of_g(w2.t());  // G (r x C) W2 (C x H)
  const RowGemm dn_of_du(w1.t());  // dU (r x H) W1 (H x C)
  const int64_t threads = at::get_num_threads();
  const auto opt = x.options();
  at::Tensor acc_m = at::zeros({threads, c, hid}, opt), acc_w1 = at::zeros({threads, hid, c}, opt);
  // per thread, in double: db1 | dln_w | dln_b | column sums of G (in float per chunk)
  at::Tensor acc_vec = at::zeros({threads, hid + 3 * c}, opt.dtype(at::kDouble));
  at::Tensor grad_x = at::empty(x.sizes(), opt);
  const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>(), *up = u.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  at::parallel_for(0, (rows + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "mlp_backward: thread ", tid, " of ", threads);
    at::Tensor m_t = acc_m[tid], w1_t = acc_w1[tid];
    double* total = acc_vec[tid].data_ptr<double>();
    Floats vec(hid + 3 * c);
    float *db1 = vec.data(), *dlw = db1 + hid, *dlb = dlw + c, *gsum = dlb + c;
    Floats zbuf(chunk * hid), dubuf(chunk * hid), nbuf(chunk * c), dnbuf(chunk * c);
    const auto fopt = at::TensorOptions().dtype(at::kFloat);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * chunk, r = std::min(chunk, rows - r0);
      const float* g = gp + r0 * c;
      std::fill(vec.begin(), vec.end(), 0.f);
      dz_of_g.run(r, g, 0.f, dubuf.data());
      for (int64_t i = 0; i < r; ++i) {
        const float* ur = up + (r0 + i) * hid;
        float *zr = zbuf.data() + i * hid, *dur = dubuf.data() + i * hid;
        for (int64_t j = 0; j < hid; j += L) {
          const int64_t n = std::min<int64_t>(L, hid - j);
          vf zv, dv = load_n(dur + j, n);
          gelu_vec(load_n(ur + j, n), zv, dv);
          store_n(zr + j, zv, n);
          store_n(dur + j, dv, n);
          store_n(db1 + j, load_n(db1 + j, n) + dv, n);
        }
      }
      const at::Tensor g_t = at::from_blob(const_cast<float*>(g), {r, c}, fopt);
      const at::Tensor z_t = at::from_blob(zbuf.data(), {r, hid}, fopt);
      const at::Tensor du_t = at::from_blob(dubuf.data(), {r, hid}, fopt);
      const at::Tensor n_t = at::from_blob(nbuf.data(), {r, c}, fopt);
      at::addmm_out(m_t, m_t, g_t.t(), z_t);
      for (int64_t i = 0; i < r; ++i) {  // N = LN(x) from the saved statistics
        const int64_t row = r0 + i;
        normalize_row(xp + row * c, c, mp[row], rp[row], lw, lb, nbuf.data() + i * c);
      }
      at::addmm_out(w1_t, w1_t, du_t.t(), n_t);
      dn_of_du.run(r, dubuf.data(), 0.f, dnbuf.data());
      for (int64_t i = 0; i < r; ++i) {  // LayerNorm's backward, row by row
        const int64_t row = r0 + i;
        const float* gr = g + i * c;
        layer_norm_backward_row(xp + row * c, dnbuf.data() + i * c, c, mp[row], rp[row], lw,
                                gxp + row * c, dlw, dlb);
        for (int64_t j = 0; j < c; j += L) {
          const int64_t n = std::min<int64_t>(L, c - j);
          store_n(gsum + j, load_n(gsum + j, n) + load_n(gr + j, n), n);
        }
      }
      for (size_t j = 0; j < vec.size(); ++j) total[j] += vec[j];
    }
  });
  const at::Tensor vec = acc_vec.sum(0).to(at::kFloat);
  return {grad_x,
          vec.narrow(0, hid, c),
          vec.narrow(0, hid + c, c),
          acc_w1.sum(0),
          vec.narrow(0, 0, hid),
          acc_m.sum(0),
          vec.narrow(0, hid + 2 * c, c)};
}

}  // namespace

TORCH_LIBRARY(quadranet_cpu, m) {
  m.def(
      "quadratic_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, bool want_y, "
      "bool want_ab, Tensor? residual=None) -> Tensor[]");
  m.def(
      "quadratic_backward(Tensor x, Tensor weight, Tensor? bias, Tensor? gamma, Tensor a, "
      "Tensor b, Tensor grad, bool need_dx, bool need_dw, bool need_db, bool need_dg) "
      "-> Tensor[]");
  m.def(
      "mlp_inference(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor w1, "
      "Tensor? b1, Tensor w2, Tensor? b2, bool residual, int chunk=0) -> Tensor");
  m.def(
      "mlp_forward(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor w1, "
      "Tensor? b1, Tensor w2, Tensor? b2, bool residual, int chunk=0) -> Tensor[]");
  m.def(
      "mlp_backward(Tensor x, Tensor mean, Tensor rstd, Tensor u, Tensor grad, "
      "Tensor? ln_weight, Tensor? ln_bias, Tensor w1, Tensor w2, int chunk=0) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(quadranet_cpu, CPU, m) {
  m.impl("quadratic_forward", &quadratic_forward);
  m.impl("quadratic_backward", &quadratic_backward);
  m.impl("mlp_inference", &mlp_inference);
  m.impl("mlp_forward", &mlp_forward);
  m.impl("mlp_backward", &mlp_backward);
}

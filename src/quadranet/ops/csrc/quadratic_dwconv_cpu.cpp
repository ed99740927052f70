// CPU kernels of the depthwise quadratic convolution (float32, channels-last memory):
//   * forward: y = a * b + c (+ residual), where a, b, c are depthwise k x k convolutions of
//     x (stride 1, dilation 1, padding k / 2) with the fused weight (3C, 1, k, k) whose
//     channel 3 * ch + branch holds branch (a, b, c) of input channel ch;
//   * backward: dx and the fused weight / bias gradients in one pass over the data.
// They are backends of the `quadranet::quadratic_dwconv` ops (see quadranet/ops): the
// Python side folds the layer scale into the weights and decides when these kernels apply.
//
// Vectors are GCC vector extensions of 8 floats (AVX2 + FMA where the build enables
// them, pairs of SSE registers otherwise); channels are processed in blocks of 8. Each task (one image,
// a band of output rows) copies one channel block of its rows plus a k / 2 halo into a
// zero-padded buffer [rows + 2p][W + 2p][8], so the inner loops have no bounds checks.
// Small batches also split the channel blocks among tasks, so every thread has work.
// Weight gradients are summed per chunk of tasks (one chunk per thread), then reduced in
// chunk order: the result is deterministic for a given thread count.

// Only the headers needed (not torch/extension.h) keep the just-in-time build short; the
// ops are registered with the dispatcher and called as torch.ops.quadranet_cpu.*.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

namespace {

constexpr int L = 8;          // lanes: channels per block
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
#if defined(__x86_64__)
  asm("" : "+x"(v));
#else
  (void)v;
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

// Returns the requested ones of [y, a, b, c], in that order; with `residual` (x's shape,
// channels-last), y = residual + a * b + c.
std::vector<at::Tensor> quadratic_forward(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, bool want_y,
                                          bool want_a, bool want_b, bool want_c,
                                          const c10::optional<at::Tensor>& residual) {
  check_input(x, weight, "quadratic_forward");
  const float* res = nullptr;
  if (residual.has_value() && residual->defined()) {
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

// Returns the requested ones of [dx, dweight, dbias] of y = a * b + c given a, b and
// grad = dL/dy, in that order. dweight / dbias use the fused (3C, 1, k, k) / (3C) layouts.
std::vector<at::Tensor> quadratic_backward(const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& a_in, const at::Tensor& b_in,
                                           const at::Tensor& grad_in, bool need_dx,
                                           bool need_dw, bool need_db) {
  check_input(x, weight, "quadratic_backward");
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor a = a_in.contiguous(cl), b = b_in.contiguous(cl), g = grad_in.contiguous(cl);
  for (const at::Tensor* t : {&a, &b, &g}) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == at::kFloat,
                "quadratic_backward: a, b and grad must be float32 of x's shape ", x.sizes());
  }
  const Shape s(x, weight.size(2));
  const int64_t taps = s.taps();
  std::vector<at::Tensor> outs(3);
  float* dx = nullptr;
  if (need_dx) {
    outs[0] = like_nhwc(x);
    dx = outs[0].data_ptr<float>();
  }
  const bool want_dw = need_dw || need_db;
  const int64_t groups = s.groups(), tasks = s.tasks() * groups;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const int64_t part_w = s.blocks * 3 * taps * L, part_b = s.blocks * 3 * L;
  Floats dw_parts(want_dw ? chunks * part_w : 0, 0.f);
  Floats db_parts(chunks * part_b, 0.f);
  if (x.numel() > 0 && (need_dx || want_dw)) {
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
  if (need_dw) {
    outs[1] = at::empty(weight.sizes(), weight.options());
    float* out = outs[1].data_ptr<float>();
    for (int64_t ch = 0; ch < s.c; ++ch) {
      for (int br = 0; br < 3; ++br) {
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t src = (((ch / L) * 3 + br) * taps + t) * L + ch % L;
          float sum = 0.f;
          for (int64_t part = 0; part < chunks; ++part) sum += dw_parts[part * part_w + src];
          out[(3 * ch + br) * taps + t] = sum;
        }
      }
    }
  }
  if (need_db) {
    outs[2] = at::empty({3 * s.c}, weight.options());
    float* out = outs[2].data_ptr<float>();
    for (int64_t ch = 0; ch < s.c; ++ch) {
      for (int br = 0; br < 3; ++br) {
        const int64_t src = ((ch / L) * 3 + br) * L + ch % L;
        float sum = 0.f;
        for (int64_t part = 0; part < chunks; ++part) sum += db_parts[part * part_b + src];
        out[3 * ch + br] = sum;
      }
    }
  }
  std::vector<at::Tensor> requested;
  for (const at::Tensor& t : outs) {
    if (t.defined()) requested.push_back(t);
  }
  return requested;
}

}  // namespace

TORCH_LIBRARY(quadranet_cpu, m) {
  m.def(
      "quadratic_forward(Tensor x, Tensor weight, Tensor? bias, bool want_y, bool want_a, "
      "bool want_b, bool want_c, Tensor? residual=None) -> Tensor[]");
  m.def(
      "quadratic_backward(Tensor x, Tensor weight, Tensor a, Tensor b, Tensor grad, "
      "bool need_dx, bool need_dw, bool need_db) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(quadranet_cpu, CPU, m) {
  m.impl("quadratic_forward", &quadratic_forward);
  m.impl("quadratic_backward", &quadratic_backward);
}

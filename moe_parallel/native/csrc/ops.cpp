// torch.ops.moe_serve.*: tensor validation, allocation and the calls into the raw-pointer driver
// (moe.cpp), packing (pack.cpp) and ISA choice (dispatch.cpp). The only unit that sees torch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "attention.h"
#include "bf16.h"
#include "dispatch.h"
#include "exchange.h"
#include "moe.h"
#include "rotary.h"

namespace moe_serve {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool check_dtype(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "moe_serve: ", what, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "moe_serve: ", what,
              " must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

// Whether float32 or bfloat16 weights (not int8 codes) are packed in halves for the running kernels.
bool in_halves(bool bf16) { return bf16 ? kernels().bf16_halves : kernels().f32_halves; }

// Shape of the packed tensor for w [x, n, k] (layout in kernels.h); int8 codes take the float32
// order of whole k-rows (`codes`), float32 weights the running kernels' (halves or not).
std::vector<int64_t> packed_sizes(int64_t x, int64_t n, int64_t k, bool gated, bool bf16, bool codes = false) {
  const int64_t blocks = ceil_div(gated ? n / 2 : n, kBlock), width = gated ? 2 * kBlock : kBlock;
  if (bf16 && in_halves(true)) return {x, blocks, 2, ceil_div(k, 2), width / 2, 2};
  if (bf16) return {x, blocks, ceil_div(k, 2), width, 2};
  if (!codes && in_halves(false)) return {x, blocks, 2, k, width / 2};
  return {x, blocks, k, width};
}

// int4 codes: [x, blocks, k, width / 2] bytes (kernels.h).
std::vector<int64_t> packed_q4_sizes(int64_t x, int64_t n, int64_t k, bool gated) {
  const int64_t blocks = ceil_div(gated ? n / 2 : n, kBlock), width = gated ? 2 * kBlock : kBlock;
  return {x, blocks, k, width / 2};
}

// float32 / bfloat16 weights, or int8 codes (packed in the float32 order).
bool check_weight_dtype(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kChar) {
    TORCH_CHECK(t.device().is_cpu(), "moe_serve: ", what, " must be on the CPU, got ", t.device());
    return false;
  }
  return check_dtype(t, what);
}

void pack_any(const at::Tensor& w, at::Tensor& out, int64_t x, int64_t n, int64_t k, bool gated, bool bf16) {
  const int threads = at::get_num_threads();
  if (w.scalar_type() == at::kChar) {
    pack_i8(w.data_ptr<int8_t>(), out.data_ptr<int8_t>(), x, n, k, gated, threads);
  } else if (bf16) {
    pack_bf16(static_cast<const bf16_t*>(w.data_ptr()), static_cast<bf16_t*>(out.data_ptr()), x, n, k, gated,
              threads, in_halves(true));
  } else {
    pack_f32(w.data_ptr<float>(), out.data_ptr<float>(), x, n, k, gated, threads, in_halves(false));
  }
}

at::Tensor prepack(const at::Tensor& w, bool gated) {
  const bool bf16 = check_weight_dtype(w, "prepack's weight");
  TORCH_CHECK(w.dim() == 3 || w.dim() == 2, "moe_serve.prepack: expected w [X, N, K] or [N, K], got shape ",
              w.sizes());
  const at::Tensor w3 = (w.dim() == 2 ? w.unsqueeze(0) : w).contiguous();
  const int64_t x = w3.size(0), n = w3.size(1), k = w3.size(2);
  TORCH_CHECK(n > 0 && k > 0, "moe_serve.prepack: empty weight of shape ", w.sizes());
  TORCH_CHECK(!gated || n % 2 == 0, "moe_serve.prepack: gated=True needs N = 2F (w1 over w3), got N = ", n);
  at::Tensor out = at::empty(packed_sizes(x, n, k, gated, bf16, w3.scalar_type() == at::kChar), w3.options());
  pack_any(w3, out, x, n, k, gated, bf16);
  return w.dim() == 2 ? out.squeeze(0) : out;
}

// The same packing into a preallocated, contiguous `out` of prepack's shape: loading packs each
// checkpoint tensor through one reused buffer instead of a fresh allocation per tensor.
void prepack_into(const at::Tensor& w, at::Tensor out, bool gated) {
  const bool bf16 = check_weight_dtype(w, "prepack_into's weight");
  TORCH_CHECK(w.dim() == 2, "moe_serve.prepack_into: expected one expert's w [N, K], got shape ", w.sizes());
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1);
  TORCH_CHECK(n > 0 && k > 0 && (!gated || n % 2 == 0), "moe_serve.prepack_into: bad weight shape ", w.sizes());
  std::vector<int64_t> want = packed_sizes(1, n, k, gated, bf16, wc.scalar_type() == at::kChar);
  want.erase(want.begin());
  TORCH_CHECK(out.scalar_type() == wc.scalar_type() && out.is_contiguous() && out.sizes() == at::IntArrayRef(want),
              "moe_serve.prepack_into: out must be a contiguous ", wc.scalar_type(), " tensor of shape ",
              at::IntArrayRef(want), ", got ", out.scalar_type(), " ", out.sizes());
  pack_any(wc, out, 1, n, k, gated, bf16);
}

// Column scales s [X, N] (or one expert's [N]) of int8 codes w [X, N, K] in the packed column
// order (moe.h, pack_scales): [X, ceil(N/32) * 32] plain, [X, ceil(F/32), 64] gated.
at::Tensor prepack_scales(const at::Tensor& s_in, bool gated) {
  TORCH_CHECK(s_in.device().is_cpu() && (s_in.dim() == 1 || s_in.dim() == 2), "moe_serve.prepack_scales: expected ",
              "a CPU scale [X, N] or [N], got ", s_in.sizes(), " on ", s_in.device());
  const at::Tensor s = (s_in.dim() == 1 ? s_in.unsqueeze(0) : s_in).to(at::kFloat).contiguous();
  const int64_t x = s.size(0), n = s.size(1);
  TORCH_CHECK(n > 0 && (!gated || n % 2 == 0), "moe_serve.prepack_scales: bad scale shape ", s_in.sizes());
  const int64_t per = packed_scale_numel(1, n, gated);
  at::Tensor out = gated ? at::empty({x, per / (2 * kBlock), 2 * kBlock}, s.options()) : at::empty({x, per}, s.options());
  pack_scales(s.data_ptr<float>(), out.data_ptr<float>(), x, n, gated);
  return s_in.dim() == 1 ? out.squeeze(0) : out;
}

// Signed int4 codes q [X, N, K] (or [N, K]) in [-8, 7], int8, into the int4 nibble layout (uint8).
at::Tensor checked_q4_codes(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kChar && (w.dim() == 2 || w.dim() == 3), op,
              "expected CPU int8 codes [X, N, K] or [N, K], got ", w.scalar_type(), " ", w.sizes(), " on ", w.device());
  TORCH_CHECK(w.size(-1) > 0 && w.size(-1) % 2 == 0 && w.size(-2) > 0, op, "K must be even and N positive, got ",
              w.sizes());
  const at::Tensor wc = w.contiguous();
  if (wc.numel()) {
    const auto [lo, hi] = at::aminmax(wc);
    TORCH_CHECK(lo.item<int8_t>() >= -8 && hi.item<int8_t>() <= 7, op, "int4 codes must lie in [-8, 7], got [",
                int(lo.item<int8_t>()), ", ", int(hi.item<int8_t>()), "]");
  }
  return wc;
}

at::Tensor prepack_q4(const at::Tensor& w, bool gated) {
  const char* op = "moe_serve.prepack_q4: ";
  const at::Tensor wc = checked_q4_codes(w, op);
  const at::Tensor w3 = wc.dim() == 2 ? wc.unsqueeze(0) : wc;
  const int64_t x = w3.size(0), n = w3.size(1), k = w3.size(2);
  TORCH_CHECK(!gated || n % 2 == 0, op, "gated=True needs N = 2F (w1 over w3), got N = ", n);
  at::Tensor out = at::empty(packed_q4_sizes(x, n, k, gated), w3.options().dtype(at::kByte));
  pack_i4(w3.data_ptr<int8_t>(), out.data_ptr<uint8_t>(), x, n, k, gated, at::get_num_threads());
  return w.dim() == 2 ? out.squeeze(0) : out;
}

void prepack_q4_into(const at::Tensor& w, at::Tensor out, bool gated) {
  const char* op = "moe_serve.prepack_q4_into: ";
  const at::Tensor wc = checked_q4_codes(w, op);
  TORCH_CHECK(wc.dim() == 2 && (!gated || wc.size(0) % 2 == 0), op, "expected one expert's codes [N, K], got ",
              w.sizes());
  std::vector<int64_t> want = packed_q4_sizes(1, wc.size(0), wc.size(1), gated);
  want.erase(want.begin());
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous() && out.sizes() == at::IntArrayRef(want), op,
              "out must be a contiguous uint8 tensor of shape ", at::IntArrayRef(want), ", got ", out.scalar_type(),
              " ", out.sizes());
  pack_i4(wc.data_ptr<int8_t>(), out.data_ptr<uint8_t>(), 1, wc.size(0), wc.size(1), gated, at::get_num_threads());
}

// Shape of the packed int4 scales and biases of [x, n] outputs in `groups` groups.
std::vector<int64_t> q4_scale_sizes(int64_t x, int64_t n, int64_t groups, bool gated) {
  const int64_t blocks = ceil_div(gated ? n / 2 : n, kBlock), width = gated ? 2 * kBlock : kBlock;
  return {x, blocks, groups, 2, width};
}

// Scales [X, N, K/G] (or [N, K/G]) and zero points (int8, same shape; None: symmetric) of int4 codes
// -> the packed [X, blocks, K/G, 2, width] float32 scales and biases.
at::Tensor prepack_q4_scales(const at::Tensor& s_in, const c10::optional<at::Tensor>& z_in, bool gated) {
  const char* op = "moe_serve.prepack_q4_scales: ";
  TORCH_CHECK(s_in.device().is_cpu() && (s_in.dim() == 2 || s_in.dim() == 3), op,
              "expected CPU scales [X, N, K/G] or [N, K/G], got ", s_in.sizes(), " on ", s_in.device());
  const at::Tensor s = (s_in.dim() == 2 ? s_in.unsqueeze(0) : s_in).to(at::kFloat).contiguous();
  const int64_t x = s.size(0), n = s.size(1), groups = s.size(2);
  TORCH_CHECK(n > 0 && groups > 0 && (!gated || n % 2 == 0), op, "bad scale shape ", s_in.sizes());
  at::Tensor z;
  if (z_in.has_value()) {
    TORCH_CHECK(z_in->sizes() == s_in.sizes() && z_in->device().is_cpu(), op, "zero points must be of the scales' ",
                "shape ", s_in.sizes(), ", got ", z_in->sizes());
    z = (z_in->dim() == 2 ? z_in->unsqueeze(0) : *z_in).to(at::kChar).contiguous();
  }
  at::Tensor out = at::empty(q4_scale_sizes(x, n, groups, gated), s.options());
  pack_q4_scales(s.data_ptr<float>(), z.defined() ? z.data_ptr<int8_t>() : nullptr, out.data_ptr<float>(), x, n,
                 groups, gated);
  return s_in.dim() == 2 ? out.squeeze(0) : out;
}

void check_packed(const at::Tensor& w, const char* name, int64_t x, int64_t n, int64_t k, bool gated, bool bf16,
                  at::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype, "moe_serve: ", name, " must be a CPU ", dtype,
              " tensor like x, got ", w.scalar_type(), " on ", w.device());
  const std::vector<int64_t> want = packed_sizes(x, n, k, gated, bf16, dtype == at::kChar);
  TORCH_CHECK(w.sizes() == at::IntArrayRef(want), "moe_serve: ", name, " has shape ", w.sizes(), ", expected ",
              at::IntArrayRef(want), " for ", x, " experts, hidden ", gated ? k : n, ", intermediate ",
              gated ? n / 2 : k, " (pack it with prepack(", gated ? "w13, gated=True" : "w2", "))");
  TORCH_CHECK(w.is_contiguous(), "moe_serve: ", name, " must be contiguous (as prepack returns it)");
}

// The packed w13 / w2 of x experts: float in the activation dtype, int8 codes with their column
// scales (prepack_scales of each weight's [X, N] scales, float32, required then and only then), or
// int4 codes (uint8) with their packed scales and biases (prepack_q4_scales; the group size follows).
struct ExpertWeights {
  bool q8 = false;
  int64_t q4_group = 0;
  const float* s13 = nullptr;
  const float* s2 = nullptr;
};

ExpertWeights check_q4_experts(const at::Tensor& w13, const at::Tensor& w2, int64_t x, int64_t d, int64_t f,
                               const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2) {
  ExpertWeights e;
  for (const auto& [w, n, k, gated, name] : {std::tuple{&w13, 2 * f, d, true, "w13_packed"},
                                             std::tuple{&w2, d, f, false, "w2_packed"}}) {
    const std::vector<int64_t> want = packed_q4_sizes(x, n, k, gated);
    TORCH_CHECK(w->device().is_cpu() && w->is_contiguous() && w->sizes() == at::IntArrayRef(want), "moe_serve: ",
                name, " (int4 codes) must be a contiguous CPU uint8 tensor of shape ", at::IntArrayRef(want),
                " as prepack_q4 returns it, got ", w->sizes());
  }
  TORCH_CHECK(s13.has_value() && s2.has_value(), "moe_serve: int4 packed weights need w13_scale and w2_scale");
  int64_t group = 0;
  for (const auto& [t, n, k, gated, name] : {std::tuple{&*s13, 2 * f, d, true, "w13_scale"},
                                             std::tuple{&*s2, d, f, false, "w2_scale"}}) {
    const int64_t groups = t->dim() == 5 ? t->size(2) : 0;
    TORCH_CHECK(groups > 0 && k % groups == 0 && t->device().is_cpu() && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->sizes() == at::IntArrayRef(q4_scale_sizes(x, n, groups, gated)),
                "moe_serve: ", name, " must be a contiguous CPU float32 tensor of shape [", x, ", ",
                ceil_div(gated ? n / 2 : n, kBlock), ", ", k, " / group, 2, ", gated ? 2 * kBlock : kBlock,
                "] as prepack_q4_scales returns it, got ", t->scalar_type(), " ", t->sizes());
    const int64_t g = k / groups;
    TORCH_CHECK(g % 2 == 0 && (group == 0 || g == group), "moe_serve: int4 groups must be even and the same for ",
                "w13 and w2, got ", group ? group : g, " and ", g);
    group = g;
  }
  e.q4_group = group;
  e.s13 = s13->data_ptr<float>();
  e.s2 = s2->data_ptr<float>();
  return e;
}

ExpertWeights check_experts(const at::Tensor& w13, const at::Tensor& w2, int64_t x, int64_t d, int64_t f,
                            at::ScalarType act, const c10::optional<at::Tensor>& s13,
                            const c10::optional<at::Tensor>& s2) {
  if (w13.scalar_type() == at::kByte) {
    TORCH_CHECK(w2.scalar_type() == at::kByte, "moe_serve: w13_packed holds int4 codes and w2_packed ",
                w2.scalar_type());
    TORCH_CHECK(kernels().gate_up_q4_f32 != nullptr, "moe_serve: the ", current_isa(), " kernels have no int4 ",
                "products (has_q4() is False)");
    return check_q4_experts(w13, w2, x, d, f, s13, s2);
  }
  ExpertWeights e;
  e.q8 = w13.scalar_type() == at::kChar;
  const bool bf16 = act == at::kBFloat16 && !e.q8;
  check_packed(w13, "w13_packed", x, 2 * f, d, true, bf16, e.q8 ? at::kChar : act);
  check_packed(w2, "w2_packed", x, d, f, false, bf16, e.q8 ? at::kChar : act);
  if (!e.q8) {
    TORCH_CHECK(!s13.has_value() && !s2.has_value(), "moe_serve: scales are for int8 and int4 packed weights only");
    return e;
  }
  TORCH_CHECK(s13.has_value() && s2.has_value(), "moe_serve: int8 packed weights need w13_scale and w2_scale");
  for (const auto& [t, n, gated, name] : {std::tuple{&*s13, 2 * f, true, "w13_scale"},
                                          std::tuple{&*s2, d, false, "w2_scale"}}) {
    const int64_t per = packed_scale_numel(1, n, gated);
    const std::vector<int64_t> want = gated ? std::vector<int64_t>{x, per / (2 * kBlock), 2 * kBlock}
                                            : std::vector<int64_t>{x, per};
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef(want),
                "moe_serve: ", name, " must be a contiguous CPU float32 tensor of shape ", at::IntArrayRef(want),
                " as prepack_scales returns it for ", x, " experts of ", n, " outputs, got ", t->scalar_type(), " ",
                t->sizes());
  }
  e.s13 = s13->data_ptr<float>();
  e.s2 = s2->data_ptr<float>();
  return e;
}

// Checks x and both packed weights (and int8 scales); returns the problem with sizes and pointers filled in.
MoeProblem problem(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, int64_t num_experts,
                   int64_t f, const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2) {
  MoeProblem p;
  p.bf16 = check_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "moe_serve: x must be [T, D], got shape ", x.sizes());
  TORCH_CHECK(f > 0, "moe_serve: intermediate must be positive, got ", f);
  TORCH_CHECK(w13.dim() >= 1 && w13.size(0) == num_experts && w2.dim() >= 1 && w2.size(0) == num_experts,
              "moe_serve: the packed weights hold ", w13.dim() ? w13.size(0) : 0, " and ", w2.dim() ? w2.size(0) : 0,
              " experts, expected num_local_experts = ", num_experts);
  p.tokens = x.size(0);
  p.d = x.size(1);
  p.f = f;
  const ExpertWeights e = check_experts(w13, w2, num_experts, p.d, f, x.scalar_type(), s13, s2);
  p.q8 = e.q8, p.q4_group = e.q4_group, p.s13 = e.s13, p.s2 = e.s2;
  p.w13 = w13.data_ptr();
  p.w2 = w2.data_ptr();
  p.num_experts = num_experts;
  p.threads = at::get_num_threads();
  return p;
}

void set_ids(MoeProblem& p, const at::Tensor& ids) {
  TORCH_CHECK(ids.device().is_cpu() && (ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong),
              "moe_serve: expert ids must be a CPU int32 or int64 tensor, got ", ids.scalar_type());
  p.ids64 = ids.scalar_type() == at::kLong;
  p.ids = ids.data_ptr();
}

at::Tensor fused_moe(const at::Tensor& x_in, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                     const at::Tensor& w13, const at::Tensor& w2, int64_t first_expert, int64_t num_local_experts,
                     int64_t intermediate, const c10::optional<at::Tensor>& s13,
                     const c10::optional<at::Tensor>& s2) {
  const at::Tensor x = x_in.contiguous();
  MoeProblem p = problem(x, w13, w2, num_local_experts, intermediate, s13, s2);
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == p.tokens, "moe_serve.fused_moe: topk_ids must be [T, K] ",
              "with T = ", p.tokens, ", got shape ", topk_ids.sizes());
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes() && topk_weights.scalar_type() == at::kFloat,
              "moe_serve.fused_moe: topk_weights must be float32 of topk_ids' shape ", topk_ids.sizes(), ", got ",
              topk_weights.scalar_type(), " ", topk_weights.sizes());
  const at::Tensor ids = topk_ids.contiguous(), weights = topk_weights.contiguous();
  at::Tensor out = at::empty({p.tokens, p.d}, x.options());
  if (p.tokens == 0) return out;
  set_ids(p, ids);
  p.topk = ids.size(1);
  p.weights = weights.data_ptr<float>();
  p.first_expert = first_expert;
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  run_moe(p);
  return out;
}

at::Tensor fused_experts_rows(const at::Tensor& x_in, const at::Tensor& local_ids, const at::Tensor& w13,
                              const at::Tensor& w2, int64_t intermediate, const c10::optional<at::Tensor>& s13,
                              const c10::optional<at::Tensor>& s2) {
  const at::Tensor x = x_in.contiguous();
  MoeProblem p = problem(x, w13, w2, w13.dim() ? w13.size(0) : 0, intermediate, s13, s2);
  TORCH_CHECK(local_ids.dim() == 1 && local_ids.size(0) == p.tokens,
              "moe_serve.fused_experts_rows: local_ids must be [N] with N = ", p.tokens, ", got shape ",
              local_ids.sizes());
  const at::Tensor ids = local_ids.contiguous();
  at::Tensor out = at::empty({p.tokens, p.d}, x.options());
  if (p.tokens == 0) return out;
  set_ids(p, ids);
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  const int64_t skipped = run_moe(p);
  TORCH_CHECK(skipped == 0, "moe_serve.fused_experts_rows: ", skipped, " local_ids outside [0, ", p.num_experts,
              ")");
  return out;
}

// out = x w^T for w [n, k] packed plain (prepack(w)), x [T, k]: [T, n] in x's dtype.
at::Tensor dense(const at::Tensor& x_in, const at::Tensor& w, int64_t n) {
  const at::Tensor x = x_in.contiguous();
  DenseProblem p;
  p.bf16 = check_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "moe_serve.dense: x must be [T, K], got shape ", x.sizes());
  p.rows = x.size(0);
  p.k = x.size(1);
  p.n = n;
  TORCH_CHECK(n > 0 && p.k > 0, "moe_serve.dense: empty product: n = ", n, ", k = ", p.k);
  TORCH_CHECK(!p.bf16 || p.k % 2 == 0, "moe_serve.dense: bfloat16 needs an even K, got ", p.k);
  const bool one = w.dim() + 1 == int64_t(packed_sizes(1, n, p.k, false, p.bf16).size());  // of a 2-D weight
  check_packed(one ? w.unsqueeze(0) : w, "w_packed", 1, n, p.k, false, p.bf16,
               x.scalar_type());
  TORCH_CHECK(w.is_contiguous(), "moe_serve.dense: w_packed must be contiguous (as prepack returns it)");
  at::Tensor out = at::empty({p.rows, n}, x.options());
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.out = out.data_ptr();
  p.threads = at::get_num_threads();
  run_dense(p);
  return out;
}

// out[b, h] = softmax_j((q[b, h] . K[ctx_slots[b, j], h / (H/G)]) * scale) V[...] over the positions
// j <= q_pos[b] (and j > q_pos[b] - window when window > 0), read straight from one layer's cache.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& ctx_slots_in, const at::Tensor& q_pos_in, int64_t window, double scale) {
  const char* op = "moe_serve.decode_attention: ";
  const bool bf16 = check_dtype(q_in, "decode_attention's q");
  TORCH_CHECK(q_in.dim() == 3, op, "q must be [B, H, Dh], got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), op, "k_cache and v_cache must both be ",
              "one layer's [S, G, Dh] (cache.k[layer]), got shapes ", k_cache.sizes(), " and ", v_cache.sizes());
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q_in.scalar_type(), op, "k_cache and v_cache must be ",
                "CPU ", q_in.scalar_type(), " tensors like q, got ", t->scalar_type(), " on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, "k_cache and v_cache must be contiguous (one layer of the cache)");
  }
  const int64_t b = q_in.size(0), h = q_in.size(1), dh = q_in.size(2), s = k_cache.size(0), g = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == dh, op, "q's head dim ", dh, " differs from the cache's ", k_cache.size(2));
  TORCH_CHECK(g > 0 && h % g == 0, op, "the query heads H = ", h, " must be a multiple of the KV heads G = ", g);
  TORCH_CHECK(dh > 0 && dh <= kAttnMaxDh, op, "head dim must be in [1, ", kAttnMaxDh, "], got ", dh);
  TORCH_CHECK(ctx_slots_in.device().is_cpu() && ctx_slots_in.scalar_type() == at::kLong && ctx_slots_in.dim() == 2 &&
                  ctx_slots_in.size(0) == b,
              op, "ctx_slots must be a CPU int64 [B, L] tensor with B = ", b, ", got ", ctx_slots_in.scalar_type(),
              " ", ctx_slots_in.sizes(), " on ", ctx_slots_in.device());
  TORCH_CHECK(q_pos_in.device().is_cpu() && q_pos_in.scalar_type() == at::kLong && q_pos_in.dim() == 1 &&
                  q_pos_in.size(0) == b,
              op, "q_pos must be a CPU int64 [B] tensor with B = ", b, ", got ", q_pos_in.scalar_type(), " ",
              q_pos_in.sizes(), " on ", q_pos_in.device());
  TORCH_CHECK(window >= 0, op, "window must be >= 0 (0: none), got ", window);
  const at::Tensor q = q_in.contiguous(), ctx_slots = ctx_slots_in.contiguous(), q_pos = q_pos_in.contiguous();
  const int64_t l = ctx_slots.size(1);
  const int64_t* pos = q_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < l, op, "q_pos[", i, "] = ", pos[i], " is outside [0, L - 1 = ", l - 1,
                "] (ctx_slots has L = ", l, " positions per row)");
  at::Tensor out = at::empty({b, h, dh}, q.options());
  if (b == 0 || h == 0) return out;
  DecodeAttnProblem p;
  p.bf16 = bf16;
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.b = b;
  p.h = h;
  p.g = g;
  p.dh = dh;
  p.l = l;
  p.s = s;
  p.ctx_slots = ctx_slots.data_ptr<int64_t>();
  p.q_pos = pos;
  p.window = window;
  p.scale = float(scale);
  p.out = out.data_ptr();
  p.threads = at::get_num_threads();
  const int64_t bad = run_decode_attention(p);
  TORCH_CHECK(bad < 0, op, "ctx_slots[", bad / std::max<int64_t>(l, 1), ", ", bad % std::max<int64_t>(l, 1), "] = ",
              bad < 0 ? 0 : p.ctx_slots[bad], " is outside the cache's slots [0, S = ", s, ")");
  return out;
}

// q_rot = rope(q); k_cache[slots[t]] = rope(k[t]); v_cache[slots[t]] = v[t], with q, k, v the
// [H | G | G] head blocks of each row of the qkv product (rotate-half RoPE, cos / sin [T, Dh]).
at::Tensor rotary_cache_write(const at::Tensor& qkv, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& slots) {
  const char* op = "moe_serve.rotary_cache_write: ";
  const bool bf16 = check_dtype(qkv, "rotary_cache_write's qkv");
  const int64_t h = num_heads, g = num_kv_heads;
  TORCH_CHECK(h > 0 && g > 0, op, "num_heads and num_kv_heads must be > 0, got ", h, " and ", g);
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), op, "k_cache and v_cache must both be ",
              "one layer's [S, G, Dh] (cache.k[layer]), got shapes ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t s = k_cache.size(0), dh = k_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == g, op, "the cache has ", k_cache.size(1), " KV heads, num_kv_heads is ", g);
  TORCH_CHECK(dh > 0 && dh % 2 == 0, op, "the head dim must be even and > 0 (rotate-half), got ", dh);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (h + 2 * g) * dh, op, "qkv must be [T, (H + 2G) * Dh] = [T, ",
              (h + 2 * g) * dh, "] for H = ", h, ", G = ", g, ", Dh = ", dh, ", got shape ", qkv.sizes());
  TORCH_CHECK(qkv.is_contiguous(), op, "qkv must be contiguous (the qkv product's output)");
  const int64_t t = qkv.size(0);
  for (const at::Tensor* c : {&cos, &sin}) {
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == qkv.scalar_type(), op, "cos and sin must be CPU ",
                qkv.scalar_type(), " tensors like qkv, got ", c->scalar_type(), " on ", c->device());
    TORCH_CHECK(c->dim() == 2 && c->size(0) == t && c->size(1) == dh, op, "cos and sin must be [T, Dh] = [", t,
                ", ", dh, "], got ", c->sizes());
  }
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == qkv.scalar_type(), op, "k_cache and v_cache must be ",
                "CPU ", qkv.scalar_type(), " tensors like qkv, got ", c->scalar_type(), " on ", c->device());
    TORCH_CHECK(c->is_contiguous(), op, "k_cache and v_cache must be contiguous (one layer of the cache)");
  }
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == t,
              op, "slots must be a CPU int64 [T] tensor with T = ", t, ", got ", slots.scalar_type(), " ",
              slots.sizes(), " on ", slots.device());
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous(), slots_c = slots.contiguous();
  const int64_t* sl = slots_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < s, op, "slots[", i, "] = ", sl[i], " is outside the cache's slots [0, S = ", s,
                ")");
  at::Tensor q_out = at::empty({t, h, dh}, qkv.options());
  RotaryWriteProblem p;
  p.bf16 = bf16;
  p.qkv = qkv.data_ptr();
  p.cos = cos_c.data_ptr();
  p.sin = sin_c.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slots = sl;
  p.t = t;
  p.h = h;
  p.g = g;
  p.dh = dh;
  p.q_out = q_out.data_ptr();
  p.threads = at::get_num_threads();
  run_rotary_cache_write(p);
  return q_out;
}

// Mixtral's RMSNorm as layers.RMSNorm computes it: float32 through F.rms_norm itself; bfloat16 as
// weight * bf16(x32 * rsqrt(mean(x32^2) + eps)), each product rounded once.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t t = x.size(0), d = x.size(1);
  if (x.scalar_type() == at::kFloat) {  // x * rsqrt(mean(x^2) + eps) * w; at::rms_norm took ~16 us a row here
    at::Tensor out = at::empty_like(x);
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t i = 0; i < t; ++i) {
      const float* row = xp + i * d;
      float part[8] = {};
      int64_t j = 0;
      for (; j + 8 <= d; j += 8)
        for (int l = 0; l < 8; ++l) part[l] += row[j + l] * row[j + l];
      float ss = 0.0f;
      for (int l = 0; l < 8; ++l) ss += part[l];
      for (; j < d; ++j) ss += row[j] * row[j];
      const float r = 1.0f / std::sqrt(ss / float(d) + float(eps));
      for (j = 0; j < d; ++j) op[i * d + j] = row[j] * r * wp[j];
    }
    return out;
  }
  // bfloat16: 16 partial sums and f32_to_bf16's rounding without its branch, so that both loops
  // vectorize in this unit (no -m flags): 1.7x the scalar loops (64 rows of 512:
  // 35-40 against 62-63 us, 2-core AMD EPYC)
  at::Tensor out = at::empty_like(x);
  const bf16_t* xp = static_cast<const bf16_t*>(x.data_ptr());
  const bf16_t* wp = static_cast<const bf16_t*>(w.data_ptr());
  bf16_t* op = static_cast<bf16_t*>(out.data_ptr());
  auto widen = [](bf16_t v) {
    const uint32_t b = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  };
  auto round = [](float f) {  // f32_to_bf16's bits: NaN -> 0x7fc0, else round to nearest even
    uint32_t b;
    std::memcpy(&b, &f, 4);
    const uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (b & 0x7fffffffu) > 0x7f800000u ? bf16_t(0x7fc0) : bf16_t(r);
  };
  for (int64_t i = 0; i < t; ++i) {
    const bf16_t* row = xp + i * d;
    float part[16] = {};
    int64_t j = 0;
    for (; j + 16 <= d; j += 16)
      for (int l = 0; l < 16; ++l) part[l] += widen(row[j + l]) * widen(row[j + l]);
    float ss = 0.0f;
    for (int l = 0; l < 16; ++l) ss += part[l];
    for (; j < d; ++j) ss += widen(row[j]) * widen(row[j]);
    const float r = 1.0f / std::sqrt(ss / float(d) + float(eps));
    bf16_t* o = op + i * d;
    for (j = 0; j < d; ++j) o[j] = round(widen(wp[j]) * widen(round(widen(row[j]) * r)));
  }
  return out;
}

// The attention half of a decode layer in one call (model/native_layer.py says when it runs):
//   h = x + o_proj(decode_attention(rope + cache write(qkv(norm1(x))))),  hn = norm2(h)
// and Mixtral's routing of hn: softmax of the gate's logits in float32, the top k, renormalised;
// `counts` ([E] int64, or empty: not counted) gains each routed row. Returns (h, hn, ids, weights):
// the same products and roundings as the layer's Python path, without an interpreter round trip.
std::vector<at::Tensor> decode_attention_block(
    const at::Tensor& x_in, const at::Tensor& norm1, const at::Tensor& norm2, double eps, const at::Tensor& qkv_w,
    int64_t qkv_n, const at::Tensor& o_w, int64_t o_n, int64_t heads, int64_t kv_heads, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
    const at::Tensor& ctx_slots, const at::Tensor& q_pos, int64_t window, double scale, const at::Tensor& gate_w,
    int64_t topk, at::Tensor counts) {
  const char* op = "moe_serve.decode_attention_block: ";
  const at::Tensor x = x_in.contiguous();
  check_dtype(x, "decode_attention_block's x");
  TORCH_CHECK(x.dim() == 2, op, "x must be [B, D], got shape ", x.sizes());
  const int64_t t = x.size(0), d = x.size(1), e = gate_w.size(0);
  for (const at::Tensor* n : {&norm1, &norm2, &gate_w})
    TORCH_CHECK(n->scalar_type() == x.scalar_type() && n->is_contiguous() && n->size(-1) == d, op,
                "the norm and gate weights must be contiguous ", x.scalar_type(), " with last dim ", d);
  TORCH_CHECK(topk >= 1 && topk <= e, op, "top k must be in [1, E = ", e, "], got ", topk);
  TORCH_CHECK(counts.numel() == 0 || (counts.scalar_type() == at::kLong && counts.is_contiguous() &&
                                      counts.numel() == e), op, "counts must be empty or int64 [E = ", e, "]");
  const at::Tensor qkv = dense(rms_norm(x, norm1, eps), qkv_w, qkv_n);
  const at::Tensor q = rotary_cache_write(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slots);
  const at::Tensor attn = decode_attention(q, k_cache, v_cache, ctx_slots, q_pos, window, scale);
  const at::Tensor h = at::add(x, dense(attn.view({t, attn.size(1) * attn.size(2)}), o_w, o_n));
  const at::Tensor hn = rms_norm(h, norm2, eps);
  const at::Tensor logits = at::linear(hn, gate_w).to(at::kFloat).contiguous();
  at::Tensor ids = at::empty({t, topk}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({t, topk}, x.options().dtype(at::kFloat));
  const float* lp = logits.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  int64_t* cp = counts.numel() ? counts.data_ptr<int64_t>() : nullptr;
  std::vector<float> probs(e);
  for (int64_t i = 0; i < t; ++i) {
    const float* l = lp + i * e;
    float m = l[0], sum = 0.0f, kept = 0.0f;
    for (int64_t j = 1; j < e; ++j) m = std::max(m, l[j]);
    for (int64_t j = 0; j < e; ++j) sum += probs[j] = std::exp(l[j] - m);
    for (int64_t j = 0; j < e; ++j) probs[j] /= sum;
    for (int64_t k = 0; k < topk; ++k) {  // the k-th largest; ties to the lower expert id
      int64_t best = -1;
      for (int64_t j = 0; j < e; ++j)
        if (probs[j] >= 0.0f && (best < 0 || probs[j] > probs[best])) best = j;
      ip[i * topk + k] = best;
      kept += wp[i * topk + k] = probs[best];
      probs[best] = -1.0f;
      if (cp) ++cp[best];
    }
    for (int64_t k = 0; k < topk; ++k) wp[i * topk + k] /= kept;
  }
  return {h, hn, ids, weights};
}

// A whole decode layer of `single`: the attention block above, then out = h + fused_moe(hn) over
// every expert of the layer (packed w13 / w2).
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        const at::Tensor& qkv_w, int64_t qkv_n, const at::Tensor& o_w, int64_t o_n, int64_t heads,
                        int64_t kv_heads, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& ctx_slots,
                        const at::Tensor& q_pos, int64_t window, double scale, const at::Tensor& gate_w, int64_t topk,
                        const at::Tensor& w13, const at::Tensor& w2, int64_t intermediate, at::Tensor counts,
                        const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2) {
  const std::vector<at::Tensor> a = decode_attention_block(x, norm1, norm2, eps, qkv_w, qkv_n, o_w, o_n, heads,
                                                           kv_heads, cos, sin, k_cache, v_cache, slots, ctx_slots,
                                                           q_pos, window, scale, gate_w, topk, counts);
  return at::add(a[0], fused_moe(a[1], a[2], a[3], w13, w2, 0, gate_w.size(0), intermediate, s13, s2));
}

void set_isa_op(const std::string& isa) {
  TORCH_CHECK(set_isa(isa), "moe_serve.set_isa: '", isa, "' is unknown or not supported by this CPU (best: ",
              best_isa(), "; names: auto, avx512_bf16, avx512, avx2, generic)");
}

void set_tuning_op(int64_t gate_rows, int64_t down_rows, int64_t row_block, int64_t blocks_per_task,
                   int64_t k_slice, int64_t slice_max_tiles, bool prefetch, int64_t stream_prefetch,
                   int64_t q8_dequant_rows, int64_t q4_dequant_rows) {
  TORCH_CHECK(gate_rows >= 0 && down_rows >= 0 && k_slice >= 0 && slice_max_tiles >= 0 && stream_prefetch >= 0 &&
                  q8_dequant_rows >= -1 && q4_dequant_rows >= -1,
              "moe_serve.set_tuning: every knob must be >= 0 (rows 0: the register tile's maximum; ",
              "q8/q4_dequant_rows -1: the kernels' own)");
  TORCH_CHECK(row_block > 0 && blocks_per_task > 0, "moe_serve.set_tuning: row_block and blocks_per_task must ",
              "be > 0, got ", row_block, " and ", blocks_per_task);
  set_tuning({int(gate_rows), int(down_rows), int(row_block), int(blocks_per_task), int(k_slice),
              int(slice_max_tiles), prefetch, int(stream_prefetch), int(q8_dequant_rows), int(q4_dequant_rows)});
}

// out[token[i]] += weight[i] * y[i] over the routed rows in order, out [num_tokens, D] from zeros:
// the roundings of torch's `zeros().index_add_(0, token, (y * weight[:, None]).to(y.dtype))`:
// each product rounded to y's dtype, the sums in float32 (bfloat16: rounded once at the end).
at::Tensor combine_rows(const at::Tensor& y_in, const at::Tensor& weight_in, const at::Tensor& token_in,
                        int64_t num_tokens) {
  const char* op = "moe_serve.combine_rows: ";
  const at::Tensor y = y_in.contiguous(), weight = weight_in.contiguous(), token = token_in.contiguous();
  const bool bf16 = check_dtype(y, "combine_rows' y");
  TORCH_CHECK(y.dim() == 2, op, "y must be [N, D], got shape ", y.sizes());
  const int64_t n = y.size(0), d = y.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.scalar_type() == at::kFloat, op,
              "weight must be float32 [N] with N = ", n);
  TORCH_CHECK(token.dim() == 1 && token.size(0) == n && token.scalar_type() == at::kLong, op,
              "token must be int64 [N] with N = ", n);
  TORCH_CHECK(num_tokens >= 0, op, "num_tokens must not be negative");
  at::Tensor out = at::zeros({num_tokens, d}, y.options());
  const int64_t* tok = token.data_ptr<int64_t>();
  const float* w = weight.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tok[i] >= 0 && tok[i] < num_tokens, op, "token ", tok[i], " outside [0, ", num_tokens, ")");
  if (bf16) {
    const bf16_t* src = reinterpret_cast<const bf16_t*>(y.data_ptr());
    bf16_t* dst = reinterpret_cast<bf16_t*>(out.data_ptr());
    std::vector<float> acc(size_t(num_tokens * d), 0.0f);  // torch sums bfloat16 rows in float32
    for (int64_t i = 0; i < n; ++i) {
      float* o = acc.data() + tok[i] * d;
      const bf16_t* r = src + i * d;
      for (int64_t c = 0; c < d; ++c) o[c] += bf16_to_f32(f32_to_bf16(bf16_to_f32(r[c]) * w[i]));
    }
    for (int64_t i = 0; i < num_tokens * d; ++i) dst[i] = f32_to_bf16(acc[i]);
  } else {
    const float* src = y.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      float* o = dst + tok[i] * d;
      const float* r = src + i * d;
      for (int64_t c = 0; c < d; ++c) o[c] += r[c] * w[i];
    }
  }
  return out;
}

std::vector<RingRef> ring_table(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 2 && t.size(1) == 2 &&
                  t.is_contiguous(),
              "moe_serve: ", what, " must be a contiguous CPU int64 [rings, 2] of (control, data) addresses");
  std::vector<RingRef> out(t.size(0));
  const int64_t* v = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.size(0); ++i) {
    TORCH_CHECK(v[2 * i] && v[2 * i + 1], "moe_serve: ", what, " holds a null address");
    out[i] = {reinterpret_cast<void*>(v[2 * i]), reinterpret_cast<uint8_t*>(v[2 * i + 1])};
  }
  return out;
}

// The attention side of one layer's exchange (exchange.h): [token [N], weight [N], sizes [ranks]]
// of the rows sent, or [] when a message does not fit its ring now (nothing sent).
std::vector<at::Tensor> shm_dispatch_op(const at::Tensor& x_in, const at::Tensor& ids_in,
                                        const at::Tensor& weights_in, int64_t num_experts, const at::Tensor& rings,
                                        int64_t cap, int64_t word, int64_t layer, int64_t micro_batch,
                                        int64_t cores) {
  const char* op = "moe_serve.shm_dispatch: ";
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous(), weights = weights_in.contiguous();
  check_dtype(x, "shm_dispatch's x");
  TORCH_CHECK(x.dim() == 2, op, "x must be [T, D], got shape ", x.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong, op,
              "ids must be int64 [T, K] with T = ", x.size(0), ", got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat, op,
              "weights must be float32 of ids' shape, got ", weights.scalar_type(), " ", weights.sizes());
  const std::vector<RingRef> table = ring_table(rings, "shm_dispatch's rings");
  const int64_t ranks = int64_t(table.size());
  TORCH_CHECK(ranks > 0 && num_experts > 0 && num_experts % ranks == 0, op, num_experts,
              " experts do not split over ", ranks, " expert ranks");
  TORCH_CHECK(cap > 0, op, "ring capacity must be positive");
  const int64_t n = ids.numel();
  at::Tensor token = at::empty({n}, ids.options()), weight = at::empty({n}, weights.options());
  at::Tensor sizes = at::empty({ranks}, ids.options());
  DispatchProblem p;
  p.x = x.data_ptr();
  p.row_bytes = x.size(1) * x.element_size();
  p.tokens = x.size(0), p.topk = ids.size(1);
  p.ids = ids.data_ptr<int64_t>(), p.weights = weights.data_ptr<float>();
  p.num_experts = num_experts, p.expert_ranks = ranks, p.rings = table.data(), p.cap = uint64_t(cap);
  p.word = word, p.layer = layer, p.micro_batch = micro_batch, p.cores = cores;
  p.token_out = token.data_ptr<int64_t>(), p.weight_out = weight.data_ptr<float>();
  p.sizes_out = sizes.data_ptr<int64_t>();
  const int sent = shm_dispatch(p);
  TORCH_CHECK(sent != -1, op, "an expert id outside [0, ", num_experts, ")");
  TORCH_CHECK(sent != -2, op, "a ring's control block is corrupted (its producer and consumer counts disagree)");
  if (!sent) return {};
  return {token, weight, sizes};
}

// The expert side of one layer (exchange.h) after its header: true once served, false when the
// rows are not all there yet or an output ring lacks room (nothing moved).
bool shm_expert_layer_op(const at::Tensor& counts_in, const at::Tensor& in_rings, const at::Tensor& out_rings,
                         int64_t cap, const at::Tensor& w13, const at::Tensor& w2, int64_t hidden,
                         int64_t intermediate, at::ScalarType dtype, int64_t threads,
                         const c10::optional<at::Tensor>& s13, const c10::optional<at::Tensor>& s2) {
  const char* op = "moe_serve.shm_expert_layer: ";
  const at::Tensor counts = counts_in.contiguous();
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 2, op,
              "counts must be a CPU int64 [A, X]");
  const std::vector<RingRef> in = ring_table(in_rings, "shm_expert_layer's in_rings");
  const std::vector<RingRef> out = ring_table(out_rings, "shm_expert_layer's out_rings");
  const int64_t a = counts.size(0), x = counts.size(1);
  TORCH_CHECK(int64_t(in.size()) == a && int64_t(out.size()) == a, op, "one in and one out ring per attention rank");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, "rows must be float32 or bfloat16");
  const bool bf16 = dtype == at::kBFloat16;
  TORCH_CHECK(hidden > 0 && intermediate > 0 && cap > 0, op, "hidden, intermediate and cap must be positive");
  const ExpertWeights e = check_experts(w13, w2, x, hidden, intermediate, dtype, s13, s2);
  ExpertLayerProblem p;
  p.q8 = e.q8, p.q4_group = e.q4_group, p.s13 = e.s13, p.s2 = e.s2;
  p.bf16 = bf16, p.d = hidden, p.f = intermediate, p.attention_ranks = a, p.experts = x;
  p.counts = counts.data_ptr<int64_t>(), p.in = in.data(), p.out = out.data(), p.cap = uint64_t(cap);
  p.w13 = w13.data_ptr(), p.w2 = w2.data_ptr();
  p.threads = threads > 0 ? int(threads) : at::get_num_threads();
  const int served = shm_expert_layer(p);
  TORCH_CHECK(served != -1, op, "negative row counts");
  TORCH_CHECK(served != -2, op, "a ring's control block is corrupted (its producer and consumer counts disagree)");
  return served == 1;
}

std::vector<int64_t> get_tuning_op() {
  const Tuning t = get_tuning();
  const Kernels& k = kernels();
  return {t.gate_rows,       t.down_rows,       t.row_block,        t.blocks_per_task, t.k_slice,
          t.slice_max_tiles, t.prefetch,        t.stream_prefetch,  t.q8_dequant_rows, t.q4_dequant_rows,
          k.gate_rows_f32,   k.down_rows_f32,   k.gate_rows_bf16,   k.down_rows_bf16};
}

}  // namespace
}  // namespace moe_serve

TORCH_LIBRARY(moe_serve, m) {
  using namespace moe_serve;
  m.def("prepack(Tensor w, bool gated=False) -> Tensor", &prepack);
  m.def("prepack_into(Tensor w, Tensor(a!) out, bool gated=False) -> ()", &prepack_into);
  m.def("prepack_scales(Tensor scale, bool gated=False) -> Tensor", &prepack_scales);
  m.def("has_q8() -> bool", [] { return kernels().gate_up_q8_f32 != nullptr; });
  m.def("halves(bool bf16) -> bool", [](bool bf16) { return in_halves(bf16); });
  m.def("prepack_q4(Tensor codes, bool gated=False) -> Tensor", &prepack_q4);
  m.def("prepack_q4_into(Tensor codes, Tensor(a!) out, bool gated=False) -> ()", &prepack_q4_into);
  m.def("prepack_q4_scales(Tensor scale, Tensor? zero=None, bool gated=False) -> Tensor", &prepack_q4_scales);
  m.def("has_q4() -> bool", [] { return kernels().gate_up_q4_f32 != nullptr; });
  m.def("fused_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13_packed, Tensor w2_packed, "
        "int first_expert, int num_local_experts, int intermediate, Tensor? w13_scale=None, "
        "Tensor? w2_scale=None) -> Tensor",
        &fused_moe);
  m.def("fused_experts_rows(Tensor x, Tensor local_ids, Tensor w13_packed, Tensor w2_packed, int intermediate, "
        "Tensor? w13_scale=None, Tensor? w2_scale=None) -> Tensor",
        &fused_experts_rows);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor ctx_slots, Tensor q_pos, int window, "
        "float scale) -> Tensor",
        &decode_attention);
  m.def("rotary_cache_write(Tensor qkv, int num_heads, int num_kv_heads, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> Tensor",
        &rotary_cache_write);
  m.def("dense(Tensor x, Tensor w_packed, int n) -> Tensor", &dense);
  m.def("decode_layer(Tensor x, Tensor norm1, Tensor norm2, float eps, Tensor qkv_packed, int qkv_n, "
        "Tensor o_packed, int o_n, int heads, int kv_heads, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor ctx_slots, Tensor q_pos, int window, float scale, Tensor gate, "
        "int topk, Tensor w13_packed, Tensor w2_packed, int intermediate, Tensor(c!) counts, "
        "Tensor? w13_scale=None, Tensor? w2_scale=None) -> Tensor",
        &decode_layer);
  m.def("decode_attention_block(Tensor x, Tensor norm1, Tensor norm2, float eps, Tensor qkv_packed, int qkv_n, "
        "Tensor o_packed, int o_n, int heads, int kv_heads, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor ctx_slots, Tensor q_pos, int window, float scale, Tensor gate, "
        "int topk, Tensor(c!) counts) -> Tensor[]",
        &decode_attention_block);
  m.def("combine_rows(Tensor y, Tensor weight, Tensor token, int num_tokens) -> Tensor", &combine_rows);
  m.def("shm_dispatch(Tensor x, Tensor ids, Tensor weights, int num_experts, Tensor rings, int cap, int word, "
        "int layer, int micro_batch, int cores=0) -> Tensor[]",
        &shm_dispatch_op);
  m.def("shm_expert_layer(Tensor counts, Tensor in_rings, Tensor out_rings, int cap, Tensor w13_packed, "
        "Tensor w2_packed, int hidden, int intermediate, ScalarType dtype, int threads=0, Tensor? w13_scale=None, "
        "Tensor? w2_scale=None) -> bool",
        &shm_expert_layer_op);
  m.def("isa() -> str", [] { return current_isa(); });
  m.def("best_isa() -> str", [] { return best_isa(); });
  m.def("isa_supported(str isa) -> bool", [](const std::string& isa) { return isa_supported(isa); });
  m.def("set_isa(str isa) -> ()", &set_isa_op);
  m.def("set_tuning(int gate_rows, int down_rows, int row_block, int blocks_per_task, int k_slice, "
        "int slice_max_tiles, "
        "bool prefetch, int stream_prefetch, int q8_dequant_rows=-1, int q4_dequant_rows=-1) -> ()",
        &set_tuning_op);
  m.def("get_tuning() -> int[]", &get_tuning_op);
}

// Scalar bfloat16 <-> float32 for the units compiled without -m flags (kernels_generic, attention,
// moe, ops). Unnamed namespace: each unit keeps its own copy, so no linker ever picks between them.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace moe_serve {
namespace {

inline float bf16_to_f32(bf16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bf16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bf16_t(0x7fc0);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bf16_t(bits >> 16);
}

}  // namespace
}  // namespace moe_serve

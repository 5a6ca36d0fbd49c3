// Run-time ISA choice and the tuning knobs of the driver (no torch, no -m flags).
#pragma once

#include <string>

#include "kernels.h"

namespace moe_serve {

// "avx512_bf16", "avx512", "avx2" or "generic": the best this CPU runs.
std::string best_isa();
// Whether this CPU (and OS) can run `isa`.
bool isa_supported(const std::string& isa);
// Selects the kernels: "auto" (best_isa) or one of the names above. False if unknown/unsupported.
bool set_isa(const std::string& isa);
std::string current_isa();
const Kernels& kernels();

// Row tiles of the two products (0: the kernel's register-tile maximum), the rows one task covers
// when an expert has many (prefill), the 32-column blocks one task covers, the K slice (columns) of tasks with 2..slice_max_tiles row
// tiles (0: no slicing; tasks with more tiles are compute-bound and run unsliced), whether those
// prefetch the next slice, and how far ahead one-tile tasks prefetch their block. Defaults chosen
// from bench/moe_kernels.py --sweep on a 2-core AMD EPYC (Zen 5); re-measure on other machines.
struct Tuning {
  int gate_rows = 0;
  int down_rows = 0;
  int row_block = 96;
  int blocks_per_task = 8;  // at most: tasks stay >= 4 per thread
  int k_slice = 64;
  int slice_max_tiles = 4;
  bool prefetch = true;
  int stream_prefetch = 4096;  // bytes ahead a one-tile task prefetches its block (0: none)
  int q8_dequant_rows = -1;     // int8 experts: tasks with more rows dequantize their block first; -1: the kernels' own
  int q4_dequant_rows = -1;     // int4 experts: the same; -1: the running kernels' own crossover (kernels.h)
};
Tuning get_tuning();
void set_tuning(const Tuning& t);

}  // namespace moe_serve

// The same-host exchange's layer paths on raw pointers (ops.cpp validates the tensors): one call
// routes an attention rank's rows into its rings, one call serves an expert rank's layer from
// them. Both move only what fits without waiting: they return false, having moved nothing, and
// the Python ring path (moe_parallel/parallel/dispatch.py) then moves the message with its waits
// and liveness checks. No torch.
#pragma once

#include <cstdint>

namespace moe_serve {

struct RingRef {  // one direction of one rank pair: the control block, its data bytes
  void* ctl;
  uint8_t* data;
};

// Attention side: x [tokens][d] routed by ids [tokens][topk] (int64) with weights (float32) to
// the expert ranks, rank j holding experts [j X, (j+1) X). Per rank one message: the header
// (int64: magic | op, layer, micro-batch, rows, rows per local expert) and the rows sorted by
// expert (stable). Outputs: the token and router weight of each sent row, rank by rank [tokens
// topk], and the rows sent to each rank. With `cores` > 0 each header's first word also carries,
// from bit 32, the threads its rank should use: the cores split among the ranks that have rows
// (a batch-1 step whose two experts are on one rank gives it every core, not half).
struct DispatchProblem {
  const void* x = nullptr;
  int64_t row_bytes = 0, tokens = 0, topk = 0;
  const int64_t* ids = nullptr;
  const float* weights = nullptr;
  int64_t num_experts = 0, expert_ranks = 0;
  const RingRef* rings = nullptr;  // [expert_ranks], attention rank -> expert rank j
  uint64_t cap = 0;
  int64_t word = 0, layer = 0, micro_batch = 0, cores = 0;
  int64_t* token_out = nullptr;
  float* weight_out = nullptr;
  int64_t* sizes_out = nullptr;
};
// 1: sent; 0: a message does not fit its ring now (nothing written); -1: an id out of range;
// -2: a ring's control block is corrupted (nothing written).
int shm_dispatch(const DispatchProblem& p);

// Expert side, after the header: counts [attention_ranks][X] rows per local expert (checked by
// the caller against the header's total); the rows are read from `in` [A], one SwiGLU output per
// row computed by the fused MoE driver on the packed weights, and written back to `out` [A].
struct ExpertLayerProblem {
  bool bf16 = false;
  int64_t d = 0, f = 0, attention_ranks = 0, experts = 0;
  const int64_t* counts = nullptr;
  const RingRef* in = nullptr;
  const RingRef* out = nullptr;
  uint64_t cap = 0;
  const void* w13 = nullptr;
  const void* w2 = nullptr;
  bool q8 = false;  // int8 codes with their packed column scales (moe.h)
  int64_t q4_group = 0;  // int4 codes (group size) with their packed scales and biases
  const float* s13 = nullptr;
  const float* s2 = nullptr;
  int threads = 1;  // the header's hint where it has one, else the rank's own
};
// 1: served; -1: a negative count; -2: a corrupted ring control block; 0: the rows are not all there yet or an output ring lacks room (nothing moved).
int shm_expert_layer(const ExpertLayerProblem& p);

}  // namespace moe_serve

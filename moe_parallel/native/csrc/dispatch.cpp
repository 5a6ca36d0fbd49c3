// Picks the micro-kernel table at run time with __builtin_cpu_supports. Compiled with no -m
// flags, so this unit runs on any x86-64 (or other) CPU; the ISA units are only entered after
// the check says their instructions exist.
#include "dispatch.h"

#include <atomic>
#include <mutex>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace moe_serve {
namespace {

bool has_avx2() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(__x86_64__)
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#if defined(__x86_64__)
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AMX: the CPU has AMX-TILE and AMX-BF16 (CPUID.(7,0):EDX bits 24 and 22) and the kernel lets
// this process use the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once).
bool has_amx_bf16() {
#if defined(__x86_64__)
  static const bool ok = [] {
    if (!has_avx512_bf16()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#if defined(__x86_64__)
const Kernels* avx512_bf16_kernels() {
  static const Kernels table = [] {
    Kernels t = *avx512_kernels();
    t.name = "avx512_bf16";
    t.gate_rows_bf16 = kAvx512Bf16GateRows;
    t.down_rows_bf16 = kAvx512Bf16DownRows;
    t.gate_up_bf16 = avx512bf16_gate_up;
    t.down_bf16 = avx512bf16_down;
    t.attn_bf16 = avx512bf16_attn;
    t.dequant_bf16 = avx512bf16_dequant;
    t.gate_up_q4_bf16 = avx512bf16_gate_up_q4;
    t.down_q4_bf16 = avx512bf16_down_q4;
    t.q4_dequant_rows_bf16 = 40;  // the dot-product codes path holds up to 32-48 rows (Zen 4)
    return t;
  }();
  return &table;
}

// The AVX-512 BF16 table with its two bfloat16 expert products on AMX tiles.
const Kernels* amx_bf16_kernels() {
  static const Kernels table = [] {
    Kernels t = *avx512_bf16_kernels();
    t.name = "amx_bf16";
    t.gate_rows_bf16 = kAmxRows;
    t.down_rows_bf16 = kAmxRows;
    t.gate_up_bf16 = amx_gate_up;
    t.down_bf16 = amx_down;
    t.slice_bf16 = false;
    return t;
  }();
  return &table;
}

#endif

// Off x86-64 only the generic unit is built (see build.py) and only it is referenced.
const Kernels* table_for(const std::string& isa) {
#if defined(__x86_64__)
  if (isa == "amx_bf16") return has_amx_bf16() ? amx_bf16_kernels() : nullptr;
  if (isa == "avx512_bf16") return has_avx512_bf16() ? avx512_bf16_kernels() : nullptr;
  if (isa == "avx512") return has_avx512() ? avx512_kernels() : nullptr;
  if (isa == "avx2") return has_avx2() ? avx2_kernels() : nullptr;
#endif
  if (isa == "generic") return generic_kernels();
  return nullptr;
}

std::atomic<const Kernels*> current{nullptr};
std::mutex tuning_mutex;
Tuning tuning;

}  // namespace

std::string best_isa() {
  if (has_amx_bf16()) return "amx_bf16";
  if (has_avx512_bf16()) return "avx512_bf16";
  if (has_avx512()) return "avx512";
  if (has_avx2()) return "avx2";
  return "generic";
}

bool isa_supported(const std::string& isa) { return table_for(isa) != nullptr; }

bool set_isa(const std::string& isa) {
  const Kernels* t = table_for(isa == "auto" ? best_isa() : isa);
  if (t == nullptr) return false;
  current.store(t);
  return true;
}

const Kernels& kernels() {
  const Kernels* t = current.load();
  if (t == nullptr) {
    set_isa("auto");
    t = current.load();
  }
  return *t;
}

std::string current_isa() { return kernels().name; }

Tuning get_tuning() {
  std::lock_guard<std::mutex> lock(tuning_mutex);
  return tuning;
}

void set_tuning(const Tuning& t) {
  std::lock_guard<std::mutex> lock(tuning_mutex);
  tuning = t;
}

}  // namespace moe_serve

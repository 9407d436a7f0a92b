// The CPU library's view of storage: tensors of float64, float32, bfloat16 or float16 as plain
// scalars, and their exact conversions to and from the math type (double for float64, float
// otherwise), written so that the loops around them vectorise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sam_fused {
namespace cpu {

inline uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// cond ? a : b as mask arithmetic: GCC vectorises this where it gives up on some
// chains of ?: (the float16 conversions below).
inline uint32_t pick(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

// The kernels see storage as plain scalars: double, float, or the uint16_t bits of a bfloat16
// or float16 value. Loops over plain scalars vectorise; loops over c10's wrapper structs
// (copied into privatised temporaries under `omp simd`) do not.
template <typename K>
using Raw = std::conditional_t<std::is_same_v<K, float> || std::is_same_v<K, double>, K, uint16_t>;

// The math type of a storage type: double for float64, float for everything narrower.
template <typename K>
using MathOf = std::conditional_t<std::is_same_v<K, double>, double, float>;

// Storage -> float32 (exact), by hand as branch-free integer arithmetic so that the loops
// around it vectorise for the baseline ISA (c10's conversions have branches, or need
// F16C, which a portable build cannot assume). Bitwise the same as c10's conversions
// (checked on every one of the 2^16 float16 and bfloat16 inputs).
template <typename K>
inline MathOf<K> to_f(Raw<K> x) {
  if constexpr (std::is_same_v<K, float> || std::is_same_v<K, double>) {
    return x;
  } else if constexpr (std::is_same_v<K, at::BFloat16>) {
    return float_of(static_cast<uint32_t>(x) << 16);  // the upper half of a float
  } else {
    const uint32_t h = x;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t man = h & 0x3FFu;
    // normal: rebias the exponent from 15 to 127; inf/NaN: all-ones exponent
    const uint32_t normal = ((exp + 112u) << 23) | (man << 13);
    const uint32_t special = 0x7F800000u | (man << 13) | pick(man != 0, 0x400000u, 0u);  // NaNs quiet
    // zero and subnormals: man * 2^-24, exact in float
    const uint32_t small = bits_of(static_cast<float>(static_cast<int32_t>(man)) * 0x1p-24f);
    const uint32_t magnitude = pick(exp == 0, small, pick(exp == 31, special, normal));
    return float_of(sign | magnitude);
  }
}

// float32 -> storage, rounding to nearest even as torch's .to() does; branch-free as above
// and bitwise the same as c10 (bfloat16 NaN -> 0x7FC0, float16 NaN -> sign | 0x7E00;
// checked on all 2^32 float32 inputs).
template <typename K>
inline Raw<K> from_f(MathOf<K> x) {
  if constexpr (std::is_same_v<K, float> || std::is_same_v<K, double>) {
    return x;
  } else if constexpr (std::is_same_v<K, at::BFloat16>) {
    const uint32_t bits = bits_of(x);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(pick(x != x, 0x7FC0u, rounded));
  } else {
    const uint32_t bits = bits_of(x);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t mag = bits & 0x7FFFFFFFu;
    // normal half range (>= 2^-14): rebias the exponent, round the 13 dropped bits to
    // nearest even; a carry out of the mantissa correctly bumps the exponent
    const uint32_t rebased = mag - 0x38000000u;
    const uint32_t normal = (rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13;
    // below 2^-14: |x| * 2^24 (exact) rounded to an integer by adding 2^23, whose float
    // addition rounds to nearest even; the integer is the subnormal's bits (1024 = 2^-14)
    const uint32_t small = bits_of(float_of(mag) * 0x1p24f + 0x1p23f) - 0x4B000000u;
    uint32_t out = pick(mag < 0x38800000u, small, normal);
    out = pick(mag >= 0x477FF000u, 0x7C00u, out);  // rounds to 65536 or above: infinity
    out = pick(mag > 0x7F800000u, 0x7E00u, out);   // NaN
    return static_cast<uint16_t>(sign | out);
  }
}

}  // namespace cpu
}  // namespace sam_fused

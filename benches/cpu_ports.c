// Throughput of the AVX2 instructions the int8 GEMM's tiles are made of, on one core of this
// CPU, to set the tiles' measured rates (examples/int8_gemm) against what the core can issue.
// Prints the core clock (a chain of dependent adds, 1 cycle each) and, per pattern, G per second
// and cycles per instance: one instruction kind alone (8 independent chains, so latency does not
// bound it), then the per-row sequences of the Q4_1 tile (broadcast of 4 activation bytes from
// memory, vpmaddubsw, vpaddw: 32 multiply-adds) and of the Q8_0 tile (broadcast, vpsignb,
// vpmaddubsw, vpmaddwd, vpaddd: 32 multiply-adds), 8 rows side by side as in an 8-row tile, and
// the same 32 multiply-adds over 16-bit weights (two vpmaddwd, no sign trick; no such kernel).
//
//   gcc -O2 -mavx2 -mfma benches/cpu_ports.c -o cpu_ports && ./cpu_ports
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 100000000L
static int act[64] __attribute__((aligned(64)));
static double ghz;

// The 8 accumulators stay in registers and every result counts (the empty asm reads them).
#define KEEP __asm__ volatile("" ::"x"(a0), "x"(a1), "x"(a2), "x"(a3), "x"(a4), "x"(a5), "x"(a6), "x"(a7))
#define EACH(OP) OP(a0, 0); OP(a1, 1); OP(a2, 2); OP(a3, 3); OP(a4, 4); OP(a5, 5); OP(a6, 6); OP(a7, 7);

static void report(const char *name, double secs, long count) {
  double per_s = count / secs;
  printf("%-58s %6.2f G/s  %5.2f cycles each\n", name, per_s / 1e9, ghz * 1e9 / per_s);
}

int main(void) {
  for (int i = 0; i < 64; i++) act[i] = i * 0x01010101;
  long x = 0;
  double t0 = now();
  for (long i = 0; i < 500000000L; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
  ghz = 2e9 / (now() - t0) / 1e9;
  printf("core clock: %.2f GHz (dependent adds)\n", ghz);

  __m256i b = _mm256_set1_epi8(3), w = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
  // Distinct starting values, so that the compiler cannot merge the 8 chains into one.
  __m256i a0 = _mm256_set1_epi8(0), a1 = _mm256_set1_epi8(1), a2 = _mm256_set1_epi8(2), a3 = _mm256_set1_epi8(3);
  __m256i a4 = _mm256_set1_epi8(4), a5 = _mm256_set1_epi8(5), a6 = _mm256_set1_epi8(6), a7 = _mm256_set1_epi8(7);
  volatile int *va = act;

#define ALONE(name, expr)                                   \
  t0 = now();                                               \
  for (long i = 0; i < N; i++) {                            \
    EACH(expr);                                             \
    KEEP;                                                   \
  }                                                         \
  report(name, now() - t0, 8 * N);
#define MADDUBS(a, k) a = _mm256_maddubs_epi16(a, b)
#define MADD(a, k) a = _mm256_madd_epi16(a, b)
#define ADDW(a, k) a = _mm256_add_epi16(a, b)
#define SIGN(a, k) a = _mm256_sign_epi8(a, b)
  ALONE("vpmaddubsw alone", MADDUBS)
  ALONE("vpmaddwd alone", MADD)
  ALONE("vpaddw alone", ADDW)
  ALONE("vpsignb alone", SIGN)

  // One row's 32 multiply-adds of a tile, 8 rows side by side, the activation bytes broadcast
  // from memory (a window that moves with the loop, so the loads are not hoisted).
#define ROWS(name, ROW)                                     \
  t0 = now();                                               \
  for (long i = 0; i < N; i++) {                            \
    const int *p = (const int *)va + (i & 7);               \
    EACH(ROW);                                              \
    KEEP;                                                   \
  }                                                         \
  report(name, now() - t0, 8 * N);
  // Q4_1: unsigned nibbles times signed activations, summed in i16.
#define Q4ROW(a, k) a = _mm256_add_epi16(a, _mm256_maddubs_epi16(w, _mm256_set1_epi32(p[k])))
  ROWS("Q4_1 row step: broadcast, vpmaddubsw, vpaddw", Q4ROW)
  // Q8_0: |w| unsigned, x signed by w's sign, widened to i32.
#define Q8ROW(a, k) a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(_mm256_set1_epi32(p[k]), w)), ones))
  ROWS("Q8_0 row step: broadcast, vpsignb, vpmaddubsw, vpmaddwd, vpaddd", Q8ROW)
  // The same 32 multiply-adds with 16-bit weights (a head stored as i16, not built): two
  // broadcasts of 2 activations, two vpmaddwd, two vpaddd; no sign trick.
#define I16ROW(a, k) a = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_madd_epi16(w, _mm256_set1_epi32(p[k]))), _mm256_madd_epi16(b, _mm256_set1_epi32(p[k + 8])))
  ROWS("i16 row step (2x): broadcast, vpmaddwd, vpaddd", I16ROW)
  int s = 0;
  s += _mm256_extract_epi32(a0, 0) + _mm256_extract_epi32(a7, 0);
  return s == 12345;
}

/*
 * hash.c -- the salted content fingerprint.
 *
 * Who may call: anyone, no lock needed (pure functions of the bytes and
 * the per-store secret held in the private ds_store).
 *
 * The construction follows the published XXH3 long-input design: eight
 * 64-bit accumulators; every 64-byte stripe mixes each 8-byte lane as
 *     acc[j] += d[j^1] + lo32(d[j] ^ k) * hi32(d[j] ^ k)
 * with a per-store secret k, so that one 32x32->64 multiply per lane does
 * the mixing and the work vectorises (AVX2: four lanes per instruction).
 * The secret comes from the store's random salt, so the fingerprint of a
 * page differs between stores and cannot be predicted from outside one.
 * A fingerprint match is only a hint: every merge compares bytes.
 * The AVX2 and scalar kernels compute the identical function; the kernel
 * is picked once per process (pthread_once): AVX2 when the CPU has it,
 * unless DEDUPSHM_FINGERPRINT=scalar asks for the portable one (CI runs
 * the store tests on both and compares their fingerprints).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "layout.h"

/* DEDUPSHM_NO_AVX2 (CFLAGS) builds the scalar kernel only (CI does, once) */
#if defined(__x86_64__) && !defined(DEDUPSHM_NO_AVX2)
#define DS_HAVE_AVX2 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define DS_HAVE_AVX2 0
#endif

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define STEP 0x9E3779B97F4A7C15ULL

static uint64_t fmix64(uint64_t h) {
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

typedef void (*stripes_fn)(uint64_t acc[8], const uint8_t *p, uint64_t nstripes,
                           const uint64_t sec[8]);

static void stripes_scalar(uint64_t acc[8], const uint8_t *p, uint64_t nstripes,
                           const uint64_t sec[8]) {
    uint64_t k[8];
    for (int j = 0; j < 8; j++) k[j] = sec[j];
    for (uint64_t i = 0; i < nstripes; i++, p += 64) {
        uint64_t d[8];
        memcpy(d, p, 64);
        for (int j = 0; j < 8; j++) {
            uint64_t x = d[j] ^ k[j];
            acc[j] += d[j ^ 1] + (x & 0xffffffffULL) * (x >> 32);
            k[j] += STEP;
        }
    }
}

#if DS_HAVE_AVX2
/* The AVX2 stripes; with dst, each stripe is also stored there with
 * non-temporal stores (a fresh page is read from memory once, hashed and
 * copied).  Inlined into both callers, so the test of dst is free. */
__attribute__((target("avx2"), always_inline))
static inline void stripes_avx2_to(uint64_t acc[8], const uint8_t *p, uint8_t *dst,
                                   uint64_t nstripes, const uint64_t sec[8]) {
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    __m256i k0 = _mm256_loadu_si256((const __m256i *)sec);
    __m256i k1 = _mm256_loadu_si256((const __m256i *)(sec + 4));
    const __m256i step = _mm256_set1_epi64x((long long)STEP);
    for (uint64_t i = 0; i < nstripes; i++, p += 64) {
        /* the hardware prefetcher stops at page boundaries: fetch the same
         * line of the next page ahead (a prefetch never faults) */
        _mm_prefetch((const char *)p + DS_PAGE_SIZE, _MM_HINT_T0);
        __m256i d0 = _mm256_loadu_si256((const __m256i *)p);
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(p + 32));
        if (dst) {
            _mm256_stream_si256((__m256i *)dst, d0);
            _mm256_stream_si256((__m256i *)(dst + 32), d1);
            dst += 64;
        }
        __m256i x0 = _mm256_xor_si256(d0, k0);
        __m256i x1 = _mm256_xor_si256(d1, k1);
        __m256i m0 = _mm256_mul_epu32(x0, _mm256_srli_epi64(x0, 32));
        __m256i m1 = _mm256_mul_epu32(x1, _mm256_srli_epi64(x1, 32));
        /* swap adjacent 64-bit lanes: d[j^1] */
        __m256i s0 = _mm256_shuffle_epi32(d0, _MM_SHUFFLE(1, 0, 3, 2));
        __m256i s1 = _mm256_shuffle_epi32(d1, _MM_SHUFFLE(1, 0, 3, 2));
        a0 = _mm256_add_epi64(a0, _mm256_add_epi64(s0, m0));
        a1 = _mm256_add_epi64(a1, _mm256_add_epi64(s1, m1));
        k0 = _mm256_add_epi64(k0, step);
        k1 = _mm256_add_epi64(k1, step);
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}

__attribute__((target("avx2")))
static void stripes_avx2(uint64_t acc[8], const uint8_t *p, uint64_t nstripes,
                         const uint64_t sec[8]) {
    stripes_avx2_to(acc, p, NULL, nstripes, sec);
}

__attribute__((target("avx2")))
static void stripes_copy_avx2(uint64_t acc[8], const uint8_t *p, uint8_t *dst,
                              uint64_t nstripes, const uint64_t sec[8]) {
    stripes_avx2_to(acc, p, dst, nstripes, sec);
}

/* Copy one page to a page-aligned destination with non-temporal stores:
 * the destination is not read first and does not evict the source from
 * the cache (it was just fingerprinted and is still there). */
__attribute__((target("avx2")))
static void copy_page_avx2(void *dst, const void *src) {
    __m256i *d = dst;
    const __m256i *s = src;
    for (unsigned i = 0; i < DS_PAGE_SIZE / 32; i += 4) {
        __m256i a = _mm256_loadu_si256(s + i), b = _mm256_loadu_si256(s + i + 1);
        __m256i c = _mm256_loadu_si256(s + i + 2), e = _mm256_loadu_si256(s + i + 3);
        _mm256_stream_si256(d + i, a);
        _mm256_stream_si256(d + i + 1, b);
        _mm256_stream_si256(d + i + 2, c);
        _mm256_stream_si256(d + i + 3, e);
    }
}
#endif


static void copy_page_plain(void *dst, const void *src) { memcpy(dst, src, DS_PAGE_SIZE); }

static void (*g_copy)(void *, const void *) = copy_page_plain;

void ds_copy_page(void *dst, const void *src) { g_copy(dst, src); }

void ds_copy_done(void) {
#if DS_HAVE_AVX2
    _mm_sfence();
#endif
}

#if DS_HAVE_AVX2
/* The CPU has AVX2 and the OS saves the YMM registers (asked of cpuid and
 * xgetbv directly: __builtin_cpu_supports needs the compiler's runtime
 * support library, which not every toolchain that builds wheels links). */
static int cpu_has_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || !(c & bit_AVX)) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 6) != 6) return 0;                     /* XMM and YMM state enabled */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & bit_AVX2) != 0;
}
#endif

static stripes_fn g_stripes = stripes_scalar;
#if DS_HAVE_AVX2
static int g_fused;                      /* stripes_copy_avx2 is there */
#endif
static const char *g_impl = "scalar";
static pthread_once_t g_kernel_once = PTHREAD_ONCE_INIT;

static void pick_kernel_once(void) {
    const char *want = getenv("DEDUPSHM_FINGERPRINT");
    if (want && strcmp(want, "scalar") == 0) return;   /* "avx2" or unset: best available */
#if DS_HAVE_AVX2
    if (cpu_has_avx2()) {
        g_impl = "avx2";
        g_stripes = stripes_avx2;
        g_copy = copy_page_avx2;
        g_fused = 1;
    }
#endif
}

static void pick_kernel(void) { pthread_once(&g_kernel_once, pick_kernel_once); }

const char *ds_hash_impl(void) {
    pick_kernel();
    return g_impl;
}

void ds_hash_init(ds_store *s) {
    pick_kernel();
    uint64_t x = s->hdr->salt[0] ^ fmix64(s->hdr->salt[1]);
    for (int j = 0; j < 8; j++) s->secret[j] = splitmix(&x);
}

static void acc_init(const ds_store *s, uint64_t acc[8]) {
    for (int j = 0; j < 8; j++) acc[j] = s->secret[(j + 3) & 7] ^ (P1 * (uint64_t)(j + 1));
}

static uint64_t acc_final(const ds_store *s, const uint64_t acc[8], uint64_t n) {
    uint64_t h = s->hdr->salt[1] ^ (n * P1);
    for (int j = 0; j < 8; j++) h = (h ^ fmix64(acc[j] ^ s->secret[j])) * P2;
    return fmix64(h);
}

/* ds_hash_bytes(s, src, DS_PAGE_SIZE), and src copied to dst (page
 * aligned) as ds_copy_page does -- in one read of src where the kernel
 * allows (call ds_copy_done after a batch). */
uint64_t ds_hash_copy_page(const ds_store *s, void *dst, const void *src) {
#if DS_HAVE_AVX2
    if (g_fused) {
        uint64_t acc[8];
        acc_init(s, acc);
        stripes_copy_avx2(acc, src, dst, DS_PAGE_SIZE / 64, s->secret);
        return acc_final(s, acc, DS_PAGE_SIZE);
    }
#endif
    uint64_t fp = ds_hash_bytes(s, src, DS_PAGE_SIZE);
    g_copy(dst, src);
    return fp;
}

uint64_t ds_hash_bytes(const ds_store *s, const void *p, uint64_t n) {
    uint64_t acc[8];
    acc_init(s, acc);
    uint64_t full = n / 64;
    g_stripes(acc, (const uint8_t *)p, full, s->secret);
    uint64_t rest = n - full * 64;
    if (rest) {
        uint8_t tail[64] = {0};
        uint64_t sec[8];
        memcpy(tail, (const uint8_t *)p + full * 64, rest);
        for (int j = 0; j < 8; j++) sec[j] = s->secret[j] + full * STEP;
        g_stripes(acc, tail, 1, sec);
    }
    return acc_final(s, acc, n);
}

int ds_page_is_zero(const void *p) {
    const uint64_t *w = p;
    for (unsigned i = 0; i < DS_PAGE_SIZE / 8; i += 8) {
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
            return 0;
    }
    return 1;
}

uint64_t ds_fingerprint(ds_store *s, const void *page) {
    return ds_hash_bytes(s, page, DS_PAGE_SIZE);
}

uint64_t ds_fingerprint_pages(ds_store *s, const void *pages, uint64_t n) {
    uint64_t x = 0;
    for (uint64_t i = 0; i < n; i++)
        x ^= ds_hash_bytes(s, (const uint8_t *)pages + i * DS_PAGE_SIZE, DS_PAGE_SIZE);
    return x;
}

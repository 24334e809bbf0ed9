/* A complete C program on kivi's C ABI (kivi-capi): load the kernels of a layout, size and allocate a cache for a
 * ragged batch, prefill it, run decode steps, and check each output against exact attention computed here.
 *
 * Build (from the repository root, after `cargo build --release -p kivi-capi`):
 *   cc -std=c11 -O2 -I kivi-capi/include examples/c/decode.c -L target/release -Wl,-rpath,$PWD/target/release \
 *      -lkivi_capi -lm -o target/kivi_c_example
 * Run it on a machine with an NVIDIA GPU and libnvrtc (see the README); without one it prints why and exits 2.
 *
 * An engine would pass its own device memory and stream; this program uses kivi's synchronous helpers
 * (kivi_device_alloc, kivi_memcpy_*) so that it needs no CUDA header. 8-bit keys and values keep the quantization
 * error small enough to compare with exact attention (relative L2 error per head below 2%). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"

#define BATCH 2
#define STEPS 3

static const char *SPEC = "keys: { bits: 8, group_size: 32 }, values: { bits: 8, group_size: 32 }, "
                          "residual_length: 128, num_heads: 8, num_kv_heads: 2, head_dim: 128";

/* IEEE binary16 <-> float (round to nearest even), enough for test data. */
static uint16_t to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
    int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), half = mant >> shift, rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
    return (uint16_t)half;
}

static float from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    if (exp == 31) x = sign | 0x7f800000u | (mant << 13);
    else x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static float uniform(unsigned *state) { /* in [-1, 1) */
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / 8388608.0f - 1.0f;
}

static const KiviModule *g_module;

static int check(KiviStatus s, const char *what) {
    if (s != KIVI_STATUS_OK) {
        fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, kivi_last_error());
        return 0;
    }
    return 1;
}

static uint64_t alloc_zeroed(uint64_t bytes) {
    uint64_t p = 0;
    if (!check(kivi_device_alloc(g_module, bytes, &p), "kivi_device_alloc")) exit(1);
    if (!check(kivi_memset_zero(g_module, p, bytes), "kivi_memset_zero")) exit(1);
    return p;
}

static uint64_t upload(const void *host, uint64_t bytes) {
    uint64_t p = alloc_zeroed(bytes);
    if (!check(kivi_memcpy_htod(g_module, p, host, bytes), "kivi_memcpy_htod")) exit(1);
    return p;
}

int main(void) {
    if (kivi_abi_version() != KIVI_ABI_VERSION) {
        fprintf(stderr, "libkivi_capi has C ABI version %u, this program was built for %u\n", kivi_abi_version(),
                (unsigned)KIVI_ABI_VERSION);
        return 2;
    }
    KiviModule *module = NULL;
    if (!check(kivi_module_load(SPEC, 0, 0, &module), "kivi_module_load")) return 2;
    g_module = module;
    KiviShape shape;
    if (!check(kivi_module_shape(module, &shape), "kivi_module_shape")) return 1;
    if (shape.dtype != KIVI_DTYPE_F16) {
        /* This program fills its tensors with fp16 numbers; a bf16 layout needs bf16 ones. */
        fprintf(stderr, "the layout's activations are not fp16 (dtype %" PRIu32 "); this example writes fp16\n",
                shape.dtype);
        return 1;
    }
    const uint32_t H = shape.num_heads, HKV = shape.num_kv_heads, D = shape.head_dim, R = shape.residual_length;

    /* A ragged batch: every sequence has its own length, read by the kernels from device memory. */
    const int32_t lens[BATCH] = {300, 77};
    const uint32_t max_len = 300, capacity = 512, blocks_per_seq = capacity / R;
    KiviBlocks blocks = {0, blocks_per_seq, 0};
    const uint32_t splits = kivi_graph_grid_splits(module, capacity);
    KiviBufferBytes bytes;
    if (!check(kivi_buffer_bytes(module, BATCH, &blocks, splits, &bytes), "kivi_buffer_bytes")) return 1;
    printf("layout: %" PRIu32 " heads, %" PRIu32 " KV heads, head_dim %" PRIu32 ", R %" PRIu32
           "; cache of %d x %" PRIu32 " tokens: %" PRIu64 " bytes\n",
           H, HKV, D, R, BATCH, capacity, bytes.total);

    KiviCacheBuffers cache = {alloc_zeroed(bytes.k_codes), alloc_zeroed(bytes.k_params), alloc_zeroed(bytes.k_res),
                              alloc_zeroed(bytes.v_codes), alloc_zeroed(bytes.v_scale),  alloc_zeroed(bytes.v_mn),
                              alloc_zeroed(bytes.v_res)};
    uint64_t part_acc = alloc_zeroed(bytes.part_acc), part_ml = alloc_zeroed(bytes.part_ml);
    uint64_t counters = alloc_zeroed(bytes.counters), flag = alloc_zeroed(4);

    /* Every token's fp32 key and value (for the exact attention here): [b][h][t][d], room for the steps. */
    const uint32_t T = max_len + STEPS;
    float *keys = calloc((size_t)BATCH * HKV * T * D, sizeof(float));
    float *vals = calloc((size_t)BATCH * HKV * T * D, sizeof(float));
    uint16_t *kh = calloc((size_t)BATCH * HKV * max_len * D, 2), *vh = calloc((size_t)BATCH * HKV * max_len * D, 2);
    unsigned rng = 12345;
    for (uint32_t b = 0; b < BATCH; b++)
        for (uint32_t h = 0; h < HKV; h++)
            for (uint32_t t = 0; t < max_len; t++)
                for (uint32_t d = 0; d < D; d++) {
                    size_t i = (((size_t)b * HKV + h) * max_len + t) * D + d;
                    kh[i] = to_half(2.0f * uniform(&rng));
                    vh[i] = to_half(uniform(&rng));
                    keys[(((size_t)b * HKV + h) * T + t) * D + d] = from_half(kh[i]);
                    vals[(((size_t)b * HKV + h) * T + t) * D + d] = from_half(vh[i]);
                }

    /* Prefill from [batch][kv_heads][max_len][head_dim] (padded rows past a sequence's length are not read). */
    uint64_t dk = upload(kh, (uint64_t)BATCH * HKV * max_len * D * 2);
    uint64_t dv = upload(vh, (uint64_t)BATCH * HKV * max_len * D * 2);
    uint64_t d_lens = upload(lens, sizeof lens), d_lens_next = alloc_zeroed(sizeof lens);
    KiviTokenRows rows_k = {dk, (int64_t)HKV * max_len * D, (int64_t)max_len * D, D};
    KiviTokenRows rows_v = {dv, (int64_t)HKV * max_len * D, (int64_t)max_len * D, D};
    KiviPrefillArgs prefill = {BATCH, rows_k, rows_v, d_lens, max_len, cache, blocks, flag};
    if (!check(kivi_prefill(module, NULL, &prefill), "kivi_prefill")) return 1;

    uint16_t *q = calloc((size_t)BATCH * H * D, 2), *kn = calloc((size_t)BATCH * HKV * D, 2);
    uint16_t *vn = calloc((size_t)BATCH * HKV * D, 2), *out = calloc((size_t)BATCH * H * D, 2);
    uint64_t dq = alloc_zeroed((uint64_t)BATCH * H * D * 2), dkn = alloc_zeroed((uint64_t)BATCH * HKV * D * 2);
    uint64_t dvn = alloc_zeroed((uint64_t)BATCH * HKV * D * 2), dout = alloc_zeroed((uint64_t)BATCH * H * D * 2);
    int32_t cur[BATCH] = {lens[0], lens[1]};
    double worst = 0.0;
    for (int step = 0; step < STEPS; step++) {
        for (size_t i = 0; i < (size_t)BATCH * H * D; i++) q[i] = to_half(uniform(&rng));
        for (uint32_t b = 0; b < BATCH; b++)
            for (uint32_t h = 0; h < HKV; h++)
                for (uint32_t d = 0; d < D; d++) {
                    size_t i = ((size_t)b * HKV + h) * D + d;
                    kn[i] = to_half(2.0f * uniform(&rng));
                    vn[i] = to_half(uniform(&rng));
                    keys[(((size_t)b * HKV + h) * T + (uint32_t)cur[b]) * D + d] = from_half(kn[i]);
                    vals[(((size_t)b * HKV + h) * T + (uint32_t)cur[b]) * D + d] = from_half(vn[i]);
                }
        if (!check(kivi_memcpy_htod(module, dq, q, (uint64_t)BATCH * H * D * 2), "kivi_memcpy_htod") ||
            !check(kivi_memcpy_htod(module, dkn, kn, (uint64_t)BATCH * HKV * D * 2), "kivi_memcpy_htod") ||
            !check(kivi_memcpy_htod(module, dvn, vn, (uint64_t)BATCH * HKV * D * 2), "kivi_memcpy_htod"))
            return 1;
        /* The lengths double-buffer: this step reads d_lens and writes the next lengths into d_lens_next. */
        KiviDecodeArgs args = {0};
        args.batch = BATCH;
        args.q = dq;
        args.k_new = dkn;
        args.v_new = dvn;
        args.out = dout;
        args.seq_lens = step % 2 == 0 ? d_lens : d_lens_next;
        args.seq_lens_next = step % 2 == 0 ? d_lens_next : d_lens;
        args.cache = cache;
        args.blocks = blocks;
        args.part_acc = part_acc;
        args.part_ml = part_ml;
        args.counters = counters;
        args.scratch_splits = splits;
        args.grid_splits = kivi_decode_splits(module, max_len + step + 1, 0);
        args.error_flag = flag;
        if (!check(kivi_decode(module, NULL, &args), "kivi_decode")) return 1;
        if (!check(kivi_memcpy_dtoh(module, out, dout, (uint64_t)BATCH * H * D * 2), "kivi_memcpy_dtoh")) return 1;
        for (uint32_t b = 0; b < BATCH; b++) cur[b]++;
        /* Exact attention over every token (the new one included), per (batch entry, head). */
        for (uint32_t b = 0; b < BATCH; b++)
            for (uint32_t h = 0; h < H; h++) {
                const uint32_t kvh = h / (H / HKV), len = (uint32_t)cur[b];
                double *w = calloc(len, sizeof(double)), mx = -INFINITY, sum = 0.0, err = 0.0, norm = 0.0;
                for (uint32_t t = 0; t < len; t++) {
                    double s = 0.0;
                    for (uint32_t d = 0; d < D; d++)
                        s += (double)from_half(q[((size_t)b * H + h) * D + d]) *
                             keys[(((size_t)b * HKV + kvh) * T + t) * D + d];
                    w[t] = s / sqrt((double)D);
                    if (w[t] > mx) mx = w[t];
                }
                for (uint32_t t = 0; t < len; t++) sum += (w[t] = exp(w[t] - mx));
                for (uint32_t d = 0; d < D; d++) {
                    double e = 0.0;
                    for (uint32_t t = 0; t < len; t++) e += w[t] * vals[(((size_t)b * HKV + kvh) * T + t) * D + d];
                    e /= sum;
                    double got = from_half(out[((size_t)b * H + h) * D + d]);
                    err += (got - e) * (got - e);
                    norm += e * e;
                }
                double rel = sqrt(err / norm);
                if (!(rel <= worst)) worst = rel; /* NaN propagates */
                free(w);
            }
        printf("step %d: lengths %d and %d, worst relative L2 error vs exact attention %.2e\n", step, cur[0], cur[1],
               worst);
    }
    uint32_t bits = 0;
    if (!check(kivi_memcpy_dtoh(module, &bits, flag, 4), "kivi_memcpy_dtoh")) return 1;
    if (bits != 0) {
        char msg[256];
        kivi_error_flag_message(bits, msg, sizeof msg);
        fprintf(stderr, "the kernels reported: %s\n", msg);
        return 1;
    }
    /* Bad arguments (here all zero) are an error with a message, not a crash. */
    KiviDecodeArgs bad = {0};
    KiviStatus s = kivi_decode(module, NULL, &bad);
    printf("zeroed arguments: status %d (%s)\n", (int)s, kivi_last_error());
    if (s == KIVI_STATUS_OK) return 1;
    const uint64_t device_buffers[] = {cache.k_codes, cache.k_params, cache.k_res, cache.v_codes, cache.v_scale,
                                       cache.v_mn,    cache.v_res,    part_acc,    part_ml,       counters,
                                       flag,          dk,             dv,          d_lens,        d_lens_next,
                                       dq,            dkn,            dvn,         dout};
    for (size_t i = 0; i < sizeof device_buffers / sizeof device_buffers[0]; i++)
        if (!check(kivi_device_free(module, device_buffers[i]), "kivi_device_free")) return 1;
    free(keys);
    free(vals);
    free(kh);
    free(vh);
    free(q);
    free(kn);
    free(vn);
    free(out);
    kivi_module_free(module);
    if (!(worst < 0.02)) {
        fprintf(stderr, "error %.3e is above 2e-2\n", worst);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}

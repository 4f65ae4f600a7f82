/*
 * Optional C accelerator: the interleaved rANS coder (spec section 6.5), the header and zstd frame
 * walks of the decoder, the encoder's per-element passes (Fisher checks, per-block sums of
 * values and weights with the Fisher's checks and the copy into the encoder's matrix in the same
 * pass, the allocation's evaluations and sign-block errors, quantization, sign codes, code
 * statistics, bit packing of code rows) and the decoder's dequantization.
 *
 * Each has a numpy reference (fstqcodec/stages/rans.py, encoder/, policy/, decoder.py) that is
 * used when this module is not built; the two produce identical bytes (tests/test_rans.py,
 * tests/test_accelerator.py, tests/test_bitpack.py, tests/test_vectors.py check). The rANS stream layout: `lanes` initial decoder states (uint32 LE), then 16-bit words (LE) in the order
 * the decoder consumes them. Symbol i is coded in lane i % lanes. State range [2**16, 2**32).
 *
 * Errors are raised as ValueError(code, message, extra_bytes) with code "format" or "trailing"; the Python
 * wrapper turns them into the library's DecodeError subclasses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define RANS_L (1u << 16)

static PyObject *fail_extra(const char *code, const char *message, Py_ssize_t extra) {
    PyObject *args = Py_BuildValue("(ssn)", code, message, extra);
    if (args) {
        PyErr_SetObject(PyExc_ValueError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *fail(const char *code, const char *message) { return fail_extra(code, message, 0); }

/* Reads `alphabet` uint32 little-endian frequencies; fills cumulative starts; checks the sum. */
static int load_table(const Py_buffer *freq_buffer, int prob_bits, uint32_t *freq, uint32_t *cum, Py_ssize_t *alphabet) {
    const unsigned char *raw = (const unsigned char *)freq_buffer->buf;
    Py_ssize_t count = freq_buffer->len / 4;
    uint64_t total = 0;
    if (freq_buffer->len % 4 || count < 1 || count > 256) return -1;
    for (Py_ssize_t s = 0; s < count; s++) {
        freq[s] = (uint32_t)raw[4 * s] | ((uint32_t)raw[4 * s + 1] << 8) | ((uint32_t)raw[4 * s + 2] << 16) | ((uint32_t)raw[4 * s + 3] << 24);
        cum[s] = (uint32_t)total;
        total += freq[s];
    }
    if (total != ((uint64_t)1 << prob_bits)) return -1;
    *alphabet = count;
    return 0;
}

static int check_rows(const int64_t *rows, Py_ssize_t count, Py_ssize_t total);

/* One symbol into its lane's state (rans_encode's loop body); 0 for a symbol of zero frequency. */
static inline int rans_put(unsigned s, Py_ssize_t alphabet, const uint32_t *freq, const uint32_t *cum, const double *inverse,
                           int prob_bits, uint32_t *state, Py_ssize_t lane, uint16_t *words, Py_ssize_t *count) {
    uint64_t x = state[lane];
    uint32_t f;
    if (s >= alphabet || (f = freq[s]) == 0) return 0;
    /* Renormalise without a branch (whether a word goes out is data, and hard to predict): the
     * word is always written, and kept by advancing the count only when it goes out. */
    int emit = x >= ((uint64_t)f << (32 - prob_bits));
    words[*count] = (uint16_t)(x & 0xFFFF);
    *count += emit;
    x >>= 16 * emit;
    /* x < f << (32 - prob_bits) <= 2**32 here, so x / f < 2**31. The quotient by a
     * multiplication (a division costs several times more): x * (1/f) is within 2**-21
     * of x / f, and x / f is an integer or at least 1/f >= 2**-16 below the next one, so
     * adding 2**-20 and truncating gives exactly floor(x / f). */
    uint32_t x32 = (uint32_t)x;
    uint32_t q = (uint32_t)((double)x32 * inverse[s] + 0x1p-20);
    x = ((uint64_t)q << prob_bits) + (x32 - q * f) + cum[s];
    state[lane] = (uint32_t)x;
    return 1;
}

/* rans_encode(symbols, freqs_u32le, prob_bits, lanes[, rows_i64, block_size, offset]) -> bytes.
 * With rows: `symbols` is a matrix of block_size-byte rows and the symbols are those of rows
 * rows[0], rows[1], ... in order, each byte plus `offset` modulo 256 (the encoder's code rows,
 * coded without gathering them first). */
static PyObject *rans_encode(PyObject *self, PyObject *args) {
    Py_buffer symbols, freqs, rows_buffer = {0};
    int prob_bits, offset = 0;
    Py_ssize_t lanes, block_size = 0;
    uint32_t freq[256], cum[256];
    Py_ssize_t alphabet;
    PyObject *result = NULL, *rows_object = Py_None;
    if (!PyArg_ParseTuple(args, "y*y*in|Oni", &symbols, &freqs, &prob_bits, &lanes, &rows_object, &block_size, &offset)) return NULL;
    if (prob_bits < 1 || prob_bits > 16 || lanes < 1 || load_table(&freqs, prob_bits, freq, cum, &alphabet) < 0) {
        fail("format", "invalid rANS parameters or frequency table");
        goto done_buffers;
    }
    const int64_t *rows = NULL;
    Py_ssize_t row_count = 0;
    if (rows_object != Py_None) {
        if (PyObject_GetBuffer(rows_object, &rows_buffer, PyBUF_SIMPLE) < 0) goto done_buffers;
        row_count = rows_buffer.len / 8;
        rows = (const int64_t *)rows_buffer.buf;
        if (block_size < 1 || rows_buffer.len % 8 || symbols.len % block_size
            || check_rows(rows, row_count, symbols.len / block_size) < 0) {
            PyErr_SetString(PyExc_ValueError, "rans_encode: inconsistent rows");
            goto done_buffers;
        }
    }
    {
        const unsigned char *sym = (const unsigned char *)symbols.buf;
        Py_ssize_t n = rows ? row_count * block_size : symbols.len;
        uint32_t *state = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)lanes);
        uint16_t *words = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n > 0 ? n : 1));
        Py_ssize_t count = 0, lane;
        if (!state || !words) {
            free(state);
            free(words);
            PyErr_NoMemory();
            goto done_buffers;
        }
        int ok = 1;
        double inverse[256];
        for (Py_ssize_t k = 0; k < alphabet; k++) inverse[k] = freq[k] ? 1.0 / (double)freq[k] : 0.0;
        for (lane = 0; lane < lanes; lane++) state[lane] = RANS_L;
        lane = n > 0 ? (n - 1) % lanes : 0;
        /* The coding loop touches only C memory and the held buffer: other threads (a server
         * encoding or decoding several messages at once) may run meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        if (rows) {
            for (Py_ssize_t j = row_count - 1; j >= 0 && ok; j--) {
                const unsigned char *row = sym + rows[j] * block_size;
                for (Py_ssize_t k = block_size - 1; k >= 0; k--) {
                    if (!(ok = rans_put((unsigned)((row[k] + offset) & 0xFF), alphabet, freq, cum, inverse, prob_bits, state, lane,
                                        words, &count)))
                        break;
                    lane = lane == 0 ? lanes - 1 : lane - 1;
                }
            }
        } else {
            for (Py_ssize_t i = n - 1; i >= 0; i--) {
                if (!(ok = rans_put(sym[i], alphabet, freq, cum, inverse, prob_bits, state, lane, words, &count))) break;
                lane = lane == 0 ? lanes - 1 : lane - 1;
            }
        }
        Py_END_ALLOW_THREADS
        if (!ok) {
            free(state);
            free(words);
            fail("format", "symbol with zero frequency");
            goto done_buffers;
        }
        result = PyBytes_FromStringAndSize(NULL, 4 * lanes + 2 * count);
        if (result) {
            unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
            for (lane = 0; lane < lanes; lane++) {
                uint32_t x = state[lane];
                out[4 * lane] = x & 0xFF;
                out[4 * lane + 1] = (x >> 8) & 0xFF;
                out[4 * lane + 2] = (x >> 16) & 0xFF;
                out[4 * lane + 3] = (x >> 24) & 0xFF;
            }
            out += 4 * lanes;
            /* Words were pushed last-symbol-first; the decoder pops them first-symbol-first. */
            for (Py_ssize_t k = 0; k < count; k++) {
                uint16_t w = words[count - 1 - k];
                out[2 * k] = w & 0xFF;
                out[2 * k + 1] = w >> 8;
            }
        }
        free(state);
        free(words);
    }
done_buffers:
    if (rows_buffer.buf) PyBuffer_Release(&rows_buffer);
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&freqs);
    return result;
}

static PyObject *rans_decode(PyObject *self, PyObject *args) {
    Py_buffer data, freqs;
    Py_ssize_t count, lanes;
    int prob_bits;
    uint32_t freq[256], cum[256];
    Py_ssize_t alphabet;
    PyObject *result = NULL;
    unsigned char *slot_to_symbol = NULL;
    uint32_t *state = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*in", &data, &count, &freqs, &prob_bits, &lanes)) return NULL;
    if (prob_bits < 1 || prob_bits > 16 || lanes < 1 || count < 0 || load_table(&freqs, prob_bits, freq, cum, &alphabet) < 0) {
        fail("format", "invalid rANS parameters or frequency table");
        goto done;
    }
    if (data.len / 4 < lanes || (data.len - 4 * lanes) % 2) {
        fail("format", "rANS stream cannot hold its lane states followed by 16-bit words");
        goto done;
    }
    {
        const unsigned char *raw = (const unsigned char *)data.buf;
        const unsigned char *word = raw + 4 * lanes;
        Py_ssize_t total_words = (data.len - 4 * lanes) / 2, position = 0, lane = 0;
        uint32_t mask = (1u << prob_bits) - 1;
        slot_to_symbol = (unsigned char *)malloc((size_t)1 << prob_bits);
        state = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)lanes);
        if (!slot_to_symbol || !state) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t s = 0; s < alphabet; s++)
            for (uint32_t k = 0; k < freq[s]; k++) slot_to_symbol[cum[s] + k] = (unsigned char)s;
        for (lane = 0; lane < lanes; lane++) {
            uint32_t x = (uint32_t)raw[4 * lane] | ((uint32_t)raw[4 * lane + 1] << 8) | ((uint32_t)raw[4 * lane + 2] << 16) | ((uint32_t)raw[4 * lane + 3] << 24);
            if (x < RANS_L) {
                fail("format", "rANS initial state below 2**16");
                goto done;
            }
            state[lane] = x;
        }
        result = PyBytes_FromStringAndSize(NULL, count);
        if (!result) goto done;
        {
            /* The new bytes object is not shared yet, so the loop runs without the GIL. */
            unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
            int out_of_words = 0;
            lane = 0;
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t i = 0; i < count; i++) {
                uint32_t x = state[lane];
                uint32_t slot = x & mask;
                unsigned s = slot_to_symbol[slot];
                out[i] = (unsigned char)s;
                x = freq[s] * (x >> prob_bits) + slot - cum[s];
                if (x < RANS_L) {
                    if (position >= total_words) {
                        out_of_words = 1;
                        break;
                    }
                    x = (x << 16) | ((uint32_t)word[2 * position] | ((uint32_t)word[2 * position + 1] << 8));
                    position++;
                }
                state[lane] = x;
                if (++lane == lanes) lane = 0;
            }
            Py_END_ALLOW_THREADS
            if (out_of_words) {
                Py_CLEAR(result);
                fail("format", "rANS stream runs out of words before its last symbol");
                goto done;
            }
        }
        if (position != total_words) {
            Py_CLEAR(result);
            fail_extra("trailing", "rANS stream holds words after its last symbol", 2 * (total_words - position));
            goto done;
        }
        for (lane = 0; lane < lanes; lane++) {
            if (state[lane] != RANS_L) {
                Py_CLEAR(result);
                fail("format", "rANS stream does not end in the initial state (corrupt stream)");
                goto done;
            }
        }
    }
done:
    free(slot_to_symbol);
    free(state);
    PyBuffer_Release(&data);
    PyBuffer_Release(&freqs);
    return result;
}

/* ---------------------------------------------------------------------------------------------
 * Byte-order checks of FORMAT.md 5.1 (msgpack header subset) and 11 (zstd frame structure), the
 * same walks as fstqcodec/wire/msgpack_subset.py and zstd_frame.py at native speed: a hostile
 * header or frame can hold millions of items or blocks in a few hundred compressed bytes.
 * Errors: ValueError(code, message, extra) with code "format", "limit", "truncated" or
 * "trailing"; extra is a byte offset, the container count ("limit") or the bytes left over.
 */

#define MSGPACK_MAX_DEPTH 16

typedef struct {
    uint64_t remaining;
    PyObject *keys; /* set of key bytes for maps, NULL for arrays */
} scan_frame;

static int is_str_type(unsigned b) { return (b >= 0xa0 && b <= 0xbf) || b == 0xd9 || b == 0xda || b == 0xdb; }
static int is_one_byte(unsigned b) { return b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3; }

static uint64_t read_be(const unsigned char *p, int size) {
    uint64_t value = 0;
    for (int i = 0; i < size; i++) value = (value << 8) | p[i];
    return value;
}

static int fixed_size(unsigned b) {
    static const int sizes[10] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8}; /* 0xca .. 0xd3 */
    return sizes[b - 0xca];
}

/* Pops finished containers; returns 1 once the header map itself is complete. */
static int close_finished(scan_frame *stack, int *depth) {
    while (*depth && stack[*depth - 1].remaining == 0) {
        Py_CLEAR(stack[*depth - 1].keys);
        (*depth)--;
        if (*depth == 0) return 1;
        stack[*depth - 1].remaining--;
    }
    return 0;
}

/* Returns 1 if the str payload is a new key (and records it), 0 if repeated, -1 on a Python error. */
static int add_key(PyObject *keys, const unsigned char *payload, Py_ssize_t length) {
    PyObject *key = PyBytes_FromStringAndSize((const char *)payload, length);
    int present;
    if (!key) return -1;
    present = PySet_Contains(keys, key);
    if (present == 0 && PySet_Add(keys, key) < 0) present = -1;
    Py_DECREF(key);
    return present < 0 ? -1 : !present;
}

static PyObject *msgpack_scan(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    Py_ssize_t budget, containers = 0, pos = 0, extra = 0;
    scan_frame stack[MSGPACK_MAX_DEPTH];
    int depth = 0, python_error = 0;
    const char *code = "format", *message = NULL;
    if (!PyArg_ParseTuple(args, "y*n", &buffer, &budget)) return NULL;
    const unsigned char *data = (const unsigned char *)buffer.buf;
    Py_ssize_t size = buffer.len;
    if (size == 0 || !((data[0] >= 0x80 && data[0] <= 0x8f) || data[0] == 0xde || data[0] == 0xdf)) {
        message = "the header is not a map";
        goto done;
    }
    for (;;) {
        scan_frame *top = depth ? &stack[depth - 1] : NULL;
        if (top && !top->keys) {
            while (top->remaining && pos < size && is_one_byte(data[pos])) {
                pos++;
                top->remaining--;
            }
            if (top->remaining == 0) {
                if (close_finished(stack, &depth)) break;
                continue;
            }
        }
        if (pos >= size) { message = "an object ends past the last byte"; extra = pos; goto done; }
        Py_ssize_t start = pos;
        unsigned b = data[pos++];
        int is_key = top && top->keys && top->remaining % 2 == 0;
        extra = start;
        if (is_key && !is_str_type(b)) { message = "a map key is not a str"; goto done; }
        if (b == 0xc1 || (b >= 0xc7 && b <= 0xc9) || (b >= 0xd4 && b <= 0xd8)) {
            message = "an extension type or the never-used type byte 0xc1";
            goto done;
        }
        if (is_one_byte(b)) {
        } else if (b >= 0xca && b <= 0xd3) {
            if (size - pos < fixed_size(b)) { message = "a number ends past the last byte"; goto done; }
            pos += fixed_size(b);
        } else if (is_str_type(b) || (b >= 0xc4 && b <= 0xc6)) {
            int field = (b == 0xd9 || b == 0xc4) ? 1 : (b == 0xda || b == 0xc5) ? 2 : (b == 0xdb || b == 0xc6) ? 4 : 0;
            if (size - pos < field) { message = "a str/bin length field ends past the last byte"; goto done; }
            uint64_t length = field ? read_be(data + pos, field) : (uint64_t)(b & 0x1f);
            pos += field;
            if (length > (uint64_t)(size - pos)) { message = "a str or bin declares more bytes than are left"; goto done; }
            if (is_str_type(b)) {
                PyObject *text = PyUnicode_DecodeUTF8((const char *)data + pos, (Py_ssize_t)length, "strict");
                if (!text) {
                    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) { python_error = 1; goto done; }
                    PyErr_Clear();
                    message = "a str is not valid UTF-8";
                    goto done;
                }
                Py_DECREF(text);
                if (is_key) {
                    int added = add_key(top->keys, data + pos, (Py_ssize_t)length);
                    if (added < 0) { python_error = 1; goto done; }
                    if (!added) { message = "a map holds the same key twice"; goto done; }
                }
            }
            pos += (Py_ssize_t)length;
        } else {
            int is_map = (b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf;
            int field = (b == 0xdc || b == 0xde) ? 2 : (b == 0xdd || b == 0xdf) ? 4 : 0;
            if (size - pos < field) { message = "an array/map length field ends past the last byte"; goto done; }
            uint64_t count = field ? read_be(data + pos, field) : (uint64_t)(b & 0x0f);
            pos += field;
            if (depth + 1 > MSGPACK_MAX_DEPTH) { message = "a container deeper than 16"; goto done; }
            uint64_t items = is_map ? 2 * count : count;
            if (items > (uint64_t)(size - pos)) { message = "a container declares more objects than bytes are left"; goto done; }
            if (++containers > budget) { code = "limit"; message = "too many arrays and maps"; extra = containers; goto done; }
            stack[depth].remaining = items;
            stack[depth].keys = NULL;
            if (is_map && !(stack[depth].keys = PySet_New(NULL))) { python_error = 1; goto done; }
            depth++;
            if (items == 0 && close_finished(stack, &depth)) break;
            continue;
        }
        top->remaining--;
        if (close_finished(stack, &depth)) break;
    }
    if (pos != size) { code = "trailing"; message = "bytes after the header map"; extra = size - pos; }
done:
    for (int i = 0; i < depth; i++) Py_CLEAR(stack[i].keys);
    PyBuffer_Release(&buffer);
    if (python_error) return NULL;
    if (message) return fail_extra(code, message, extra);
    Py_RETURN_NONE;
}

#define ZSTD_MAX_WINDOW (8u << 20)
#define ZSTD_MAX_BLOCK (128u << 10)

static uint64_t read_le(const unsigned char *p, int size) {
    uint64_t value = 0;
    for (int i = size - 1; i >= 0; i--) value = (value << 8) | p[i];
    return value;
}

static PyObject *zstd_walk(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    unsigned long long declared;
    const char *code = "format", *message = NULL;
    Py_ssize_t pos = 5, extra = 0;
    if (!PyArg_ParseTuple(args, "y*K", &buffer, &declared)) return NULL;
    const unsigned char *s = (const unsigned char *)buffer.buf;
    Py_ssize_t size = buffer.len;
    static const unsigned char magic[4] = {0x28, 0xb5, 0x2f, 0xfd};
    static const int dictionary_sizes[4] = {0, 1, 2, 4};
    if (size < 4 || memcmp(s, magic, 4) != 0) { message = "not a zstd frame (bad or missing frame magic)"; goto done; }
    if (size < 5) { code = "truncated"; message = "zstd frame ends inside its frame header"; extra = size; goto done; }
    unsigned descriptor = s[4];
    int content_size_flag = descriptor >> 6, single_segment = (descriptor >> 5) & 1, has_checksum = (descriptor >> 2) & 1;
    uint64_t window = 0;
    if ((descriptor >> 3) & 1) { message = "zstd frame header sets its reserved bit"; extra = 4; goto done; }
    if (content_size_flag == 0 && !single_segment) { message = "zstd frame does not declare its content size"; extra = 4; goto done; }
    if (!single_segment) {
        if (size < pos + 1) { code = "truncated"; message = "zstd frame ends inside its frame header"; extra = size; goto done; }
        uint64_t base = (uint64_t)1 << (10 + (s[pos] >> 3));
        window = base + (base >> 3) * (s[pos] & 7);
        if (window > ZSTD_MAX_WINDOW) { message = "zstd window exceeds 8 MiB"; extra = pos; goto done; }
        pos += 1;
    }
    int dictionary_size = dictionary_sizes[descriptor & 3];
    if (size < pos + dictionary_size) { code = "truncated"; message = "zstd frame ends inside its frame header"; extra = size; goto done; }
    if (read_le(s + pos, dictionary_size)) { message = "zstd frame names a dictionary"; extra = pos; goto done; }
    pos += dictionary_size;
    int content_size_bytes = content_size_flag == 0 ? single_segment : content_size_flag == 1 ? 2 : content_size_flag == 2 ? 4 : 8;
    if (size < pos + content_size_bytes) { code = "truncated"; message = "zstd frame ends inside its frame header"; extra = size; goto done; }
    uint64_t content_size = read_le(s + pos, content_size_bytes) + (content_size_bytes == 2 ? 256 : 0);
    if (content_size != declared) { message = "zstd frame content size differs from the declared length"; extra = pos; goto done; }
    pos += content_size_bytes;
    if (single_segment) window = content_size;
    uint64_t block_max = window < ZSTD_MAX_BLOCK ? window : ZSTD_MAX_BLOCK;
    for (;;) {
        if (size - pos < 3) { code = "truncated"; message = "zstd frame ends inside a block header"; extra = size; goto done; }
        uint32_t header = (uint32_t)read_le(s + pos, 3);
        unsigned block_type = (header >> 1) & 3;
        uint32_t block_size = header >> 3;
        if (block_type == 3) { message = "zstd block of the reserved type 3"; extra = pos; goto done; }
        if (block_size > block_max) { message = "zstd block larger than Block_Maximum_Size"; extra = pos; goto done; }
        Py_ssize_t content = block_type == 1 ? 1 : (Py_ssize_t)block_size;
        if (size - pos - 3 < content) { code = "truncated"; message = "zstd frame ends inside a block"; extra = size; goto done; }
        pos += 3 + content;
        if (header & 1) break;
    }
    if (has_checksum) {
        if (size - pos < 4) { code = "truncated"; message = "zstd frame ends inside its content checksum"; extra = size; goto done; }
        pos += 4;
    }
    if (pos < size) { code = "trailing"; message = "bytes follow the zstd frame"; extra = size - pos; }
done:
    PyBuffer_Release(&buffer);
    if (message) return fail_extra(code, message, extra);
    return PyLong_FromSsize_t(pos);
}

/* ---------------------------------------------------------------------------------------------
 * Encoder passes (fstqcodec/encoder): the same arithmetic as the numpy reference, operation for
 * operation, so that both give the same bits (no FMA contraction: setup.py passes
 * -ffp-contract=off). Each loop reads its inputs once and runs without the GIL.
 */

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

/* Hot loops are compiled several times where the compiler can (AVX-512 as x86-64-v4, from GCC 11,
 * AVX2 and the baseline) and the loader picks one: the arithmetic is the same IEEE operations
 * either way, so are the results. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 11
#define HOT __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#else
#define HOT
#endif

/* Largest |x| of a row: the integer max of the sign-cleared bits (plans.absmax_rows). */
static inline float row_absmax_one(const float *row, Py_ssize_t count) {
    const uint32_t *bits = (const uint32_t *)row;
    uint32_t top = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        uint32_t b = bits[k] & 0x7FFFFFFFu;
        top = b > top ? b : top;
    }
    float value;
    memcpy(&value, &top, 4);
    return value;
}

/* Per-block sums for the allocation (encoder/moments.py, block_moments, the reference): per row of
 * block_size float32 values x, and per element the weight w = (root ? sqrt(F) : F) * p2 + 0.0 in
 * float64 (the + 0.0 turns -0.0 into +0.0, so every term is >= +0.0 and adding from 0 is exact):
 * the largest |x|, and sums of x*x, |x| and, with weights, of w, w*(x*x), w*|x|, each over 8
 * lanes (element k in lane k % 8, added in order) combined as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)):
 * an order numpy reproduces with cumsum. Weights past `count` elements (the tensor's padding) are 0. */
static int double_buffer(PyObject *object, Py_buffer *view, Py_ssize_t count, int writable, const char *what);

typedef struct {
    double *absmax, *squares, *magnitudes, *weights, *weighted_squares, *weighted_magnitudes;
} moment_outputs;

static inline double lanes_total(const double *l) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

static inline double moment_weight(const void *values, int itemsize, Py_ssize_t i, int root, double p2) {
    double f = itemsize == 4 ? (double)((const float *)values)[i] : ((const double *)values)[i];
    return (root ? sqrt(f) : f) * p2 + 0.0;
}

/* The Fisher checks of policy/fisher.py (weights_max below), taken as the sums read the weights:
 * the largest bits with -0.0 as +0.0 (good values order as their bits do), and whether a value
 * is bad (negative, NaN or infinite: its bits reach the exponent-all-ones pattern). */
typedef struct {
    uint64_t top;
    uint64_t bad;
} weight_check;

static inline void check_weight(const void *values, int itemsize, Py_ssize_t i, weight_check *c) {
    if (itemsize == 4) {
        uint32_t b;
        memcpy(&b, (const char *)values + 4 * i, 4);
        b = b == 0x80000000u ? 0u : b;
        c->top = b > c->top ? b : c->top;
        c->bad |= b >= 0x7F800000u;
    } else {
        uint64_t b;
        memcpy(&b, (const char *)values + 8 * i, 8);
        b = b == 0x8000000000000000ull ? 0u : b;
        c->top = b > c->top ? b : c->top;
        c->bad |= b >= 0x7FF0000000000000ull;
    }
}

/* One row in the general layout (any block size, a row that the tensor's end cuts). */
static void moments_row_general(const float *x, Py_ssize_t block_size, const void *fisher, int itemsize, Py_ssize_t first,
                                Py_ssize_t count, int root, double p2, double sums[5][8], float *top, weight_check *check) {
    for (Py_ssize_t k = 0; k < block_size; k++) {
        double v = x[k], a = fabs(v), w = 0.0;
        if (fisher && first + k < count) {
            w = moment_weight(fisher, itemsize, first + k, root, p2);
            check_weight(fisher, itemsize, first + k, check);
        }
        float af = fabsf(x[k]);
        *top = af > *top ? af : *top;
        int j = (int)(k & 7);
        sums[0][j] += v * v;
        sums[1][j] += a;
        sums[2][j] += w;
        sums[3][j] += w * (v * v);
        sums[4][j] += w * a;
    }
}

#if defined(__GNUC__) || defined(__clang__)
/* 4-double vectors: elementwise IEEE operations, so the same bits as the scalar lanes. */
typedef double lanes4 __attribute__((vector_size(32)));
#define LANES4_LOAD(p) ((lanes4){(p)[0], (p)[1], (p)[2], (p)[3]})
#else
#define MOMENTS_SCALAR_ONLY 1
#endif

#ifndef MOMENTS_SCALAR_ONLY
static inline void lanes4_store(double *out, lanes4 v) { memcpy(out, &v, sizeof v); }

/* Full rows of a multiple of 8 elements with float32 weights or none: lanes 0-3 and 4-7 as two
 * vectors; the weights of up to 64 elements at a time in a plain loop that vectorises. */
HOT static void moments_rows_fast(const float *x, Py_ssize_t block_size, Py_ssize_t rows, const float *fisher, int root,
                                  double p2, const moment_outputs *out, weight_check *check, float *copy) {
    double v[64], a[64], w[64], l[8];
    uint32_t top = 0, bad = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *row = x + r * block_size;
        /* The row into the encoder's matrix (Input.matrix_rows_to_fill) as it is read, instead
         * of a copy of every tensor before this pass. */
        if (copy) memcpy(copy + r * block_size, row, sizeof(float) * (size_t)block_size);
        const float *f = fisher ? fisher + r * block_size : NULL;
        lanes4 zero = {0, 0, 0, 0}, sq[2] = {zero, zero}, ab[2] = {zero, zero}, ws[2] = {zero, zero}, wsq[2] = {zero, zero},
               wab[2] = {zero, zero};
        for (Py_ssize_t k0 = 0; k0 < block_size; k0 += 64) {
            int m = (int)(block_size - k0 < 64 ? block_size - k0 : 64);
            for (int k = 0; k < m; k++) {
                v[k] = row[k0 + k];
                a[k] = fabs(v[k]);
            }
            if (f) {
                if (root) for (int k = 0; k < m; k++) w[k] = sqrt((double)f[k0 + k]) * p2 + 0.0;
                else for (int k = 0; k < m; k++) w[k] = (double)f[k0 + k] * p2 + 0.0;
                const uint32_t *bits = (const uint32_t *)(f + k0);
                for (int k = 0; k < m; k++) {
                    uint32_t b = bits[k] == 0x80000000u ? 0u : bits[k];
                    top = b > top ? b : top;
                    bad |= b >= 0x7F800000u;
                }
            }
            for (int k = 0; k < m; k += 8) {
                for (int h = 0; h < 2; h++) {
                    lanes4 vv = LANES4_LOAD(v + k + 4 * h), aa = LANES4_LOAD(a + k + 4 * h), squares = vv * vv;
                    sq[h] += squares;
                    ab[h] += aa;
                    if (f) {
                        lanes4 ww = LANES4_LOAD(w + k + 4 * h);
                        ws[h] += ww;
                        wsq[h] += ww * squares;
                        wab[h] += ww * aa;
                    }
                }
            }
        }
        out->absmax[r] = row_absmax_one(row, block_size);
        lanes4_store(l, sq[0]); lanes4_store(l + 4, sq[1]); out->squares[r] = lanes_total(l);
        lanes4_store(l, ab[0]); lanes4_store(l + 4, ab[1]); out->magnitudes[r] = lanes_total(l);
        if (f) {
            lanes4_store(l, ws[0]); lanes4_store(l + 4, ws[1]); out->weights[r] = lanes_total(l);
            lanes4_store(l, wsq[0]); lanes4_store(l + 4, wsq[1]); out->weighted_squares[r] = lanes_total(l);
            lanes4_store(l, wab[0]); lanes4_store(l + 4, wab[1]); out->weighted_magnitudes[r] = lanes_total(l);
        }
    }
    check->top = top > check->top ? top : check->top;
    check->bad |= bad;
}
#endif

static void moments_rows(const float *x, Py_ssize_t block_size, Py_ssize_t rows, const void *fisher, int itemsize, Py_ssize_t count,
                         int root, double p2, const moment_outputs *out, weight_check *check, float *copy) {
    Py_ssize_t fast = 0;
#ifndef MOMENTS_SCALAR_ONLY
    if (block_size % 8 == 0 && (!fisher || itemsize == 4)) fast = fisher ? count / block_size : rows;
    if (fast > rows) fast = rows;
    moments_rows_fast(x, block_size, fast, (const float *)fisher, root, p2, out, check, copy);
#endif
    for (Py_ssize_t r = fast; r < rows; r++) {
        if (copy) memcpy(copy + r * block_size, x + r * block_size, sizeof(float) * (size_t)block_size);
        double sums[5][8] = {{0}};
        float top = 0.0f;
        moments_row_general(x + r * block_size, block_size, fisher, itemsize, r * block_size, count, root, p2, sums, &top, check);
        out->absmax[r] = top;
        out->squares[r] = lanes_total(sums[0]);
        out->magnitudes[r] = lanes_total(sums[1]);
        if (fisher) {
            out->weights[r] = lanes_total(sums[2]);
            out->weighted_squares[r] = lanes_total(sums[3]);
            out->weighted_magnitudes[r] = lanes_total(sums[4]);
        }
    }
}

/* block_moments(matrix_f32 rows, block_size, fisher|None, itemsize, count, root, p2, absmax_f64,
 *               squares_f64, magnitudes_f64, weights_f64|None, weighted_squares_f64|None,
 *               weighted_magnitudes_f64|None[, copy_to]): the sums above for every row of the matrix given
 * (and the rows copied into copy_to, a writable buffer of their size, where given);
 * fisher holds `count` values (float32 or float64) for the matrix's first elements. Returns None
 * without fisher, else (largest fisher value with -0.0 as +0.0, whether every value is finite and
 * >= 0), the checks of weights_max taken in the same pass. */
static PyObject *block_moments(PyObject *self, PyObject *args) {
    Py_buffer matrix, fisher = {0}, views[6], copy = {0};
    PyObject *fisher_object, *objects[6], *copy_object = Py_None;
    Py_ssize_t block_size, count;
    int itemsize, root, held = 0, ok = 0;
    double p2;
    weight_check check = {0, 0};
    if (!PyArg_ParseTuple(args, "y*nOinidOOOOOO|O", &matrix, &block_size, &fisher_object, &itemsize, &count, &root, &p2,
                          &objects[0], &objects[1], &objects[2], &objects[3], &objects[4], &objects[5], &copy_object))
        return NULL;
    int weighted = fisher_object != Py_None;
    Py_ssize_t rows = block_size > 0 ? matrix.len / 4 / block_size : 0;
    double **targets[6];
    moment_outputs out = {0};
    targets[0] = &out.absmax; targets[1] = &out.squares; targets[2] = &out.magnitudes;
    targets[3] = &out.weights; targets[4] = &out.weighted_squares; targets[5] = &out.weighted_magnitudes;
    if (block_size < 1 || matrix.len % (4 * block_size)) {
        PyErr_SetString(PyExc_ValueError, "block_moments: inconsistent arguments");
        goto done;
    }
    if (weighted) {
        if (PyObject_GetBuffer(fisher_object, &fisher, PyBUF_SIMPLE) < 0) goto done;
        if ((itemsize != 4 && itemsize != 8) || fisher.len != itemsize * count || count > rows * block_size) {
            PyErr_SetString(PyExc_ValueError, "block_moments: the weights do not fit the rows");
            goto done;
        }
    }
    for (int i = 0; i < (weighted ? 6 : 3); i++) {
        if (double_buffer(objects[i], &views[held], rows, 1, "an output") < 0) goto done;
        *targets[i] = (double *)views[held++].buf;
    }
    if (copy_object != Py_None) {
        if (PyObject_GetBuffer(copy_object, &copy, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
        if (copy.len != matrix.len) {
            PyErr_SetString(PyExc_ValueError, "block_moments: the copy's size differs from the rows'");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    moments_rows((const float *)matrix.buf, block_size, rows, weighted ? fisher.buf : NULL, itemsize, count, root, p2, &out, &check,
                 (float *)copy.buf);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    if (copy.buf) PyBuffer_Release(&copy);
    for (int i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    if (fisher.buf) PyBuffer_Release(&fisher);
    PyBuffer_Release(&matrix);
    if (!ok) return NULL;
    if (!weighted) Py_RETURN_NONE;
    double largest = -INFINITY;
    if (count && itemsize == 4) {
        uint32_t top = (uint32_t)check.top;
        float value;
        memcpy(&value, &top, 4);
        largest = value;
    } else if (count) {
        memcpy(&largest, &check.top, 8);
    }
    return Py_BuildValue("(dO)", largest, check.bad ? Py_False : Py_True);
}

/* Float bits with -0.0 mapped to +0.0: then a weight is bad (negative, NaN or infinite) exactly
 * when its bits reach the exponent-all-ones pattern, and good ones order as their values. */
HOT static int max_bits32(const uint32_t *bits, Py_ssize_t count, uint32_t *largest) {
    uint32_t top = 0, worst = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t b = bits[i] == 0x80000000u ? 0u : bits[i];
        top = b > top ? b : top;
        worst = b >= 0x7F800000u ? 1u : worst;
    }
    *largest = top;
    return (int)worst;
}

HOT static int max_bits64(const uint64_t *bits, Py_ssize_t count, uint64_t *largest) {
    uint64_t top = 0, worst = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t b = bits[i] == 0x8000000000000000ull ? 0u : bits[i];
        top = b > top ? b : top;
        worst = b >= 0x7FF0000000000000ull ? 1u : worst;
    }
    *largest = top;
    return (int)worst;
}

/* Whether every float is finite: the exponent field is all ones exactly when adding one unit of
 * exponent carries into the sign bit (an OR-reduction the compiler vectorises). */
HOT static int finite32(const uint32_t *bits, Py_ssize_t count) {
    uint32_t carry = 0;
    for (Py_ssize_t i = 0; i < count; i++) carry |= (bits[i] & 0x7F800000u) + 0x00800000u;
    return !(carry & 0x80000000u);
}

HOT static int finite64(const uint64_t *bits, Py_ssize_t count) {
    uint64_t carry = 0;
    for (Py_ssize_t i = 0; i < count; i++) carry |= (bits[i] & 0x7FF0000000000000ull) + 0x0010000000000000ull;
    return !(carry & 0x8000000000000000ull);
}

/* all_finite(array, itemsize) -> bool (float32 or float64 values). */
static PyObject *all_finite(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    int itemsize, finite;
    if (!PyArg_ParseTuple(args, "y*i", &buffer, &itemsize)) return NULL;
    if ((itemsize != 4 && itemsize != 8) || buffer.len % itemsize) {
        PyBuffer_Release(&buffer);
        PyErr_SetString(PyExc_ValueError, "all_finite: itemsize must be 4 or 8");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    finite = itemsize == 4 ? finite32((const uint32_t *)buffer.buf, buffer.len / 4) : finite64((const uint64_t *)buffer.buf, buffer.len / 8);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buffer);
    return PyBool_FromLong(finite);
}

/* weights_max(array, itemsize) -> the largest element (-inf if empty), or None if any element is
 * negative, NaN or infinite (policy/fisher.py's checks in one pass). */
static PyObject *weights_max(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    int itemsize, bad = 0;
    double largest = -INFINITY;
    if (!PyArg_ParseTuple(args, "y*i", &buffer, &itemsize)) return NULL;
    if ((itemsize != 4 && itemsize != 8) || buffer.len % itemsize) {
        PyBuffer_Release(&buffer);
        PyErr_SetString(PyExc_ValueError, "weights_max: itemsize must be 4 or 8");
        return NULL;
    }
    Py_ssize_t count = buffer.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4) {
        uint32_t top;
        float value;
        bad = max_bits32((const uint32_t *)buffer.buf, count, &top);
        memcpy(&value, &top, 4);
        largest = value;
    } else {
        uint64_t top;
        bad = max_bits64((const uint64_t *)buffer.buf, count, &top);
        memcpy(&largest, &top, 8);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buffer);
    if (bad) Py_RETURN_NONE;
    return PyFloat_FromDouble(count ? largest : -INFINITY);
}

/* sign_errors(energy, weighted_abs, weight_sum, scale, near_limit_u8, out) (encoder/budget.py,
 * block_stats, the reference): per block max(E - 2 s A + s s W, 0) as numpy computes it (the same
 * operations in the same order; numpy's maximum keeps a NaN and the first of equal values), or
 * inf where near_limit. One pass instead of eight numpy passes. */
HOT static void sign_errors_loop(const double *energy, const double *weighted_abs, const double *weight_sum, const double *scale,
                                 const unsigned char *near_limit, double *out, Py_ssize_t count) {
    for (Py_ssize_t j = 0; j < count; j++) {
        double s = scale[j];
        double error = (energy[j] - (2.0 * s) * weighted_abs[j]) + (s * s) * weight_sum[j];
        error = (error >= 0.0 || error != error) ? error : 0.0;
        out[j] = near_limit[j] ? INFINITY : error;
    }
}

static PyObject *sign_errors(PyObject *self, PyObject *args) {
    PyObject *objects[5], *out_object;
    Py_buffer views[5], out, limit;
    int held = 0, ok = 0;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "OOOOy*O", &objects[0], &objects[1], &objects[2], &objects[3], &limit, &out_object)) return NULL;
    count = limit.len;
    for (int i = 0; i < 4; i++) {
        if (double_buffer(objects[i], &views[held], count, 0, "an input") < 0) goto done;
        held++;
    }
    if (double_buffer(out_object, &views[held], count, 1, "the output") < 0) goto done;
    out = views[held++];
    Py_BEGIN_ALLOW_THREADS
    sign_errors_loop((const double *)views[0].buf, (const double *)views[1].buf, (const double *)views[2].buf,
                     (const double *)views[3].buf, (const unsigned char *)limit.buf, (double *)out.buf, count);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    for (int i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyBuffer_Release(&limit);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* The allocation's per-block choice at one multiplier (policy/allocation.py, _Evaluator._evaluate,
 * the reference: the same operations in the same order), except for the blocks whose best step
 * the widest grid caps: their indices go to `capped`, and the caller evaluates them. */
enum { MODE_DROP = 0, MODE_QUANTIZE = 1, MODE_RAW = 3, MODE_SIGN = 4, MODE_SIGN_SHARED = 5 };

typedef struct {
    const double *log2_energy, *log2_r_cap, *n, *drop_energy, *energy, *exact_bits, *sign, *shared, *tables;
    const unsigned char *empty;
    Py_ssize_t blocks, grid;
    double grid0, lam, log2_lam, drop_bits, scale_bits, shared_scale_bits;
    int64_t *capped;
    const double *r_tables;
    Py_ssize_t r_grid;
    double r_grid0;
    signed char *mode;
    double *log2_r, *tau, *bits, *distortion;
} evaluation;

/* Nearest index into a 1/16-octave grid starting at grid0, clamped; NaN and -inf give 0. */
static inline Py_ssize_t grid_index(double log2_value, double grid0, Py_ssize_t length) {
    double index = nearbyint((log2_value - grid0) * 16);
    return (Py_ssize_t)fmin(fmax(index, 0.0), (double)(length - 1));
}

/* The best of drop, the quantizer (at the given per-element cost, entropy and relative
 * distortion), the sign candidates and raw for block j; written to the outputs. */
static inline void choose(const evaluation *e, Py_ssize_t j, double cost_per_element, double entropy, double relative,
                          double log2_r, double tau) {
    double n = e->n[j];
    double best = e->drop_energy[j] / e->lam + e->drop_bits;
    signed char mode = MODE_DROP;
    double bits = e->drop_bits, distortion = e->drop_energy[j];
    double cost = n * cost_per_element + e->scale_bits;
    if (cost < best) {
        best = cost;
        mode = MODE_QUANTIZE;
        bits = n * entropy + e->scale_bits;
        distortion = e->energy[j] * relative;
    }
    if (e->sign) {
        double sign_bits = n + e->scale_bits;
        cost = e->sign[j] / e->lam + sign_bits;
        if (cost < best) {
            best = cost;
            mode = MODE_SIGN;
            bits = sign_bits;
            distortion = e->sign[j];
        }
        double shared_bits = n + e->shared_scale_bits;
        cost = e->shared[j] / e->lam + shared_bits;
        if (cost < best) {
            best = cost;
            mode = MODE_SIGN_SHARED;
            bits = shared_bits;
            distortion = e->shared[j];
        }
    }
    if (e->exact_bits[j] < best) {
        mode = MODE_RAW;
        bits = e->exact_bits[j];
        distortion = 0.0;
    }
    if (e->empty[j]) {
        mode = MODE_DROP;
        bits = e->drop_bits;
        distortion = 0.0;
    }
    e->bits[j] = bits;
    if (e->mode) {
        e->mode[j] = mode;
        e->log2_r[j] = log2_r;
        e->tau[j] = tau;
        e->distortion[j] = distortion;
    }
}

HOT static Py_ssize_t evaluate_rows(const evaluation *e) {
    const double *G = e->tables, *R = e->tables + e->grid, *T = e->tables + 2 * e->grid, *H = e->tables + 3 * e->grid,
                 *D = e->tables + 4 * e->grid;
    Py_ssize_t capped = 0;
    for (Py_ssize_t j = 0; j < e->blocks; j++) {
        double log2_u = e->log2_energy[j] - e->log2_lam;
        Py_ssize_t ui = grid_index(log2_u, e->grid0, e->grid);
        if (R[ui] > e->log2_r_cap[j]) {
            /* The widest grid caps the step: the caller computes exp2(log2 u) as numpy does
             * and evaluates these blocks with evaluate_capped_rows. */
            e->capped[capped++] = j;
            continue;
        }
        choose(e, j, G[ui], H[ui], D[ui], R[ui], T[ui]);
    }
    return capped;
}

/* Capped blocks: the tau = 0 quantizer at the capped step, whose cost per element is
 * u * D0 + H0 with u = exp2(log2 u) given (computed by numpy, as the reference does). */
static void evaluate_capped_rows(const evaluation *e, const int64_t *rows, const double *exp_u, Py_ssize_t count) {
    const double *D0 = e->r_tables, *H0 = e->r_tables + e->r_grid;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t j = (Py_ssize_t)rows[i];
        double cap = e->log2_r_cap[j];
        Py_ssize_t ri = grid_index(cap, e->r_grid0, e->r_grid);
        choose(e, j, exp_u[i] * D0[ri] + H0[ri], H0[ri], D0[ri], cap, 0.0);
    }
}

static int check_rows(const int64_t *rows, Py_ssize_t count, Py_ssize_t total);

static int double_buffer(PyObject *object, Py_buffer *view, Py_ssize_t count, int writable, const char *what) {
    if (PyObject_GetBuffer(object, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) return -1;
    if (view->len != (Py_ssize_t)sizeof(double) * count) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "evaluate_blocks: %s has the wrong size", what);
        return -1;
    }
    return 0;
}

/* evaluate_blocks(log2_energy, log2_r_cap, n, drop_energy, energy, exact_bits, empty_u8, sign|None,
 *                 shared|None, tables (5, grid), grid0, lam, log2_lam, (drop, scale, shared scale bits),
 *                 out_mode_i8|None, out_log2_r|None, out_tau|None, out_bits, out_distortion|None,
 *                 capped_i64[, exp_u_f64, r_tables (2, r_grid), r_grid0])
 * Without exp_u: evaluates every uncapped block and writes the capped ones' indices to the front of
 * capped (length blocks), returning how many. With exp_u: evaluates exactly the blocks listed in
 * capped (same length as exp_u, their exp2(log2 u)), returning 0. */
static PyObject *evaluate_blocks(PyObject *self, PyObject *args) {
    PyObject *objects[18] = {NULL};
    double constants[3];
    evaluation e;
    Py_buffer views[18];
    int held = 0, ok = 0;
    Py_ssize_t capped = 0, listed = 0;
    e.r_grid0 = 0.0;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOddd(ddd)OOOOOO|OOd", &objects[0], &objects[1], &objects[2], &objects[3], &objects[4],
                          &objects[5], &objects[6], &objects[7], &objects[8], &objects[9], &e.grid0, &e.lam, &e.log2_lam,
                          &constants[0], &constants[1], &constants[2], &objects[10], &objects[11], &objects[12], &objects[13],
                          &objects[14], &objects[15], &objects[16], &objects[17], &e.r_grid0))
        return NULL;
    const double *exp_u = NULL;
    e.drop_bits = constants[0];
    e.scale_bits = constants[1];
    e.shared_scale_bits = constants[2];
    if (PyObject_GetBuffer(objects[6], &views[held], PyBUF_SIMPLE) < 0) return NULL;
    e.blocks = views[held].len;
    e.empty = (const unsigned char *)views[held++].buf;
    const double **inputs[] = {&e.log2_energy, &e.log2_r_cap, &e.n, &e.drop_energy, &e.energy, &e.exact_bits};
    for (int i = 0; i < 6; i++) {
        if (double_buffer(objects[i], &views[held], e.blocks, 0, "a per-block input") < 0) goto done;
        *inputs[i] = (const double *)views[held++].buf;
    }
    e.sign = e.shared = NULL;
    if ((objects[7] == Py_None) != (objects[8] == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "evaluate_blocks: give both sign distortions or neither");
        goto done;
    }
    if (objects[7] != Py_None) {
        if (double_buffer(objects[7], &views[held], e.blocks, 0, "sign") < 0) goto done;
        e.sign = (const double *)views[held++].buf;
        if (double_buffer(objects[8], &views[held], e.blocks, 0, "shared") < 0) goto done;
        e.shared = (const double *)views[held++].buf;
    }
    if (PyObject_GetBuffer(objects[9], &views[held], PyBUF_SIMPLE) < 0) goto done;
    e.tables = (const double *)views[held].buf;
    e.grid = views[held++].len / (Py_ssize_t)sizeof(double) / 5;
    if (e.grid < 1) {
        PyErr_SetString(PyExc_ValueError, "evaluate_blocks: empty tables");
        goto done;
    }
    /* mode, log2_r, tau and distortion may all be None: then only the bits are written. */
    e.mode = NULL;
    e.log2_r = e.tau = e.distortion = NULL;
    if (objects[10] != Py_None) {
        if (PyObject_GetBuffer(objects[10], &views[held], PyBUF_WRITABLE) < 0) goto done;
        if (views[held].len != e.blocks) {
            held++;
            PyErr_SetString(PyExc_ValueError, "evaluate_blocks: mode has the wrong size");
            goto done;
        }
        e.mode = (signed char *)views[held++].buf;
    }
    double **outputs[] = {&e.log2_r, &e.tau, &e.bits, &e.distortion};
    for (int i = 0; i < 4; i++) {
        if (objects[11 + i] == Py_None && i != 2 && !e.mode) continue;
        if (double_buffer(objects[11 + i], &views[held], e.blocks, 1, "an output") < 0) goto done;
        *outputs[i] = (double *)views[held++].buf;
    }
    if (PyObject_GetBuffer(objects[15], &views[held], PyBUF_WRITABLE) < 0) goto done;
    e.capped = (int64_t *)views[held].buf;
    listed = views[held++].len / 8;
    if (objects[16] && objects[16] != Py_None) {
        if (double_buffer(objects[16], &views[held], listed, 0, "exp_u") < 0) goto done;
        exp_u = (const double *)views[held++].buf;
        if (!objects[17] || PyObject_GetBuffer(objects[17], &views[held], PyBUF_SIMPLE) < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "evaluate_blocks: exp_u needs the capped tables");
            goto done;
        }
        e.r_tables = (const double *)views[held].buf;
        e.r_grid = views[held++].len / (Py_ssize_t)sizeof(double) / 2;
        if (e.r_grid < 1 || check_rows(e.capped, listed, e.blocks) < 0) {
            PyErr_SetString(PyExc_ValueError, "evaluate_blocks: bad capped rows or tables");
            goto done;
        }
    } else if (listed != e.blocks) {
        PyErr_SetString(PyExc_ValueError, "evaluate_blocks: capped has the wrong size");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (exp_u) evaluate_capped_rows(&e, e.capped, exp_u, listed);
    else capped = evaluate_rows(&e);
    Py_END_ALLOW_THREADS
    ok = 1;
done:
    for (int i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    return ok ? PyLong_FromSsize_t(capped) : NULL;
}

/* quantize_rows(matrix_f32, block_size, rows_i64, scales_f32, offsets_f32, uniform, codes_i8, where_i64)
 * plans._quantize_rows with nearest or dead-zone rounding, row i into codes row where[i]:
 * v = x / scale in float32, then rint(v) where every offset is 1/2 (uniform), else
 * copysign(floor(|v| + offset), v). */
HOT static void quantize_loop(const float *x, Py_ssize_t block_size, const int64_t *rows, Py_ssize_t count, const float *scales,
                              const float *offsets, int uniform, signed char *codes, const int64_t *where) {
    for (Py_ssize_t i = 0; i < count; i++) {
        const float *row = x + rows[i] * block_size;
        signed char *out = codes + where[i] * block_size;
        float scale = scales[i], offset = offsets[i];
        if (uniform) {
            for (Py_ssize_t k = 0; k < block_size; k++) out[k] = (signed char)(int)nearbyintf(row[k] / scale);
        } else if (!(offset >= 0.0f)) {
            for (Py_ssize_t k = 0; k < block_size; k++) {
                float v = row[k] / scale;
                out[k] = (signed char)(int)copysignf(floorf(fabsf(v) + offset), v);
            }
        } else {
            /* copysignf(floorf(|v| + offset), v) converted to an integer, written so that it
             * vectorises: |v| + offset >= 0 (the encoder's offsets are 1/2 less a dead zone below 1/2), where
             * the integer conversion's truncation is floor, and the sign can be applied to the
             * integer (v = -0.0 has magnitude 0 either way). */
            for (Py_ssize_t k = 0; k < block_size; k++) {
                float v = row[k] / scale;
                int magnitude = (int)(fabsf(v) + offset);
                out[k] = (signed char)(v < 0.0f ? -magnitude : magnitude);
            }
        }
    }
}

static int check_rows(const int64_t *rows, Py_ssize_t count, Py_ssize_t total) {
    for (Py_ssize_t i = 0; i < count; i++)
        if (rows[i] < 0 || rows[i] >= total) return -1;
    return 0;
}

static PyObject *quantize_rows(PyObject *self, PyObject *args) {
    Py_buffer matrix, rows, scales, offsets, codes, where;
    Py_ssize_t block_size;
    int uniform;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*pw*y*", &matrix, &block_size, &rows, &scales, &offsets, &uniform, &codes, &where)) return NULL;
    Py_ssize_t count = rows.len / 8;
    if (block_size < 1 || matrix.len % (4 * block_size) || rows.len % 8 || scales.len != 4 * count || offsets.len != 4 * count
        || where.len != rows.len || codes.len % block_size || check_rows((const int64_t *)rows.buf, count, matrix.len / 4 / block_size) < 0
        || check_rows((const int64_t *)where.buf, count, codes.len / block_size) < 0) {
        PyErr_SetString(PyExc_ValueError, "quantize_rows: inconsistent arguments");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    quantize_loop((const float *)matrix.buf, block_size, (const int64_t *)rows.buf, count, (const float *)scales.buf,
                  (const float *)offsets.buf, uniform, (signed char *)codes.buf, (const int64_t *)where.buf);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&matrix);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&where);
    return result;
}

HOT static void sign_loop(const float *x, Py_ssize_t block_size, const int64_t *row, Py_ssize_t count, signed char *out,
                          const int64_t *at) {
    for (Py_ssize_t i = 0; i < count; i++) {
        const float *values = x + row[i] * block_size;
        signed char *c = out + at[i] * block_size;
        for (Py_ssize_t k = 0; k < block_size; k++) c[k] = values[k] < 0.0f ? -1 : 0;
    }
}

/* pack_rows(codes_i8 matrix, block_size, rows_i64, offset, width) -> bytes: bitpack.pack of the
 * symbols codes[rows[0]], codes[rows[1]], ... (each byte plus offset modulo 256, each < 2**width),
 * width 1, 2, 4 or 8: LSB first, the last byte's padding bits zero. */
static PyObject *pack_rows(PyObject *self, PyObject *args) {
    Py_buffer codes, rows;
    Py_ssize_t block_size;
    int offset, width;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*ii", &codes, &block_size, &rows, &offset, &width)) return NULL;
    Py_ssize_t count = rows.len / 8;
    if (block_size < 1 || codes.len % block_size || rows.len % 8 || (width != 1 && width != 2 && width != 4 && width != 8)
        || check_rows((const int64_t *)rows.buf, count, codes.len / block_size) < 0) {
        PyErr_SetString(PyExc_ValueError, "pack_rows: inconsistent arguments");
        goto done;
    }
    {
        Py_ssize_t symbols = count * block_size, size = (symbols * width + 7) / 8;
        result = PyBytes_FromStringAndSize(NULL, size);
        if (!result) goto done;
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
        const unsigned char *matrix = (const unsigned char *)codes.buf;
        const int64_t *row = (const int64_t *)rows.buf;
        unsigned mask = width == 8 ? 0xFFu : (1u << width) - 1u;
        int per_byte = 8 / width;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        int little_endian = 1; /* the 8-symbol trick below reads symbol m as byte m of an integer */
#else
        int little_endian = 0;
#endif
        Py_BEGIN_ALLOW_THREADS
        if (width == 1 && block_size % 8 == 0 && little_endian) {
            /* One bit per symbol (sign contexts): bit 0 of each of 8 symbols is bit 0 of the code
             * XOR bit 0 of the offset (an addition's lowest bit takes no carry); the multiply
             * moves bit 0 of byte m to bit 56 + m with no carries (every partial product has a
             * distinct bit position), so the top byte is the 8 bits LSB first. */
            uint64_t flip = (offset & 1) ? 0x0101010101010101ull : 0u;
            unsigned char *at = out;
            for (Py_ssize_t i = 0; i < count; i++) {
                const unsigned char *c = matrix + row[i] * block_size;
                for (Py_ssize_t k = 0; k < block_size; k += 8) {
                    uint64_t eight;
                    memcpy(&eight, c + k, 8);
                    eight = ((eight ^ flip) & 0x0101010101010101ull) * 0x0102040810204080ull;
                    *at++ = (unsigned char)(eight >> 56);
                }
            }
        } else if (block_size % per_byte == 0) {
            /* Whole bytes per row: each byte put together in a register. */
            unsigned char *at = out;
            for (Py_ssize_t i = 0; i < count; i++) {
                const unsigned char *c = matrix + row[i] * block_size;
                for (Py_ssize_t k = 0; k < block_size; k += per_byte) {
                    unsigned byte = 0;
                    for (int m = 0; m < per_byte; m++) byte |= (((unsigned)c[k + m] + (unsigned)offset) & mask) << (m * width);
                    *at++ = (unsigned char)byte;
                }
            }
        } else {
            memset(out, 0, (size_t)size);
            Py_ssize_t bit = 0;
            for (Py_ssize_t i = 0; i < count; i++) {
                const unsigned char *c = matrix + row[i] * block_size;
                for (Py_ssize_t k = 0; k < block_size; k++, bit += width)
                    out[bit >> 3] |= (unsigned char)((((unsigned)c[k] + (unsigned)offset) & mask) << (bit & 7));
            }
        }
        Py_END_ALLOW_THREADS
    }
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&rows);
    return result;
}

/* sign_codes(matrix_f32, block_size, rows_i64, codes_i8, where_i64): codes row where[i] of
 * matrix row rows[i] is -1 where x < 0, else 0 (plans._sign_codes). */
static PyObject *sign_codes(PyObject *self, PyObject *args) {
    Py_buffer matrix, rows, codes, where;
    Py_ssize_t block_size;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*w*y*", &matrix, &block_size, &rows, &codes, &where)) return NULL;
    Py_ssize_t count = rows.len / 8;
    if (block_size < 1 || matrix.len % (4 * block_size) || rows.len % 8 || where.len != rows.len || codes.len % block_size
        || check_rows((const int64_t *)rows.buf, count, matrix.len / 4 / block_size) < 0
        || check_rows((const int64_t *)where.buf, count, codes.len / block_size) < 0) {
        PyErr_SetString(PyExc_ValueError, "sign_codes: inconsistent arguments");
        goto done;
    }
    {
        const float *x = (const float *)matrix.buf;
        const int64_t *row = (const int64_t *)rows.buf, *at = (const int64_t *)where.buf;
        signed char *out = (signed char *)codes.buf;
        Py_BEGIN_ALLOW_THREADS
        sign_loop(x, block_size, row, count, out, at);
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&matrix);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&where);
    return result;
}

/* class_statistics(matrix_f32, block_size, rows_i64, scales_f32, codes_i8 (rows, block_size),
 *                  classes_i64, counts_i64, hist_i64 out, sums_f64 out | None)
 * plans._class_statistics over the sampled rows, in the order numpy's bincount adds: row by
 * row, the first counts[i] elements of each; index = class * 256 + 128 + code; sums add
 * (double)(x / scale) computed in float32. */
/* The loop of class_statistics: a row's x / scale in float32 first (a loop that vectorises), then
 * added to the sums bin by bin in element order. */
HOT static void statistics_loop(const float *x, Py_ssize_t block_size, const int64_t *row, Py_ssize_t count, const float *scale,
                                const signed char *code, const int64_t *cls, const int64_t *cnt, int64_t *h, double *sum) {
    float quotient[256];
    for (Py_ssize_t i = 0; i < count; i++) {
        const float *values = x + row[i] * block_size;
        const signed char *c = code + i * block_size;
        int64_t base = cls[i] * 256 + 128;
        float divisor = scale[i];
        for (Py_ssize_t k = 0; k < cnt[i]; k++) h[base + c[k]]++;
        if (!sum) continue;
        for (Py_ssize_t k0 = 0; k0 < cnt[i]; k0 += 256) {
            Py_ssize_t m = cnt[i] - k0 < 256 ? cnt[i] - k0 : 256;
            for (Py_ssize_t k = 0; k < m; k++) quotient[k] = values[k0 + k] / divisor;
            for (Py_ssize_t k = 0; k < m; k++) sum[base + c[k0 + k]] += (double)quotient[k];
        }
    }
}

static PyObject *class_statistics(PyObject *self, PyObject *args) {
    Py_buffer matrix, rows, scales, codes, classes, counts, hist, sums = {0};
    PyObject *sums_object, *result = NULL;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*y*w*O", &matrix, &block_size, &rows, &scales, &codes, &classes, &counts, &hist, &sums_object))
        return NULL;
    int with_sums = sums_object != Py_None;
    if (with_sums && PyObject_GetBuffer(sums_object, &sums, PyBUF_WRITABLE) < 0) goto done;
    Py_ssize_t count = rows.len / 8, bins = hist.len / 8;
    if (block_size < 1 || matrix.len % (4 * block_size) || rows.len % 8 || scales.len != 4 * count || codes.len != count * block_size
        || classes.len != 8 * count || counts.len != 8 * count || hist.len % 8 || (with_sums && sums.len != hist.len)
        || check_rows((const int64_t *)rows.buf, count, matrix.len / 4 / block_size) < 0) {
        PyErr_SetString(PyExc_ValueError, "class_statistics: inconsistent arguments");
        goto done;
    }
    const int64_t *cls = (const int64_t *)classes.buf, *cnt = (const int64_t *)counts.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (cls[i] < 0 || (cls[i] + 1) * 256 > bins || cnt[i] < 0 || cnt[i] > block_size) {
            PyErr_SetString(PyExc_ValueError, "class_statistics: a class or count out of range");
            goto done;
        }
    }
    {
        const float *x = (const float *)matrix.buf, *scale = (const float *)scales.buf;
        const int64_t *row = (const int64_t *)rows.buf;
        const signed char *code = (const signed char *)codes.buf;
        int64_t *h = (int64_t *)hist.buf;
        double *sum = with_sums ? (double *)sums.buf : NULL;
        Py_BEGIN_ALLOW_THREADS
        statistics_loop(x, block_size, row, count, scale, code, cls, cnt, h, sum);
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    if (with_sums && sums.buf) PyBuffer_Release(&sums);
    PyBuffer_Release(&matrix);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&classes);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&hist);
    return result;
}

/* numpy's argmin of u * d[k] + h[k] over k: the first minimum; a NaN counts as the minimum and the
 * first NaN wins. */
static void argmin_careful(double u, const double *d, const double *h, Py_ssize_t count, Py_ssize_t *at, double *least) {
    Py_ssize_t best = 0;
    double smallest = u * d[0] + h[0];
    for (Py_ssize_t k = 1; k < count && smallest == smallest; k++) {
        double cost = u * d[k] + h[k];
        if (cost < smallest || cost != cost) {
            smallest = cost;
            best = k;
        }
    }
    *at = best;
    *least = smallest;
}

/* The same for finite u, d and h (a cost may overflow to inf, but is never NaN): eight independent
 * running minima, each keeping its first index; the smallest value wins, ties to the smallest
 * index, which is the first minimum overall. No loop-carried comparison chain: several times
 * faster. */
#define ARGMIN_LANES 8
HOT static void argmin_lanes(double u, const double *d, const double *h, Py_ssize_t count, Py_ssize_t *at, double *least) {
    if (count < ARGMIN_LANES) {
        argmin_careful(u, d, h, count, at, least);
        return;
    }
    double best[ARGMIN_LANES];
    Py_ssize_t index[ARGMIN_LANES];
    for (int l = 0; l < ARGMIN_LANES; l++) {
        best[l] = u * d[l] + h[l];
        index[l] = l;
    }
    Py_ssize_t k = ARGMIN_LANES;
    for (; k + ARGMIN_LANES <= count; k += ARGMIN_LANES) {
        for (int l = 0; l < ARGMIN_LANES; l++) {
            double cost = u * d[k + l] + h[k + l];
            int better = cost < best[l];
            best[l] = better ? cost : best[l];
            index[l] = better ? k + l : index[l];
        }
    }
    for (int l = 0; k + l < count; l++) {
        double cost = u * d[k + l] + h[k + l];
        if (cost < best[l]) {
            best[l] = cost;
            index[l] = k + l;
        }
    }
    int chosen = 0;
    for (int l = 1; l < ARGMIN_LANES; l++)
        if (best[l] < best[chosen] || (best[l] == best[chosen] && index[l] < index[chosen])) chosen = l;
    *at = index[chosen];
    *least = best[chosen];
}

/* best_per_u(u_f64, distortion_f64, entropy_f64, out_best_intp, out_least_f64): for each u the
 * first index minimising u * distortion + entropy, and that minimum (allocation._best_per_u). */
static PyObject *best_per_u(PyObject *self, PyObject *args) {
    Py_buffer u, d, h, best, least;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*", &u, &d, &h, &best, &least)) return NULL;
    Py_ssize_t rows = u.len / 8, candidates = d.len / 8;
    if (u.len % 8 || d.len % 8 || h.len != d.len || candidates < 1 || best.len != (Py_ssize_t)sizeof(Py_ssize_t) * rows
        || least.len != 8 * rows) {
        PyErr_SetString(PyExc_ValueError, "best_per_u: inconsistent arguments");
        goto done;
    }
    {
        const double *uu = (const double *)u.buf, *dd = (const double *)d.buf, *hh = (const double *)h.buf;
        Py_ssize_t *out = (Py_ssize_t *)best.buf;
        double *low = (double *)least.buf;
        int finite = 1;
        for (Py_ssize_t k = 0; k < candidates; k++) finite &= isfinite(dd[k]) && isfinite(hh[k]);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < rows; i++) {
            if (finite && isfinite(uu[i])) argmin_lanes(uu[i], dd, hh, candidates, &out[i], &low[i]);
            else argmin_careful(uu[i], dd, hh, candidates, &out[i], &low[i]);
        }
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&u);
    PyBuffer_Release(&d);
    PyBuffer_Release(&h);
    PyBuffer_Release(&best);
    PyBuffer_Release(&least);
    return result;
}

/* dequantize(symbols_u8, levels_f32, scales_f32, starts_i64, counts_i64, output, out_itemsize)
 * decoder._dequantize_into: block i's counts[i] symbols (back to back in symbols) become
 * levels[symbol] * scales[i] (one binary32 multiplication) at output[starts[i] ...], output
 * float32 or float64. Returns False (and writes nothing more) if a symbol has no level. */
HOT static int dequantize_loop(const unsigned char *symbols, const float *levels, Py_ssize_t level_count, const float *scales,
                               const int64_t *starts, const int64_t *counts, Py_ssize_t blocks, void *output, int itemsize) {
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < blocks; i++) {
        const unsigned char *s = symbols + at;
        float scale = scales[i];
        Py_ssize_t count = (Py_ssize_t)counts[i];
        unsigned char top = 0;
        for (Py_ssize_t k = 0; k < count; k++) top = s[k] > top ? s[k] : top;
        if (count && top >= level_count) return 0;
        if (itemsize == 4) {
            float *out = (float *)output + starts[i];
            for (Py_ssize_t k = 0; k < count; k++) out[k] = levels[s[k]] * scale;
        } else {
            double *out = (double *)output + starts[i];
            for (Py_ssize_t k = 0; k < count; k++) out[k] = (double)(levels[s[k]] * scale);
        }
        at += count;
    }
    return 1;
}

static PyObject *dequantize(PyObject *self, PyObject *args) {
    Py_buffer symbols, levels, scales, starts, counts, output;
    int itemsize, ok = 1;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*i", &symbols, &levels, &scales, &starts, &counts, &output, &itemsize)) return NULL;
    Py_ssize_t blocks = starts.len / 8, size = (itemsize == 4 || itemsize == 8) ? output.len / itemsize : 0, total = 0;
    int consistent = (itemsize == 4 || itemsize == 8) && !(starts.len % 8) && counts.len == starts.len && scales.len == 4 * blocks
                     && !(levels.len % 4) && levels.len > 0;
    for (Py_ssize_t i = 0; consistent && i < blocks; i++) {
        int64_t start = ((const int64_t *)starts.buf)[i], count = ((const int64_t *)counts.buf)[i];
        if (start < 0 || count < 0 || start > size || count > size - start) consistent = 0;
        total += (Py_ssize_t)count;
    }
    if (!consistent || total != symbols.len) {
        PyErr_SetString(PyExc_ValueError, "dequantize: inconsistent arguments");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = dequantize_loop((const unsigned char *)symbols.buf, (const float *)levels.buf, levels.len / 4, (const float *)scales.buf,
                         (const int64_t *)starts.buf, (const int64_t *)counts.buf, blocks, output.buf, itemsize);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(ok);
done:
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&levels);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&output);
    return result;
}

static PyMethodDef methods[] = {
    {"sign_errors", sign_errors, METH_VARARGS, "sign_errors(energy, weighted_abs, weight_sum, scale, near_limit, out): sign blocks' errors"},
    {"pack_rows", pack_rows, METH_VARARGS, "pack_rows(codes, block_size, rows, offset, width) -> bytes (bit-packed symbols of the rows)"},
    {"rans_encode", rans_encode, METH_VARARGS, "rans_encode(symbols, freqs_u32le, prob_bits, lanes[, rows, block_size, offset]) -> bytes"},
    {"rans_decode", rans_decode, METH_VARARGS, "rans_decode(data, count, freqs_u32le, prob_bits, lanes) -> bytes"},
    {"msgpack_scan", msgpack_scan, METH_VARARGS, "msgpack_scan(header_bytes, container_budget) -> None (FORMAT.md 5.1)"},
    {"block_moments", block_moments, METH_VARARGS, "block_moments(matrix, block_size, fisher, itemsize, count, root, p2, *outputs) (encoder/moments.py)"},
    {"all_finite", all_finite, METH_VARARGS, "all_finite(array, itemsize) -> whether every float32/float64 value is finite"},
    {"weights_max", weights_max, METH_VARARGS, "weights_max(array, itemsize) -> largest element, or None if one is negative or not finite"},
    {"evaluate_blocks", evaluate_blocks, METH_VARARGS, "evaluate_blocks(...) -> capped count (policy/allocation.py, _Evaluator)"},
    {"quantize_rows", quantize_rows, METH_VARARGS, "quantize_rows(matrix, block_size, rows, scales, offsets, uniform, codes, where) (encoder/plans.py)"},
    {"best_per_u", best_per_u, METH_VARARGS, "best_per_u(u, distortion, entropy, out_best, out_least) (policy/allocation.py)"},
    {"dequantize", dequantize, METH_VARARGS, "dequantize(symbols, levels, scales, starts, counts, output, itemsize) -> bool (decoder.py)"},
    {"sign_codes", sign_codes, METH_VARARGS, "sign_codes(matrix, block_size, rows, codes, where) (encoder/plans.py)"},
    {"class_statistics", class_statistics, METH_VARARGS, "class_statistics(matrix, block_size, rows, scales, codes, classes, counts, hist, sums) (encoder/plans.py)"},
    {"zstd_walk", zstd_walk, METH_VARARGS, "zstd_walk(stored, declared_length) -> frame length (FORMAT.md 11, pass 1)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", "C accelerator for fstqcodec: rANS, header and zstd frame checks.", -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }

/*
 * Optional C accelerator for the interleaved rANS coder (spec section 6.5).
 *
 * fstqcodec/stages/rans.py holds the reference implementation in numpy and uses these functions
 * when this module is built; the two produce identical bytes (tests/test_rans.py checks). The
 * stream layout: `lanes` initial decoder states (uint32 LE), then 16-bit words (LE) in the order
 * the decoder consumes them. Symbol i is coded in lane i % lanes. State range [2**16, 2**32).
 *
 * Errors are raised as ValueError(code, message, extra_bytes) with code "format" or "trailing"; the Python
 * wrapper turns them into the library's DecodeError subclasses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

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

static PyObject *rans_encode(PyObject *self, PyObject *args) {
    Py_buffer symbols, freqs;
    int prob_bits;
    Py_ssize_t lanes;
    uint32_t freq[256], cum[256];
    Py_ssize_t alphabet;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*in", &symbols, &freqs, &prob_bits, &lanes)) return NULL;
    if (prob_bits < 1 || prob_bits > 16 || lanes < 1 || load_table(&freqs, prob_bits, freq, cum, &alphabet) < 0) {
        fail("format", "invalid rANS parameters or frequency table");
        goto done_buffers;
    }
    {
        const unsigned char *sym = (const unsigned char *)symbols.buf;
        Py_ssize_t n = symbols.len;
        uint32_t *state = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)lanes);
        uint16_t *words = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n > 0 ? n : 1));
        Py_ssize_t count = 0, lane;
        if (!state || !words) {
            free(state);
            free(words);
            PyErr_NoMemory();
            goto done_buffers;
        }
        int zero_frequency = 0;
        for (lane = 0; lane < lanes; lane++) state[lane] = RANS_L;
        lane = n > 0 ? (n - 1) % lanes : 0;
        /* The coding loop touches only C memory and the held buffer: other threads (a server
         * encoding or decoding several messages at once) may run meanwhile. */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = n - 1; i >= 0; i--) {
            unsigned s = sym[i];
            uint64_t x = state[lane];
            uint32_t f;
            if (s >= alphabet || (f = freq[s]) == 0) {
                zero_frequency = 1;
                break;
            }
            if (x >= ((uint64_t)f << (32 - prob_bits))) {
                words[count++] = (uint16_t)(x & 0xFFFF);
                x >>= 16;
            }
            x = ((x / f) << prob_bits) + (x % f) + cum[s];
            state[lane] = (uint32_t)x;
            lane = lane == 0 ? lanes - 1 : lane - 1;
        }
        Py_END_ALLOW_THREADS
        if (zero_frequency) {
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

static PyMethodDef methods[] = {
    {"rans_encode", rans_encode, METH_VARARGS, "rans_encode(symbols, freqs_u32le, prob_bits, lanes) -> bytes"},
    {"rans_decode", rans_decode, METH_VARARGS, "rans_decode(data, count, freqs_u32le, prob_bits, lanes) -> bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", "C accelerator for fstqcodec's rANS stage.", -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }

/* The check of a bitshuffle_lz4 chunk (sfbw_ioc.bsread.compression) in one call.
 *
 * A 640x480 uint16 image is 75 LZ4 blocks; checked from Python each block is a call, a
 * bytes object and a release of the GIL (0.17 ms per image, 0.12 of it decompressing).
 * Here the whole walk runs with the GIL released once, into one scratch buffer.
 *
 * LZ4 is not linked: LZ4_decompress_safe is handed over by address (bind), from the
 * lz4 package's own module, so the decoder is the one the Python walk uses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

static int (*lz4_decompress_safe)(const char *, char *, int, int);

/* The codes of compression._BLOCK_ERRORS (OK and NO_MEMORY are not errors of a chunk). */
enum { OK, TRUNCATED, TOO_SMALL, CORRUPT, SHORT, TILING, NO_MEMORY };

typedef struct {
    int code;
    uint64_t a, b; /* what the message names: positions, sizes */
} Verdict;

static uint32_t big_endian_u32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* One block at ``*pos``: its prefix, bounds, ratio, and that it decodes to exactly
 * ``size`` bytes. Advances ``*pos`` past it. The scratch buffer is allocated here, for
 * the first block that passed its checks (the largest: full blocks come first), so a
 * chunk that claims more than it can hold costs no allocation. */
static Verdict check_block(const unsigned char *data, uint64_t length, uint64_t *pos,
                           uint64_t size, uint64_t max_ratio, char **scratch) {
    Verdict v = {OK, 0, 0};
    if (*pos + 4 > length)
        return (Verdict){TRUNCATED, 0, 0};
    uint64_t block = big_endian_u32(data + *pos);
    *pos += 4;
    if (*pos + block > length)
        return (Verdict){TRUNCATED, 0, 0};
    if (size > max_ratio * block)
        return (Verdict){TOO_SMALL, block, size};
    if (*scratch == NULL && (*scratch = malloc((size_t)size + 1)) == NULL)  /* +1: not 0 */
        return (Verdict){NO_MEMORY, 0, 0};
    int got = lz4_decompress_safe((const char *)data + *pos, *scratch, (int)block, (int)size);
    if (got < 0)
        v = (Verdict){CORRUPT, *pos, 0};
    else if ((uint64_t)got != size)
        v = (Verdict){SHORT, 0, 0};
    *pos += block;
    return v;
}

static Verdict check_chunk(const unsigned char *data, uint64_t length, uint64_t count,
                           uint64_t block, uint64_t itemsize, uint64_t header,
                           uint64_t max_ratio) {
    char *scratch = NULL;
    uint64_t pos = header, full = count / block, rest = count % block;
    Verdict v = {OK, 0, 0};
    for (uint64_t i = 0; i < full && v.code == OK; i++)
        v = check_block(data, length, &pos, block * itemsize, max_ratio, &scratch);
    if (v.code == OK && rest >= 8)
        v = check_block(data, length, &pos, (rest - rest % 8) * itemsize, max_ratio, &scratch);
    free(scratch);
    if (v.code == OK && pos + (count % 8) * itemsize != length)
        v = (Verdict){TILING, pos, length};
    return v;
}

static PyObject *check(PyObject *module, PyObject *args) {
    Py_buffer view;
    unsigned long long count, block, itemsize, header, max_ratio;
    if (!PyArg_ParseTuple(args, "y*KKKKK", &view, &count, &block, &itemsize, &header,
                          &max_ratio))
        return NULL;
    if (lz4_decompress_safe == NULL || block == 0 || block * itemsize > INT32_MAX) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, lz4_decompress_safe == NULL
                        ? "bind() has not been called" : "block size out of range");
        return NULL;
    }
    Verdict v;
    Py_BEGIN_ALLOW_THREADS
    v = check_chunk(view.buf, (uint64_t)view.len, count, block, itemsize, header, max_ratio);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (v.code == NO_MEMORY)
        return PyErr_NoMemory();
    if (v.code == OK)
        Py_RETURN_NONE;
    return Py_BuildValue("(iKK)", v.code, (unsigned long long)v.a, (unsigned long long)v.b);
}

static PyObject *bind(PyObject *module, PyObject *args) {
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address))
        return NULL;
    if (address == 0) {
        PyErr_SetString(PyExc_ValueError, "LZ4_decompress_safe's address is 0");
        return NULL;
    }
    lz4_decompress_safe = (int (*)(const char *, char *, int, int))(uintptr_t)address;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(address)\n\nThe address of LZ4_decompress_safe."},
    {"check", check, METH_VARARGS,
     "check(chunk, elements, block_elements, itemsize, header_bytes, max_ratio)\n\n"
     "None when every LZ4 block of the chunk decodes to exactly its size and the blocks "
     "tile the chunk; else (code, a, b): 1 truncated, 2 block of a bytes cannot hold b, "
     "3 block at byte a is corrupt, 4 short block, 5 blocks end at byte a of b."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bslz4",
    "The bitshuffle_lz4 chunk check in one call (see sfbw_ioc.bsread.compression).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bslz4(void) {
    return PyModule_Create(&module);
}

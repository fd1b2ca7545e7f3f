/* One whole ZeroMQ message off a socket in one call: the receiver's per-part cost.
 *
 * A 1000-channel bsread message has 2002 parts; received part by part from Python
 * (a zmq.Frame each, its more flag, a list append) that is most of a core at 100 Hz.
 * Here each part costs a zmq_msg_recv and, for a small part, a bytes object; a large
 * part (an image) is not copied: it stays in its zmq_msg_t, lent out by a Part object
 * through the buffer protocol.
 *
 * libzmq is not linked: its functions are handed over by address (bind), from the very
 * libzmq that pyzmq loaded, so the socket handle and the functions belong together and
 * no libzmq headers are needed at build time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

/* zmq_msg_t as zmq.h (4.1 and later) declares it: 64 opaque bytes, pointer-aligned. */
typedef struct {
    union { unsigned char bytes[64]; void *align; } u;
} zmq_msg_t;

#define ZMQ_DONTWAIT 1

static int (*zmq_msg_init)(zmq_msg_t *);
static int (*zmq_msg_recv)(zmq_msg_t *, void *, int);
static int (*zmq_msg_close)(zmq_msg_t *);
static int (*zmq_msg_move)(zmq_msg_t *, zmq_msg_t *);
static void *(*zmq_msg_data)(zmq_msg_t *);
static size_t (*zmq_msg_size)(const zmq_msg_t *);
static int (*zmq_msg_more)(const zmq_msg_t *);
static int (*zmq_errno)(void);

/* ---- Part: a received part lent out without a copy ------------------------------- */

typedef struct {
    PyObject_HEAD
    zmq_msg_t msg;
} Part;

static void part_dealloc(Part *self) {
    zmq_msg_close(&self->msg);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int part_getbuffer(Part *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, zmq_msg_data(&self->msg),
                             (Py_ssize_t)zmq_msg_size(&self->msg), 1, flags);
}

static Py_ssize_t part_length(Part *self) {
    return (Py_ssize_t)zmq_msg_size(&self->msg);
}

static PyBufferProcs part_as_buffer = {(getbufferproc)part_getbuffer, NULL};
static PySequenceMethods part_as_sequence = {.sq_length = (lenfunc)part_length};

static PyTypeObject PartType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sfbw_ioc._zmqparts.Part",
    .tp_doc = "One received message part, its bytes lent out through the buffer protocol.",
    .tp_basicsize = sizeof(Part),
    .tp_dealloc = (destructor)part_dealloc,
    .tp_as_buffer = &part_as_buffer,
    .tp_as_sequence = &part_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

/* ---- receiving --------------------------------------------------------------------- */

/* The part in ``msg`` as a Python object: a copy (``msg`` keeps its content, which the
 * next zmq_msg_recv into it or zmq_msg_close releases) or ``msg`` moved into a Part. */
static PyObject *part_object(zmq_msg_t *msg, size_t copy_limit) {
    size_t size = zmq_msg_size(msg);
    if (size <= copy_limit)
        return PyBytes_FromStringAndSize(zmq_msg_data(msg), (Py_ssize_t)size);
    Part *part = PyObject_New(Part, &PartType);
    if (part == NULL)
        return NULL;
    zmq_msg_init(&part->msg);
    zmq_msg_move(&part->msg, msg);
    return (PyObject *)part;
}

/* Receives one part; retries when a signal interrupted the call. -1 with errno from
 * libzmq (EAGAIN: none waiting, only possible with ZMQ_DONTWAIT). */
static int receive_part(zmq_msg_t *msg, void *socket, int flags) {
    int rc;
    do {
        rc = zmq_msg_recv(msg, socket, flags);
    } while (rc == -1 && zmq_errno() == EINTR);
    return rc;
}

static PyObject *receive(PyObject *module, PyObject *args) {
    unsigned long long handle;
    Py_ssize_t copy_limit;
    if (!PyArg_ParseTuple(args, "Kn", &handle, &copy_limit))
        return NULL;
    if (zmq_msg_recv == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() has not been called");
        return NULL;
    }
    void *socket = (void *)(uintptr_t)handle;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (receive_part(&msg, socket, ZMQ_DONTWAIT) == -1) {
        int code = zmq_errno();
        zmq_msg_close(&msg);
        if (code == EAGAIN)
            Py_RETURN_NONE;
        return PyErr_Format(PyExc_OSError, "%d", code);
    }
    PyObject *parts = PyList_New(0);
    /* The rest of a message is there once its first part is (ZeroMQ delivers messages
     * whole), so these calls do not wait. Every part is taken off the socket even when
     * Python runs out of memory: the next call must begin at a message's first part. */
    for (;;) {
        int more = zmq_msg_more(&msg);
        PyObject *part = parts ? part_object(&msg, (size_t)copy_limit) : NULL;
        if (part == NULL || PyList_Append(parts, part) == -1)
            Py_CLEAR(parts);
        Py_XDECREF(part);
        if (!more)
            break;
        if (receive_part(&msg, socket, 0) == -1) {
            int code = zmq_errno();
            Py_XDECREF(parts);
            zmq_msg_close(&msg);
            if (PyErr_Occurred())
                return NULL;
            return PyErr_Format(PyExc_OSError, "%d", code);
        }
    }
    zmq_msg_close(&msg);
    return parts;  /* NULL with the error set when Python ran out of memory */
}

static PyObject *bind(PyObject *module, PyObject *args) {
    unsigned long long f[8];
    if (!PyArg_ParseTuple(args, "KKKKKKKK", &f[0], &f[1], &f[2], &f[3], &f[4], &f[5],
                          &f[6], &f[7]))
        return NULL;
    for (int i = 0; i < 8; i++)
        if (f[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "a libzmq function address is 0");
            return NULL;
        }
    zmq_msg_init = (int (*)(zmq_msg_t *))(uintptr_t)f[0];
    zmq_msg_close = (int (*)(zmq_msg_t *))(uintptr_t)f[2];
    zmq_msg_move = (int (*)(zmq_msg_t *, zmq_msg_t *))(uintptr_t)f[3];
    zmq_msg_data = (void *(*)(zmq_msg_t *))(uintptr_t)f[4];
    zmq_msg_size = (size_t (*)(const zmq_msg_t *))(uintptr_t)f[5];
    zmq_msg_more = (int (*)(const zmq_msg_t *))(uintptr_t)f[6];
    zmq_errno = (int (*)(void))(uintptr_t)f[7];
    zmq_msg_recv = (int (*)(zmq_msg_t *, void *, int))(uintptr_t)f[1];
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(msg_init, msg_recv, msg_close, msg_move, msg_data, msg_size, msg_more, errno)"
     "\n\nThe addresses of libzmq's functions, from the libzmq the sockets belong to."},
    {"receive", receive, METH_VARARGS,
     "receive(socket_handle, copy_limit) -> list | None\n\nEvery part of the next message "
     "(bytes up to copy_limit bytes, Part objects above), or None when none is waiting. "
     "OSError(errno) on a libzmq error."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_zmqparts",
    "Receive a whole ZeroMQ message in one call (see sfbw_ioc.zmqparts).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__zmqparts(void) {
    if (PyType_Ready(&PartType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PartType);
    if (PyModule_AddObject(m, "Part", (PyObject *)&PartType) < 0) {
        Py_DECREF(&PartType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* The relay thread's common case in C: reads, checks and writes that never
 * take the GIL.
 *
 * shim/relay.py describes the relay thread. Written in Python, its thread
 * takes the GIL back after every system call (the wait, the read, the
 * write), and waits for it while the trio thread is busy: up to the
 * interpreter's switch interval (5 ms) each time, so that relayed events
 * queued behind the gateway's work on new requests. Here the thread holds
 * no Python state at all: it reads, checks the read with the rules below,
 * writes, and hands a body back by writing to its eventfd, which the task
 * waits on through trio.
 *
 * Two checks, one per relay:
 *   RAW  the read is whole chunks (plain hex sizes, CRLF), none of them the
 *        last: passed on byte for byte (shim/chunked.py whole_chunks_only).
 *   SSE  as RAW, and the chunks' data together is whole SSE events in the
 *        common shape that hold none of the rewriter's triggers: passed on
 *        as one chunk of that data (shim/toolcalls.py StreamRewriter.feed,
 *        its plain path; shim/http1.py's chunk framing).
 * Anything else goes back to the task as it was read.
 *
 * A relay belongs to the thread from hand_over until it is handed back (its
 * eventfd is written) or taken back (take_back, under the lock). Relays are
 * found by their engine socket's number in a table under the lock, so an
 * epoll event for a relay taken back meanwhile finds nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define READ_BYTES 65536
#define MAX_EVENTS 256
#define MAX_TRIGGER 16
#define MODE_RAW 0
#define MODE_SSE 1

typedef struct {
    PyObject_HEAD
    int src, dst, efd, mode;
    char trig[2][MAX_TRIGGER];
    size_t trig_len[2];
    int registered;           /* the thread has it (under the lock) */
    /* reads: counted by the thread; last_read: CLOCK_MONOTONIC ns of the last
     * one (0: none yet). Read by the task's read timer without the lock. */
    unsigned long long reads, last_read;
    /* the rest: written by the thread under the lock, read by the task under it */
    unsigned long long bytes_out;
    char *data; size_t data_len;        /* read, not taken: the task's */
    char *pending; size_t pending_len;  /* taken, not yet written: the task writes it */
    int eof, error, taken;
} RelayObject;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int epfd = -1;
static RelayObject **by_fd = NULL;  /* engine socket -> relay, under the lock */
static size_t by_fd_len = 0;

/* ---- the checks, pure ---- */

/* The size of a plain hex size line at p (1 to 16 digits, CRLF); its length
 * in *line. -1 if there is none. */
static long long size_line(const char *p, size_t left, size_t *line) {
    unsigned long long size = 0;
    size_t i = 0;
    for (; i < left && i < 16; i++) {
        char c = p[i];
        int v;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
        else break;
        size = size * 16 + (unsigned long long)v;
    }
    if (i == 0 || i + 2 > left || p[i] != '\r' || p[i + 1] != '\n' || size > (unsigned long long)LLONG_MAX)
        return -1;
    *line = i + 2;
    return (long long)size;
}

/* Whether buf is whole chunks, none of them the last. With body != NULL,
 * their data is copied there, one after the other, and its length put in
 * *body_len (body holds at least n bytes). */
static int whole_chunks(const char *buf, size_t n, char *body, size_t *body_len) {
    size_t pos = 0, out = 0;
    if (!n) return 0;
    while (pos < n) {
        size_t line;
        long long size = size_line(buf + pos, n - pos, &line);
        if (size <= 0) return 0;  /* bad, or the last chunk */
        pos += line;
        if ((unsigned long long)size > n - pos || n - pos - (size_t)size < 2) return 0;
        if (body) memcpy(body + out, buf + pos, (size_t)size);
        out += (size_t)size;
        pos += (size_t)size;
        if (buf[pos] != '\r' || buf[pos + 1] != '\n') return 0;
        pos += 2;
    }
    if (body_len) *body_len = out;
    return 1;
}

/* Whether data is whole SSE events in the common shape (shim/sse.py
 * SSEDecoder.whole, with nothing held) holding none of the triggers. */
static int plain_events(const RelayObject *r, const char *data, size_t n) {
    if (n < 2 || data[0] == '\n' || data[n - 2] != '\n' || data[n - 1] != '\n') return 0;
    if (memchr(data, '\r', n) || memmem(data, n, "\n\n\n", 3)) return 0;
    for (int i = 0; i < 2; i++)
        if (r->trig_len[i] && memmem(data, n, r->trig[i], r->trig_len[i])) return 0;
    return 1;
}

/* What to write for a read of n bytes in buf, or NULL: the read goes back
 * to the task. Its length in *out_len, the client's body bytes in it in
 * *body_bytes. SSE frames into `frame` (n + 32 bytes), RAW passes buf. */
static const char *passes(const RelayObject *r, const char *buf, size_t n, char *frame, size_t *out_len,
                          size_t *body_bytes) {
    if (r->mode == MODE_RAW) {
        if (!whole_chunks(buf, n, NULL, NULL)) return NULL;
        *out_len = *body_bytes = n;
        return buf;
    }
    /* the data, framed again as one chunk: "%x\r\n" data "\r\n" */
    size_t body_len;
    char *body = frame + 18;
    if (!whole_chunks(buf, n, body, &body_len) || !plain_events(r, body, body_len)) return NULL;
    char hex[18];
    size_t head = (size_t)snprintf(hex, sizeof hex, "%zx\r\n", body_len);
    memcpy(body - head, hex, head);
    memcpy(body + body_len, "\r\n", 2);
    *out_len = head + body_len + 2;
    *body_bytes = body_len;
    return body - head;
}

/* ---- the thread ---- */

static char *copy(const char *p, size_t n) {
    char *c = malloc(n ? n : 1);
    if (c) memcpy(c, p, n);
    return c;
}

/* One read of r's engine socket, under the lock; whether the thread keeps r. */
static int relay_one(RelayObject *r, char *buf, char *frame) {
    ssize_t n = read(r->src, buf, READ_BYTES);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 1;
        r->error = errno;
        return 0;
    }
    if (n == 0) {
        r->eof = 1;
        return 0;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    __atomic_store_n(&r->last_read, (unsigned long long)now.tv_sec * 1000000000ULL + (unsigned long long)now.tv_nsec,
                     __ATOMIC_RELAXED);
    __atomic_fetch_add(&r->reads, 1, __ATOMIC_RELAXED);
    size_t out_len, body_bytes;
    const char *out = passes(r, buf, (size_t)n, frame, &out_len, &body_bytes);
    if (!out) {  /* the task's, as read */
        r->data = copy(buf, (size_t)n);
        if (!r->data) r->error = ENOMEM;
        else r->data_len = (size_t)n;
        return 0;
    }
    r->bytes_out += body_bytes;
    ssize_t sent = write(r->dst, out, out_len);
    if (sent < 0) sent = 0;  /* full or gone: the task writes, and finds out which */
    if ((size_t)sent < out_len) {
        r->pending = copy(out + sent, out_len - (size_t)sent);
        if (!r->pending) r->error = ENOMEM;
        else r->pending_len = out_len - (size_t)sent;
        return 0;
    }
    return 1;
}

static void unregister_locked(RelayObject *r) {
    by_fd[r->src] = NULL;
    epoll_ctl(epfd, EPOLL_CTL_DEL, r->src, NULL);
    r->registered = 0;
}

static void *run(void *arg) {
    (void)arg;
    static char buf[READ_BYTES];
    static char frame[READ_BYTES + 32];
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) continue;  /* EINTR */
        /* the lock is taken for one relay at a time: a task handing a body
         * over or taking one back waits for one read and write at most */
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            pthread_mutex_lock(&lock);
            RelayObject *r = (size_t)fd < by_fd_len ? by_fd[fd] : NULL;
            if (r && !relay_one(r, buf, frame)) {
                unregister_locked(r);
                uint64_t one = 1;
                if (write(r->efd, &one, sizeof one) < 0) { /* an eventfd write only fails on overflow */ }
            }
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

/* ---- the Python side ---- */

static int start_thread(void) {
    if (epfd >= 0) return 0;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&t, &attr, run, NULL);
    pthread_attr_destroy(&attr);
    if (err) {
        close(epfd);
        epfd = -1;
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* The triggers (None, or a tuple of at most two byte strings of 1 to 16
 * bytes) into r; -1 with an exception set if they are not that. */
static int set_triggers(RelayObject *r, PyObject *triggers) {
    if (!triggers || triggers == Py_None) return 0;
    if (!PyTuple_Check(triggers) || PyTuple_GET_SIZE(triggers) > 2) {
        PyErr_SetString(PyExc_TypeError, "triggers is a tuple of at most two byte strings");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(triggers); i++) {
        char *p;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(triggers, i), &p, &len) < 0) return -1;
        if (len < 1 || len > MAX_TRIGGER) {
            PyErr_SetString(PyExc_ValueError, "a trigger is 1 to 16 bytes");
            return -1;
        }
        memcpy(r->trig[i], p, (size_t)len);
        r->trig_len[i] = (size_t)len;
    }
    return 0;
}

static int Relay_init(RelayObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"src", "dst", "efd", "mode", "triggers", NULL};
    PyObject *triggers = NULL;
    if (self->registered) {
        PyErr_SetString(PyExc_RuntimeError, "a relay cannot be set up again while the thread has it");
        return -1;
    }
    self->mode = MODE_RAW;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iii|iO", kwlist, &self->src, &self->dst, &self->efd,
                                     &self->mode, &triggers))
        return -1;
    if (self->src < 0 || self->dst < 0 || self->efd < 0) {
        PyErr_SetString(PyExc_ValueError, "a relay needs three open file descriptors");
        return -1;
    }
    if (self->mode != MODE_RAW && self->mode != MODE_SSE) {
        PyErr_SetString(PyExc_ValueError, "mode is RAW or SSE");
        return -1;
    }
    return set_triggers(self, triggers);
}

static int take_back_locked(RelayObject *self) {
    if (!self->registered) return 0;
    unregister_locked(self);
    self->taken = 1;
    return 1;
}

static void Relay_dealloc(RelayObject *self) {
    pthread_mutex_lock(&lock);
    take_back_locked(self);
    pthread_mutex_unlock(&lock);
    free(self->data);
    free(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Relay_hand_over(RelayObject *self, PyObject *Py_UNUSED(ignored)) {
    if (start_thread() < 0) return NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    if (self->registered) err = EBUSY;
    else if ((size_t)self->src >= by_fd_len) {
        size_t len = (size_t)self->src * 2 + 64;
        RelayObject **grown = realloc(by_fd, len * sizeof *by_fd);
        if (!grown) err = ENOMEM;
        else {
            memset(grown + by_fd_len, 0, (len - by_fd_len) * sizeof *by_fd);
            by_fd = grown;
            by_fd_len = len;
        }
    }
    if (!err && by_fd[self->src]) err = EEXIST;  /* another relay has this socket */
    if (!err) {
        free(self->data);
        free(self->pending);
        self->data = self->pending = NULL;
        self->data_len = self->pending_len = 0;
        self->eof = self->error = self->taken = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = self->src};
        by_fd[self->src] = self;
        self->registered = 1;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, self->src, &ev) < 0) {
            err = errno;
            by_fd[self->src] = NULL;
            self->registered = 0;
        }
    }
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Relay_take_back(RelayObject *self, PyObject *Py_UNUSED(ignored)) {
    int taken;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    taken = take_back_locked(self);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(taken);
}

/* What the thread left: (reads, bytes_out, data, pending, eof, errno, taken). */
static PyObject *Relay_result(RelayObject *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&lock);  /* held for a copy only: never across a read */
    PyObject *res = Py_BuildValue("KKy#y#iii", __atomic_load_n(&self->reads, __ATOMIC_RELAXED),
                                  self->bytes_out, self->data ? self->data : "",
                                  (Py_ssize_t)self->data_len, self->pending ? self->pending : "",
                                  (Py_ssize_t)self->pending_len, self->eof, self->error, self->taken);
    pthread_mutex_unlock(&lock);
    return res;
}

static PyObject *Relay_get_reads(RelayObject *self, void *Py_UNUSED(closure)) {
    /* no lock: the task looks at it while the thread relays, and must not
     * wait for a read and a write with the GIL held */
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->reads, __ATOMIC_RELAXED));
}

static PyObject *Relay_get_last_read(RelayObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->last_read, __ATOMIC_RELAXED));
}

static PyMethodDef Relay_methods[] = {
    {"hand_over", (PyCFunction)Relay_hand_over, METH_NOARGS, "The thread relays until it hands the body back."},
    {"take_back", (PyCFunction)Relay_take_back, METH_NOARGS,
     "The thread no longer touches this relay once this returns. False if it had handed it back."},
    {"result", (PyCFunction)Relay_result, METH_NOARGS,
     "(reads, bytes_out, data, pending, eof, errno, taken)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"reads", (getter)Relay_get_reads, NULL, "reads taken so far", NULL},
    {"last_read", (getter)Relay_get_last_read, NULL,
     "time.monotonic_ns() of the last read taken, 0 before the first", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shim._relay.Relay",
    .tp_doc = "Relay(src, dst, efd, mode=RAW, triggers=()): one body for the C relay thread.",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

/* The checks alone, the thread's own code (`passes`), for tests against
 * the Python ones. */
static PyObject *check(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer b;
    RelayObject probe;
    PyObject *triggers = NULL;
    memset(&probe, 0, sizeof probe);
    if (!PyArg_ParseTuple(args, "y*i|O", &b, &probe.mode, &triggers)) return NULL;
    char *frame = set_triggers(&probe, triggers) < 0 ? NULL : malloc((size_t)b.len + 32);
    if (!frame) {
        PyBuffer_Release(&b);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    size_t out_len, body_bytes;
    const char *out = passes(&probe, b.buf, (size_t)b.len, frame, &out_len, &body_bytes);
    PyObject *res = out ? PyBytes_FromStringAndSize(out, (Py_ssize_t)out_len) : Py_NewRef(Py_None);
    free(frame);
    PyBuffer_Release(&b);
    return res;
}

static PyMethodDef module_methods[] = {
    {"check", check, METH_VARARGS,
     "check(read, mode, triggers=()) -> what the thread would write for this read, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shim._relay", "The relay thread's common case, without the GIL.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Relay", (PyObject *)&RelayType) < 0 || PyModule_AddIntConstant(m, "RAW", MODE_RAW) < 0 ||
        PyModule_AddIntConstant(m, "SSE", MODE_SSE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

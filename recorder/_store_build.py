"""cffi definitions of the recorder's C event store (compiled lazily by ``recorder.store``).

Why C: a port-I/O or MMIO event recorded from Python costs a few microseconds (a
kwargs dict, a tuple, then per-cell conversion when the batch is built), as much
as half of the exit it describes. Here such an event is one C call that stamps
it and appends its raw values to preallocated columns; the writer hands those
columns to Arrow without copying them.

The store also owns the trace's sequence counter and clock: every event, C-built
or Python-built, takes its ``seq`` and ``time_ns`` under the store's mutex, so all
events of all VPs keep one total order with time non-decreasing in that order.
"""

from __future__ import annotations

import cffi

#: Hot columns a chunk holds, in the order of ``struct vsmt_chunk``'s pointers.
CHUNK_COLUMNS = ("seq", "time_ns", "vp", "vtl", "rip", "kind", "address", "size", "is_write", "data")

CDEF = r"""
typedef struct vsmt_chunk {
    struct vsmt_chunk *next;
    uint32_t n;            /* rows filled */
    uint32_t cap;          /* rows allocated */
    uint64_t *seq;
    int64_t *time_ns;
    uint16_t *vp;
    uint8_t *vtl;
    uint64_t *rip;
    int8_t *kind;          /* EventKind value - 1: the index into the kind dictionary */
    uint64_t *address;
    uint8_t *size;
    uint8_t *is_write;     /* Arrow boolean bitmap, one bit per row */
    uint64_t *data;
    size_t bytes[10];      /* size in bytes of each column buffer above, in order */
} vsmt_chunk;

typedef struct vsmt_store vsmt_store;

#define VSMT_NATIVE_WORDS ...
typedef struct vsmt_native {
    uint64_t seq;          /* seq of the first of the record's events */
    int64_t time_ns;
    uint64_t order;        /* emulation entry order of the first of its entries */
    uint64_t words[16];    /* VSMT_NATIVE_WORDS */
} vsmt_native;

vsmt_store *vsmt_open(int64_t t0_ns, uint32_t chunk_rows, uint64_t due_rows, uint64_t late_rows, int64_t due_age_ns);
void vsmt_free(vsmt_store *s);
void vsmt_stop(vsmt_store *s);
void vsmt_set_manual_time(vsmt_store *s, int64_t time_ns);
int vsmt_io(vsmt_store *s, int kind, uint32_t vp, uint32_t vtl, uint64_t rip, uint64_t address,
            uint32_t size, int is_write, uint64_t data);
int vsmt_stamp(vsmt_store *s, int64_t *out);
int vsmt_due(vsmt_store *s);
int64_t vsmt_oldest(vsmt_store *s);
int vsmt_native_record(vsmt_store *s, uint32_t events, uint32_t orders, const uint64_t *words);
uint64_t vsmt_order(vsmt_store *s);
uint32_t vsmt_native_count(vsmt_store *s);
vsmt_chunk *vsmt_take(vsmt_store *s, uint64_t *cutoff, vsmt_native **natives, uint32_t *native_count);
void vsmt_natives_free(vsmt_native *natives);
uint64_t vsmt_dropped(vsmt_store *s);
void vsmt_chunk_free(vsmt_chunk *c);

#define VSMT_NOT_DUE ...
#define VSMT_DUE ...
#define VSMT_LATE ...
#define VSMT_STOPPED ...
"""

SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* What vsmt_io / vsmt_stamp / vsmt_due return: whether the caller should flush now. */
#define VSMT_NOT_DUE 0
#define VSMT_DUE 1       /* a batch's worth of events is pending: flush if nobody else is */
#define VSMT_LATE 2      /* the oldest pending event is old, or far too many are pending: flush and wait */
#define VSMT_STOPPED -1  /* the store no longer records (closing, or stopped on an error) */

#define VSMT_ALIGN 64    /* Arrow's preferred buffer alignment */
#define VSMT_COLUMNS 10
#define VSMT_NATIVE_WORDS 16

/* An operation a C fast path performed while recording (a VTL call, say): its raw values,
   which the writer turns into the events the Python path would have emitted
   (TraceWriter.native_decoder). It owns ``events`` consecutive seqs and ``orders``
   consecutive emulation entry orders. */
typedef struct vsmt_native {
    uint64_t seq;
    int64_t time_ns;
    uint64_t order;
    uint64_t words[VSMT_NATIVE_WORDS];
} vsmt_native;

typedef struct vsmt_chunk {
    struct vsmt_chunk *next;
    uint32_t n;
    uint32_t cap;
    uint64_t *seq;
    int64_t *time_ns;
    uint16_t *vp;
    uint8_t *vtl;
    uint64_t *rip;
    int8_t *kind;
    uint64_t *address;
    uint8_t *size;
    uint8_t *is_write;
    uint64_t *data;
    size_t bytes[VSMT_COLUMNS];
} vsmt_chunk;

typedef struct vsmt_store {
    pthread_mutex_t lock;
    uint64_t next_seq;      /* seq of the next event, C-built or Python-built */
    int64_t t0_ns;          /* CLOCK_MONOTONIC at time_ns = 0 */
    uint64_t pending;       /* events stamped since the last take */
    int64_t oldest_ns;      /* time_ns of the oldest of them */
    uint64_t dropped;       /* C events that could not be stored (allocation failure) */
    uint32_t chunk_rows;
    uint64_t due_rows;
    uint64_t late_rows;
    int64_t due_age_ns;
    int stopped;
    int manual;             /* time_ns comes from manual_ns (synthetic traces), not the clock */
    int64_t manual_ns;
    vsmt_chunk *head;       /* pending chunks, oldest first; tail is being filled */
    vsmt_chunk *tail;
    uint64_t next_order;    /* emulation entry order (Boundary.entry), shared with C records */
    vsmt_native *natives;   /* pending native records, in seq order */
    uint32_t n_natives;
    uint32_t cap_natives;
} vsmt_store;

static size_t vsmt_round(size_t n) { return (n + VSMT_ALIGN - 1) & ~(size_t)(VSMT_ALIGN - 1); }

static int64_t vsmt_now(const vsmt_store *s) {
    if (s->manual)
        return s->manual_ns;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - s->t0_ns;
}

/* One allocation per chunk: header, then each column 64-byte aligned. */
static vsmt_chunk *vsmt_chunk_new(uint32_t cap) {
    size_t widths[VSMT_COLUMNS] = {8, 8, 2, 1, 8, 1, 8, 1, 0, 8};
    size_t bytes[VSMT_COLUMNS];
    size_t total = vsmt_round(sizeof(vsmt_chunk));
    for (int i = 0; i < VSMT_COLUMNS; i++) {
        bytes[i] = vsmt_round(widths[i] ? widths[i] * cap : (cap + 7) / 8);
        total += bytes[i];
    }
    char *base = NULL;
    if (posix_memalign((void **)&base, VSMT_ALIGN, total) != 0)
        return NULL;
    vsmt_chunk *c = (vsmt_chunk *)base;
    memset(c, 0, sizeof(*c));
    c->cap = cap;
    char *p = base + vsmt_round(sizeof(vsmt_chunk));
    void **cols[VSMT_COLUMNS] = {
        (void **)&c->seq, (void **)&c->time_ns, (void **)&c->vp, (void **)&c->vtl, (void **)&c->rip,
        (void **)&c->kind, (void **)&c->address, (void **)&c->size, (void **)&c->is_write, (void **)&c->data,
    };
    for (int i = 0; i < VSMT_COLUMNS; i++) {
        *cols[i] = p;
        c->bytes[i] = bytes[i];
        p += bytes[i];
    }
    memset(c->is_write, 0, bytes[8]);  /* bits are only ever set */
    return c;
}

void vsmt_chunk_free(vsmt_chunk *c) { free(c); }

vsmt_store *vsmt_open(int64_t t0_ns, uint32_t chunk_rows, uint64_t due_rows, uint64_t late_rows, int64_t due_age_ns) {
    vsmt_store *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    pthread_mutex_init(&s->lock, NULL);
    s->t0_ns = t0_ns;
    s->chunk_rows = chunk_rows;
    s->due_rows = due_rows;
    s->late_rows = late_rows;
    s->due_age_ns = due_age_ns;
    return s;
}

void vsmt_free(vsmt_store *s) {
    free(s->natives);
    vsmt_chunk *c = s->head;
    while (c != NULL) {
        vsmt_chunk *next = c->next;
        free(c);
        c = next;
    }
    pthread_mutex_destroy(&s->lock);
    free(s);
}

void vsmt_stop(vsmt_store *s) {
    pthread_mutex_lock(&s->lock);
    s->stopped = 1;
    pthread_mutex_unlock(&s->lock);
}

/* From now on every event is stamped time_ns (until the next call): synthetic traces. */
void vsmt_set_manual_time(vsmt_store *s, int64_t time_ns) {
    pthread_mutex_lock(&s->lock);
    s->manual = 1;
    s->manual_ns = time_ns;
    pthread_mutex_unlock(&s->lock);
}

/* Called with the lock held, after an event was stamped at time now. */
static int vsmt_status(vsmt_store *s, int64_t now) {
    if (s->pending >= s->late_rows || now - s->oldest_ns >= s->due_age_ns)
        return VSMT_LATE;
    return s->pending >= s->due_rows ? VSMT_DUE : VSMT_NOT_DUE;
}

/* Take the next seq and time: the caller holds the lock. */
static uint64_t vsmt_next(vsmt_store *s, int64_t *now) {
    *now = vsmt_now(s);
    if (s->pending++ == 0)
        s->oldest_ns = *now;
    return s->next_seq++;
}

/* A PIO or MMIO event: one row in the C columns. */
int vsmt_io(vsmt_store *s, int kind, uint32_t vp, uint32_t vtl, uint64_t rip, uint64_t address,
            uint32_t size, int is_write, uint64_t data) {
    pthread_mutex_lock(&s->lock);
    if (s->stopped) {
        pthread_mutex_unlock(&s->lock);
        return VSMT_STOPPED;
    }
    vsmt_chunk *c = s->tail;
    if (c == NULL || c->n == c->cap) {
        vsmt_chunk *fresh = vsmt_chunk_new(s->chunk_rows);
        if (fresh == NULL) {
            s->dropped++;
            pthread_mutex_unlock(&s->lock);
            return VSMT_LATE;
        }
        if (c == NULL)
            s->head = fresh;
        else
            c->next = fresh;
        s->tail = c = fresh;
    }
    int64_t now;
    uint32_t i = c->n++;
    c->seq[i] = vsmt_next(s, &now);
    c->time_ns[i] = now;
    c->vp[i] = (uint16_t)vp;
    c->vtl[i] = (uint8_t)vtl;
    c->rip[i] = rip;
    c->kind[i] = (int8_t)(kind - 1);
    c->address[i] = address;
    c->size[i] = (uint8_t)size;
    if (is_write)
        c->is_write[i >> 3] |= (uint8_t)(1u << (i & 7));
    c->data[i] = data;
    int status = vsmt_status(s, now);
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* A Python-built event: out[0] = seq, out[1] = time_ns. */
int vsmt_stamp(vsmt_store *s, int64_t *out) {
    pthread_mutex_lock(&s->lock);
    if (s->stopped) {
        pthread_mutex_unlock(&s->lock);
        return VSMT_STOPPED;
    }
    int64_t now;
    out[0] = (int64_t)vsmt_next(s, &now);
    out[1] = now;
    int status = vsmt_status(s, now);
    pthread_mutex_unlock(&s->lock);
    return status;
}

int vsmt_due(vsmt_store *s) {
    pthread_mutex_lock(&s->lock);
    int status = s->pending ? vsmt_status(s, vsmt_now(s)) : VSMT_NOT_DUE;
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* time_ns of the oldest pending event, or -1 if none. */
int64_t vsmt_oldest(vsmt_store *s) {
    pthread_mutex_lock(&s->lock);
    int64_t t = s->pending ? s->oldest_ns : -1;
    pthread_mutex_unlock(&s->lock);
    return t;
}

/* A native record owning ``events`` seqs and ``orders`` entry orders (stamped now). */
int vsmt_native_record(vsmt_store *s, uint32_t events, uint32_t orders, const uint64_t *words) {
    pthread_mutex_lock(&s->lock);
    if (s->stopped) {
        pthread_mutex_unlock(&s->lock);
        return VSMT_STOPPED;
    }
    if (s->n_natives == s->cap_natives) {
        uint32_t cap = s->cap_natives ? 2 * s->cap_natives : 256;
        vsmt_native *grown = realloc(s->natives, (size_t)cap * sizeof *grown);
        if (grown == NULL) {
            s->dropped += events;
            pthread_mutex_unlock(&s->lock);
            return VSMT_LATE;
        }
        s->natives = grown;
        s->cap_natives = cap;
    }
    vsmt_native *r = &s->natives[s->n_natives++];
    int64_t now = vsmt_now(s);
    if (s->pending == 0)
        s->oldest_ns = now;
    s->pending += events;
    r->seq = s->next_seq;
    s->next_seq += events;
    r->time_ns = now;
    r->order = s->next_order;
    s->next_order += orders;
    memcpy(r->words, words, sizeof r->words);
    int status = vsmt_status(s, now);
    pthread_mutex_unlock(&s->lock);
    return status;
}

/* Native records pending (not yet taken). */
uint32_t vsmt_native_count(vsmt_store *s) {
    pthread_mutex_lock(&s->lock);
    uint32_t n = s->n_natives;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* The next emulation entry order (one entry started). */
uint64_t vsmt_order(vsmt_store *s) {
    pthread_mutex_lock(&s->lock);
    uint64_t order = s->next_order++;
    pthread_mutex_unlock(&s->lock);
    return order;
}

/* Detach every pending chunk (a list the caller frees) and native record (an array the caller
   frees with vsmt_natives_free); *cutoff = the first seq not taken. The caller holds whatever
   serialises Python-built rows, so the cut is consistent. */
vsmt_chunk *vsmt_take(vsmt_store *s, uint64_t *cutoff, vsmt_native **natives, uint32_t *native_count) {
    pthread_mutex_lock(&s->lock);
    vsmt_chunk *c = s->head;
    s->head = s->tail = NULL;
    s->pending = 0;
    *cutoff = s->next_seq;
    *natives = s->natives;
    *native_count = s->n_natives;
    s->natives = NULL;
    s->n_natives = s->cap_natives = 0;
    pthread_mutex_unlock(&s->lock);
    return c;
}

void vsmt_natives_free(vsmt_native *natives) { free(natives); }

uint64_t vsmt_dropped(vsmt_store *s) {
    pthread_mutex_lock(&s->lock);
    uint64_t n = s->dropped;
    pthread_mutex_unlock(&s->lock);
    return n;
}
"""


def make_ffi(module_name: str) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(module_name, SOURCE, libraries=["pthread"])
    return ffi

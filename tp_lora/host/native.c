/* tp_lora's read loop in C: one call per part of a cold load (tp_lora/host/native.py builds and binds it).
 *
 * Why: a part's reads are issued from a prebuilt table (host/reader.py, _IovTable) by one of 16 reader
 * threads. In Python, the rebase of that table, the SQE writes and the completion reaping hold the GIL
 * (~60-150 us a part), which the other readers and the loader thread wait for. Here the whole part is one
 * ctypes call, which runs without the GIL.
 *
 * No allocation, no global state: every buffer is the caller's, sized by the caller (the table's bounds
 * are checked in Python before the call). The io_uring instance is created, mapped and closed by
 * host/uring.py; this file only writes its submission queue and reads its completion queue, with the
 * ordering the kernel's ABI asks for (release store of the SQ tail after the SQEs, acquire load of the
 * CQ tail before the CQEs, release store of the CQ head after reading them).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426 /* x86-64 and aarch64 (the only machines host/uring.py drives) */
#endif
#define TPL_ENTER_GETEVENTS 1u
#define TPL_OP_READV 1u

/* Keep in step with native.py (_Ring, _Table, ABI). */
#define TPL_ABI 3

struct tpl_ring {
    uint32_t *sq_tail;  /* the SQ ring's tail (we write it) */
    uint64_t *sqes;     /* [sq_entries][8] u64 words: host/uring.py's _SQE layout */
    uint32_t *cq_head;  /* the CQ ring's head (we write it) */
    uint32_t *cq_tail;  /* the CQ ring's tail (the kernel writes it) */
    uint64_t *cqes;     /* [cq_entries][2] u64 words: user_data, then res (i32) | flags (u32) */
    uint32_t sq_mask, sq_entries, cq_mask, cq_entries;
    int32_t ring_fd;
    uint32_t reserved;
    uint64_t submits;   /* io_uring_enter calls, for the stats */
};

/* A part's reads, relative to its buffers (host/reader.py's _IovTable, built once per plan). */
struct tpl_table {
    const uint64_t *rel;    /* [pieces][2]: offset in the chunk buffer or the scratch, bytes */
    const uint8_t *scr;     /* [pieces]: 1 = the piece lands in the scratch */
    int64_t pieces;
    const uint64_t *first;  /* [k]: byte offset of read j's first iovec in the iovec table */
    const uint32_t *niov;   /* [k]: read j's iovec count */
    const uint64_t *off;    /* [k]: read j's file offset */
    const int64_t *want;    /* [k]: read j's bytes */
    int64_t k;              /* the direct reads (no gathers out of the scratch) */
};

int tpl_abi(void) { return TPL_ABI; }

static void rebase(const struct tpl_table *t, uint64_t buf, uint64_t scratch, uint64_t *iov) {
    for (int64_t i = 0; i < t->pieces; i++) {
        iov[2 * i] = t->rel[2 * i] + (t->scr[i] ? scratch : buf);
        iov[2 * i + 1] = t->rel[2 * i + 1];
    }
}

/* io_uring_enter: submit `to_submit` SQEs and wait for `min_complete` completions. Returns the SQEs
 * consumed, or -errno (EINTR is retried here). */
static long enter(struct tpl_ring *r, uint32_t to_submit, uint32_t min_complete) {
    for (;;) {
        long n = syscall(__NR_io_uring_enter, r->ring_fd, to_submit, min_complete, TPL_ENTER_GETEVENTS,
                         NULL, 0);
        r->submits++;
        if (n >= 0)
            return n;
        if (errno != EINTR)
            return -errno;
    }
}

static int64_t ring_reads(struct tpl_ring *r, int32_t fd, const struct tpl_table *t, uint64_t iov,
                          int64_t *res) {
    int64_t done = 0, bad = 0;
    uint32_t batch = r->sq_entries < r->cq_entries ? r->sq_entries : r->cq_entries;
    while (done < t->k) {
        uint32_t n = (t->k - done) < (int64_t)batch ? (uint32_t)(t->k - done) : batch;
        uint32_t tail = *r->sq_tail;  /* only this thread writes it */
        for (uint32_t i = 0; i < n; i++) {
            uint64_t *s = r->sqes + 8 * (size_t)((tail + i) & r->sq_mask);
            int64_t j = done + i;
            s[0] = TPL_OP_READV | ((uint64_t)(uint32_t)fd << 32);
            s[1] = t->off[j];
            s[2] = iov + t->first[j];
            s[3] = t->niov[j];  /* len = iovec count; rw_flags 0 */
            s[4] = (uint64_t)j; /* user_data: the read's index */
            s[5] = s[6] = s[7] = 0;
        }
        __atomic_store_n(r->sq_tail, tail + n, __ATOMIC_RELEASE);
        uint32_t submitted = 0, got = 0, busy = 0;
        while (got < n) {
            long m = enter(r, n - submitted, n - got);
            if (m == -EAGAIN || m == -EBUSY) {
                /* no room for more requests now (memory, or completions to reap first): wait for one of
                 * ours in flight, if any, then reap and submit the rest */
                long w = submitted > got ? enter(r, 0, 1) : 0;
                if (w < 0 && w != -EAGAIN && w != -EBUSY)
                    return w;
                if (submitted == got && ++busy > 100000)
                    return m;  /* the kernel keeps refusing with nothing of ours in flight: give up */
                m = 0;
            } else if (m < 0) {
                return m;
            }
            submitted += (uint32_t)m < n - submitted ? (uint32_t)m : n - submitted;
            uint32_t head = *r->cq_head;
            uint32_t ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
            for (; head != ctail; head++) {
                const uint64_t *c = r->cqes + 2 * (size_t)(head & r->cq_mask);
                uint64_t j = c[0];
                if (j < (uint64_t)done || j >= (uint64_t)(done + n))
                    continue;  /* not one of this batch's reads (cannot happen on a ring used only here) */
                int64_t v = (int32_t)(uint32_t)(c[1] & 0xffffffffu);
                res[j] = v;
                bad += v != t->want[j];
                got++;
            }
            __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        }
        done += n;
    }
    return bad;
}

static int64_t preadv_reads(int32_t fd, const struct tpl_table *t, uint64_t iov, int64_t *res) {
    int64_t bad = 0;
    for (int64_t j = 0; j < t->k; j++) {
        ssize_t g;
        do {
            g = preadv(fd, (const struct iovec *)(uintptr_t)(iov + t->first[j]), (int)t->niov[j],
                       (off_t)t->off[j]);
        } while (g < 0 && errno == EINTR);
        res[j] = g < 0 ? -(int64_t)errno : (int64_t)g;
        bad += res[j] != t->want[j];
    }
    return bad;
}

/* The part's iovecs rebased onto this load's buffers (into `iov`, [pieces][2]), then its direct reads:
 * through the ring `r` in batches of its size, or one preadv each when `r` is NULL. Each read's result
 * (bytes, or -errno) goes to res[j]. Returns how many reads did not return their bytes (the caller redoes
 * those piece by piece and raises at EOF), or -errno when io_uring_enter failed (the ring must then not be
 * used again: reads may still be in flight on it). */
int64_t tpl_read_part(struct tpl_ring *r, int32_t fd, const struct tpl_table *t, uint64_t buf, uint64_t scratch,
                      uint64_t *iov, int64_t *res) {
    rebase(t, buf, scratch, iov);
    if (t->k == 0)
        return 0;
    return r ? ring_reads(r, fd, t, (uint64_t)(uintptr_t)iov, res)
             : preadv_reads(fd, t, (uint64_t)(uintptr_t)iov, res);
}

/* ---------------------------------------------------------------------------------------------------
 * A whole cold load's parts, read by every reader thread in one call each (the batch).
 *
 * Why: with one Python task per part, each part cost a thread wake-up and the Python around its C call,
 * under the GIL, serially across the readers (they were 41-56% busy in a cold load). Here each reader
 * thread makes one call per load: it takes the next part by an atomic counter, reads it, publishes its
 * status, and takes the next, without the GIL. The loader thread waits in tpl_wait (futex) and copies
 * parts in the order they complete.
 *
 * Protocol (host/native.py's Batch owns every array):
 *   parts[i]    the part's table and its chunk buffer; valid for i < avail (the loader publishes buffers
 *               as it takes them from the arena: tpl_publish)
 *   status[i]   TPL_PENDING until read; then 0 (every read returned its bytes), > 0 (that many reads came
 *               back short: the caller reads the part again in Python, raising at EOF) or -errno (the
 *               ring failed on it: the caller reads it again; this thread's call returns -errno too)
 *   done        futex word: parts with a status, for tpl_wait
 *   cancel      set by tpl_cancel: readers stop before their next part
 *   claim       atomic word: low 32 bits the next position readers take, high 32 bits the limit they
 *               stop at. Readers take positions from the front; another thread may take whole runs
 *               from the back (tpl_claim_back: the parts it copies to the device by other means) and
 *               publishes their status itself (tpl_complete). One CAS moves either end, so every
 *               position is taken exactly once.
 */
#define TPL_PENDING INT64_MIN

struct tpl_part {
    const struct tpl_table *t;
    uint64_t buf;
};

struct tpl_batch {
    const struct tpl_part *parts;
    int64_t n;
    const int64_t *order; /* [n]: the order parts are taken in (NULL: 0, 1, ...; tests permute it) */
    uint64_t scratch;     /* the gap pieces' junk bytes (shared: nothing is gathered out of them) */
    int64_t *status;      /* [n] */
    int64_t *t_start;     /* [n] CLOCK_MONOTONIC ns, the trace */
    int64_t *t_end;       /* [n] */
    int32_t *worker;      /* [n] which call read it */
    uint64_t claim;       /* atomic: next position (low 32 bits) and limit (high 32 bits): see above */
    int64_t ring_reads;   /* atomic: reads that went through a ring */
    int32_t avail;        /* futex word: parts whose buffers are set */
    int32_t done;         /* futex word: parts with a status */
    int32_t cancel;
    int32_t waiters;      /* threads in futex_wait on `done` */
    int32_t avail_waiters;
    int32_t short_every;  /* tests: report every short_every-th part short (0: never) */
    int32_t fd;           /* the file (tpl_serve's threads read it) */
    int32_t active;       /* futex word: pool threads not yet done with this batch */
    int32_t active_waiters;
    int32_t ring_failed;  /* rings that failed in this batch (their threads went on with preadv) */
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long futex(int32_t *w, int op, int32_t v, const struct timespec *to) {
    return syscall(SYS_futex, w, op, v, to, NULL, 0);
}

static void wake_all(int32_t *w, int32_t *waiters) {
    if (__atomic_load_n(waiters, __ATOMIC_SEQ_CST))
        futex(w, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

/* Block until *w != seen, *cancel is set, or `ns` elapse; spins a little first (a futex wake-up costs
 * a context switch, often more than the wait). */
static void wait_change(int32_t *w, int32_t seen, int32_t *waiters, int32_t *cancel, int64_t ns) {
    for (int i = 0; i < 2000; i++) {
        if (__atomic_load_n(w, __ATOMIC_ACQUIRE) != seen || __atomic_load_n(cancel, __ATOMIC_ACQUIRE))
            return;
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    struct timespec to = {ns / 1000000000LL, ns % 1000000000LL};
    __atomic_add_fetch(waiters, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(w, __ATOMIC_SEQ_CST) == seen && !__atomic_load_n(cancel, __ATOMIC_SEQ_CST))
        futex(w, FUTEX_WAIT_PRIVATE, seen, &to);
    __atomic_sub_fetch(waiters, 1, __ATOMIC_SEQ_CST);
}

/* One reader thread's share of the batch: parts taken in order until none is left or the batch is
 * cancelled. `r` is this thread's ring (NULL: preadv; a part of one read uses preadv anyway), `iov` and
 * `res` its buffers, sized by the caller for the largest part. Returns 0, or -errno when the ring failed
 * (the caller drops the ring and calls again without it). */
int64_t tpl_read_batch(struct tpl_batch *b, struct tpl_ring *r, int32_t fd, uint64_t *iov, int64_t *res,
                       int32_t wid) {
    for (;;) {
        if (__atomic_load_n(&b->cancel, __ATOMIC_ACQUIRE))
            return 0;
        uint64_t w = __atomic_load_n(&b->claim, __ATOMIC_ACQUIRE);
        int64_t i;
        for (;;) {
            uint64_t nx = w & 0xffffffffu, lim = w >> 32;
            if (nx >= lim || (int64_t)nx >= b->n)
                return 0;
            if (__atomic_compare_exchange_n(&b->claim, &w, w + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                i = (int64_t)nx;
                break;
            }
        }
        if (b->order)
            i = b->order[i];
        for (;;) {
            int32_t a = __atomic_load_n(&b->avail, __ATOMIC_ACQUIRE);
            if (i < a)
                break;
            if (__atomic_load_n(&b->cancel, __ATOMIC_ACQUIRE))
                return 0;
            wait_change(&b->avail, a, &b->avail_waiters, &b->cancel, 1000000);
        }
        const struct tpl_part *p = &b->parts[i];
        struct tpl_ring *ring = p->t->k > 1 ? r : NULL;
        b->t_start[i] = now_ns();
        int64_t v = tpl_read_part(ring, fd, p->t, p->buf, b->scratch, iov, res);
        b->t_end[i] = now_ns();
        b->worker[i] = wid;
        if (v == 0 && ring)
            __atomic_add_fetch(&b->ring_reads, p->t->k, __ATOMIC_RELAXED);
        if (v == 0 && b->short_every > 0 && i % b->short_every == 0)
            v = 1;
        __atomic_store_n(&b->status[i], v, __ATOMIC_RELEASE);
        __atomic_add_fetch(&b->done, 1, __ATOMIC_SEQ_CST);
        wake_all(&b->done, &b->waiters);
        if (v < 0 && ring)
            return v;
    }
}

/* Another thread takes positions [lo, limit) from the back, if no reader has taken `lo` yet: returns the
 * old limit (> lo), or -1 when a reader got there first (or nothing is left above lo). */
int64_t tpl_claim_back(struct tpl_batch *b, int64_t lo) {
    uint64_t w = __atomic_load_n(&b->claim, __ATOMIC_ACQUIRE);
    for (;;) {
        uint64_t nx = w & 0xffffffffu, lim = w >> 32;
        if (lo < 0 || (uint64_t)lo < nx || (uint64_t)lo >= lim)
            return -1;
        uint64_t nw = ((uint64_t)lo << 32) | nx;
        if (__atomic_compare_exchange_n(&b->claim, &w, nw, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return (int64_t)lim;
    }
}

/* The thread that claimed positions [lo, hi) gives them status `v` (its worker id `wid` in the trace) and
 * wakes the loader. */
void tpl_complete(struct tpl_batch *b, int64_t lo, int64_t hi, int64_t v, int32_t wid) {
    int64_t t = now_ns();
    for (int64_t p = lo; p < hi; p++) {
        int64_t i = b->order ? b->order[p] : p;
        b->t_start[i] = b->t_end[i] = t;
        b->worker[i] = wid;
        __atomic_store_n(&b->status[i], v, __ATOMIC_RELEASE);
    }
    __atomic_add_fetch(&b->done, (int32_t)(hi - lo), __ATOMIC_SEQ_CST);
    wake_all(&b->done, &b->waiters);
}

/* The loader: block until more than `seen` parts have a status (or `ns` elapse, or cancel); returns the
 * count now. */
int32_t tpl_wait(struct tpl_batch *b, int32_t seen, int64_t ns) {
    wait_change(&b->done, seen, &b->waiters, &b->cancel, ns);
    return __atomic_load_n(&b->done, __ATOMIC_ACQUIRE);
}

/* The loader: parts [0, avail) have their buffers set. */
void tpl_publish(struct tpl_batch *b, int32_t avail) {
    __atomic_store_n(&b->avail, avail, __ATOMIC_SEQ_CST);
    wake_all(&b->avail, &b->avail_waiters);
}

/* Stop the readers before their next part (the load failed elsewhere), and wake every waiter. */
void tpl_cancel(struct tpl_batch *b) {
    __atomic_store_n(&b->cancel, 1, __ATOMIC_SEQ_CST);
    futex(&b->avail, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
    futex(&b->done, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

/* ---------------------------------------------------------------------------------------------------
 * The reader threads, kept in C between loads (host/native.py's ReaderPool).
 *
 * Each thread calls tpl_serve once, at engine start, and stays inside it (without the GIL) until
 * tpl_stop: it sleeps on `seq` until the loader posts a batch, reads its share of it (tpl_read_batch),
 * checks out of it (`active`), and sleeps again. So a load starts every reader at once by one futex wake,
 * instead of waking a Python task per part (or per thread) that then queues for the GIL.
 */
struct tpl_pool {
    struct tpl_batch *batch;  /* the batch being read (set before seq is bumped) */
    uint64_t *iov;            /* [threads]: each thread's iovec buffer ([pieces][2] u64) */
    uint64_t *res;            /* [threads]: each thread's result buffer ([k] i64) */
    int32_t seq;              /* futex word: batches posted */
    int32_t stop;
    int32_t waiters;
    int32_t reserved;
};

/* A pool thread's life: every batch posted until tpl_stop. `r`: this thread's ring (NULL: preadv); a
 * ring that fails is not used again by this thread. Returns how many rings failed (0 or 1). */
int64_t tpl_serve(struct tpl_pool *p, struct tpl_ring *r, int32_t wid) {
    int32_t seen = 0;
    int64_t failed = 0;
    for (;;) {
        int32_t s;
        for (;;) {
            if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE))
                return failed;
            s = __atomic_load_n(&p->seq, __ATOMIC_ACQUIRE);
            if (s != seen)
                break;
            __atomic_add_fetch(&p->waiters, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&p->seq, __ATOMIC_SEQ_CST) == seen && !__atomic_load_n(&p->stop, __ATOMIC_SEQ_CST))
                futex(&p->seq, FUTEX_WAIT_PRIVATE, seen, NULL);
            __atomic_sub_fetch(&p->waiters, 1, __ATOMIC_SEQ_CST);
        }
        seen = s;
        struct tpl_batch *b = __atomic_load_n(&p->batch, __ATOMIC_ACQUIRE);
        uint64_t *iov = (uint64_t *)(uintptr_t)p->iov[wid];
        int64_t *res = (int64_t *)(uintptr_t)p->res[wid];
        while (tpl_read_batch(b, r, b->fd, iov, res, wid) < 0) {
            __atomic_add_fetch(&b->ring_failed, 1, __ATOMIC_RELAXED);
            r = NULL;  /* the part it failed on is marked: the loader reads it again */
            failed = 1;
        }
        if (__atomic_sub_fetch(&b->active, 1, __ATOMIC_SEQ_CST) == 0)
            wake_all(&b->active, &b->active_waiters);
    }
}

/* The loader: start `b` on every pool thread (b->active = the pool's threads, set by the caller). */
void tpl_post(struct tpl_pool *p, struct tpl_batch *b) {
    __atomic_store_n(&p->batch, b, __ATOMIC_RELEASE);
    __atomic_add_fetch(&p->seq, 1, __ATOMIC_SEQ_CST);
    wake_all(&p->seq, &p->waiters);
}

/* The loader: block until every pool thread is done with `b` (or `ns` elapse): the threads still in it. */
int32_t tpl_wait_idle(struct tpl_batch *b, int64_t ns) {
    int32_t a;
    int64_t end = now_ns() + ns;
    while ((a = __atomic_load_n(&b->active, __ATOMIC_ACQUIRE)) != 0) {
        int64_t left = end - now_ns();
        if (left <= 0)
            break;
        int32_t never = 0;
        wait_change(&b->active, a, &b->active_waiters, &never, left);
    }
    return __atomic_load_n(&b->active, __ATOMIC_ACQUIRE);
}

/* Engine close: every pool thread returns from tpl_serve (once done with the batch it is in, if any). */
void tpl_stop(struct tpl_pool *p) {
    __atomic_store_n(&p->stop, 1, __ATOMIC_SEQ_CST);
    futex(&p->seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
}

/* ---------------------------------------------------------------------------------------------------
 * The mapper's chunk (device/mapper.py): one call, without the GIL, for what would otherwise be a dozen
 * Python steps each queueing for the GIL behind the loader thread.
 *
 * Maps bytes [span_off, span_off + map_len) of `fd` read-only, checks with mincore that every page is in
 * the page cache (`vec`: one byte per page, the caller's), takes positions [lo, hi) from the back of the
 * batch, pins the pages in place (the CUDA runtime's cudaHostRegister, read-only, `reg_len` bytes: whole
 * pages), makes `stream` wait for `wait_ev` (if any), issues the k copies into the device buffer `buf`
 * and records `done_ev`, then gives the positions the status `on_device`.
 * Returns 1 (done: *addr is the mapping, to unpin and unmap once done_ev is reached), 0 (not taken: not
 * resident, or a reader got there first; nothing is left mapped), -errno (mmap failed; nothing claimed),
 * or -(100000 + CUDA error) (claimed and failed: the positions have status 1 and the loader reads them;
 * *addr is the mapping when copies may be in flight, else 0).
 */
struct tpl_cuda {
    int (*host_register)(void *, size_t, unsigned int);
    int (*memcpy_async)(void *, const void *, size_t, int, void *);
    int (*stream_wait_event)(void *, void *, unsigned int);
    int (*event_record)(void *, void *);
};

#include <sys/mman.h>

int64_t tpl_map_chunk(struct tpl_batch *b, const struct tpl_cuda *cu, int32_t fd, int64_t lo, int64_t hi,
                      int64_t span_off, int64_t map_len, int64_t reg_len, const int64_t *dst, const int64_t *src,
                      const int64_t *len, int64_t k, uint64_t buf, void *stream, void *wait_ev, void *done_ev,
                      int64_t on_device, uint8_t *vec, uint64_t *addr) {
    *addr = 0;
    void *m = mmap(NULL, (size_t)map_len, PROT_READ, MAP_SHARED, fd, (off_t)span_off);
    if (m == MAP_FAILED)
        return -(int64_t)errno;
    int64_t pages = (reg_len + 4095) / 4096;
    if (mincore(m, (size_t)map_len, vec) != 0) {
        munmap(m, (size_t)map_len);
        return 0;
    }
    for (int64_t i = 0; i < pages; i++) {
        if (!(vec[i] & 1)) {
            munmap(m, (size_t)map_len);
            return 0;
        }
    }
    if (tpl_claim_back(b, lo) != hi) {
        munmap(m, (size_t)map_len);
        return 0;
    }
    int rc = cu->host_register(m, (size_t)reg_len, 0x08u /* cudaHostRegisterReadOnly */);
    if (rc != 0) {
        munmap(m, (size_t)map_len);
        tpl_complete(b, lo, hi, 1, -2);
        return -(100000 + (int64_t)rc);
    }
    *addr = (uint64_t)(uintptr_t)m;
    if (wait_ev && (rc = cu->stream_wait_event(stream, wait_ev, 0)) != 0) {
        tpl_complete(b, lo, hi, 1, -2);
        return -(100000 + (int64_t)rc);
    }
    for (int64_t j = 0; j < k; j++) {
        rc = cu->memcpy_async((void *)(uintptr_t)(buf + (uint64_t)dst[j]), (const char *)m + (src[j] - span_off),
                              (size_t)len[j], 1 /* cudaMemcpyHostToDevice */, stream);
        if (rc != 0) {
            tpl_complete(b, lo, hi, 1, -2);
            return -(100000 + (int64_t)rc);
        }
    }
    if ((rc = cu->event_record(done_ev, stream)) != 0) {
        tpl_complete(b, lo, hi, 1, -2);
        return -(100000 + (int64_t)rc);
    }
    tpl_complete(b, lo, hi, on_device, -2);
    return 1;
}

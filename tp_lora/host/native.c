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
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426 /* x86-64 and aarch64 (the only machines host/uring.py drives) */
#endif
#define TPL_ENTER_GETEVENTS 1u
#define TPL_OP_READV 1u

/* Keep in step with native.py (_Ring, _Table, ABI). */
#define TPL_ABI 1

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

/*
 * A backend worker's scheduling policy in its C serve loop: xenbus.PassPolicy's rule, kept per
 * wake-up.  One source for the vbd's xkb_loop (_blkif_build.py) and the vif's xkn_tx_loop
 * (_netif_build.py): XK_POLICY_FNS(prefix, type) defines prefix_set_batch and prefix_policy over
 * a loop struct with the fields batch_at, other_below, average (double), batch (int32_t),
 * switches, probe_every, since_probe, probes (uint32_t) and wake_requests (uint64_t: the ring
 * requests the current wake-up served).
 *
 * Under SCHED_OTHER the worker a guest's kick wakes preempts the kicking vCPU's thread when they
 * share a CPU, serves, and raises its upcall while that vCPU is out of KVM_RUN with the guest's
 * interrupts still off (the frontends kick under spin_lock_irqsave): KVM injects it through an
 * interrupt-window exit, and the guest queues one request per kick.  SCHED_BATCH (sched(7):
 * never a wakeup preemptor) lets the vCPU go on and queue more first; right while requests
 * stream, wrong for one at a time (the answer then waits for the vCPU to halt).  So: BATCH while
 * the wake-ups' average (an EWMA of 1/4) is `batch_at` or more, OTHER again below
 * `other_below`.  A probe: under OTHER a worker whose passes are quick finds one request per kick
 * whatever the guest's depth, so its average alone never shows a deep queue; every `probe_every`
 * OTHER wake-ups it tries BATCH with the average set to `batch_at`: one request at a time brings
 * it under `other_below` in ~6 wake-ups, a stream keeps it.  On a CPU of its own the worker runs
 * at once either way.
 */
#ifndef XK_POLICY_H
#define XK_POLICY_H
#include <sched.h>
#include <string.h>

#define XK_POLICY_FNS(prefix, type)                                                               \
static void prefix##_set_batch(type *L, int batch)                                                \
{                                                                                                 \
    struct sched_param sp;                                                                        \
    memset(&sp, 0, sizeof(sp));                                                                   \
    L->batch = batch;                                                                             \
    L->switches++;                                                                                \
    L->since_probe = 0;                                                                           \
    sched_setscheduler(0, batch ? SCHED_BATCH : SCHED_OTHER, &sp);   /* refused: nothing changes */ \
}                                                                                                 \
static void prefix##_policy(type *L)      /* a wake-up ended, every queue empty */                \
{                                                                                                 \
    L->average += ((double)L->wake_requests - L->average) / 4;                                    \
    L->wake_requests = 0;                                                                         \
    if (L->batch) {                                                                               \
        if (L->average < L->other_below)                                                          \
            prefix##_set_batch(L, 0);                                                             \
    } else if (L->average >= L->batch_at) {                                                       \
        prefix##_set_batch(L, 1);                                                                 \
    } else if (L->probe_every && ++L->since_probe >= L->probe_every) {                            \
        L->probes++;                                                                              \
        L->average = L->batch_at;                                                                 \
        prefix##_set_batch(L, 1);                                                                 \
    }                                                                                             \
}

#endif

/*
 * xen_front.h - what the freestanding PV frontends (xen_blkfront.c,
 * xen_netfront.c) share: the grant table page and grant(), xenstore helpers
 * relative to a device directory, the ring barriers io/ring.h wants.
 */
#ifndef XEN_FRONT_H
#define XEN_FRONT_H

#include "xen_guest.h"

#define xen_mb()  __asm__ volatile("mfence" ::: "memory")
#define xen_rmb() __asm__ volatile("" ::: "memory")
#define xen_wmb() __asm__ volatile("" ::: "memory")
#include <xen/io/ring.h>
#include <xen/io/xenbus.h>

#define GRANT_GPFN  0xF0000ULL
#define SEC         1000000000ULL
#define MS          1000000ULL

static volatile grant_entry_v1_t *gnt = (volatile grant_entry_v1_t *)(uintptr_t)(GRANT_GPFN << 12);
static struct xs_reply r;

static void grant(unsigned ref, const void *page, bool readonly)
{
    gnt[ref].domid = 0;
    gnt[ref].frame = (uint32_t)((uintptr_t)page >> 12);
    __asm__ volatile("sfence" ::: "memory");
    gnt[ref].flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
}

/* ---- xenstore helpers ---------------------------------------------------- */
static long xs_readf(const char *dir, const char *key, struct xs_reply *out)
{
    char path[160];
    snprintf(path, sizeof(path), "%s/%s", dir, key);
    return xs_read(0, path, out);
}

static long xs_writef(const char *dir, const char *key, const char *fmt, unsigned long v)
{
    char path[160], val[32];
    snprintf(path, sizeof(path), "%s/%s", dir, key);
    snprintf(val, sizeof(val), fmt, v);
    return xs_write(0, path, val);
}

static long read_num(const char *dir, const char *key)
{
    if (xs_readf(dir, key, &r))
        return -1;
    long v = 0;
    for (const char *c = r.body; *c >= '0' && *c <= '9'; c++)
        v = v * 10 + (*c - '0');
    return v;
}

#endif /* XEN_FRONT_H */

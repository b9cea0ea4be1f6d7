/*
 * Grant entries claimed from C by the backends' data paths (block requests, vif packets).
 *
 * One source for both cffi modules (_blkif_build.py, _netif_build.py include it; the
 * declarations cffi needs are the `cdef:` comment below, which each builder reads from
 * this file).  `struct xk_grants` is a backend thread's snapshot of the domain's v1 grant
 * table (the shared frames' storage; `nr_entries` 0 when the table is v2 or too large)
 * and of guest RAM (never unmapped while the VM lives), taken by grants.py's
 * GrantSnapshot between passes, so C never needs the domain lock.
 *
 * A claim follows Xen's _set_status_v1 (common/grant_table.c): the entry must be exactly
 * GTF_permit_access (GTF_sub_page counted, as for a map) for `domid`, and "a write access
 * to a GTF_readonly grant fails"; GTF_reading (and GTF_writing when the backend writes the
 * page) are set by compare-and-swap, a few tries against a guest that keeps changing the
 * entry; the frame is read after the bits are set, as Xen reads it, and must be guest RAM.
 * An entry someone already holds (busy bits set: a Python pin, which counts its users) is
 * not claimed here: the caller's Python path takes it and applies the same rules with the
 * exact error.  Releasing clears the bits the claim set.
 *
 * cdef:
 *   #define XK_GNT_MAX_FRAMES ...
 *   #define XK_GNT_RAM_SLOTS ...
 *   #define XK_GNT_PER_FRAME ...
 *   struct xk_gnt_ram { uint64_t first; uint64_t count; char *base; };
 *   struct xk_grants { uint32_t nr_entries; uint16_t domid; uint32_t nr_ram;
 *                      char *frames[...]; struct xk_gnt_ram ram[...]; ...; };
 *   struct xk_grants *xk_grants_new(void);
 *   void xk_grants_free(struct xk_grants *g);
 *   int xk_gnt_claim_test(struct xk_grants *g, uint32_t ref, int writable, char **page);
 * end cdef
 */
#ifndef XK_GRANTS_H
#define XK_GRANTS_H

#include <stdint.h>
#include <stdlib.h>
#include <xen/xen.h>
#include <xen/grant_table.h>

#define XK_GNT_MAX_FRAMES 1024       /* GrantTable's MAX_FRAMES_CAP */
#define XK_GNT_RAM_SLOTS 4
#define XK_GNT_PAGE 4096u
#define XK_GNT_PER_FRAME (XK_GNT_PAGE / sizeof(struct grant_entry_v1))
#define XK_GNT_RETRIES 5             /* entries.py CAS_RETRIES (Xen's _set_status_v1 bound) */
_Static_assert(offsetof(struct grant_entry_v1, flags) == 0 && offsetof(struct grant_entry_v1, domid) == 2,
               "the busy bits are set on the 32-bit word of flags and domid");

struct xk_gnt_ram { uint64_t first; uint64_t count; char *base; };
struct xk_grants {
    uint32_t nr_entries;             /* v1 entries the frames hold; 0: claim nothing */
    uint16_t domid;                  /* the domain the entries must grant to (the backend's) */
    uint32_t nr_ram;
    char *frames[XK_GNT_MAX_FRAMES];
    struct xk_gnt_ram ram[XK_GNT_RAM_SLOTS];
};
struct xk_gnt_claim { uint32_t *word; uint32_t bits; };

static struct xk_grants *xk_grants_new(void)
{
    return calloc(1, sizeof(struct xk_grants));
}

static void xk_grants_free(struct xk_grants *g)
{
    free(g);
}

/* The host address of guest RAM frame `gfn`, or NULL (not RAM: the Python path decides). */
static char *xk_gnt_ram_page(const struct xk_grants *g, uint64_t gfn)
{
    for (uint32_t i = 0; i < g->nr_ram && i < XK_GNT_RAM_SLOTS; i++)
        if (gfn - g->ram[i].first < g->ram[i].count)
            return g->ram[i].base + (gfn - g->ram[i].first) * XK_GNT_PAGE;
    return NULL;
}

/* Claim entry `ref` (`writable`: the backend writes the page); its page, or NULL if refused. */
static char *xk_gnt_claim(const struct xk_grants *g, uint32_t ref, int writable, struct xk_gnt_claim *c)
{
    if (ref >= g->nr_entries)
        return NULL;
    struct grant_entry_v1 *e = (struct grant_entry_v1 *)g->frames[ref / XK_GNT_PER_FRAME] + ref % XK_GNT_PER_FRAME;
    uint32_t *word = (uint32_t *)e;
    uint32_t bits = GTF_reading | (writable ? GTF_writing : 0);
    uint32_t old = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (int i = 0;; i++) {
        uint32_t flags = old & 0xffff, dom = old >> 16;
        if ((flags & (GTF_type_mask | GTF_sub_page)) != GTF_permit_access || dom != g->domid
            || (flags & (GTF_reading | GTF_writing)) || (writable && (flags & GTF_readonly)))
            return NULL;
        if (__atomic_compare_exchange_n(word, &old, old | bits, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            break;
        if (i + 1 == XK_GNT_RETRIES)
            return NULL;
    }
    char *page = xk_gnt_ram_page(g, __atomic_load_n(&e->frame, __ATOMIC_ACQUIRE));
    if (!page) {
        __atomic_fetch_and(word, ~bits, __ATOMIC_SEQ_CST);
        return NULL;
    }
    c->word = word;
    c->bits = bits;
    return page;
}

static void xk_gnt_release(const struct xk_gnt_claim *c, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        __atomic_fetch_and(c[i].word, ~c[i].bits, __ATOMIC_SEQ_CST);
}

/* For tests: claim `ref` as a data path would: 1 and its page in *page (released again), or 0. */
static int xk_gnt_claim_test(struct xk_grants *g, uint32_t ref, int writable, char **page)
{
    struct xk_gnt_claim c;
    *page = xk_gnt_claim(g, ref, writable, &c);
    if (!*page)
        return 0;
    xk_gnt_release(&c, 1);
    return 1;
}

#endif

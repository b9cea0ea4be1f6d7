/*
 * xen_testdev.h - guest side of the xenkvm Xen test backend
 * (xen.test_device: true; VMM side: xenkvm/xen/testdev.py).
 *
 * The device plays a dom0 backend so guests can check their grants and
 * event channels from "the other side":
 *   - OUT (32-bit) to port XK_XEN_TESTDEV_PORT the guest-physical address of
 *     a struct xk_testdev_cmd (8-byte aligned, within one page); the device
 *     runs it synchronously and writes `result` (and `value`) into the block;
 *   - IN (32-bit) from the port returns the last command's result (also the
 *     only way to learn XK_TESTDEV_EBLOCK: a block it could not read).
 * Any other access size is ignored and makes the next IN read EACCESS.
 *
 * Results: 0, a negative GNTST_* code from the grant-table backend, or one
 * of the XK_TESTDEV_E* codes below. Offsets here are checked by
 * _Static_assert and by tests/xen/test_testdev.py against the device's
 * struct format.
 */
#ifndef XEN_TESTDEV_H
#define XEN_TESTDEV_H

#include <stdint.h>

#define XK_XEN_TESTDEV_PORT     0xEC
#define XK_TESTDEV_MAGIC        0x58544443u     /* "CDTX" little-endian */

enum xk_testdev_op {
    XK_TESTDEV_OP_COPY_FROM = 1,    /* grant [offset, +length) -> buffer */
    XK_TESTDEV_OP_COPY_TO = 2,      /* buffer -> grant [offset, +length) */
    XK_TESTDEV_OP_MAP_SUM = 3,      /* map; value = FNV-1a 32 of [offset, +length);
                                     * with FLAG_WRITE also copy buffer into the mapping */
    XK_TESTDEV_OP_ALLOC_ECHO = 4,   /* value = a new guest port already bound to the
                                     * backend (interdomain, dom0), like the store port;
                                     * every notify the guest sends on it is echoed back */
    XK_TESTDEV_OP_BIND_ECHO = 5,    /* bind the backend to guest port `port` (from the
                                     * guest's alloc_unbound(remote 0)); value = port; echoes */
    XK_TESTDEV_OP_NOTIFY = 6,       /* the backend notifies guest port `port` (one of its own) */
    XK_TESTDEV_OP_ECHO_COUNT = 7,   /* value = notifies the backend received on `port` */
};

#define XK_TESTDEV_FLAG_WRITE   0x1     /* MAP_SUM: writable mapping + write buffer */

enum xk_testdev_error {
    XK_TESTDEV_OK = 0,
    /* -1 .. -12: GNTST_* from the grant backend */
    XK_TESTDEV_EBLOCK = -100,       /* command block unaligned / not in guest RAM */
    XK_TESTDEV_EMAGIC = -101,       /* bad magic */
    XK_TESTDEV_EOP = -102,          /* unknown op */
    XK_TESTDEV_ERANGE = -103,       /* offset/length outside one 4 KiB page, or 0 */
    XK_TESTDEV_EBUFFER = -104,      /* buffer not in guest RAM */
    XK_TESTDEV_EEVTCHN = -105,      /* event-channel operation refused */
    XK_TESTDEV_EACCESS = -106,      /* port accessed with the wrong size/offset */
    XK_TESTDEV_EINTERNAL = -107,    /* the backend failed unexpectedly (VMM bug) */
};

struct xk_testdev_cmd {
    uint32_t magic;         /* 0  XK_TESTDEV_MAGIC */
    uint32_t op;            /* 4  enum xk_testdev_op */
    uint16_t domid;         /* 8  granting domain (the guest's own domid) */
    uint16_t flags;         /* 10 XK_TESTDEV_FLAG_* */
    uint32_t ref;           /* 12 grant reference */
    uint32_t offset;        /* 16 byte offset in the granted page */
    uint32_t length;        /* 20 bytes, 1..4096, offset + length <= 4096 */
    uint64_t buffer;        /* 24 guest-physical address of the data buffer */
    uint32_t port;          /* 32 guest event channel port (BIND_ECHO, NOTIFY, ECHO_COUNT) */
    int32_t result;         /* 36 out: 0 or a negative code */
    uint64_t value;         /* 40 out: checksum, port or count */
    uint64_t reserved[2];   /* 48 must be zero */
} __attribute__((aligned(8)));

_Static_assert(sizeof(struct xk_testdev_cmd) == 64, "testdev block size");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, op) == 4, "testdev op");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, domid) == 8, "testdev domid");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, flags) == 10, "testdev flags");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, ref) == 12, "testdev ref");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, offset) == 16, "testdev offset");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, length) == 20, "testdev length");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, buffer) == 24, "testdev buffer");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, port) == 32, "testdev port");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, result) == 36, "testdev result");
_Static_assert(__builtin_offsetof(struct xk_testdev_cmd, value) == 40, "testdev value");

/* FNV-1a 32-bit, as the device computes it for MAP_SUM. */
static inline uint32_t xk_fnv1a(const void *p, uint32_t n)
{
    const uint8_t *b = p;
    uint32_t h = 0x811C9DC5u;
    for (uint32_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x01000193u;
    }
    return h;
}

/* Run one command: fills magic, sends it, returns the result from the block. */
static inline int32_t xk_testdev_run(struct xk_testdev_cmd *c)
{
    c->magic = XK_TESTDEV_MAGIC;
    c->result = 1;          /* the device always overwrites it */
    __asm__ volatile("outl %0, %1" :: "a"((uint32_t)(uintptr_t)c), "Nd"((uint16_t)XK_XEN_TESTDEV_PORT) : "memory");
    return *(volatile int32_t *)&c->result;
}

static inline int32_t xk_testdev_status(void)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((uint16_t)XK_XEN_TESTDEV_PORT));
    return (int32_t)v;
}

#endif /* XEN_TESTDEV_H */

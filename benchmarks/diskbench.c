/*
 * diskbench - sequential MB/s and 4 KiB random-read IOPS of a block device or file.
 *
 *   diskbench PATH SIZE_MIB SECONDS
 *
 * Built static (gcc -static -O2 -pthread) so the same binary runs on the host, inside
 * the Debian Xen guest (xvdb) and inside the QEMU virtio-blk guest (vdb); see
 * benchmarks/bench_diskguest.py.  O_DIRECT, so the page cache is not measured; a file
 * system that refuses O_DIRECT (tmpfs) is used buffered, and the line says so.
 *
 * Phases, each printed as one "DISKBENCH name value unit direct=0|1" line:
 *   seq-write  SIZE_MIB in 1 MiB writes, then fdatasync      (MB/s)
 *   seq-read   the same range in 1 MiB reads                 (MB/s)
 *   rand-qd1   4 KiB reads at random 4 KiB-aligned offsets, one at a time, for SECONDS  (IOPS)
 *   rand-qd32  the same from 32 threads at once (queue depth 32 without libaio)          (IOPS)
 *
 * Before each phase and at the end, one "DISKBENCH-MARK phase requests" line: the device's
 * completed reads + writes so far (/sys/block/NAME/stat; -1 for a file), so a harness that
 * samples counters (KVM's exits, the VMM's hypercalls) at each mark gets them per request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)
#define SMALL 4096
#define QD 32

static const char *path;
static uint64_t size_bytes;
static double seconds;
static int direct = 1;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_dev(int flags)
{
    int fd = open(path, flags | (direct ? O_DIRECT : 0));
    if (fd < 0 && direct && errno == EINVAL) {
        direct = 0;
        fd = open(path, flags);
    }
    if (fd < 0) {
        fprintf(stderr, "diskbench: %s: %s\n", path, strerror(errno));
        exit(1);
    }
    return fd;
}

/* Completed reads + writes of PATH's block device (/sys/block/NAME/stat fields 1 and 5), or -1. */
static long long device_requests(void)
{
    const char *name = strrchr(path, '/');
    char stat_path[256];
    unsigned long long f[5];
    snprintf(stat_path, sizeof stat_path, "/sys/block/%s/stat", name ? name + 1 : path);
    FILE *f_stat = fopen(stat_path, "r");
    if (!f_stat)
        return -1;
    int n = fscanf(f_stat, "%llu %llu %llu %llu %llu", &f[0], &f[1], &f[2], &f[3], &f[4]);
    fclose(f_stat);
    return n == 5 ? (long long)(f[0] + f[4]) : -1;
}

static void mark(const char *phase)
{
    printf("DISKBENCH-MARK %s %lld\n", phase, device_requests());
    fflush(stdout);
}

static void *aligned(size_t n)
{
    void *p;
    if (posix_memalign(&p, SMALL, n)) {
        fprintf(stderr, "diskbench: out of memory\n");
        exit(1);
    }
    memset(p, 0x5a, n);
    return p;
}

static void sequential(int write)
{
    int fd = open_dev(write ? O_WRONLY : O_RDONLY);
    char *buf = aligned(BLOCK);
    double t0 = now();
    for (uint64_t off = 0; off < size_bytes; off += BLOCK) {
        ssize_t n = write ? pwrite(fd, buf, BLOCK, off) : pread(fd, buf, BLOCK, off);
        if (n != BLOCK) {
            fprintf(stderr, "diskbench: %s at %llu: %s\n", write ? "write" : "read",
                    (unsigned long long)off, n < 0 ? strerror(errno) : "short");
            exit(1);
        }
    }
    if (write && fdatasync(fd)) {
        fprintf(stderr, "diskbench: fdatasync: %s\n", strerror(errno));
        exit(1);
    }
    double dt = now() - t0;
    printf("DISKBENCH seq-%s %.1f MB/s direct=%d\n", write ? "write" : "read", size_bytes / dt / 1e6, direct);
    fflush(stdout);
    free(buf);
    close(fd);
}

struct worker {
    pthread_t thread;
    int fd;
    unsigned seed;
    double end;
    uint64_t ops;
};

static void *random_reads(void *arg)
{
    struct worker *w = arg;
    char *buf = aligned(SMALL);
    uint64_t blocks = size_bytes / SMALL;
    while (now() < w->end) {
        for (int i = 0; i < 64; i++) {
            uint64_t blk = ((uint64_t)rand_r(&w->seed) << 16 ^ (uint64_t)rand_r(&w->seed)) % blocks;
            if (pread(w->fd, buf, SMALL, blk * SMALL) != SMALL) {
                fprintf(stderr, "diskbench: random read: %s\n", strerror(errno));
                exit(1);
            }
            w->ops++;
        }
    }
    free(buf);
    return NULL;
}

static void random_iops(int depth)
{
    static struct worker w[QD];
    int fd = open_dev(O_RDONLY);
    double t0 = now();
    for (int i = 0; i < depth; i++) {
        w[i] = (struct worker){ .fd = fd, .seed = 12345u + i, .end = t0 + seconds };
        pthread_create(&w[i].thread, NULL, random_reads, &w[i]);
    }
    uint64_t ops = 0;
    for (int i = 0; i < depth; i++) {
        pthread_join(w[i].thread, NULL);
        ops += w[i].ops;
    }
    double dt = now() - t0;
    printf("DISKBENCH rand-qd%d %.0f IOPS direct=%d\n", depth, ops / dt, direct);
    fflush(stdout);
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc != 4 || atoi(argv[2]) <= 0 || atof(argv[3]) <= 0) {
        fprintf(stderr, "usage: diskbench PATH SIZE_MIB SECONDS\n");
        return 2;
    }
    path = argv[1];
    size_bytes = (uint64_t)atoi(argv[2]) << 20;
    seconds = atof(argv[3]);
    mark("seq-write");
    sequential(1);
    mark("seq-read");
    sequential(0);
    mark("rand-qd1");
    random_iops(1);
    mark("rand-qd32");
    random_iops(QD);
    mark("end");
    return 0;
}

/* Test program for write tracking. It maps a 64 MiB heap of patterned pages and two small
 * regions A and B, logs "READY", and on SIGUSR1 changes its memory in every way the tracker
 * must notice, then logs "CHANGED":
 *   - stores from user space into heap pages 0-9;
 *   - a read(2) from a file into heap page 100 (the kernel writes, not the program);
 *   - MADV_DONTNEED of heap page 200, then a read of it (now the zero page);
 *   - region A unmapped and region B moved onto A's address with mremap (B's pages keep their
 *     write protection but not their address).
 * The rest of the heap is never touched again.
 * It pins itself to the CPU it starts on: the kernel rewrites the rseq area glibc registers
 * (cpu_id_start, cpu_id in the TLS block) whenever the process resumes on another CPU, which
 * would make the last two exports differ for a reason that has nothing to do with tracking. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HEAP_PAGES (64 * 256)
#define SMALL_PAGES 16

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static void fill(unsigned char *p, size_t pages, unsigned seed) {
    for (size_t i = 0; i < pages * 4096 / 8; i++)
        ((unsigned long long *)p)[i] = (i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int log = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int src = open(argv[2], O_RDONLY);
    if (log < 0 || src < 0) return 2;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(sched_getcpu(), &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0) return 6;
    signal(SIGUSR1, on_usr1);
    unsigned char *heap = mmap(0, HEAP_PAGES * 4096, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *a = mmap(0, SMALL_PAGES * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *b = mmap(0, SMALL_PAGES * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (heap == MAP_FAILED || a == MAP_FAILED || b == MAP_FAILED) return 3;
    fill(heap, HEAP_PAGES, 1);
    fill(a, SMALL_PAGES, 2);
    fill(b, SMALL_PAGES, 3);
    dprintf(log, "READY %p %p %p\n", (void *)heap, (void *)a, (void *)b);
    while (!usr1) pause();
    for (int i = 0; i < 10; i++) heap[i * 4096 + 123] ^= 0x5a;
    if (read(src, heap + 100 * 4096, 4096) != 4096) return 4;
    madvise(heap + 200 * 4096, 4096, MADV_DONTNEED);
    volatile unsigned char z = heap[200 * 4096];
    (void)z;
    munmap(a, SMALL_PAGES * 4096);
    if (mremap(b, SMALL_PAGES * 4096, SMALL_PAGES * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, a) != a)
        return 5;
    dprintf(log, "CHANGED\n");
    for (;;) pause();
}

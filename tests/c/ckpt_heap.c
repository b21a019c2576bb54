/* Test program for the checkpoint store: a counter loop writing to a log, and a heap of MB MiB
 * whose every page holds a pattern derived from (seed, page key, page generation).
 * SIGUSR1 rewrites the next 5% of the pages (their generation goes up by one) and logs
 * "MUT k"; SIGUSR2 checks every page against its generation and logs "CHECK OK|BAD k" where k
 * is the number of rewrites so far. Pages of two processes with the same seed are identical.
 *
 * Usage: ckpt_heap MB LOG SEED [MODE]. MODE says which pages share content, so that the store's
 * deduplication and zero-page handling can be exercised and a restore checked page by page:
 *   distinct  every page its own content (the key is the page number; the default)
 *   same      every page the same content (one stored page for the whole heap)
 *   mixed     every 8th page (from page 3) zero, every 5th page its own content, the others
 *             one of 13 contents by page number mod 13: a page restored at the wrong
 *             address holds the wrong one of them
 *   zeros     60 of every 64 pages zero, the other 4 their own content
 * A zero page stays zero until a rewrite gives it a generation above 0. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, usr2;
static void on_usr1(int s) { (void)s; usr1++; }
static void on_usr2(int s) { (void)s; usr2++; }

static unsigned long long seed;
static unsigned long long *heap;
static unsigned char *gen;
static size_t npages;
static enum { DISTINCT, SAME, MIXED, ZEROS } mode;

static int is_zero(size_t page) {
    if (gen[page]) return 0;
    if (mode == MIXED) return page % 8 == 3;
    if (mode == ZEROS) return page % 64 < 60;
    return 0;
}

/* Pages with the same key (and generation) have the same content. */
static unsigned long long key(size_t page) {
    if (mode == SAME) return 0;
    if (mode == MIXED && page % 5 != 0) return page % 13;
    if (mode == MIXED) return 13 + page;
    return page;
}

static unsigned long long word(size_t page, unsigned g, size_t w) {
    unsigned long long x = seed * 0xD6E8FEB86659FD93ULL ^ page * 0x9E3779B97F4A7C15ULL ^
                           ((unsigned long long)g << 56) ^ w * 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 31;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 29;
    return x | 1;
}

static unsigned long long expected(size_t page, size_t w) {
    return is_zero(page) ? 0 : word(key(page), gen[page], w);
}

static void fill(size_t page) {
    unsigned long long *p = heap + page * 512;
    for (size_t w = 0; w < 512; w++) p[w] = expected(page, w);
}

static int check(void) {
    for (size_t i = 0; i < npages; i++) {
        unsigned long long *p = heap + i * 512;
        for (size_t w = 0; w < 512; w++)
            if (p[w] != expected(i, w)) return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    size_t mb = strtoul(argv[1], 0, 10);
    int log = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    seed = strtoull(argv[3], 0, 10);
    if (log < 0) return 2;
    if (argc > 4) {
        if (!strcmp(argv[4], "distinct")) mode = DISTINCT;
        else if (!strcmp(argv[4], "same")) mode = SAME;
        else if (!strcmp(argv[4], "mixed")) mode = MIXED;
        else if (!strcmp(argv[4], "zeros")) mode = ZEROS;
        else return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, 0);
    npages = (mb << 20) / 4096;
    heap = aligned_alloc(4096, npages * 4096);
    gen = calloc(npages, 1);
    if (!heap || !gen) return 3;
    for (size_t i = 0; i < npages; i++) fill(i);
    int seen1 = 0, seen2 = 0, muts = 0;
    size_t slice = npages / 20;
    for (unsigned long counter = 1;; counter++) {
        dprintf(log, "%lu\n", counter);
        if (usr1 != seen1) {
            seen1 = usr1;
            size_t from = (muts % 20) * slice;
            for (size_t i = from; i < from + slice; i++) {
                gen[i]++;
                fill(i);
            }
            muts++;
            dprintf(log, "MUT %d\n", muts);
        }
        if (usr2 != seen2) {
            seen2 = usr2;
            dprintf(log, "CHECK %s %d\n", check() ? "OK" : "BAD", muts);
        }
        usleep(10000);
    }
}
